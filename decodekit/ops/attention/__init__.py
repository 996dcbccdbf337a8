"""FlashAttention-style prefill and split-K decode attention: the public functions (validation + dispatch).

``attention`` (the layout of ``scaled_dot_product_attention``, forward + backward) and ``decode_attention`` (a few
new queries over a KV cache with per-row lengths) validate here, then run the kernels of
:mod:`decodekit.ops.attention.triton` or PyTorch's SDPA in :mod:`decodekit.ops.attention.cpu`.
:func:`decoder_attention` adapts a decoder's layout (a left-padded ``[B, T]`` mask) to them; decodekit's models
call it. Triton is imported on the first kernel launch only.
"""

from __future__ import annotations

import math
import numbers

import torch

from decodekit.ops._dispatch import FLOAT_DTYPES, check_tensor, interpreter_enabled, resolve_backend
from decodekit.ops._library import call, compiling, custom_op
from decodekit.ops.attention import cpu

__all__ = ["attention", "decode_attention", "decoder_attention", "left_padding_starts", "MAX_DECODE_QUERIES"]

MAX_HEAD_DIM = 256
MAX_DECODE_QUERIES = 16


def _kernels():
    """The Triton module, imported on first use."""
    from decodekit.ops.attention import triton as kernels

    return kernels


# --------------------------------------------------------------------------- validation


def _check_scale(scale: float | None, head_dim: int, op: str) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _check_qkv(q: object, k: object, v: object, op: str, k_name: str, v_name: str) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, op=op)
    check_tensor(k_name, k, ndim=4, dtypes=(q.dtype,), device=q.device, op=op)
    check_tensor(v_name, v, ndim=4, dtypes=(q.dtype,), device=q.device, op=op)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {v_name} shape {tuple(v.shape)} must equal {k_name} shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: {k_name} batch {k.shape[0]} must equal q batch {q.shape[0]}")
    H, H_kv = q.shape[1], k.shape[1]
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"{op}: q heads ({H}) must be a multiple of {k_name} heads ({H_kv}) (grouped-query attention)")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: head dim of {k_name} ({k.shape[3]}) must equal head dim of q ({q.shape[3]})")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim of q must be in [1, {MAX_HEAD_DIM}], got {q.shape[3]}")


def _check_kv_start(kv_start: object, batch: int, device: torch.device, op: str) -> torch.Tensor | None:
    if kv_start is None:
        return None
    check_tensor("kv_start", kv_start, ndim=1, dtypes=(torch.int32, torch.int64), device=device, op=op)
    if kv_start.shape[0] != batch:
        raise ValueError(
            f"{op}: kv_start must have shape [{batch}] (one start per batch row), got {tuple(kv_start.shape)}"
        )
    return kv_start.contiguous()


# --------------------------------------------------------------------------- custom ops
# torch.ops.decodekit.attention / decode_attention: the public functions validate (at trace time under
# torch.compile) and call these; the implementations launch the kernels or run the PyTorch path.


def _optional(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32) if t is None else t


