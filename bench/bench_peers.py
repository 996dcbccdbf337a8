"""decodekit's ONNX runtime against the CPU runtimes a user would pick next: onnxruntime-genai and CTranslate2.

Greedy decoding of exactly ``NEW_TOKENS`` new tokens per row (no stop token) from the same prompts (token ids; at
B = 8 eight different prompts of one length, so no runtime pads), at batch 1 and 8, for

* stories260K (the llama2.c model in ../shared; head size 8), and
* SmolLM2-135M-Instruct (the GGUF in ../shared, dequantized to fp32; head size 64).

Implementations (one group per model and batch; the baseline is decodekit's plain standard-op graph):

* ``decodekit-ort-plain``: ``export_decoder(graph="plain")``, IO binding (the graph before issue 16);
* ``decodekit-ort-gqa``: ``export_decoder(graph="gqa")``: GroupQueryAttention on one shared KV buffer, fused norms;
  ``OnnxDecoder``'s default worker policy (an idle ONNX Runtime worker spins 5 us, then blocks);
* ``decodekit-ort-gqa-spin``: the same with ``OnnxDecoder(spin_wait=True)`` (the workers spin through each step, as
  onnxruntime-genai's do through each run; fast on idle cores, slow on shared ones);
* ``decodekit-ort-gqa-block``: the same with ``spin_wait=False`` (the workers block at once: the default before);
* ``decodekit-ort-gqa-int4``: ``export_decoder(graph="gqa", weights="int4")``: the GGUF's own Q4_1 blocks as
  MatMulNBits (SmolLM2 only: stories260K is a llama2.c float checkpoint), default worker policy; its greedy tokens
  are compared like a peer's (the first 16 must agree: the same weights, another summation order);
* ``ort-genai``: onnxruntime-genai's generator on a folder built by its model builder (fp32, CPU) from a Hugging
  Face folder of the same weights; ``ctranslate2``: ``ctranslate2.Generator`` (float32) on a folder converted with
  ``TransformersConverter`` from that Hugging Face folder;
* ``ort-genai-int4`` (SmolLM2 only): genai's model builder at ``int4`` from the same Hugging Face folder, its CPU
  defaults (its own symmetric 4-bit blocks of the dequantized weights, the classifier included, int8 activations:
  MatMulNBits ``accuracy_level`` 4). Not the GGUF's blocks and not float activations, so its tokens are recorded
  (``first_difference``) but not required to agree.

The peers are benchmark-only (``pip install -e '.[peers]'``); a peer that is not installed or cannot build its
model folder offline is skipped with the reason. Every peer's greedy tokens are compared with decodekit's (the plain
graph, itself validated against eager PyTorch): ``greedy_equal`` and ``first_difference`` in extra_info, and the
first 16 tokens of every row must agree (else the peer would not be running the same model).

Threads: one setting per model for every runtime, stated in extra_info (``threads``): 1 for stories260K (its steps
are too short to split), ``os.cpu_count()`` for SmolLM2; decodekit's worker policy as named above (genai's config
has no such entry: its workers spin through each run), CTranslate2 with ``intra_threads``.

Timing: pytest-benchmark times ``ROUNDS`` rounds of each implementation; in addition, before the first timed test
of a group, every implementation of the group runs ``ROUNDS`` rounds interleaved (round-robin, so that a busy
neighbour slows all of them alike), and each test records that median as ``interleaved_median_s`` and
``interleaved_tok_s``; decodekit's rows add ``ort_us_per_step`` and ``host_us_per_step`` (one extra generation
with ONNX Runtime's run timed apart: the loop's own per-token cost).

Environment: ``DECODEKIT_BENCH_PEERS_TOKENS`` (default 128), ``DECODEKIT_BENCH_PEERS_ROUNDS`` (default 5),
``DECODEKIT_BENCH_PEERS_SMALL=1`` (smoke test: stories260K only, 8 tokens, 1 round), ``DECODEKIT_BENCH_EXPORTS=DIR``
(keep the model folders between runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.conftest import run_bench
from decodekit.export import GRAPH_REVISION, export_decoder
from decodekit.runtime import OnnxDecoder

pytest.importorskip("transformers", reason="the peers' model folders are built from Hugging Face folders")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED / "stories260K" / "stories260K.bin"
SMOLLM = SHARED / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL = os.environ.get("DECODEKIT_BENCH_PEERS_SMALL") == "1"
NEW_TOKENS = 8 if SMALL else int(os.environ.get("DECODEKIT_BENCH_PEERS_TOKENS", 128))
ROUNDS = 1 if SMALL else int(os.environ.get("DECODEKIT_BENCH_PEERS_ROUNDS", 5))
PROMPT_LEN = 8
CHECKED_PREFIX = 16  # tokens every peer must agree on (the rest may flip on a near tie: recorded, not failed)
MODELS = ["stories260K"] if SMALL else ["stories260K", "SmolLM2-135M"]
THREADS = {"stories260K": 1, "SmolLM2-135M": os.cpu_count() or 2}
IMPLS = ["decodekit-ort-plain", "decodekit-ort-gqa", "decodekit-ort-gqa-spin", "decodekit-ort-gqa-block",
         "decodekit-ort-gqa-int4", "ort-genai", "ort-genai-int4", "ctranslate2"]
_SPIN_WAIT = {"-spin": True, "-block": False}  # impl suffix -> OnnxDecoder(spin_wait=...); else its default


# ---------------------------------------------------------------------------------------- model folders
def _stories_hf(decoder, out: Path) -> None:  # noqa: ANN001 - a decodekit Decoder
    """stories260K as a transformers Llama folder: q/k rows permuted from llama2.c's adjacent rotary pairs to the
    halves layout, and a word-level tokenizer naming its 512 ids (the peers' converters need one; the benchmark
    feeds ids, so only the id <-> name map matters)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    c = decoder.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)).eval()
    sd = decoder.state_dict()

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, c.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["tok_embeddings.weight"]}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj",
             "mlp.w3": "mlp.up_proj"}
    for i in range(c.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in names.items():
            new[q + theirs + ".weight"] = sd[p + ours + ".weight"]
        new[q + "self_attn.q_proj.weight"] = halves(sd[p + "attn.wq.weight"], c.n_heads)
        new[q + "self_attn.k_proj.weight"] = halves(sd[p + "attn.wk.weight"], c.n_kv_heads)
    hf.load_state_dict(new)
    hf.save_pretrained(out)
    vocab = {f"<t{i}>": i for i in range(c.vocab_size)}
    vocab["<unk>"], vocab["<s>"], vocab["</s>"] = 0, 1, 2  # llama2.c's special ids
    del vocab["<t0>"], vocab["<t1>"], vocab["<t2>"]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                               unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)


