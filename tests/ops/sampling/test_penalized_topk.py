"""The CPU sampler's top-k path with lowering penalties (``_penalized_topk_plan``): it penalizes the top-k
candidates instead of a ``[B, V]`` copy, and must keep exactly the general path's set and draw its tokens."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.ops.sampling import cpu, reference


def _general(monkeypatch):
    monkeypatch.setattr(cpu, "_penalized_topk_plan", lambda logits, prm: None)


def _case(B: int, V: int, seed: int, *, ties: bool, seen_top: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    if ties:  # coarse values: long tie groups at the k-th value
        x = (x * 2).round() / 2
    counts = torch.zeros(B, V, dtype=torch.int32)
    hist = torch.randint(0, V, (B, 40), generator=g)
    counts.scatter_add_(1, hist, torch.ones_like(hist, dtype=torch.int32))
    if seen_top:  # the best logits were already seen: the penalty pushes them out, the candidate list must grow
        top = x.topk(seen_top, dim=1).indices
        counts.scatter_(1, top, 3)
    return x, counts


SETTINGS = [
    dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0),  # the Hugging Face set
    dict(temperature=1.3, top_k=5, top_p=1.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25),
    dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.05, repetition_penalty=2.0),
]


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seen_top", [0, 3, 200])
@pytest.mark.parametrize("B,V", [(1, 30_011), (3, 40_000), (8, 4099)])
def test_fast_path_keeps_the_general_paths_set_and_tokens(monkeypatch, B, V, seen_top, ties, kw):
    x, counts = _case(B, V, seed=B * 7 + V + seen_top, ties=ties, seen_top=seen_top)
    before = x.clone()
    prm_kw = dict(token_counts=counts, **kw)
    seeds = torch.arange(B) + 11
    fast_probs = decodekit.sampling_probs(x, backend="torch", **prm_kw)
    fast_tok = decodekit.sample(x, seed=seeds, backend="torch", **prm_kw)
    ref = reference.sampling_probs_ref(x.double(), **prm_kw)
    with monkeypatch.context() as m:
        _general(m)
        gen_probs = decodekit.sampling_probs(x, backend="torch", **prm_kw)
        gen_tok = decodekit.sample(x, seed=seeds, backend="torch", **prm_kw)
    assert torch.equal(x, before)  # the caller's logits untouched
    assert torch.equal(fast_probs > 0, gen_probs > 0)  # the same kept set
    assert torch.equal(fast_probs > 0, ref > 0)  # and the reference's
    torch.testing.assert_close(fast_probs, gen_probs, rtol=1e-6, atol=1e-7)
    assert torch.equal(fast_tok, gen_tok)


def test_fast_path_is_taken_and_declines_what_it_cannot_do():
    x, counts = _case(2, 5000, seed=1, ties=False, seen_top=0)

    def prm(**kw):
        base = dict(temperature=0.8, top_k=30, top_p=0.8, min_p=0.0, repetition_penalty=10.0, presence_penalty=0.0,
                    frequency_penalty=0.0, token_counts=counts, tts=False, greedy_top1=True)
        return cpu.RowParams(**{**base, **kw})

    assert cpu._penalized_topk_plan(x, prm()) is not None
    assert cpu._penalized_topk_plan(x, prm(repetition_penalty=0.9)) is None  # raises logits
    assert cpu._penalized_topk_plan(x, prm(presence_penalty=-0.5)) is None
    assert cpu._penalized_topk_plan(x, prm(repetition_penalty=1.0)) is None  # no penalty: nothing to save
    assert cpu._penalized_topk_plan(x, prm(top_k=0)) is None  # whole rows
    assert cpu._penalized_topk_plan(x, prm(temperature=0.0)) is None  # greedy
    assert cpu._penalized_topk_plan(x, prm(tts=True)) is None  # needs the whole penalized row's mass
    bad = x.clone()
    bad[1, 7] = float("nan")
    assert cpu._penalized_topk_plan(bad, prm()) is None  # bad rows: the general path's rules
    per_row = torch.tensor([1.5, 10.0])
    assert cpu._penalized_topk_plan(x, prm(repetition_penalty=per_row)) is not None


def test_large_calls_run_their_full_row_passes_on_one_thread(monkeypatch):
    """From 2**20 logits the fast path's topk and row max run on one thread (a busy core cannot stall a parallel
    op's barrier); smaller calls keep the caller's threads. The result is the same either way."""
    seen: list[int] = []
    real = cpu.torch_threads

    def spy(n: int):  # noqa: ANN202
        seen.append(n)
        return real(n)

    monkeypatch.setattr(cpu, "torch_threads", spy)
    for B, V, one_thread in ((8, 131072, True), (2, 30000, False)):
        x, counts = _case(B, V, seed=3, ties=False, seen_top=0)
        prm = cpu.RowParams(temperature=0.8, top_k=30, top_p=0.8, min_p=0.0, repetition_penalty=10.0,
                            presence_penalty=0.0, frequency_penalty=0.0, token_counts=counts, tts=False,
                            greedy_top1=True)
        seen.clear()
        plan = cpu._penalized_topk_plan(x, prm)
        assert plan is not None and seen == ([1] if one_thread else []), (B, V, seen)