@custom_op("attention")
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, q_offset: int,
    kv_start: torch.Tensor | None, store_lse: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.decodekit.attention``: ``(out [B, H, S_q, D], lse fp32 [B, H, S_q])``; ``lse`` is empty unless
    ``store_lse`` (asked for, or kept for the Triton backward)."""
    if backend == "triton":
        out, lse = _kernels()._attention_fwd(q, k, v, causal, scale, q_offset, kv_start, store_lse=store_lse)
        return out, _optional(lse, q)
    if store_lse:
        return cpu.attention(q, k, v, causal, scale, q_offset, kv_start, True)
    return cpu.attention(q, k, v, causal, scale, q_offset, kv_start, False), q.new_empty(0, dtype=torch.float32)


@_attention_op.register_fake
def _(q, k, v, causal, scale, q_offset, kv_start, store_lse, backend):
    B, H, S_q, _ = q.shape
    lse_shape = (B, H, S_q) if store_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@custom_op("attention_backward")
def _attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float, q_offset: int, kv_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.decodekit.attention_backward``: the FlashAttention-2 recompute backward kernels -> (dq, dk, dv)."""
    return _kernels()._attention_bwd(dout.contiguous(), q, k, v, out, lse, causal, scale, q_offset, kv_start)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, causal, scale, q_offset, kv_start):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, causal, scale, q_offset, kv_start, store_lse, backend = inputs
    out, lse = output
    triton_bwd = backend == "triton" and store_lse
    ctx.save_for_backward(q, k, v, out if triton_bwd else None, lse if triton_bwd else None, kv_start)
    ctx.causal, ctx.scale, ctx.q_offset, ctx.triton_bwd = causal, scale, q_offset, triton_bwd
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):  # noqa: ANN001
    q, k, v, out, lse, kv_start = ctx.saved_tensors
    if ctx.triton_bwd:
        dq, dk, dv = torch.ops.decodekit.attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                                                            ctx.q_offset, kv_start)
    else:  # the PyTorch path (or a Triton forward that kept no lse): plain ops, traced by torch.compile
        dq, dk, dv = cpu.attention_backward(dout, q, k, v, ctx.causal, ctx.scale, ctx.q_offset, kv_start)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@custom_op("decode_attention")
