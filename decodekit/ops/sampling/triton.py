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
No ``[B, V]`` intermediate is ever written. Measured on an H200 (``bench/results/nvidia-h200.md``): replayed from
a CUDA graph, B = 1, V = 128256 takes 181 us against 345 us for Hugging Face's warpers, but called eagerly the
launches (stats, 16 search passes, race, finalize) cost ~950 us of host time; at B = 256 the device time is above
that (2.9 ms fp32, 4.8 ms bf16 as called, 47x / 154x one read of the logits; why bf16 is the slower is not yet
measured). Fewer launches and cheaper passes are open work.

Ties. Thresholds compare values, so a tie group at a top-k or top-p boundary is kept *whole* (a token is kept
iff the mass / count of the tokens *strictly* greater than it passes the test); sort-based references keep
an arbitrary part of such a group. Greedy (``temperature == 0`` or, for :func:`sample`, ``top_k == 1``) is the
argmax with the lowest index on ties. If a row still had several distinct values in its bracket after the
last pass (values closer than ~range / 17**NPASS), the whole bracket is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from decodekit.ops._dispatch import record_launch, register_budget

# ``maxnreg`` of each launch: the registers per thread that keep a kernel's occupancy floor (warps per SM; the
# floors and their reasons are in tests/ops/test_compile_sm90.py). Streaming kernels want 16 warps per SM.
MAXNREG_STREAM = register_budget(16)  # the row-streaming kernels: stats, search, race, probs, block
MAXNREG_SMALL_GRID = register_budget(4)  # beam rows / merges and the finalize: fewer programs than SMs