def _smollm_hf(out: Path) -> None:
    """The GGUF dequantized by transformers, re-built as a plain fp32 Llama (transformers refuses to save a model
    it loaded from GGUF) and saved with the GGUF's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32)
    fields = {k: v for k, v in gguf.config.to_dict().items() if "quantiz" not in k}
    hf = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    hf.load_state_dict(gguf.state_dict())
    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name).save_pretrained(out)


def _build_genai(hf_dir: Path, out: Path, threads: int, precision: str = "fp32") -> None:
    """genai's model builder (``precision``: fp32 or int4, CPU, its defaults otherwise) on the Hugging Face folder,
    offline; its session options then set to the thread count of the row (genai's config has no entry for ORT's
    spin-waiting: it keeps ORT's default)."""
    from onnxruntime_genai.models import builder

    args = (None, str(hf_dir), str(out), precision, "cpu", str(out.parent / ".genai-cache"))
    builder.create_model(*args, **builder.parse_extra_options(*args, []))
    cfg_file = out / "genai_config.json"
    cfg = json.loads(cfg_file.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    cfg_file.write_text(json.dumps(cfg, indent=2))


def bench_root(tmp_path_factory) -> Path:  # noqa: ANN001 - pytest's factory
    """Where model folders are built: ``$DECODEKIT_BENCH_EXPORTS`` (kept between runs) or a temporary folder."""
    if os.environ.get("DECODEKIT_BENCH_EXPORTS"):
        return Path(os.environ["DECODEKIT_BENCH_EXPORTS"])
    return tmp_path_factory.mktemp("peers-bench")


def decodekit_folder(root: Path, name: str, graph: str, weights: str = "fp32") -> Path:
    """``root/<name>-decodekit-<graph>[-int4]``, exported from the shared model unless a folder of this exporter's
    graph revision is already there."""
    src = STORIES if name == "stories260K" else SMOLLM
    if not src.is_file():
        pytest.fail(f"missing {src} (a shared model)")
    folder = root / f"{name}-decodekit-{graph}" if weights == "fp32" else root / f"{name}-decodekit-{graph}-{weights}"
    meta = folder / "decodekit.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("graph_revision") != GRAPH_REVISION:
        export_decoder(src, folder, graph=graph, weights=weights, progress=False, force=True)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict]:
    """model -> {"plain", "gqa", "gqa-int4", "ort-genai", "ort-genai-int4", "ctranslate2": folder or an Exception
    (why it is missing)}."""
    root = bench_root(tmp_path_factory)
    out: dict[str, dict] = {}
    for name in MODELS:
        entry: dict = {graph: decodekit_folder(root, name, graph) for graph in ("plain", "gqa")}
        entry["gqa-int4"] = decodekit_folder(root, name, "gqa", "int4") if name == "SmolLM2-135M" else ValueError(
            "stories260K is a llama2.c float checkpoint: no 4-bit blocks to keep")
        hf_dir = root / f"{name}-hf"
        if not (hf_dir / "config.json").is_file():
            if name == "stories260K":
                from decodekit.models import load_model

                _stories_hf(load_model(STORIES), hf_dir)
            else:
                _smollm_hf(hf_dir)
        entry["ort-genai-int4"] = ValueError("genai cannot run stories260K (head size 8): no int4 build")
        for peer in ("ort-genai", "ctranslate2") + (("ort-genai-int4",) if name == "SmolLM2-135M" else ()):
            folder = root / f"{name}-{peer}"
            try:
                __import__("ctranslate2" if peer == "ctranslate2" else "onnxruntime_genai")
                if not folder.is_dir() or not any(folder.iterdir()):
                    if peer.startswith("ort-genai"):
                        _build_genai(hf_dir, folder, THREADS[name], "int4" if peer.endswith("-int4") else "fp32")
                    else:
                        _ct2_convert(hf_dir, folder)
                entry[peer] = folder
            except Exception as e:  # noqa: BLE001 - not installed, or its builder cannot make this model offline
                entry[peer] = e
        out[name] = entry
    return out


def _ct2_convert(hf_dir: Path, out: Path) -> None:
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization="float32", force=True)


