"""ONNX Runtime decoder with IO binding: the KV cache and the logits never leave preallocated torch buffers.

How a step works (``io_binding=True``, the default):

* The KV cache lives in two torch storages allocated once, each big enough for ``max_batch x max_seq_len``
  tokens of every layer's keys and values. A step binds ``past_key_values.{i}.key/value`` to a view of
  storage A (``[B, H_kv, P, D]``, the contiguous prefix of that layer's region) and
  ``present.{i}.key/value`` to the same region of storage B (``[B, H_kv, P+S, D]``); ONNX Runtime reads
  the past from A and writes the grown cache into B; the next step swaps A and B. ORT needs each bound
  tensor contiguous, and a prefix view of a flat region is exactly that, so no copy is ever made by us
  and nothing is allocated per step.
* ``logits`` is bound to a preallocated torch tensor ``[max_batch, V]``; :meth:`OnnxDecoder.step` returns a
  ``[B, V]`` view of it, which :func:`decodekit.sample` reads in place (on CUDA the logits never leave
  the device; on CPU there is no numpy conversion anywhere on the hot path).
* ``input_ids``, ``position_ids`` and ``attention_mask`` are bound where they are when ORT can read them in
  place (contiguous, the graph's dtype and device), else copied into small preallocated buffers.

The tensors ORT writes (the KV storages, the logits) are attributes of the decoder, so they stay alive as long as
the binding can use them; an input bound in place belongs to the caller, who holds it through the (synchronous)
run, and every step binds its own inputs again before running (or finds the binding already at their address).

``io_binding=False`` runs the same graph with plain ``session.run`` and numpy arrays (what most ORT decoders
do: the cache goes through numpy each step); it exists so benchmarks and the demo can show the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodekit.errors import UsageError
from decodekit.export.gqa import ort_version_at_least as _ort_version_at_least
from decodekit.runtime.config import check_bool, check_int
from decodekit.runtime.loop import MAX_BATCH, GenerateMixin, check_reset_batch

METADATA_FILE = "decodekit.json"
FORMAT_VERSION = 1

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}


def _short(value: object) -> str:
    """A JSON value for a one-line message, with its JSON kind: ``null``, ``true``, ``string "x"``, ``array [1]``
    (long values cut)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kind = ("string" if isinstance(value, str) else "number" if isinstance(value, (int, float))
            else "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # pragma: no cover - not from JSON
        text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list_of(value: object, check: Any) -> bool:
    return isinstance(value, list) and all(check(v) for v in value)


def _is_file_name(value: object) -> bool:
    """A plain, non-empty file name (no folder part): a file beside ``decodekit.json``."""
    return isinstance(value, str) and value not in ("", ".", "..") and "\0" not in value and Path(value).name == value


def _malformed(path: Path, entry: str, want: str, value: object) -> UsageError:
    return UsageError(f"{path} has a malformed {entry!r} entry: it must be {want}, got {_short(value)}")


def _check_config_entry(path: Path, config: object) -> None:
    """``config`` is an object whose fields have the types of :class:`DecoderConfig`'s fields (their values are
    checked by ``DecoderConfig`` itself), so that building it can only fail with a ``UsageError``."""
    import dataclasses
    import typing

    from decodekit.models.config import DecoderConfig

    if not isinstance(config, dict):
        raise _malformed(path, "config", "a JSON object (the DecoderConfig)", config)
    hints = typing.get_type_hints(DecoderConfig)
    for f in dataclasses.fields(DecoderConfig):
        where = f"config.{f.name}"
        if f.name not in config:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"{path} has a malformed 'config' entry: {where} is missing")
            continue
        value, want = config[f.name], hints[f.name]
        if want is int:
            if f.name in ("bos_id", "eos_id"):
                ok, what = _is_int(value) and value >= 0, "a token id (an int >= 0)"
            else:
                ok, what = _is_int(value), "a positive int"
        elif want is float:
            ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif want is bool:
            ok, what = isinstance(value, bool), "true or false"
        elif want is str:
            ok, what = isinstance(value, str), "a string"
        else:  # list[int]: stop_ids
            ok, what = _is_list_of(value, lambda t: _is_int(t) and t >= 0), "a list of token ids (ints >= 0)"
        if not ok:
            raise UsageError(f"{path} has a malformed 'config' entry: {where} must be {what}, got {_short(value)}")


def _check_tokenizer_entry(path: Path, entry: object) -> None:
    """null, or ``{"file": NAME beside decodekit.json, "type": "llama2c" | "hf", "bos_id"/"eos_id": id or null}``."""
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise _malformed(path, "tokenizer", 'null or an object {"file": ..., "type": ...}', entry)
    if not _is_file_name(entry.get("file")):
        raise _malformed(path, "tokenizer.file", "a file name beside it", entry.get("file"))
    if entry.get("type") not in ("llama2c", "hf"):
        raise _malformed(path, "tokenizer.type", "'llama2c' or 'hf'", entry.get("type"))
    for key in ("bos_id", "eos_id"):
        value = entry.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            raise _malformed(path, f"tokenizer.{key}", "a token id (an int >= 0) or null", value)