NPIV = 16  # pivots per search pass
# Buffers and their columns. Values are fp32; token indices, counts, phases and flags are int32 buffers of their
# own (exact for any vocabulary that fits int32). The kernels read the per-row float parameters from ``params``
# [B, NPARAM] (columns P_*, named in KERNEL_PARAMS) and ``top_k`` from an int32 [B] buffer of its own.
KERNEL_PARAMS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "noise")
P_TEMP = tl.constexpr(0)  # params [B, NPARAM] fp32
P_TOPP = tl.constexpr(1)
P_MINP = tl.constexpr(2)
P_REP = tl.constexpr(3)
P_PRES = tl.constexpr(4)
P_FREQ = tl.constexpr(5)
P_NOISE = tl.constexpr(6)
NPARAM = tl.constexpr(7)
S_MAX = tl.constexpr(0)  # stats partials [B, C, NSTAT] fp32
S_SUMEXP = tl.constexpr(1)
S_MIN = tl.constexpr(2)
S_XMAX = tl.constexpr(3)  # max of the logits before the temperature (the greedy limit of an overflowing 1 / T)
NSTAT = tl.constexpr(4)
SI_ARGMAX = tl.constexpr(0)  # stats partials [B, C, NSTAT_I] int32
SI_NFIN = tl.constexpr(1)
SI_NBAD = tl.constexpr(2)
SI_XARG = tl.constexpr(3)  # argmax of the logits before the temperature
SI_NOVER = tl.constexpr(4)  # count of finite logits whose logit / T overflows to +inf
NSTAT_I = tl.constexpr(5)
ST_LO = tl.constexpr(0)  # bracket state [NPASS, B, NSTATE] fp32
ST_HI = tl.constexpr(1)
ST_R0 = tl.constexpr(2)
ST_R1 = tl.constexpr(3)
ST_MASS_LO = tl.constexpr(4)
ST_MASS_HI = tl.constexpr(5)
ST_SREF = tl.constexpr(6)
NSTATE = tl.constexpr(7)
STI_CNT_LO = tl.constexpr(0)  # bracket state [NPASS, B, NSTATE_I] int32
STI_CNT_HI = tl.constexpr(1)
STI_PHASE = tl.constexpr(2)
NSTATE_I = tl.constexpr(3)
PHASE_TOPK = tl.constexpr(0)  # search phases: top-k first (HF order), one joint search, resolved
PHASE_JOINT = tl.constexpr(1)
PHASE_DONE = tl.constexpr(2)
R_KEY = tl.constexpr(0)  # race partials [B, C, NRACE] fp32 (+ the winner's index in race_idx [B, C] int32)
R_Z = tl.constexpr(1)
R_MASS = tl.constexpr(2)
NRACE = tl.constexpr(3)
F_LO = tl.constexpr(0)  # row summary [B, NFINAL] fp32 (+ final_i [B, 2] int32: argmax, flags)
F_MAX = tl.constexpr(1)
NFINAL = tl.constexpr(2)
FLAG_GREEDY = tl.constexpr(1)  # final_i flags bits
FLAG_BAD = tl.constexpr(2)


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
    pass_idx, row, B, C, stats_ptr, stats_i_ptr, params_ptr, topk_ptr, state_ptr, state_i_ptr, piv_ptr, part_ptr,
    part_i_ptr, TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, CP2: tl.constexpr, NP: tl.constexpr,
):
    """Bracket state of ``row`` for search pass ``pass_idx`` (pass NPASS = the final state).

    Pass 0 starts from the row stats; pass n > 0 advances the state of pass n-1 with its pivots and the
    combined partials. Branch-free so that it compiles identically everywhere.
    Phases: 0 = top-k search (HF order, before top-p), 1 = combined search, 2 = resolved.
    """
    # combine the C stats partials: max, sum exp(z - max), argmax, min finite, n finite, n bad
    c = tl.arange(0, CP2)
    cm = c < C
    sb = stats_ptr + (row * C + c) * NSTAT
    si = stats_i_ptr + (row * C + c) * NSTAT_I
    mx = tl.load(sb + S_MAX, mask=cm, other=float("-inf"))
    se = tl.load(sb + S_SUMEXP, mask=cm, other=0.0)
    am = tl.load(si + SI_ARGMAX, mask=cm, other=0)
    zmin = tl.min(tl.load(sb + S_MIN, mask=cm, other=float("inf")), axis=0)
    nfin = tl.sum(tl.load(si + SI_NFIN, mask=cm, other=0), axis=0)  # int32 counts of the row
    nbad = tl.sum(tl.load(si + SI_NBAD, mask=cm, other=0), axis=0)
    m = tl.max(mx, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(mx == float("-inf"), 0.0, se * tl.exp(mx - m)), axis=0)
    first = tl.min(tl.where(mx == m, c, CP2), axis=0)  # lowest chunk holding the max: lowest index on ties
    amax = tl.sum(tl.where(c == first, am, 0), axis=0)
    # temperature -> 0 limit: a row where some logit / T overflows is greedy on the logits before the temperature
    over = tl.sum(tl.load(si + SI_NOVER, mask=cm, other=0), axis=0) > 0
    xm = tl.load(sb + S_XMAX, mask=cm, other=float("-inf"))
    xfirst = tl.min(tl.where(xm == tl.max(xm, axis=0), c, CP2), axis=0)
    amax = tl.where(over, tl.sum(tl.where(c == xfirst, tl.load(si + SI_XARG, mask=cm, other=0), 0), axis=0), amax)
    prm = params_ptr + row * NPARAM
    temp = tl.load(prm + P_TEMP)
    k = tl.load(topk_ptr + row)  # int32, 0 = off
    p = tl.load(prm + P_TOPP)
    greedy = (temp == 0.0) | over
    if GREEDY_TOP1:
        greedy = greedy | (k == 1)
    bad = (nbad > 0) | ((nfin == 0) & ~over)  # an overflowing row has finite logits: greedy, not bad
    k_on = (k > 0) & (k < nfin)
    k_off = (k <= 0) | (k >= nfin)
    p_on = (p > 0) & (p < 1.0)
    p_off = (p <= 0) | (p >= 1.0)
    # ---- initial state: bracket (-inf, +inf], pivots over [row min, row max]
    q0 = k_off & p_off  # Q(-inf): is every finite token kept?
    two_phase = k_on & p_on  # HF order: top-k search first, then top-p renormalized over the top-k set
    if TTS:
        two_phase = k_on & k_off  # TTS: top-p on the un-renormalized probabilities, one joint search
    phase0 = tl.where(two_phase, PHASE_TOPK, PHASE_JOINT)
    phase0 = tl.where(greedy | bad | q0 | (nfin <= 1), PHASE_DONE, phase0)
    lo = float("-inf") + 0.0 * m
    hi = float("inf") + 0.0 * m
    r0 = zmin
    r1 = m
    cnt_lo = nfin
    cnt_hi = 0 * nfin
    mass_lo = s
    mass_hi = 0.0 * m
    phase = phase0
    s_ref = s
    # ---- advance the state of the previous pass
    prev = tl.maximum(pass_idx - 1, 0)
    has_prev = pass_idx > 0
    st = state_ptr + (prev * B + row) * NSTATE
    sti = state_i_ptr + (prev * B + row) * NSTATE_I
    j = tl.arange(0, NP)
    p_lo = tl.load(st + ST_LO, mask=has_prev, other=0.0)
    p_hi = tl.load(st + ST_HI, mask=has_prev, other=0.0)
    p_clo = tl.load(sti + STI_CNT_LO, mask=has_prev, other=0)
    p_chi = tl.load(sti + STI_CNT_HI, mask=has_prev, other=0)
    p_mlo = tl.load(st + ST_MASS_LO, mask=has_prev, other=0.0)
    p_mhi = tl.load(st + ST_MASS_HI, mask=has_prev, other=0.0)
    p_phase = tl.load(sti + STI_PHASE, mask=has_prev, other=PHASE_DONE)
    p_sref = tl.load(st + ST_SREF, mask=has_prev, other=1.0)
    # block masks bound by a where() on the scalar has_prev, not `block & has_prev`: the interpreter gives a splat
    # scalar comparison an int32 payload, and triton 3.9's interpreter rejects such a mask
    c_prev = c < tl.where(has_prev, C, 0)  # [CP2]: c < C on passes > 0, all False on pass 0
    piv = tl.load(piv_ptr + (prev * B + row) * NP + j, mask=j < tl.where(has_prev, NP, 0), other=0.0)
    pbase = part_ptr + ((prev * B + row) * C + c) * (NP + 2)
    pibase = part_i_ptr + ((prev * B + row) * C + c) * NP
    pm = c_prev[:, None]
    cnt = tl.sum(tl.load(pibase[:, None] + j[None, :], mask=pm, other=0), axis=0)  # [NP] int32
    mass = tl.sum(tl.load(pbase[:, None] + j[None, :], mask=pm, other=0.0), axis=0)  # [NP]
    bmin = tl.min(tl.load(pbase + NP, mask=c_prev, other=float("inf")), axis=0)
    bmax = tl.max(tl.load(pbase + NP + 1, mask=c_prev, other=float("-inf")), axis=0)
    ok_k = k_off | (cnt < k)
    if TTS:
        ok_p = mass <= p * p_sref
    else:
        ok_p = mass < p * p_sref
    skip_p = (p_phase == PHASE_TOPK).to(tl.int32) + p_off.to(tl.int32)  # no top-p test in phase 0 or without top-p
    q = ok_k & ((skip_p > 0) | ok_p)  # Q at each pivot (monotone in the pivot value: false below the cut)
    n_false = NP - tl.sum(q.to(tl.int32), axis=0)
    # The new bracket: the highest pivot where Q is false and the lowest where it holds. Chosen by value, not by
    # position: rounding can make the interpolated pivots non-monotone (two equal values, or values one fp32
    # spacing apart), and Q is monotone in the value, so this stays right where "the last false pivot" is not.
    jl = tl.argmax(tl.where(q, float("-inf"), piv), axis=0)
    jh = tl.argmin(tl.where(q, piv, float("inf")), axis=0)
    a_lo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, piv, 0.0), axis=0), p_lo)
    a_clo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, cnt, 0), axis=0), p_clo)
    a_mlo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, mass, 0.0), axis=0), p_mlo)
    a_hi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, piv, 0.0), axis=0), p_hi)
    a_chi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, cnt, 0), axis=0), p_chi)
    a_mhi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, mass, 0.0), axis=0), p_mhi)
    a_r0 = tl.maximum(a_lo, bmin)
    a_r1 = tl.minimum(a_hi, bmax)
    done = (a_clo - a_chi <= 1) | (bmin >= bmax) | (a_r0 >= a_r1)
    # phase 0 resolved -> start the top-p search inside the top-k set, renormalized over it
    to_p = (p_phase == PHASE_TOPK) & done
    a_phase = tl.where(done, tl.where(p_phase == PHASE_TOPK, PHASE_JOINT, PHASE_DONE), p_phase)
    a_phase = tl.where(p_phase == PHASE_DONE, PHASE_DONE, a_phase)
    a_phase = tl.where(to_p & (a_clo <= 1), PHASE_DONE, a_phase)
    a_sref = tl.where(to_p, a_mlo, p_sref)
    a_hi = tl.where(to_p, float("inf"), a_hi)
    a_chi = tl.where(to_p, 0, a_chi)
    a_mhi = tl.where(to_p, 0.0, a_mhi)
    a_r0 = tl.where(to_p, tl.maximum(a_lo, zmin), a_r0)
    a_r1 = tl.where(to_p, m, a_r1)
    a_r0 = tl.where(a_phase == PHASE_DONE, 0.0, a_r0)  # resolved: keep the (unused) pivots finite
    a_r1 = tl.where(a_phase == PHASE_DONE, 0.0, a_r1)
    keep_prev = p_phase == PHASE_DONE  # resolved rows keep their bracket
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
    params_ptr,  # [B, NPARAM] fp32 per-row parameters (columns P_*)
    topk_ptr,  # [B] int32 per-row top-k (0 = off)
    stats_ptr,  # [B, C, NSTAT] fp32 out: per-chunk max, sum exp(z - max), min finite, max before temperature
    stats_i_ptr,  # [B, C, NSTAT_I] int32 out: per-chunk argmax, finite count, NaN / +inf count, raw argmax, overflows
    V, stride_l, stride_c,  # vocabulary size, row strides of logits and counts
    CHUNK,  # tokens per program (multiple of BLOCK)
    C,  # programs per row
    HAS_COUNTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    prm = params_ptr + row * NPARAM
    temp = tl.load(prm + P_TEMP)
    greedy = temp == 0.0
    if GREEDY_TOP1:
        greedy = greedy | (tl.load(topk_ptr + row) == 1)
    rep = tl.load(prm + P_REP)
    pres = tl.load(prm + P_PRES)
    freq = tl.load(prm + P_FREQ)
    base = chunk * CHUNK
    cols = tl.arange(0, BLOCK)
    run_m = float("-inf")
    run_s = 0.0
    run_arg = 0
    run_min = float("inf")
    run_xm = float("-inf")
    run_xarg = 0
    n_fin = 0
    n_bad = 0
    n_over = 0
    for start in range(base, tl.minimum(base + CHUNK, V), BLOCK):
        offs = start + cols
        mask = offs < V
        x = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, True,
                    HAS_COUNTS)  # [BLOCK] penalized logits, before the temperature
        bad = (x != x) | (x == float("inf"))  # a NaN or +inf logit makes the row bad
        fin_x = (x > float("-inf")) & (x == x) & (x != float("inf"))
        z = tl.where(greedy, x, x / tl.where(greedy, 1.0, temp))
        fin = fin_x & (z > float("-inf")) & (z != float("inf"))
        n_over += tl.sum((fin_x & (z == float("inf"))).to(tl.int32), axis=0)  # T -> 0: greedy in the limit
        xs = tl.where(fin_x, x, float("-inf"))
        t_xm = tl.max(xs, axis=0)
        run_xarg = tl.where(t_xm > run_xm, start + tl.argmax(xs, axis=0).to(tl.int32), run_xarg)
        run_xm = tl.maximum(run_xm, t_xm)
        z = tl.where(fin, z, float("-inf"))  # NaN only flags the row
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
        n_fin += tl.sum(fin.to(tl.int32), axis=0)
        run_min = tl.minimum(run_min, tl.min(tl.where(fin, z, float("inf")), axis=0))
        t_m = tl.max(z, axis=0)
        t_arg = tl.argmax(z, axis=0)  # first index of the max
        new_m = tl.maximum(run_m, t_m)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        t_s = tl.sum(tl.where(fin, tl.exp(z - safe), 0.0), axis=0)
        run_s = tl.where(run_m == float("-inf"), 0.0, run_s * tl.exp(run_m - safe)) + t_s
        run_arg = tl.where(t_m > run_m, start + t_arg.to(tl.int32), run_arg)  # strict: earlier tile wins ties
        run_m = new_m
    out = stats_ptr + (row * C + chunk) * NSTAT
    tl.store(out + S_MAX, run_m)
    tl.store(out + S_SUMEXP, run_s)
    tl.store(out + S_MIN, run_min)
    tl.store(out + S_XMAX, run_xm)
    out_i = stats_i_ptr + (row * C + chunk) * NSTAT_I
    tl.store(out_i + SI_ARGMAX, run_arg)
    tl.store(out_i + SI_NFIN, n_fin)
    tl.store(out_i + SI_NBAD, n_bad)
    tl.store(out_i + SI_XARG, run_xarg)
    tl.store(out_i + SI_NOVER, n_over)


