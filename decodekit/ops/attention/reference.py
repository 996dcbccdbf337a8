"""Reference semantics of decodekit's attention ops, written for clarity (plain matmul + softmax).

Tests and benchmarks compare the Triton kernels against these functions. They materialize the full
``[S_q, S_k]`` score matrix, so they are only meant for small shapes.

Conventions shared with :mod:`decodekit.ops.attention`:

* layouts are those of ``torch.nn.functional.scaled_dot_product_attention``: ``q [B, H, S_q, D]``,
  ``k``/``v`` ``[B, H_kv, S_k, D]``; grouped-query attention maps query head ``h`` to key/value head
  ``h // (H // H_kv)`` (here done by repeating k/v, which the kernels never do);
* causal masking with ``q_offset``: query ``i`` sits at key position ``i + q_offset`` and sees the
  keys ``j <= i + q_offset`` (``q_offset = S_k - S_q`` puts the queries at the end of the keys);
* ``kv_start`` (optional, int ``[B]``): keys ``j < kv_start[b]`` are hidden from every query of row
  ``b`` (left padding);
* a query that sees no key at all gets an all-zero output and a log-sum-exp of ``-inf`` (never NaN).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, restricted to ``visible``) @ v; returns (out, lse) with zero / -inf on empty rows."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, S_q, S_k]
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul((p / torch.where(denom == 0, torch.ones_like(denom), denom)).to(v.dtype), v)
    lse = (torch.log(denom) + row_max).squeeze(-1)  # log(0) = -inf for rows without visible keys
    return out, lse


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    q_offset: int = 0,
    *,
    kv_start: torch.Tensor | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention by plain matmuls and softmax.

    Parameters
    ----------
    q : ``[B, H, S_q, D]``; k, v : ``[B, H_kv, S_k, D]`` with ``H % H_kv == 0``.
    causal : mask key ``j`` from query ``i`` unless ``j <= i + q_offset``.
    scale : score scale, default ``D ** -0.5``.
    q_offset : position of the first query inside the key sequence (causal only).
    kv_start : optional int ``[B]``; keys before it are hidden (left padding).
    upcast : compute in float32 (float64 stays float64) and return that precision; ``False`` computes
        in the inputs' dtype (PyTorch's own low-precision result, the yardstick for the kernels' error).
    return_lse : also return the natural-log log-sum-exp of the scaled scores, ``[B, H, S_q]``.
    """
    dtype = _compute_dtype(q.dtype, upcast)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    s_q, s_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_pos = torch.arange(s_q, device=q.device)[:, None] + q_offset
    k_pos = torch.arange(s_k, device=q.device)[None, :]
    visible = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = k_pos <= q_pos
    visible = visible[None, None]  # [1, 1, S_q, S_k]
    if kv_start is not None:
        visible = visible & (k_pos[None, None] >= kv_start.to(q.device).view(-1, 1, 1, 1))
    out, lse = _masked_softmax_attention(q, k, v, visible, scale)
    return (out, lse) if return_lse else out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    *,
    kv_start: torch.Tensor | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries over a KV cache with a valid length per batch row.

    Parameters
    ----------
    q : ``[B, H, S_q, D]``, the last ``S_q`` positions of each row (already written into the cache).
    k_cache, v_cache : ``[B, H_kv, S_max, D]``.
    cache_seqlens : int ``[B]``, valid cache length per row (``0 <= L <= S_max``). Query ``i`` sees the
        keys ``j < L - S_q + 1 + i`` (and ``j >= kv_start[b]`` when given).
    upcast, return_lse : as in :func:`attention_ref`.
    """
    dtype = _compute_dtype(q.dtype, upcast)
    q, k, v = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    s_q, s_max = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lens = cache_seqlens.to(device=q.device, dtype=torch.long).view(-1, 1, 1, 1)
    i = torch.arange(s_q, device=q.device).view(1, 1, -1, 1)
    j = torch.arange(s_max, device=q.device).view(1, 1, 1, -1)
    visible = j < lens - s_q + 1 + i  # [B, 1, S_q, S_max]
    if kv_start is not None:
        visible = visible & (j >= kv_start.to(q.device).view(-1, 1, 1, 1))
    out, lse = _masked_softmax_attention(q, k, v, visible, scale)
    return (out, lse) if return_lse else out


def attention_flops(batch: int, heads: int, s_q: int, s_k: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention counted as 2 matmuls of ``2*S_q*S_k*D`` each, halved for causal square masks."""
    flops = 4.0 * batch * heads * s_q * s_k * head_dim
    return flops / 2 if causal else flops


__all__ = ["attention_ref", "decode_attention_ref", "attention_flops"]
