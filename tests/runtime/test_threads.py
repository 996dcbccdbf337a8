"""run_generation on a backend that owns the CPU cores (ONNX Runtime on CPU) runs torch's own ops on one thread,
and gives the thread count back afterwards, also when the generation raises."""

from __future__ import annotations

import pytest
import torch

from decodekit.runtime import loop


class _Owner:
    owns_cpu_threads = True


def test_one_torch_thread_inside_and_restored(two_threads):
    with loop._torch_on_one_thread(_Owner()):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restored_when_the_generation_raises(two_threads):
    with pytest.raises(RuntimeError, match="boom"), loop._torch_on_one_thread(_Owner()):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_other_backends_keep_their_threads(two_threads):
    with loop._torch_on_one_thread(object()):  # eager PyTorch: torch does the heavy work
        assert torch.get_num_threads() == 2


def test_run_generation_takes_the_onnx_decoder_to_one_thread(two_threads, monkeypatch, tmp_path):
    seen = []

    def fake(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return "result"

    monkeypatch.setattr(loop, "_run_generation", fake)
    assert loop.run_generation(_Owner(), [[1]], loop.GenerationConfig()) == "result"
    assert seen == [1] and torch.get_num_threads() == 2
