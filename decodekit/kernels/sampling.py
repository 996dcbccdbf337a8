"""Fused sampler: penalties, temperature, top-k, top-p, min-p and the draw, without sorting the vocabulary.

Algorithm. Every filter keeps a *top set*: a token of value ``z`` (penalized logit / temperature) is kept iff
``Q(z)`` holds, where ``Q(t) = #(z' > t) < k  and  mass(z' > t) < p * S_ref`` is monotone in ``t`` (min-p is a
closed-form cut ``p_i >= min_p * p_max``). So one threshold per row decides everything, and it is found by a
*search over values* instead of a sort:

1. ``_stats_kernel`` (grid ``B x C``: the row is split over C programs when B is small): per-chunk max,
   sum-exp, argmax, min and the NaN / finite counts.
2. ``_search_kernel`` (launched ``NPASS`` times, grid ``B x C``): each pass places 16 pivots uniformly in the
   value range of the current bracket ``(lo, hi]`` (``Q(lo)`` false, ``Q(hi)`` true) and each program writes
   the counts and masses above every pivot for its chunk, plus the min/max of the tokens inside the bracket.
   The next launch combines the C partials (a few hundred floats) in its prologue, keeps the sub-interval
   where ``Q`` flips and shrinks it to the data's min/max: >= 17x narrower per pass. A row is *resolved* when
   one distinct value is left in the bracket; its programs then skip the data (no reads at all). Fixed launch
   count, data-dependent work, no host synchronization: CUDA-graph safe. Hugging Face order (top-p on the
   distribution renormalized over the top-k set) runs the top-k search first, then the top-p search.
3. ``_race_kernel`` (grid ``B x C``): exponential race / Gumbel-max over the kept tokens
   ``argmax z_i - log(-log u_i)`` with ``u_i = tl.rand(seed, (row_key << 32) | i)`` (Philox, counter-based),
   so a token depends only on (seed, row key, token index): the same per-row seed gives the same token
   whatever the batch size or the row's position. Per chunk: the winner and the kept mass.
4. ``_finalize_kernel`` (grid ``B``): combines the C winners -> token and its log-probability under the final
   filtered, renormalized distribution. ``_probs_kernel`` writes that distribution instead.

Why fast: the logits are read once for the stats, once per *unresolved* search pass (typically 3-5 for a
128k vocabulary; a resolved row's programs read nothing), and once for the race -- every read is a coalesced
stream of ``B * V * itemsize`` bytes (+ ``B * V * 4`` for ``token_counts``), which for B*V*4 <= 50 MB stays
in the H100's L2 after the first pass. The Philox draws are only computed for tiles that hold a kept token.
No ``[B, V]`` intermediate is ever written. The GPU timings are still to be measured (no GPU was at hand).

Ties. Thresholds compare values, so a tie group at a top-k or top-p boundary is kept *whole* (a token is kept
iff the mass / count of the tokens *strictly* greater than it passes the test); sort-based references keep
an arbitrary part of such a group. Greedy (``temperature == 0`` or, for :func:`sample`, ``top_k == 1``) is the
argmax with the lowest index on ties. If a row still had several distinct values in its bracket after the
last pass (values closer than ~range / 17**NPASS), the whole bracket is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from decodekit._dispatch import FLOAT_DTYPES, check_tensor, record_launch, resolve_backend
from decodekit.kernels import sampling_torch as _st

__all__ = ["sample", "sampling_probs", "sample_logits", "sampler_simple_batch"]

NPIV = 16  # pivots per search pass
# per-row parameter columns of the packed fp32 [B, 8] tensor
P_TEMP, P_TOPK, P_TOPP, P_MINP, P_REP, P_PRES, P_FREQ, P_NOISE = range(8)
NSTAT = 8  # stats partial: max, sumexp, argmax, min finite, n finite, n bad, -, -
NSTATE = 12  # bracket state: lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, -, -
NRACE = 4  # race partial: best key, best index, best z, kept mass
FLT_MAX = 3.4028234663852886e38


# --------------------------------------------------------------------------- Triton helpers


@triton.jit
def _load_z(
    logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask,
    temp, rep, pres, freq, greedy, HAS_COUNTS: tl.constexpr,
):
    """Penalized, temperature-scaled fp32 values of one tile; -inf outside the row."""
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_COUNTS:
        cnt = tl.load(counts_ptr + row * stride_c + offs, mask=mask, other=0).to(tl.float32)
        seen = cnt > 0
        x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)  # HF repetition penalty
        x = x - pres * seen.to(tl.float32) - freq * cnt  # OpenAI presence / frequency
    safe_t = tl.where(greedy, 1.0, temp)
    x = tl.where(greedy, x, x / safe_t)
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _row_state(
    pass_idx, row, B, C, stats_ptr, params_ptr, state_ptr, piv_ptr, part_ptr,
    TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, CP2: tl.constexpr, NP: tl.constexpr,
):
    """Bracket state of ``row`` for search pass ``pass_idx`` (pass NPASS = the final state).

    Pass 0 starts from the row stats; pass n > 0 advances the state of pass n-1 with its pivots and the
    combined partials. Branch-free so that it compiles identically everywhere.
    Phases: 0 = top-k search (HF order, before top-p), 1 = combined search, 2 = resolved.
    """
    # combine the C stats partials: max, sum exp(z - max), argmax, min finite, n finite, n bad
    c = tl.arange(0, CP2)
    cm = c < C
    sb = stats_ptr + row * C * 8 + c * 8
    mx = tl.load(sb + 0, mask=cm, other=float("-inf"))
    se = tl.load(sb + 1, mask=cm, other=0.0)
    am = tl.load(sb + 2, mask=cm, other=0.0)
    zmin = tl.min(tl.load(sb + 3, mask=cm, other=float("inf")), axis=0)
    nfin = tl.sum(tl.load(sb + 4, mask=cm, other=0.0), axis=0)
    nbad = tl.sum(tl.load(sb + 5, mask=cm, other=0.0), axis=0)
    m = tl.max(mx, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(mx == float("-inf"), 0.0, se * tl.exp(mx - m)), axis=0)
    first = tl.min(tl.where(mx == m, c, CP2), axis=0)  # lowest chunk holding the max: lowest index on ties
    amax = tl.sum(tl.where(c == first, am, 0.0), axis=0)
    prm = params_ptr + row * 8
    temp = tl.load(prm + 0)
    k = tl.load(prm + 1)
    p = tl.load(prm + 2)
    greedy = temp == 0.0
    if GREEDY_TOP1:
        greedy = greedy | (k == 1.0)
    bad = (nbad > 0) | (nfin == 0)
    k_on = (k > 0) & (k < nfin)
    k_off = (k <= 0) | (k >= nfin)
    p_on = (p > 0) & (p < 1.0)
    p_off = (p <= 0) | (p >= 1.0)
    # ---- initial state: bracket (-inf, +inf], pivots over [row min, row max]
    q0 = k_off & p_off  # Q(-inf): is every finite token kept?
    two_phase = k_on & p_on  # HF order: top-k search first, then top-p renormalized over the top-k set
    if TTS:
        two_phase = k_on & k_off  # TTS: top-p on the un-renormalized probabilities, one joint search
    phase0 = tl.where(two_phase, 0.0, 1.0)
    phase0 = tl.where(greedy | bad | q0 | (nfin <= 1), 2.0, phase0)
    lo = float("-inf") + 0.0 * m
    hi = float("inf") + 0.0 * m
    r0 = zmin
    r1 = m
    cnt_lo = nfin
    cnt_hi = 0.0 * m
    mass_lo = s
    mass_hi = 0.0 * m
    phase = phase0
    s_ref = s
    # ---- advance the state of the previous pass
    prev = tl.maximum(pass_idx - 1, 0)
    has_prev = pass_idx > 0
    st = state_ptr + (prev * B + row) * 12
    j = tl.arange(0, NP)
    p_lo = tl.load(st + 0, mask=has_prev, other=0.0)
    p_hi = tl.load(st + 1, mask=has_prev, other=0.0)
    p_clo = tl.load(st + 4, mask=has_prev, other=0.0)
    p_chi = tl.load(st + 5, mask=has_prev, other=0.0)
    p_mlo = tl.load(st + 6, mask=has_prev, other=0.0)
    p_mhi = tl.load(st + 7, mask=has_prev, other=0.0)
    p_phase = tl.load(st + 8, mask=has_prev, other=2.0)
    p_sref = tl.load(st + 9, mask=has_prev, other=1.0)
    piv = tl.load(piv_ptr + (prev * B + row) * NP + j, mask=has_prev & (j < NP), other=0.0)
    pbase = part_ptr + ((prev * B + row) * C + c) * (2 * NP + 2)
    pm = (c < C)[:, None] & has_prev
    cnt = tl.sum(tl.load(pbase[:, None] + j[None, :], mask=pm, other=0.0), axis=0)  # [NP]
    mass = tl.sum(tl.load(pbase[:, None] + NP + j[None, :], mask=pm, other=0.0), axis=0)  # [NP]
    bmin = tl.min(tl.load(pbase + 2 * NP, mask=(c < C) & has_prev, other=float("inf")), axis=0)
    bmax = tl.max(tl.load(pbase + 2 * NP + 1, mask=(c < C) & has_prev, other=float("-inf")), axis=0)
    ok_k = cnt < tl.where(k_off, float("inf"), k)
    if TTS:
        ok_p = mass <= p * p_sref
    else:
        ok_p = mass < p * p_sref
    skip_p = (p_phase == 0.0).to(tl.int32) + p_off.to(tl.int32)  # no top-p test in phase 0 or without top-p
    q = ok_k & ((skip_p > 0) | ok_p)  # Q at each pivot (monotone: False..False True..True)
    n_false = NP - tl.sum(q.to(tl.int32), axis=0)
    jl = n_false - 1
    a_lo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, piv, 0.0), axis=0), p_lo)
    a_clo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, cnt, 0.0), axis=0), p_clo)
    a_mlo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, mass, 0.0), axis=0), p_mlo)
    a_hi = tl.where(n_false < NP, tl.sum(tl.where(j == n_false, piv, 0.0), axis=0), p_hi)
    a_chi = tl.where(n_false < NP, tl.sum(tl.where(j == n_false, cnt, 0.0), axis=0), p_chi)
    a_mhi = tl.where(n_false < NP, tl.sum(tl.where(j == n_false, mass, 0.0), axis=0), p_mhi)
    a_r0 = tl.maximum(a_lo, bmin)
    a_r1 = tl.minimum(a_hi, bmax)
    done = (a_clo - a_chi <= 1.0) | (bmin >= bmax) | (a_r0 >= a_r1)
    # phase 0 resolved -> start the top-p search inside the top-k set, renormalized over it
    to_p = (p_phase == 0.0) & done
    a_phase = tl.where(p_phase == 2.0, 2.0, tl.where(done, tl.where(p_phase == 0.0, 1.0, 2.0), p_phase))
    a_phase = tl.where(to_p & (a_clo <= 1.0), 2.0, a_phase)
    a_sref = tl.where(to_p, a_mlo, p_sref)
    a_hi = tl.where(to_p, float("inf"), a_hi)
    a_chi = tl.where(to_p, 0.0, a_chi)
    a_mhi = tl.where(to_p, 0.0, a_mhi)
    a_r0 = tl.where(to_p, tl.maximum(a_lo, zmin), a_r0)
    a_r1 = tl.where(to_p, m, a_r1)
    a_r0 = tl.where(a_phase == 2.0, 0.0, a_r0)  # resolved: keep the (unused) pivots finite
    a_r1 = tl.where(a_phase == 2.0, 0.0, a_r1)
    keep_prev = p_phase == 2.0  # resolved rows keep their bracket
    lo = tl.where(has_prev, tl.where(keep_prev, p_lo, a_lo), lo)
    hi = tl.where(has_prev, tl.where(keep_prev, p_hi, a_hi), hi)
    r0 = tl.where(has_prev, a_r0, r0)
    r1 = tl.where(has_prev, a_r1, r1)
    cnt_lo = tl.where(has_prev, tl.where(keep_prev, p_clo, a_clo), cnt_lo)
    cnt_hi = tl.where(has_prev, tl.where(keep_prev, p_chi, a_chi), cnt_hi)
    mass_lo = tl.where(has_prev, tl.where(keep_prev, p_mlo, a_mlo), mass_lo)
    mass_hi = tl.where(has_prev, tl.where(keep_prev, p_mhi, a_mhi), mass_hi)
    phase = tl.where(has_prev, a_phase, phase)
    s_ref = tl.where(has_prev, a_sref, s_ref)
    return lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, m, s, amax, greedy, bad


# --------------------------------------------------------------------------- kernels


@triton.jit
def _stats_kernel(
    logits_ptr,  # [B, V] fp32/fp16/bf16, row stride stride_l, unit column stride
    counts_ptr,  # [B, V] int token counts (only read when HAS_COUNTS)
    params_ptr,  # [B, 8] fp32 per-row parameters
    stats_ptr,  # [B, C, 8] fp32 out: per-chunk max, sum exp(z - max), argmax, min finite, n finite, n bad
    V, stride_l, stride_c,  # vocabulary size, row strides of logits and counts
    CHUNK,  # tokens per program (multiple of BLOCK)
    C,  # programs per row
    HAS_COUNTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    prm = params_ptr + row * 8
    temp = tl.load(prm + 0)
    greedy = temp == 0.0
    if GREEDY_TOP1:
        greedy = greedy | (tl.load(prm + 1) == 1.0)
    rep = tl.load(prm + 4)
    pres = tl.load(prm + 5)
    freq = tl.load(prm + 6)
    base = chunk * CHUNK
    cols = tl.arange(0, BLOCK)
    run_m = float("-inf")
    run_s = 0.0
    run_arg = 0.0
    run_min = float("inf")
    n_fin = 0.0
    n_bad = 0.0
    for start in range(base, tl.minimum(base + CHUNK, V), BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, greedy,
                    HAS_COUNTS)
        bad = (z != z) | (z == float("inf"))
        fin = (z > float("-inf")) & (z == z) & (z != float("inf"))
        z = tl.where(fin, z, float("-inf"))  # NaN only flags the row
        n_bad += tl.sum(bad.to(tl.float32), axis=0)
        n_fin += tl.sum(fin.to(tl.float32), axis=0)
        run_min = tl.minimum(run_min, tl.min(tl.where(fin, z, float("inf")), axis=0))
        t_m = tl.max(z, axis=0)
        t_arg = tl.argmax(z, axis=0)  # first index of the max
        new_m = tl.maximum(run_m, t_m)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        t_s = tl.sum(tl.where(fin, tl.exp(z - safe), 0.0), axis=0)
        run_s = tl.where(run_m == float("-inf"), 0.0, run_s * tl.exp(run_m - safe)) + t_s
        run_arg = tl.where(t_m > run_m, (start + t_arg).to(tl.float32), run_arg)  # strict: earlier tile wins ties
        run_m = new_m
    out = stats_ptr + (row * C + chunk) * 8
    tl.store(out + 0, run_m)
    tl.store(out + 1, run_s)
    tl.store(out + 2, run_arg)
    tl.store(out + 3, run_min)
    tl.store(out + 4, n_fin)
    tl.store(out + 5, n_bad)


@triton.jit
def _search_kernel(
    logits_ptr,  # [B, V] logits
    counts_ptr,  # [B, V] token counts (HAS_COUNTS)
    params_ptr,  # [B, 8] fp32 per-row parameters
    stats_ptr,  # [B, C, 8] fp32 stats partials
    state_ptr,  # [NPASS, B, 12] fp32 bracket state per pass (written by chunk 0)
    piv_ptr,  # [NPASS, B, NP] fp32 pivots per pass (written by chunk 0)
    part_ptr,  # [NPASS, B, C, 2 NP + 2] fp32 out: count and mass above each pivot, min/max inside the bracket
    pass_idx, B, V, stride_l, stride_c, CHUNK, C,  # this pass, sizes, strides, tokens per program, programs/row
    HAS_COUNTS: tl.constexpr, TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr,
    CP2: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, m, s, amax, greedy, bad = _row_state(
        pass_idx, row, B, C, stats_ptr, params_ptr, state_ptr, piv_ptr, part_ptr, TTS, GREEDY_TOP1, CP2, NP)
    j = tl.arange(0, NP)
    f = j.to(tl.float32) / NP
    piv = r0 * (1.0 - f) + r1 * f  # [NP] uniform in the bracket's value range (no overflow for huge ranges)
    if chunk == 0:
        st = state_ptr + (pass_idx * B + row) * 12
        tl.store(st + 0, lo)
        tl.store(st + 1, hi)
        tl.store(st + 2, r0)
        tl.store(st + 3, r1)
        tl.store(st + 4, cnt_lo)
        tl.store(st + 5, cnt_hi)
        tl.store(st + 6, mass_lo)
        tl.store(st + 7, mass_hi)
        tl.store(st + 8, phase)
        tl.store(st + 9, s_ref)
        tl.store(piv_ptr + (pass_idx * B + row) * NP + j, piv)
    prm = params_ptr + row * 8
    temp = tl.load(prm + 0)
    rep = tl.load(prm + 4)
    pres = tl.load(prm + 5)
    freq = tl.load(prm + 6)
    cnt = tl.zeros([NP], dtype=tl.float32)
    mass = tl.zeros([NP], dtype=tl.float32)
    bmin = float("inf")
    bmax = float("-inf")
    base = chunk * CHUNK
    end = tl.minimum(base + CHUNK, V)
    end = tl.where(phase == 2.0, base, end)  # resolved rows read nothing
    cols = tl.arange(0, BLOCK)
    for start in range(base, end, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, greedy,
                    HAS_COUNTS)
        e = tl.exp(z - m)  # [BLOCK] mass relative to the row max (0 for -inf)
        above = z[:, None] > piv[None, :]  # [BLOCK, NP]
        cnt += tl.sum(above.to(tl.float32), axis=0)
        mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        inside = (z > lo) & (z <= hi)
        bmin = tl.minimum(bmin, tl.min(tl.where(inside, z, float("inf")), axis=0))
        bmax = tl.maximum(bmax, tl.max(tl.where(inside, z, float("-inf")), axis=0))
    out = part_ptr + ((pass_idx * B + row) * C + chunk) * (2 * NP + 2)
    tl.store(out + j, cnt)
    tl.store(out + NP + j, mass)
    tl.store(out + 2 * NP, bmin)
    tl.store(out + 2 * NP + 1, bmax)


@triton.jit
def _race_kernel(
    logits_ptr,  # [B, V] logits
    counts_ptr,  # [B, V] token counts (HAS_COUNTS)
    params_ptr,  # [B, 8] fp32 per-row parameters
    seeds_ptr,  # [B] int64 per-row seeds
    stats_ptr,  # [B, C, 8] fp32 stats partials
    state_ptr, piv_ptr, part_ptr,  # search buffers (see _search_kernel)
    race_ptr,  # [B, C, 4] fp32 out: best key, best index, best z, kept mass
    final_ptr,  # [B, 4] fp32 out (chunk 0): lo, row max, argmax, flags (1 greedy, 2 bad)
    npass, B, V, stride_l, stride_c, CHUNK, C, row_key_mult,  # passes run, sizes, strides, ..., 1: key = row
    HAS_COUNTS: tl.constexpr, TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, DRAW: tl.constexpr,
    SIMPLE: tl.constexpr, CP2: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, m, s, amax, greedy, bad = _row_state(
        npass, row, B, C, stats_ptr, params_ptr, state_ptr, piv_ptr, part_ptr, TTS, GREEDY_TOP1, CP2, NP)
    prm = params_ptr + row * 8
    temp = tl.load(prm + 0)
    rep = tl.load(prm + 4)
    pres = tl.load(prm + 5)
    freq = tl.load(prm + 6)
    min_p = tl.load(prm + 3)
    noise = tl.load(prm + 7)
    if chunk == 0:
        fo = final_ptr + row * 4
        tl.store(fo + 0, lo)
        tl.store(fo + 1, m)
        tl.store(fo + 2, amax)
        tl.store(fo + 3, greedy.to(tl.float32) + 2.0 * bad.to(tl.float32))
    seed = tl.load(seeds_ptr + row)
    row_key = (row * row_key_mult) << 32
    best = float("-inf")
    best_i = -1.0
    best_z = 0.0
    kept_mass = 0.0
    base = chunk * CHUNK
    end = tl.minimum(base + CHUNK, V)
    end = tl.where(bad, base, end)
    cols = tl.arange(0, BLOCK)
    for start in range(base, end, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, greedy,
                    HAS_COUNTS)
        e = tl.exp(z - m)
        kept = (z > lo) & (z > float("-inf"))
        if not SIMPLE:
            kept = kept & tl.where(greedy, kept, e >= min_p)  # min-p does not apply to greedy rows
        kept_mass += tl.sum(tl.where(kept, e, 0.0), axis=0)
        if DRAW:
            if tl.max(kept.to(tl.int32), axis=0) > 0:  # Philox only for tiles holding a kept token
                u = tl.rand(seed, row_key + offs.to(tl.int64))
                if SIMPLE:
                    key = z + noise * u
                else:
                    key = tl.maximum(z - tl.log(-tl.log(u)), -3.0e38)
                key = tl.where(greedy, z, key)
                key = tl.where(kept, key, float("-inf"))
                t_best = tl.max(key, axis=0)
                t_arg = tl.argmax(key, axis=0)
                t_z = tl.sum(tl.where(cols == t_arg, z, 0.0), axis=0)
                upd = t_best > best  # strict: the earlier tile keeps ties (lowest index)
                best_i = tl.where(upd, (start + t_arg).to(tl.float32), best_i)
                best_z = tl.where(upd, t_z, best_z)
                best = tl.maximum(best, t_best)
    out = race_ptr + (row * C + chunk) * 4
    tl.store(out + 0, best)
    tl.store(out + 1, best_i)
    tl.store(out + 2, best_z)
    tl.store(out + 3, kept_mass)


@triton.jit
def _finalize_kernel(
    race_ptr,  # [B, C, 4] fp32 race partials
    final_ptr,  # [B, 4] fp32 row info from the race kernel
    tokens_ptr,  # [B] int64 out: drawn token, -1 for a bad row
    logprobs_ptr,  # [B] fp32 out: log-probability of the token under the kept, renormalized distribution
    C, CP2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CP2)
    cm = c < C
    base = race_ptr + (row * C + c) * 4
    key = tl.load(base + 0, mask=cm, other=float("-inf"))
    idx = tl.load(base + 1, mask=cm, other=-1.0)
    zb = tl.load(base + 2, mask=cm, other=0.0)
    km = tl.load(base + 3, mask=cm, other=0.0)
    best = tl.max(key, axis=0)
    first = tl.min(tl.where((key == best) & (idx >= 0), c, CP2), axis=0)  # lowest chunk = lowest index
    tok = tl.sum(tl.where(c == first, idx, 0.0), axis=0)
    z = tl.sum(tl.where(c == first, zb, 0.0), axis=0)
    flags = tl.load(final_ptr + row * 4 + 3)
    m = tl.load(final_ptr + row * 4 + 1)
    greedy = (flags == 1.0) | (flags == 3.0)
    ok = (first < CP2) & (flags < 2.0)
    tok = tl.where(ok, tok, -1.0)
    total = tl.sum(km, axis=0)
    lp = z - m - tl.log(tl.where(total > 0, total, 1.0))  # bad rows: no log(0)
    lp = tl.where(greedy, 0.0, lp)
    lp = tl.where(ok, lp, float("nan"))
    tl.store(tokens_ptr + row, tok.to(tl.int64))
    tl.store(logprobs_ptr + row, lp)


@triton.jit
def _probs_kernel(
    logits_ptr,  # [B, V] logits
    counts_ptr,  # [B, V] token counts (HAS_COUNTS)
    params_ptr,  # [B, 8] fp32 per-row parameters
    race_ptr,  # [B, C, 4] fp32 race partials (kept mass)
    final_ptr,  # [B, 4] fp32 row info: lo, max, argmax, flags
    out_ptr,  # [B, V] fp32 out: filtered, renormalized probabilities (row stride V)
    V, stride_l, stride_c, CHUNK, C,
    HAS_COUNTS: tl.constexpr, CP2: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, CP2)
    total = tl.sum(tl.load(race_ptr + (row * C + c) * 4 + 3, mask=c < C, other=0.0), axis=0)
    total = tl.where(total > 0, total, 1.0)  # bad rows have no kept mass (and are zeroed below)
    fo = final_ptr + row * 4
    lo = tl.load(fo + 0)
    m = tl.load(fo + 1)
    amax = tl.load(fo + 2).to(tl.int64)
    flags = tl.load(fo + 3)
    greedy = (flags == 1.0) | (flags == 3.0)
    bad = flags >= 2.0
    prm = params_ptr + row * 8
    temp = tl.load(prm + 0)
    min_p = tl.load(prm + 3)
    rep = tl.load(prm + 4)
    pres = tl.load(prm + 5)
    freq = tl.load(prm + 6)
    cols = tl.arange(0, BLOCK)
    base = chunk * CHUNK
    for start in range(base, tl.minimum(base + CHUNK, V), BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, greedy,
                    HAS_COUNTS)
        e = tl.exp(z - m)
        kept = (z > lo) & (z > float("-inf")) & (e >= min_p)
        pr = tl.where(kept, e / total, 0.0)
        pr = tl.where(greedy, tl.where(offs == amax, 1.0, 0.0), pr)
        pr = tl.where(bad, 0.0, pr)
        tl.store(out_ptr + row * V + offs, pr, mask=mask)


# --------------------------------------------------------------------------- launchers


@dataclass
class _LaunchConfig:
    """Grid and tile sizes of one sampler launch."""

    block: int  # tile of the stats / race / probs kernels
    block_s: int  # tile of the search kernel ([block_s, NPIV] compare matrix)
    chunks: int  # programs per row
    chunk: int  # tokens per program (a multiple of both tiles)
    cp2: int  # next power of two >= chunks
    num_warps: int


def _launch_config(B: int, V: int, device: torch.device) -> _LaunchConfig:
    """Block-size heuristic: enough programs to fill the GPU when B is small (split the row), big tiles under
    the interpreter (each tile costs a few numpy calls there)."""
    if device.type == "cuda":
        block, block_s, num_warps = min(1024, triton.next_power_of_2(V)), min(256, triton.next_power_of_2(V)), 4
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, (4 * sms + B - 1) // B)
    else:  # interpreter
        block = block_s = min(2048, triton.next_power_of_2(V))
        num_warps = 1
        target = 2
    step = max(block, block_s)
    tiles = triton.cdiv(V, step)
    chunks = max(1, min(tiles, target, 64))
    chunk = triton.cdiv(tiles, chunks) * step
    chunks = triton.cdiv(V, chunk)
    return _LaunchConfig(block, block_s, chunks, chunk, triton.next_power_of_2(chunks), num_warps)


def _run_triton(
    logits: torch.Tensor,
    params: torch.Tensor,
    seeds: torch.Tensor,
    row_key_mult: int,
    counts: torch.Tensor | None,
    *,
    tts: bool,
    greedy_top1: bool,
    npass: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Launch stats -> search x npass -> race -> finalize (or probs). ``mode``: sample | probs | simple."""
    B, V = logits.shape
    dev = logits.device
    cfg = _launch_config(B, V, dev)
    C, CP2 = cfg.chunks, cfg.cp2
    has_counts = counts is not None
    cnt_t = counts if has_counts else logits
    stride_c = counts.stride(0) if has_counts else 0
    f32 = torch.float32
    stats = torch.empty(B, C, NSTAT, device=dev, dtype=f32)
    slots = max(npass, 1)
    state = torch.empty(slots, B, NSTATE, device=dev, dtype=f32)
    piv = torch.empty(slots, B, NPIV, device=dev, dtype=f32)
    part = torch.empty(slots, B, C, 2 * NPIV + 2, device=dev, dtype=f32)
    race = torch.empty(B, C, NRACE, device=dev, dtype=f32)
    final = torch.empty(B, 4, device=dev, dtype=f32)
    common = dict(num_warps=cfg.num_warps)
    record_launch("sampling_stats")
    _stats_kernel[(B, C)](
        logits, cnt_t, params, stats, V, logits.stride(0), stride_c, cfg.chunk, C,
        HAS_COUNTS=has_counts, GREEDY_TOP1=greedy_top1, BLOCK=cfg.block, **common,
    )
    early_exit = dev.type != "cuda"  # interpreter: reading the state is free, skip passes once all rows resolved
    for n in range(npass):
        if early_exit and n > 0 and bool((state[n - 1, :, 8] == 2.0).all()):
            npass = n
            break
        record_launch("sampling_search")
        _search_kernel[(B, C)](
            logits, cnt_t, params, stats, state, piv, part, n, B, V, logits.stride(0), stride_c, cfg.chunk, C,
            HAS_COUNTS=has_counts, TTS=tts, GREEDY_TOP1=greedy_top1, CP2=CP2, NP=NPIV, BLOCK=cfg.block_s, **common,
        )
    record_launch("sampling_race")
    _race_kernel[(B, C)](
        logits, cnt_t, params, seeds, stats, state, piv, part, race, final,
        npass, B, V, logits.stride(0), stride_c, cfg.chunk, C, row_key_mult,
        HAS_COUNTS=has_counts, TTS=tts, GREEDY_TOP1=greedy_top1, DRAW=mode != "probs", SIMPLE=mode == "simple",
        CP2=CP2, NP=NPIV, BLOCK=cfg.block, **common,
    )
    if mode == "probs":
        out = torch.empty(B, V, device=dev, dtype=f32)
        record_launch("sampling_probs")
        _probs_kernel[(B, C)](
            logits, cnt_t, params, race, final, out, V, logits.stride(0), stride_c, cfg.chunk, C,
            HAS_COUNTS=has_counts, CP2=CP2, BLOCK=cfg.block, **common,
        )
        return out
    tokens = torch.empty(B, device=dev, dtype=torch.int64)
    logprobs = torch.empty(B, device=dev, dtype=f32)
    record_launch("sampling_finalize")
    _finalize_kernel[(B,)](race, final, tokens, logprobs, C, CP2=CP2, num_warps=1)
    return tokens, logprobs


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
        return t.to(torch.float32).reshape(-1).expand(B)
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
    return int(value) if integer else v


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
    if V > 2**24:
        raise ValueError(f"{op}: logits has V={V} columns; at most 2**24 are supported")
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
            raise ValueError(f"{op}: seed must be an int or an int64 [B] tensor with B={B}, got shape {tuple(seed.shape)}")
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
    """PyTorch-path form of a checked seed (the same random stream as :func:`_seeds`)."""
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
        returning ``-1`` for them. This reads the result on the host, i.e. it synchronizes.
    backend : ``"auto"`` (CUDA -> Triton kernel, CPU -> PyTorch path), ``"triton"`` or ``"torch"``.

    Returns
    -------
    tokens : int64 ``[B]`` (``-1`` for a bad row), and ``logprobs`` fp32 ``[B]`` when asked (NaN for a bad row).

    Notes
    -----
    Deterministic for a given seed; the Triton kernel and the PyTorch path draw from the same Philox stream,
    so they return the same tokens for the same seed (up to float rounding in a near-tie). Per-row parameter
    tensors on a GPU are not range-checked (that would synchronize).

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
        tokens, logprobs = _run_triton(logits, _pack(prm, B, dev), seeds, mult, counts, tts=False, greedy_top1=True,
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
        return _run_triton(logits, params, params[:, 0].to(torch.int64), 0, counts, tts=False, greedy_top1=True,
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
        out = _run_triton(logits, _pack(prm, B, dev), seeds, mult, None, tts=True, greedy_top1=False, npass=npass,
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

    Exactly the reference's kept set (see :func:`decodekit.reference.sampling.sample_logits_ref`): softmax of
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

    ``noise = 0`` (or ``temp = 0``) is plain greedy (lowest index on ties). Uniforms come from the same Philox
    stream as :func:`sample` (``seed`` as there), so the kernel and the PyTorch path agree. A row holding NaN
    or all ``-inf`` gives ``-1``.

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
        tokens, _ = _run_triton(logits, params, seeds, mult, None, tts=True, greedy_top1=False, npass=0,
                                mode="simple")
        return tokens[:, None]
    return _st.simple_batch_torch(logits, noise_v, temp_v, _torch_seed(seed, B, dev))[:, None]
