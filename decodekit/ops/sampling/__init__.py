"""Fused sampling from logits: the public functions (validation + dispatch).

``sample`` (Hugging Face ``generate`` semantics), ``sampling_probs`` (its filtered distribution),
``sample_logits`` (the TTS sampler, exactly) and ``sampler_simple_batch``; for diffusion language models
``sample_block`` (every masked position of a block, with a confidence), ``select_positions`` and
``transfer_schedule``; ``rwkv_sample_logits`` (the rwkv package's sampler). Every function validates its
arguments here, then runs the Triton kernels of :mod:`decodekit.ops.sampling.triton` (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) or the vectorized PyTorch path of :mod:`decodekit.ops.sampling.cpu`.
The plain-PyTorch semantics they are tested against live in :mod:`decodekit.ops.sampling.reference`.
Triton is imported on the first kernel launch only.

Each public function validates what is known at trace time and calls its ``torch.ops.decodekit.*`` custom op
(:mod:`decodekit.ops._library`), so every one of them compiles with ``torch.compile(fullgraph=True)``; the
checks that read tensor values (CPU per-row parameter ranges, ``check=True``) run inside the ops.
"""

from __future__ import annotations

import math

import torch

from decodekit.ops._dispatch import FLOAT_DTYPES, check_tensor, resolve_backend
from decodekit.ops._library import call, compiling, custom_op, direct, fake_rows, join_params, split_params
from decodekit.ops.sampling import cpu as _st

__all__ = ["sample", "sampling_probs", "sample_logits", "sampler_simple_batch"]


def _kernels():
    """The Triton module, imported on first use (Triton is optional on CPU-only machines)."""
    from decodekit.ops.sampling import triton as kernels

    return kernels


# --------------------------------------------------------------------------- argument handling

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
Param = float | int | torch.Tensor


