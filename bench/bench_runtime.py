"""End-to-end generation: eager PyTorch vs Hugging Face generate vs ONNX Runtime (plain run / IO binding).

Each benchmark generates exactly 128 new tokens per row (stop ids off) from an 8-token prompt, sampling with
temperature 0.8 and top-p 0.95, at batch 1 and 8, for

* stories260K (the real llama2.c model in ../shared), and
* a GPT-2-small-shaped model with random weights (d 768, 12 layers, 12 heads, vocab 50257), saved in Hugging
  Face format so that ``transformers``' own ``generate`` runs the very same weights.

Implementations (one group per model and batch; the baseline is eager PyTorch, decodekit's model with its KV
cache): ``hf-generate`` (GPT-2 only), ``ort-plain-run`` (``session.run`` with numpy, the cache round-tripping
through numpy), ``ort-iobinding+fused-sampler`` (this project's runtime). ``tokens`` in extra_info is B x 128,
so the report's tok/s is generated tokens per second of the whole call (prefill included).

For GPT-2 at batch 1 the IO-binding benchmark also records the memory-bandwidth floor: the fp32 weight bytes
read per token divided by the measured matrix-vector bandwidth of this machine (the faster of torch ``F.linear``
and NumPy's BLAS on one vector by a 308 MB matrix), and the fraction of that floor the measured time per token
(the whole generation loop: ONNX Runtime step, sampler and host loop) reaches.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from bench.conftest import run_bench
from decodekit.export import export_decoder
from decodekit.models import load_model
from decodekit.runtime import EagerDecoder, OnnxDecoder

# the GPT-2 model is built and run with transformers (the `hf` extra); a bare GPU box may lack it
pytest.importorskip("transformers", reason="the end-to-end benchmark compares against transformers' generate")

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "stories260K.bin"
NEW_TOKENS = 128
PROMPT_LEN = 8
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=1234, stop_ids=[])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict]:
    """name -> {"src": checkpoint or HF dir, "export": export dir, "hf": HF model or None}."""
    if not STORIES.is_file():
        pytest.fail(f"missing {STORIES} (the shared stories260K model)")
    root = tmp_path_factory.mktemp("runtime-bench")
    out = {"stories260K": {"src": STORIES, "hf": None}}
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    hf_dir = root / "gpt2-small-random"
    hf.save_pretrained(hf_dir)
    out["gpt2-small-shape"] = {"src": hf_dir, "hf": hf}
    for name, entry in out.items():
        entry["export"] = root / f"{name}-onnx"
        export_decoder(entry["src"], entry["export"], progress=False)
    return out


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, min(vocab, 500), (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(batch)]


def _matvec_bandwidth_gbs() -> dict[str, float]:
    """Median GB/s of one fp32 matrix-vector product over a 308 MB matrix (2 x 50257 rows of 768, far beyond the
    caches), with torch ``F.linear`` and with NumPy's BLAS ``x @ W``; the faster is this machine's ceiling."""
    import numpy as np

    def median_gbs(fn, nbytes: int) -> float:
        times = []
        for _ in range(12):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return nbytes / statistics.median(times[2:]) / 1e9

    w = torch.randn(2 * 50257, 768)
    x = torch.randn(1, 768)
    wn = np.ascontiguousarray(w.numpy().T)  # [768, N]: x @ W streams W row by row
    xn = x.numpy()
    # NumPy first: torch's OpenMP workers spin for a while after a parallel region and would steal BLAS's cores
    got = {"numpy_matvec_gbs": median_gbs(lambda: xn @ wn, wn.nbytes)}
    got["torch_matvec_gbs"] = median_gbs(lambda: torch.nn.functional.linear(x, w), w.numel() * 4)
    return got


IMPLS = ["eager", "hf-generate", "ort-plain-run", "ort-iobinding+fused-sampler"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model_name", ["stories260K", "gpt2-small-shape"])
@pytest.mark.parametrize("impl", IMPLS)
def test_generate(benchmark, models, model_name, batch, impl):
    entry = models[model_name]
    if impl == "hf-generate" and entry["hf"] is None:
        pytest.skip("Hugging Face generate only for the GPT-2 model (stories260K is a llama2.c checkpoint)")
    if impl == "eager":
        runner = EagerDecoder(load_model(entry["src"]), max_batch=batch)
    elif impl == "ort-plain-run":
        runner = OnnxDecoder(entry["export"], "cpu", max_batch=batch, io_binding=False)
    elif impl == "ort-iobinding+fused-sampler":
        runner = OnnxDecoder(entry["export"], "cpu", max_batch=batch)
    else:
        runner = None
    vocab = 512 if model_name == "stories260K" else 50257
    prompts = _prompts(batch, vocab)

    if runner is not None:

        def fn():
            res = runner.generate(prompts, max_new_tokens=NEW_TOKENS, **SAMPLING)
            assert all(len(t) == NEW_TOKENS for t in res.tokens)
            return res

    else:
        hf = entry["hf"]
        ids = torch.tensor(prompts)

        def fn():
            with torch.inference_mode():
                out = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    top_k=0,
                    pad_token_id=0,
                )
            assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
            return out

    rounds = 3 if model_name == "gpt2-small-shape" else 15  # stories: ~0.1 s a round, noisy 2-core machine
    run_bench(
        benchmark,
        fn,
        group=f"generate {model_name} B={batch} {NEW_TOKENS} new tokens (fp32, CPU)",
        impl=impl,
        baseline=impl == "eager",
        rounds=rounds,
        host_only=True,  # ONNX Runtime's CPU provider and CPU torch tensors, also on a GPU machine
        tokens=batch * NEW_TOKENS,
        batch=batch,
        prompt_len=PROMPT_LEN,
    )
    if model_name == "gpt2-small-shape" and batch == 1 and impl == "ort-iobinding+fused-sampler":
        n_params = sum(p.numel() for p in entry["hf"].parameters())  # tied classifier counted once
        weight_bytes = n_params * 4
        measured = _matvec_bandwidth_gbs()
        bw = max(measured.values())
        per_token = benchmark.stats.stats.median / NEW_TOKENS
        floor = weight_bytes / (bw * 1e9)
        benchmark.extra_info.update(
            weight_mb=round(weight_bytes / 1e6, 1),
            **{k: round(v, 2) for k, v in measured.items()},
            matvec_gbs=round(bw, 2),
            floor_ms_per_token=round(floor * 1e3, 3),
            ms_per_token=round(per_token * 1e3, 3),
            fraction_of_bw_floor=round(floor / per_token, 3),
        )


# --- SmolLM2-135M-Instruct (GGUF): greedy 128 new tokens after a chat prompt ------------------------------------
# decodekit on ONNX Runtime (fp32 and int4 MatMulNBits exports, IO binding + fused sampler) against Hugging Face
# generate (fp32, the GGUF loaded by transformers) and decodekit eager; B = 1 and 8 (eight different questions,
# left-padded). tok/s in the report is generated tokens per second of the whole call (prefill included);
# extra_info adds the time to first token (ms, median over the rounds; for HF a 1-token generate, timed apart)
# and the decode-only tokens/s. Exports are made once per run (about 2 min each here); set
# DECODEKIT_BENCH_EXPORTS=DIR to keep them in DIR between runs, DECODEKIT_BENCH_SMOLLM_TOKENS=N for a smoke test.

import os  # noqa: E402

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_TOKENS = int(os.environ.get("DECODEKIT_BENCH_SMOLLM_TOKENS", NEW_TOKENS))
SMOLLM_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "Give three tips for learning a language.", "What is 17 times 23?", "Describe a cat to someone who never saw one.",
    "Why is the sky blue?", "Name the planets of the solar system.",
]
SMOLLM_IMPLS = ["eager", "hf-generate", "ort-fp32", "ort-int4"]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> dict:
    """The GGUF file, its fp32 and int4 exports, transformers' model and the chat prompts' ids."""
    if not SMOLLM.is_file():
        pytest.fail(f"missing {SMOLLM} (the shared SmolLM2-135M GGUF)")
    from transformers import AutoModelForCausalLM

    from decodekit.models import load_tokenizer
    from decodekit.runtime import chat_prompt

    root = Path(os.environ["DECODEKIT_BENCH_EXPORTS"]) if os.environ.get("DECODEKIT_BENCH_EXPORTS") else (
        tmp_path_factory.mktemp("smollm-bench"))
    exports = {}
    for weights in ("fp32", "int4"):
        exports[weights] = root / f"smollm2-{weights}"
        if not (exports[weights] / "decodekit.json").is_file():
            export_decoder(SMOLLM, exports[weights], weights=weights, progress=False, force=True)
    tok = load_tokenizer(SMOLLM)
    prompts = [chat_prompt(tok, q)[0] for q in SMOLLM_QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32).eval()
    return {"exports": exports, "hf": hf, "prompts": prompts}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", SMOLLM_IMPLS)
def test_generate_smollm(benchmark, smollm, batch, impl):
    prompts = smollm["prompts"][:batch]
    longest = max(len(p) for p in prompts)
    max_seq = longest + SMOLLM_TOKENS + 1
    greedy = dict(temperature=0.0, stop_ids=[])
    ttfts, decode_tps = [], []
    if impl == "hf-generate":
        hf = smollm["hf"]
        ids = torch.tensor([[2] * (longest - len(p)) + p for p in prompts])  # left padding (pad = <|im_end|>)
        mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()

        def hf_generate(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=2)

        for _ in range(3):
            t = time.perf_counter()
            hf_generate(1)
            ttfts.append(time.perf_counter() - t)

        def fn():
            out = hf_generate(SMOLLM_TOKENS)
            assert out.shape[1] == longest + SMOLLM_TOKENS
            return out

    else:
        if impl == "eager":
            runner = EagerDecoder(load_model(SMOLLM), max_batch=batch, max_seq_len=max_seq)
        else:
            runner = OnnxDecoder(smollm["exports"][impl.removeprefix("ort-")], "cpu", max_batch=batch,
                                 max_seq_len=max_seq)

        def fn():
            res = runner.generate(prompts, max_new_tokens=SMOLLM_TOKENS, **greedy)
            assert all(len(t) == SMOLLM_TOKENS for t in res.tokens)
            ttfts.append(res.time_to_first_token_s)
            decode_tps.append(res.decode_tokens_per_s)
            return res

    run_bench(
        benchmark,
        fn,
        group=f"generate SmolLM2-135M B={batch} greedy {SMOLLM_TOKENS} new tokens after a chat prompt (CPU)",
        impl=impl,
        baseline=impl == "eager",
        rounds=3,
        host_only=True,
        tokens=batch * SMOLLM_TOKENS,
        batch=batch,
        prompt_len=longest,
    )
    benchmark.extra_info["ttft_ms"] = round(statistics.median(ttfts) * 1e3, 1)
    if decode_tps:
        benchmark.extra_info["decode_tok_s"] = round(statistics.median(decode_tps), 1)
