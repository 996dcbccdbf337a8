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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import UsageError
from decodekit.runtime.loop import GenerationConfig, GenerationResult, StepModel, run_generation
from decodekit.runtime.onnx import METADATA_FILE, OnnxDecoder, read_metadata

__all__ = [
    "EagerDecoder",
    "GenerationConfig",
    "GenerationResult",
    "OnnxDecoder",
    "StepModel",
    "generate",
    "load_backend",
    "read_metadata",
    "resolve_export_dir",
]


def __getattr__(name: str) -> Any:
    if name == "EagerDecoder":  # lazy: importing the runtime must not import the model code
        from decodekit.runtime.eager import EagerDecoder

        return EagerDecoder
    raise AttributeError(f"module 'decodekit.runtime' has no attribute {name!r}")


def _is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def default_cache_dir() -> Path:
    """Where checkpoints given to the ONNX backend are exported (``$DECODEKIT_CACHE`` or ``~/.cache/decodekit``)."""
    return Path(os.environ.get("DECODEKIT_CACHE") or Path.home() / ".cache" / "decodekit") / "exports"


def _cache_key(src: Path, dtype: str) -> str:
    """16 hex digits naming the cached export of ``src`` (see :func:`resolve_export_dir`)."""
    import hashlib

    from decodekit.export import GRAPH_REVISION

    key = hashlib.sha256()
    key.update(str(src.resolve()).encode())
    key.update(f"{dtype}:graph-revision-{GRAPH_REVISION}".encode())
    for p in [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file()):
        st = p.stat()
        key.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


def resolve_export_dir(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return an export directory for ``source``, exporting a checkpoint into the cache when needed.

    The cache key covers the source's absolute path, size and modification time, the dtype and the
    exporter's graph revision, so an edited checkpoint, or a decodekit that writes a different graph, is
    exported again. A cached export that is incomplete is never used: the export writes a temporary
    directory and renames it into place.
    """
    src = Path(source)
    if _is_export_dir(src):
        return src
    if not src.exists():
        raise UsageError(f"model {src} does not exist")
    from decodekit.models import model_format

    model_format(src)  # UsageError for a directory that is neither an export nor an HF model
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / f"{src.stem}-{_cache_key(src, dtype)}"
    if _is_export_dir(out):
        return out
    from decodekit.export import export_decoder

    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"exporting {src} to {out} (once; cached)")
    export_decoder(src, out, dtype=dtype, validate=True, force=True, progress=progress is not None)
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
) -> StepModel:
    """Open ``source`` on ``backend`` ("onnx" or "eager") and return a step model with a ``tokenizer``."""
    if backend not in ("onnx", "eager"):
        raise UsageError(f"backend must be 'onnx' or 'eager', got {backend!r}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
    src = Path(source)
    if backend == "onnx":
        export_dir = resolve_export_dir(src, cache_dir=cache_dir, progress=progress)
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
    tok_file = find_tokenizer_file(src if src.is_dir() else src.parent, model.config.vocab_size)
    dec.tokenizer = load_tokenizer(tok_file) if tok_file is not None else None
    return dec


def _encode_prompts(model: StepModel, prompts: Any) -> list[list[int]] | torch.Tensor:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise UsageError("text prompts need a tokenizer and this model has none: pass token ids instead of text")
        # an empty prompt is BOS alone, as llama2.c's run.c starts without a prompt
        return [tok.encode(p, bos=True) for p in prompts]
    return prompts


def _generate_on(
    model: StepModel,
    prompts: Any,
    *,
    stream: Callable[[int, int], None] | None = None,
    **params: Any,
) -> GenerationResult:
    ids = _encode_prompts(model, prompts)
    config = GenerationConfig(**params)
    return run_generation(
        model,
        ids,
        config,
        default_stop_ids=model.default_stop_ids,
        tokenizer=getattr(model, "tokenizer", None),
        stream=stream,
    )


def generate(
    source: str | os.PathLike | StepModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
    stream: Callable[[int, int], None] | None = None,
    backend: str = "onnx",
    device: str = "cpu",
    max_seq_len: int | None = None,
) -> GenerationResult:
    """Generate text or tokens from a batch of prompts.

    Parameters
    ----------
    source : path-like or step model
        An export directory, a llama2.c checkpoint, a Hugging Face directory, or an already opened
        :class:`OnnxDecoder` / :class:`EagerDecoder`.
    prompts : str, list of str, list of lists of int, or LongTensor [B, S]
        Text (needs the model's tokenizer; an empty string is BOS alone) or token ids. Rows of different
        lengths are left-padded into one batch.
    max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_ids
        See :class:`GenerationConfig`; ``temperature=0`` is greedy.
    stream : callable(row, token_id), optional
        Called for each generated token as soon as it is sampled.
    backend : {"onnx", "eager"}
        ONNX Runtime with IO binding, or decodekit's eager PyTorch model. Same sampler, same seeds: the
        two give the same tokens.
    device : {"cpu", "cuda"}

    Returns
    -------
    GenerationResult
        Token ids per row, decoded text, finish reasons, time to first token and decode tokens/s.

    Examples
    --------
    >>> res = generate("../shared/models/stories260K/stories260K.bin", "Once upon a time",
    ...                max_new_tokens=32, temperature=0)  # doctest: +SKIP
    >>> res.text[0]  # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)):
        n_rows = 1 if isinstance(prompts, str) else len(prompts)
        model = load_backend(source, backend, device=device, max_batch=max(1, n_rows), max_seq_len=max_seq_len)
    else:
        model = source
    return _generate_on(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_ids=stop_ids,
        stream=stream,
    )