@triton.jit
def _search_kernel(
    logits_ptr,  # [B, V] logits
    counts_ptr,  # [B, V] token counts (HAS_COUNTS)
    params_ptr,  # [B, NPARAM] fp32 per-row parameters
    topk_ptr,  # [B] int32 per-row top-k
    stats_ptr,  # [B, C, NSTAT] fp32 stats partials
    stats_i_ptr,  # [B, C, NSTAT_I] int32 stats partials
    state_ptr,  # [NPASS, B, NSTATE] fp32 bracket state per pass (written by chunk 0)
    state_i_ptr,  # [NPASS, B, NSTATE_I] int32 bracket counts and phase per pass (written by chunk 0)
    piv_ptr,  # [NPASS, B, NP] fp32 pivots per pass (written by chunk 0)
    part_ptr,  # [NPASS, B, C, NP + 2] fp32 out: mass above each pivot, min / max inside the bracket
    part_i_ptr,  # [NPASS, B, C, NP] int32 out: count above each pivot
    pass_idx, B, V, stride_l, stride_c, CHUNK, C,  # this pass, sizes, strides, tokens per program, programs/row
    HAS_COUNTS: tl.constexpr, TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr,
    CP2: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, m, s, amax, greedy, bad = _row_state(
        pass_idx, row, B, C, stats_ptr, stats_i_ptr, params_ptr, topk_ptr, state_ptr, state_i_ptr, piv_ptr, part_ptr,
        part_i_ptr, TTS, GREEDY_TOP1, CP2, NP)
    j = tl.arange(0, NP)
    f = j.to(tl.float32) / NP
    piv = r0 * (1.0 - f) + r1 * f  # [NP] uniform in the bracket's value range (no overflow for huge ranges)
    if chunk == 0:
        st = state_ptr + (pass_idx * B + row) * NSTATE
        tl.store(st + ST_LO, lo)
        tl.store(st + ST_HI, hi)
        tl.store(st + ST_R0, r0)
        tl.store(st + ST_R1, r1)
        tl.store(st + ST_MASS_LO, mass_lo)
        tl.store(st + ST_MASS_HI, mass_hi)
        tl.store(st + ST_SREF, s_ref)
        sti = state_i_ptr + (pass_idx * B + row) * NSTATE_I
        tl.store(sti + STI_CNT_LO, cnt_lo)
        tl.store(sti + STI_CNT_HI, cnt_hi)
        tl.store(sti + STI_PHASE, phase)
        tl.store(piv_ptr + (pass_idx * B + row) * NP + j, piv)
    prm = params_ptr + row * NPARAM
    temp = tl.load(prm + P_TEMP)
    rep = tl.load(prm + P_REP)
    pres = tl.load(prm + P_PRES)
    freq = tl.load(prm + P_FREQ)
    cnt = tl.zeros([NP], dtype=tl.int32)
    mass = tl.zeros([NP], dtype=tl.float32)
    bmin = float("inf")
    bmax = float("-inf")
    base = chunk * CHUNK
    end = tl.minimum(base + CHUNK, V)
    end = tl.where(phase == PHASE_DONE, base, end)  # resolved rows read nothing
    cols = tl.arange(0, BLOCK)
    for start in range(base, end, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _load_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, temp, rep, pres, freq, greedy,
                    HAS_COUNTS)
        e = tl.exp(z - m)  # [BLOCK] mass relative to the row max (0 for -inf)
        above = z[:, None] > piv[None, :]  # [BLOCK, NP]
        cnt += tl.sum(above.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        inside = (z > lo) & (z <= hi)
        bmin = tl.minimum(bmin, tl.min(tl.where(inside, z, float("inf")), axis=0))
        bmax = tl.maximum(bmax, tl.max(tl.where(inside, z, float("-inf")), axis=0))
    out = part_ptr + ((pass_idx * B + row) * C + chunk) * (NP + 2)
    tl.store(out + j, mass)
    tl.store(out + NP, bmin)
    tl.store(out + NP + 1, bmax)
    tl.store(part_i_ptr + ((pass_idx * B + row) * C + chunk) * NP + j, cnt)


@triton.jit
def _race_kernel(
    logits_ptr,  # [B, V] logits
    counts_ptr,  # [B, V] token counts (HAS_COUNTS)
    params_ptr,  # [B, NPARAM] fp32 per-row parameters
    topk_ptr,  # [B] int32 per-row top-k
    seeds_ptr,  # [B] int64 per-row seeds
    stats_ptr, stats_i_ptr,  # stats partials (see _stats_kernel)
    state_ptr, state_i_ptr, piv_ptr, part_ptr, part_i_ptr,  # search buffers (see _search_kernel)
    race_ptr,  # [B, C, NRACE] fp32 out: best key, best z, kept mass
    race_idx_ptr,  # [B, C] int32 out: the chunk's winning token (-1: none)
    final_ptr,  # [B, NFINAL] fp32 out (chunk 0): lo, row max
    final_i_ptr,  # [B, 2] int32 out (chunk 0): argmax, flags (FLAG_GREEDY | FLAG_BAD)
    npass, B, V, stride_l, stride_c, CHUNK, C, row_key_mult,  # passes run, sizes, strides, ..., 1: key = row
    HAS_COUNTS: tl.constexpr, TTS: tl.constexpr, GREEDY_TOP1: tl.constexpr, DRAW: tl.constexpr,
    SIMPLE: tl.constexpr, CP2: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, r0, r1, cnt_lo, cnt_hi, mass_lo, mass_hi, phase, s_ref, m, s, amax, greedy, bad = _row_state(
        npass, row, B, C, stats_ptr, stats_i_ptr, params_ptr, topk_ptr, state_ptr, state_i_ptr, piv_ptr, part_ptr,
        part_i_ptr, TTS, GREEDY_TOP1, CP2, NP)
    prm = params_ptr + row * NPARAM
    temp = tl.load(prm + P_TEMP)
    rep = tl.load(prm + P_REP)
    pres = tl.load(prm + P_PRES)
    freq = tl.load(prm + P_FREQ)
    min_p = tl.load(prm + P_MINP)
    noise = tl.load(prm + P_NOISE)
    if chunk == 0:
        fo = final_ptr + row * NFINAL
        tl.store(fo + F_LO, lo)
        tl.store(fo + F_MAX, m)
        tl.store(final_i_ptr + row * 2, amax)
        tl.store(final_i_ptr + row * 2 + 1, greedy.to(tl.int32) * FLAG_GREEDY + bad.to(tl.int32) * FLAG_BAD)
    seed = tl.load(seeds_ptr + row)
    row_key = (row * row_key_mult) << 32
    best = float("-inf")
    best_i = -1
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
                # the row max is taken out before the noise: with a large common offset (logits near 1e8) the
                # noise would otherwise be lost in fp32 rounding
                if SIMPLE:
                    key = (z - m) + noise * u
                else:
                    key = tl.maximum((z - m) - tl.log(-tl.log(u)), -3.0e38)
                key = tl.where(greedy, z, key)
                key = tl.where(kept, key, float("-inf"))
                t_best = tl.max(key, axis=0)
                t_arg = tl.argmax(key, axis=0)
                t_z = tl.sum(tl.where(cols == t_arg, z, 0.0), axis=0)
                upd = t_best > best  # strict: the earlier tile keeps ties (lowest index)
                best_i = tl.where(upd, start + t_arg.to(tl.int32), best_i)
                best_z = tl.where(upd, t_z, best_z)
                best = tl.maximum(best, t_best)
    out = race_ptr + (row * C + chunk) * NRACE
    tl.store(out + R_KEY, best)
    tl.store(out + R_Z, best_z)
    tl.store(out + R_MASS, kept_mass)
    tl.store(race_idx_ptr + row * C + chunk, best_i)


@triton.jit
def _finalize_kernel(
    race_ptr,  # [B, C, NRACE] fp32 race partials
    race_idx_ptr,  # [B, C] int32 the chunks' winning tokens
    final_ptr,  # [B, NFINAL] fp32 row summary from the race kernel
    final_i_ptr,  # [B, 2] int32 argmax and flags from the race kernel
    tokens_ptr,  # [B] int64 out: drawn token, -1 for a bad row
    logprobs_ptr,  # [B] fp32 out: log-probability of the token under the kept, renormalized distribution
    C, CP2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CP2)
    cm = c < C
    base = race_ptr + (row * C + c) * NRACE
    key = tl.load(base + R_KEY, mask=cm, other=float("-inf"))
    idx = tl.load(race_idx_ptr + row * C + c, mask=cm, other=-1)
    zb = tl.load(base + R_Z, mask=cm, other=0.0)
    km = tl.load(base + R_MASS, mask=cm, other=0.0)
    best = tl.max(key, axis=0)
    first = tl.min(tl.where((key == best) & (idx >= 0), c, CP2), axis=0)  # lowest chunk = lowest index
    tok = tl.sum(tl.where(c == first, idx, 0), axis=0)
    z = tl.sum(tl.where(c == first, zb, 0.0), axis=0)
    flags = tl.load(final_i_ptr + row * 2 + 1)
    m = tl.load(final_ptr + row * NFINAL + F_MAX)
    greedy = (flags & FLAG_GREEDY) != 0
    ok = (first < CP2) & ((flags & FLAG_BAD) == 0)
    tok = tl.where(ok, tok, -1)
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
    params_ptr,  # [B, NPARAM] fp32 per-row parameters
    race_ptr,  # [B, C, NRACE] fp32 race partials (kept mass)
    final_ptr,  # [B, NFINAL] fp32 row summary: lo, max
    final_i_ptr,  # [B, 2] int32 argmax, flags
    out_ptr,  # [B, V] fp32 out: filtered, renormalized probabilities (row stride V)
    V, stride_l, stride_c, CHUNK, C,
    HAS_COUNTS: tl.constexpr, CP2: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, CP2)
    total = tl.sum(tl.load(race_ptr + (row * C + c) * NRACE + R_MASS, mask=c < C, other=0.0), axis=0)
    total = tl.where(total > 0, total, 1.0)  # bad rows have no kept mass (and are zeroed below)
    fo = final_ptr + row * NFINAL
    lo = tl.load(fo + F_LO)
    m = tl.load(fo + F_MAX)
    amax = tl.load(final_i_ptr + row * 2)
    flags = tl.load(final_i_ptr + row * 2 + 1)
    greedy = (flags & FLAG_GREEDY) != 0
    bad = (flags & FLAG_BAD) != 0
    prm = params_ptr + row * NPARAM
    temp = tl.load(prm + P_TEMP)
    min_p = tl.load(prm + P_MINP)
    rep = tl.load(prm + P_REP)
    pres = tl.load(prm + P_PRES)
    freq = tl.load(prm + P_FREQ)
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


def run(
    logits: torch.Tensor,
    params: torch.Tensor,
    topk: torch.Tensor,
    seeds: torch.Tensor,
    row_key_mult: int,
    counts: torch.Tensor | None,
    *,
    tts: bool,
    greedy_top1: bool,
    npass: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Launch stats -> search x npass -> race -> finalize (or probs). ``mode``: sample | probs | simple.

    ``params``: fp32 ``[B, NPARAM]`` contiguous, the columns of :data:`KERNEL_PARAMS`; ``topk``: int32 ``[B]`` (0:
    off); both validated and packed by the public op, read-only here.
    """
    B, V = logits.shape
    dev = logits.device
    cfg = _launch_config(B, V, dev)
    C, CP2 = cfg.chunks, cfg.cp2
    has_counts = counts is not None
    cnt_t = counts if has_counts else logits
    stride_c = counts.stride(0) if has_counts else 0
    f32, i32 = torch.float32, torch.int32
    prm = params
    stats = torch.empty(B, C, NSTAT.value, device=dev, dtype=f32)
    stats_i = torch.empty(B, C, NSTAT_I.value, device=dev, dtype=i32)
    slots = max(npass, 1)
    state = torch.empty(slots, B, NSTATE.value, device=dev, dtype=f32)
    state_i = torch.empty(slots, B, NSTATE_I.value, device=dev, dtype=i32)
    piv = torch.empty(slots, B, NPIV, device=dev, dtype=f32)
    part = torch.empty(slots, B, C, NPIV + 2, device=dev, dtype=f32)
    part_i = torch.empty(slots, B, C, NPIV, device=dev, dtype=i32)
    race = torch.empty(B, C, NRACE.value, device=dev, dtype=f32)
    race_idx = torch.empty(B, C, device=dev, dtype=i32)
    final = torch.empty(B, NFINAL.value, device=dev, dtype=f32)
    final_i = torch.empty(B, 2, device=dev, dtype=i32)
    common = dict(num_warps=cfg.num_warps, maxnreg=MAXNREG_STREAM)
    search_bufs = (stats, stats_i, state, state_i, piv, part, part_i)
    record_launch("sampling_stats")
    _stats_kernel[(B, C)](
        logits, cnt_t, prm, topk, stats, stats_i, V, logits.stride(0), stride_c, cfg.chunk, C,
        HAS_COUNTS=has_counts, GREEDY_TOP1=greedy_top1, BLOCK=cfg.block, **common,
    )
    early_exit = dev.type != "cuda"  # interpreter: reading the state is free, skip passes once all rows resolved
    for n in range(npass):
        if early_exit and n > 0 and bool((state_i[n - 1, :, STI_PHASE.value] == PHASE_DONE.value).all()):
            npass = n
            break
        record_launch("sampling_search")
        _search_kernel[(B, C)](
            logits, cnt_t, prm, topk, *search_bufs, n, B, V, logits.stride(0), stride_c, cfg.chunk, C,
            HAS_COUNTS=has_counts, TTS=tts, GREEDY_TOP1=greedy_top1, CP2=CP2, NP=NPIV, BLOCK=cfg.block_s, **common,
        )
    record_launch("sampling_race")
    _race_kernel[(B, C)](
        logits, cnt_t, prm, topk, seeds, *search_bufs, race, race_idx, final, final_i,
        npass, B, V, logits.stride(0), stride_c, cfg.chunk, C, row_key_mult,
        HAS_COUNTS=has_counts, TTS=tts, GREEDY_TOP1=greedy_top1, DRAW=mode != "probs", SIMPLE=mode == "simple",
        CP2=CP2, NP=NPIV, BLOCK=cfg.block, **common,
    )
    if mode == "probs":
        out = torch.empty(B, V, device=dev, dtype=f32)
        record_launch("sampling_probs")
        _probs_kernel[(B, C)](
            logits, cnt_t, prm, race, final, final_i, out, V, logits.stride(0), stride_c, cfg.chunk, C,
            HAS_COUNTS=has_counts, CP2=CP2, BLOCK=cfg.block, **common,
        )
        return out
    tokens = torch.empty(B, device=dev, dtype=torch.int64)
    logprobs = torch.empty(B, device=dev, dtype=f32)
    record_launch("sampling_finalize")
    _finalize_kernel[(B,)](
        race, race_idx, final, final_i, tokens, logprobs, C, CP2=CP2, num_warps=1, maxnreg=MAXNREG_SMALL_GRID
    )
    return tokens, logprobs


# =========================================================================== issue 14: block sampling for
# diffusion LMs and the rwkv package's sampler
#
# ``_block_kernel`` samples every masked position of ``[B, L, V]`` logits (one program per position; an unmasked
# position's program reads nothing) and writes its token and a confidence. Per position, in one program:
#
# 1. a stats pass: the row max / argmax and the online sum of ``exp`` of the raw logits (for ``raw_prob``) and of
#    the filter values ``z = logits / T`` (``T = 1`` for a greedy step and for the rwkv sampler, which filters the
#    untempered distribution), the finite and NaN / ``+inf`` counts;
# 2. the threshold search of the sampler above, inside the program: each pass places ``NP`` pivots in the value
#    range of the bracket ``(lo, hi]`` and counts the tokens and the mass above every pivot; the bracket shrinks
#    >= 17x a pass and to the data's min / max, and a resolved position stops reading. Top-k and top-p are one
#    joint search on the full distribution (``TOPP_FIRST``: Dream, the rwkv package) or two (top-k, then top-p
#    renormalized over the top-k set: Hugging Face, SDAR, llama.cpp);
# 3. the race pass: an exponential race over the kept tokens (Philox uniforms keyed by the position and the token
#    index), and in the same pass the kept mass, ``sum w log w`` (the entropy), the two largest kept weights (the
#    margin) and the winner's raw logit (``raw_prob``).
# Every pass streams the position's logits once; nothing of size ``[B * L, V]`` is written. The position's
# confidence comes out of the sums of the race pass: prob = ``w_tok / W``, margin = ``(w_1 - w_2) / W``,
# neg_entropy = ``sum w log w / W - log W``, raw_prob = ``exp(x_tok - max x) / sum exp(x - max x)``.

BLK_NPASS = 10  # search passes per phase (each narrows the bracket >= 17x in value and to the data inside it)
CONF_MODES = ("prob", "raw_prob", "margin", "neg_entropy", "random", "none")  # the CONF constexpr's values


@triton.jit
def _blk_search(
    x_ptr,  # [V] logits of the position (unit stride)
    V, t_eff, m, zmin,  # vocabulary size, the divisor of the filter values, their max and finite min
    lo, cnt_lo, mass_lo,  # the starting bracket (lo, +inf]: count and mass above lo
    k, use_k, p_s, use_p,  # top-k, flag (int32), top-p mass bound (p * reference mass), flag (int32)
    active,  # bool: search at all (False: return the starting bracket)
    NPASS: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Threshold of one position: the largest pivot value ``lo`` where ``Q`` fails, so that the kept set is
    ``z > lo``. ``Q(t) = (#(z > t) < k or no top-k) and (mass(z > t) < p_s or no top-p)``."""
    j = tl.arange(0, NP)
    fj = j.to(tl.float32) / NP
    cols = tl.arange(0, BLOCK)
    fk = k.to(tl.float32) * 0.0  # a finite 0.0 scalar (m, lo may be infinite on rows that do not search)
    hi = fk + float("inf")
    cnt_hi = 0 * cnt_lo
    mass_hi = fk
    done = (~active) | (cnt_lo <= 1) | ((use_k == 0) & (use_p == 0))
    r0 = tl.where(done, fk, tl.maximum(lo, zmin))  # pivots stay finite on every row (NaN-free reductions)
    r1 = tl.where(done, fk, m)
    it = 0
    while (it < NPASS) & (~done):  # a resolved (or inactive) position leaves at once
        piv = r0 * (1.0 - fj) + r1 * fj  # [NP] uniform in the bracket's data range
        cnt = tl.zeros([NP], dtype=tl.int32)
        mass = tl.zeros([NP], dtype=tl.float32)
        bmin = float("inf")
        bmax = float("-inf")
        for start in range(0, V, BLOCK):
            offs = start + cols
            msk = offs < V
            x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
            z = tl.where(msk, x / t_eff, float("-inf"))
            e = tl.exp(z - m)
            above = z[:, None] > piv[None, :]  # [BLOCK, NP]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
            inside = (z > lo) & (z <= hi)
            bmin = tl.minimum(bmin, tl.min(tl.where(inside, z, float("inf")), axis=0))
            bmax = tl.maximum(bmax, tl.max(tl.where(inside, z, float("-inf")), axis=0))
        # scalar flags enter through where() on the bound, not `block | flag` (interpreter: see _row_state)
        q = (cnt < tl.where(use_k != 0, k, 2147483647)) & (mass < tl.where(use_p != 0, p_s, float("inf")))
        n_false = NP - tl.sum(q.to(tl.int32), axis=0)
        # by value, not position: rounded pivots may repeat or be non-monotone; Q is monotone in the value
        jl = tl.argmax(tl.where(q, float("-inf"), piv), axis=0)
        jh = tl.argmin(tl.where(q, piv, float("inf")), axis=0)
        n_lo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, piv, 0.0), axis=0), lo)
        n_clo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, cnt, 0), axis=0), cnt_lo)
        n_mlo = tl.where(n_false > 0, tl.sum(tl.where(j == jl, mass, 0.0), axis=0), mass_lo)
        n_hi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, piv, 0.0), axis=0), hi)
        n_chi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, cnt, 0), axis=0), cnt_hi)
        n_mhi = tl.where(n_false < NP, tl.sum(tl.where(j == jh, mass, 0.0), axis=0), mass_hi)
        n_r0 = tl.maximum(n_lo, bmin)
        n_r1 = tl.minimum(n_hi, bmax)
        fin = (n_clo - n_chi <= 1) | (bmin >= bmax) | (n_r0 >= n_r1)
        lo, cnt_lo, mass_lo = n_lo, n_clo, n_mlo
        hi, cnt_hi, mass_hi = n_hi, n_chi, n_mhi
        r0, r1 = n_r0, n_r1
        done = fin
        it += 1
    return lo, cnt_lo, mass_lo


