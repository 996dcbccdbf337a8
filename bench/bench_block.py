"""Diffusion-LM block sampling: ``decodekit.sample_block`` against the same step written in eager PyTorch, side by side.

Shapes (issue 14): ``[1, 32, 126464]`` (LLaDA's vocabulary, one block of 32) and ``[8, 32, 32000]``. Every position is
masked (a block's first step: the most work). Parameter sets: LLaDA's greedy step with the unfiltered probability
as confidence, Dream's sampling step (top-p then top-k, negative entropy), and SDAR's / llama.cpp's (top-k then
top-p, the drawn token's probability). The eager baseline is what those projects run: softmax, a sort for top-p,
``torch.multinomial``, ``gather``, the entropy sum; for LLaDA its ``generate.py`` step verbatim (a float64 softmax),
with the same step in fp32 as a second, stronger row. On CPU the PyTorch path is timed, on CUDA the Triton kernel.

``DECODEKIT_BENCH_BLOCK_SMALL=1`` shrinks the shapes to a smoke test (``DECODEKIT_BENCH_BLOCK_SMALL=1 pytest
bench/bench_block.py --benchmark-disable``: every case runs once, the greedy ones checked; timing numbers come from
``make bench`` run alone on the machine).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.conftest import bench_device, run_bench
from decodekit.ops.sampling import sample_block

DEVICE = bench_device()
SMALL = os.environ.get("DECODEKIT_BENCH_BLOCK_SMALL", "") not in ("", "0")
SHAPES = [(1, 4, 1000), (2, 3, 257)] if SMALL else [(1, 32, 126464), (8, 32, 32000)]
PARAM_SETS = {
    "llada-T0-raw_prob": dict(temperature=0.0, top_k=0, top_p=1.0, order="top_k_first", confidence="raw_prob"),
    "dream-T0.2-p0.95-neg_entropy": dict(temperature=0.2, top_k=0, top_p=0.95, order="top_p_first",
                                         confidence="neg_entropy"),
    "sdar-T1-k50-p0.9-prob": dict(temperature=1.0, top_k=50, top_p=0.9, order="top_k_first", confidence="prob"),
}


def eager_block(logits: torch.Tensor, masked: torch.Tensor, ids: torch.Tensor, *, temperature: float, top_k: int,
                top_p: float, order: str, confidence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step as the reference projects write it (Dream's sample_tokens / SDAR's sampler / LLaDA)."""
    z = logits.float()
    if temperature > 0:
        z = z / temperature

    def topk(z: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        return z.masked_fill(z < kth, float("-inf"))

    def topp(z: torch.Tensor) -> torch.Tensor:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        sp = torch.softmax(sorted_z, dim=-1)
        remove = sp.cumsum(dim=-1) - sp >= top_p
        return z.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))

    if order == "top_k_first":
        z = topk(z) if top_k > 0 else z
        z = topp(z) if top_p < 1 else z
    else:
        z = topp(z) if top_p < 1 else z
        z = topk(z) if top_k > 0 else z
    probs = torch.softmax(z, dim=-1)
    B, L, V = probs.shape
    x0 = (torch.multinomial(probs.view(-1, V), 1).view(B, L) if temperature > 0 else probs.argmax(dim=-1))
    if confidence == "prob":
        conf = probs.gather(-1, x0[..., None])[..., 0]
    elif confidence == "raw_prob":
        conf = torch.softmax(logits.float(), dim=-1).gather(-1, x0[..., None])[..., 0]
    else:
        conf = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return torch.where(masked, x0, ids), torch.where(masked, conf, float("-inf"))


def llada_step(logits: torch.Tensor, masked: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's greedy low-confidence step as its ``generate.py`` writes it: the argmax of the logits (its Gumbel
    noise is the identity at temperature 0), the confidence from a float64 softmax, gathered."""
    x0 = torch.argmax(logits, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0[..., None])[..., 0]
    return torch.where(masked, x0, ids), torch.where(masked, x0_p, float("-inf"))


# (parameter set, implementation): LLaDA's set has two baselines, its own code (float64 softmax, the baseline) and
# the same step in fp32 (eager_block: a softmax, an argmax, a gather), the stronger bar
CASES = [(pset, impl) for pset in PARAM_SETS for impl in ("eager", "decodekit")] + [("llada-T0-raw_prob", "eager-fp32")]


@pytest.mark.parametrize("pset, impl", CASES)
@pytest.mark.parametrize("B,L,V", SHAPES)
def test_bench_sample_block(benchmark, B, L, V, pset, impl):
    kw = PARAM_SETS[pset]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, L, V, generator=g) * 3).to(DEVICE)
    masked = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    ids = torch.zeros(B, L, dtype=torch.int64, device=DEVICE)
    fns = {"eager-fp32": lambda: eager_block(logits, masked, ids, **kw),
           "eager": (lambda: llada_step(logits, masked, ids)) if pset.startswith("llada") else (
               lambda: eager_block(logits, masked, ids, **kw)),
           "decodekit": lambda: sample_block(logits, masked, input_ids=ids, seed=0, **kw)}
    tok, conf = run_bench(benchmark, fns[impl], group=f"sample_block [{B},{L},{V}] {pset}", impl=impl,
                          baseline=impl == "eager", bytes_moved=logits.numel() * logits.element_size(),
                          rounds=None if DEVICE.type == "cuda" or SMALL else 3, B=B, L=L, V=V, params=pset)
    assert tok.shape == (B, L) and bool(torch.isfinite(conf).all())
    if kw["temperature"] == 0:  # greedy: every implementation gives the same tokens and confidences
        want_tok, want_conf = llada_step(logits, masked, ids)
        assert torch.equal(tok, want_tok)
        torch.testing.assert_close(conf.double(), want_conf, rtol=1e-5, atol=1e-7)