def _decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float,
    kv_start: torch.Tensor | None, num_splits: int, validate_lengths: bool, backend: str,
) -> torch.Tensor:
    """``torch.ops.decodekit.decode_attention``: ``[B, H, S_q, D]`` (``num_splits`` 0: the default plan). The
    ``validate_lengths`` check reads the lengths here, at run time, so it raises the same ``ValueError`` in eager
    and in compiled code (a host synchronization: not for CUDA-graph capture)."""
    S_max = k_cache.shape[2]
    if validate_lengths and cache_seqlens.numel():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > S_max:
            raise ValueError(f"decode_attention: cache_seqlens must lie in [0, S_max={S_max}], got values in "
                             f"[{lo}, {hi}]")
    if backend == "torch":
        return cpu.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, kv_start)
    return _kernels().decode(q, k_cache, v_cache, cache_seqlens, scale, kv_start, num_splits or None)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, kv_start, num_splits, validate_lengths, backend):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------- public ops


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    q_offset: int = 0,
    *,
    kv_start: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, FlashAttention-2 style (the layout of ``scaled_dot_product_attention``).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S_q, D]`` queries; fp16, bf16 or fp32; any strides.
    k, v : torch.Tensor
        ``[B, H_kv, S_k, D]`` keys and values, same dtype and device as ``q``; ``H`` must be a multiple of
        ``H_kv`` (grouped-query / multi-query attention: query head ``h`` uses key/value head
        ``h // (H // H_kv)``, without copying k/v). ``1 <= D <= 256`` (padded in registers to a power of 2).
    causal : bool
        Query ``i`` only sees keys ``j <= i + q_offset``.
    scale : float, optional
        Score scale; default ``D ** -0.5``.
    q_offset : int
        Key position of the first query (causal only). ``S_k - S_q`` places the queries at the end of the
        keys (chunked prefill against a cache); 0 (the default) matches SDPA's top-left ``is_causal``.
    kv_start : torch.Tensor, optional
        int32/int64 ``[B]``: keys ``j < kv_start[b]`` are hidden from every query of row ``b`` (left padding).
    return_lse : bool
        Also return the natural-log log-sum-exp of the scaled scores, fp32 ``[B, H, S_q]`` (not differentiable).
    backend : {"auto", "triton", "torch"}
        See :mod:`decodekit.ops._dispatch`. The torch path uses ``scaled_dot_product_attention`` (with a
        boolean mask when ``q_offset``/``kv_start`` need one) and the fp32 reference for ``return_lse``.

    Returns
    -------
    out : ``[B, H, S_q, D]`` in ``q``'s dtype (contiguous); plus ``lse`` when ``return_lse``. A query that sees
    no key (possible with ``q_offset < 0`` or ``kv_start``) gets zeros and ``lse = -inf``, never NaN.

    Notes
    -----
    Gradients flow to q, k and v (FlashAttention-2 recompute backward; the GQA sum over the query heads of
    a group happens inside one program, no atomics). Forward and backward are deterministic (fixed
    reduction order). No host synchronization: safe to capture in a CUDA graph for fixed shapes.
    ``torch.compile(fullgraph=True)``: one ``torch.ops.decodekit.attention`` node, with its autograd (the Triton
    backward is the ``torch.ops.decodekit.attention_backward`` op; the PyTorch path's backward is plain ops).

    Examples
    --------
    >>> q = torch.randn(1, 8, 17, 64); k = v = torch.randn(1, 2, 40, 64)
    >>> attention(q, k, v, causal=True, q_offset=40 - 17).shape
    torch.Size([1, 8, 17, 64])
    """
    op = "attention"
    _check_qkv(q, k, v, op, "k", "v")
    scale = _check_scale(scale, q.shape[3], op)
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"{op}: q_offset must be an int, got {type(q_offset).__name__}")
    q_offset = int(q_offset)
    if abs(q_offset) >= 2**30:
        raise ValueError(f"{op}: q_offset must be in (-2**30, 2**30), got {q_offset}")
    kv_start = _check_kv_start(kv_start, q.shape[0], q.device, op)
    causal = bool(causal)
    path = resolve_backend(backend, q.device, op)
    return_lse = bool(return_lse)
    # the Triton backward reads lse: keep it whenever a gradient can be asked for (known at trace time)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, lse = call("attention", q, k, v, causal, scale, q_offset, kv_start,
                                             return_lse or (grad and path == "triton"), path)
    return (out, lse) if return_lse else out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    *,
    kv_start: torch.Tensor | None = None,
    num_splits: int | None = None,
    validate_lengths: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of a few new queries over a KV cache with a valid length per row (split-K flash-decoding).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S_q, D]`` with ``1 <= S_q <= 16`` (one token, or a few for speculative decoding); fp16,
        bf16 or fp32; any strides. The queries are the LAST ``S_q`` positions of each row, already written
        into the cache: query ``i`` sees the keys ``j < cache_seqlens[b] - S_q + 1 + i`` (causal among
        the new tokens).
    k_cache, v_cache : torch.Tensor
        ``[B, H_kv, S_max, D]``, same dtype/device as ``q``; ``H`` a multiple of ``H_kv``; any strides.
    cache_seqlens : torch.Tensor
        int32 (or int64) ``[B]``: valid length of each row, ``0 <= L <= S_max``. A row whose queries see
        no key (``L == 0``) gets zeros, never NaN.
    scale : float, optional
        Score scale; default ``D ** -0.5``.
    kv_start : torch.Tensor, optional
        int ``[B]``: keys before it are hidden (left-padded rows).
    num_splits : int, optional
        Cache chunks per (row, kv head); default from :func:`attention_config` (multiprocessor count,
        batch, kv heads and ``S_max``; never the per-row lengths, so no host sync).
    validate_lengths : bool, optional
        Verify ``0 <= cache_seqlens <= S_max`` on the host. ``None`` (default) checks only CPU tensors,
        because on CUDA the check is a device-to-host sync; pass ``True`` to force it. Unchecked values
        are clamped to ``[0, S_max]`` inside the kernel, so they can never read out of bounds. The check runs
        inside the ``torch.ops.decodekit.decode_attention`` op: compiled code raises the same ``ValueError``.
    backend : {"auto", "triton", "torch"}
        The torch path is ``scaled_dot_product_attention`` under a boolean length mask.

    Returns
    -------
    ``[B, H, S_q, D]`` in ``q``'s dtype, contiguous.

    Notes
    -----
    Deterministic (fixed split plan and merge order). No host sync unless ``validate_lengths=True``; the launch plan
    depends only on shapes, so the call can be captured in a CUDA graph and replayed as lengths grow.
    ``torch.compile(fullgraph=True)``: one ``torch.ops.decodekit.decode_attention`` node (not differentiable).

    Examples
    --------
    >>> q = torch.randn(2, 8, 1, 64); kc = vc = torch.randn(2, 2, 128, 64)
    >>> decode_attention(q, kc, vc, torch.tensor([5, 128], dtype=torch.int32)).shape
    torch.Size([2, 8, 1, 64])
    """
    op = "decode_attention"
    _check_qkv(q, k_cache, v_cache, op, "k_cache", "v_cache")
    B, H, S_q, D = q.shape
    if not 1 <= S_q <= MAX_DECODE_QUERIES:
        raise ValueError(f"{op}: q must hold 1..{MAX_DECODE_QUERIES} new queries per row (dim 2), got {S_q}")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device, op=op)
    if cache_seqlens.shape[0] != B:
        raise ValueError(
            f"{op}: cache_seqlens must have shape [{B}] (one length per row), got {tuple(cache_seqlens.shape)}"
        )
    if validate_lengths is None:
        validate_lengths = cache_seqlens.device.type == "cpu"
    scale = _check_scale(scale, D, op)
    kv_start = _check_kv_start(kv_start, B, q.device, op)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{op}: num_splits must be a positive int or None, got {num_splits!r}")
    path = resolve_backend(backend, q.device, op)
    return call("decode_attention", q, k_cache, v_cache, cache_seqlens, scale, kv_start, num_splits or 0,
                                                bool(validate_lengths), path)


# --------------------------------------------------------------------------- decoder layout


def left_padding_starts(attention_mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[B]``: the number of leading zeros of each row of a ``[B, T]`` 0/1 mask (no host sync)."""
    return (attention_mask.cumsum(dim=-1) == 0).sum(dim=-1).to(torch.int32)


def decoder_attention(
    q: torch.Tensor,  # [B, H, S, D] rotated queries: the last S of the T key positions
    k: torch.Tensor,  # [B, H_kv, T, D] cache + new keys
    v: torch.Tensor,  # [B, H_kv, T, D]
    attention_mask: torch.Tensor,  # [B, T] 1 = real token, 0 = left padding
    scale: float,
) -> torch.Tensor:  # [B, H, S, D]
    """Causal, left-padding-masked attention for ``decodekit.models.Decoder(use_kernels=True)``.

    Left padding becomes the kernels' per-row ``kv_start`` (the count of leading zeros). Only left
    padding is supported: a mask with zeros after the first one is rejected with ``ValueError`` when it
    lives on the CPU; on CUDA it is not inspected (that would sync) and such zeros are ignored. Query rows
    at padding positions see no key and come out as zeros (the reference path gives them a uniform
    average instead; neither reaches a real token). Steps of at most 16 new tokens after a non-empty
    cache use the split-K decode kernel; longer chunks use the prefill kernel with ``q_offset = T - S``.
    Backend: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, the PyTorch path otherwise.
    """
    s, t = q.shape[2], k.shape[2]
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (q.shape[0], t):
        raise ValueError(f"attention_mask must have shape [{q.shape[0]}, {t}], got {tuple(attention_mask.shape)}")
    kv_start = left_padding_starts(attention_mask)
    if attention_mask.device.type == "cpu" and not compiling():  # a host check: skipped in compiled code
        left_padded = torch.arange(t)[None, :] >= kv_start[:, None]
        if not torch.equal(attention_mask.bool(), left_padded):
            raise ValueError("attention_mask: use_kernels=True supports left padding only (zeros before the tokens)")
    backend = "triton" if q.device.type == "cuda" or interpreter_enabled() else "torch"
    if s < t and s <= MAX_DECODE_QUERIES:
        seqlens = torch.full((q.shape[0],), t, dtype=torch.int32, device=q.device)
        return decode_attention(q, k, v, seqlens, scale, kv_start=kv_start, backend=backend)
    return attention(q, k, v, causal=True, scale=scale, q_offset=t - s, kv_start=kv_start, backend=backend)
