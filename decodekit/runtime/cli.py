"""``decodekit generate`` and ``decodekit demo`` (registered into :mod:`decodekit.cli`).

The generation flags of ``decodekit generate`` are not written here: :func:`add_generation_flags` makes one
``--field-name`` flag per field of :class:`~decodekit.runtime.config.GenerationConfig` (type, default and help
from the field), and :func:`config_from_namespace` builds the config back from the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodekit.errors import UsageError
from decodekit.runtime.config import GenerationConfig, field_types


def flag_name(field_name: str) -> str:
    """``top_p`` -> ``--top-p``."""
    return "--" + field_name.replace("_", "-")


def _flag(name: str, annotation: Any, default: Any) -> tuple[str, dict[str, Any]]:
    """The flag and argparse keywords of a field of type ``annotation`` (``X | None`` is ``X`` with ``None`` as
    default; a bool that defaults to False is ``--name``, one that defaults to True is ``--no-name``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            annotation = rest[0]
    flag = flag_name(name)
    if annotation in (int, float, str):
        return flag, {"type": annotation}
    if annotation is bool:
        if default:
            return "--no-" + flag[2:], {"action": "store_false"}
        return flag, {"action": "store_true"}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list) and args and args[0] in (int, float, str) and (origin is list or args[1:] == (...,)):
        return flag, {"type": args[0], "nargs": "*"}
    raise TypeError(f"GenerationConfig.{name}: no command-line form for type {annotation!r}")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GenerationConfig` field, in declaration order, into its own argument group."""
    group = parser.add_argument_group("generation parameters (decodekit.runtime.GenerationConfig)")
    hints = field_types()
    for f in dataclasses.fields(GenerationConfig):
        flag, kwargs = _flag(f.name, hints[f.name], f.default)
        help_text = f.metadata.get("help", "")
        if kwargs.get("nargs") == "*":
            help_text += "; give the flag with no value for an empty list"
        group.add_argument(flag, dest=f.name, default=f.default, help=f"{help_text} (default: {f.default})", **kwargs)


def config_from_namespace(ns: argparse.Namespace) -> GenerationConfig:
    """The validated :class:`GenerationConfig` of parsed flags (``TypeError`` / ``UsageError`` naming the field)."""
    return GenerationConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(GenerationConfig)})


@dataclass
class GenerateArgs:
    """The typed arguments of ``decodekit generate``: what to run where, and one :class:`GenerationConfig`."""

    model: str
    prompt: str = ""
    backend: str = "onnx"
    device: str = "cpu"
    config: GenerationConfig = field(default_factory=GenerationConfig)
    chat: str | None = None  # a user message: the model's chat template is applied, the answer streamed
    system: str | None = None  # a system message for the chat


class TextStream:
    """Prints one row's text as tokens arrive (decoding the whole sequence, printing what is new)."""

    def __init__(self, tokenizer, prompt_ids: list[int], out=None, *, echo: bool = True) -> None:  # noqa: ANN001
        self.tok, self.ids, self.out = tokenizer, list(prompt_ids), out or sys.stdout
        # the prompt is echoed with the first token, so an error prints nothing; echo=False prints only new text
        self.printed = "" if echo else tokenizer.decode(self.ids)

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
    from decodekit.runtime import load_backend
    from decodekit.runtime.loop import encode_prompts, generate_on

    if not isinstance(args.config, GenerationConfig):  # it validated itself when built, before anything is loaded
        raise TypeError(f"config must be a GenerationConfig, got {type(args.config).__name__}")
    t0 = time.perf_counter()
    model = load_backend(args.model, args.backend, device=args.device, max_batch=args.config.num_beams,
                         progress=_progress)  # one prompt: num_beams rows
    load_s = time.perf_counter() - t0
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise UsageError(f"{args.model} has no tokenizer, so a text prompt cannot be encoded")
    if args.chat is not None:
        from decodekit.runtime import chat

        res = chat(model, args.chat, args.config, system=args.system,
                   stream=TextStream(tok, chat_prompt_ids(tok, args.chat, args.system), echo=False))
    else:
        prompt_ids = encode_prompts(model, [args.prompt])[0]
        stream = TextStream(tok, prompt_ids)
        res = generate_on(model, [prompt_ids], args.config, stream=stream)
    sys.stdout.write("\n")
    _progress(
        f"{args.backend} backend on {args.device} (loaded in {load_s:.2f} s): "
        f"{len(res.tokens[0])} tokens ({res.finish_reasons[0]}); time to first token "
        f"{res.time_to_first_token_s * 1e3:.1f} ms; decode {res.decode_tokens_per_s:.1f} tokens/s"
    )
    return 0


def chat_prompt_ids(tok, message: str, system: str | None) -> list[int]:  # noqa: ANN001 - a decodekit tokenizer
    """The prompt ids :func:`decodekit.runtime.chat` builds for one user message (for a stream that skips them)."""
    from decodekit.runtime import chat_prompt

    return chat_prompt(tok, message, system=system)[0]


def _cmd_generate(ns: argparse.Namespace) -> int:
    config = config_from_namespace(ns)
    if ns.chat is not None and ns.prompt:
        raise UsageError("give either --prompt or --chat, not both")
    if ns.system is not None and ns.chat is None:
        raise UsageError("--system goes with --chat")
    return run_generate(GenerateArgs(model=ns.model, prompt=ns.prompt, backend=ns.backend, device=ns.device,
                                     config=config, chat=ns.chat, system=ns.system))


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
    from decodekit.runtime.loop import generate_on

    bos = model.config.bos_id
    speeds = []
    config = GenerationConfig(max_new_tokens=n_tokens, temperature=0.0, stop_ids=())
    for _ in range(repeats + 1):  # the first run warms up
        res = generate_on(model, [[bos]], config)
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


DEMO_QUESTION = "What is the capital of France?"


def run_demo(args: DemoArgs) -> int:
    from decodekit.runtime import OnnxDecoder, load_backend, resolve_export_dir
    from decodekit.runtime.loop import encode_prompts, generate_on

    src = _checkpoint_in(Path(args.model))
    t0 = time.perf_counter()
    export_dir = resolve_export_dir(src, progress=_progress)
    _progress(f"export ready in {export_dir} ({time.perf_counter() - t0:.1f} s)")

    fused = OnnxDecoder(export_dir, "cpu", max_batch=1)
    if getattr(fused.tokenizer, "chat_template", None) is not None:  # a chat model (e.g. from a GGUF file)
        from decodekit.runtime import chat

        question = args.prompt or DEMO_QUESTION
        print("=== a chat (the model's chat template; ONNX Runtime + IO binding + decodekit.sample, greedy) ===")
        print(f"> {question}")
        stream = TextStream(fused.tokenizer, chat_prompt_ids(fused.tokenizer, question, None), echo=False)
        chat(fused, question, max_new_tokens=256, temperature=0.0, stream=stream)
    else:
        prompt_ids = encode_prompts(fused, [args.prompt])[0]
        print("=== a story (ONNX Runtime + IO binding + decodekit.sample, temperature 0.8, top-p 0.95, seed "
              f"{args.seed}) ===")
        stream = TextStream(fused.tokenizer, prompt_ids)
        story = GenerationConfig(max_new_tokens=256, temperature=0.8, top_p=0.95, seed=args.seed)
        generate_on(fused, [prompt_ids], story, stream=stream)
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
    g.add_argument("model", help="export directory, llama2.c .bin checkpoint, GGUF file, or Hugging Face directory")
    g.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. BOS alone)")
    g.add_argument("--chat", default=None, metavar="MESSAGE",
                   help="a user message: apply the model's chat template, stream the answer, stop at the end of the "
                        "turn (needs a tokenizer with a chat template, e.g. from a GGUF file)")
    g.add_argument("--system", default=None, metavar="MESSAGE", help="a system message for --chat")
    g.add_argument("--backend", choices=("onnx", "eager"), default="onnx")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    add_generation_flags(g)
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser(
        "demo",
        help="export a model, tell a story, and compare eager PyTorch with ONNX Runtime (with and without IO binding)",
    )
    d.add_argument("--model", default="../shared/models/stories260K",
                   help="checkpoint file (llama2.c .bin or GGUF) or its folder, or a Hugging Face directory")
    d.add_argument("--prompt", default="", help="story start; for a chat model the question (default: "
                   f"{DEMO_QUESTION!r})")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens per timed run")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    d.set_defaults(func=_cmd_demo)
