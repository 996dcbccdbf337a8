"""Run exported decoders on ONNX Runtime with IO binding, and generate text on any backend.

* :class:`OnnxDecoder` -- an export directory on ONNX Runtime; KV cache and logits in preallocated torch
  buffers bound through IO binding; logits sampled in place by :func:`decodekit.sample`.
* :class:`EagerDecoder` -- decodekit's PyTorch :class:`~decodekit.models.Decoder` behind the same interface.
* :func:`generate` -- load a model (export directory, llama2.c checkpoint or Hugging Face directory) on the
  chosen backend and generate; a checkpoint given to the ONNX backend is exported on the fly into a cache
  directory.

This package never needs a GPU: everything runs on ONNX Runtime's CPU provider and torch CPU tensors when
``device="cpu"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import UsageError
from decodekit.runtime.config import GenerationConfig, check_bool, check_int, generation_params, resolve_config
from decodekit.runtime.loop import (
    MAX_BATCH,
    GenerationResult,
    Prompts,
    StepModel,
    generate_on,
    run_generation,
    split_prompts,
)
from decodekit.runtime.onnx import METADATA_FILE, OnnxDecoder, read_metadata

__all__ = [
    "EagerDecoder",
    "chat",
    "chat_prompt",
    "GenerationConfig",
    "GenerationResult",
    "OnnxDecoder",
    "StepModel",
    "generate",
    "generate_on",
    "load_backend",
    "read_metadata",
    "resolve_export_dir",
    "run_generation",
]


def __getattr__(name: str) -> Any:
    if name == "EagerDecoder":  # lazy: importing the runtime must not import the model code
        from decodekit.runtime.eager import EagerDecoder

        return EagerDecoder
    raise AttributeError(f"module 'decodekit.runtime' has no attribute {name!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise UsageError(f"{name} must be one of {choices}, got {value!r}")


def _is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def default_cache_dir() -> Path:
    """Where checkpoints given to the ONNX backend are exported (``$DECODEKIT_CACHE`` or ``~/.cache/decodekit``)."""
    return Path(os.environ.get("DECODEKIT_CACHE") or Path.home() / ".cache" / "decodekit") / "exports"


def _cache_key(src: Path, dtype: str, graph: str = "plain") -> str:
    """16 hex digits naming the cached export of ``src`` (see :func:`resolve_export_dir`)."""
    import hashlib

    from decodekit.export import GRAPH_REVISION

    key = hashlib.sha256()
    key.update(str(src.resolve()).encode())
    key.update(f"{dtype}:graph-revision-{GRAPH_REVISION}".encode())
    if graph != "plain":  # the plain graph keeps the keys it always had
        import onnxruntime

        # the fused graph's form depends on what the installed ONNX Runtime's kernels accept (probed at export)
        key.update(f":graph-{graph}:onnxruntime-{onnxruntime.__version__}".encode())
    for p in [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file()):
        st = p.stat()
        key.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


def _check_source(src: Path) -> None:
    """The checkpoint (or Hugging Face directory) to export exists, is readable, and its header (its
    ``config.json``) describes a model: ``UsageError`` naming it otherwise. Cheap: the weights are not read."""
    from decodekit.models import model_format, read_hf_config_checked
    from decodekit.models.llama2c import read_llama2c_config

    fmt = model_format(src)  # UsageError for a pipe, a device, or a directory that is neither export nor HF model
    target = src / "config.json" if fmt == "hf" else src
    try:
        with open(target, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"cannot read model {target}: {e.strerror or e}") from None
    if fmt == "hf":
        read_hf_config_checked(src)
    elif fmt == "gguf":
        from decodekit.models.gguf import read_gguf_config

        read_gguf_config(src)  # architecture and tensor types supported: the metadata only
    else:
        read_llama2c_config(src)  # the header is plausible and the file has the size it implies


def resolve_export_dir(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
    graph: str = "plain",
) -> Path:
    """Return an export directory for ``source``, exporting a checkpoint into the cache when needed.

    The cache key covers the source's absolute path, size and modification time, the dtype and the
    exporter's graph revision, so an edited checkpoint, or a decodekit that writes a different graph, is
    exported again. A cached export that is incomplete is never used: the export writes a temporary
    directory and renames it into place. ``graph`` is :func:`decodekit.export.export_decoder`'s (``"gqa"``: the
    fused-op graph with the in-place KV cache, or the plain graph when the model cannot use it); each graph has its
    own cache entry. An export directory given as ``source`` is used as it is, whatever its graph.
    """
    src = Path(source)
    if _is_export_dir(src):
        return src
    if not src.exists():
        raise UsageError(f"model {src} does not exist")
    _check_source(src)  # before anything is printed or created: a bad checkpoint is one error line
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_choice("graph", graph, ("plain", "gqa"))
    out = out / f"{src.stem}-{_cache_key(src, dtype, graph)}"
    if _is_export_dir(out):
        return out
    from decodekit.export import export_decoder

    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"exporting {src} to {out} (once; cached)")
    export_decoder(src, out, dtype=dtype, validate=True, force=True, progress=progress is not None, graph=graph)
    return out


def load_backend(
    source: str | os.PathLike,
    backend: str = "onnx",
    *,
    device: str = "cpu",
    max_batch: int = 1,
    max_seq_len: int | None = None,
    io_binding: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    graph: str = "auto",
) -> StepModel:
    """Open ``source`` on ``backend`` ("onnx" or "eager") and return a step model with a ``tokenizer``.

    ``graph`` (ONNX backend, a checkpoint exported into the cache): ``"auto"`` takes the fused-op graph with the
    in-place KV cache (``"gqa"``) when ``io_binding`` (it needs the binding), else the plain one.

    The arguments are checked before anything is loaded (``TypeError`` / ``UsageError`` naming the argument).
    """
    _check_choice("backend", backend, ("onnx", "eager"))
    _check_choice("device", device, ("cpu", "cuda"))
    check_int("max_batch", max_batch, lo=1, hi=MAX_BATCH)
    if max_seq_len is not None:
        check_int("max_seq_len", max_seq_len, lo=2)
    check_bool("io_binding", io_binding)
    _check_choice("graph", graph, ("auto", "plain", "gqa"))
    if graph == "auto":
        graph = "gqa" if io_binding else "plain"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, got {type(source).__name__}")
    src = Path(source)
    if backend == "onnx":
        export_dir = resolve_export_dir(src, cache_dir=cache_dir, progress=progress, graph=graph)
        return OnnxDecoder(export_dir, device, max_batch=max_batch, max_seq_len=max_seq_len, io_binding=io_binding)

    from decodekit.models import find_tokenizer_file, load_model, load_tokenizer
    from decodekit.runtime.eager import EagerDecoder

    if _is_export_dir(src):
        meta = read_metadata(src)
        origin = (meta.get("source") or {}).get("path")
        if not origin or not Path(origin).exists():
            raise UsageError(f"{src} is an ONNX export; the eager backend needs the original checkpoint/HF directory")
        src = Path(origin)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' but torch sees no CUDA device")
    model = load_model(src, device=device, max_seq_len=max_seq_len)
    dec = EagerDecoder(model, max_batch=max_batch, max_seq_len=max_seq_len)
    from decodekit.models.gguf import is_gguf

    if is_gguf(src):
        dec.tokenizer = load_tokenizer(src)  # a GGUF file carries its tokenizer
        return dec
    tok_file = find_tokenizer_file(src if src.is_dir() else src.parent, model.config.vocab_size)
    dec.tokenizer = load_tokenizer(tok_file) if tok_file is not None else None
    return dec


@generation_params
def generate(
    source: str | os.PathLike | StepModel,
    prompts: Prompts,
    config: GenerationConfig | None = None,
    *,
    stream: Callable[[int, int], None] | None = None,
    backend: str = "onnx",
    device: str = "cpu",
    max_seq_len: int | None = None,
    **params: Any,
) -> GenerationResult:
    """Generate text or tokens from a batch of prompts.

    Parameters
    ----------
    source : path-like or step model
        An export directory, a llama2.c checkpoint, a Hugging Face directory, or an already opened
        :class:`OnnxDecoder` / :class:`EagerDecoder`.
    prompts : str, list of str, list of token ids, list of token-id lists, or int tensor [B, S]
        Text (needs the model's tokenizer; an empty string is BOS alone) or token ids, not mixed. Rows of
        different lengths are left-padded into one batch.
    config : GenerationConfig, optional
        Parameters to start from; the keyword arguments below override its fields.
    stream : callable(row, token_id), optional
        Called for each generated token as soon as it is sampled.
    backend : {"onnx", "eager"}
        ONNX Runtime with IO binding, or decodekit's eager PyTorch model. Same sampler, same seeds: the
        two give the same tokens. Ignored when ``source`` is an opened model.
    device : {"cpu", "cuda"}
    max_seq_len : int, optional
        Longest prompt + generation (default: the model's).
    {generation_params}

    Returns
    -------
    GenerationResult
        Token ids per row, decoded text, finish reasons, time to first token and decode tokens/s.

    Raises
    ------
    TypeError
        An argument of the wrong type (a float token id, ``top_p=None``, text mixed with token ids, ...).
    UsageError
        A ``ValueError``: a bad value (``top_p=0``, an empty batch, a missing model, ...). Both name the argument.

    Examples
    --------
    >>> res = generate("../shared/models/stories260K/stories260K.bin", "Once upon a time",
    ...                max_new_tokens=32, temperature=0)  # doctest: +SKIP
    >>> res.text[0]  # doctest: +SKIP
    """
    config = resolve_config(config, **params)  # bad parameters fail before a model is loaded
    if isinstance(source, (str, os.PathLike)):
        texts, rows = split_prompts(prompts)  # bad prompts too
        n_rows = len(texts if texts is not None else rows)
        model = load_backend(source, backend, device=device, max_batch=n_rows * config.num_beams,
                             max_seq_len=max_seq_len)
    else:
        model = source
    return generate_on(model, prompts, config, stream=stream)


#: end-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3, ...): a chat also stops on these
#: when its template writes them and the vocabulary has them, even if the model's EOS is another token
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def chat_prompt(tokenizer: Any, messages: str | list[dict[str, str]], *, system: str | None = None
                ) -> tuple[list[int], list[int]]:
    """``(prompt token ids, end-of-turn ids)`` of a conversation under ``tokenizer``'s chat template.

    ``messages`` is one user message (a str) or a list of ``{"role": ..., "content": ...}``; ``system`` prepends a
    system message. The template is rendered with ``add_generation_prompt=True`` and encoded without adding BOS
    (the template writes its special tokens itself, as transformers' ``apply_chat_template`` encodes). The
    end-of-turn ids: the tokenizer's EOS, plus the known end-of-turn tokens (:data:`END_OF_TURN_TOKENS`) that
    the template writes.
    """
    from decodekit.models.tokenizer import check_messages

    if tokenizer is None:
        raise UsageError("chat needs the model's tokenizer and this model has none")
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("this model's tokenizer has no chat template: use a text prompt instead of a chat")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = check_messages(messages)
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a str, got {type(system).__name__}")
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, bos=False)
    stops = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    for name in END_OF_TURN_TOKENS:
        tid = tokenizer.token_id(name) if name in tokenizer.chat_template else None
        if tid is not None and tid not in stops:
            stops.append(tid)
    return ids, stops


@generation_params
def chat(
    source: str | os.PathLike | StepModel,
    messages: str | list[dict[str, str]],
    config: GenerationConfig | None = None,
    *,
    system: str | None = None,
    stream: Callable[[int, int], None] | None = None,
    backend: str = "onnx",
    device: str = "cpu",
    max_seq_len: int | None = None,
    **params: Any,
) -> GenerationResult:
    """Answer a chat: apply the model's chat template, generate until the end of the turn.

    Parameters
    ----------
    source : path-like or step model
        As for :func:`generate` (an export directory, a GGUF file, a Hugging Face directory, or an opened
        decoder); the tokenizer must have a chat template (GGUF files and ``tokenizer_config.json`` carry one).
    messages : str or list of dict
        One user message, or the conversation so far as ``[{"role": "user", "content": "..."}, ...]``.
    config : GenerationConfig, optional
        Parameters to start from; the keyword arguments below override its fields. When ``stop_ids`` is left
        None, the answer stops at the end-of-turn token(s) (see :func:`chat_prompt`).
    system : str, optional
        A system message put first (the template may add its own default when there is none).
    stream : callable(row, token_id), optional
        Called for each token of the answer as soon as it is sampled (decode with ``model.tokenizer``).
    backend, device, max_seq_len
        As for :func:`generate`.
    {generation_params}

    Returns
    -------
    GenerationResult
        One row: ``text[0]`` is the answer (special tokens removed), ``tokens[0]`` its ids (the end-of-turn token
        included when it ended the turn), ``finish_reasons[0]`` ``"stop"`` or ``"length"``.

    Raises
    ------
    TypeError
        ``messages`` (or another argument) of the wrong type.
    UsageError
        No tokenizer or no chat template, an empty conversation, bad generation parameters.

    Examples
    --------
    >>> res = chat("../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    ...            "What is the capital of France?", temperature=0, max_new_tokens=48)  # doctest: +SKIP
    >>> res.text[0]  # doctest: +SKIP
    'The capital of France is Paris.'
    """
    import dataclasses

    config = resolve_config(config, **params)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    from decodekit.models.tokenizer import check_messages

    check_messages(messages)  # before a model is loaded
    if isinstance(source, (str, os.PathLike)):
        model = load_backend(source, backend, device=device, max_batch=1, max_seq_len=max_seq_len)
    else:
        model = source
    ids, stops = chat_prompt(getattr(model, "tokenizer", None), messages, system=system)
    if config.stop_ids is None:
        config = dataclasses.replace(config, stop_ids=tuple(dict.fromkeys([*model.default_stop_ids, *stops])))
    return generate_on(model, [ids], config, stream=stream)
