"""Export a decoder to ONNX with an explicit KV cache: ``decodekit export`` and :func:`export_decoder`.

The graph
---------
Exported with ``torch.onnx.export(..., dynamo=True)``; batch ``B``, new tokens ``S`` and cached tokens ``P``
are dynamic, and ``P = 0`` (the first step, empty cache) works. Names (``L`` layers, ``H`` = KV heads,
``D`` = head size, ``V`` = vocabulary)::

    inputs   input_ids                  int64  [B, S]
             position_ids               int64  [B, S]      position of each new token (see below)
             attention_mask             int64  [B, P+S]    1 = real token, 0 = left padding
             past_key_values.{i}.key    kv     [B, H, P, D]   i = 0 .. L-1 (keys already rotated)
             past_key_values.{i}.value  kv     [B, H, P, D]
    outputs  logits                     kv     [B, V]      LAST position only ([B, S, V] with all_logits)
             present.{i}.key            kv     [B, H, P+S, D]  = concat(past, new) along axis 2
             present.{i}.value          kv     [B, H, P+S, D]

``kv`` is the export dtype (float32 or float16). Batching prompts of different lengths: left-pad them,
set ``attention_mask`` to 0 on the pads and ``position_ids = max(cumsum(attention_mask) - 1, 0)`` (for the
new tokens: the last ``S`` columns); each decode step appends a 1 to the mask, feeds the presents back as
the past and the last position + 1. Queries are the last ``S`` of the ``P+S`` keys (causal), so a runtime
never needs a 4-D mask.

``OUT_DIR/decodekit.json`` (``format_version`` 1)
-------------------------------------------------
::

    {
      "format_version": 1,                      # bumped on any incompatible change
      "graph_revision": 2,                      # GRAPH_REVISION: same interface, a different (newer) graph
      "producer": "decodekit 0.1.0",
      "model_file": "model.onnx",               # relative to OUT_DIR
      "external_data": null | "model.onnx.data",  # weights file beside model.onnx (large models)
      "opset": 18,
      "architecture": "llama" | "gpt2",
      "source": {"format": "llama2c" | "hf" | "module", "path": str | null},
      "config": {...},                          # DecoderConfig.to_dict(): the full architecture
      "dtype": "float32" | "float16",           # weights, logits and KV cache
      "inputs":  ["input_ids", "position_ids", "attention_mask", "past_key_values.0.key", ...],
      "outputs": ["logits", "present.0.key", "present.0.value", ...],
      "io": {name: {"dtype": "int64" | "float32" | "float16", "shape": [int | str, ...]}},
                                                # symbolic dims: "batch", "seq", "past_seq", "total_seq"
      "logits": {"name": "logits", "all_positions": false, "vocab_size": V},
      "kv_cache": {"num_layers": L, "num_kv_heads": H, "head_dim": D, "dtype": "float32",
                   "shape": ["batch", H, "past_seq", D],
                   "past_names": [["past_key_values.0.key", "past_key_values.0.value"], ...],
                   "present_names": [["present.0.key", "present.0.value"], ...]},
      "position_ids": "cumsum(attention_mask) - 1, clipped at 0",
      "max_seq_len": int,                       # P + S must stay <= this
      "vocab_size": V,
      "bos_id": int, "eos_id": int, "stop_ids": [int, ...],   # generation ends on any stop id
      "tokenizer": null | {"file": "tok512.bin", "type": "llama2c" | "hf", "bos_id": int, "eos_id": int},
      "validation": null | {"max_abs_diff": {name: float}, "atol": float, "rtol": float, "provider": str,
                            "steps": int, "prompt_lengths": [int, int]},
      "timings_s": {step: seconds}
    }

Output is written into a temporary directory beside ``OUT_DIR`` and renamed into place only when the export
(and validation) succeeded, so a failure never leaves a half-written ``OUT_DIR``.

Example
-------
>>> from decodekit.export import export_decoder
>>> result = export_decoder("../shared/models/stories260K/stories260K.bin", "out/stories")  # doctest: +SKIP
>>> result.validation.max_abs_diff["logits"] < 1e-4  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodekit import __version__
from decodekit.errors import UsageError
from decodekit.export._progress import Progress
from decodekit.models import Decoder, find_tokenizer_file, load_model, model_format
from decodekit.models.tokenizer import HFTokenizer, Llama2cTokenizer

__all__ = ["FORMAT_VERSION", "GRAPH_REVISION", "ExportResult", "export_decoder", "io_names"]

FORMAT_VERSION = 1
#: Revision of the graph the exporter writes for a given checkpoint. Bumped when the graph changes with the same
#: interface (2: RMSNorm as ``x / sqrt(.)`` and the rotary swap as one MatMul, fewer nodes per step), so that the
#: runtime's export cache does not keep serving graphs an older decodekit wrote.
GRAPH_REVISION = 2
METADATA_FILE = "decodekit.json"
MODEL_FILE = "model.onnx"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2}
DEFAULT_RTOL = {"fp32": 0.0, "fp16": 4e-3}  # see decodekit.export.validate for why fp16 needs one
MIN_OPSET = 18  # the dynamo exporter's floor
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf caps a file at 2 GiB)


@dataclass
class ExportResult:
    """What :func:`export_decoder` wrote."""

    out_dir: Path
    onnx_path: Path
    metadata: dict[str, Any]
    validation: Any = None  # decodekit.export.validate.ValidationReport or None
    timings: dict[str, float] = field(default_factory=dict)


def io_names(n_layers: int) -> tuple[list[str], list[str], list[list[str]], list[list[str]]]:
    """``(inputs, outputs, past_names, present_names)`` of the exported graph."""
    past = [[f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(n_layers)]
    present = [[f"present.{i}.key", f"present.{i}.value"] for i in range(n_layers)]
    inputs = ["input_ids", "position_ids", "attention_mask"] + [n for p in past for n in p]
    outputs = ["logits"] + [n for p in present for n in p]
    return inputs, outputs, past, present


class _Graph(nn.Module):
    """The exported signature: ``past_key_values`` as a list of (key, value) pairs, outputs flattened."""

    def __init__(self, model: Decoder, all_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.all_logits = all_logits

    def forward(self, input_ids, position_ids, attention_mask, past_key_values):  # noqa: ANN001 - see Decoder
        logits, presents = self.model(input_ids, position_ids, attention_mask, past_key_values, self.all_logits)
        return (logits, *[t for kv in presents for t in kv])


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's known-harmless chatter (torchvision not installed, pytree deprecations)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*training mode.*")
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(model: Decoder, path: Path, *, opset: int | None, all_logits: bool) -> Any:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch / seq / past; returns the ONNXProgram."""
    cfg = model.config
    dtype = model.tok_embeddings.weight.dtype
    device = model.tok_embeddings.weight.device
    inputs, outputs, _, _ = io_names(cfg.n_layers)
    # distinct example sizes > 1 so that no dynamic dim is specialised or unified with another
    b, s, p = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=device)
    pos = torch.arange(p, p + s, device=device).expand(b, s).contiguous()
    mask = torch.ones(b, p + s, dtype=torch.long, device=device)
    kv_shape = (b, cfg.n_kv_heads, p, cfg.head_dim)
    past = [(torch.zeros(kv_shape, dtype=dtype, device=device), torch.zeros(kv_shape, dtype=dtype, device=device))
            for _ in range(cfg.n_layers)]
    auto = torch.export.Dim.AUTO
    dynamic_shapes = {
        "input_ids": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "past_key_values": [({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in range(cfg.n_layers)],
    }
    with _quiet_exporter():
        program = torch.onnx.export(
            _Graph(model, all_logits).eval(), (ids, pos, mask, past), dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=inputs, output_names=outputs, opset_version=opset, verbose=False, optimize=True,
        )
    _name_dims(program, cfg.n_layers, all_logits)
    n_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
    program.save(str(path), external_data=n_bytes > EXTERNAL_DATA_BYTES)
    return program


def _name_dims(program: Any, n_layers: int, all_logits: bool) -> None:
    """Name the symbolic dims of the graph inputs/outputs by role; fail loudly if one was specialised.

    The exporter names them ``s0``, ``s17 + s3``, ... (and may give each layer's cache its own symbol);
    the runtime and ``decodekit.json`` speak of ``batch``, ``seq``, ``past_seq`` and ``total_seq``.
    """
    import onnx_ir as ir

    graph = program.model.graph
    inputs, outputs, _, _ = io_names(n_layers)
    roles: dict[str, tuple[str | None, ...]] = {
        "input_ids": ("batch", "seq"),
        "position_ids": ("batch", "seq"),
        "attention_mask": ("batch", "total_seq"),
        "logits": ("batch", "seq", None) if all_logits else ("batch", None),
    }
    roles.update({name: ("batch", None, "past_seq", None) for name in inputs[3:]})
    roles.update({name: ("batch", None, "total_seq", None) for name in outputs[1:]})
    for value in [*graph.inputs, *graph.outputs]:
        want = roles[value.name]
        dims = list(value.shape)
        if len(dims) != len(want):
            raise RuntimeError(f"exported {value.name} has rank {len(dims)}, expected {len(want)}")
        for axis, (d, role) in enumerate(zip(dims, want)):
            if role is None:
                continue
            if isinstance(d, int):
                raise RuntimeError(
                    f"the exporter specialised axis {axis} ({role}) of {value.name} to {d}; the graph would not be "
                    "dynamic"
                )
            dims[axis] = role
        value.shape = ir.Shape(dims)


def _resolve_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing file, a non-empty directory (unless ``force``) and an unwritable parent."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"output directory {out} is not empty (use --force to replace it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {parent} (permission denied)")
    return out


def _preflight(model_path: Path, fmt: str) -> None:
    """Cheap checks of the model's files (header/size, config.json, weights present) before the slow steps."""
    if fmt == "llama2c":
        from decodekit.models.llama2c import read_llama2c_config

        read_llama2c_config(model_path)
    else:
        from decodekit.models.hf import read_hf_config

        read_hf_config(model_path)
        if not any((model_path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise UsageError(f"no model.safetensors (or model.safetensors.index.json) in {model_path}")


def _find_tokenizer(model_path: Path | None, fmt: str, tokenizer: str | os.PathLike | None, vocab: int) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise UsageError(f"tokenizer {path} does not exist")
        return path
    if model_path is None:
        return None
    directory = model_path if fmt == "hf" else model_path.parent
    found = find_tokenizer_file(directory, vocab)
    if fmt == "hf" and found is not None and found.suffix != ".json":
        return None
    return found


def _tokenizer_entry(path: Path, cfg: Any) -> dict[str, Any]:
    if path.suffix == ".json":
        tok = HFTokenizer(path, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
        kind = "hf"
    else:
        tok = Llama2cTokenizer(path)
        kind = "llama2c"
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer {path} has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    return {"file": path.name, "type": kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def _metadata(model: Decoder, *, dtype: torch.dtype, opset: int, all_logits: bool, source: dict[str, Any],
              tokenizer: dict[str, Any] | None, external: bool) -> dict[str, Any]:
    cfg = model.config
    inputs, outputs, past, present = io_names(cfg.n_layers)
    kv = str(dtype).removeprefix("torch.")
    kv_shape = ["batch", cfg.n_kv_heads, "past_seq", cfg.head_dim]
    io: dict[str, Any] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "total_seq"]},
        "logits": {"dtype": kv, "shape": ["batch", "seq", cfg.vocab_size] if all_logits else ["batch", cfg.vocab_size]},
    }
    for name in inputs[3:]:
        io[name] = {"dtype": kv, "shape": kv_shape}
    for name in outputs[1:]:
        io[name] = {"dtype": kv, "shape": ["batch", cfg.n_kv_heads, "total_seq", cfg.head_dim]}
    return {
        "format_version": FORMAT_VERSION,
        "graph_revision": GRAPH_REVISION,
        "producer": f"decodekit {__version__}",
        "model_file": MODEL_FILE,
        "external_data": MODEL_FILE + ".data" if external else None,
        "opset": opset,
        "architecture": cfg.arch,
        "source": source,
        "config": cfg.to_dict(),
        "dtype": kv,
        "inputs": inputs,
        "outputs": outputs,
        "io": io,
        "logits": {"name": "logits", "all_positions": all_logits, "vocab_size": cfg.vocab_size},
        "kv_cache": {"num_layers": cfg.n_layers, "num_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                     "dtype": kv, "shape": kv_shape, "past_names": past, "present_names": present},
        "position_ids": "cumsum(attention_mask) - 1, clipped at 0",
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "bos_id": cfg.bos_id,
        "eos_id": cfg.eos_id,
        "stop_ids": list(cfg.stop_ids) or [cfg.eos_id],
        "tokenizer": tokenizer,
        "validation": None,
        "timings_s": {},
    }


def export_decoder(
    model: str | os.PathLike | Decoder,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    max_seq_len: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    validate: bool = True,
    force: bool = False,
    all_logits: bool = False,
    tokenizer: str | os.PathLike | None = None,
    progress: bool | Progress = True,
) -> ExportResult:
    """Export a decoder to ``out_dir/model.onnx`` + ``out_dir/decodekit.json`` (+ its tokenizer).

    Parameters
    ----------
    model : path or Decoder
        A llama2.c checkpoint file, a Hugging Face model directory, or an in-memory :class:`Decoder`.
    out_dir : path
        Created (with parents); must not exist or be empty unless ``force``.
    dtype : {"fp32", "fp16"}
        Weights, logits and KV cache dtype of the graph.
    opset : int, optional
        ONNX opset (>= 18); default: the exporter's.
    max_seq_len : int, optional
        Override the context length recorded for the runtime.
    atol, rtol : float, optional
        Validation tolerance: every output element must satisfy ``|ort - eager| <= atol + rtol * |eager|``
        (defaults: atol 1e-4 and rtol 0 for fp32; atol 1e-2 and rtol 4e-3 for fp16).
    validate : bool
        Compare ONNX Runtime against eager PyTorch before committing ``out_dir`` (see
        :mod:`decodekit.export.validate`).
    force : bool
        Replace a non-empty ``out_dir`` (only once the new export succeeded).
    all_logits : bool
        Output logits for every position ``[B, S, V]`` instead of the last one.
    tokenizer : path, optional
        Tokenizer file to copy; default: ``tokenizer.json`` of a Hugging Face directory, or ``tok{V}.bin`` /
        ``tokenizer.bin`` / the only ``tok*.bin`` beside a llama2.c checkpoint.
    progress : bool or Progress
        Print the steps and their timings on stderr.

    Returns
    -------
    ExportResult

    Raises
    ------
    UsageError
        Bad input (missing/truncated checkpoint, unknown architecture, bad output directory, bad option);
        nothing is written.
    ValidationError
        ONNX Runtime disagrees with PyTorch by more than ``atol``; nothing is written.

    Notes
    -----
    Deterministic: the validation inputs come from a fixed seed. The exported graph has no CUDA-graph
    specific parts; the runtime decides how to run it.
    """
    prog = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise UsageError(f"opset must be an int >= {MIN_OPSET} for the dynamo exporter, got {opset!r}")
    if atol is None:
        atol = DEFAULT_ATOL[dtype]
    if rtol is None:
        rtol = DEFAULT_RTOL[dtype]
    if not atol > 0:
        raise UsageError(f"atol must be > 0, got {atol!r}")
    if not rtol >= 0:
        raise UsageError(f"rtol must be >= 0, got {rtol!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise UsageError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    out = _resolve_out_dir(out_dir, force)
    torch_dtype = DTYPES[dtype]

    if isinstance(model, Decoder):
        source: dict[str, Any] = {"format": "module", "path": None}
        model_path, fmt = None, "module"
        # never convert the caller's module in place
        decoder = model if model.tok_embeddings.weight.dtype == torch_dtype else copy.deepcopy(model)
        if max_seq_len is not None:
            decoder.config = dataclasses.replace(decoder.config)
            decoder.config.max_seq_len = max_seq_len
    else:
        model_path = Path(model).expanduser().absolute()
        fmt = model_format(model_path)
        source = {"format": fmt, "path": str(model_path)}
        _preflight(model_path, fmt)  # bad input fails here, before any progress line
        with prog.step(f"loading {model_path.name}"):
            decoder = load_model(model_path, max_seq_len=max_seq_len)
    cfg = decoder.config
    tok_path = _find_tokenizer(model_path, fmt, tokenizer, cfg.vocab_size)
    tok_entry = _tokenizer_entry(tok_path, cfg) if tok_path is not None else None
    if tok_entry is None:
        prog.info("no tokenizer found: decodekit.json records none")
    decoder = decoder.to(dtype=torch_dtype).eval()
    prog.info(f"{cfg.arch}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
              f"vocab {cfg.vocab_size}, {sum(p.numel() for p in decoder.parameters()):,} parameters, {dtype}")

    created = []  # parents this call creates, removed again on failure
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise UsageError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        with prog.step("exporting to ONNX (torch.onnx.export, dynamo)"):
            program = _export_onnx(decoder, tmp / MODEL_FILE, opset=opset, all_logits=all_logits)
        opset_used = int(program.model.opset_imports.get("", opset or 0))
        external = (tmp / (MODEL_FILE + ".data")).exists()
        meta = _metadata(decoder, dtype=torch_dtype, opset=opset_used, all_logits=all_logits, source=source,
                         tokenizer=tok_entry, external=external)
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / tok_path.name)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        report = None
        if validate:
            from decodekit.export.validate import validate_export

            tol = f"atol {atol:g}" + (f", rtol {rtol:g}" if rtol else "")
            with prog.step(f"validating with ONNX Runtime against eager PyTorch ({tol})"):
                report = validate_export(decoder, tmp, atol=atol, rtol=rtol, report_line=prog.info)
            meta["validation"] = report.to_dict()
        meta["timings_s"] = {k: round(v, 3) for k, v in prog.timings.items()}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    prog.info(f"wrote {out} ({size / 1e6:.1f} MB)")
    return ExportResult(out_dir=out, onnx_path=out / MODEL_FILE, metadata=meta, validation=report,
                        timings=dict(prog.timings))


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an old ``out`` is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
