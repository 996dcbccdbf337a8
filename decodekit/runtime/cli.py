"""``decodekit generate`` and ``decodekit demo`` (registered into :mod:`decodekit.cli`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from decodekit.errors import UsageError


@dataclass
class GenerateArgs:
    """The typed arguments of ``decodekit generate`` (mirrors :func:`decodekit.runtime.loop`)."""

    model: str
    prompt: str = ""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    backend: str = "onnx"
    device: str = "cpu"


class TextStream:
    """Prints one row's text as tokens arrive (decoding the whole sequence, printing what is new)."""

    def __init__(self, tokenizer, prompt_ids: list[int], out=None) -> None:  # noqa: ANN001
        self.tok, self.ids, self.out = tokenizer, list(prompt_ids), out or sys.stdout
        self.printed = ""  # the prompt is echoed with the first token, so an error prints nothing

    def __call__(self, row: int, token_id: int) -> None:
        if row != 0:
            return
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete: wait for its next byte
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text


def _progress(msg: str) -> None:
    print(f"[decodekit] {msg}", file=sys.stderr, flush=True)


def run_generate(args: GenerateArgs) -> int:
    from decodekit.runtime import GenerationConfig, _encode_prompts, _generate_on, load_backend

    params = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    GenerationConfig(**params).validate()  # bad flags fail before anything is loaded or printed
    t0 = time.perf_counter()
    model = load_backend(args.model, args.backend, device=args.device, max_batch=1, progress=_progress)
    load_s = time.perf_counter() - t0
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer, so a text prompt cannot be encoded")
    prompt_ids = _encode_prompts(model, [args.prompt])[0]
    stream = TextStream(tok, prompt_ids)
    res = _generate_on(model, [prompt_ids], stream=stream, **params)
    sys.stdout.write("\n")
    _progress(
        f"{args.backend} backend on {args.device} (loaded in {load_s:.2f} s): "
        f"{len(res.tokens[0])} tokens ({res.finish_reasons[0]}); time to first token "
        f"{res.time_to_first_token_s * 1e3:.1f} ms; decode {res.decode_tokens_per_s:.1f} tokens/s"
    )
    return 0


def _cmd_generate(ns: argparse.Namespace) -> int:
    return run_generate(
        GenerateArgs(
            model=ns.model,
            prompt=ns.prompt,
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_k=ns.top_k,
            top_p=ns.top_p,
            min_p=ns.min_p,
            repetition_penalty=ns.repetition_penalty,
            seed=ns.seed,
            backend=ns.backend,
            device=ns.device,
        )
    )


@dataclass
class DemoArgs:
    """The typed arguments of ``decodekit demo``."""

    model: str
    prompt: str = ""
    max_new_tokens: int = 128
    repeats: int = 3
    seed: int = 42


def _decode_speed(model, n_tokens: int, repeats: int) -> float:  # noqa: ANN001 - a StepModel
    """Median decode tokens/s of greedy batch-1 generation of exactly ``n_tokens`` from BOS."""
    from decodekit.runtime import _generate_on

    bos = model.config.bos_id
    speeds = []
    for _ in range(repeats + 1):  # the first run warms up
        res = _generate_on(model, [[bos]], max_new_tokens=n_tokens, temperature=0.0, stop_ids=[])
        speeds.append(res.decode_tokens_per_s)
    return statistics.median(speeds[1:])


def _checkpoint_in(path: Path) -> Path:
    """A folder holding one llama2.c checkpoint (beside its ``tok*.bin``) stands for that checkpoint."""
    if path.is_dir() and not (path / "config.json").is_file():
        ckpts = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
        if len(ckpts) != 1:
            raise UsageError(f"{path} holds {len(ckpts)} llama2.c checkpoints (*.bin); name the file")
        return ckpts[0]
    return path


def run_demo(args: DemoArgs) -> int:
    from decodekit.runtime import OnnxDecoder, _encode_prompts, _generate_on, load_backend, resolve_export_dir

    src = _checkpoint_in(Path(args.model))
    t0 = time.perf_counter()
    export_dir = resolve_export_dir(src, progress=_progress)
    _progress(f"export ready in {export_dir} ({time.perf_counter() - t0:.1f} s)")

    fused = OnnxDecoder(export_dir, "cpu", max_batch=1)
    prompt_ids = _encode_prompts(fused, [args.prompt])[0]
    print("=== a story (ONNX Runtime + IO binding + decodekit.sample, temperature 0.8, top-p 0.95, seed "
          f"{args.seed}) ===")
    stream = TextStream(fused.tokenizer, prompt_ids)
    _generate_on(fused, [prompt_ids], max_new_tokens=256, temperature=0.8, top_p=0.95, seed=args.seed, stream=stream)
    print("\n")

    plain = OnnxDecoder(export_dir, "cpu", max_batch=1, io_binding=False)
    eager = load_backend(src, "eager", max_batch=1)
    n, reps = args.max_new_tokens, args.repeats
    _progress(f"timing greedy decoding of {n} tokens, batch 1, median of {reps} runs per backend")
    rows = [
        ("eager PyTorch (decodekit model, KV cache)", _decode_speed(eager, n, reps)),
        ("ONNX Runtime, plain run() + numpy", _decode_speed(plain, n, reps)),
        ("ONNX Runtime, IO binding + fused sampler", _decode_speed(fused, n, reps)),
    ]
    base = rows[0][1]
    print(f"{'backend':<44} {'tokens/s':>10} {'vs eager':>9}")
    for name, tps in rows:
        print(f"{name:<44} {tps:>10.1f} {tps / base:>8.2f}x")
    print(f"(IO binding vs plain run(): {rows[2][1] / rows[1][1]:.2f}x)")
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    return run_demo(DemoArgs(model=ns.model, prompt=ns.prompt, max_new_tokens=ns.max_new_tokens, repeats=ns.repeats))


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="stream text from an export directory, a llama2.c checkpoint or a Hugging Face directory",
        description="Generate text. A checkpoint or HF directory is exported on the fly into a cache directory "
        "for the ONNX backend. An empty prompt starts from BOS alone.",
    )
    g.add_argument("model", help="export directory, llama2.c .bin checkpoint, or Hugging Face model directory")
    g.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. BOS alone)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--backend", choices=("onnx", "eager"), default="onnx")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser(
        "demo",
        help="export a model, tell a story, and compare eager PyTorch with ONNX Runtime (with and without IO binding)",
    )
    d.add_argument("--model", default="../shared/models/stories260K", help="checkpoint file or its folder")
    d.add_argument("--prompt", default="")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens per timed run")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    d.set_defaults(func=_cmd_demo)