def read_metadata(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``decodekit.json`` of an export directory (``UsageError`` naming the file and the entry).

    Checked here: the file is UTF-8 JSON holding an object of ``format_version`` 1, and every entry the runtime
    reads has its documented type (``config`` an object with :class:`DecoderConfig`'s field types, ``inputs`` /
    ``outputs`` lists of names, ``model_file`` and ``tokenizer.file`` file names beside ``decodekit.json``,
    ``logits`` / ``kv_cache`` / ``source`` objects or null, ...). Whether the entries agree with each other and with
    ``model.onnx`` is checked by :class:`OnnxDecoder`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        if os.path.lexists(model_dir):
            raise UsageError(f"export directory {model_dir} is not a directory")
        raise UsageError(f"export directory {model_dir} does not exist")
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise UsageError(f"{model_dir} has no {METADATA_FILE}: not a decodekit export (run `decodekit export`)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}): not a decodekit.json"
        ) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # an int of thousands of digits, nesting deeper than Python's stack
        raise UsageError(f"{path} is not valid JSON for decodekit: {type(e).__name__.lower()} {e}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise UsageError(
            f"{path} has format_version {_short(version) if not _is_int(version) else version}; this decodekit "
            f"reads version {FORMAT_VERSION} (export the model again)"
        )
    for key in ("config", "inputs", "outputs"):
        if key not in meta:
            raise UsageError(f"{path} has no {key!r} entry: not a complete decodekit export (export it again)")
    _check_config_entry(path, meta["config"])
    for key in ("inputs", "outputs"):
        if not _is_list_of(meta[key], lambda n: isinstance(n, str)):
            raise _malformed(path, key, "a list of graph input/output names", meta[key])
    if "model_file" in meta and not _is_file_name(meta["model_file"]):
        raise _malformed(path, "model_file", "a file name beside it", meta["model_file"])
    for key in ("logits", "kv_cache"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _malformed(path, key, "a JSON object or null", meta[key])
    if meta.get("dtype") is not None and not isinstance(meta["dtype"], str):
        raise _malformed(path, "dtype", "'float32', 'float16' or null", meta["dtype"])
    _check_tokenizer_entry(path, meta.get("tokenizer"))
    source = meta.get("source")
    if source is not None:
        if not isinstance(source, dict):
            raise _malformed(path, "source", "a JSON object or null", source)
        if source.get("path") is not None and not isinstance(source["path"], str):
            raise _malformed(path, "source.path", "a path or null", source["path"])
    return meta


# Below this many bytes of weights a CPU step is a few hundred microseconds of small ops: a second ORT thread
# only adds hand-offs (measured on 2 cores, stories260K batch 8: 154 ms per 128 tokens with 2 threads, 138 with 1).
_SMALL_MODEL_BYTES = 64 << 20


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: ``MemAvailable`` of /proc/meminfo, else physical
    memory); None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:  # pragma: no cover
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _check_metadata(meta: dict[str, Any], cfg: Any, where: Path) -> int:
    """The redundant entries of ``decodekit.json`` agree with its ``config``; returns its ``max_seq_len``."""
    seq = meta.get("max_seq_len", cfg.max_seq_len)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise UsageError(f"{where} has a bad entry: max_seq_len must be an int >= 2, got {_short(seq)}")
    pairs = [
        ("max_seq_len", seq, "config.max_seq_len", cfg.max_seq_len),
        ("vocab_size", meta.get("vocab_size", cfg.vocab_size), "config.vocab_size", cfg.vocab_size),
    ]
    logits = meta.get("logits")
    if isinstance(logits, dict) and "vocab_size" in logits:
        pairs.append(("logits.vocab_size", logits["vocab_size"], "config.vocab_size", cfg.vocab_size))
    kv = meta.get("kv_cache")
    if isinstance(kv, dict):
        for key, attr in (("num_layers", "n_layers"), ("num_kv_heads", "n_kv_heads"), ("head_dim", "head_dim")):
            if key in kv:
                pairs.append((f"kv_cache.{key}", kv[key], f"config.{attr}", getattr(cfg, attr)))
    for name, value, other, want in pairs:
        if value != want:
            raise UsageError(f"{where} is inconsistent: {name} is {value!r} but {other} is {want!r}")
    return seq


# How long an idle CPU worker spins for the next parallel op before it blocks, by default. Measured by
# bench/bench_spin.py (SmolLM2-135M fp32, 2 threads, this 2-core machine; README "How the workers wait"): 5 us
# bridges many of a B = 1 step's short gaps between parallel ops (quiet: 85-90 tok/s against 80-82 blocking at
# once and 103-114 spinning through the step), yet a worker with nothing to do leaves the core within microseconds,
# so on shared cores it stays near blocking (one core busy 66-69 against 63-65, spinning 40-43; every core busy
# -10 % to +15 % in three runs). 10 us already lost a fifth with a core busy.
SPIN_WAIT_DEFAULT_US = 5
SPIN_WAIT_MAX_US = 100_000
# the first ONNX Runtime that reads session.intra_op.spin_duration_us (an older one ignores the key and spins for
# about a million pauses, i.e. through the step: there the microsecond policy falls back to blocking)
_ORT_SPIN_DURATION = (1, 26)


#: the most intra-op threads a runtime class asks ONNX Runtime for (far above any machine's core count; ORT's own
#: option is a C int, and a larger Python int fails inside its binding with an error that names nothing)
MAX_ORT_THREADS = 4096


def _microseconds(text: str) -> int | None:
    """``"<n>us"`` (ASCII digits, surrounding blanks allowed, ``n <= SPIN_WAIT_MAX_US``) -> ``n``; None otherwise."""
    text = text.strip()
    digits = text.removesuffix("us")
    if text.endswith("us") and 0 < len(digits) <= 6 and digits.isascii() and digits.isdigit():
        n = int(digits)
        return n if n <= SPIN_WAIT_MAX_US else None
    return None


def _check_spin_wait(spin_wait: object) -> bool | int:
    """The policy of a ``spin_wait`` argument: True, False, or microseconds from ``"<n>us"`` (``"0us"`` -> False);
    ``TypeError`` / ``UsageError`` naming it otherwise. A bare number is refused: ``1`` would read as "on"."""
    if isinstance(spin_wait, bool):
        return spin_wait
    if not isinstance(spin_wait, str):
        raise TypeError(f"spin_wait must be a bool or a duration such as '5us', got {type(spin_wait).__name__} "
                        f"{spin_wait!r}")
    us = _microseconds(spin_wait)
    if us is None:
        raise UsageError(f"spin_wait must be True, False or microseconds such as '5us' (at most "
                         f"{SPIN_WAIT_MAX_US}us), got {spin_wait!r}")
    return us or False


def _spin_wait_from_env() -> bool | int | None:
    """``$DECODEKIT_ORT_SPIN``: ``0`` (block at once), ``1`` (spin through the step) or ``<n>us``; None when unset
    or blank; anything else a UsageError naming the variable."""
    name = "DECODEKIT_ORT_SPIN"
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    if env in ("0", "1"):
        return env == "1"
    us = _microseconds(env)
    if us is None:
        raise UsageError(f"${name} must be 0, 1 or microseconds such as 5us (at most {SPIN_WAIT_MAX_US}us), "
                         f"got {os.environ[name]!r}")
    return us or False


def _spin_entries(spin_wait: bool | int, ort_version: str) -> tuple[bool | int, dict[str, str]]:
    """The policy ONNX Runtime ``ort_version`` will follow for ``spin_wait`` (bool or microseconds), and the CPU
    session config entries that set it."""
    if spin_wait is True:
        # spin while a step runs (no wake-up per parallel op), stop at its end: the next step wakes them once
        return True, {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    if spin_wait is False or not _ort_version_at_least(ort_version, _ORT_SPIN_DURATION):
        # ORT's CPU workers spin after each run by default; between two steps the sampler and the host loop
        # need those cores (measured here, GPT-2-small shape, 2 ORT threads: 57 -> 34 ms/token at batch 1)
        return False, {"session.intra_op.allow_spinning": "0"}
    return spin_wait, {
        "session.intra_op.allow_spinning": "1",
        "session.intra_op.spin_duration_us": str(spin_wait),
        "session.force_spinning_stop": "1",  # and none at all between steps
    }


def _default_cpu_threads(model_file: Path) -> int | None:
    """1 intra-op thread for small models, ORT's default (one per core) otherwise."""
    weights = sum(p.stat().st_size for p in model_file.parent.glob(model_file.name + "*") if p.is_file())
    return 1 if weights < _SMALL_MODEL_BYTES else None


def _env_int(name: str, want: str, ok: Callable[[str], bool]) -> int | None:
    """``$name`` as an int, None when unset or blank; a value ``ok`` refuses is a UsageError saying ``want``."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    if not ok(env):
        raise UsageError(f"${name} must be {want}, got {os.environ[name]!r}")
    return int(env)


def cpu_threads_arg(intra_op_threads: object) -> int | None:
    """The ``intra_op_threads`` argument of a runtime class, checked: itself, else ``$DECODEKIT_ORT_THREADS``, else
    None (the caller's default); an int in ``[1, MAX_ORT_THREADS]``, ``TypeError`` / ``UsageError`` naming the
    argument or the variable otherwise (before anything is read: ORT itself would take no more than a C int)."""
    if intra_op_threads is None:
        intra_op_threads = _env_int("DECODEKIT_ORT_THREADS", f"an int in [1, {MAX_ORT_THREADS}]",
                                    lambda v: v.isascii() and v.isdigit() and len(v) <= 6
                                    and 1 <= int(v) <= MAX_ORT_THREADS)
    if intra_op_threads is not None:
        intra_op_threads = check_int("intra_op_threads", intra_op_threads, lo=1, hi=MAX_ORT_THREADS)
    return intra_op_threads


def spin_wait_arg(spin_wait: object) -> bool | int:
    """The ``spin_wait`` argument of a runtime class, checked: itself, else ``$DECODEKIT_ORT_SPIN``, else
    ``SPIN_WAIT_DEFAULT_US``; as True, False or microseconds."""
    policy = _spin_wait_from_env() if spin_wait is None else _check_spin_wait(spin_wait)
    return SPIN_WAIT_DEFAULT_US if policy is None else policy


def open_session(model_file: Path, device: str, intra_op_threads: int | None,
                 spin_wait: bool | int) -> tuple[Any, bool | str | None]:
    """An ONNX Runtime session of ``model_file`` with every optimization, on ``device`` ("cpu" or "cuda": its CUDA
    execution provider, checked here), with ``intra_op_threads`` (None: ORT's choice) and, on CPU, the worker wait
    policy ``spin_wait`` (see :func:`_spin_entries`). Returns the session and the policy in force as the runtime
    classes show it (True, False or ``"<n>us"``; None on CUDA). A file ORT cannot load is a one-line UsageError.
    On CUDA the CPU pool keeps ORT's defaults (as ``OnnxDecoder`` always has): the graph's heavy nodes run on the
    GPU, and a CPU worker spins only after a parallel CPU op, which such a step hardly has."""
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
            raise UsageError("device='cuda' needs onnxruntime-gpu's CUDAExecutionProvider and a CUDA device")
        providers = [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3
    shown: bool | str | None = None
    if device == "cpu":
        # the policy ORT's CPU workers follow: True, False (also where this ORT cannot bound the spin) or "<n>us"
        policy, entries = _spin_entries(spin_wait, ort.__version__)
        shown = policy if isinstance(policy, bool) else f"{policy}us"
        for key, value in entries.items():
            opts.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(model_file), sess_options=opts, providers=providers)
    except Exception as e:  # ORT's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(
            f"{model_file} cannot be loaded by ONNX Runtime (truncated, or not an ONNX model?): {first}"
        ) from None
    return session, shown


class _Binder:
    """Thin IO binding over raw pointers.

    It calls ONNX Runtime's C binding object directly with a device handle made once, because the public
    ``IOBinding.bind_input`` wrapper rebuilds that handle on every call, which costs more than running the
    whole graph of a small model. Falls back to the public API when the internals are not there.
    """

    def __init__(self, session: Any, device: torch.device) -> None:
        self._public = session.io_binding()
        self._session = session
        self._last: dict[str, tuple] = {}  # name -> (dtype, shape, address) of its current binding
        dev_type, dev_id = ("cuda" if device.type == "cuda" else "cpu"), (device.index or 0)
        self._dev = (dev_type, dev_id)
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            self._c_device = OrtDevice.make(dev_type, dev_id)._get_c_device()
            self._c = self._public._iobinding
            self._sess = session._sess
        except (ImportError, AttributeError):  # pragma: no cover - other ORT versions
            self._c = None

    def raw(self, name: str, np_type: type, shape: tuple[int, ...], ptr: int, output: bool) -> None:
        key = (np_type, shape, ptr)
        if self._last.get(name) == key:  # ORT keeps a binding until it is replaced: nothing to redo
            return
        self._last[name] = key
        if self._c is not None:
            (self._c.bind_output if output else self._c.bind_input)(name, self._c_device, np_type, shape, ptr)
        elif output:  # pragma: no cover
            self._public.bind_output(name, *self._dev, np_type, shape, ptr)
        else:  # pragma: no cover
            self._public.bind_input(name, *self._dev, np_type, shape, ptr)

    def kv(self, binds: tuple, past_shape: tuple[int, ...], present_shape: tuple[int, ...]) -> None:
        """Bind every layer's past (input) and present (output) cache at once. Their addresses alternate and their
        shapes grow every step, so there is nothing to memoize: the loop calls the C binding directly."""
        past, present, np_type = binds
        if self._c is None:  # pragma: no cover
            for name, ptr in past:
                self.raw(name, np_type, past_shape, ptr, output=False)
            for name, ptr in present:
                self.raw(name, np_type, present_shape, ptr, output=True)
            return
        bind_in, bind_out, dev = self._c.bind_input, self._c.bind_output, self._c_device
        for name, ptr in past:
            bind_in(name, dev, np_type, past_shape, ptr)
        for name, ptr in present:
            bind_out(name, dev, np_type, present_shape, ptr)

    def input(self, name: str, t: torch.Tensor) -> None:
        self.raw(name, _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr(), output=False)

    def output(self, name: str, t: torch.Tensor) -> None:
        self.raw(name, _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr(), output=True)

    def run(self) -> None:
        if self._c is not None:
            self._sess.run_with_iobinding(self._c, None)
        else:  # pragma: no cover
            self._session.run_with_iobinding(self._public)


class OnnxDecoder(GenerateMixin):
    """An exported decoder on ONNX Runtime, with IO binding into preallocated torch buffers.

    Parameters
    ----------
    model_dir : path-like
        A directory written by ``decodekit export`` (``model.onnx`` + ``decodekit.json`` + tokenizer).
    device : {"cpu", "cuda"}
        Where the session runs and the buffers live. ``"cuda"`` needs ONNX Runtime's CUDA execution
        provider and a CUDA device visible to torch; asking for it without them raises ``UsageError``.
    max_batch : int
        Most rows a generation may have, in ``[1, MAX_BATCH]`` (65536). The KV buffers are sized for
        ``max_batch x max_seq_len`` and allocated here; when they would not fit in the memory available on the
        device, ``UsageError`` names ``max_batch`` and ``max_seq_len`` before anything is allocated.
    max_seq_len : int, optional
        Longest prompt + generation, at least 2 (default: the export's ``max_seq_len``; may not exceed it).
    io_binding : bool
        ``True``: zero-copy IO binding (see the module docstring). ``False``: plain ``session.run`` with
        numpy arrays, for comparison.
    intra_op_threads : int, optional
        ONNX Runtime's intra-op thread count, 1 to 4096. Default: ``$DECODEKIT_ORT_THREADS`` if set; else, on CPU, 1
        for models under 64 MB of weights (their steps are too short to split) and ORT's choice (one per core) above.
        On CPU the workers do not spin between runs, so the sampler and the host loop get the cores.
    spin_wait : bool or str, optional
        CPU only: how ONNX Runtime's idle workers wait for the next parallel op of a step. A duration such as
        ``"5us"`` (at most ``"100000us"``): spin that long, then block (futex) until woken; ``True``: spin through
        the whole step (no wake-up per parallel op) and stop at its end; ``False`` or ``"0us"``: block at once.
        (A bare number is refused: ``1`` would read as "on".) Default: ``$DECODEKIT_ORT_SPIN`` (``0``, ``1`` or
        ``<n>us``) if set, else ``SPIN_WAIT_DEFAULT_US`` (5 us): SmolLM2-135M fp32, 2 threads, B = 1 on this
        2-core machine, 85-90 tok/s quiet (spinning through the step 103-114, blocking at once 80-82), 66-69 with
        one core busy elsewhere (40-43 and 63-65), within -10 % / +15 % of blocking with every core busy (README,
        "How the workers wait"). ONNX Runtime before 1.26 cannot bound the spin: there a duration means ``False``. The
        attribute ``spin_wait`` holds the policy in force (``True``, ``False`` or ``"<n>us"``; None on CUDA). No
        setting changes the tokens.

    Raises
    ------
    TypeError
        An argument of the wrong type (``max_batch=True``, ``max_seq_len=1.5``, ...), naming it.
    UsageError
        A ``ValueError``: a bad value, or an export directory that cannot be used: ``decodekit.json`` missing,
        malformed or inconsistent, ``model.onnx`` missing, truncated, not an ONNX model, or not the graph
        ``decodekit.json`` describes (inputs/outputs, layer count, vocabulary, KV heads, head size, dtype). All of
        this is checked before the buffers are allocated; each message is one line.

    Threads
    -------
    One decoder holds one KV cache and one set of bound buffers, so :meth:`generate` takes the decoder's lock:
    threads sharing a decoder take turns, and each call returns exactly the tokens it would return alone. (Use one
    decoder per thread to run generations in parallel.) Calling :meth:`reset` / :meth:`step` directly is not
    locked: do not mix that with concurrent ``generate`` calls.

    Examples
    --------
    >>> dec = OnnxDecoder("exports/stories260K", max_batch=1)  # doctest: +SKIP
    >>> res = dec.generate("Once upon a time", max_new_tokens=64, temperature=0.0)  # doctest: +SKIP
    >>> print(res.text[0])  # doctest: +SKIP

    Notes
    -----
    Determinism: with a fixed ``seed`` the sampled tokens are reproducible, and equal to the eager
    backend's as long as both produce the same logits up to the kept set and the race winner.
    CUDA graphs: the bound buffers keep their addresses across steps (a requirement for capturing), but the
    ORT session itself is not captured here.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "cpu",
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        io_binding: bool = True,
        intra_op_threads: int | None = None,
        spin_wait: bool | str | None = None,
    ) -> None:
        from decodekit.models.config import DecoderConfig

        # the arguments first: nothing is read or loaded for a call that cannot work
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a path, got {type(model_dir).__name__}")
        if not isinstance(device, str):
            raise TypeError(f"device must be a str, 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
        max_batch = check_int("max_batch", max_batch, lo=1, hi=MAX_BATCH)
        if max_seq_len is not None:
            max_seq_len = check_int("max_seq_len", max_seq_len, lo=2)
        check_bool("io_binding", io_binding)
        intra_op_threads = cpu_threads_arg(intra_op_threads)
        spin_policy = spin_wait_arg(spin_wait)

        self.model_dir = Path(model_dir)
        meta = read_metadata(self.model_dir)  # a UTF-8 JSON object of format_version 1, entries of the right types
        where = self.model_dir / METADATA_FILE
        logits_entry = meta.get("logits")
        if isinstance(logits_entry, dict) and logits_entry.get("all_positions"):
            raise UsageError(f"{self.model_dir} was exported with all-position logits; generation needs the default")
        try:
            self.config = DecoderConfig.from_dict(meta["config"])
        except UsageError as e:
            raise UsageError(f"{where} has a bad 'config' entry: {e}") from None
        except (KeyError, TypeError, ValueError) as e:  # pragma: no cover - read_metadata checked the types
            raise UsageError(f"{where} has a malformed 'config' entry: {e}") from None
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        model_file = self.model_dir / meta.get("model_file", "model.onnx")
        if not model_file.is_file():
            raise UsageError(f"{model_file} is missing from the export directory")
        export_max = _check_metadata(meta, self.config, where)
        if max_seq_len is None:
            max_seq_len = export_max
        elif max_seq_len > export_max:
            raise UsageError(f"max_seq_len must be <= {export_max} (the export limit), got {max_seq_len}")

        if intra_op_threads is None and device == "cpu":
            intra_op_threads = _default_cpu_threads(model_file)
        self.session, self.spin_wait = open_session(model_file, device, intra_op_threads, spin_policy)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.owns_cpu_threads = self.device.type == "cpu"  # ORT's workers do the heavy work: see run_generation
        types = self._check_graph(meta)  # model.onnx agrees with decodekit.json ...
        # graph="gqa" exports: each layer's past and present are ONE buffer of capacity max_seq_len that
        # GroupQueryAttention appends to in place; it is bound once per generation (see step), and there is no
        # second (ping-pong) storage
        kv_entry = meta.get("kv_cache")
        self.shared_kv = isinstance(kv_entry, dict) and kv_entry.get("shared_buffer") is True
        if self.shared_kv and not io_binding:
            raise UsageError(f"{self.model_dir} is a graph='gqa' export (one KV buffer shared by past and present): "
                             "it runs with io_binding=True only; export with graph='plain' for plain session.run")
        self._check_memory(max_batch, max_seq_len, types, from_metadata=max_seq_len == export_max)  # ... and fits
        self.io_binding_enabled = io_binding
        self.vocab_size = self.config.vocab_size
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.metadata = meta
        self._tokenizer = None
        self._init_generate_lock()

        cfg = self.config
        n = cfg.n_layers
        self.past_names = self.past_names_for(n)
        self.present_names = [(f"present.{i}.key", f"present.{i}.value") for i in range(n)]
        self.kv_dtype = _ORT_TYPES[types[self.past_names[0][0]]]
        self.logits_dtype = _ORT_TYPES[types["logits"]]
        self._int_dtypes = {name: _ORT_TYPES[types[name]] for name in ("input_ids", "position_ids", "attention_mask")}

        # ---- buffers allocated once (their memory is what ORT reads and writes)
        region = max_batch * cfg.n_kv_heads * max_seq_len * cfg.head_dim  # one layer's keys (or values)
        n_storages = 1 if self.shared_kv else 2
        # [pingpong (plain graph) | 1 (shared), layer, k/v, ...]
        self._kv = torch.zeros(n_storages, n, 2, region, dtype=self.kv_dtype, device=self.device)
        self._logits = torch.zeros(max_batch, cfg.vocab_size, dtype=self.logits_dtype, device=self.device)
        self._logits_view, self._logits_rows = self._logits, 0  # the bound [B, V] view (none bound yet)
        flat = max_batch * max_seq_len
        self._ids = torch.zeros(flat, dtype=self._int_dtypes["input_ids"], device=self.device)
        self._pos = torch.zeros(flat, dtype=self._int_dtypes["position_ids"], device=self.device)
        self._mask = torch.zeros(flat, dtype=self._int_dtypes["attention_mask"], device=self.device)
        self._binder = _Binder(self.session, self.device) if io_binding else None
        # byte address of each (storage, layer, key/value) region: steps bind pointers, not new tensors
        el = self._kv.element_size()
        base = [self._kv[i].data_ptr() for i in range(n_storages)]
        self._kv_ptr = [
            [[base[st] + ((layer * 2 + w) * region) * el for w in (0, 1)] for layer in range(n)]
            for st in range(n_storages)
        ]
        self._kv_np = _NP_DTYPES[self.kv_dtype]
        # per storage holding the past: [(past name, its address), ...], [(present name, address in the other), ...]
        # (shared_kv: past and present of a layer at the same address)
        self._kv_binds = [
            (
                [(self.past_names[i][w], self._kv_ptr[st][i][w]) for i in range(n) for w in (0, 1)],
                [(self.present_names[i][w], self._kv_ptr[st if self.shared_kv else 1 - st][i][w])
                 for i in range(n) for w in (0, 1)],
                self._kv_np,
            )
            for st in range(n_storages)
        ]
        self._kv_bound: tuple[int, int] | None = None  # shared_kv: (storage, batch) the cache is bound to
        self._cur = 0  # which storage holds the current cache
        self._len = 0  # P: tokens in the cache
        self._batch = 0
        self._np_past: list[np.ndarray] | None = None  # io_binding=False: the cache as numpy arrays

    # ------------------------------------------------------------------ helpers
    def _check_graph(self, meta: dict[str, Any]) -> dict[str, str]:
        """``model.onnx``'s inputs and outputs are the ones ``decodekit.json`` describes: the names, one past/present
        pair per layer and no more, the vocabulary, KV heads and head size of the static dims, and dtypes this
        runtime binds. Returns ``{name: ORT type string}``. Runs before any buffer is allocated."""
        where = f"{self.model_dir}: model.onnx does not match {METADATA_FILE}"
        cfg = self.config
        ins = {x.name: x for x in self.session.get_inputs()}
        outs = {x.name: x for x in self.session.get_outputs()}
        need_in = {"input_ids", "position_ids", "attention_mask"} | {
            f"past_key_values.{i}.{kv}" for i in range(cfg.n_layers) for kv in ("key", "value")
        }
        need_out = {"logits"} | {f"present.{i}.{kv}" for i in range(cfg.n_layers) for kv in ("key", "value")}
        missing = sorted((need_in - set(ins)) | (need_out - set(outs)))
        if missing:
            raise UsageError(f"{where} (missing inputs/outputs {missing[:4]})")
        extra = sorted(n for n in (set(ins) - need_in) | (set(outs) - need_out))
        if extra:
            raise UsageError(f"{where} (unexpected inputs/outputs {extra[:4]}: config.n_layers={cfg.n_layers})")
        listed = sorted(set(self.input_names) ^ set(ins) | set(self.output_names) ^ set(outs))
        if listed:
            raise UsageError(f"{where} (inputs/outputs {listed[:4]} are in one but not the other)")
        types = {name: x.type for name, x in {**ins, **outs}.items()}
        unknown = sorted(n for n, t in types.items() if t not in _ORT_TYPES)
        if unknown:
            raise UsageError(f"{where} ({unknown[0]} has type {types[unknown[0]]}, which this runtime cannot bind)")

        def static(x: Any, axis: int) -> int | None:
            dim = x.shape[axis] if len(x.shape) > axis else None
            return dim if isinstance(dim, int) else None  # symbolic dims are strings (or None)

        logits = outs["logits"]
        if len(logits.shape) != 2:
            raise UsageError(f"{where} (logits has shape {logits.shape}; generation needs [batch, vocab])")
        if static(logits, 1) not in (None, cfg.vocab_size):
            raise UsageError(f"{where} (logits vocabulary {static(logits, 1)} != config.vocab_size {cfg.vocab_size})")
        kv_names = [n for pair in self.past_names_for(cfg.n_layers) for n in pair]
        kv_names += [n.replace("past_key_values.", "present.") for n in kv_names]
        for name in kv_names:
            x = ins.get(name) or outs[name]
            if len(x.shape) != 4:
                raise UsageError(f"{where} ({name} has shape {x.shape}; the KV cache is [batch, heads, seq, head_dim])")
            for axis, what, want in ((1, "KV heads", cfg.n_kv_heads), (3, "head size", cfg.head_dim)):
                got = static(x, axis)
                if got not in (None, want):
                    attr = "n_kv_heads" if axis == 1 else "head_dim"
                    raise UsageError(f"{where} ({name} has {got} {what}, config.{attr} is {want})")
        dtypes = {_ORT_TYPES[types[n]] for n in kv_names + ["logits"]}
        if len(dtypes) != 1:
            raise UsageError(f"{where} (the KV cache and logits have different dtypes {sorted(map(str, dtypes))})")
        want_dtype = meta.get("dtype")
        got_dtype = str(dtypes.pop()).removeprefix("torch.")
        if want_dtype is not None and want_dtype != got_dtype:
            raise UsageError(f"{where} (the graph computes in {got_dtype}, {METADATA_FILE} says {want_dtype!r})")
        return types

    @staticmethod
    def past_names_for(n_layers: int) -> list[tuple[str, str]]:
        return [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(n_layers)]

    def _check_memory(self, max_batch: int, max_seq_len: int, types: dict[str, str], *, from_metadata: bool) -> None:
        """Refuse buffers larger than the memory left on the device, before allocating them."""
        cfg = self.config
        kv_el = _ORT_TYPES[types["past_key_values.0.key"]].itemsize
        need = (1 if self.shared_kv else 2) * cfg.n_layers * 2 * max_batch * cfg.n_kv_heads * max_seq_len * \
            cfg.head_dim * kv_el
        need += max_batch * cfg.vocab_size * _ORT_TYPES[types["logits"]].itemsize
        need += sum(_ORT_TYPES[types[n]].itemsize for n in ("input_ids", "position_ids", "attention_mask")) * (
            max_batch * max_seq_len
        )
        avail = _available_memory(self.device)
        if avail is not None and need > avail:
            src = f" (from {METADATA_FILE})" if from_metadata else ""
            raise UsageError(
                f"max_batch={max_batch} and max_seq_len={max_seq_len}{src} need {_gib(need)} of KV cache and "
                f"buffers on {self.device.type}, more than the {_gib(avail)} available: lower max_batch or max_seq_len"
            )

    @property
    def tokenizer(self):  # noqa: ANN201 - a decodekit tokenizer, or None
        """The tokenizer copied into the export directory (loaded on first use); None when the export has none."""
        if self._tokenizer is None:
            from decodekit.models import load_tokenizer

            entry = self.metadata.get("tokenizer")
            if entry is None:
                return None
            # read_metadata checked the entry's shape: {"file": a name beside decodekit.json, "type": ...}
            file = self.model_dir / entry["file"]
            if not file.is_file():  # missing, or a pipe / device that reading would block on
                what = "is missing" if not os.path.lexists(file) else "is not a regular file"
                raise UsageError(f"tokenizer {file} named by {self.model_dir / METADATA_FILE} {what}")
            # the export directory itself: load_tokenizer reads decodekit.json's entry (file, type, BOS/EOS ids)
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def default_stop_ids(self) -> list[int]:
        return list(self.config.stop_ids or [self.config.eos_id])

    def kv_view(self, storage: int, layer: int, which: int, batch: int, length: int) -> torch.Tensor:
        """``[batch, H_kv, length, D]`` contiguous view of one layer's key (0) or value (1) region."""
        cfg = self.config
        if self.shared_kv:  # the first ``length`` slots of a [batch, H_kv, max_seq_len, D] buffer: a strided view
            n = batch * cfg.n_kv_heads * self.max_seq_len * cfg.head_dim
            full = self._kv[storage, layer, which, :n].view(batch, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
            return full[:, :, :length]
        n = batch * cfg.n_kv_heads * length * cfg.head_dim
        return self._kv[storage, layer, which, :n].view(batch, cfg.n_kv_heads, length, cfg.head_dim)

    # ------------------------------------------------------------------ StepModel
    def reset(self, batch_size: int) -> None:
        batch_size = check_reset_batch(batch_size, self.max_batch)
        self._batch, self._len, self._cur = batch_size, 0, 0
        self._np_past = None

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run ``S`` new tokens after the cache; return logits ``[B, V]`` (a view of the bound buffer).

        ``input_ids``/``position_ids`` are ``[B, S]``, ``attention_mask`` is ``[B, P+S]``. The returned tensor
        is overwritten by the next step.
        """
        b, s = input_ids.shape
        p = self._len
        if b != self._batch:
            raise UsageError(f"step got {b} rows after reset({self._batch})")
        if attention_mask.shape != (b, p + s) or position_ids.shape != (b, s):
            raise UsageError(
                f"step shapes do not match the cache: input_ids {tuple(input_ids.shape)}, position_ids "
                f"{tuple(position_ids.shape)}, attention_mask {tuple(attention_mask.shape)} with P={p}"
            )
        if p + s > self.max_seq_len:
            raise UsageError(f"{p + s} tokens exceed max_seq_len={self.max_seq_len}")
        if self.shared_kv and p > 0 and s > 1 and b > 1:
            raise UsageError(f"a step of {s} tokens after a cache of {p} needs batch 1 with a graph='gqa' export "
                             f"(GroupQueryAttention's rule), got batch {b}; export with graph='plain' for that")
        if not self.io_binding_enabled:
            return self._step_numpy(input_ids, position_ids, attention_mask)

        bind = self._binder
        bind.input("input_ids", self._staged(input_ids, self._ids, "input_ids"))
        bind.input("position_ids", self._staged(position_ids, self._pos, "position_ids"))
        bind.input("attention_mask", self._staged(attention_mask, self._mask, "attention_mask"))
        return self._run_bound(b, p, s)

    def _run_bound(self, b: int, p: int, s: int) -> torch.Tensor:
        """Bind the cache and the logits for a step of ``s`` tokens after ``p`` on ``b`` rows (the three inputs are
        bound), run the graph, advance the cache; return the logits view."""
        bind = self._binder
        cfg = self.config
        if self.shared_kv:
            # one buffer per cache tensor, past == present, bound again only when the batch or the storage changed
            # (a new generation, reorder_cache): the op writes slots [P, P+S) in place, nothing is copied
            if self._kv_bound != (self._cur, b):
                shape = (b, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
                bind.kv(self._kv_binds[self._cur], shape, shape)
                self._kv_bound = (self._cur, b)
        else:
            past_shape = (b, cfg.n_kv_heads, p, cfg.head_dim)
            present_shape = (b, cfg.n_kv_heads, p + s, cfg.head_dim)
            bind.kv(self._kv_binds[self._cur], past_shape, present_shape)
        if self._logits_rows != b:  # one view per batch size, bound once: the loop sees the same tensor every step
            self._logits_view, self._logits_rows = self._logits[:b], b
            bind.output("logits", self._logits_view)
        logits = self._logits_view
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the input copies above must land before ORT reads them
        bind.run()
        if not self.shared_kv:
            self._cur = 1 - self._cur
        self._len = p + s
        return logits

    def decode_stepper(
        self, next_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> Callable[[int], torch.Tensor] | None:
        """A cheaper :meth:`step` for a decode loop whose one-token steps read fixed buffers.

        ``next_ids`` int64 ``[B, 1]`` (the token each row feeds next, rewritten in place by the loop), ``positions``
        and ``attention_mask`` int64 ``[B, N]`` (every slot the generation can reach; not changed during it).
        ``stepper(total)`` is ``step(next_ids, positions[:, total - 1 : total], attention_mask[:, :total])`` for
        ``total = P + 1`` after :meth:`reset` and a prefill of ``B`` rows, and returns the same logits view.
        ``next_ids`` and ``attention_mask`` are read at every step, ``positions`` once, here (copied slot-major, so
        each step's column is contiguous). The addresses are worked out once, so a step binds two pointers and
        runs: with this and the greedy loop's cheaper checks, stories260K's loop time per token (outside ORT) went
        from about 18 to about 7 microseconds at B = 1 (``bench_peers``' ``host_us_per_step``, fused graph, one run
        on this shared machine).

        Returns None where that does not apply (no IO binding, a CUDA session, a graph whose ids are not int64,
        buffers of other types or devices, or an object whose ``step`` was replaced: a subclass or wrapper that
        post-processes the logits keeps its ``step``): the loop then calls :meth:`step`.
        """
        if getattr(self.step, "__func__", None) is not OnnxDecoder.step:
            return None
        if (self._binder is None or self.device.type != "cpu" or next_ids.dim() != 2
                or any(t.dtype != torch.int64 or t.device != self.device for t in (next_ids, positions, attention_mask))
                or any(self._int_dtypes[n] != torch.int64 for n in ("input_ids", "position_ids", "attention_mask"))):
            return None
        b, n = attention_mask.shape
        if next_ids.shape != (b, 1) or positions.shape != (b, n) or not next_ids.is_contiguous():
            return None
        pos_t = torch.empty(n, b, dtype=torch.int64).copy_(positions.T)  # [N, B]: a step's column is contiguous
        mask = attention_mask.contiguous()
        # B > 1: a step's [B, total] mask is staged row after row (the rows of [B, N] are N apart); B == 1 reads
        # the prefix of the one row in place
        stage = np.empty(b * n, dtype=np.int64) if b > 1 else None
        mask_np = mask.numpy()
        raw, i64, one = self._binder.raw, np.int64, (b, 1)
        ids_ptr, pos_ptr, row_bytes, mask_ptr = next_ids.data_ptr(), pos_t.data_ptr(), 8 * b, mask.data_ptr()
        limit = min(n, self.max_seq_len)

        def stepper(total: int) -> torch.Tensor:
            p = self._len
            if total != p + 1 or p == 0 or total > limit or self._batch != b:
                raise UsageError(f"decode_stepper: step to {total} tokens after a cache of {p} on {self._batch} rows "
                                 f"(it runs one token after a prefill of {b} rows, up to {limit} tokens)")
            raw("input_ids", i64, one, ids_ptr, False)
            raw("position_ids", i64, one, pos_ptr + (total - 1) * row_bytes, False)
            if stage is None:
                raw("attention_mask", i64, (1, total), mask_ptr, False)
            else:
                np.copyto(stage[: b * total].reshape(b, total), mask_np[:, :total])
                raw("attention_mask", i64, (b, total), stage.ctypes.data, False)
            return self._run_bound(b, p, 1)

        stepper.buffers = (next_ids, pos_t, mask, stage)  # ORT reads them by address: they live as long
        return stepper

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Make row ``i`` of the cache the old row ``index[i]`` (beam search; also ``B`` prompt rows -> ``B * N``
        beam rows after the prefill). ``index`` int64 ``[B']`` on the decoder's device, ``1 <= B' <= max_batch``.

        With IO binding this is one gather per layer's keys and values from the storage holding the cache into
        the other ping-pong storage (``torch.index_select(..., out=)`` into its preallocated region: nothing is
        allocated), which then holds the cache; the next step reads its past from there. A ``graph="gqa"`` export
        has one storage: each layer's selected rows are gathered into a temporary and written back in place.
        """
        n = index.shape[0] if index.dim() == 1 else -1
        if index.dtype != torch.int64 or not 1 <= n <= self.max_batch or index.device != self.device:
            raise UsageError(f"reorder_cache: index must be an int64 [B'] tensor on {self.device} with "
                             f"1 <= B' <= max_batch={self.max_batch}, got {index.dtype} {tuple(index.shape)}")
        if index.device.type == "cpu" and not 0 <= int(index.min()) <= int(index.max()) < self._batch:
            raise UsageError(f"reorder_cache: index values must be rows in [0, {self._batch}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        if not self.io_binding_enabled:
            if self._np_past is not None:
                idx = index.cpu().numpy()
                self._np_past = [np.ascontiguousarray(a[idx]) for a in self._np_past]
            self._batch = n
            return
        if self.shared_kv:  # one storage: each layer's rows gathered out (a small copy), then written back in place
            for layer in range(self.config.n_layers):
                for which in (0, 1):
                    rows = self.kv_view(0, layer, which, self._batch, self._len).index_select(0, index)
                    self.kv_view(0, layer, which, n, self._len).copy_(rows)
            self._batch = n  # a new batch size binds the buffer again (step)
            return
        src, dst = self._cur, 1 - self._cur
        for layer in range(self.config.n_layers):
            for which in (0, 1):
                torch.index_select(self.kv_view(src, layer, which, self._batch, self._len), 0, index,
                                   out=self.kv_view(dst, layer, which, n, self._len))
        self._cur, self._batch = dst, n

    def _staged(self, t: torch.Tensor, buf: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` itself when ORT can read it in place (contiguous, the graph's dtype, on the session's device: it
        outlives the run, which is synchronous), else a copy in the preallocated ``buf``."""
        if t.device == self.device and t.dtype == self._int_dtypes[name] and t.is_contiguous():
            return t
        staged = buf[: t.numel()].view(t.shape)
        staged.copy_(t)
        return staged

    def _step_numpy(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The plain ``session.run`` path: numpy in, numpy out, the cache round-trips through numpy."""
        b, s = input_ids.shape
        cfg = self.config
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.cpu().numpy().astype(_NP_DTYPES[self._int_dtypes["input_ids"]]),
            "position_ids": position_ids.cpu().numpy().astype(_NP_DTYPES[self._int_dtypes["position_ids"]]),
            "attention_mask": attention_mask.cpu().numpy().astype(_NP_DTYPES[self._int_dtypes["attention_mask"]]),
        }
        if self._np_past is None:
            empty = np.zeros((b, cfg.n_kv_heads, 0, cfg.head_dim), dtype=_NP_DTYPES[self.kv_dtype])
            self._np_past = [empty] * (2 * cfg.n_layers)
        for i, (kname, vname) in enumerate(self.past_names):
            feeds[kname], feeds[vname] = self._np_past[2 * i], self._np_past[2 * i + 1]
        wanted = ["logits"] + [n for pair in self.present_names for n in pair]
        outs = self.session.run(wanted, feeds)
        self._np_past = outs[1:]
        self._len += s
        return torch.from_numpy(outs[0]).to(self.device)