def _row_param(
    name: str, value: Param, B: int, device: torch.device, op: str, *, integer: bool = False,
    lo: float | None = None, lo_open: bool = False, hi: float | None = None,
) -> float | int | torch.Tensor:
    """Validate a scalar or per-row [B] parameter at trace time: a Python scalar is checked in Python and returned
    as a Python number (int for ``integer``); a tensor is checked for shape, dtype and device and returned as is.

    The values of a parameter tensor are checked (CPU tensors only: reading a device tensor would synchronize)
    and converted by :func:`_row_tensor` inside the custom op's implementation, so that the same ``ValueError``
    is raised in eager and in compiled code without a Python branch on tensor data in the traced region.
    """
    if isinstance(value, torch.Tensor):
        t = value
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
            raise ValueError(f"{op}: {name} must be a scalar or a [B] tensor with B={B}, got shape {tuple(t.shape)}")
        if integer and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
        if not integer and not (t.is_floating_point() or t.dtype in _INT_DTYPES):
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits are on {device}")
        return t
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        want = "an int" if integer else "a float"
        raise TypeError(f"{op}: {name} must be {want} or a [B] tensor, got {type(value).__name__}")
    v = float(value)
    if not -math.inf < v < math.inf:  # comparisons, not math.isfinite: v is a symbolic float under dynamic compile
        raise ValueError(f"{op}: {name} must be finite")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{op}: {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{op}: {name} must be <= {hi}, got {v}")
    if integer:
        return int(value)
    return _FP32_TINY if 0 < v < _FP32_TINY else v


def _row_tensor(
    name: str, value: float | int | torch.Tensor, B: int, op: str, *, integer: bool = False,
    lo: float | None = None, lo_open: bool = False, hi: float | None = None,
) -> float | int | torch.Tensor:
    """Inside a custom op: range-check a parameter tensor that lives on the CPU (device tensors are not read: that
    would synchronize, so out-of-range values there are the caller's responsibility) and return it as fp32 [B].
    Python scalars (checked by :func:`_row_param`) pass through."""
    if not isinstance(value, torch.Tensor):
        return value
    t = value
    if t.device.type == "cpu" and t.numel():
        vals = t.to(torch.float64)
        if not bool(torch.isfinite(vals).all()):
            raise ValueError(f"{op}: {name} must be finite")
        if lo is not None and (bool((vals <= lo).any()) if lo_open else bool((vals < lo).any())):
            raise ValueError(f"{op}: {name} must be {'>' if lo_open else '>='} {lo}, got {_show(vals)}")
        if hi is not None and bool((vals > hi).any()):
            raise ValueError(f"{op}: {name} must be <= {hi}, got {_show(vals)}")
    t32 = t.to(torch.float32)
    if not integer:  # a positive value must stay positive in fp32 (a top_p of 1e-46 is not "off")
        t32 = torch.where((t > 0) & (t32 == 0), _FP32_TINY, t32)
    return t32.reshape(-1).expand(B)


_FP32_TINY = float(torch.finfo(torch.float32).smallest_normal)  # positive parameters are at least this in fp32


def _column(v: float | int | torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    """A validated parameter as an fp32 [B] tensor (for the packed kernel parameters)."""
    return v if isinstance(v, torch.Tensor) else torch.full((B,), float(v), dtype=torch.float32, device=device)


def _show(vals: torch.Tensor) -> str:
    return str(vals.item()) if vals.numel() == 1 else f"values in [{vals.min().item()}, {vals.max().item()}]"


def _check_logits(logits: object, op: str) -> torch.Tensor:
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    assert isinstance(logits, torch.Tensor)
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"{op}: logits must have at least one column, got shape {tuple(logits.shape)}")
    if V >= 2**31:
        raise ValueError(f"{op}: logits has V={V} columns; token ids must fit int32 (V < 2**31)")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(f"{op}: logits must have a contiguous last dim (stride 1), got strides {logits.stride()}")
    return logits


def _check_seed(seed: object, B: int, device: torch.device, op: str) -> int | torch.Tensor | None:
    """Validate ``seed``; return it as None, a Python int, or an int64 tensor (0-dim/[1]: shared, or [B])."""
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{op}: seed must be an int64 tensor, got {seed.dtype}")
        if seed.device != device:
            raise ValueError(f"{op}: seed is on {seed.device} but logits are on {device}")
        if not (seed.dim() == 0 or (seed.dim() == 1 and (seed.shape[0] == B or seed.shape[0] == 1))):
            raise ValueError(
                f"{op}: seed must be an int or an int64 [B] tensor with B={B}, got shape {tuple(seed.shape)}"
            )
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, an int64 [B] tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
    return seed


def _draw_seed(seed: int | torch.Tensor | None, device: torch.device) -> int | torch.Tensor:
    """``seed=None``: one seed from torch's default generator (on the device: no synchronization)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64) if seed is None else seed


def _seeds(seed: int | torch.Tensor | None, B: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Kernel form of a checked seed: per-row int64 seeds and the row-key multiplier (1: a shared seed, rows
    keyed by their index; 0: per-row seeds, the row index is not part of the key)."""
    seed = _draw_seed(seed, device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 or (seed.shape[0] == 1 and B != 1):
            return seed.reshape(1).expand(B).contiguous(), 1
        return seed.contiguous(), 0
    return torch.full((B,), seed, dtype=torch.int64, device=device), 1


def _torch_seed(seed: int | torch.Tensor | None, B: int, device: torch.device) -> _st.Seed:
    """PyTorch-path form of a checked seed (the same seed and row keys as :func:`_seeds`)."""
    seed = _draw_seed(seed, device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 or (seed.shape[0] == 1 and B != 1):
            seed = seed.reshape(1)
            return _st.Seed(int(seed) if device.type == "cpu" else seed.expand(B), 1)
        return _st.Seed(seed, 0)
    return _st.Seed(seed, 1)


def _check_counts(token_counts: object, logits: torch.Tensor, op: str) -> torch.Tensor | None:
    if token_counts is None:
        return None
    check_tensor("token_counts", token_counts, ndim=2, dtypes=_INT_DTYPES, device=logits.device, op=op)
    assert isinstance(token_counts, torch.Tensor)
    if token_counts.shape != logits.shape:
        raise ValueError(f"{op}: token_counts must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(token_counts.shape)}")
    if token_counts.shape[1] > 1 and token_counts.stride(1) != 1:
        raise ValueError(f"{op}: token_counts must have a contiguous last dim")
    return token_counts


def _scalar(v: Param) -> float | None:
    return None if isinstance(v, torch.Tensor) else float(v)


def _npass(temperature: Param, top_k: Param, top_p: Param, *, tts: bool, greedy_top1: bool) -> int:
    """Search launches: 0 when no row can need a search (known from Python scalars), else 8 per phase."""
    t, k, p = _scalar(temperature), _scalar(top_k), _scalar(top_p)
    if t == 0.0 or (greedy_top1 and k == 1.0):
        return 0
    k_off = k is not None and k <= 0
    p_off = p is not None and (p >= 1.0 or p <= 0.0)
    if k_off and p_off:
        return 0
    if tts or k_off or p_off:
        return _PASSES_PER_PHASE
    return 2 * _PASSES_PER_PHASE


_PASSES_PER_PHASE = 8


_PARAM_ORDER = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")  # the packed kernel columns P_TEMP .. P_FREQ; the op schemas' parameter slots

_BOUNDS: dict[str, dict[str, bool | float]] = {  # the valid range of every per-row parameter
    "temperature": dict(lo=0.0),
    "top_k": dict(integer=True, lo=0.0),
    "top_p": dict(lo=0.0, lo_open=True, hi=1.0),
    "min_p": dict(lo=0.0, hi=1.0),
    "repetition_penalty": dict(lo=0.0, lo_open=True),
    "presence_penalty": {},
    "frequency_penalty": {},
    "noise": dict(lo=0.0),
    "temp": dict(lo=0.0),
}


def _bounds(name: str, tts: bool) -> dict[str, bool | float]:
    return {} if tts and name == "top_p" else _BOUNDS[name]  # the TTS sampler: top_p <= 0 or >= 1 is "off"


def _filter_setup(
    op: str, logits: object, temperature: Param, top_k: Param, top_p: Param, min_p: Param,
    repetition_penalty: Param, presence_penalty: Param, frequency_penalty: Param, token_counts: object,
    *, tts: bool,
) -> tuple[torch.Tensor, dict[str, float | int | torch.Tensor], torch.Tensor | None]:
    """Validate everything that is known at trace time; return (logits, parameters by name, token_counts)."""
    logits = _check_logits(logits, op)
    B, _ = logits.shape
    dev = logits.device
    given = (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    key = None
    if not any(isinstance(v, torch.Tensor) for v in given) and not compiling():
        # Python scalars only (a server's usual call): their checked values depend on nothing else, so they are
        # checked once per distinct setting (a small call spends more time here than in the sampler itself)
        key = (op, tts, *((type(v), v) for v in given))
        prm = _SCALAR_PARAMS.get(key)
        if prm is not None:
            return logits, prm, _check_counts(token_counts, logits, op)
    prm = {name: _row_param(name, v, B, dev, op, **_bounds(name, tts)) for name, v in zip(_PARAM_ORDER, given)}
    if key is not None:
        if len(_SCALAR_PARAMS) >= 256:
            _SCALAR_PARAMS.clear()
        _SCALAR_PARAMS[key] = prm
    counts = _check_counts(token_counts, logits, op)
    return logits, prm, counts


#: checked scalar parameters by (op, tts, (type, value) of each); values are never mutated by their users
_SCALAR_PARAMS: dict[tuple, dict[str, float | int | torch.Tensor]] = {}


def _op_params(prm: dict[str, float | int | torch.Tensor], names: tuple[str, ...] = _PARAM_ORDER):
    """The checked parameters in an op schema's form: ``(scalars, tensors)`` (see :func:`split_params`)."""
    return split_params([prm[n] for n in names])


def _finish_params(
    scalars: list[float], tensors: list[torch.Tensor | None], B: int, op: str, *, tts: bool,
    names: tuple[str, ...] = _PARAM_ORDER,
) -> dict[str, float | int | torch.Tensor]:
    """Inside an op: the parameters by name, per-row tensors range-checked (CPU) and made fp32 [B]."""
    if not any(t is not None for t in tensors):  # Python scalars only (checked at trace time): nothing to convert
        return {n: int(v) if n in _INTEGER else v for n, v in zip(names, scalars)}
    vals = join_params(scalars, tensors, [n in _INTEGER for n in names])
    return {n: _row_tensor(n, v, B, op, **_bounds(n, tts)) for n, v in zip(names, vals)}


_INTEGER = frozenset(n for n, b in _BOUNDS.items() if b.get("integer"))


def _seed_args(seed: int | torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """A checked seed in an op schema's form ``(tensor or None, int)``. ``None`` draws the seed here, from torch's
    default generator on the device (no synchronization; under ``torch.compile`` a random op of the graph)."""
    seed = _draw_seed(seed, device)
    return (seed, 0) if isinstance(seed, torch.Tensor) else (None, seed)


#: packed kernel parameters of settings given as Python scalars, by (device, B, values): a decode loop samples with
#: the same settings at every step, and packing them is a dozen small device ops (on CUDA, host time per call).
#: The tensors are only ever read. Not used at all during a CUDA-graph capture: a captured graph must own its
#: parameters (a cached tensor could be freed by the clearing that bounds the cache while the graph still reads it).
_PACKED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_PACKED_MAX = 64


def _pack(
    prm: dict[str, float | int | torch.Tensor], B: int, device: torch.device, noise: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels' parameters: fp32 ``[B, NPARAM]`` (the columns of ``triton.KERNEL_PARAMS``) and the
    int32 ``[B]`` top-k (0: off)."""
    vals = tuple(prm[name] for name in _PARAM_ORDER)
    scalar = not any(isinstance(v, torch.Tensor) for v in (*vals, noise))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device, B, vals, noise) if scalar and not capturing else None
    if key is not None and (hit := _PACKED.get(key)) is not None:
        return hit
    cols = {name: _column(v, B, device) for name, v in zip(_PARAM_ORDER, vals, strict=True)}
    cols["noise"] = _column(noise, B, device)
    params = torch.stack([cols[name] for name in _kernels().KERNEL_PARAMS], dim=1)
    topk = cols["top_k"].clamp(0, 2**31 - 1).to(torch.int32)  # exact: validated integers
    if key is not None:
        if len(_PACKED) >= _PACKED_MAX:
            _PACKED.clear()
        _PACKED[key] = (params, topk)
    return params, topk


def _row_params(
    prm: dict[str, float | int | torch.Tensor], counts: torch.Tensor | None, *, tts: bool, greedy_top1: bool
) -> _st.RowParams:
    k = prm["top_k"]
    return _st.RowParams(
        temperature=prm["temperature"], top_k=k.to(torch.int64) if isinstance(k, torch.Tensor) else k,
        top_p=prm["top_p"], min_p=prm["min_p"], repetition_penalty=prm["repetition_penalty"],
        presence_penalty=prm["presence_penalty"], frequency_penalty=prm["frequency_penalty"], token_counts=counts,
        tts=tts, greedy_top1=greedy_top1,
    )


# --------------------------------------------------------------------------- custom ops
# torch.ops.decodekit.*: the public functions below validate (at trace time under torch.compile) and call these;
# the implementations run the Triton kernels or the PyTorch path and do every check that reads tensor values.


def _host_lane(logits: torch.Tensor, rp: _st.RowParams, path: str, *tensors: torch.Tensor | int | None) -> bool:
    """The public function runs the op's NumPy path itself (the implementation ``call`` would run, minus the
    layers between; a decode step's sampler is mostly those layers at B = 1 and a small vocabulary) where the
    op's PyTorch path would take it (:func:`~decodekit.ops.sampling.cpu.host_eligible`) and ``call`` would run
    the implementation directly."""
    return path == "torch" and _st.host_eligible(logits, rp) and direct((logits, *tensors))


def _checked_seed(seed: torch.Tensor | None, seed_int: int) -> int | torch.Tensor:
    return seed if seed is not None else seed_int


@custom_op("sample")
def _sample_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], token_counts: torch.Tensor | None,
    seed: torch.Tensor | None, seed_int: int, npass: int, return_logprobs: bool, check: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.decodekit.sample``: tokens int64 [B] and logprobs fp32 [B] (``[0]`` unless asked for)."""
    op = "sample"
    B, _ = logits.shape
    dev = logits.device
    prm = _finish_params(scalars, tensors, B, op, tts=False)
    sd = _checked_seed(seed, seed_int)
    if backend == "triton":
        seeds, mult = _seeds(sd, B, dev)
        tokens, logprobs = _kernels().run(logits, *_pack(prm, B, dev), seeds, mult, token_counts, tts=False,
                                          greedy_top1=True, npass=npass, mode="sample")
    else:
        tokens, logprobs = _st.sample_torch(logits, _row_params(prm, token_counts, tts=False, greedy_top1=True),
                                            _torch_seed(sd, B, dev), logprobs=return_logprobs)
    if check:
        bad = (tokens < 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{op}: logits rows {bad} are all -inf or contain NaN/+inf")
    if not return_logprobs or logprobs is None:
        logprobs = torch.empty(0, dtype=torch.float32, device=dev)
    return tokens, logprobs


@_sample_op.register_fake
def _(logits, scalars, tensors, token_counts, seed, seed_int, npass, return_logprobs, check, backend):
    tokens, logprobs = fake_rows(logits, torch.int64, torch.float32)
    return tokens, (logprobs if return_logprobs else logits.new_empty(0, dtype=torch.float32))


@custom_op("sampling_probs")
def _sampling_probs_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], token_counts: torch.Tensor | None,
    npass: int, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.sampling_probs``: fp32 [B, V]."""
    B, _ = logits.shape
    prm = _finish_params(scalars, tensors, B, "sampling_probs", tts=False)
    if backend == "triton":
        no_seeds = torch.zeros(B, dtype=torch.int64, device=logits.device)  # nothing is drawn
        return _kernels().run(logits, *_pack(prm, B, logits.device), no_seeds, 0, token_counts, tts=False,
                              greedy_top1=True, npass=npass, mode="probs")
    return _st.sampling_probs_torch(logits, _row_params(prm, token_counts, tts=False, greedy_top1=True))


@_sampling_probs_op.register_fake
def _(logits, scalars, tensors, token_counts, npass, backend):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _tts_impl(logits, scalars, tensors, seed, seed_int, npass, backend, *, probs: bool) -> torch.Tensor:
    op = "sample_logits"
    B, _ = logits.shape
    dev = logits.device
    prm = _finish_params(scalars, tensors, B, op, tts=True)
    if backend == "triton":
        seeds, mult = _seeds(_checked_seed(seed, seed_int), B, dev)
        out = _kernels().run(logits, *_pack(prm, B, dev), seeds, mult, None, tts=True, greedy_top1=False, npass=npass,
                             mode="probs" if probs else "sample")
        return out if probs else out[0]
    rp = _row_params(prm, None, tts=True, greedy_top1=False)
    if probs:
        return _st.sampling_probs_torch(logits, rp)
    return _st.sample_torch(logits, rp, _torch_seed(_checked_seed(seed, seed_int), B, dev), logprobs=False)[0]


@custom_op("sample_logits")
def _sample_logits_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], seed: torch.Tensor | None,
    seed_int: int, npass: int, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.sample_logits``: tokens int64 [B] (the public function adds the trailing dim)."""
    return _tts_impl(logits, scalars, tensors, seed, seed_int, npass, backend, probs=False)


@_sample_logits_op.register_fake
def _(logits, scalars, tensors, seed, seed_int, npass, backend):
    return fake_rows(logits, torch.int64)[0]


@custom_op("sample_logits_probs")
def _sample_logits_probs_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], npass: int, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.sample_logits_probs``: fp32 [B, V]."""
    return _tts_impl(logits, scalars, tensors, None, 0, npass, backend, probs=True)


@_sample_logits_probs_op.register_fake
def _(logits, scalars, tensors, npass, backend):
    return logits.new_empty(logits.shape, dtype=torch.float32)


_SIMPLE_PARAMS = ("noise", "temp")


@custom_op("sampler_simple_batch")
def _sampler_simple_batch_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], seed: torch.Tensor | None,
    seed_int: int, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.sampler_simple_batch``: tokens int64 [B]."""
    B, _ = logits.shape
    dev = logits.device
    prm = _finish_params(scalars, tensors, B, "sampler_simple_batch", tts=False, names=_SIMPLE_PARAMS)
    noise_v, temp_v = prm["noise"], prm["temp"]
    sd = _checked_seed(seed, seed_int)
    if backend == "triton":
        seeds, mult = _seeds(sd, B, dev)
        off = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        params = _pack({"temperature": temp_v, **off}, B, dev, noise=noise_v)
        tokens, _ = _kernels().run(logits, *params, seeds, mult, None, tts=True, greedy_top1=False, npass=0,
                                   mode="simple")
        return tokens
    return _st.simple_batch_torch(logits, noise_v, temp_v, _torch_seed(sd, B, dev))


@_sampler_simple_batch_op.register_fake
def _(logits, scalars, tensors, seed, seed_int, backend):
    return fake_rows(logits, torch.int64)[0]


# --------------------------------------------------------------------------- public API


def sample(
    logits: torch.Tensor,
    *,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    repetition_penalty: Param = 1.0,
    presence_penalty: Param = 0.0,
    frequency_penalty: Param = 0.0,
    token_counts: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    return_logprobs: bool = False,
    check: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row, Hugging Face ``generate`` semantics and order, without sorting the vocabulary.

    Parameters
    ----------
    logits : Tensor ``[B, V]``, fp32 / fp16 / bf16, last dim contiguous, any row stride.
    temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty :
        Python scalars (broadcast) or per-row ``[B]`` tensors on the logits' device. Order: repetition penalty
        (a seen token's logit is divided by the penalty if positive, multiplied if negative), presence /
        frequency penalties (``logit - presence * [count > 0] - frequency * count``), temperature, top-k
        (``0`` = off; keeps every token tying the k-th), top-p in ``(0, 1]`` on the distribution renormalized
        after top-k (keeps the tokens whose strictly-higher mass is below ``top_p``: the smallest top set
        reaching ``top_p``, whole tie groups at the boundary), min-p (drops ``p < min_p * p_max``).
        ``temperature == 0`` or ``top_k == 1`` is greedy: argmax, lowest index on ties.
    token_counts : int Tensor ``[B, V]``, how often each token already occurred (for the penalties).
    seed : int, int64 ``[B]`` tensor or None.
        With an int, row ``i`` draws from the stream keyed by ``(seed, i)``; with a ``[B]`` tensor each row
        draws from its own seed only, so a row's token does not depend on the batch size or its position
        (the tensor may live on the GPU: no host synchronization, CUDA-graph safe). ``None`` draws a seed
        from torch's default generator (on the device, no synchronization; under ``torch.compile`` this is a
        random op of the graph, drawn anew on every call: ``aot_eager`` draws it exactly as eager does,
        inductor from its own generator stream, so the same ``torch.manual_seed`` gives other tokens there
        unless ``torch._inductor.config.fallback_random = True``; pass seeds for reproducible compiled code).
    return_logprobs : also return the fp32 ``[B]`` log-probabilities of the drawn tokens under the final
        filtered, renormalized distribution (0 for greedy rows).
    check : raise ``ValueError`` naming the rows that are all ``-inf`` or hold a NaN / ``+inf`` instead of
        returning ``-1`` for them. ``check`` means the same in every decodekit op: inspect tensor *values* on
        the host and raise ``ValueError``. The check runs inside the ``torch.ops.decodekit.sample`` custom op,
        so a compiled function (``fullgraph=True``, no graph break) raises the same ``ValueError``; it
        synchronizes with the host, so leave it off inside a captured CUDA graph.
    backend : ``"auto"`` (CUDA -> Triton kernel, CPU -> PyTorch path), ``"triton"`` or ``"torch"``.

    Returns
    -------
    tokens : int64 ``[B]`` (``-1`` for a bad row), and ``logprobs`` fp32 ``[B]`` when asked (NaN for a bad row).

    Notes
    -----
    Deterministic for a given seed on each path. The two paths keep exactly the same set of tokens with the
    same probabilities (:func:`sampling_probs` agrees, greedy rows give the same token), but they use different
    random streams: the Triton kernel runs an exponential race over Philox uniforms (``tl.rand``), the PyTorch
    path an inverse-CDF draw with one counter-based uniform per row (cheaper on a CPU, where the race's
    per-token random numbers cost more than the whole filter). So the same seed gives equally distributed,
    not identical, tokens on CPU and GPU. Both are batch invariant with per-row seeds.
    A ``logits / temperature`` that overflows makes the row greedy (the limit ``T -> 0``); a large common
    offset in the logits does not change the distribution. Per-row parameter tensors on a GPU are not
    range-checked (that would synchronize); on the CPU they are, inside the op (the same ``ValueError`` in
    compiled code).

    ``torch.compile``: the call is one ``torch.ops.decodekit.sample`` node (``fullgraph=True`` works); types,
    shapes and Python scalars are checked while tracing (a bad one fails the compilation with the eager
    message), tensor values at run time. CUDA graphs: with per-row seeds (or an int seed) and ``check=False``
    the Triton path makes no host synchronization, so a decode step that ends in ``sample`` can be captured
    and replayed with new logits and seeds (``bench/gpu_cuda_graph.py`` checks it on a GPU).

    Example
    -------
    >>> logits = torch.randn(4, 32000)
    >>> sample(logits, temperature=0.8, top_k=40, top_p=0.95, seed=0).shape
    torch.Size([4])
    """
    op = "sample"
    logits, prm, counts = _filter_setup(op, logits, temperature, top_k, top_p, min_p, repetition_penalty,
                                        presence_penalty, frequency_penalty, token_counts, tts=False)
    B, _ = logits.shape
    dev = logits.device
    seed = _check_seed(seed, B, dev, op)
    path = resolve_backend(backend, dev, op)
    return_logprobs = bool(return_logprobs)
    if B == 0:
        tokens, logprobs = torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, device=dev)
    else:
        npass = _npass(temperature, top_k, top_p, tts=False, greedy_top1=True) if path == "triton" else 0
        rp = _row_params(prm, counts, tts=False, greedy_top1=True) if path == "torch" and not check else None
        if rp is not None and _host_lane(logits, rp, path, seed, counts):
            tokens, logprobs = _st.host_sample(logits, rp, _torch_seed(seed, B, dev), return_logprobs)
            return (tokens, logprobs) if return_logprobs else tokens
        tokens, logprobs = call("sample", logits, *_op_params(prm), counts, *_seed_args(seed, dev), npass,
                                                      return_logprobs, bool(check), path)
    return (tokens, logprobs) if return_logprobs else tokens


def sampling_probs(
    logits: torch.Tensor,
    *,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    repetition_penalty: Param = 1.0,
    presence_penalty: Param = 0.0,
    frequency_penalty: Param = 0.0,
    token_counts: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The filtered, renormalized distribution of :func:`sample`: fp32 ``[B, V]``, zeros outside the kept set.

    Same arguments and semantics as :func:`sample` (greedy rows give a one-hot at the argmax; a bad row, all
    ``-inf`` or holding NaN / ``+inf``, gives zeros). For speculative decoding and logprobs. Not differentiable
    (a backward through it raises); one ``torch.ops.decodekit.sampling_probs`` node under ``torch.compile``.

    Example
    -------
    >>> probs = sampling_probs(torch.randn(2, 100), top_k=5)
    >>> (probs > 0).sum(dim=1)
    tensor([5, 5])
    """
    op = "sampling_probs"
    logits, prm, counts = _filter_setup(op, logits, temperature, top_k, top_p, min_p, repetition_penalty,
                                        presence_penalty, frequency_penalty, token_counts, tts=False)
    path = resolve_backend(backend, logits.device, op)
    if logits.shape[0] == 0:
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    npass = _npass(temperature, top_k, top_p, tts=False, greedy_top1=True) if path == "triton" else 0
    return call("sampling_probs", logits, *_op_params(prm), counts, npass, path)


def _sample_logits_impl(
    logits: torch.Tensor, temperature: Param, top_p: Param, top_k: Param, seed: int | torch.Tensor | None,
    backend: str, *, probs: bool,
) -> torch.Tensor:
    op = "sample_logits"
    logits, prm, _ = _filter_setup(op, logits, temperature, top_k, top_p, 0.0, 1.0, 0.0, 0.0, None, tts=True)
    B, _ = logits.shape
    dev = logits.device
    path = resolve_backend(backend, dev, op)
    seed = _check_seed(seed, B, dev, op)
    if B == 0:
        return torch.empty((0, logits.shape[1]) if probs else (0, 1), device=dev,
                           dtype=torch.float32 if probs else torch.int64)
    npass = _npass(temperature, top_k, top_p, tts=True, greedy_top1=False) if path == "triton" else 0
    rp = _row_params(prm, None, tts=True, greedy_top1=False) if path == "torch" and not probs else None
    if rp is not None and _host_lane(logits, rp, path, seed):
        return _st.host_sample(logits, rp, _torch_seed(seed, B, dev), False)[0][:, None]
    if probs:
        return call("sample_logits_probs", logits, *_op_params(prm), npass, path)
    return call("sample_logits", logits, *_op_params(prm), *_seed_args(seed, dev), npass, path)[:, None]


def sample_logits(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_p: Param = 0.85,
    top_k: Param = 0,
    *,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Drop-in replacement of the TTS ``sample_logits``: tokens int64 ``[B, 1]``.

    Exactly the reference's kept set (see :func:`decodekit.ops.sampling.reference.sample_logits_ref`): softmax of
    ``logits / temperature``; top-k on the probabilities keeps every token tying the k-th; top-p then runs on
    the post-top-k probabilities *without* renormalizing them and keeps a token iff the mass of the strictly
    higher tokens is ``<= top_p`` (the whole tie group at the boundary); ``top_p <= 0`` disables top-p;
    ``temperature == 0`` is greedy (argmax, lowest index on ties). The draw has the reference's distribution
    (an exponential race instead of ``torch.multinomial``). ``seed``/``backend`` as in :func:`sample`; a bad
    row gives ``-1``.

    Example
    -------
    >>> sample_logits(torch.randn(3, 1000), temperature=1.0, top_p=0.95, top_k=20, seed=1).shape
    torch.Size([3, 1])
    """
    return _sample_logits_impl(logits, temperature, top_p, top_k, seed, backend, probs=False)


def sample_logits_probs(
    logits: torch.Tensor, temperature: Param = 1.0, top_p: Param = 0.85, top_k: Param = 0, *, backend: str = "auto"
) -> torch.Tensor:
    """The final distribution of :func:`sample_logits` (fp32 ``[B, V]``), for tests and logprobs."""
    return _sample_logits_impl(logits, temperature, top_p, top_k, 0, backend, probs=True)


def sampler_simple_batch(
    logits: torch.Tensor,
    noise: Param = 1.0,
    temp: Param = 1.0,
    *,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """argmax of ``logits / temp + U[0, noise)`` per row -> int64 ``[B, 1]``.

    ``noise = 0`` (or ``temp = 0``) is plain greedy (lowest index on ties). ``seed`` as in :func:`sample`; the
    kernel uses Philox uniforms, the PyTorch path counter-based ones (same distribution, different streams).
    A row holding NaN or ``+inf``, or all ``-inf``, gives ``-1`` on both paths.

    Example
    -------
    >>> sampler_simple_batch(torch.randn(2, 50), noise=0.0).shape
    torch.Size([2, 1])
    """
    op = "sampler_simple_batch"
    logits = _check_logits(logits, op)
    B, V = logits.shape
    dev = logits.device
    prm = {"noise": _row_param("noise", noise, B, dev, op, **_BOUNDS["noise"]),
           "temp": _row_param("temp", temp, B, dev, op, **_BOUNDS["temp"])}
    seed = _check_seed(seed, B, dev, op)
    path = resolve_backend(backend, dev, op)
    if B == 0:
        return torch.empty(0, 1, dtype=torch.int64, device=dev)
    return call("sampler_simple_batch", logits, *_op_params(prm, _SIMPLE_PARAMS), *_seed_args(seed, dev),
                                                    path)[:, None]


# =========================================================================== beam candidates (issue 13)
# One step of Hugging Face beam search / beam sampling on [B * N, V] logits. Self-contained section: validation
# here, then one custom op (torch.ops.decodekit.beam_candidates) taking tensors and scalars only.

from decodekit.ops._library import custom_op as _beam_custom_op  # noqa: E402

__all__ += ["beam_candidates"]  # noqa: PLE0605

_BEAM_MAX_CANDIDATES = 256  # candidates per prompt the kernel keeps in registers


def _beam_scalar(name: str, value: object, op: str, *, integer: bool = False, lo: float, lo_open: bool = False,
                 hi: float | None = None) -> float | int:
    """A Python scalar parameter of :func:`beam_candidates` (per-row tensors are not accepted here)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{op}: {name} must be {'an int' if integer else 'a float'}, got {type(value).__name__}")
    v = float(value)
    if not -math.inf < v < math.inf:  # comparisons, not math.isfinite: v is a symbolic float under dynamic compile
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise ValueError(f"{op}: {name} must be {rng}, got {value}")
    return int(value) if integer else v


@_beam_custom_op("beam_candidates")
def _beam_candidates_op(
    logits: torch.Tensor, beam_scores: torch.Tensor, token_counts: torch.Tensor | None, seed: torch.Tensor | None,
    seed_int: int, num_beams: int, num_candidates: int, temperature: float, top_k: int, top_p: float,
    repetition_penalty: float, min_tokens_to_keep: int, do_sample: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.decodekit.beam_candidates``: tokens, beams (int64) and scores (fp32), each ``[B, K]``."""
    dev = logits.device
    B = logits.shape[0] // num_beams
    sd: int | torch.Tensor = seed if seed is not None else seed_int
    if backend == "triton":
        seeds, mult = _seeds(sd, B, dev)
        return _kernels().beam_run(logits, beam_scores, token_counts, seeds, mult, num_beams=num_beams,
                                   num_candidates=num_candidates, temperature=temperature, top_k=top_k,
                                   top_p=top_p, repetition_penalty=repetition_penalty,
                                   min_tokens_to_keep=min_tokens_to_keep, do_sample=do_sample)
    return _st.beam_candidates_torch(logits, beam_scores, num_beams, num_candidates, temperature, top_k, top_p,
                                     repetition_penalty, token_counts, min_tokens_to_keep, do_sample,
                                     _torch_seed(sd, B, dev))


@_beam_candidates_op.register_fake
def _(logits, beam_scores, token_counts, seed, seed_int, num_beams, num_candidates, temperature, top_k, top_p,
      repetition_penalty, min_tokens_to_keep, do_sample, backend):
    shape = (logits.shape[0] // num_beams, num_candidates)
    return (logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.int64),
            logits.new_empty(shape, dtype=torch.float32))


def beam_candidates(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    num_beams: int,
    *,
    num_candidates: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    token_counts: torch.Tensor | None = None,
    min_tokens_to_keep: int = 2,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of beam search or beam sampling: the ``K`` best (or ``K`` sampled) continuations per prompt.

    Hugging Face ``_beam_search`` semantics (transformers 4.52 to 5.x; checked against the installed 5.x), fused:
    per beam row, ``s = log_softmax(logits)``; the repetition penalty on those log-probabilities at the tokens
    with a nonzero count (``s * r`` where ``s < 0``, else ``s / r``); ``s / temperature``; top-k with
    ``k = max(top_k, min_tokens_to_keep)`` (every token tying the k-th kept); top-p on the distribution
    renormalized over the top-k set, keeping a token iff the mass of the strictly higher values is below
    ``top_p`` or fewer than ``min_tokens_to_keep`` values are strictly higher; filtered tokens drop out. Each
    kept token's score is ``beam_score + s``; over the ``N * V`` scores of a prompt, the ``K`` best
    (``do_sample=False``) or ``K`` drawn without replacement from their softmax (``do_sample=True``, as a
    Gumbel-top-k: the ``K`` largest ``score - log(-log u)``), returned ordered by score, descending.

    Parameters
    ----------
    logits : Tensor ``[B * N, V]``, fp32 / fp16 / bf16, last dim contiguous. Row ``b * N + n`` is beam ``n`` of
        prompt ``b``.
    beam_scores : fp32 ``[B * N]`` (or ``[B, N]``) running beam scores on the logits' device. Hugging Face starts
        with ``0`` for beam 0 and ``-1e9`` for the others, so the first step expands one beam.
    num_beams : ``N >= 1``.
    num_candidates : ``K`` in ``[1, N * V]`` (at most 256); default ``2 * N`` (Hugging Face keeps
        ``max(2, 1 + number of stop ids) * N``, so that ``N`` continue even when the best ``N`` all stop).
    do_sample : False: top ``K``. True: sampled without replacement.
    temperature, top_k, top_p, repetition_penalty : Python scalars. Hugging Face applies temperature, top-k and
        top-p only when sampling; pass the defaults (``1.0, 0, 1.0``) for beam search.
    token_counts : int ``[B * N, V]`` how often each token occurs in each beam (prompt included); only
        ``count > 0`` matters (the penalty applies once per token).
    min_tokens_to_keep : at least this many tokens survive top-k / top-p per row (Hugging Face: 1 + the number
        of stop ids, at least 2).
    seed : int, int64 ``[B]`` per-prompt seeds, or None (drawn from torch's generator); only for sampling.
    backend : ``"auto"`` (CUDA -> Triton kernel, CPU -> PyTorch path), ``"triton"`` or ``"torch"``.

    Returns
    -------
    tokens : int64 ``[B, K]`` token ids, beams : int64 ``[B, K]`` the beam (``0..N-1``) each continues,
    scores : fp32 ``[B, K]`` the accumulated scores, descending. A prompt whose rows hold fewer than ``K`` kept
    tokens (NaN or all ``-inf`` logits) pads with token ``-1``, beam ``-1``, score ``-inf``.

    Notes
    -----
    The Triton kernel reads each row a few times (log-sum-exp, the row statistics, a threshold search with 16
    pivots per pass for top-k / top-p, the selection) and never sorts the vocabulary; only ``[B, K]`` results
    leave it. Ties among scores: lowest ``n * V + token`` first on the kernel, ``torch.topk``'s order on the
    PyTorch path (the order Hugging Face gets). Sampling is deterministic for a seed on each path; the kernel
    draws Philox uniforms (``tl.rand``), the PyTorch path counter-based hashes, so the two give equally
    distributed, not identical, candidates. No host synchronization on the kernel path (CUDA-graph safe with a
    tensor seed); under ``torch.compile`` the op is one opaque node.

    Example
    -------
    >>> logits = torch.randn(2 * 3, 100)
    >>> scores = torch.tensor([0.0, -1e9, -1e9] * 2)
    >>> tok, beam, sc = beam_candidates(logits, scores, 3)
    >>> tok.shape, beam.shape, sc.shape
    (torch.Size([2, 6]), torch.Size([2, 6]), torch.Size([2, 6]))
    """
    op = "beam_candidates"
    logits = _check_logits(logits, op)
    R, V = logits.shape
    dev = logits.device
    if isinstance(num_beams, bool) or not isinstance(num_beams, int):
        raise TypeError(f"{op}: num_beams must be an int, got {type(num_beams).__name__}")
    if num_beams < 1:
        raise ValueError(f"{op}: num_beams must be >= 1, got {num_beams}")
    if R % num_beams:
        raise ValueError(f"{op}: logits has {R} rows, not a multiple of num_beams={num_beams}")
    B = R // num_beams
    K = 2 * num_beams if num_candidates is None else num_candidates
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{op}: num_candidates must be an int, got {type(K).__name__}")
    if not 1 <= K <= min(num_beams * V, _BEAM_MAX_CANDIDATES):
        raise ValueError(f"{op}: num_candidates must be in [1, min(num_beams * V, {_BEAM_MAX_CANDIDATES})] = "
                         f"[1, {min(num_beams * V, _BEAM_MAX_CANDIDATES)}], got {K}")
    check_tensor("beam_scores", beam_scores, dtypes=(torch.float32,), device=dev, op=op)
    if beam_scores.numel() != R or beam_scores.dim() not in (1, 2) or (
            beam_scores.dim() == 2 and tuple(beam_scores.shape) != (B, num_beams)):
        raise ValueError(f"{op}: beam_scores must be [B * N] = [{R}] or [B, N] = [{B}, {num_beams}], "
                         f"got {tuple(beam_scores.shape)}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"{op}: do_sample must be a bool, got {type(do_sample).__name__}")
    temperature = _beam_scalar("temperature", temperature, op, lo=0.0, lo_open=True)
    top_k = _beam_scalar("top_k", top_k, op, integer=True, lo=0)
    top_p = _beam_scalar("top_p", top_p, op, lo=0.0, lo_open=True, hi=1.0)
    repetition_penalty = _beam_scalar("repetition_penalty", repetition_penalty, op, lo=0.0, lo_open=True)
    min_tokens_to_keep = _beam_scalar("min_tokens_to_keep", min_tokens_to_keep, op, integer=True, lo=1)
    counts = _check_counts(token_counts, logits, op)
    seed = _check_seed(seed, B, dev, op)
    path = resolve_backend(backend, dev, op)
    if R == 0:
        empty = torch.empty(0, K, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.empty(0, K, dtype=torch.float32, device=dev)
    seed = _draw_seed(seed, dev) if do_sample else 0
    seed_t, seed_int = (seed, 0) if isinstance(seed, torch.Tensor) else (None, seed)
    return call("beam_candidates", logits, beam_scores.reshape(R).contiguous(), counts, seed_t, seed_int, num_beams, K,
                               temperature, top_k, top_p, repetition_penalty, min_tokens_to_keep, do_sample, path)


# =========================================================================== issue 14: diffusion-LM block sampling,
# position selection and the rwkv package's sampler

__all__ += ["sample_block", "select_positions", "transfer_schedule", "rwkv_sample_logits", "rwkv_sampling_probs"]

BLOCK_ORDERS = ("top_k_first", "top_p_first")
BLOCK_CONFIDENCES = ("prob", "raw_prob", "margin", "neg_entropy", "random")
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as an int64: spreads the batch rows' seeds


def _block_seeds(seed: int | torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    """int64 ``[B]``: one seed per batch row. A shared seed is mixed with the row index (``seed + b * golden``,
    wrapping); per-row seeds are used as given (a row's draws do not depend on the batch)."""
    seed = _draw_seed(seed, device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 or (seed.shape[0] == 1 and B != 1):
            return seed.reshape(1) + torch.arange(B, device=device, dtype=torch.int64) * _GOLDEN
        return seed.contiguous()
    s = seed - 2**64 if seed >= 2**63 else seed
    return torch.full((B,), s, dtype=torch.int64, device=device) + torch.arange(B, device=device) * _GOLDEN


def _choice(name: str, value: object, choices: tuple[str, ...], op: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return value


_BLOCK_PARAMS = ("temperature", "top_k", "top_p")
_BLOCK_BOUNDS: dict[str, dict[str, bool | float]] = {
    "temperature": dict(lo=0.0), "top_k": dict(integer=True, lo=0.0), "top_p": dict(lo=0.0, lo_open=True, hi=1.0)}
_RWKV_BOUNDS = dict(_BLOCK_BOUNDS, top_p=dict(lo=0.0, hi=1.0))  # rwkv: top_p = 0 keeps the argmax's group


def _block_params(scalars: list[float], tensors: list[torch.Tensor | None], B: int, op: str, *, rwkv: bool) -> tuple:
    """Inside an op: (temperature, top_k, top_p) as Python numbers or fp32 [B], per-row CPU tensors range-checked.
    rwkv: ``temperature == 0`` becomes ``T = 1, top_p = 0`` (the package's rule)."""
    bounds = _RWKV_BOUNDS if rwkv else _BLOCK_BOUNDS
    vals = join_params(scalars, tensors, [bool(bounds[n].get("integer")) for n in _BLOCK_PARAMS])
    t, k, p = (_row_tensor(n, v, B, op, **bounds[n]) for n, v in zip(_BLOCK_PARAMS, vals))
    if rwkv:
        if isinstance(t, torch.Tensor):
            zero = t == 0
            p = torch.where(zero, 0.0, _column(p, B, t.device))
            t = torch.where(zero, 1.0, t)
        elif t == 0.0:
            t, p = 1.0, 0.0
    return t, k, p


def _block_run(
    logits: torch.Tensor, masked: torch.Tensor, input_ids: torch.Tensor | None, temperature: float | torch.Tensor,
    top_k: int | torch.Tensor, top_p: float | torch.Tensor, seeds: torch.Tensor, confidence: str, topp_first: bool,
    post_temp: bool, backend: str, want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inside an op: the Triton kernel or the PyTorch path on checked parameters (Python numbers or fp32 [B])."""
    B, L, V = logits.shape
    dev = logits.device
    if backend == "triton":
        params = torch.stack([_column(temperature, B, dev), _column(top_p, B, dev)], dim=1).contiguous()
        topk = _column(top_k, B, dev).clamp(0, 2**31 - 1).to(torch.int32)
        tokens, conf, kept = _kernels().block_run(logits, masked, input_ids, params, topk, seeds,
                                                  confidence=confidence, topp_first=topp_first,
                                                  post_temp=post_temp, want_kept=want_probs)
        probs = None
        if want_probs:  # the kernel's kept set (z > lo) and mass, expanded to the distribution (for tests)
            temp = params[:, 0][:, None, None]
            z = logits.float() if post_temp else logits.float() / torch.where(temp == 0, 1.0, temp)
            lo, m, w = kept[..., 0:1], kept[..., 1:2], kept[..., 2:3]
            d = z - m
            if post_temp:
                d = torch.where(d == 0, 0.0, d * (1.0 / temp))
            probs = torch.where(((z > lo) | (z == m)) & (z > float("-inf")), d.exp() / w, 0.0)
            ok = masked & (tokens >= 0)
            if not post_temp:  # greedy positions take the argmax
                g = (ok & (params[:, 0] == 0)[:, None])[..., None]
                probs = torch.where(g, torch.nn.functional.one_hot(tokens.clamp(min=0), V).float(), probs)
            probs = torch.where(ok[..., None], probs, 0.0)
        return tokens, conf, probs
    return _st.block_torch(logits, masked, input_ids, temperature, top_k, top_p, seeds, confidence=confidence,
                           topp_first=topp_first, post_temp=post_temp, want_probs=want_probs)


@custom_op("sample_block")
def _sample_block_op(
    logits: torch.Tensor, masked: torch.Tensor, input_ids: torch.Tensor | None, scalars: list[float],
    tensors: list[torch.Tensor | None], seeds: torch.Tensor, confidence: str, topp_first: bool, check: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.decodekit.sample_block``: tokens int64 [B, L] and confidences fp32 [B, L]."""
    op = "sample_block"
    t, k, p = _block_params(scalars, tensors, logits.shape[0], op, rwkv=False)
    tokens, conf, _ = _block_run(logits, masked, input_ids, t, k, p, seeds, confidence, topp_first, False, backend)
    if check:
        bad = (masked & (tokens < 0)).nonzero().tolist()
        if bad:
            raise ValueError(f"{op}: logits at masked positions {bad[:8]} (batch row, position) are all -inf or "
                             "contain NaN/+inf")
    return tokens, conf


@_sample_block_op.register_fake
def _(logits, masked, input_ids, scalars, tensors, seeds, confidence, topp_first, check, backend):
    B, L, _ = logits.shape
    return logits.new_empty((B, L), dtype=torch.int64), logits.new_empty((B, L), dtype=torch.float32)


@custom_op("block_probs")
def _block_probs_op(
    logits: torch.Tensor, masked: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None],
    topp_first: bool, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.block_probs``: fp32 [B, L, V]."""
    t, k, p = _block_params(scalars, tensors, logits.shape[0], "block_probs", rwkv=False)
    seeds = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return _block_run(logits, masked, None, t, k, p, seeds, "prob", topp_first, False, backend, want_probs=True)[2]


@_block_probs_op.register_fake
def _(logits, masked, scalars, tensors, topp_first, backend):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@custom_op("rwkv_sample_logits")
def _rwkv_sample_logits_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], seeds: torch.Tensor, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.rwkv_sample_logits``: tokens int64 [B]."""
    B = logits.shape[0]
    t, k, p = _block_params(scalars, tensors, B, "rwkv_sample_logits", rwkv=True)
    masked = torch.ones(B, 1, dtype=torch.bool, device=logits.device)
    return _block_run(logits[:, None, :], masked, None, t, k, p, seeds, "none", True, True, backend)[0][:, 0]


@_rwkv_sample_logits_op.register_fake
def _(logits, scalars, tensors, seeds, backend):
    return fake_rows(logits, torch.int64)[0]


@custom_op("rwkv_sampling_probs")
def _rwkv_sampling_probs_op(
    logits: torch.Tensor, scalars: list[float], tensors: list[torch.Tensor | None], backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.rwkv_sampling_probs``: fp32 [B, V]."""
    B = logits.shape[0]
    t, k, p = _block_params(scalars, tensors, B, "rwkv_sampling_probs", rwkv=True)
    masked = torch.ones(B, 1, dtype=torch.bool, device=logits.device)
    seeds = torch.zeros(B, dtype=torch.int64, device=logits.device)
    return _block_run(logits[:, None, :], masked, None, t, k, p, seeds, "none", True, True, backend,
                      want_probs=True)[2][:, 0]


@_rwkv_sampling_probs_op.register_fake
def _(logits, scalars, tensors, backend):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _block_setup(
    op: str, logits: object, masked: object, input_ids: object, temperature: Param, top_k: Param, top_p: Param,
    order: object, confidence: object, seed: object,
) -> tuple:
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES, op=op)
    assert isinstance(logits, torch.Tensor)
    B, L, V = logits.shape
    dev = logits.device
    if V < 1:
        raise ValueError(f"{op}: logits must have at least one column, got shape {tuple(logits.shape)}")
    if V >= 2**31:
        raise ValueError(f"{op}: logits has V={V} columns; token ids must fit int32 (V < 2**31)")
    if L >= 2**31:
        raise ValueError(f"{op}: logits has L={L} positions; at most 2**31 - 1")
    if V > 1 and logits.stride(2) != 1:
        raise ValueError(f"{op}: logits must have a contiguous last dim (stride 1), got strides {logits.stride()}")
    check_tensor("masked", masked, ndim=2, dtypes=(torch.bool,), device=dev, op=op)
    assert isinstance(masked, torch.Tensor)
    if tuple(masked.shape) != (B, L):
        raise ValueError(f"{op}: masked must have shape [B, L] = {(B, L)}, got {tuple(masked.shape)}")
    if input_ids is not None:
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64,), device=dev, op=op)
        assert isinstance(input_ids, torch.Tensor)
        if tuple(input_ids.shape) != (B, L):
            raise ValueError(f"{op}: input_ids must have shape [B, L] = {(B, L)}, got {tuple(input_ids.shape)}")
    t, k, p = (_row_param(n, v, B, dev, op, **_BLOCK_BOUNDS[n])
               for n, v in zip(_BLOCK_PARAMS, (temperature, top_k, top_p)))
    order = _choice("order", order, BLOCK_ORDERS, op)
    confidence = _choice("confidence", confidence, BLOCK_CONFIDENCES, op)
    seed = _check_seed(seed, B, dev, op)
    return logits, masked, input_ids, t, k, p, order, confidence, seed


def sample_block(
    logits: torch.Tensor,
    masked: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    order: str = "top_k_first",
    confidence: str = "prob",
    seed: int | torch.Tensor | None = None,
    check: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every masked position of a diffusion LM's block and return each one's confidence.

    Parameters
    ----------
    logits : Tensor ``[B, L, V]``, fp32 / fp16 / bf16, last dim contiguous (any batch / position strides: a slice
        of a model's all-position logits, e.g. an IO-bound ONNX Runtime output, is read in place).
    masked : bool ``[B, L]``: the positions to sample (the mask tokens of the current step).
    input_ids : int64 ``[B, L]`` or None: the tokens that unmasked positions keep (``-1`` there without them).
    temperature, top_k, top_p : Python scalars or per-batch-row ``[B]`` tensors; ``sample``'s filters on each
        position's row: top-k keeps every token tying the k-th largest, top-p in ``(0, 1]`` keeps a token iff the
        mass of the strictly higher tokens is below ``top_p`` (a tie group kept or dropped whole).
        ``temperature == 0`` is greedy: the argmax (lowest index on ties), its confidence taken on the filtered
        distribution at temperature 1 (Dream's rule).
    order : ``"top_k_first"`` (top-p on the distribution renormalized over the top-k set: Hugging Face, SDAR,
        llama.cpp) or ``"top_p_first"`` (top-p on the full distribution, then top-k: Dream). The top-p test is
        ``sample``'s strict ``<`` in both orders (Dream's code keeps a token whose higher mass equals ``top_p``
        exactly; the sets differ only at that equality).
    confidence : ``"prob"`` (the token's probability under the filtered distribution), ``"raw_prob"`` (under
        ``softmax(logits)``, no temperature or filter: LLaDA's ``low_confidence``), ``"margin"`` (top-1 minus top-2
        probability of the filtered distribution), ``"neg_entropy"`` (``sum p log p`` of it; larger is more
        confident, Dream's sign) or ``"random"`` (a uniform draw: LLaDA's ``random`` remasking).
    seed : int, int64 ``[B]`` tensor or None, as in :func:`sample`. Position ``l`` of row ``b`` draws from a stream
        keyed by the row's seed (an int seed is mixed with ``b``; a ``[B]`` tensor is per row, so a row's tokens do
        not depend on the batch) and ``l``.
    check : raise ``ValueError`` naming the masked positions whose logits hold a NaN or ``+inf`` or are all
        ``-inf`` (it reads the result on the host).
    backend : ``"auto"``, ``"triton"`` or ``"torch"`` as in :func:`sample`.

    Returns
    -------
    tokens : int64 ``[B, L]``: drawn at masked positions, ``input_ids`` (or ``-1``) elsewhere, ``-1`` at a bad one.
    confidence : fp32 ``[B, L]``: ``-inf`` at unmasked positions (never selected), NaN at a bad masked one.

    Notes
    -----
    The Triton kernel runs one program per position and reads a masked position's logits once per pass (stats,
    the unresolved threshold-search passes, the race); unmasked positions are not read, and no ``[B * L, V]``
    intermediate is written. No host synchronization (CUDA-graph safe with a tensor seed). The two backends keep
    the same sets with the same probabilities and agree exactly at ``temperature == 0``; at ``temperature > 0``
    they draw from the same distribution with different random streams (Philox race on the GPU, an inverse-CDF
    draw on the CPU). Deterministic for a given seed on each backend. ``logits / T`` overflowing is the limit
    ``T -> 0``: the argmax, prob and margin 1, neg_entropy 0.

    Example
    -------
    >>> logits = torch.randn(2, 32, 1000)
    >>> masked = torch.ones(2, 32, dtype=torch.bool)
    >>> tok, conf = sample_block(logits, masked, temperature=0.0, confidence="raw_prob")
    >>> tok.shape, conf.dtype
    (torch.Size([2, 32]), torch.float32)
    """
    op = "sample_block"
    logits, masked, input_ids, t, k, p, order, confidence, seed = _block_setup(
        op, logits, masked, input_ids, temperature, top_k, top_p, order, confidence, seed)
    B = logits.shape[0]
    dev = logits.device
    path = resolve_backend(backend, dev, op)
    scalars, tensors = split_params([t, k, p])
    return call("sample_block", logits, masked, input_ids, scalars, tensors, _block_seeds(seed, B, dev), confidence,
                            order == "top_p_first", bool(check), path)


def block_probs(
    logits: torch.Tensor, masked: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
    order: str = "top_k_first", backend: str = "auto",
) -> torch.Tensor:
    """The distribution each masked position of :func:`sample_block` draws from: fp32 ``[B, L, V]`` (a one-hot at
    the argmax for greedy rows; zeros at unmasked and bad positions). For tests: it writes ``[B, L, V]``."""
    op = "block_probs"
    logits, masked, _, t, k, p, order, _, _ = _block_setup(
        op, logits, masked, None, temperature, top_k, top_p, order, "prob", 0)
    path = resolve_backend(backend, logits.device, op)
    scalars, tensors = split_params([t, k, p])
    return call("block_probs", logits, masked, scalars, tensors, order == "top_p_first", path)


def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: how many positions each of ``steps`` steps commits, int64 ``[B, steps]``.

    ``masked`` is bool ``[B, L]`` (the mask tokens of the block) or int ``[B]`` counts ``M``; step ``i`` commits
    ``M // steps + (i < M % steps)``, so the counts sum to ``M``. Negative int counts on the CPU raise
    ``ValueError`` in eager code; under ``torch.compile`` (and on a GPU) they are not checked.

    Example
    -------
    >>> transfer_schedule(torch.tensor([10, 3]), 4)
    tensor([[3, 3, 2, 2],
            [1, 1, 1, 0]])
    """
    op = "transfer_schedule"
    if not isinstance(masked, torch.Tensor):
        raise TypeError(f"{op}: masked must be a bool [B, L] or an int [B] tensor, got {type(masked).__name__}")
    if masked.dtype == torch.bool and masked.dim() == 2:
        M = masked.sum(dim=1)
    elif masked.dim() == 1 and masked.dtype in _INT_DTYPES + (torch.int8,):
        M = masked.to(torch.int64)
        # a host check of CPU counts, skipped in compiled code (no Python branch on tensor data in a graph)
        if masked.device.type == "cpu" and not compiling() and bool((M < 0).any()):
            raise ValueError(f"{op}: masked counts must be >= 0")
    else:
        raise TypeError(f"{op}: masked must be a bool [B, L] or an int [B] tensor, got {masked.dtype} "
                        f"{tuple(masked.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{op}: steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"{op}: steps must be >= 1, got {steps}")
    i = torch.arange(steps, device=M.device)
    return (M // steps)[:, None] + (i[None, :] < (M % steps)[:, None]).to(torch.int64)


def select_positions(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    *,
    k: int | torch.Tensor | None = None,
    threshold: float | None = None,
    entropy_bound: float | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Which masked positions a diffusion step commits: bool ``[B, L]``. Exactly one rule is given.

    Candidates are the masked positions (inside ``block = (start, end)`` when given: positions outside the current
    block are never chosen) whose confidence is not NaN, ranked by confidence, highest first (the lower position
    first on ties).

    Parameters
    ----------
    confidence : float ``[B, L]`` (:func:`sample_block`'s confidences).
    masked : bool ``[B, L]``.
    k : int or int ``[B]`` tensor: the ``k`` best candidates of each row (all of them if fewer); LLaDA's rule with
        :func:`transfer_schedule`'s counts.
    threshold : every candidate with confidence ``>= threshold``, and the best one always (Fast-dLLM).
    entropy_bound : with ``confidence="neg_entropy"`` (entropy = ``-confidence``): the candidates in ascending
        entropy, the longest prefix whose cumulative entropy is ``<= entropy_bound``, at least one (SDAR).
    block : ``(start, end)`` with ``0 <= start <= end <= L``.

    Notes
    -----
    Vectorized (two stable sorts of ``[B, L]``), no host synchronization: runs on the confidences' device.

    Example
    -------
    >>> conf = torch.tensor([[0.9, 0.2, 0.7, float("-inf")]])
    >>> select_positions(conf, torch.tensor([[True, True, True, False]]), k=2)
    tensor([[ True, False,  True, False]])
    """
    op = "select_positions"
    check_tensor("confidence", confidence, ndim=2, dtypes=(torch.float32, torch.float64, torch.float16,
                                                           torch.bfloat16), op=op)
    assert isinstance(confidence, torch.Tensor)
    B, L = confidence.shape
    dev = confidence.device
    check_tensor("masked", masked, ndim=2, dtypes=(torch.bool,), device=dev, op=op)
    assert isinstance(masked, torch.Tensor)
    if tuple(masked.shape) != (B, L):
        raise ValueError(f"{op}: masked must have the shape of confidence {(B, L)}, got {tuple(masked.shape)}")
    given = [name for name, v in (("k", k), ("threshold", threshold), ("entropy_bound", entropy_bound))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"{op}: give exactly one of k, threshold, entropy_bound (got {given or 'none'})")
    if k is not None:
        if isinstance(k, torch.Tensor):
            if k.dtype not in _INT_DTYPES + (torch.int8,):
                raise TypeError(f"{op}: k must be an int or an int [B] tensor, got {k.dtype}")
            if tuple(k.shape) != (B,):
                raise ValueError(f"{op}: k must be an int or an int [B] tensor with B={B}, got {tuple(k.shape)}")
            if k.device != dev:
                raise ValueError(f"{op}: k is on {k.device} but confidence is on {dev}")
            if k.device.type == "cpu" and bool((k < 0).any()):
                raise ValueError(f"{op}: k must be >= 0")
            kk = k.to(torch.int64)
        elif isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{op}: k must be an int or an int [B] tensor, got {type(k).__name__}")
        elif k < 0:
            raise ValueError(f"{op}: k must be >= 0, got {k}")
        else:
            kk = torch.full((B,), k, dtype=torch.int64, device=dev)
    for name, v in (("threshold", threshold), ("entropy_bound", entropy_bound)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
            if math.isnan(v):
                raise ValueError(f"{op}: {name} must not be NaN")
    elig = masked & ~torch.isnan(confidence)
    if block is not None:
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(e, int) and not isinstance(e, bool) for e in block)):
            raise TypeError(f"{op}: block must be a (start, end) pair of ints, got {block!r}")
        s, e = block
        if not 0 <= s <= e <= L:
            raise ValueError(f"{op}: block must satisfy 0 <= start <= end <= L={L}, got {tuple(block)}")
        pos = torch.arange(L, device=dev)
        elig &= ((pos >= s) & (pos < e))[None, :]
    c = confidence.double()
    # rank: candidates first, by confidence descending, the lower position first (two stable sorts)
    o1 = torch.sort(torch.where(elig, c, float("-inf")), dim=1, descending=True, stable=True).indices
    o2 = torch.sort((~elig.gather(1, o1)).to(torch.int8), dim=1, stable=True).indices
    order = o1.gather(1, o2)  # [B, L] positions in rank order
    e_sorted = elig.gather(1, order)
    first = torch.zeros(B, L, dtype=torch.bool, device=dev)
    first[:, :1] = True
    if k is not None:
        take = torch.arange(L, device=dev)[None, :] < kk[:, None]
    elif threshold is not None:
        take = (c.gather(1, order) >= threshold) | first
    else:
        ent = torch.where(e_sorted, -c.gather(1, order), 0.0)
        ok = (ent.cumsum(dim=1) <= entropy_bound).to(torch.int8).cummin(dim=1).values.bool()  # a prefix
        take = ok | first
    return torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, order, take & e_sorted)


def _rwkv_setup(op: str, logits: object, temperature: Param, top_p: Param, top_k: Param) -> tuple:
    check_tensor("logits", logits, ndim=(1, 2), dtypes=FLOAT_DTYPES, op=op)
    assert isinstance(logits, torch.Tensor)
    x = logits[None] if logits.dim() == 1 else logits
    x = _check_logits(x, op)
    B = x.shape[0]
    dev = x.device
    t, k, p = (_row_param(n, v, B, dev, op, **_RWKV_BOUNDS[n])
               for n, v in zip(_BLOCK_PARAMS, (temperature, top_k, top_p)))
    return x, split_params([t, k, p])


def rwkv_sample_logits(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_p: Param = 0.85,
    top_k: Param = 0,
    *,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The rwkv package's ``sample_logits`` (what RWKV-TTS calls): the same kept set and distribution.

    Steps (see :func:`decodekit.ops.sampling.reference.rwkv_probs_ref`): ``p = softmax(logits)``; top-p keeps the
    tokens down to the first where the descending cumulative sum reaches ``top_p``, with every token tying it
    (equivalently: a token is kept iff the mass strictly above it is below ``top_p``, the argmax's group always);
    top-k (``0 < top_k < V``) keeps the ``top_k`` largest, a tie group at the k-th kept whole; then the
    *temperature after the truncation*: the kept ``p ** (1 / T)``, renormalized. ``temperature == 0`` means
    ``T = 1, top_p = 0``: a uniform draw from the argmax's tie group (the argmax itself without ties).
    ``top_p`` is in ``[0, 1]`` (``1`` keeps everything).

    Parameters
    ----------
    logits : ``[V]`` or ``[B, V]``, fp32 / fp16 / bf16, last dim contiguous (a slice such as RWKV-TTS's
        ``logits[0:4096]`` is read in place).
    temperature, top_p, top_k : Python scalars or per-row ``[B]`` tensors.
    seed, backend : as in :func:`sample`.

    Returns
    -------
    int64 token ids: a 0-dim tensor for ``[V]`` logits (``int(...)`` gives the package's int), ``[B]`` for
    ``[B, V]``; ``-1`` for a row with NaN / ``+inf`` or all ``-inf``.

    Example
    -------
    >>> logits = torch.randn(8193)
    >>> int(rwkv_sample_logits(logits[0:4096], temperature=1.0, top_p=0.95, top_k=20, seed=0)) < 4096
    True
    """
    op = "rwkv_sample_logits"
    one_row = isinstance(logits, torch.Tensor) and logits.dim() == 1
    x, (scalars, tensors) = _rwkv_setup(op, logits, temperature, top_p, top_k)
    B = x.shape[0]
    dev = x.device
    seed = _check_seed(seed, B, dev, op)
    path = resolve_backend(backend, dev, op)
    tokens = call("rwkv_sample_logits", x, scalars, tensors, _block_seeds(seed, B, dev), path)
    return tokens[0] if one_row else tokens


def rwkv_sampling_probs(
    logits: torch.Tensor, temperature: Param = 1.0, top_p: Param = 0.85, top_k: Param = 0, *, backend: str = "auto"
) -> torch.Tensor:
    """The distribution :func:`rwkv_sample_logits` draws from: fp32, the shape of ``logits`` (zeros for a bad row).
    It writes a ``[B, V]`` tensor: for tests and log-probabilities."""
    op = "rwkv_sampling_probs"
    one_row = isinstance(logits, torch.Tensor) and logits.dim() == 1
    x, (scalars, tensors) = _rwkv_setup(op, logits, temperature, top_p, top_k)
    probs = call("rwkv_sampling_probs", x, scalars, tensors, resolve_backend(backend, x.device, op))
    return probs[0] if one_row else probs
