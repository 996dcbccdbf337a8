"""Sampler benchmarks: ``sample`` / ``sample_logits`` against the eager references, side by side.

Groups: op x parameter set x B x V. On CPU the PyTorch path (what ``backend="auto"`` picks) is timed; on CUDA
the Triton kernel, FlashInfer's ``top_k_top_p_sampling_from_logits`` when it imports, and a plain copy of
the logits (the bandwidth yardstick: one read + one write). ``bytes_moved`` = the logits (+ the token counts).

The logits are ``randn * 4`` (a peaked, LM-like distribution: top-p 0.85 keeps a few hundred of 128k tokens).
V = 1024 stands for a TTS codebook: a call costs tens of microseconds there, so per-call overhead is the metric.
The eager baseline at B=256 x V=128256 takes seconds on the CPU, so rounds are few there (pedantic mode, 5).
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import bench_device, run_bench
from decodekit.ops.sampling import sample, sample_logits
from decodekit.ops.sampling.reference import sample_logits_ref, sampling_probs_ref

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
BATCHES = [1, 8, 64, 256]
VOCABS = [1024, 32000, 128256]  # 1024: a TTS codebook (on CPU the NumPy small-row path)
HISTORY = 256

# name -> (op, kwargs)
PARAM_SETS = {
    "tts-T1-p0.95-k20": ("sample_logits", dict(temperature=1.0, top_p=0.95, top_k=20)),
    "tts-T1-p0.95-k80": ("sample_logits", dict(temperature=1.0, top_p=0.95, top_k=80)),
    "tts-p0.85": ("sample_logits", dict(temperature=1.0, top_p=0.85, top_k=0)),
    "hf-T0.8-k30-p0.8-rep10": ("sample", dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0)),
}


def _hf_eager(logits: torch.Tensor, counts: torch.Tensor, kw: dict) -> torch.Tensor:
    """Eager Hugging Face-style pipeline (the way generate does it: full sort for top-p)."""
    z = logits.float()
    seen = counts > 0
    z = torch.where(seen, torch.where(z > 0, z / kw["repetition_penalty"], z * kw["repetition_penalty"]), z)
    z = z / kw["temperature"]
    kth = torch.topk(z, kw["top_k"], dim=-1).values[..., -1:]
    z = z.masked_fill(z < kth, float("-inf"))
    sorted_z, idx = torch.sort(z, descending=False)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - kw["top_p"])
    remove[..., -1:] = False
    z = z.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return torch.multinomial(torch.softmax(z, dim=-1), 1)


def _rounds(B: int, V: int) -> int | None:
    if CUDA:
        return None
    return 5 if B * V >= 64 * 128256 else (8 if B * V >= 8 * 128256 else None)  # medians of 5: a noisy shared host


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("pset", list(PARAM_SETS))
@pytest.mark.parametrize("impl", ["eager", "decodekit", "flashinfer", "copy"])
def test_bench_sampling(benchmark, impl, pset, B, V):
    op, kw = PARAM_SETS[pset]
    if impl in ("flashinfer", "copy") and not CUDA:
        pytest.skip(f"{impl}: CUDA-only comparison; no CUDA device here")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(B, V, device=DEVICE, generator=g) * 4.0
    counts = None
    if op == "sample":
        hist = torch.randint(0, V, (B, HISTORY), device=DEVICE, generator=g)
        counts = torch.zeros(B, V, dtype=torch.int32, device=DEVICE).scatter_add_(
            1, hist, torch.ones_like(hist, dtype=torch.int32))
    nbytes = logits.numel() * logits.element_size() + (counts.numel() * 4 if counts is not None else 0)
    if impl == "eager":
        if op == "sample_logits":
            fn = lambda: sample_logits_ref(logits, kw["temperature"], kw["top_p"], kw["top_k"], upcast=False)
        else:
            fn = lambda: _hf_eager(logits, counts, kw)
    elif impl == "decodekit":
        seeds = torch.arange(B, dtype=torch.int64, device=DEVICE)
        if op == "sample_logits":
            fn = lambda: sample_logits(logits, kw["temperature"], kw["top_p"], kw["top_k"], seed=seeds)
        else:
            fn = lambda: sample(logits, token_counts=counts, seed=seeds, **kw)
    elif impl == "flashinfer":
        try:
            import flashinfer  # noqa: F401
            from flashinfer.sampling import top_k_top_p_sampling_from_logits
        except Exception:  # pragma: no cover - optional
            pytest.skip("flashinfer not importable")
        if counts is not None:
            pytest.skip("flashinfer has no repetition penalty")
        k = kw["top_k"] if kw["top_k"] > 0 else V
        fn = lambda: top_k_top_p_sampling_from_logits(logits / kw["temperature"], k, kw["top_p"])
    else:
        fn = lambda: logits.clone()
    run_bench(benchmark, fn, group=f"{op} {pset} B={B} V={V}", impl=impl, baseline=impl == "eager",
              bytes_moved=nbytes, rounds=_rounds(B, V), B=B, V=V)


def test_bench_reference_is_the_hf_semantics():
    """Keep the eager HF-style baseline honest: it keeps the same set as the project's reference."""
    x = torch.randn(2, 500) * 3
    counts = torch.randint(0, 2, (2, 500), dtype=torch.int32)
    kw = PARAM_SETS["hf-T0.8-k30-p0.8-rep10"][1]
    probs = sampling_probs_ref(x, token_counts=counts, **kw)
    for _ in range(20):
        tok = _hf_eager(x, counts, kw)
        assert bool((probs.gather(1, tok) > 0).all())
