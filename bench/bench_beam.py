"""Beam sampling, the IndexTTS2 GPT stage (issue 13): decodekit on ONNX Runtime against Hugging Face ``generate``.

The workload: a GPT-2 architecture with IndexTTS2's mel-code vocabulary (V = 8194: 8192 = start, 8193 = stop) and
GPT-2-small dimensions (12 layers, d 768, 12 heads; random weights, saved with ``save_pretrained`` so that
``transformers`` runs the very same weights), one prompt of 32 tokens, ``num_beams=3, do_sample=True, top_p=0.8,
top_k=30, temperature=0.8, repetition_penalty=10.0, length_penalty=0.0``, exactly 128 new tokens (no stop id,
so every implementation does the same number of steps).

Two groups, side by side in one run:

* ``beam sampling``: ``hf-generate`` (the baseline) against ``ort-iobinding+beam_candidates`` (decodekit: IO
  binding, the logits read in place by ``decodekit.beam_candidates``, the KV cache gathered between the
  ping-pong storages); target >= 2x.
* ``3 beams vs 1 beam``: decodekit with one beam (plain sampling, the baseline) against three beams (one batched
  step of 3 rows); target: 3 beams take at most 1.6x the time (a speedup >= 0.625 in the report).

On a CUDA machine the same two groups run again on the GPU (``... (CUDA)``): transformers on CUDA against decodekit
on ONNX Runtime's CUDA provider when this ``onnxruntime`` has it, else decodekit's eager backend on CUDA (the Triton
``beam_candidates`` kernel compiled, the cache reordered by ``index_select``).

``DECODEKIT_BENCH_BEAM_TINY=1`` shrinks the model and the generation for a smoke run (no numbers).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.conftest import cuda_only, run_bench
from decodekit.export import export_decoder
from decodekit.runtime import OnnxDecoder, load_backend

pytest.importorskip("transformers", reason="the beam benchmark compares against transformers' generate")

TINY = os.environ.get("DECODEKIT_BENCH_BEAM_TINY", "") not in ("", "0")
VOCAB = 8194
START, STOP = 8192, 8193
NEW_TOKENS = 8 if TINY else 128
PROMPT_LEN = 32
BEAMS = 3
SETTINGS = dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0)  # IndexTTS2's GPT stage


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> dict:
    """The IndexTTS2-shaped GPT: the transformers model and its decodekit export."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dims = dict(n_embd=64, n_layer=2, n_head=4) if TINY else dict(n_embd=768, n_layer=12, n_head=12)
    # no EOS: both sides keep 2 * num_beams candidates a step and run exactly NEW_TOKENS steps
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=PROMPT_LEN + NEW_TOKENS + 8, bos_token_id=START,
                     eos_token_id=None, pad_token_id=START, **dims)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp("beam-bench")
    hf.save_pretrained(root / "gpt")
    export_decoder(root / "gpt", root / "gpt-onnx", progress=False)
    g = torch.Generator().manual_seed(7)
    prompt = [START] + torch.randint(0, 8192, (PROMPT_LEN - 1,), generator=g).tolist()
    return {"hf": hf, "dir": root / "gpt", "export": root / "gpt-onnx", "prompt": prompt}


def _cuda_backend() -> str:
    """decodekit's backend for the CUDA rows: ONNX Runtime when it has the CUDA provider, else eager."""
    import onnxruntime as ort

    return "onnx" if "CUDAExecutionProvider" in ort.get_available_providers() else "eager"


def _decodekit(gpt: dict, beams: int, device: str = "cpu"):
    if device == "cpu":
        dec = OnnxDecoder(gpt["export"], "cpu", max_batch=beams)
    else:
        backend = _cuda_backend()
        dec = load_backend(gpt["export"] if backend == "onnx" else gpt["dir"], backend, device="cuda",
                           max_batch=beams)

    def fn():
        res = dec.generate([gpt["prompt"]], max_new_tokens=NEW_TOKENS, num_beams=beams, length_penalty=0.0,
                           stop_ids=[], seed=1234, **SETTINGS)
        assert len(res.tokens[0]) == NEW_TOKENS
        return res

    return fn


def _hf(gpt: dict, device: str = "cpu"):
    hf, ids = gpt["hf"].to(device), torch.tensor([gpt["prompt"]], device=device)

    def fn():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, num_beams=BEAMS,
                              do_sample=True, length_penalty=0.0, pad_token_id=START, eos_token_id=None,
                              **SETTINGS)
        assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
        return out

    return fn


@pytest.mark.parametrize("impl", ["hf-generate", "ort-iobinding+beam_candidates"])
def test_beam_sampling(benchmark, gpt, impl):
    fn = _hf(gpt) if impl == "hf-generate" else _decodekit(gpt, BEAMS)
    run_bench(
        benchmark, fn, group=f"beam sampling: IndexTTS2-shaped GPT (V={VOCAB}), {BEAMS} beams, {NEW_TOKENS} tokens",
        impl=impl, baseline=impl == "hf-generate", rounds=1 if TINY else 3, host_only=True,
        tokens=NEW_TOKENS, num_beams=BEAMS, target="decodekit >= 2x hf-generate",
    )


@pytest.mark.parametrize("beams", [1, BEAMS])
def test_beams_vs_one_beam(benchmark, gpt, beams):
    run_bench(
        benchmark, _decodekit(gpt, beams),
        group=f"decodekit ORT, IndexTTS2-shaped GPT: {BEAMS} beams vs 1 beam, {NEW_TOKENS} tokens",
        impl=f"ort {beams} beam{'s' if beams > 1 else ''}", baseline=beams == 1, rounds=1 if TINY else 3,
        host_only=True, tokens=NEW_TOKENS, num_beams=beams, target=f"{BEAMS} beams <= 1.6x the time of 1 beam",
    )


@cuda_only("the CUDA rows of the beam benchmark")
@pytest.mark.parametrize("impl", ["hf-generate", "decodekit"])
def test_beam_sampling_cuda(benchmark, gpt, impl):
    fn = _hf(gpt, "cuda") if impl == "hf-generate" else _decodekit(gpt, BEAMS, "cuda")
    name = impl if impl == "hf-generate" else f"decodekit-{_cuda_backend()}+beam_candidates"
    try:
        run_bench(
            benchmark, fn,
            group=f"beam sampling (CUDA): IndexTTS2-shaped GPT (V={VOCAB}), {BEAMS} beams, {NEW_TOKENS} tokens",
            impl=name, baseline=impl == "hf-generate", rounds=1 if TINY else 3, tokens=NEW_TOKENS, num_beams=BEAMS,
            target="decodekit >= 2x hf-generate",
        )
    finally:
        gpt["hf"].to("cpu")


@cuda_only("the CUDA rows of the beam benchmark")
@pytest.mark.parametrize("beams", [1, BEAMS])
def test_beams_vs_one_beam_cuda(benchmark, gpt, beams):
    run_bench(
        benchmark, _decodekit(gpt, beams, "cuda"),
        group=f"decodekit-{_cuda_backend()} (CUDA), IndexTTS2-shaped GPT: {BEAMS} beams vs 1 beam, {NEW_TOKENS} tokens",
        impl=f"{beams} beam{'s' if beams > 1 else ''}", baseline=beams == 1, rounds=1 if TINY else 3,
        tokens=NEW_TOKENS, num_beams=beams, target=f"{BEAMS} beams <= 1.6x the time of 1 beam",
    )