@triton.jit
def _block_kernel(
    logits_ptr,  # [B, L, V] fp32/fp16/bf16 logits, strides (stride_b, stride_l, 1)
    masked_ptr,  # [B, L] int8, contiguous: 1 = a position to sample
    ids_ptr,  # [B, L] int64, contiguous: the tokens kept at unmasked positions (read when HAS_IDS)
    params_ptr,  # [B, 2] fp32 per batch row: temperature, top_p
    topk_ptr,  # [B] int32 per batch row: top-k (0 = off)
    seeds_ptr,  # [B] int64 per batch row: Philox seed (the launcher mixed the row key in)
    tokens_ptr,  # [B, L] int64 out: the token (-1: a bad position, or an unmasked one without ids)
    conf_ptr,  # [B, L] fp32 out: the confidence (-inf unmasked, NaN bad)
    kept_ptr,  # [B * L, 3] fp32 out (HAS_KEPT): lo (kept: logits / T_eff > lo), max of logits / T_eff, kept mass
    L, V, stride_b, stride_l,  # positions per row, vocabulary size, strides of logits
    HAS_IDS: tl.constexpr, HAS_KEPT: tl.constexpr, CONF: tl.constexpr, TOPP_FIRST: tl.constexpr,
    POST_TEMP: tl.constexpr, NPASS: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    pos = row % L
    x_ptr = logits_ptr + b * stride_b + pos * stride_l
    live = tl.load(masked_ptr + row) != 0
    temp = tl.load(params_ptr + b * 2)
    top_p = tl.load(params_ptr + b * 2 + 1)
    k = tl.load(topk_ptr + b)
    seed = tl.load(seeds_ptr + b)
    greedy = temp == 0.0
    if POST_TEMP:  # rwkv: filter the untempered distribution, temper the kept weights
        t_eff = 0.0 * temp + 1.0
        inv_post = 1.0 / tl.where(greedy, 1.0, temp)
    else:  # a greedy step's confidences use the untempered filtered distribution (Dream)
        t_eff = tl.where(greedy, 1.0, temp)
        inv_post = 0.0 * temp + 1.0
    cols = tl.arange(0, BLOCK)
    # ---- pass 1: stats of the raw logits and of the filter values
    xmax = float("-inf")
    xarg = 0
    xs = 0.0
    zmax = float("-inf")
    zs = 0.0
    zmin = float("inf")
    nfin = 0
    nbad = 0
    end = tl.where(live, V, 0)
    for start in range(0, end, BLOCK):
        offs = start + cols
        msk = offs < V
        x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
        z = x / t_eff
        nbad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        zfin = (z > float("-inf")) & (z < float("inf"))
        nfin += tl.sum(zfin.to(tl.int32), axis=0)
        zmin = tl.minimum(zmin, tl.min(tl.where(zfin, z, float("inf")), axis=0))
        tmax = tl.max(x, axis=0)
        targ = tl.argmax(x, axis=0)
        xarg = tl.where(tmax > xmax, start + targ, xarg)  # strict: the earlier tile keeps ties (lowest index)
        m_new = tl.maximum(xmax, tmax)
        m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)  # no inf - inf (a bad row's +inf)
        xs = xs * tl.exp(xmax - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        xmax = m_new
        zt = tl.max(z, axis=0)
        zm_new = tl.maximum(zmax, zt)
        zm_safe = tl.where(tl.abs(zm_new) == float("inf"), 0.0, zm_new)
        zs = zs * tl.exp(zmax - zm_safe) + tl.sum(tl.exp(z - zm_safe), axis=0)
        zmax = zm_new
    bad = (nbad > 0) | (xmax == float("-inf"))
    onehot = (zmax == float("inf")) & ~bad  # logits / T overflows: the T -> 0 limit, a one-hot at the argmax
    bad = bad | ((nfin == 0) & ~onehot)
    m = zmax
    if CONF == 0 or CONF == 2 or CONF == 3:  # the confidence needs the filtered distribution
        use_filter = live & ~bad & ~onehot
    else:
        use_filter = live & ~bad & ~onehot & ~greedy
    # ---- the kept set: one joint search, or top-k then top-p renormalized over the top-k set
    k_on = (k > 0) & (k < nfin)
    p_on = top_p < 1.0
    uk = k_on.to(tl.int32)
    ninf = 0.0 * temp + float("-inf")
    if TOPP_FIRST:
        lo, cnt_lo, mass_lo = _blk_search(x_ptr, V, t_eff, m, zmin, ninf, nfin, zs, k, uk,
                                          top_p * zs, p_on.to(tl.int32), use_filter, NPASS, NP, BLOCK_S)
    else:
        lo1, cnt1, mass1 = _blk_search(x_ptr, V, t_eff, m, zmin, ninf, nfin, zs, k, uk,
                                       top_p * zs, (p_on & ~k_on).to(tl.int32), use_filter, NPASS, NP, BLOCK_S)
        lo, cnt_lo, mass_lo = _blk_search(x_ptr, V, t_eff, m, zmin, lo1, cnt1, mass1, k, 0 * uk, top_p * mass1,
                                          p_on.to(tl.int32), use_filter & k_on & p_on, NPASS, NP, BLOCK_S)
    # ---- pass 3: the race over the kept tokens, the kept mass, entropy and top-2 sums
    w_sum = 0.0
    e_sum = 0.0
    v1 = float("-inf")
    v2 = float("-inf")
    best = float("-inf")
    best_i = -1
    best_lw = 0.0
    best_x = 0.0
    key_base = pos << 32
    end = tl.where(use_filter, V, 0)
    for start in range(0, end, BLOCK):
        offs = start + cols
        msk = offs < V
        x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
        z = tl.where(msk, x / t_eff, float("-inf"))
        kept = ((z > lo) | (z == m)) & (z > float("-inf"))  # the max's group always stays (top_p = 0: rwkv)
        d = z - m
        if POST_TEMP:
            lw = tl.where(d == 0.0, 0.0, d * inv_post)  # no 0 * inf at the max when 1 / T overflows
        else:
            lw = d
        lw = tl.where(kept, lw, float("-inf"))
        w = tl.exp(lw)
        w_sum += tl.sum(w, axis=0)
        if CONF == 3:
            e_sum += tl.sum(w * tl.where(w > 0.0, lw, 0.0), axis=0)  # 0 log 0 = 0 (no 0 * -inf)
        if CONF == 2:  # the two largest kept weights (ties at the max give a margin of 0)
            t1 = tl.max(lw, axis=0)
            a1 = tl.argmax(lw, axis=0)
            t2 = tl.max(tl.where(cols == a1, float("-inf"), lw), axis=0)
            v2 = tl.maximum(tl.maximum(v2, t2), tl.minimum(v1, t1))
            v1 = tl.maximum(v1, t1)
        if (tl.max(kept.to(tl.int32), axis=0) > 0) & (temp != 0.0):  # Philox only where a kept token is drawn
            u = tl.rand(seed, key_base + offs.to(tl.int64))
            key = tl.maximum(lw - tl.log(-tl.log(u)), -3.0e38)
            key = tl.where(kept, key, float("-inf"))
            key = tl.where(greedy, float("-inf"), key)  # a greedy step takes the argmax, drawing nothing
            t_best = tl.max(key, axis=0)
            t_arg = tl.argmax(key, axis=0)
            upd = t_best > best  # strict: the earlier tile keeps ties
            best_i = tl.where(upd, start + t_arg, best_i)
            best_lw = tl.where(upd, tl.sum(tl.where(cols == t_arg, lw, 0.0), axis=0), best_lw)
            best_x = tl.where(upd, tl.sum(tl.where(cols == t_arg, x, 0.0), axis=0), best_x)
            best = tl.maximum(best, t_best)
    # ---- the token and its confidence
    take_max = greedy | onehot
    tok = tl.where(take_max, xarg, best_i).to(tl.int64)
    tok_lw = tl.where(take_max, 0.0, best_lw)  # the argmax is always kept, at weight exp(0) = 1
    xmax_safe = tl.where(bad, 0.0, xmax)
    dx_tok = tl.where(take_max | bad, 0.0, best_x - xmax_safe)  # raw logit of the token minus the max
    w_div = tl.where(w_sum > 0.0, w_sum, 1.0)
    if CONF == 0:
        conf = tl.where(onehot, 1.0, tl.exp(tok_lw) / w_div)
    elif CONF == 1:
        conf = tl.exp(dx_tok) / tl.where(xs > 0.0, xs, 1.0)
    elif CONF == 2:
        conf = tl.where(onehot, 1.0, (1.0 - tl.exp(v2)) / w_div)
    elif CONF == 3:
        conf = tl.where(onehot, 0.0, e_sum / w_div - tl.log(w_div))
    elif CONF == 4:
        two = tl.arange(0, 2)
        u2 = tl.rand(seed, key_base + 0xFFFFFFFE + two.to(tl.int64))  # past every token index of the position
        conf = tl.sum(tl.where(two == 0, u2, 0.0), axis=0)
    else:
        conf = 0.0 * temp
    tok = tl.where(bad, -1, tok)
    conf = tl.where(bad, float("nan"), conf)
    if HAS_IDS:
        keep_tok = tl.load(ids_ptr + row)
    else:
        keep_tok = -1 + 0 * tok
    tok = tl.where(live, tok, keep_tok)
    conf = tl.where(live, conf, float("-inf"))
    tl.store(tokens_ptr + row, tok)
    tl.store(conf_ptr + row, conf)
    if HAS_KEPT:
        tl.store(kept_ptr + row * 3, lo)
        tl.store(kept_ptr + row * 3 + 1, m)
        tl.store(kept_ptr + row * 3 + 2, w_sum)


def _block_config(V: int, device: torch.device) -> tuple[int, int, int]:
    """Tiles of the block kernel: (race / stats tile, search tile ([BLOCK_S, NPIV] compares), num_warps).

    One program streams a whole vocabulary row per pass, and a block step has few positions (32 per row: fewer
    programs than SMs), so a program is bound by the latency of its tile loop, not by occupancy: long rows take
    wide tiles and many warps (a 126k row is 31 iterations of 4096, not 124 of 1024). Big tiles under the
    interpreter, where each tile costs a few NumPy calls."""
    np2 = triton.next_power_of_2(V)
    if device.type == "cuda":
        if V >= 32768:
            return 4096, 1024, 16
        if V >= 4096:
            return 2048, 512, 8
        return min(1024, np2), min(256, np2), 4
    block = min(2048, np2)
    return block, block, 1


def block_run(
    logits: torch.Tensor,
    masked: torch.Tensor,
    input_ids: torch.Tensor | None,
    params: torch.Tensor,
    topk: torch.Tensor,
    seeds: torch.Tensor,
    *,
    confidence: str,
    topp_first: bool,
    post_temp: bool,
    want_kept: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch ``_block_kernel`` over every position of ``logits [B, L, V]``.

    ``masked`` bool ``[B, L]``; ``input_ids`` int64 ``[B, L]`` or None; ``params`` fp32 ``[B, 2]`` (temperature,
    top_p), ``topk`` int32 ``[B]``, ``seeds`` int64 ``[B]`` (row keys mixed in); all on the logits' device and
    validated by the public op. Returns tokens int64 ``[B, L]``, confidences fp32 ``[B, L]`` and, with
    ``want_kept``, fp32 ``[B, L, 3]`` (threshold, max and kept mass of each position, for the probabilities).
    """
    B, L, V = logits.shape
    dev = logits.device
    if logits.stride(2) != 1 and V > 1:
        raise ValueError("block_run: logits must have a contiguous last dim")
    for name, t, shape, dtype in (("masked", masked, (B, L), torch.bool), ("params", params, (B, 2), torch.float32),
                                  ("topk", topk, (B,), torch.int32), ("seeds", seeds, (B,), torch.int64)):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != dev:
            raise ValueError(f"block_run: {name} must be {dtype} {shape} on {dev}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if input_ids is not None and (tuple(input_ids.shape) != (B, L) or input_ids.dtype != torch.int64):
        raise ValueError("block_run: input_ids must be int64 [B, L]")
    if confidence not in CONF_MODES:
        raise ValueError(f"block_run: confidence must be one of {CONF_MODES}, got {confidence!r}")
    block, block_s, num_warps = _block_config(V, dev)
    tokens = torch.empty(B, L, dtype=torch.int64, device=dev)
    conf = torch.empty(B, L, dtype=torch.float32, device=dev)
    kept = torch.empty(B, L, 3, dtype=torch.float32, device=dev) if want_kept else conf
    mask_i8 = masked.contiguous().view(torch.int8)
    ids = input_ids.contiguous() if input_ids is not None else tokens
    if B * L:
        record_launch("block_sample")
        _block_kernel[(B * L,)](
            logits, mask_i8, ids, params.contiguous(), topk.contiguous(), seeds.contiguous(), tokens, conf, kept,
            L, V, logits.stride(0), logits.stride(1),
            HAS_IDS=input_ids is not None, HAS_KEPT=want_kept, CONF=CONF_MODES.index(confidence),
            TOPP_FIRST=topp_first, POST_TEMP=post_temp, NPASS=BLK_NPASS, NP=NPIV, BLOCK=block, BLOCK_S=block_s,
            num_warps=num_warps, maxnreg=MAXNREG_STREAM,
        )
    return tokens, conf, (kept if want_kept else None)


# =========================================================================== beam candidates (issue 13)
# One step of Hugging Face beam search / beam sampling (``decodekit.beam_candidates``), fused.
#
# Algorithm. ``_beam_row_kernel`` (grid ``B * N``: one program per beam row) reads its row of logits a few times and
# writes only its ``K`` best candidates:
#   1. an online log-sum-exp of the fp32 logits, so ``s = x - lse`` is the log-softmax without writing it;
#   2. with top-k / top-p on, the row statistics of ``z = penalized(s) / T`` (max, sum of exp, min, count);
#   3. the top-k cut, then the top-p cut on the mass renormalized over the top-k set, each by a *search over
#      values* (the sampler's threshold search): a bracket ``(lo, hi]`` with ``Q(lo)`` false and ``Q(hi)`` true,
#      ``Q(t) = #(z > t) < k`` (top-k) or ``mass(z > t) < p * S or #(z > t) < min_tokens_to_keep`` (top-p), both
#      monotone in ``t``; each pass counts the tokens and mass above 16 pivots spread over the values left in the
#      bracket and keeps the sub-interval where ``Q`` flips, with the min / max of the data inside it: >= 16x
#      narrower per pass, finished when one distinct value is left, so a tie group at the cut stays whole;
#   4. the selection: ``key = beam_score + z`` (``do_sample``: plus Gumbel noise ``-log(-log u)``, ``u`` Philox
#      uniforms keyed by (seed, prompt, beam, token): Gumbel-top-k draws without replacement from the softmax of
#      the scores) over the kept tokens, a running top-``K`` list in registers; a tile enters the list only where
#      its max beats the list's worst entry, so after the first tiles most tiles cost one reduction.
# ``_beam_merge_kernel`` (grid ``B``) merges the ``N`` lists of a prompt: the ``K`` best keys (ties: lowest
# ``n * V + token``), written ordered by score.
#
# Why fast: no ``[B * N, V]`` intermediate is written and the vocabulary is never sorted; the row is streamed
# (2 + search passes + 1) times, which for the beam workloads (V ~ 8k to 128k, a few beams) stays in L2 after the
# first read; only ``[B, K]`` tokens, beams and scores leave. No host synchronization: CUDA-graph safe.

BEAM_NP = 16  # pivots per search pass
BEAM_MAX_PASS = 40  # search passes at most (distinct fp32 values are separated in <= 9; the cap bounds ties of NaN)


@triton.jit
def _beam_z(
    logits_ptr, counts_ptr, row, stride_l, stride_c, offs, mask, lse, temp, rep, HAS_COUNTS: tl.constexpr,
):
    """Processed log-probabilities of one tile: ``(x - lse)``, repetition penalty on seen tokens, ``/ T``;
    ``-inf`` outside the row and for NaN."""
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    s = x - lse
    if HAS_COUNTS:
        seen = tl.load(counts_ptr + row * stride_c + offs, mask=mask, other=0) > 0
        s = tl.where(seen, tl.where(s < 0, s * rep, s / rep), s)
    s = s / temp
    return tl.where(mask & (s == s), s, float("-inf"))


@triton.jit
def _beam_cut(
    logits_ptr, counts_ptr, row, stride_l, stride_c, V, lse, temp, rep, zmax,
    lo, r0, r1, cnt_lo, mass_lo, k, p_mass, mtk, max_pass,
    HAS_COUNTS: tl.constexpr, USE_K: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One cut search. Starts from ``lo`` (``Q(lo)`` false unless resolved at once), the data range ``[r0, r1]``
    above it and the count / mass above it; returns the final ``(lo, r0, cnt_lo, mass_lo)``: keep ``z > lo``,
    ``r0`` the lowest kept value. ``USE_K``: top-k test ``#(z > t) < k``; else the top-p test
    ``mass(z > t) < p_mass or #(z > t) < mtk``."""
    if USE_K:
        done = cnt_lo < k
    else:
        done = (mass_lo < p_mass) | (cnt_lo < mtk)
    done = done | (r0 >= r1)
    hi = float("inf")
    j = tl.arange(0, NP)
    f = j.to(tl.float32) / NP
    f_up = (j + 1).to(tl.float32) / NP
    cols = tl.arange(0, BLOCK)
    it = 0
    while (it < max_pass) & (done == 0):
        piv = r0 + (r1 - r0) * f  # [NP] non-decreasing (monotone rounding), piv[0] = r0
        up = tl.where(j < NP - 1, r0 + (r1 - r0) * f_up, hi)  # upper end of each pivot's interval (bit-equal)
        cnt = tl.zeros([NP], dtype=tl.int32)
        mass = tl.zeros([NP], dtype=tl.float32)
        imin = tl.full([NP], float("inf"), tl.float32)
        imax = tl.full([NP], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = _beam_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, offs < V, lse, temp, rep,
                        HAS_COUNTS)
            e = tl.exp(z - zmax)
            above = z[:, None] > piv[None, :]  # [BLOCK, NP]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
            inside = above & (z[:, None] <= up[None, :])
            imin = tl.minimum(imin, tl.min(tl.where(inside, z[:, None], float("inf")), axis=0))
            imax = tl.maximum(imax, tl.max(tl.where(inside, z[:, None], float("-inf")), axis=0))
        if USE_K:
            q = cnt < k
        else:
            q = (mass < p_mass) | (cnt < mtk)
        n_false = NP - tl.sum(q.to(tl.int32), axis=0)
        jl = n_false - 1  # the last pivot where Q is false (q is monotone in j: the pivots are sorted)
        sel = j == jl
        all_true = n_false == 0
        # Q true at every pivot: the cut is r0 itself (the lowest value left), lo stays
        lo = tl.where(all_true, lo, tl.sum(tl.where(sel, piv, 0.0), axis=0))
        cnt_lo = tl.where(all_true, cnt_lo, tl.sum(tl.where(sel, cnt, 0), axis=0))
        mass_lo = tl.where(all_true, mass_lo, tl.sum(tl.where(sel, mass, 0.0), axis=0))
        hi = tl.where(all_true, r0, tl.where(n_false < NP, tl.sum(tl.where(j == n_false, piv, 0.0), axis=0), hi))
        n0 = tl.where(all_true, r0, tl.sum(tl.where(sel, imin, 0.0), axis=0))
        n1 = tl.where(all_true, r0, tl.sum(tl.where(sel, imax, 0.0), axis=0))
        r0 = n0
        r1 = n1
        done = (r0 >= r1) | all_true  # one distinct value (or none) left in the bracket
        it += 1
    return lo, r0, cnt_lo, mass_lo


@triton.jit
def _beam_row_kernel(
    logits_ptr,  # [B * N, V] fp32/fp16/bf16 logits, row stride stride_l, unit column stride
    counts_ptr,  # [B * N, V] int token counts (only read when HAS_COUNTS)
    scores_ptr,  # [B * N] fp32 running beam scores
    seeds_ptr,  # [B] int64 per-prompt seeds (only read when DO_SAMPLE)
    key_ptr,  # [B * N, KP] fp32 out: the row's best keys (score, or score + Gumbel noise)
    score_ptr,  # [B * N, KP] fp32 out: their scores
    tok_ptr,  # [B * N, KP] int32 out: their tokens (-1: empty slot)
    V, stride_l, stride_c, N,  # vocabulary, row strides of logits and counts, beams per prompt
    temp, rep,  # temperature, repetition penalty
    top_k, top_p, mtk,  # effective top-k (max(top_k, mtk)), top-p, min_tokens_to_keep
    row_key_mult, max_pass,  # 1: a shared seed (prompts keyed by index), 0: per-prompt seeds; search pass cap
    HAS_COUNTS: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, DO_SAMPLE: tl.constexpr,
    K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # 1. log-sum-exp of the logits (a NaN or +inf logit makes the row bad: no candidates)
    m = float("-inf")
    ssum = 0.0
    nbad = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
        bad = (x != x) | (x == float("inf"))
        nbad += tl.sum(bad.to(tl.int32), axis=0)
        x = tl.where(bad, float("-inf"), x)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        ssum = ssum * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0)
        m = new_m
    lse = tl.where(nbad > 0, float("nan"), m + tl.log(tl.where(ssum > 0, ssum, 1.0)))  # all -inf: lse -inf
    lo = float("-inf")
    # 2. + 3. the top-k and top-p cuts
    if HAS_TOPK or HAS_TOPP:
        zmax = float("-inf")
        zsum = 0.0
        zmin = float("inf")
        nfin = 0
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = _beam_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, offs < V, lse, temp, rep,
                        HAS_COUNTS)
            fin = z > float("-inf")
            nfin += tl.sum(fin.to(tl.int32), axis=0)
            zmin = tl.minimum(zmin, tl.min(tl.where(fin, z, float("inf")), axis=0))
            new_m = tl.maximum(zmax, tl.max(z, axis=0))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            zsum = zsum * tl.exp(zmax - safe) + tl.sum(tl.where(fin, tl.exp(z - safe), 0.0), axis=0)
            zmax = new_m
        zmax_s = tl.where(zmax == float("-inf"), 0.0, zmax)
        r0 = zmin
        cnt_lo = nfin
        mass_lo = zsum * tl.exp(zmax - zmax_s)  # mass relative to exp(zmax)
        if HAS_TOPK:
            lo, r0, cnt_lo, mass_lo = _beam_cut(
                logits_ptr, counts_ptr, row, stride_l, stride_c, V, lse, temp, rep, zmax_s,
                lo, r0, zmax, cnt_lo, mass_lo, top_k, 0.0, mtk, max_pass, HAS_COUNTS, True, NP, BLOCK_S)
        if HAS_TOPP:
            lo, r0, cnt_lo, mass_lo = _beam_cut(
                logits_ptr, counts_ptr, row, stride_l, stride_c, V, lse, temp, rep, zmax_s,
                lo, r0, zmax, cnt_lo, mass_lo, top_k, top_p * mass_lo, mtk, max_pass, HAS_COUNTS, False, NP,
                BLOCK_S)
    # 4. the row's K best keys over the kept tokens
    bscore = tl.load(scores_ptr + row)
    b = row // N
    n = row - b * N
    seed = 0
    key_base = 0
    if DO_SAMPLE:
        seed = tl.load(seeds_ptr + b)
        key_base = (((b * row_key_mult) << 40) + n * V).to(tl.int64)
    slots = tl.arange(0, KP)
    bk = tl.where(slots < K, float("-inf"), float("inf"))  # padding slots are never evicted
    bs = tl.full([KP], float("-inf"), tl.float32)
    bt = tl.full([KP], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        z = _beam_z(logits_ptr, counts_ptr, row, stride_l, stride_c, offs, offs < V, lse, temp, rep, HAS_COUNTS)
        kept = (z > lo) & (z > float("-inf"))
        score = bscore + z
        key = tl.where(kept, score, float("-inf"))
        if DO_SAMPLE:
            if tl.max(kept.to(tl.int32), axis=0) > 0:  # Philox only for tiles holding a kept token
                u = tl.maximum(tl.rand(seed, key_base + offs.to(tl.int64)), 2.9802322387695312e-08)  # u > 0
                key = tl.where(kept, score - tl.log(-tl.log(u)), float("-inf"))
        tmax = tl.max(key, axis=0)
        worst = tl.min(bk, axis=0)
        while tmax > worst:  # the tile's best beats the list's worst: insert it (strict: earlier tokens win ties)
            a = tl.argmax(key, axis=0)
            sc_a = tl.sum(tl.where(cols == a, score, 0.0), axis=0)
            # evict the worst entry; among equal keys the highest token (the lowest priority)
            slot = tl.argmax(tl.where(bk == worst, bt, -2), axis=0)
            bk = tl.where(slots == slot, tmax, bk)
            bs = tl.where(slots == slot, sc_a, bs)
            bt = tl.where(slots == slot, start + a.to(tl.int32), bt)
            key = tl.where(cols == a, float("-inf"), key)
            tmax = tl.max(key, axis=0)
            worst = tl.min(bk, axis=0)
    out = row * KP + slots
    tl.store(key_ptr + out, bk)
    tl.store(score_ptr + out, bs)
    tl.store(tok_ptr + out, bt)


@triton.jit
def _beam_merge_kernel(
    key_ptr,  # [B * N, KP] fp32 the rows' best keys
    score_ptr,  # [B * N, KP] fp32 their scores
    tok_ptr,  # [B * N, KP] int32 their tokens (-1: empty)
    out_tok_ptr,  # [B, K] int64 out: tokens, ordered by score
    out_beam_ptr,  # [B, K] int64 out: the beam (0..N-1) each candidate continues (-1: none)
    out_score_ptr,  # [B, K] fp32 out: scores, descending (-inf: none)
    V, N,  # vocabulary, beams per prompt
    K: tl.constexpr, KP: tl.constexpr, NKP: tl.constexpr, DO_SAMPLE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NKP)
    valid = i < N * KP
    base = b * N * KP
    key = tl.load(key_ptr + base + i, mask=valid, other=float("-inf"))
    sc = tl.load(score_ptr + base + i, mask=valid, other=float("-inf"))
    tok = tl.load(tok_ptr + base + i, mask=valid, other=-1)
    n = (i // KP).to(tl.int64)
    real = valid & (tok >= 0)
    flat = tl.where(real, n * V + tok, 1 << 62)  # tie order: the lowest n * V + token first
    sc = tl.where(real, sc, float("-inf"))
    if DO_SAMPLE:  # the K largest keys (the draw), then ordered by score below
        chosen = i < 0
        for _ in range(K):
            cand = real & ~chosen
            best = tl.max(tl.where(cand, key, float("-inf")), axis=0)
            pick = tl.argmin(tl.where(cand & (key == best), flat, 1 << 62), axis=0)
            chosen = chosen | ((i == pick) & cand)
        avail = chosen
    else:
        avail = real
    for k in range(K):
        best = tl.max(tl.where(avail, sc, float("-inf")), axis=0)
        hit = avail & (sc == best)
        any_hit = tl.max(hit.to(tl.int32), axis=0) > 0
        pick = tl.argmin(tl.where(hit, flat, 1 << 62), axis=0)
        sel = (i == pick) & any_hit
        t = tl.sum(tl.where(sel, tok, 0), axis=0)
        nb = tl.sum(tl.where(sel, n, 0), axis=0)
        tl.store(out_tok_ptr + b * K + k, tl.where(any_hit, t.to(tl.int64), -1))
        tl.store(out_beam_ptr + b * K + k, tl.where(any_hit, nb, -1))
        tl.store(out_score_ptr + b * K + k, tl.where(any_hit, best, float("-inf")))
        avail = avail & ~sel


def _beam_block(V: int, device: torch.device) -> tuple[int, int, int]:
    """(tile, search tile, num_warps) of the beam kernels. On a GPU: 1024 for the streaming passes, 256 for the
    search passes (their [tile, 16] pivot compares and interval min / max are the register-heavy part), 8 warps
    (4 ran out of registers and spilled with a 1024 search tile: sm_90 / sm_100 compiles). Under the interpreter
    2048 for both and one warp (each tile costs a few numpy calls there)."""
    v = triton.next_power_of_2(V)
    if device.type == "cuda":
        return min(1024, v), min(256, v), 8
    return min(2048, v), min(2048, v), 1


def beam_run(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    counts: torch.Tensor | None,
    seeds: torch.Tensor,
    row_key_mult: int,
    *,
    num_beams: int,
    num_candidates: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    min_tokens_to_keep: int,
    do_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the beam row kernel (grid ``B * N``) and the merge (grid ``B``); see the section comment.

    ``logits`` ``[B * N, V]`` (unit column stride), ``beam_scores`` fp32 ``[B * N]``, ``counts`` int ``[B * N, V]``
    or None, ``seeds`` int64 ``[B]``. Returns tokens, beams (int64) and scores (fp32), each ``[B, K]``.
    """
    R, V = logits.shape
    N, K = num_beams, num_candidates
    if R == 0 or R % N or not 1 <= K <= N * V:
        raise ValueError(f"beam_run: bad sizes R={R}, V={V}, num_beams={N}, num_candidates={K}")
    if beam_scores.shape != (R,) or beam_scores.dtype != torch.float32 or not beam_scores.is_contiguous():
        raise ValueError(f"beam_run: beam_scores must be contiguous fp32 [{R}], got {tuple(beam_scores.shape)}")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError("beam_run: logits must have a unit column stride")
    B = R // N
    if seeds.shape != (B,) or seeds.dtype != torch.int64:
        raise ValueError(f"beam_run: seeds must be int64 [{B}], got {tuple(seeds.shape)} {seeds.dtype}")
    dev = logits.device
    KP = triton.next_power_of_2(K)
    NKP = triton.next_power_of_2(N * KP)
    keys = torch.empty(R, KP, device=dev, dtype=torch.float32)
    part_scores = torch.empty(R, KP, device=dev, dtype=torch.float32)
    part_toks = torch.empty(R, KP, device=dev, dtype=torch.int32)
    tokens = torch.empty(B, K, device=dev, dtype=torch.int64)
    beams = torch.empty(B, K, device=dev, dtype=torch.int64)
    scores = torch.empty(B, K, device=dev, dtype=torch.float32)
    has_counts = counts is not None and repetition_penalty != 1.0
    k_eff = min(max(top_k, min_tokens_to_keep), V) if top_k > 0 else 0
    block, block_s, num_warps = _beam_block(V, dev)
    record_launch("beam_rows")
    _beam_row_kernel[(R,)](
        logits, counts if has_counts else logits, beam_scores, seeds, keys, part_scores, part_toks,
        V, logits.stride(0), counts.stride(0) if has_counts else 0, N,
        float(temperature), float(repetition_penalty), k_eff, float(top_p), min_tokens_to_keep,
        row_key_mult, BEAM_MAX_PASS,
        HAS_COUNTS=has_counts, HAS_TOPK=0 < k_eff < V, HAS_TOPP=0.0 < top_p < 1.0, DO_SAMPLE=do_sample,
        K=K, KP=KP, NP=BEAM_NP, BLOCK=block, BLOCK_S=block_s, num_warps=num_warps, maxnreg=MAXNREG_SMALL_GRID,
    )
    record_launch("beam_merge")
    _beam_merge_kernel[(B,)](
        keys, part_scores, part_toks, tokens, beams, scores, V, N, K=K, KP=KP, NKP=NKP, DO_SAMPLE=do_sample,
        num_warps=num_warps, maxnreg=MAXNREG_SMALL_GRID,
    )
    return tokens, beams, scores
