"""Fused LayerNorm/RMSNorm + Linear and GELU + Linear in ONE Triton kernel.

Algorithm. A pre-norm transformer normally runs ``h = norm(x)`` as one kernel that writes ``h`` ([M, K]) to
memory, then a GEMM reads it back to compute ``y = h @ W.T``. Here a single kernel does both. Each program
owns a ``BLOCK_M x BLOCK_N`` tile of ``y``:

1. *Statistics prologue*: it streams its ``BLOCK_M`` rows of ``x`` once over K and computes each row's mean
   and ``rstd`` in fp32 (LayerNorm merges per-chunk mean/M2 with Chan's formula on pivot-shifted data, so no
   catastrophic cancellation; RMSNorm only needs the sum of squares).
2. *Main loop*: for every K chunk it loads the raw ``x`` tile, normalizes it **in registers**
   (``(x - mean) * rstd * w + b``, or ``gelu(x)`` for GELU + Linear), casts it to the weight dtype and feeds it
   straight to ``tl.dot`` with the matching ``W`` tile, accumulating in fp32.
3. *Epilogue*: adds the bias and applies ``None | gelu | gelu_tanh | silu`` before the single store.

Why it is fast. The normalized activations never touch memory (saving a write and a read of ``M x K`` plus a
launch), which matters most at decode, where the whole op is a stream over the weight: a decode step is
memory-bound on ``W`` (``N x K``), the ``x`` rows are tiny and stay in L1/L2, so recomputing the row
statistics in every program is free next to the weight traffic. Decode shapes (M <= 64) get their own
autotuned configs with a small ``BLOCK_M`` (16/32/64, the smallest tensor-core tile) and narrow ``BLOCK_N``
so that enough programs stream the weight in parallel; prefill shapes get large compute-bound tiles with
grouped (L2-friendly) program ordering.

Autograd (registered on the ``torch.ops.decodekit.*_norm_linear`` custom ops in ``__init__.py``). The backward
does not keep the normalized activations: the forward stores ``x``'s fp32 row statistics (``STORE_STATS``) and
the pre-activation output when an epilogue activation is used (``STORE_PREACT``, exactly what an unfused
activation would keep), and :func:`decodekit.ops.norm_linear.cpu.norm_linear_backward` re-creates ``h`` from
them, with the GEMMs in ``torch.matmul``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from decodekit.ops._dispatch import interpreter_enabled, record_launch

_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
_NORM_NONE, _NORM_LAYER, _NORM_RMS = 0, 1, 2
_NORM_CODE = {None: _NORM_NONE, "layer": _NORM_LAYER, "rms": _NORM_RMS}

# --------------------------------------------------------------------------- Triton kernel


@triton.jit
def _apply_act(v, ACT: tl.constexpr):
    """Elementwise activation on an fp32 tile: 0 none, 1 exact GELU, 2 tanh GELU, 3 SiLU."""
    if ACT == 1:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed and no cancellation for large negative v
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = v / (1.0 + tl.exp(-2.0 * u))
    elif ACT == 3:
        v = v / (1.0 + tl.exp(-v))
    return v

@triton.jit
def _rtne_bf16(v):
    """Round fp32 to the nearest-even bf16 value, kept in fp32 (finite inputs).

    Interpreter-only helper: Triton's interpreter casts fp32 -> bf16 by truncation and its numpy ``dot``
    reads bf16 operands as raw uint16, while the GPU rounds to nearest-even and has bf16 tensor cores.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def _norm_linear_fwd_kernel(
    X,  # input rows [M, K]; row stride stride_xm, last dim contiguous; fp32/fp16/bf16
    NW,  # norm weight [K] (HAS_NORM_WEIGHT), any float dtype
    NB,  # norm bias [K] (HAS_NORM_BIAS), any float dtype
    W,  # linear weight, logical [N, K] with strides (stride_wn, stride_wk); same dtype as X
    B,  # linear bias [N] (HAS_BIAS)
    Y,  # output [M, N], row stride stride_ym, dtype of X
    Z,  # pre-activation output [M, N] (STORE_PREACT), same strides as Y
    MEAN,  # fp32 [M] row means (STORE_STATS and NORM == 1)
    RSTD,  # fp32 [M] row 1/std or 1/rms (STORE_STATS)
    M,  # rows of X (all leading dims flattened)
    N,  # output features
    K,  # input features
    stride_xm,  # elements between rows of X
    stride_wn,  # elements between rows (output features) of W
    stride_wk,  # elements between columns (input features) of W
    stride_ym,  # elements between rows of Y and Z
    eps,  # variance epsilon of the norm
    M_BUCKET,  # power-of-two bucket of M; only an autotune key
    NORM: tl.constexpr,  # 0 none, 1 LayerNorm, 2 RMSNorm
    PRO_ACT: tl.constexpr,  # activation applied to the x tile before the dot (GELU + Linear)
    EPI_ACT: tl.constexpr,  # activation applied to the output tile after the bias
    HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PREACT: tl.constexpr,  # also write the pre-activation output (for the backward)
    STORE_STATS: tl.constexpr,  # also write the row statistics (for the backward)
    INTERP_BF16: tl.constexpr,  # interpreter + bf16: emulate what the GPU does (see _rtne_bf16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-block group size of the L2-friendly program order
):
    # ---- program -> (pid_m, pid_n), grouped so consecutive programs share W tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < M
    col_mask = cols < N
    x_rows = X + rows[:, None] * stride_xm  # [BLOCK_M, 1] row pointers

    # ---- statistics prologue: one streaming pass over the BLOCK_M rows
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORM == 1:
        # Chan's parallel merge of per-chunk (mean, M2) on data shifted by each row's first element:
        # stays accurate when |mean| >> std (a naive E[x^2] - E[x]^2 in fp32 loses the variance there)
        pivot = tl.load(X + rows * stride_xm, mask=row_mask, other=0.0).to(tl.float32)  # [BLOCK_M]
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            xt = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            xt = tl.where(kmask[None, :], xt - pivot[:, None], 0.0)
            n_a = k0 * 1.0
            n_b = tl.minimum(K - k0, BLOCK_K) * 1.0
            mean_b = tl.sum(xt, axis=1) / n_b  # [BLOCK_M]
            dev = tl.where(kmask[None, :], xt - mean_b[:, None], 0.0)
            m2_b = tl.sum(dev * dev, axis=1)
            delta = mean_b - mean
            n_ab = n_a + n_b
            mean = mean + delta * (n_b / n_ab)
            m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
        mean = mean + pivot
        rstd = 1.0 / tl.sqrt(m2 / K + eps)
    elif NORM == 2:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            xt = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            sum_sq += tl.sum(xt * xt, axis=1)
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
    if STORE_STATS:
        # every column block computes the same statistics; only the first one writes them. A branch, not the
        # mask `row_mask & (pid_n == 0)`: the interpreter gives a tensor & scalar-comparison mask an int32
        # payload, which triton 3.9's interpreter rejects ("mask has unsupported dtype")
        if pid_n == 0:
            tl.store(RSTD + rows, rstd, mask=row_mask)
            if NORM == 1:
                tl.store(MEAN + rows, mean, mask=row_mask)

    # ---- main loop: normalize the x tile in registers, then tensor-core dot with the W tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_cols = W + cols[None, :] * stride_wn  # [1, BLOCK_N] column pointers of W.T
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if NORM == 1:
            h = (h - mean[:, None]) * rstd[:, None]
        elif NORM == 2:
            h = h * rstd[:, None]
        if HAS_NORM_WEIGHT:
            h = h * tl.load(NW + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            h = h + tl.load(NB + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        h = _apply_act(h, PRO_ACT)
        # masked K lanes must add exactly zero (LayerNorm maps a padded 0 to -mean * rstd)
        h = tl.where(kmask[None, :], h, 0.0)
        # int64 offsets: a transposed [K, N] weight view has stride_wk = N, and K * N may pass 2**31
        wt = tl.load(
            w_cols + ks[:, None].to(tl.int64) * stride_wk, mask=kmask[:, None] & col_mask[None, :], other=0.0
        )
        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]; "ieee" keeps fp32 inputs out of TF32 (no effect for 16-bit)
        if INTERP_BF16:
            # bf16 x bf16 products are exact in fp32, so an fp32 dot of bf16-rounded values equals the bf16 dot
            h = _rtne_bf16(h)
            wt = wt.to(tl.float32)
        else:
            h = h.to(wt.dtype)
        acc = tl.dot(h, wt, acc, input_precision="ieee")

    # ---- epilogue: bias, activation, one store
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_offs = rows[:, None] * stride_ym + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if STORE_PREACT:
        z = _rtne_bf16(acc) if INTERP_BF16 else acc
        tl.store(Z + out_offs, z.to(Z.dtype.element_ty), mask=out_mask)
    acc = _apply_act(acc, EPI_ACT)
    if INTERP_BF16:
        acc = _rtne_bf16(acc)
    tl.store(Y + out_offs, acc.to(Y.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- block sizes


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel configuration."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


DECODE_MAX_M = 64


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M (16..16384): the autotune key, so each bucket is tuned once."""
    return min(max(16, triton.next_power_of_2(m) if triton is not None else 1 << (m - 1).bit_length()), 16384)


# Per-thread register budget of a tile, in 32-bit values: the A tile counts twice (the loaded tile and its fp32
# norm / activation prologue result are live together), plus the fp32 accumulator. The budgets are the largest
# that compiled without a spill for every flag combination (norm, activations, training outputs) on sm_90 and
# sm_100: tests/ops/test_compile_sm90.py compiles every config and fails on any spill. The tanh-GELU prologue
# keeps more temporaries per A element; fp32 operands go through FMA dots that hold the B tile in registers too.
REGISTER_TILE_BUDGET = 160
REGISTER_TILE_BUDGET_HEAVY = 72  # tanh-GELU prologue
REGISTER_TILE_BUDGET_FP32 = 56  # fp32 operands (sm_100's ptxas caps them at 96 registers)


def register_tile(c: BlockConfig) -> int:
    """32-bit values per thread that config ``c`` keeps live in registers (2 x A tile + accumulator)."""
    return (2 * c.block_m * c.block_k + c.block_m * c.block_n) // (32 * c.num_warps)


def block_configs(
    m: int, n: int, k: int, *, interpreter: bool, dtype: torch.dtype = torch.bfloat16, heavy_prologue: bool = False
) -> list[BlockConfig]:
    """The one block-size helper: candidate configs for an ``[m, k] @ [k, n]`` problem in ``dtype``
    (``heavy_prologue``: the A tile goes through a tanh GELU).

    * Decode (``m <= 64``): the op streams the weight; ``BLOCK_M`` is the smallest tensor-core tile that
      covers the rows (16/32/64), ``BLOCK_N`` stays narrow (32..128) so ``n / BLOCK_N`` programs keep every
      SM loading, and ``BLOCK_K`` is long with deep pipelining to keep many weight bytes in flight.
    * Prefill: compute-bound tensor-core tiles (the Triton matmul-tutorial family), grouped ordering.
    * fp32 operands take a quarter of the ``BLOCK_K`` (the full tiles neither fit in shared memory nor in
      registers), and configs over the register budget are dropped (they spill).
    * Under the interpreter: exactly one config (nothing is benchmarked); tiles are large because every
      program and loop iteration costs Python/numpy overhead there, while still leaving several programs
      and K iterations for realistic sizes.
    """
    if interpreter:
        # the interpreter's cost grows with the elements loaded: one row block (<= 128) reads W only once
        bm = min(128, max(16, triton.next_power_of_2(m)))
        return [BlockConfig(bm, 64 if n <= 64 else 128, 128, group_m=4, num_warps=4, num_stages=1)]
    if m <= DECODE_MAX_M:
        bm = max(16, triton.next_power_of_2(m))
        configs = [
            BlockConfig(bm, bn, bk, group_m=1, num_warps=w, num_stages=s)
            for bn, bk, w, s in (
                (32, 128, 4, 4),
                (32, 256, 4, 3),
                (64, 128, 4, 4),
                (64, 256, 4, 3),
                (128, 128, 4, 3),
                (16, 256, 4, 4),
                (64, 64, 4, 5),
            )
        ]
    else:
        configs = [
            BlockConfig(bm, bn, bk, group_m=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in (
                (128, 256, 64, 8, 3),
                (128, 128, 64, 8, 3),
                (128, 128, 64, 4, 4),
                (64, 256, 64, 8, 3),
                (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4),
            )
        ]
    budget = REGISTER_TILE_BUDGET_HEAVY if heavy_prologue else REGISTER_TILE_BUDGET
    if dtype == torch.float32:
        configs = [dataclasses.replace(c, block_k=max(16, c.block_k // 4)) for c in configs]
        budget = REGISTER_TILE_BUDGET_FP32
    fit = [c for c in configs if register_tile(c) <= budget]
    return fit or [min(configs, key=register_tile)]


@functools.cache
def _autotuned_kernel(decode_bm: int, dtype: torch.dtype, heavy_prologue: bool):
    """An autotuner over the decode configs of one ``BLOCK_M`` (16/32/64), or over the prefill configs (0)."""
    m = decode_bm if decode_bm else DECODE_MAX_M + 1
    configs = [
        c.to_triton()
        for c in block_configs(m, 4096, 4096, interpreter=False, dtype=dtype, heavy_prologue=heavy_prologue)
    ]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"])(_norm_linear_fwd_kernel)


# --------------------------------------------------------------------------- launcher


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a launcher buffer (one seam, so tests can hand out NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def norm_linear_fwd(
    x2d: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float,
    norm: int,
    pro_act: int = 0,
    epi_act: int = 0,
    store_preact: bool = False,
    store_stats: bool = False,
    config: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the fused kernel on 2-D ``x2d`` [M, K] (last dim contiguous); weight is logical [N, K].

    Returns ``(y, preact, mean, rstd)``: ``y`` [M, N] in ``x2d.dtype``; the others are ``None`` unless asked
    for (``preact`` [M, N]; ``mean``/``rstd`` fp32 [M], ``mean`` only for LayerNorm). ``config`` forces one
    block configuration (tests); otherwise decode/prefill autotuning picks it (one config under the
    interpreter). Arguments are assumed validated by the public op; the layout checks here guard the kernel.
    """
    op = "norm_linear_fwd"
    if x2d.dim() != 2 or x2d.stride(1) != 1:
        raise ValueError(f"{op}: x2d must be 2-D with a contiguous last dim, got strides {tuple(x2d.stride())}")
    if weight.dim() != 2 or weight.shape[1] != x2d.shape[1]:
        raise ValueError(f"{op}: weight must be [N, K] with K={x2d.shape[1]}, got {tuple(weight.shape)}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("bias", bias)):
        if t is not None and t.stride(0) != 1:
            raise ValueError(f"{op}: {name} must be contiguous")
    m, k = x2d.shape
    n = weight.shape[0]
    dev = x2d.device
    y = _empty((m, n), x2d.dtype, dev)
    preact = _empty((m, n), x2d.dtype, dev) if store_preact else None
    mean = _empty((m,), torch.float32, dev) if store_stats and norm == _NORM_LAYER else None
    rstd = _empty((m,), torch.float32, dev) if store_stats and norm != _NORM_NONE else None
    if m == 0 or n == 0:
        return y, preact, mean, rstd
    dummy = y  # placeholder pointer for absent optional inputs (never dereferenced: constexpr flags)
    args = (
        x2d,
        norm_weight if norm_weight is not None else dummy,
        norm_bias if norm_bias is not None else dummy,
        weight,
        bias if bias is not None else dummy,
        y,
        preact if preact is not None else dummy,
        mean if mean is not None else dummy,
        rstd if rstd is not None else dummy,
        m,
        n,
        k,
        x2d.stride(0),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        float(eps),
        m_bucket(m),
    )
    flags = dict(
        NORM=norm,
        PRO_ACT=pro_act,
        EPI_ACT=epi_act,
        HAS_NORM_WEIGHT=norm_weight is not None,
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        STORE_PREACT=store_preact,
        STORE_STATS=store_stats and norm != _NORM_NONE,
        INTERP_BF16=interpreter_enabled() and x2d.dtype == torch.bfloat16,
    )
    if config is None and interpreter_enabled():
        config = block_configs(m, n, k, interpreter=True, dtype=x2d.dtype)[0]
    record_launch("norm_linear_fwd")
    if config is not None:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _norm_linear_fwd_kernel[grid](
            *args,
            **flags,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=config.group_m,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    else:
        wide = torch.float32 if x2d.dtype == torch.float32 else torch.bfloat16  # the 16-bit configs are shared
        bm = max(16, triton.next_power_of_2(m)) if m <= DECODE_MAX_M else 0
        kernel = _autotuned_kernel(bm, wide, pro_act == _ACT_CODE["gelu_tanh"])

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        kernel[grid](*args, **flags)
    return y, preact, mean, rstd
