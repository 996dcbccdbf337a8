"""Block-diffusion generation: ``decodekit.diffusion_generate`` on ONNX Runtime (one IO-bound session, logits sampled
in place by ``sample_block``) against the same loop in eager PyTorch with the PyTorch sampler, side by side.

The model is a random-weight LLaDA-shaped decoder (bidirectional Llama, mask token, LLaDA's 126464-token
vocabulary, a few small layers so that a CPU run takes seconds); the run is LLaDA's default shape scaled to it:
gen 128, block 32, 32 steps, greedy with low-confidence remasking, and a sampled variant (T 0.8, top-k 50,
top-p 0.95, the token's probability as confidence). The export happens once per module, outside the timing.

``DECODEKIT_BENCH_DIFFUSION_SMALL=1`` shrinks model and run to a smoke test.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.bench_block import eager_block
from bench.conftest import run_bench
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder

SMALL = os.environ.get("DECODEKIT_BENCH_DIFFUSION_SMALL", "") not in ("", "0")
VOCAB = 512 if SMALL else 126464
GEN, BLOCK, STEPS = (16, 8, 4) if SMALL else (128, 32, 32)
PROMPT = [[1, 17, 300, 42, 7, 99, 5, 11]]
PARAM_SETS = {
    "llada-greedy-raw_prob": dict(temperature=0.0, confidence="raw_prob"),
    "T0.8-k50-p0.95-prob": dict(temperature=0.8, top_k=50, top_p=0.95, confidence="prob"),
}
KV_CACHE = {"decodekit-onnx": False, "decodekit-onnx-kv_cache": True}  # phase 1 / phase 2 (block-causal)
# ORT's workers: the default (spin 5 us, then block) and blocking at once ("-block", this runtime's policy before
# the diffusion session followed OnnxDecoder's)
IMPLS = {f"{name}{suffix}": (kv, spin) for name, kv in KV_CACHE.items() for suffix, spin in (("", None),
                                                                                           ("-block", False))}


def _model() -> Decoder:
    cfg = DecoderConfig(arch="llama", vocab_size=VOCAB, dim=64 if SMALL else 256, n_layers=2 if SMALL else 4,
                        n_heads=4 if SMALL else 8, n_kv_heads=2 if SMALL else 8, hidden_dim=128 if SMALL else 704,
                        max_seq_len=256, rope_layout="halves", tie_embeddings=False, causal=False,
                        mask_id=VOCAB - 1)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(5.0)  # peaked distributions, like a trained model's
    return model


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    from decodekit.export import export_decoder

    model = _model()
    out = tmp_path_factory.mktemp("llada_bench") / "export"
    export_decoder(model, out, all_logits=True, progress=False, atol=1e-3)
    return model, out


def eager_diffusion(model: Decoder, prompt: list[list[int]], kw: dict) -> torch.Tensor:
    """LLaDA's loop in eager PyTorch with the PyTorch sampler steps (softmax, sort for top-p, multinomial, gather)."""
    mask_id = model.config.mask_id
    x = torch.full((len(prompt), len(prompt[0]) + GEN), mask_id, dtype=torch.long)
    x[:, : len(prompt[0])] = torch.tensor(prompt)
    P, per_block = len(prompt[0]), STEPS // (GEN // BLOCK)
    opts = dict(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0),
                order="top_k_first", confidence=kw["confidence"])
    for blk in range(GEN // BLOCK):
        s, e = P + blk * BLOCK, P + (blk + 1) * BLOCK
        m = (x[:, s:e] == mask_id).sum(dim=1)
        num = [m // per_block + (i < m % per_block) for i in range(per_block)]
        for i in range(per_block):
            with torch.no_grad():
                logits, _ = model(x, torch.arange(x.shape[1])[None], torch.ones_like(x), None, all_logits=True)
            logits[..., mask_id] = float("-inf")
            masked = x[:, s:e] == mask_id
            tok, conf = eager_block(logits[:, s:e], masked, x[:, s:e], **opts)
            for b in range(x.shape[0]):
                idx = torch.topk(conf[b], int(num[i][b])).indices
                x[b, s + idx] = tok[b, idx]
    return x


@pytest.mark.parametrize("impl", ["eager", *IMPLS])
@pytest.mark.parametrize("pset", list(PARAM_SETS))
def test_bench_diffusion_generate(benchmark, llada, pset, impl):
    from decodekit.runtime.diffusion import OnnxDiffusionModel, diffusion_generate

    model, out = llada
    kw = PARAM_SETS[pset]
    if impl == "eager":
        fn = lambda: eager_diffusion(model, PROMPT, kw)  # noqa: E731
    else:
        kv_cache, spin_wait = IMPLS[impl]
        onnx_model = OnnxDiffusionModel(out, spin_wait=spin_wait)
        fn = lambda: diffusion_generate(onnx_model, PROMPT, GEN, BLOCK, STEPS, seed=0, kv_cache=kv_cache,  # noqa: E731
                                        **kw).tokens
    tokens = run_bench(benchmark, fn, group=f"diffusion_generate gen {GEN} block {BLOCK} steps {STEPS} V {VOCAB} "
                       f"{pset}", impl=impl, baseline=impl == "eager", rounds=None if SMALL else 3, host_only=True,
                       gen_length=GEN, block_length=BLOCK, steps=STEPS, vocab=VOCAB, params=pset)
    assert not bool((tokens == model.config.mask_id).any())