# ---------------------------------------------------------------------------------------- runners
def _prompts(name: str, batch: int) -> list[list[int]]:
    vocab = 512 if name == "stories260K" else 49152
    g = torch.Generator().manual_seed(11)
    bos = 1
    return [[bos] + torch.randint(3, min(vocab, 500), (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(batch)]


def _runner(impl: str, folder: Path, batch: int, threads: int) -> Callable[[list[list[int]]], list[list[int]]]:
    """``run(prompts) -> generated ids per row`` (NEW_TOKENS each, greedy, no stop)."""
    if impl.startswith("decodekit"):
        spin = next((v for suffix, v in _SPIN_WAIT.items() if impl.endswith(suffix)), None)
        # a cache of the generation's length (the export's 8192 slots at B = 8 would be 2.8 GB per decoder)
        dec = OnnxDecoder(folder, "cpu", max_batch=batch, max_seq_len=PROMPT_LEN + NEW_TOKENS, intra_op_threads=threads,
                          spin_wait=spin)

        def run(prompts):  # noqa: ANN001, ANN202
            return dec.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=[]).tokens

        run.decoder = dec
        return run
    if impl.startswith("ort-genai"):
        import onnxruntime_genai as og

        model = og.Model(str(folder))

        def run(prompts):  # noqa: ANN001, ANN202
            params = og.GeneratorParams(model)
            total = len(prompts[0]) + NEW_TOKENS
            params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(prompts))
            gen = og.Generator(model, params)
            gen.append_tokens(np.asarray(prompts, dtype=np.int32))
            while not gen.is_done():
                gen.generate_next_token()
            return [list(map(int, gen.get_sequence(i)[len(p):])) for i, p in enumerate(prompts)]

        return run
    import ctranslate2

    gen = ctranslate2.Generator(str(folder), device="cpu", compute_type="float32", intra_threads=threads,
                                inter_threads=1)
    vocab_file = folder / "vocabulary.json"
    names = json.loads(vocab_file.read_text()) if vocab_file.is_file() else (
        (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n"))

    def run(prompts):  # noqa: ANN001, ANN202
        res = gen.generate_batch([[names[t] for t in p] for p in prompts], max_length=NEW_TOKENS,
                                 min_length=NEW_TOKENS, sampling_topk=1, include_prompt_in_result=False,
                                 end_token=[])
        return [list(r.sequences_ids[0]) for r in res]

    return run


_GROUPS: dict[tuple[str, int], dict] = {}


def _group(folders: dict, name: str, batch: int) -> dict:
    """Runners, reference tokens and the interleaved medians of one (model, batch) group, made once."""
    key = (name, batch)
    if key in _GROUPS:
        return _GROUPS[key]
    threads = THREADS[name]
    prompts = _prompts(name, batch)
    runners, skipped = {}, {}
    for impl in IMPLS:
        folder = folders[name][impl.removeprefix("decodekit-ort-").removesuffix("-spin").removesuffix("-block")]
        if isinstance(folder, Exception):
            skipped[impl] = f"{impl} unavailable: {type(folder).__name__}: {str(folder).strip()[:200]}"
            continue
        try:
            runners[impl] = _runner(impl, folder, batch, threads)
            runners[impl](prompts)  # warm-up (and the failure of a peer that loads but cannot run this model)
        except Exception as e:  # noqa: BLE001
            runners.pop(impl, None)
            skipped[impl] = f"{impl} cannot run {name}: {type(e).__name__}: {str(e).strip()[:200]}"
    reference = runners["decodekit-ort-plain"](prompts)
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    for _ in range(ROUNDS):  # interleaved: each round runs every implementation once
        for impl, run in runners.items():
            t = time.perf_counter()
            run(prompts)
            times[impl].append(time.perf_counter() - t)
    _GROUPS[key] = {"prompts": prompts, "runners": runners, "skipped": skipped, "reference": reference,
                    "interleaved": {impl: statistics.median(ts) for impl, ts in times.items()}, "threads": threads}
    return _GROUPS[key]


def _host_split(run, prompts: list[list[int]]) -> dict[str, float]:  # noqa: ANN001 - a decodekit runner
    """One generation with ONNX Runtime's run timed apart: microseconds per decode step inside ORT and outside it
    (the host loop: bindings, the greedy argmax, stop checks), medians over the steps."""
    binder = run.decoder._binder
    real, ort_times = binder.run, []

    def timed() -> None:
        t = time.perf_counter()
        real()
        ort_times.append(time.perf_counter() - t)

    binder.run = timed
    try:
        res = run.decoder.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=[])
    finally:
        binder.run = real
    steps = max(res.decode_steps, 1)
    ort = sum(ort_times[1:])  # the decode steps (the first run is the prefill)
    return {"ort_us_per_step": round(1e6 * ort / steps, 1),
            "host_us_per_step": round(1e6 * (res.decode_time_s - ort) / steps, 1)}


def _first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    diffs = [next((j for j, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    found = [d for d in diffs if d is not None]
    return min(found) if found else None


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("impl", IMPLS)
def test_peers(benchmark, folders, model_name, batch, impl):
    g = _group(folders, model_name, batch)
    if impl in g["skipped"]:
        pytest.skip(g["skipped"][impl])
    run, prompts = g["runners"][impl], g["prompts"]
    tokens = run(prompts)
    assert all(len(t) == NEW_TOKENS for t in tokens), [len(t) for t in tokens]
    first = _first_difference(tokens, g["reference"])
    if impl.startswith("decodekit") and not impl.endswith("-int4"):
        assert first is None, f"{impl}: greedy tokens differ from the plain graph's at {first}"
    elif impl == "ort-genai-int4":
        pass  # other 4-bit blocks and int8 activations: recorded in first_difference, not required to agree
    else:
        assert first is None or first >= min(CHECKED_PREFIX, NEW_TOKENS), f"{impl} diverges at token {first}"
    median = g["interleaved"][impl]
    host = _host_split(run, prompts) if impl.startswith("decodekit") else {}
    run_bench(
        benchmark, lambda: run(prompts),
        group=f"peers {model_name} B={batch} greedy {NEW_TOKENS} new tokens (CPU, {g['threads']} thread(s))",
        impl=impl, baseline=impl == "decodekit-ort-plain", rounds=ROUNDS, host_only=True,
        weights="int4" if impl.endswith("-int4") else "fp32",
        tokens=batch * NEW_TOKENS, batch=batch, prompt_len=PROMPT_LEN, threads=g["threads"],
        greedy_equal=first is None, first_difference=first,
        interleaved_median_s=round(median, 6), interleaved_tok_s=round(batch * NEW_TOKENS / median, 1), **host,
    )
