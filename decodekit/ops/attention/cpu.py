"""The PyTorch path of the attention family: ``scaled_dot_product_attention`` under the masks decodekit's kernels imply.

SDPA picks PyTorch's best CPU kernel (flash or math) and brings its own autograd; only ``q_offset``, ``kv_start``
and per-row cache lengths need an explicit boolean mask. Rows that see no key come out as exact zeros, as in the
kernels.
"""

from __future__ import annotations

import torch


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float):
    group = q.shape[1] // k.shape[1]
    if group > 1:
        try:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )
        except TypeError:  # torch < 2.5: no enable_gqa
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """SDPA under a boolean mask ``[B|1, 1, S_q, S_k]``; rows with no visible key become exact zeros."""
    out = _sdpa(q, k, v, visible, False, scale)
    return torch.where(visible.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (empty) output when ``q`` has no element: SDPA refuses zero query heads against non-zero kv heads (its
    GQA broadcast), which validation accepts and the kernels answer with an empty tensor. Built from q, k and v
    (all times zero) so that autograd still connects them."""
    return (q * 0 + (k.sum() + v.sum()).to(q.dtype) * 0).contiguous()


def attention(q, k, v, causal, scale, q_offset, kv_start, return_lse):
    if q.numel() == 0:
        out = _empty(q, k, v)
        return (out, torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)) if return_lse else out
    if return_lse:
        if k.shape[2] == 0:  # no key at all: zeros (SDPA's answer) and lse = -inf (the reference needs a key)
            out = attention(q, k, v, causal, scale, q_offset, kv_start, False)
            return out, torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        from decodekit.ops.attention.reference import attention_ref

        out, lse = attention_ref(q, k, v, causal, scale, q_offset, kv_start=kv_start, return_lse=True)
        return out.to(q.dtype).contiguous(), lse.float()
    if kv_start is None and (not causal or q_offset == 0):
        # SDPA's causal mask is aligned top-left: q_offset == 0. Its output takes q's layout (a transposed
        # [B, S, H, D] view in, the same strides out); the op's output is contiguous on both backends.
        return _sdpa(q, k, v, None, causal, scale).contiguous()
    s_q, s_k = q.shape[2], k.shape[2]
    j = torch.arange(s_k, device=q.device)
    visible = torch.ones(1, 1, s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = (j[None, :] <= torch.arange(s_q, device=q.device)[:, None] + q_offset)[None, None]
    if kv_start is not None:
        visible = visible & (j.view(1, 1, 1, -1) >= kv_start.view(-1, 1, 1, 1))
    return _masked_sdpa(q, k, v, visible, scale).contiguous()


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale, kv_start):
    if q.numel() == 0:
        return _empty(q, k_cache, v_cache)
    s_q, s_max = q.shape[2], k_cache.shape[2]
    lens = cache_seqlens.to(torch.long).clamp(0, s_max).view(-1, 1, 1, 1)
    i = torch.arange(s_q, device=q.device).view(1, 1, -1, 1)
    j = torch.arange(s_max, device=q.device).view(1, 1, 1, -1)
    visible = j < lens - s_q + 1 + i  # [B, 1, S_q, S_max]
    if kv_start is not None:
        visible = visible & (j >= kv_start.view(-1, 1, 1, 1))
    return _masked_sdpa(q, k_cache, v_cache, visible, scale).contiguous()


def attention_backward(dout, q, k, v, causal, scale, q_offset, kv_start):
    """Gradients ``(dq, dk, dv)`` of :func:`attention` in plain PyTorch ops (fp32, rounded to the inputs' dtype).

    The probabilities are recomputed from ``q`` and ``k`` (nothing saved but the inputs); a query that sees no key
    has zero output and zero gradients, as in the kernels. Grouped-query heads are summed into their kv head.
    ``O(S_q * S_k)`` memory per head: the PyTorch path, for CPU tensors and tests.
    """
    B, H, s_q, D = q.shape
    H_kv, s_k = k.shape[1], k.shape[2]
    group = H // H_kv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    qf, do = q.float(), dout.float()
    j = torch.arange(s_k, device=q.device)
    visible = torch.ones(1, 1, s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = (j[None, :] <= torch.arange(s_q, device=q.device)[:, None] + q_offset)[None, None]
    if kv_start is not None:
        visible = visible & (j.view(1, 1, 1, -1) >= kv_start.view(-1, 1, 1, 1))
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.where(visible.any(dim=-1, keepdim=True), torch.softmax(s, dim=-1), 0.0)  # no key seen: zeros
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).view(B, H_kv, group, s_k, D).sum(dim=2)
    dv = (p.transpose(-1, -2) @ do).view(B, H_kv, group, s_k, D).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
