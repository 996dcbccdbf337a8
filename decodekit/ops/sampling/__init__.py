"""Fused sampling from logits: the public functions (validation + dispatch).

``sample`` (Hugging Face ``generate`` semantics), ``sampling_probs`` (its filtered distribution),
``sample_logits`` (the TTS sampler, exactly) and ``sampler_simple_batch``. Every function validates its
arguments here, then runs the Triton kernels of :mod:`decodekit.ops.sampling.triton` (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) or the vectorized PyTorch path of :mod:`decodekit.ops.sampling.cpu`.
The plain-PyTorch semantics they are tested against live in :mod:`decodekit.ops.sampling.reference`.
Triton is imported on the first kernel launch only.
"""

from __future__ import annotations

import math

import torch

from decodekit.ops._dispatch import FLOAT_DTYPES, check_tensor, resolve_backend
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
    """Validate a scalar or per-row [B] parameter: a Python scalar is checked in Python and returned as a
    Python number (int for ``integer``), a tensor is returned as fp32 [B] on ``device``.

    Python scalars are range-checked always; CPU tensors too; device tensors are not read (that would
    synchronize), so out-of-range values there are the caller's responsibility.
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        want = "an int" if integer else "a float"
        raise TypeError(f"{op}: {name} must be {want} or a [B] tensor, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{op}: {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{op}: {name} must be <= {hi}, got {v}")
    if integer:
        return int(value)
    return _FP32_TINY if 0 < v < _FP32_TINY else v


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
                "frequency_penalty")  # the packed kernel columns P_TEMP .. P_FREQ


def _filter_setup(
    op: str, logits: object, temperature: Param, top_k: Param, top_p: Param, min_p: Param,
    repetition_penalty: Param, presence_penalty: Param, frequency_penalty: Param, token_counts: object,
    *, tts: bool,
) -> tuple[torch.Tensor, dict[str, float | int | torch.Tensor], torch.Tensor | None]:
    """Validate everything; return (logits, checked parameters by name, token_counts)."""
    logits = _check_logits(logits, op)
    B, _ = logits.shape
    dev = logits.device
    prm = {
        "temperature": _row_param("temperature", temperature, B, dev, op, lo=0.0),
        "top_k": _row_param("top_k", top_k, B, dev, op, integer=True, lo=0.0),
        "top_p": _row_param("top_p", top_p, B, dev, op) if tts else _row_param("top_p", top_p, B, dev, op, lo=0.0,
                                                                                lo_open=True, hi=1.0),
        "min_p": _row_param("min_p", min_p, B, dev, op, lo=0.0, hi=1.0),
        "repetition_penalty": _row_param("repetition_penalty", repetition_penalty, B, dev, op, lo=0.0,
                                         lo_open=True),
        "presence_penalty": _row_param("presence_penalty", presence_penalty, B, dev, op),
        "frequency_penalty": _row_param("frequency_penalty", frequency_penalty, B, dev, op),
    }
    counts = _check_counts(token_counts, logits, op)
    return logits, prm, counts


def _pack(prm: dict[str, float | int | torch.Tensor], B: int, device: torch.device) -> torch.Tensor:
    """The packed fp32 [B, 8] kernel parameters (columns P_TEMP .. P_NOISE; no noise)."""
    cols = [_column(prm[name], B, device) for name in _PARAM_ORDER]
    cols.append(torch.zeros(B, dtype=torch.float32, device=device))
    return torch.stack(cols, dim=1).contiguous()


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
        from torch's default generator (on the device, no synchronization).
    return_logprobs : also return the fp32 ``[B]`` log-probabilities of the drawn tokens under the final
        filtered, renormalized distribution (0 for greedy rows).
    check : raise ``ValueError`` naming the rows that are all ``-inf`` or hold a NaN / ``+inf`` instead of
        returning ``-1`` for them. ``check`` means the same in every decodekit op: inspect tensor *values* on
        the host and raise ``ValueError`` (it synchronizes, and under ``torch.compile`` it is a graph break).
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
    range-checked (that would synchronize).

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
    if B == 0:
        tokens, logprobs = torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, device=dev)
    elif path == "triton":
        npass = _npass(temperature, top_k, top_p, tts=False, greedy_top1=True)
        seeds, mult = _seeds(seed, B, dev)
        tokens, logprobs = _kernels().run(logits, _pack(prm, B, dev), seeds, mult, counts, tts=False, greedy_top1=True,
                                       npass=npass, mode="sample")
    else:
        tokens, logprobs = _st.sample_torch(logits, _row_params(prm, counts, tts=False, greedy_top1=True),
                                            _torch_seed(seed, B, dev), logprobs=return_logprobs)
    if check:
        bad = (tokens < 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{op}: logits rows {bad} are all -inf or contain NaN/+inf")
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
    ``-inf`` or holding NaN / ``+inf``, gives zeros). For speculative decoding and logprobs.

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
    B = logits.shape[0]
    if B == 0:
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if path == "triton":
        npass = _npass(temperature, top_k, top_p, tts=False, greedy_top1=True)
        params = _pack(prm, B, logits.device)
        return _kernels().run(logits, params, params[:, 0].to(torch.int64), 0, counts, tts=False, greedy_top1=True,
                           npass=npass, mode="probs")
    return _st.sampling_probs_torch(logits, _row_params(prm, counts, tts=False, greedy_top1=True))


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
    if path == "triton":
        npass = _npass(temperature, top_k, top_p, tts=True, greedy_top1=False)
        seeds, mult = _seeds(seed, B, dev)
        out = _kernels().run(logits, _pack(prm, B, dev), seeds, mult, None, tts=True, greedy_top1=False, npass=npass,
                          mode="probs" if probs else "sample")
        return out if probs else out[0][:, None]
    rp = _row_params(prm, None, tts=True, greedy_top1=False)
    if probs:
        return _st.sampling_probs_torch(logits, rp)
    return _st.sample_torch(logits, rp, _torch_seed(seed, B, dev), logprobs=False)[0][:, None]


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
    noise_v = _row_param("noise", noise, B, dev, op, lo=0.0)
    temp_v = _row_param("temp", temp, B, dev, op, lo=0.0)
    seed = _check_seed(seed, B, dev, op)
    path = resolve_backend(backend, dev, op)
    if B == 0:
        return torch.empty(0, 1, dtype=torch.int64, device=dev)
    if path == "triton":
        seeds, mult = _seeds(seed, B, dev)
        noise_t, temp_t = _column(noise_v, B, dev), _column(temp_v, B, dev)
        zeros = torch.zeros(B, dtype=torch.float32, device=dev)
        ones = torch.ones(B, dtype=torch.float32, device=dev)
        params = torch.stack([temp_t, zeros, ones, zeros, ones, zeros, zeros, noise_t], dim=1).contiguous()
        tokens, _ = _kernels().run(logits, params, seeds, mult, None, tts=True, greedy_top1=False, npass=0,
                                mode="simple")
        return tokens[:, None]
    return _st.simple_batch_torch(logits, noise_v, temp_v, _torch_seed(seed, B, dev))[:, None]


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
    if not math.isfinite(v):
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
    return _beam_candidates_op(logits, beam_scores.reshape(R).contiguous(), counts, seed_t, seed_int, num_beams, K,
                               temperature, top_k, top_p, repetition_penalty, min_tokens_to_keep, do_sample, path)
