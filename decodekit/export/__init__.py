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
      "graph_revision": 5,                      # GRAPH_REVISION: same interface, a different (newer) graph
      "producer": "decodekit 0.1.0",
      "model_file": "model.onnx",               # relative to OUT_DIR
      "external_data": null | "model.onnx.data",  # weights file beside model.onnx (large models)
      "opset": 18,
      "architecture": "llama" | "gpt2",
      "source": {"format": "llama2c" | "gguf" | "hf" | "module", "path": str | null},
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
                   "present_names": [["present.0.key", "present.0.value"], ...],
                   # graph "gqa" only: one buffer bound as past and present, "capacity" for "past_seq"; keys
                   # rotated by "positions" (as eager) or "cache_slots" (rotation inside GroupQueryAttention)
                   "shared_buffer": true, "key_positions": "positions" | "cache_slots"},
      "position_ids": "cumsum(attention_mask) - 1, clipped at 0",
      "max_seq_len": int,                       # P + S must stay <= this
      "vocab_size": V,
      "bos_id": int, "eos_id": int, "stop_ids": [int, ...],   # generation ends on any stop id
      "tokenizer": null | {"file": "tok512.bin", "type": "llama2c" | "hf", "bos_id": int, "eos_id": int,
                           "add_bos": bool, "chat_template": str | null},   # the last two: optional
      "weights": {"format": "fp32" | "fp16"} | {"format": "int4", "op": "com.microsoft::MatMulNBits", "bits": 4,
                  "block_size": 32, "matrices": int, "gguf_types": {...}, "float_matrices": [...]},
      "validation": null | {"max_abs_diff": {name: float}, "atol": float, "rtol": float, "provider": str,
                            "steps": int, "prompt_lengths": [int, int]},
      "timings_s": {step: seconds}
    }

Output is written into a temporary directory beside ``OUT_DIR`` and renamed into place only when the export
(and validation) succeeded, so a failure never leaves a half-written ``OUT_DIR``.

What an export may replace (nothing but its own previous output)
---------------------------------------------------------------
``OUT_DIR`` may not be, contain or lie above the source (checkpoint, model directory, tokenizer file); it must
not exist, or be empty, or -- with ``force`` -- be a previous decodekit export holding only that export's files.
A symbolic link as ``OUT_DIR`` is refused (neither followed nor replaced). Concurrent exports to one ``OUT_DIR``
are serialized by a lock file beside it (``.OUT_DIR.lock``, ``fcntl.flock``): the second waits, then finds
``OUT_DIR`` taken. Folders left by an interrupted export (``.OUT_DIR.<pid>.<hex>.partial``) are removed by the
next export to the same ``OUT_DIR``. Folders are created with ``mkdir``'s mode (the umask applies). Details:
:mod:`decodekit.export._outdir`.

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
import functools
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodekit import __version__
from decodekit.errors import DecodekitError, UsageError
from decodekit.export import _outdir
from decodekit.export._progress import Progress
from decodekit.models import Decoder, find_tokenizer_file, load_model, model_format
from decodekit.models.tokenizer import HFTokenizer, Llama2cTokenizer

__all__ = ["FORMAT_VERSION", "GRAPH_REVISION", "ExportResult", "ExportWriteError", "export_decoder", "io_names",
           "max_opset"]

FORMAT_VERSION = 1
#: Revision of the graph the exporter writes for a given checkpoint. Bumped when the graph changes with the same
#: interface (2: RMSNorm as ``x / sqrt(.)`` and the rotary swap as one MatMul, fewer nodes per step; 3: the
#: ``graph="gqa"`` skip norms without their unread statistics outputs; 4: its adjacent-pair rotary as one node on the
#: packed q|k span, gate/up packed in one MatMul, 4-bit groups packed in one MatMulNBits; 5: its rotary inside
#: GroupQueryAttention where the installed ONNX Runtime allows it, ``kv_cache.key_positions``), so that the
#: runtime's export cache does not keep serving graphs an older decodekit wrote.
GRAPH_REVISION = 5
METADATA_FILE = "decodekit.json"
MODEL_FILE = "model.onnx"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2}
DEFAULT_RTOL = {"fp32": 0.0, "fp16": 4e-3}  # see decodekit.export.validate for why fp16 needs one
MIN_OPSET = 18  # the dynamo exporter's floor
MAX_SEQ_LEN = 2**31 - 1
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf caps a file at 2 GiB)


