"""The launch and thread helpers every op family shares (``decodekit/ops/_dispatch.py``, ``_threads.py``)."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.ops._dispatch import register_budget
from decodekit.ops._threads import torch_threads


@pytest.mark.parametrize(
    "warps_per_sm,budget",
    [(1, 255), (4, 255), (8, 255), (16, 128), (20, 96), (24, 80), (32, 64), (48, 40), (64, 32)],
)
def test_register_budget_keeps_the_warps_resident(warps_per_sm, budget):
    assert register_budget(warps_per_sm) == budget
    # the budget times the threads of those warps fits the 64K registers of an SM, in units of 8 per thread
    assert budget * warps_per_sm * 32 <= 65536 and (budget % 8 == 0 or budget == 255)


@pytest.mark.parametrize("bad", [0, -1])
def test_register_budget_rejects_no_warps(bad):
    with pytest.raises(ValueError, match="warps_per_sm"):
        register_budget(bad)


def test_torch_threads_sets_and_restores(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with torch_threads(4):  # never raises the count
        assert torch.get_num_threads() == 2


def test_full_row_sampling_restores_the_thread_count(two_threads):
    """Top-p alone on rows too large for the NumPy path runs its full-row passes on one thread, then gives the
    caller's setting back, also for the probabilities."""
    x = torch.randn(4, 40_000)
    before = x.clone()
    tok = decodekit.sample(x, temperature=1.0, top_p=0.9, top_k=0, seed=torch.arange(4))
    assert torch.get_num_threads() == 2 and tok.shape == (4,) and torch.equal(x, before)
    probs = decodekit.sampling_probs(x, temperature=1.0, top_p=0.9, top_k=0)
    assert torch.get_num_threads() == 2 and torch.allclose(probs.sum(dim=1), torch.ones(4))
