"""The single place where both decoder families compute attention.

:func:`attend` takes rotated queries and the FULL keys/values (cache + new tokens) and returns the
attention output. The mask it applies is the combination of

* causality: the ``S`` queries are the LAST ``S`` of the ``T = P + S`` key positions, so query ``i`` sees
  keys ``j <= P + i``;
* key padding: ``attention_mask[b, j] == 0`` hides key ``j`` of row ``b`` (left padding in a batch).

Masked scores are set to the most negative finite fp32 value instead of ``-inf``: a query row whose keys
are all masked (a left-padding position) then gets a harmless uniform average rather than NaN, so nothing
non-finite ever reaches the KV cache. Grouped-query attention is computed by viewing the ``group`` query
heads that share a KV head as one ``[B, H_kv, group * S, D]`` block (no ``repeat_interleave`` copy of the
keys/values, and only 4-D matmuls, which keeps the exported graph small).

``use_kernels=True`` routes to :func:`kernel_attend`, the hook the fused Triton attention kernels
(``decodekit.attention`` for prefill, ``decodekit.decode_attention`` for one-token steps) plug into.
"""

from __future__ import annotations

import torch


def attention_keep_mask(
    attention_mask: torch.Tensor, seq_len: int, group: int = 1, causal: bool = True
) -> torch.Tensor:
    """Boolean ``[B, 1, group * S, T]``: True where a query may attend a key (causal AND not padding; with
    ``causal=False``, every key that is not padding: a bidirectional model).

    Rows are ordered ``(g, s)`` with ``s`` fastest, matching queries viewed as ``[B, H_kv, group * S, D]``.
    Computed once per forward and shared by all layers.
    """
    if not causal:
        keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, group * seq_len, -1)
        return keep
    t = attention_mask.shape[1]
    query_pos = torch.arange(seq_len, device=attention_mask.device) + (t - seq_len)  # index among the keys
    key_pos = torch.arange(t, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    keep = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, T]
    return keep.repeat(1, 1, group, 1) if group > 1 else keep


def attend_reference(
    q: torch.Tensor,  # [B, H, S, D] queries (already rotated)
    k: torch.Tensor,  # [B, H_kv, T, D] keys of the cache + the new tokens (T = P + S)
    v: torch.Tensor,  # [B, H_kv, T, D] values
    attention_mask: torch.Tensor,  # [B, T] 1 = real token, 0 = padding
    scale: float,
    keep: torch.Tensor | None = None,  # [B, 1, G*S, T] from attention_keep_mask (computed when None)
) -> torch.Tensor:  # [B, H, S, D]
    """Causal, key-padding-masked, grouped-query softmax attention in plain PyTorch (fp32 softmax)."""
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    if keep is None:
        keep = attention_keep_mask(attention_mask, s, group)
    qg = q.reshape(b, h_kv, group * s, d)  # query heads of one KV head side by side: plain 4-D matmuls
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, H_kv, G*S, T]
    if scores.dtype != torch.float32:
        scores = scores.float()
    scores = (scores * scale).masked_fill(~keep, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, s, d)


def kernel_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Hook for the fused attention kernels (same contract as :func:`attend_reference`, left padding only).

    Runs :func:`decodekit.ops.attention.decoder_attention`: ``decodekit.attention`` (prefill) and
    ``decodekit.decode_attention`` (steps of a few tokens), with left padding as a per-row key start.
    """
    from decodekit.ops.attention import decoder_attention

    return decoder_attention(q, k, v, attention_mask, scale)


def attend(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, H_kv, T, D]
    v: torch.Tensor,  # [B, H_kv, T, D]
    attention_mask: torch.Tensor,  # [B, T]
    *,
    scale: float,
    use_kernels: bool = False,
    keep: torch.Tensor | None = None,  # [B, 1, G*S, T] precomputed attention_keep_mask (reference path only)
) -> torch.Tensor:  # [B, H, S, D]
    """Attention used by every decoder block; see the module docstring for the mask semantics."""
    if use_kernels:
        return kernel_attend(q, k, v, attention_mask, scale)
    return attend_reference(q, k, v, attention_mask, scale, keep)