class ExportWriteError(DecodekitError, OSError):
    """Writing the export failed (full disk, read-only or vanished folder): nothing was left behind. Exit code 2."""

    exit_code = 2

    def __str__(self) -> str:
        return str(self.strerror)


@functools.lru_cache(maxsize=1)
def max_opset() -> int:
    """The highest ONNX opset both the installed ``onnx`` and ONNX Runtime know (probed with a one-node model)."""
    import onnx
    from onnx import TensorProto, helper

    highest = onnx.defs.onnx_opset_version()
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - a dependency
        return highest
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:])
    for opset in range(highest, MIN_OPSET, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 - "opset not supported" comes as a generic ORT failure
            continue
    return MIN_OPSET


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


def _check_parent(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing ancestor is a file or not writable, or that is itself read-only."""
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"cannot replace {out} (read-only: permission denied)")
    parent = out.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {parent} (permission denied)")


def _preflight(model_path: Path, fmt: str) -> None:
    """Cheap checks of the model's files (header/size, config.json, weights present) before the slow steps."""
    if fmt == "llama2c":
        from decodekit.models.llama2c import read_llama2c_config

        read_llama2c_config(model_path)
    elif fmt == "gguf":
        from decodekit.models.gguf import read_gguf_config

        read_gguf_config(model_path)  # architecture, tensor types, metadata: one line naming what is unsupported
    else:
        from decodekit.models import read_hf_config_checked

        read_hf_config_checked(model_path)
        if not any((model_path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise UsageError(f"no model.safetensors (or model.safetensors.index.json) in {model_path}")


def _find_tokenizer(model_path: Path | None, fmt: str, tokenizer: str | os.PathLike | None, vocab: int) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise UsageError(f"tokenizer {path} does not exist")
        if not path.is_file():
            raise UsageError(f"tokenizer {path} is not a file")
        return path
    if model_path is None or fmt == "gguf":
        return None  # a GGUF file carries its own tokenizer (see _gguf_tokenizer_entry)
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
    entry = {"file": path.name, "type": kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    if getattr(tok, "chat_template", None) is not None:  # from tokenizer_config.json beside a tokenizer.json
        entry["chat_template"] = tok.chat_template
    return entry


def _gguf_tokenizer_entry(model_path: Path, cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(tokenizer.json text, decodekit.json entry)`` of the tokenizer a GGUF file describes."""
    from decodekit.models.gguf import gguf_tokenizer_json

    text, info = gguf_tokenizer_json(model_path)
    entry = {"file": "tokenizer.json", "type": "hf", "bos_id": info["bos_id"], "eos_id": info["eos_id"],
             "add_bos": info["add_bos"], "chat_template": info["chat_template"]}
    return text, entry


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
    weights: str = "fp32",
    graph: str = "plain",
) -> ExportResult:
    """Export a decoder to ``out_dir/model.onnx`` + ``out_dir/decodekit.json`` (+ its tokenizer).

    Parameters
    ----------
    model : path or Decoder
        A llama2.c checkpoint file, a GGUF file (its tensors dequantized; its tokenizer and chat template go into
        the export), a Hugging Face model directory, or an in-memory :class:`Decoder`.
    out_dir : path
        Created (with parents); must not exist or be empty unless ``force``; never a symbolic link, never the
        source or a folder above it (see "What an export may replace" above).
    dtype : {"fp32", "fp16"}
        Weights, logits and KV cache dtype of the graph.
    opset : int, optional
        ONNX opset, from 18 to :func:`max_opset` (what onnx and ONNX Runtime both know); default: the exporter's.
    max_seq_len : int, optional
        Override the context length recorded for the runtime.
    atol, rtol : float, optional
        Validation tolerance: every output element must satisfy ``|ort - eager| <= atol + rtol * |eager|``
        (defaults: atol 1e-4 and rtol 0 for fp32; atol 1e-2 and rtol 4e-3 for fp16; atol 1e-3 and rtol 0
        for ``weights="int4"``, against the dequantized fp32 model).
    validate : bool
        Compare ONNX Runtime against eager PyTorch before committing ``out_dir`` (see
        :mod:`decodekit.export.validate`).
    force : bool
        Replace ``out_dir`` when it is a previous decodekit export holding nothing but that export's files (only
        once the new export succeeded); anything else non-empty is refused.
    all_logits : bool
        Output logits for every position ``[B, S, V]`` instead of the last one.
    tokenizer : path, optional
        Tokenizer file to copy; default: ``tokenizer.json`` of a Hugging Face directory, or ``tok{V}.bin`` /
        ``tokenizer.bin`` / the only ``tok*.bin`` beside a llama2.c checkpoint.
    progress : bool or Progress
        Print the steps and their timings on stderr.
    weights : {"fp32", "int4"}
        ``"int4"`` (GGUF sources, ``dtype="fp32"``): keep the file's Q4_0/Q4_1 matrices as 4-bit blocks in ONNX
        Runtime's ``com.microsoft::MatMulNBits`` (block size 32), everything else dequantized; see
        :mod:`decodekit.export.int4`. ``decodekit.json`` records them under ``"weights"``.
    graph : {"plain", "gqa"}
        ``"plain"``: standard ONNX ops only (any runtime). ``"gqa"``: ONNX Runtime's fused ops, with the KV cache
        appended in place into one buffer that is both past and present (``GroupQueryAttention``), packed q/k/v,
        the residual add inside the norms: far fewer nodes per step (see :mod:`decodekit.export.gqa`). A model that
        cannot use it (a head size the installed ORT's CPU kernel rejects, a bidirectional model, ``all_logits``)
        gets the plain graph and a one-line note; ``decodekit.json`` records the graph written under ``"graph"``.

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
    ExportWriteError
        An ``OSError`` while writing (full disk, read-only folder); the partial output is removed.

    Notes
    -----
    Deterministic: the validation inputs come from a fixed seed. The exported graph has no CUDA-graph
    specific parts; the runtime decides how to run it.
    """
    prog = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from decodekit.export.gqa import GRAPHS
    from decodekit.export.int4 import INT4_ATOL, INT4_RTOL, WEIGHTS

    if graph not in GRAPHS:
        raise UsageError(f"graph must be one of {list(GRAPHS)}, got {graph!r}")
    if weights not in WEIGHTS:
        raise UsageError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if weights == "int4" and dtype != "fp32":
        raise UsageError(f"weights='int4' needs dtype='fp32' (the float parts and the KV cache), got {dtype!r}")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise UsageError(f"opset must be an int >= {MIN_OPSET} for the dynamo exporter, got {opset!r}")
        if opset > max_opset():
            raise UsageError(f"opset {opset} is not supported here: ONNX Runtime and onnx know opsets {MIN_OPSET} "
                             f"to {max_opset()}")
    if atol is None:
        atol = INT4_ATOL if weights == "int4" else DEFAULT_ATOL[dtype]
    if rtol is None:
        rtol = INT4_RTOL if weights == "int4" else DEFAULT_RTOL[dtype]
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol > 0):
        raise UsageError(f"atol must be a finite number > 0, got {atol!r}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise UsageError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or not 2 <= max_seq_len <= MAX_SEQ_LEN):
        raise UsageError(f"max_seq_len must be an int from 2 to {MAX_SEQ_LEN}, got {max_seq_len!r}")
    out = _outdir.normalize(out_dir)
    model_path = None if isinstance(model, Decoder) else Path(model).expanduser().absolute()
    if model_path is not None:
        model_format(model_path)  # missing, a device, a pipe, a link loop: said before anything else
    if weights == "int4" and (model_path is None or model_format(model_path) != "gguf"):
        from decodekit.export.int4 import int4_blocks_for

        int4_blocks_for(model_path, "module" if model_path is None else model_format(model_path), None)  # raises
    _outdir.check_not_source(out, [model_path, Path(tokenizer) if tokenizer is not None else None])
    _outdir.check_replaceable(out, force)
    _check_parent(out)
    for name in _outdir.clean_stale(out, keep=[model_path, tokenizer]):
        prog.info(f"removed {name}, left by an interrupted export")
    torch_dtype = DTYPES[dtype]

    if isinstance(model, Decoder):
        source: dict[str, Any] = {"format": "module", "path": None}
        fmt = "module"
        # never convert or re-configure the caller's module in place
        decoder = model if model.tok_embeddings.weight.dtype == torch_dtype else copy.deepcopy(model)
        if max_seq_len is not None:
            decoder = copy.copy(decoder) if decoder is model else decoder
            decoder.config = dataclasses.replace(decoder.config)
            decoder.config.max_seq_len = max_seq_len
    else:
        assert model_path is not None
        fmt = model_format(model_path)
        source = {"format": fmt, "path": str(model_path)}
        _preflight(model_path, fmt)  # bad input fails here, before any progress line
        with prog.step(f"loading {model_path.name}"):
            decoder = load_model(model_path, max_seq_len=max_seq_len)
    cfg = decoder.config
    tok_path = _find_tokenizer(model_path, fmt, tokenizer, cfg.vocab_size)
    tok_entry = _tokenizer_entry(tok_path, cfg) if tok_path is not None else None
    tok_text = None
    if fmt == "gguf" and tok_path is None:
        assert model_path is not None
        with prog.step("building the tokenizer from the GGUF vocabulary and merges"):
            tok_text, tok_entry = _gguf_tokenizer_entry(model_path, cfg)
    int4 = None
    if weights == "int4":
        from decodekit.export.int4 import int4_blocks_for

        int4 = int4_blocks_for(model_path, fmt, decoder)
    if tok_entry is None:
        prog.info("no tokenizer found: decodekit.json records none")
    # .eval() must not change the caller's module for good: its modes come back when the export is done
    modes = [(m, m.training) for m in decoder.modules()] if isinstance(model, Decoder) else []
    decoder = decoder.to(dtype=torch_dtype).eval()
    graph_note = None
    if graph == "gqa":
        from decodekit.export.gqa import gqa_unsupported

        graph_note = gqa_unsupported(decoder, all_logits=all_logits)
        if graph_note is not None:
            prog.info(f"note: writing the plain graph instead of graph='gqa': {graph_note}")
            graph = "plain"
    prog.info(f"{cfg.arch}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
              f"vocab {cfg.vocab_size}, {sum(p.numel() for p in decoder.parameters()):,} parameters, {dtype}")

    inputs = [model_path, tok_path]
    created = []  # parents this call creates, removed again (when empty) on failure
    parent = out.parent
    while not os.path.lexists(parent):
        created.append(parent)
        parent = parent.parent
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _outdir.locked(out, prog.info):
            for name in _outdir.clean_leftovers(out, keep=inputs):
                prog.info(f"removed {name}, left by an interrupted export")
            _outdir.check_replaceable(out, force)  # again: another export may have finished while we waited
            tmp = _outdir.partial_path(out)
            try:
                os.mkdir(tmp)  # mode 0o777 & ~umask, as any mkdir
                meta, report = _write_export(decoder, tmp, prog, opset=opset, all_logits=all_logits, source=source,
                                             tok_path=tok_path, tok_entry=tok_entry, validate=validate, atol=atol,
                                             rtol=rtol, tok_text=tok_text, int4=int4, graph=graph,
                                             graph_note=graph_note)
                _outdir.commit(tmp, out)
            except BaseException as e:
                if not isinstance(e, FileExistsError) or str(e.filename) != str(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)  # still under the lock; also when mkdir itself was cut short
                raise
        done = True
    except OSError as e:
        if isinstance(e, DecodekitError) or (e.filename is not None and not _under(Path(e.filename), out.parent)):
            raise  # not a write into OUT_DIR's folder (e.g. an unreadable input): its own message says what
        raise ExportWriteError(e.errno, f"cannot write the export to {out}: {e.strerror or e}") from e
    finally:
        for m, training in modes:
            m.training = training
        if not done:
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty: never anything that another process put there meanwhile
    size = sum(f.stat().st_size for f in out.iterdir())
    prog.info(f"wrote {out} ({size / 1e6:.1f} MB)")
    return ExportResult(out_dir=out, onnx_path=out / MODEL_FILE, metadata=meta, validation=report,
                        timings=dict(prog.timings))


def _under(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _write_export(decoder: Decoder, tmp: Path, prog: Progress, *, opset: int | None, all_logits: bool,
                  source: dict[str, Any], tok_path: Path | None, tok_entry: dict[str, Any] | None, validate: bool,
                  atol: float, rtol: float, tok_text: str | None = None,
                  int4: dict[str, Any] | None = None, graph: str = "plain",
                  graph_note: str | None = None) -> tuple[dict[str, Any], Any]:
    """Write ``model.onnx``, ``decodekit.json`` and the tokenizer into ``tmp``; validate them when asked.

    ``tok_text``: the ``tokenizer.json`` text to write as ``tok_entry["file"]`` (a GGUF file's tokenizer), instead of
    copying ``tok_path``. ``int4``: 4-bit blocks by parameter name, packed into the graph as MatMulNBits."""
    groups = None  # 4-bit matrices the fused graph packs together (q/k/v, gate/up), when their blocks allow it
    if graph == "gqa":
        from decodekit.export.gqa import save_gqa_graph
        from decodekit.export.int4 import packed_groups

        groups = packed_groups(decoder, int4) if int4 is not None else None
        with prog.step("writing the fused-op ONNX graph (GroupQueryAttention, in-place KV cache)"):
            opset_used, key_positions = save_gqa_graph(decoder, tmp / MODEL_FILE, opset=opset or MIN_OPSET,
                                                       separate_matrices=int4 is not None and groups is None,
                                                       external_bytes=EXTERNAL_DATA_BYTES)
    else:
        with prog.step("exporting to ONNX (torch.onnx.export, dynamo)"):
            program = _export_onnx(decoder, tmp / MODEL_FILE, opset=opset, all_logits=all_logits)
        opset_used = int(program.model.opset_imports.get("", opset or 0))
        del program  # the fp32 graph in memory: the int4 rewrite loads the saved file
    if opset is not None and opset_used != opset:
        raise UsageError(f"the exporter wrote opset {opset_used} instead of the requested {opset}; nothing written")
    external = (tmp / (MODEL_FILE + ".data")).exists()
    weights_entry = {"format": "fp32" if decoder.tok_embeddings.weight.dtype == torch.float32 else "fp16"}
    if int4 is not None:
        from decodekit.export.int4 import pack_matmul_nbits

        with prog.step(f"packing {len(int4)} GGUF 4-bit matrices as MatMulNBits (block size 32)"):
            weights_entry = pack_matmul_nbits(tmp / MODEL_FILE, decoder, int4, groups=groups,
                                              external_data=MODEL_FILE + ".data" if external else None)
    meta = _metadata(decoder, dtype=decoder.tok_embeddings.weight.dtype, opset=opset_used, all_logits=all_logits,
                     source=source, tokenizer=tok_entry, external=external)
    meta["weights"] = weights_entry
    if graph == "gqa":
        from decodekit.export.gqa import gqa_metadata

        gqa_metadata(meta, key_positions)
    else:
        meta["graph"] = "plain"
    meta["graph_note"] = graph_note  # why graph='gqa' was asked for and the plain graph written, or null
    if tok_text is not None and tok_entry is not None:
        (tmp / tok_entry["file"]).write_text(tok_text, encoding="utf-8")
    elif tok_path is not None:
        shutil.copyfile(tok_path, tmp / tok_path.name)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    report = None
    if validate:
        from decodekit.export.validate import validate_export

        tol = f"atol {atol:g}" + (f", rtol {rtol:g}" if rtol else "")
        against = "the dequantized fp32 model" if int4 is not None else "eager PyTorch"
        with prog.step(f"validating with ONNX Runtime against {against} ({tol})"):
            report = validate_export(decoder, tmp, atol=atol, rtol=rtol, report_line=prog.info)
        meta["validation"] = report.to_dict()
    meta["timings_s"] = {k: round(v, 3) for k, v in prog.timings.items()}
    with open(tmp / METADATA_FILE, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return meta, report
