"""Attention kernels: FlashAttention-2 style prefill (forward + backward) and split-K decode over a KV cache.

Prefill (:func:`attention`). One program owns a tile of ``BLOCK_M`` queries of one (batch, head) and
streams the keys and values of the matching key/value head through on-chip memory in tiles of
``BLOCK_N``. For each tile it computes the scores with one ``tl.dot``, updates a running row maximum
and row sum (the *online softmax*, in fp32 and in the base-2 domain so the exponential is a single
``exp2``) and rescales the fp32 accumulator. The ``S_q x S_k`` score matrix never reaches memory:
the kernel reads Q, K, V once per query tile and writes O (and the log-sum-exp) once, so the work is
bound by the tensor cores rather than by memory traffic. Grouped-query attention is an index map
(query head ``h`` reads key/value head ``h // group``), never a copy. Causal tiles above the diagonal
are skipped, and only the tiles on the diagonal (or at the ragged end of the keys) pay for masking.
The backward pass recomputes the probabilities from the saved log-sum-exp (FlashAttention-2): a
small kernel forms ``delta = rowsum(dO * O)``, one kernel per key tile accumulates dK and dV over all
query heads of its group and all query tiles (so the GQA gradient sum needs no atomics), and one
kernel per query tile accumulates dQ.

Decode (:func:`decode_attention`). With one (or a few) new queries per sequence, attention is a
memory-bound read of the KV cache, and a grid of ``batch x kv_heads`` programs is far too small to
keep a GPU busy at small batch. *Flash-decoding* splits each cache into ``num_splits`` chunks read by
separate programs (stage 1), each producing a partial output and its log-sum-exp; stage 2 merges
the partials with the usual rescaling. All query heads that share a key/value head (and all the
few new queries) are packed into the rows of one ``[rows, D]`` tile, so each cache byte is read
once per group and the score computation is a real ``tl.dot``. Per-row valid lengths come from
``cache_seqlens`` on the device: the launch plan only uses ``S_max``, so there is no host sync and the
call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from decodekit.ops._dispatch import interpreter_enabled, record_launch, register_budget

# ``maxnreg`` of the backward's row-wise dot(out, dout), which streams (16 warps per SM: its floor in
# tests/ops/test_compile_sm90.py). Without it Blackwell's ptxas spills 16-32 bytes at 48 registers.
MAXNREG_STREAM = register_budget(16)

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- block-size heuristics


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters chosen by :func:`attention_config`."""

    block_m: int  # query rows per program (prefill)
    block_n: int  # keys per inner-loop tile
    block_d: int  # head dim padded to a power of two (>= 16)
    num_warps: int
    num_stages: int
    num_splits: int = 1  # decode only: cache chunks per (batch, kv head)
    chunk_size: int = 0  # decode only: keys per split (a multiple of block_n)
    block_r: int = 0  # decode only: packed (query head, query) rows, padded to >= 16
    maxnreg: int | None = None  # registers per thread stated to ptxas for the forward / dK/dV kernel (None: its choice)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attention_config(
    op: str,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    batch: int = 1,
    kv_heads: int = 1,
    s_max: int = 1,
    rows: int = 1,
    num_splits: int | None = None,
    kv_start: bool = False,
) -> AttentionConfig:
    """The one block-size heuristic for every attention kernel in this file.

    ``op`` is ``"fwd"``, ``"bwd"`` or ``"decode"``. Tiles shrink with the head dim and for fp32 (twice
    the shared memory per element). Under Triton's interpreter every tile op is one numpy call per
    program, so the cost is the number of (program, loop step) pairs: 64 x 64 tiles measured 3-4x faster
    than 32 x 32 there (and 16 x 16 another 5x slower), so the interpreter uses 64 x 64 for prefill. For decode, ``num_splits`` (unless given)
    targets about two programs per multiprocessor (a fixed count of 1 multiprocessor off-GPU), never
    fewer than one key tile per split; it depends on ``batch``, ``kv_heads`` and ``s_max`` only, never on
    the per-row lengths, so choosing it does not sync. ``kv_start``: the launch passes per-row key starts (its
    register budget can differ).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = dtype == torch.float32
    if interpreter_enabled() or device.type != "cuda":
        block_m, block_n, warps, stages = 64, 64, 4, 1
    elif op == "fwd":
        if block_d <= 64:
            block_m, block_n, warps, stages = 128, 64, 4, 3
        elif block_d <= 128:
            block_m, block_n, warps, stages = 128, 64, 8, 3
        else:
            block_m, block_n, warps, stages = 64, 32, 8, 2
        if wide:  # fp32 "ieee" dots keep their operands in registers: wider tiles spill (sm_90 / sm_100 compiles)
            block_m, block_n = 32, 32 if block_d <= 64 else 16
    elif op == "bwd":
        # 8 warps even at head dim 64: with 4 the dK/dV/K/V tiles take 255 registers per thread (spilling under
        # triton 3.6's ptxas, sm_90 compile)
        if block_d <= 128:
            block_m, block_n, warps, stages = 64, 64, 8, 2
        else:
            block_m, block_n, warps, stages = 32, 32, 8, 1
        if wide:  # fp32: half the tiles, and 16 keys per step (32 spills at head dim 64 on sm_90); 8 warps (at 4
            # the ieee dots' operands take 255 registers and spill)
            block_m, block_n, warps = max(16, block_m // 2), 16, 8
    else:  # decode: memory bound; wide key tiles keep many loads in flight
        block_m = 0
        block_n = 64 if block_d <= 128 else 32
        warps, stages = 4, 3
        if wide:  # fp32: 32 keys of a head dim over 64 spill registers (sm_90 compile)
            block_n, stages = 32 if block_d <= 64 else 16, 2
    if op != "decode":
        # Register budgets stated to ptxas where, left to choose, it keeps 8-16 bytes in local memory at 64-80
        # registers (sm_90 / sm_100 compiles, triton 3.6-3.9): the fp32 dK/dV kernel at head dims 64 and 256, and
        # the fp32 forward at head dim 128 with key starts. Elsewhere a budget makes it worse (ptxas fills it and
        # spills; measured for 80-255 registers), so the others state none. 104 = the smallest clean on all three.
        maxnreg = None
        if wide and op == "bwd" and block_d != 128:
            maxnreg = register_budget(16)
        elif wide and op == "fwd" and block_d == 128 and kv_start:
            maxnreg = 104
        return AttentionConfig(block_m, block_n, block_d, warps, stages, maxnreg=maxnreg)
    if interpreter_enabled() or device.type != "cuda":
        block_n = 16
    block_r = max(16, triton.next_power_of_2(rows))
    if wide and block_r * block_d > 2048 and device.type == "cuda" and not interpreter_enabled():
        warps = 8  # fp32 query rows x head dim over 2048 elements: 4 warps spill (255 registers, sm_90 compile)
    n_tiles = triton.cdiv(max(s_max, 1), block_n)
    if num_splits is None:
        sms = _multiprocessor_count(device.index or 0) if device.type == "cuda" else 1
        num_splits = triton.cdiv(2 * sms, max(1, batch * kv_heads))
        num_splits = max(1, min(num_splits, n_tiles, 128))
    num_splits = max(1, min(num_splits, n_tiles))
    chunk = triton.cdiv(n_tiles, num_splits) * block_n
    num_splits = triton.cdiv(max(s_max, 1), chunk)  # drop splits that would start past S_max
    return AttentionConfig(0, block_n, block_d, warps, stages, num_splits, chunk, block_r)


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """constexpr flags for :func:`_mma`.

    fp32 inputs multiply with ``"ieee"`` precision (tf32 would lose ~3 decimal digits); fp16/bf16 use the
    default (``None``). Triton's interpreter mis-evaluates ``tl.dot`` on bf16 operands (triton 3.8
    returns garbage), so under the interpreter bf16 tiles are widened to fp32 first: bf16 products are
    exact in fp32, which is what the tensor cores compute on a GPU.
    """
    upcast = dtype == torch.bfloat16 and interpreter_enabled()
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else None, "DOT_UPCAST": upcast}


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation; see :func:`_dot_flags` for the two flags."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


# --------------------------------------------------------------------------- prefill forward


@triton.jit
def _attn_fwd_inner(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running output (unnormalized)
    l_i,  # [BLOCK_M] fp32 running sum of exp2
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    q,  # [BLOCK_M, BLOCK_D] query tile
    k_base,  # K pointer at (b, kv head)
    v_base,  # V pointer at (b, kv head)
    offs_m,  # [BLOCK_M] query positions
    offs_n0,  # [BLOCK_N] arange
    offs_d,  # [BLOCK_D] arange
    m_valid,  # [BLOCK_M] query row < S_q
    d_valid,  # [BLOCK_D] lane < D
    lo,  # first key of the range (multiple of BLOCK_N)
    hi,  # end of the key range
    S_k,  # number of keys
    q_offset,  # key position of query 0
    kv_start,  # first visible key (used when HAS_KV_START)
    sm_scale_log2,  # scale * log2(e)
    stride_kn, stride_kd, stride_vn, stride_vd,  # K / V strides along keys and head dim
    MASKED: tl.constexpr,  # apply bounds / causal / kv_start masks (False: every key of the range is visible)
    CAUSAL: tl.constexpr,  # causal mask (when MASKED)
    HAS_KV_START: tl.constexpr,  # kv_start mask (when MASKED)
    DOT_PRECISION: tl.constexpr,  # see _mma
    DOT_UPCAST: tl.constexpr,  # see _mma
    BLOCK_N: tl.constexpr,  # keys per loop step (= offs_n0's length)
):
    """Stream key/value tiles ``[lo, hi)`` through the online softmax; returns the updated (acc, l_i, m_i)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            n_valid = offs_n < S_k
            kt = tl.load(kt_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            kt = tl.load(kt_ptrs, mask=d_valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        qk = _mma(q, kt, DOT_PRECISION, DOT_UPCAST) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)
            if HAS_KV_START:
                visible = visible & (offs_n[None, :] >= kv_start)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with nothing visible yet keeps max -inf; shift by 0 so exp2 sees -inf - 0, never -inf + inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B, H, S_q, D] queries
    K,  # [B, H_kv, S_k, D] keys
    V,  # [B, H_kv, S_k, D] values
    O,  # [B, H, S_q, D] output (same dtype as Q)
    LSE,  # [B, H, S_q] fp32 natural-log log-sum-exp (written when STORE_LSE), contiguous
    KV_START,  # [B] int first visible key per batch row (read when HAS_KV_START)
    sm_scale_log2,  # softmax scale * log2(e): scores go straight to the exp2 domain
    q_offset,  # key position of query 0 (causal mask: k_pos <= q_pos + q_offset)
    S_q,  # number of queries
    S_k,  # number of keys
    D,  # head dim (<= BLOCK_D)
    H,  # query heads
    GROUP,  # query heads per key/value head
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_ob, stride_oh, stride_om, stride_od,  # O strides
    CAUSAL: tl.constexpr,  # apply the causal mask (and skip tiles above the diagonal)
    HAS_KV_START: tl.constexpr,  # apply the per-row key start
    STORE_LSE: tl.constexpr,  # write LSE
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # padded head dim
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16: multiply in fp32 (see _mma)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP  # GQA: index map, no repeated k/v
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_valid = offs_m < S_q
    d_valid = offs_d < D  # padded head-dim lanes load 0 and contribute nothing to q.k

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = S_k
    if CAUSAL:
        # the last query of this tile sees keys < (pid_m + 1) * BLOCK_M + q_offset: later tiles are all masked
        hi = tl.maximum(tl.minimum(S_k, (pid_m + 1) * BLOCK_M + q_offset), 0)
    if HAS_KV_START:
        # left padding is rare: every tile takes the masked path, starting at the tile holding kv_start
        kv_start = tl.load(KV_START + b).to(tl.int32)
        lo = (tl.maximum(kv_start, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, m_valid, d_valid, lo, hi, S_k, q_offset,
            kv_start, sm_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
            True, CAUSAL, True, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
        )  # fmt: skip
    else:
        # phase 1: tiles every query of this tile sees entirely (inside S_k, below the diagonal): no mask work
        n_full = (S_k // BLOCK_N) * BLOCK_N
        if CAUSAL:
            first_limit = tl.maximum(pid_m * BLOCK_M + q_offset + 1, 0)  # keys visible to the tile's first query
            n_full = tl.minimum(n_full, (first_limit // BLOCK_N) * BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, m_valid, d_valid, 0, n_full, S_k, q_offset,
            0, sm_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
            False, CAUSAL, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
        )  # fmt: skip
        # phase 2: the diagonal tiles and the ragged end of the keys, masked
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, offs_m, offs_n0, offs_d, m_valid, d_valid, n_full, hi, S_k, q_offset,
            0, sm_scale_log2, stride_kn, stride_kd, stride_vn, stride_vd,
            True, CAUSAL, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
        )  # fmt: skip

    empty = l_i == 0.0  # no visible key: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # back to natural log
        tl.store(LSE + pid_bh * S_q + offs_m, lse, mask=m_valid)


# --------------------------------------------------------------------------- prefill backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,  # [B, H, S_q, D] forward output
    DO,  # [B, H, S_q, D] output gradient
    DELTA,  # [B, H, S_q] fp32 out: rowsum(dO * O), contiguous
    S_q,  # number of queries
    D,  # head dim
    H,  # query heads
    stride_ob, stride_oh, stride_om, stride_od,  # O strides
    stride_db, stride_dh, stride_dm, stride_dd,  # DO strides
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_D: tl.constexpr,  # padded head dim
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S_q)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * S_q + offs_m, tl.sum(o * do, 1), mask=offs_m < S_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # [B, H, S_q, D]
    K,  # [B, H_kv, S_k, D]
    V,  # [B, H_kv, S_k, D]
    DO,  # [B, H, S_q, D] output gradient
    LSE,  # [B, H, S_q] fp32 natural-log lse from the forward, contiguous
    DELTA,  # [B, H, S_q] fp32 rowsum(dO * O), contiguous
    DK,  # [B, H_kv, S_k, D] out, contiguous
    DV,  # [B, H_kv, S_k, D] out, contiguous
    KV_START,  # [B] int first visible key (read when HAS_KV_START)
    sm_scale,  # softmax scale (natural)
    q_offset,  # key position of query 0
    S_q, S_k, D,  # sizes
    H_kv,  # key/value heads
    GROUP,  # query heads per key/value head
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_db, stride_dh, stride_dm, stride_dd,  # DO strides
    CAUSAL: tl.constexpr,  # causal mask
    HAS_KV_START: tl.constexpr,  # per-row key start
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # padded head dim
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16: multiply in fp32 (see _mma)
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1).to(tl.int64)
    b = pid_bhk // H_kv
    hk = pid_bhk % H_kv
    H = H_kv * GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S_k
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    sm_scale_log2 = sm_scale * 1.4426950408889634
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
    lo = 0
    if CAUSAL:
        # queries before q_pos = first key - q_offset see none of this tile
        lo = (tl.maximum(pid_n * BLOCK_N - q_offset, 0) // BLOCK_M) * BLOCK_M

    for g in range(0, GROUP):  # every query head of the group: the GQA gradient sum, without atomics
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        row_base = (b * H + h) * S_q
        for start_m in range(lo, S_q, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < S_q
            qd_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=qd_mask, other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows without keys: p = 0
            delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
            qkT = _mma(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * sm_scale_log2  # [BLOCK_N, BLOCK_M]
            visible = n_valid[:, None] & m_valid[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + q_offset)
            if HAS_KV_START:
                visible = visible & (offs_n[:, None] >= kv_start)
            pT = tl.where(visible, tl.exp2(qkT - lse2[None, :]), 0.0)  # recomputed probabilities P^T
            dv += _mma(pT.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)
            dpT = _mma(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)  # (dO V^T)^T  [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])  # softmax backward
            dk += _mma(dsT.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)

    out_off = pid_bhk * S_k * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # [B, H, S_q, D]
    K,  # [B, H_kv, S_k, D]
    V,  # [B, H_kv, S_k, D]
    DO,  # [B, H, S_q, D] output gradient
    LSE,  # [B, H, S_q] fp32 natural-log lse, contiguous
    DELTA,  # [B, H, S_q] fp32 rowsum(dO * O), contiguous
    DQ,  # [B, H, S_q, D] out, contiguous
    KV_START,  # [B] int first visible key (read when HAS_KV_START)
    sm_scale,  # softmax scale (natural)
    q_offset,  # key position of query 0
    S_q, S_k, D,  # sizes
    H,  # query heads
    GROUP,  # query heads per key/value head
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_db, stride_dh, stride_dm, stride_dd,  # DO strides
    CAUSAL: tl.constexpr,  # causal mask
    HAS_KV_START: tl.constexpr,  # per-row key start
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # padded head dim
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16: multiply in fp32 (see _mma)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S_q
    d_valid = offs_d < D
    qd_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse2 = tl.load(LSE + pid_bh * S_q + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + pid_bh * S_q + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sm_scale_log2 = sm_scale * 1.4426950408889634

    lo = 0
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
        lo = (tl.maximum(kv_start, 0) // BLOCK_N) * BLOCK_N
    hi = S_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S_k, (pid_m + 1) * BLOCK_M + q_offset), 0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < S_k
        t_mask = n_valid[None, :] & d_valid[:, None]
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=t_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=t_mask, other=0.0)
        qk = _mma(q, kt, DOT_PRECISION, DOT_UPCAST) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        visible = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)
        if HAS_KV_START:
            visible = visible & (offs_n[None, :] >= kv_start)
        p = tl.where(visible, tl.exp2(qk - lse2[:, None]), 0.0)
        dp = _mma(do, vt, DOT_PRECISION, DOT_UPCAST)  # dO V^T  [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(kt.dtype), tl.trans(kt), DOT_PRECISION, DOT_UPCAST)

    tl.store(DQ + pid_bh * S_q * D + offs_m[:, None] * D + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------- prefill launchers


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    q_offset: int,
    kv_start: torch.Tensor | None,
    store_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on validated inputs; returns (out ``[B, H, S_q, D]``, lse ``[B, H, S_q]`` or None)."""
    B, H, S_q, D = q.shape
    H_kv, S_k = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, S_q), device=q.device, dtype=torch.float32) if store_lse else None
    if out.numel() == 0:
        return out, lse
    cfg = attention_config("fwd", D, q.dtype, q.device, kv_start=kv_start is not None)
    grid = (triton.cdiv(S_q, cfg.block_m), B * H)
    record_launch("attn_fwd")
    _attn_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else out, kv_start if kv_start is not None else out,
        scale * _LOG2E, q_offset, S_q, S_k, D, H, H // H_kv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        CAUSAL=causal, HAS_KV_START=kv_start is not None, STORE_LSE=store_lse,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **_dot_flags(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    return out, lse


def _attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    q_offset: int,
    kv_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels; returns (dq, dk, dv), contiguous, in the inputs' dtype."""
    B, H, S_q, D = q.shape
    H_kv, S_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = attention_config("bwd", D, q.dtype, q.device)
    delta = torch.empty((B, H, S_q), device=q.device, dtype=torch.float32)
    flags = _dot_flags(q.dtype)
    ks = kv_start if kv_start is not None else lse
    record_launch("attn_bwd_preprocess")
    _attn_bwd_preprocess_kernel[(triton.cdiv(S_q, cfg.block_m), B * H)](
        out, do, delta, S_q, D, H, *_strides(out), *_strides(do), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        maxnreg=MAXNREG_STREAM,
    )  # fmt: skip
    record_launch("attn_bwd_dkdv")
    _attn_bwd_dkdv_kernel[(triton.cdiv(S_k, cfg.block_n), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv, ks, scale, q_offset, S_q, S_k, D, H_kv, H // H_kv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        CAUSAL=causal, HAS_KV_START=kv_start is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    record_launch("attn_bwd_dq")
    _attn_bwd_dq_kernel[(triton.cdiv(S_q, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, ks, scale, q_offset, S_q, S_k, D, H, H // H_kv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        CAUSAL=causal, HAS_KV_START=kv_start is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------- decode kernels


@triton.jit
def _decode_split_kernel(
    Q,  # [B, H, S_q, D] new queries (the last S_q positions of each row)
    K,  # [B, H_kv, S_max, D] key cache
    V,  # [B, H_kv, S_max, D] value cache
    SEQLENS,  # [B] int valid cache length per row
    KV_START,  # [B] int first visible key per row (read when HAS_KV_START)
    O_PART,  # [B, H, S_q, NUM_SPLITS, D] fp32 out: partial outputs, contiguous
    LSE_PART,  # [B, H, S_q, NUM_SPLITS] fp32 out: partial log2-domain lse, contiguous
    sm_scale_log2,  # softmax scale * log2(e)
    S_q,  # new queries per row
    S_max,  # cache capacity
    D,  # head dim
    H,  # query heads
    GROUP,  # query heads per key/value head
    chunk_size,  # keys per split (multiple of BLOCK_N)
    NUM_SPLITS,  # splits per (row, kv head)
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    HAS_KV_START: tl.constexpr,  # per-row key start
    BLOCK_R: tl.constexpr,  # packed rows (GROUP * S_q, padded to >= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # padded head dim
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32
    DOT_UPCAST: tl.constexpr,  # interpreter + bf16: multiply in fp32 (see _mma)
):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_R)  # row r = (query head hk*GROUP + r // S_q, query r % S_q)
    r_valid = rows < GROUP * S_q
    h = hk * GROUP + rows // S_q  # [BLOCK_R] int64
    qi = rows % S_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_valid = offs_d < D
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=r_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]

    # lengths are clamped to [0, S_max] here so an unchecked bad length can never read out of bounds
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), S_max)
    limit = seqlen - S_q + 1 + qi  # [BLOCK_R] query i sees keys < limit
    start = split * chunk_size
    end = tl.minimum(start + chunk_size, seqlen)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + b).to(tl.int32)
        start = tl.maximum(start, (tl.maximum(kv_start, 0) // BLOCK_N) * BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < end
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = _mma(q, kt, DOT_PRECISION, DOT_UPCAST) * sm_scale_log2  # [BLOCK_R, BLOCK_N]
        visible = n_valid[None, :] & (offs_n[None, :] < limit[:, None])
        if HAS_KV_START:
            visible = visible & (offs_n[None, :] >= kv_start)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # empty split (past the row's length) or nothing visible: weight 0 in the merge
    l_safe = tl.where(empty, 1.0, l_i)
    part = ((b * H + h) * S_q + qi) * NUM_SPLITS + split  # [BLOCK_R] int64 index into [B, H, S_q, NUM_SPLITS]
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
             mask=r_valid[:, None] & d_valid[None, :])
    tl.store(LSE_PART + part, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=r_valid)


@triton.jit
def _decode_merge_kernel(
    O_PART,  # [B*H*S_q, NUM_SPLITS, D] fp32 partial outputs
    LSE_PART,  # [B*H*S_q, NUM_SPLITS] fp32 partial log2-domain lse
    O,  # [B*H*S_q, D] output (q dtype), contiguous
    D,  # head dim
    NUM_SPLITS,  # splits to merge
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
    BLOCK_D: tl.constexpr,  # padded head dim
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < NUM_SPLITS
    d_valid = offs_d < D
    lse = tl.load(LSE_PART + row * NUM_SPLITS + offs_s, mask=s_valid, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0, output 0
    w = tl.exp2(lse - m)  # each split's share of the softmax denominator (relative to the max)
    denom = tl.sum(w, 0)
    o = tl.load(O_PART + (row * NUM_SPLITS + offs_s[:, None]) * D + offs_d[None, :],
                mask=s_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + row * D + offs_d, out.to(O.dtype.element_ty), mask=d_valid)


# --------------------------------------------------------------------------- decode launcher


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None,
    num_splits: int | None,
) -> torch.Tensor:
    """Launch split + merge on validated inputs -> ``[B, H, S_q, D]``."""
    B, H, S_q, D = q.shape
    H_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((B, H, S_q, D), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    group = H // H_kv
    cfg = attention_config(
        "decode", D, q.dtype, q.device, batch=B, kv_heads=H_kv, s_max=S_max, rows=group * S_q, num_splits=num_splits
    )
    o_part = torch.empty((B, H, S_q, cfg.num_splits, D), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((B, H, S_q, cfg.num_splits), device=q.device, dtype=torch.float32)
    seqlens = cache_seqlens.contiguous()
    record_launch("decode_split")
    _decode_split_kernel[(B, H_kv, cfg.num_splits)](
        q, k_cache, v_cache, seqlens, kv_start if kv_start is not None else seqlens, o_part, lse_part,
        scale * _LOG2E, S_q, S_max, D, H, group, cfg.chunk_size, cfg.num_splits,
        *_strides(q), *_strides(k_cache), *_strides(v_cache),
        HAS_KV_START=kv_start is not None, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        **_dot_flags(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    record_launch("decode_merge")
    _decode_merge_kernel[(B * H * S_q,)](
        o_part, lse_part, out, D, cfg.num_splits,
        BLOCK_S=triton.next_power_of_2(cfg.num_splits), BLOCK_D=cfg.block_d, num_warps=4 if D > 64 else 2,
    )  # fmt: skip
    return out
