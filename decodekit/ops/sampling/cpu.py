"""The PyTorch path of the sampler: what CPU tensors get with ``backend="auto"``.

One vectorized pipeline, the same for every distribution, with no thread pool of its own (it runs on torch's
intra-op threads like any eager code, so CPU contention slows it no more than eager PyTorch):

1. **Parameters** are normalized once (:class:`_Params`: a Python float, or an fp32 ``[B, 1]`` column for per-row
   tensors) and read once on the host to split the rows into groups: bad rows (NaN / ``+inf`` / all ``-inf``),
   greedy rows, *candidate rows* (top-k) and *whole-row rows* (top-p alone, min-p alone, or no filter). With scalar
   parameters there is one group and no row indexing.
2. **Penalties** on an fp32 copy, only at the tokens with a nonzero count (``nonzero`` once; the caller's logits
   are never modified).
3. **The kept set.**
   - *Candidate rows*: ``torch.topk`` of ``k + 1`` values (more while the last one still ties the k-th value, so a
     tie group is kept whole), then temperature, top-p and min-p on those candidates, sorted by value.
   - *Whole-row rows*: temperature and ``w = exp(z - max)`` over the row. Top-p needs the value where the
     descending cumulative mass crosses ``top_p``; instead of sorting V values, a histogram of the mass over
     ``_BINS`` value bins (one ``scatter_add``) finds the bin holding the cut, and only that bin's tokens (a few
     hundred, even on a flat 128k row) are sorted. So the cost is a few passes over the row whatever the
     distribution, where a sort-based sampler pays a full sort.
   Thresholds compare values, so ties at a top-k / top-p boundary are kept or dropped whole, as the references
   document. ``temperature -> 0`` behaves as greedy also when ``logits / T`` overflows.
4. **The draw**: inverse CDF with one uniform per row: the kept weights are summed in float64 in the candidates'
   order (by value for candidate rows, by token for whole rows), and the token is the first whose running sum
   exceeds ``u * total``. ``u`` is a counter-based hash of ``(seed, row key)`` (:func:`counter_uniform`), so a
   row's token depends only on its seed, its parameters and its logits: the same per-row seed gives the same
   token whatever the batch size or the row's position.
5. **Small calls** (at most ``_HOST_ELEMS`` logits, scalar parameters) run the same steps in NumPy: there a torch
   op is mostly dispatch (~3 us) and a NumPy call ~1 us, which decides the B = 1 TTS-codebook case.

The Triton kernels draw from the same distribution with their own random stream (an exponential race over
Philox uniforms), so for one seed the two backends give equally distributed, not identical, tokens; greedy rows,
kept sets and probabilities are the same on both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from decodekit.ops._threads import torch_threads

Param = float | int | torch.Tensor

_BINS = 2048  # value bins of the top-p cut search
_RANGE = 30.0  # the bins cover values within 30 (nats) of the row max; below that a token's weight is < 1e-13
_NEG_INF = float("-inf")
_INF = float("inf")


@dataclass
class RowParams:
    """Validated sampling parameters: Python scalars (broadcast) or ``[B]`` tensors on the logits' device."""

    temperature: Param
    top_k: Param
    top_p: Param
    min_p: Param
    repetition_penalty: Param
    presence_penalty: Param
    frequency_penalty: Param
    token_counts: torch.Tensor | None  # int [B, V]
    tts: bool  # True: sample_logits semantics (top-p on the un-renormalized post-top-k probabilities, "<=")
    greedy_top1: bool  # True: top_k == 1 means greedy (sample); False: it keeps the ties of the max (TTS)


@dataclass
class Seed:
    """A row's random stream: ``seed`` (a Python int shared by all rows, or an int64 ``[B]`` tensor) and its row
    key ``row * row_key_mult`` (1: a shared seed, rows keyed by index; 0: per-row seeds, the index is no part)."""

    seed: int | torch.Tensor
    row_key_mult: int


# --------------------------------------------------------------------------- random numbers

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as an int64
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in ``[0, 1)``: the splitmix64 output for state ``seed + (counter + 1) * golden``.

    int64 tensors of one shape; arithmetic wraps modulo 2**64. The top 24 bits of the hash are the uniform, so
    it is exact in fp32. ``u(seed, counter)`` depends on nothing else: a counter-based stream.
    """
    z = seed + (counter + 1) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))


# --------------------------------------------------------------------------- parameters and penalties


class _Params:
    """The four filter parameters of a sampler call, normalized once: each is a Python float (one value for
    every row) or an fp32 ``[B, 1]`` column, and ``host`` holds all of them as ``[B]`` lists for the row
    grouping (read once; no per-parameter device reductions later)."""

    NAMES = ("temperature", "top_k", "top_p", "min_p")

    def __init__(self, prm: RowParams, B: int, device: torch.device) -> None:
        self.cols: dict[str, float | torch.Tensor] = {}
        self.host: dict[str, list[float]] = {}
        for name in self.NAMES:
            v = getattr(prm, name)
            if isinstance(v, torch.Tensor):
                col = v.to(device, torch.float32).reshape(-1).expand(B)
                self.cols[name], self.host[name] = col[:, None], col.tolist()
            else:
                self.cols[name], self.host[name] = float(v), [float(v)] * B

    def rows(self, rows: torch.Tensor | None) -> dict[str, float | torch.Tensor]:
        """The parameters of the batch rows ``rows`` (None: all rows)."""
        if rows is None:
            return self.cols
        return {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in self.cols.items()}


def _any(v: float | torch.Tensor, pred) -> bool:  # noqa: ANN001
    """``pred`` holds for some row (a Python test for a scalar, one reduction for a column)."""
    return bool(pred(v).any()) if isinstance(v, torch.Tensor) else bool(pred(v))


def penalized_logits(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """fp32 ``[B, V]`` logits after the repetition, presence and frequency penalties (no temperature).

    Only tokens with a nonzero count change, in the kernel's fp32 operations and order; a copy is made when a
    penalty applies, so the caller's tensor is never modified.
    """
    z = logits.float()
    counts = prm.token_counts
    rep, pres, freq = prm.repetition_penalty, prm.presence_penalty, prm.frequency_penalty
    if counts is None or not any(bool((v != d).any()) if isinstance(v, torch.Tensor) else v != d
                                 for v, d in ((rep, 1.0), (pres, 0.0), (freq, 0.0))):
        return z
    r, c = counts.nonzero(as_tuple=True)
    z = z.clone() if z.data_ptr() == logits.data_ptr() else z

    def at(v: Param) -> Param:
        return v.to(z.device, torch.float32)[r] if isinstance(v, torch.Tensor) else float(v)

    z[r, c] = _penalize(z[r, c], counts[r, c].to(torch.float32), at(rep), at(pres), at(freq))
    return z


def _penalize(x: torch.Tensor, cnt: torch.Tensor, rep: Param, pres: Param, freq: Param) -> torch.Tensor:
    """Logits ``x`` with counts ``cnt`` (fp32, same shape) after the three penalties (parameters broadcast to
    ``x``): the kernel's fp32 operations, in its order."""
    x = torch.where(cnt > 0, torch.where(x > 0, x / rep, x * rep), x)
    return x - pres * (cnt > 0).to(torch.float32) - freq * cnt


# --------------------------------------------------------------------------- the kept set


@dataclass
class _Kept:
    """The kept set of some batch rows. ``tok`` int64 ``[R, K]`` candidate token ids (None: the whole row, so
    column = token), ``w`` fp32 ``[R, K or V]`` = ``exp(z / T - max)`` on kept tokens and 0 elsewhere, ``lw``
    the matching ``z / T - max`` (for log-probabilities)."""

    rows: torch.Tensor  # int64 [R] batch rows
    tok: torch.Tensor | None
    w: torch.Tensor
    lw: torch.Tensor


def _group_start_mass(vals: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """For values sorted descending ``[R, K]``: the mass of the tokens strictly above each one (the exclusive
    cumulative sum taken at the first token of its tie group)."""
    excl = probs.cumsum(dim=1) - probs
    start = torch.ones_like(vals, dtype=torch.bool)
    start[:, 1:] = vals[:, 1:] != vals[:, :-1]
    return torch.where(start, excl, _NEG_INF).cummax(dim=1).values


def _topk_kept(z: torch.Tensor, rows: torch.Tensor | None, k: list[int], cols: dict, tts: bool) -> _Kept:
    """Top-k rows: candidates by ``torch.topk`` (more while a tie group crosses the list), then temperature,
    top-p and min-p on the candidates (sorted by value, descending)."""
    vals, tok, zt, kth = _topk_candidates(z, k, cols["temperature"])
    return _candidates_kept(z, rows, vals, tok, zt, kth, min(k), cols, tts)


def _topk_candidates(z: torch.Tensor, k: list[int], temp: Param, slack: int = 0, penalize=None) -> tuple:  # noqa: ANN001
    """``(vals, tok, zt, kth)``: the top-k candidates of rows ``z`` ``[R, V]``, values sorted descending, with
    every tie of each row's k-th value (``zt = vals / T``, ``kth`` ``[R, 1]`` the k-th of ``zt``).

    ``penalize(tok)`` (optional) gives the candidates' penalized values, each at most its logit; they are sorted
    instead. The list (``k + 1 + slack`` at first) doubles until its k-th value is above its smallest logit:
    every token outside it is then at most that logit, so it can neither enter nor tie (a sort at ``V``).
    """
    V = z.shape[1]
    kmax = max(k)
    kidx = torch.tensor(k, device=z.device)[:, None] - 1 if min(k) != kmax else None
    kk = min(V, kmax + 1 + slack)
    while True:
        # [R, kk] sorted descending (the order of z / T: T > 0); a sort when every token is a candidate
        logit, tok = torch.topk(z, kk, dim=1) if kk < V else z.sort(dim=1, descending=True)
        vals = logit
        if penalize is not None:
            vals, order = penalize(tok).sort(dim=1, descending=True)
            tok = tok.gather(1, order)
        # ties are taken on z / T, the values top-k ranks (the fp32 division can make distinct logits equal)
        zt = vals / temp
        kth = zt[:, kmax - 1 : kmax] if kidx is None else zt.gather(1, kidx)  # [R, 1] the k-th value
        last = logit[:, -1:] / temp  # a bound on every value outside the list
        if kk == V or not bool(((kth <= last) & (last > _NEG_INF)).any()):
            return vals, tok, zt, kth
        kk = min(V, 2 * kk)


def _candidates_kept(z: torch.Tensor, rows: torch.Tensor | None, vals: torch.Tensor, tok: torch.Tensor,
                     zt: torch.Tensor, kth: torch.Tensor, kmin: int, cols: dict, tts: bool) -> _Kept:
    """Temperature, top-p and min-p on top-k candidates ``vals`` / ``tok`` ``[R, kk]`` (penalized values, sorted
    descending, holding every tie of the k-th value ``kth``; ``zt = vals / T``)."""
    temp, top_p, min_p = cols["temperature"], cols["top_p"], cols["min_p"]
    kk = vals.shape[1]
    lw = zt - zt[:, :1]
    w = lw.exp()  # -inf candidates have weight 0
    if kk > kmin:  # candidates past the k-th (a row's k + 1st, or ties fetched): drop those below the k-th
        w = w * (zt >= kth)
    if _any(top_p, lambda p: (p < 1.0) & (p > 0.0)):
        if tts:  # the TTS rule: probabilities of the whole row, not renormalized after top-k, and "<="
            full = z - vals[:, :1]  # the row max is the first candidate
            if isinstance(temp, torch.Tensor) or temp != 1.0:
                full.div_(temp)
            keep_p = _group_start_mass(zt, w / full.exp_().sum(dim=1, keepdim=True)) <= top_p
        else:  # Hugging Face: renormalized over the top-k set, "<"
            keep_p = _group_start_mass(zt, w / w.sum(dim=1, keepdim=True)) < top_p
        if isinstance(top_p, torch.Tensor):  # rows without top-p in a group with some
            keep_p |= (top_p <= 0.0) | (top_p >= 1.0)
        keep_p[:, 0] = True
        w = w * keep_p
    if not tts and _any(min_p, lambda m: m > 0.0):
        w = w * (w >= min_p)
    return _Kept(rows, tok, w, lw)


def _topp_threshold(lw: torch.Tensor, w: torch.Tensor, top_p: float | torch.Tensor, tts: bool) -> torch.Tensor:
    """Top-p over whole rows: the lowest kept ``lw`` per row ``[R, 1]``, from ``lw = z / T - max``, ``w = exp(lw)``.

    A histogram of the mass over value bins replaces the sort: bin ``j`` holds ``-lw`` in about
    ``[j / scale, (j + 1) / scale)``, the last bin everything below the range. Every token of a bin before the
    first bin whose inclusive mass exceeds ``p * S`` is kept, every token after it dropped, and only the tokens of
    that one bin are sorted to place the cut exactly (whole tie groups, as in the references).
    """
    R = lw.shape[0]
    b = lw.clamp(min=-_RANGE).mul_(-(_BINS - 1) / _RANGE).long()  # [R, V] bin index in [0, _BINS - 1]
    hist = torch.zeros(R, _BINS, dtype=torch.float32, device=lw.device).scatter_add_(1, b, w)
    cum = hist.cumsum(dim=1)
    target = top_p * cum[:, -1:]  # [R, 1] p * S (the TTS rule's un-renormalized mass is the same on whole rows)
    jstar = (cum <= target).sum(dim=1, keepdim=True).clamp_(max=_BINS - 1)  # the first bin whose mass crosses
    base = cum.gather(1, (jstar - 1).clamp_(min=0)) * (jstar > 0)  # [R, 1] mass of the bins before it
    r, c = (b == jstar).nonzero(as_tuple=True)  # the crossing bin's tokens, row-major
    n = torch.bincount(r, minlength=R)
    col = torch.arange(r.numel(), device=lw.device) - (n.cumsum(0) - n)[r]  # position within its row
    vals = torch.full((R, max(1, int(n.max()))), _NEG_INF, device=lw.device)
    vals[r, col] = lw[r, c]
    vals = vals.sort(dim=1, descending=True).values  # [R, n] the bin's values, descending
    before = base + _group_start_mass(vals, vals.exp())
    keep = (before <= target) if tts else (before < target)
    cut = torch.where(keep, vals, float("inf")).amin(dim=1, keepdim=True)
    # nothing of the bin kept: keep exactly the tokens above it (the bins before it)
    return torch.where(torch.isinf(cut), torch.nextafter(vals[:, :1], torch.tensor(float("inf"))), cut)


def _full_row_kept(z: torch.Tensor, rows: torch.Tensor | None, cols: dict, tts: bool) -> _Kept:
    """Rows without top-k: temperature, top-p by :func:`_topp_threshold`, min-p, over whole rows."""
    temp, top_p, min_p = cols["temperature"], cols["top_p"], cols["min_p"]
    lw = z / temp
    lw = lw.sub_(lw.amax(dim=1, keepdim=True))
    w = lw.exp()
    if _any(top_p, lambda p: (p > 0.0) & (p < 1.0)):
        if isinstance(top_p, torch.Tensor):  # rows without top-p in a group with some: a cut below everything
            p_on = (top_p > 0.0) & (top_p < 1.0)
            thr = torch.where(p_on, _topp_threshold(lw, w, torch.where(p_on, top_p, 1.0), tts), _NEG_INF)
        else:
            thr = _topp_threshold(lw, w, top_p, tts)
        w = w * (lw >= thr)
    if not tts and _any(min_p, lambda m: m > 0.0):
        w = w * (w >= min_p)
    return _Kept(rows, None, w, lw)


@dataclass
class _Plan:
    z: torch.Tensor  # fp32 [B, V] penalized logits
    kept: list[_Kept]
    greedy: torch.Tensor | None  # int64 rows
    bad: bool  # some row is bad (NaN / +inf / all -inf): its token stays -1


_PENALIZED_SLACK = 16


def _lowering_penalties(prm: RowParams) -> bool:
    """Some penalty applies and none can raise a logit: repetition >= 1, presence and frequency >= 0."""
    checks = ((prm.repetition_penalty, 1.0), (prm.presence_penalty, 0.0), (prm.frequency_penalty, 0.0))
    if prm.token_counts is None or all(not _any(v, lambda x, d=d: x != d) for v, d in checks):
        return False
    return all(not _any(v, lambda x, d=d: x < d) for v, d in checks)


def _penalized_candidates(z: torch.Tensor, tok: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """The penalized values of the logits ``z`` ``[B, V]`` at tokens ``tok`` ``[B, K]``: the fp32 operations of
    :func:`penalized_logits`, on the candidates only."""
    def col(v: Param) -> Param:
        return v.to(z.device, torch.float32).reshape(-1, 1) if isinstance(v, torch.Tensor) else float(v)

    return _penalize(z.gather(1, tok), prm.token_counts.gather(1, tok).to(torch.float32),
                     col(prm.repetition_penalty), col(prm.presence_penalty), col(prm.frequency_penalty))


_ONE_THREAD_ELEMS = 1 << 20  # logits per call from which the penalized top-k path runs on one thread


def _penalized_topk_plan(logits: torch.Tensor, prm: RowParams) -> _Plan | None:
    """The plan of a top-k call with penalties that only lower logits, without writing the penalized ``[B, V]``
    copy (the Hugging Face set's cost: a copy, ``nonzero`` over the dense counts and two scatters; 6 of 11 ms at
    B = 64, V = 128256). None when the call is not of that kind, or a row is bad or greedy (the general path).

    Why exact: a penalized value is at most the logit. Take the top ``kk`` logits, penalize them and sort: every
    token outside the list has a penalized value at most the list's smallest logit, so when the k-th penalized
    value is above that logit, the list holds the penalized row's top k and every tie of its k-th value; else the
    list doubles (a full sort at ``kk = V``): :func:`_topk_candidates`.
    """
    if prm.tts or not _lowering_penalties(prm):
        return None
    z = logits.float()
    B, V = z.shape
    P = _Params(prm, B, z.device)
    k = [int(v) for v in P.host["top_k"]]
    if any(t == 0.0 for t in P.host["temperature"]) or not all(0 < v < V for v in k) or (
            prm.greedy_top1 and 1 in k):
        return None
    temp = P.cols["temperature"]
    # large calls on one thread, as top-p's full-row passes: a parallel topk waits at its barrier for a worker that
    # another process has descheduled. Measured (the Hugging Face set, randn * 4, ms, quiet / one core busy): two
    # threads [64, 32000] 2.9 / 9.2-10.1, [8, 128256] 1.6 / 4.1, [64, 128256] 5.7 / 21.8; one thread 4.4 / 6.2,
    # 2.1 / 2.1, 9.9 / 11.7. Below 2**20 logits one thread only cost (at [8, 8194] 0.33 -> 0.42 ms quiet).
    with torch_threads(1) if B * V >= _ONE_THREAD_ELEMS else contextlib.nullcontext():
        # room for 16 penalized candidates per row before the list must grow (a second topk costs as much as the
        # first; 16 more candidates cost 10 %: 3.14 -> 3.45 ms at [64, 128256]): with a 256-token history and
        # V = 128256, 64 rows almost surely have a penalized token among their top 31
        pen, tok, zt, kth = _topk_candidates(z, k, temp, _PENALIZED_SLACK, lambda t: _penalized_candidates(z, t, prm))
        # the rules of _plan's bad / greedy-in-the-limit rows, on the penalized row max (the first candidate)
        m = torch.where(torch.isnan(z.amax(dim=1)), float("nan"), pen[:, 0])
    t = temp[:, 0] if isinstance(temp, torch.Tensor) else temp
    if bool(((m - m != 0) | (m / t).abs().eq(_INF)).any()):
        return None
    return _Plan(z, [_candidates_kept(z, None, pen, tok, zt, kth, min(k), P.cols, False)], None, False)


def _plan(logits: torch.Tensor, prm: RowParams) -> _Plan:
    """Penalties, row groups and the kept set of every sampling row."""
    fast = _penalized_topk_plan(logits, prm)
    if fast is not None:
        return fast
    z = penalized_logits(logits, prm)
    B, V = z.shape
    dev = z.device
    P = _Params(prm, B, dev)
    m = z.amax(dim=1)
    # bad: NaN anywhere, +inf, or nothing but -inf. Greedy in the limit: a max that overflows when divided by T
    t = P.cols["temperature"]
    # (x - x != 0 is NaN for +-inf and NaN: one cheap test where isfinite is several ops)
    flags = (m - m != 0).to(torch.int8) * 2 + (m / (t[:, 0] if isinstance(t, torch.Tensor) else t)).abs().eq(_INF)
    flags = flags.tolist()
    groups: dict[str, list[int]] = {"greedy": [], "topk": [], "full": []}
    for i, (f, t, k) in enumerate(zip(flags, P.host["temperature"], P.host["top_k"])):
        if f >= 2:
            continue
        if t == 0.0 or f == 1 or (prm.greedy_top1 and k == 1):
            groups["greedy"].append(i)
        else:
            groups["topk" if 0 < k < V else "full"].append(i)
    kept = []
    for name in ("topk", "full"):
        idx = groups[name]
        if not idx:
            continue
        rows = None if len(idx) == B else torch.tensor(idx, device=dev)
        zr, cols = (z, P.cols) if rows is None else (z[rows], P.rows(rows))
        if name == "topk":
            kept.append(_topk_kept(zr, rows, [int(P.host["top_k"][i]) for i in idx], cols, prm.tts))
        else:  # a dozen full-row passes: on one thread, so that a busy core cannot stall each one (torch_threads)
            with torch_threads(1):
                kept.append(_full_row_kept(zr, rows, cols, prm.tts))
    greedy = torch.tensor(groups["greedy"], dtype=torch.int64, device=dev) if groups["greedy"] else None
    return _Plan(z, kept, greedy, any(f >= 2 for f in flags))


# --------------------------------------------------------------------------- small calls on the host

# calls of at most this many logits (scalar parameters, CPU) run in NumPy: it sorts values (np.sort) faster than
# torch's multi-threaded path filters up to about 20K logits (B = 1 up to V = 16384; B = 2 at V = 8194: 211 against
# 279 us, measured); past that the torch path wins (B = 4 at V = 8194: 311 against 376 us). One thread: steady
# under load.
_HOST_ELEMS = 20_000


def host_eligible(logits: torch.Tensor, prm: RowParams) -> bool:
    """A small CPU call with scalar parameters: there a torch op is mostly dispatch (~3 us), a NumPy call ~1 us,
    and the whole sampler is ~30 calls, so the same steps run in NumPy (measured in bench_sampling's sweep)."""
    params = (prm.temperature, prm.top_k, prm.top_p, prm.min_p, prm.repetition_penalty, prm.presence_penalty,
              prm.frequency_penalty)
    return (logits.device.type == "cpu" and logits.numel() <= _HOST_ELEMS
            and not any(isinstance(v, torch.Tensor) for v in params))


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, 1)`` for 2-D arrays, as one flat ``take`` (a fifth of its cost on small rows)."""
    a = np.ascontiguousarray(a).reshape(-1)
    return a.take(idx if idx.shape[0] == 1 else idx + np.arange(0, a.size, a.size // idx.shape[0])[:, None])


def _host_kept(z: np.ndarray, prm: RowParams) -> tuple:
    """The kept set of every row in NumPy, in token order: ``(lw, w, greedy, bad)`` with ``lw = z / T - max``
    fp32 ``[B, V]``, ``w = exp(lw)`` on kept tokens and 0 elsewhere, and bool ``[B]`` greedy / bad rows (whose
    ``lw`` / ``w`` are meaningless). The rules of :func:`_topk_kept` and :func:`_full_row_kept` (ties kept whole,
    TTS or Hugging Face top-p, min-p), found by value: NumPy sorts values about 4x faster than it argsorts them,
    and a cut value keeps a whole tie group by itself. Not for temperature 0 (every row greedy: no kept set).
    Call it under ``np.errstate(all="ignore")`` (bad rows compute with NaN)."""
    B, V = z.shape
    T, k, p, mp = float(prm.temperature), int(prm.top_k), float(prm.top_p), float(prm.min_p)
    zs = z / np.float32(T) if T != 1.0 else z  # [B, V] the values top-k ranks (the division can make ties)
    m = zs.max(axis=1, keepdims=True)  # [B, 1]
    bad = ~np.isfinite(m[:, 0] if zs is z else z.max(axis=1))
    greedy = np.isinf(m[:, 0]) & ~bad  # z / T overflows: the limit T -> 0
    lw = zs - m
    w = np.exp(lw)
    top_k, top_p = 0 < k < V, 0 < p < 1
    total = None
    if top_k:
        part = np.partition(zs, V - k, axis=1)  # [B, V] the k largest in the last k columns
        kth = part[:, V - k : V - k + 1]  # [B, 1] the k-th largest value
        total = w.sum(axis=1) if prm.tts and top_p else None  # the TTS rule: mass of the whole row
        w *= zs >= kth  # every token tying the k-th is kept
    if top_p:
        # candidates by value, descending: the k largest (top-k) or the whole row
        srt = np.sort(part[:, V - k :] if top_k else zs, axis=1)[:, ::-1]
        ws = np.exp(srt - m)  # the same weights as w, sorted
        if total is None:  # Hugging Face renormalizes over the top-k set (ties included); no top-k: the row
            total = w.sum(axis=1)
        c = np.cumsum(ws / total[:, None], axis=1)  # [B, K] the mass down to each candidate
        # a candidate is dropped once the mass above it exceeds p (TTS: "> p"; Hugging Face: ">= p"): the
        # first n are kept, and the n-th value is the cut (its whole tie group stays)
        side = "right" if prm.tts else "left"
        if B == 1:  # c is non-decreasing: a binary search instead of a pass
            cut = srt[:, min(int(np.searchsorted(c[0], p, side)), srt.shape[1] - 1), None]  # [1, 1]
        else:
            n = (c <= p).sum(axis=1) if prm.tts else (c < p).sum(axis=1)
            cut = _take(srt, np.minimum(n, srt.shape[1] - 1)[:, None])  # [B, 1]
        w *= zs >= cut
    if not prm.tts and mp > 0:
        w *= w >= mp
    return lw, w, greedy, bad


def _host_penalized(logits: torch.Tensor, prm: RowParams) -> np.ndarray:
    """:func:`penalized_logits` in NumPy (scalar penalties; the same fp32 operations in the same order)."""
    z = (logits if logits.dtype == torch.float32 else logits.float()).detach().numpy()  # NumPy has no bfloat16
    rep, pres, freq = float(prm.repetition_penalty), float(prm.presence_penalty), float(prm.frequency_penalty)
    if prm.token_counts is None or (rep == 1.0 and pres == 0.0 and freq == 0.0):
        return z
    counts = prm.token_counts.numpy()
    seen = counts > 0
    # whole-row operations (these rows are short): a zero count changes nothing, as in the torch path (z - 0 * x
    # is z), and a zero presence / frequency penalty is skipped (subtracting 0 is the identity)
    with np.errstate(all="ignore"):  # extreme penalties overflow to +-inf as in torch, without a warning
        if rep != 1.0:
            z = np.where(seen, np.where(z > 0, z / np.float32(rep), z * np.float32(rep)), z)
        if pres != 0.0:
            z = z - np.float32(pres) * seen
        if freq != 0.0:
            z = z - np.float32(freq) * counts.astype(np.float32)
    return z


def _all_greedy(prm: RowParams) -> bool:
    return float(prm.temperature) == 0.0 or (prm.greedy_top1 and int(prm.top_k) == 1)


def host_sample(logits: torch.Tensor, prm: RowParams, seed: Seed, logprobs: bool):
    zn = _host_penalized(logits, prm)
    B = zn.shape[0]
    if _all_greedy(prm):
        token, lp, greedy = None, None, np.ones(B, dtype=bool)
        bad = ~np.isfinite(zn.max(axis=1))
    else:
        u = np.array(_host_uniforms(seed, list(range(B))))  # [B]
        with np.errstate(all="ignore"):
            lw, w, greedy, bad = _host_kept(zn, prm)
            # inverse-CDF draw over the kept tokens in token order (as the torch path draws: the same tokens)
            cdf = np.cumsum(w, axis=1, dtype=np.float64)
            if B == 1:  # the cdf is non-decreasing: a binary search instead of a pass
                pos = np.array([[min(int(np.searchsorted(cdf[0], u[0] * cdf[0, -1], "right")), w.shape[1] - 1)]])
            else:
                pos = np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1), w.shape[1] - 1)[:, None]  # [B, 1]
            token = pos[:, 0].astype(np.int64)
            lp = (_take(lw, pos)[:, 0] - np.log(cdf[:, -1])).astype(np.float32) if logprobs else None
    if greedy.any():
        top = zn.argmax(axis=1)
        token = top if token is None else np.where(greedy, top, token)
        if logprobs:
            lp = np.zeros(B, dtype=np.float32) if lp is None else np.where(greedy, np.float32(0), lp)
    if bad.any():
        token = np.where(bad, -1, token)
        lp = np.where(bad, np.float32(np.nan), lp) if logprobs else None
    return torch.from_numpy(token), torch.from_numpy(lp) if logprobs else None


def _host_probs(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    zn = _host_penalized(logits, prm)
    B = zn.shape[0]
    if _all_greedy(prm):
        out = np.zeros(zn.shape, dtype=np.float32)
        greedy, bad = np.ones(B, dtype=bool), ~np.isfinite(zn.max(axis=1))
    else:
        with np.errstate(all="ignore"):
            _, w, greedy, bad = _host_kept(zn, prm)
            out = w / w.sum(axis=1, keepdims=True)
    rows = np.nonzero(greedy & ~bad)[0]
    out[rows] = 0
    out[rows, zn[rows].argmax(axis=1)] = 1
    out[bad] = 0
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- entry points


_M64 = (1 << 64) - 1
_HOST_ROWS = 64  # up to this many rows the uniforms are hashed in Python integers (a tensor op costs ~2 us)


def _splitmix(seed: int, counter: int) -> float:
    """:func:`counter_uniform` for one (seed, counter) pair in Python integers (bit-identical; tested)."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return ((z ^ (z >> 31)) >> 40) / 16777216.0


def _host_uniforms(seed: Seed, rows: list[int]) -> list[float]:
    """The draw's uniform of each batch row in ``rows``, hashed in Python integers (:func:`_splitmix`)."""
    s = seed.seed
    seeds = s.tolist() if isinstance(s, torch.Tensor) else None
    return [_splitmix(s if seeds is None else seeds[i], (i * seed.row_key_mult) << 32) for i in rows]


def _row_uniforms(seed: Seed, rows: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    """float64 ``[R, 1]``: the draw's uniform of each row, :func:`counter_uniform` at counter ``row_key << 32``."""
    r = torch.arange(B, device=device) if rows is None else rows
    s = seed.seed
    if r.shape[0] <= _HOST_ROWS and device.type == "cpu":
        return torch.tensor(_host_uniforms(seed, r.tolist()), dtype=torch.float64)[:, None]
    sd = s.to(device)[r] if isinstance(s, torch.Tensor) else torch.full_like(r, s)
    return counter_uniform(sd, (r * seed.row_key_mult) << 32).double()[:, None]


def sample_torch(
    logits: torch.Tensor, prm: RowParams, seed: Seed, logprobs: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens ``[B]`` (int64; -1 for bad rows) and, with ``logprobs``, their fp32 log-probabilities under the
    kept, renormalized distribution (0 for greedy rows, NaN for bad rows; else None)."""
    if host_eligible(logits, prm):
        return host_sample(logits, prm, seed, logprobs)
    plan = _plan(logits, prm)
    B = plan.z.shape[0]
    dev = plan.z.device
    token = torch.full((B,), -1, dtype=torch.int64, device=dev)
    logprob = torch.full((B,), float("nan"), device=dev) if logprobs else None
    for kp in plan.kept:
        at = slice(None) if kp.rows is None else kp.rows
        w, lw, tok = kp.w, kp.lw, kp.tok
        if tok is not None:  # candidates in token order: the draw must not depend on how topk ordered ties
            tok, order = tok.sort(dim=1)
            w, lw = w.gather(1, order), lw.gather(1, order)
        with torch_threads(1) if tok is None else contextlib.nullcontext():  # full rows: as in _plan
            cdf = w.double().cumsum_(dim=1)
            total = cdf[:, -1:]
            # u < 1, so u * total < total in float64: the first entry above it exists and has a positive weight
            pos = torch.searchsorted(cdf, _row_uniforms(seed, kp.rows, B, dev) * total, right=True)
        token[at] = (tok.gather(1, pos) if tok is not None else pos).squeeze(1)
        if logprobs:
            logprob[at] = (lw.gather(1, pos) - total.log().float()).squeeze(1)
    if plan.greedy is not None:
        token[plan.greedy] = plan.z[plan.greedy].argmax(dim=1)
        if logprobs:
            logprob[plan.greedy] = 0.0
    return token, logprob


def sampling_probs_torch(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """Filtered, renormalized probabilities ``[B, V]`` fp32: zeros outside the kept set, a one-hot for greedy
    rows, all zeros for bad rows."""
    if host_eligible(logits, prm):
        return _host_probs(logits, prm)
    plan = _plan(logits, prm)
    out = torch.zeros(plan.z.shape, dtype=torch.float32, device=plan.z.device)
    for kp in plan.kept:
        pr = kp.w / kp.w.sum(dim=1, keepdim=True)
        at = slice(None) if kp.rows is None else kp.rows
        if kp.tok is None:
            out[at] = pr
        else:
            out[at] = out[at].scatter_(1, kp.tok, pr)
    if plan.greedy is not None:
        out[plan.greedy, plan.z[plan.greedy].argmax(dim=1)] = 1.0
    return out


def simple_batch_torch(logits: torch.Tensor, noise: Param, temp: Param, seed: Seed) -> torch.Tensor:
    """argmax of ``logits / temp + noise * u`` per row, ``u`` = :func:`counter_uniform` of (seed, row key, token).

    Only the tokens within ``noise`` of the row max can win (``u < 1``), so only theirs are hashed; ``temp == 0``
    is plain argmax (lowest index on ties). Returns int64 ``[B]``, -1 for a row with NaN or ``+inf``, or all
    ``-inf``.
    """
    z = logits.float()
    B, V = z.shape
    dev = z.device
    t = temp.to(dev, torch.float32).expand(B) if isinstance(temp, torch.Tensor) else torch.full((B,), float(temp))
    nz = noise.to(dev, torch.float32).expand(B) if isinstance(noise, torch.Tensor) else torch.full((B,), float(noise))
    t, nz = t.to(dev), nz.to(dev)
    m0 = z.amax(dim=1)
    bad = ~torch.isfinite(m0)
    zt = torch.where(t[:, None] > 0, z / torch.where(t > 0, t, 1.0)[:, None], z)
    m = zt.amax(dim=1)
    nz = torch.where((t > 0) & torch.isfinite(m), nz, 0.0)  # temp 0 (or an overflowing 1 / temp): greedy
    zt = torch.where(torch.isfinite(m)[:, None], zt, z)
    m = torch.where(torch.isfinite(m), m, m0)
    rows, toks = (zt >= (m - nz)[:, None]).nonzero(as_tuple=True)
    s = seed.seed
    sd = s.to(dev)[rows] if isinstance(s, torch.Tensor) else torch.full_like(rows, s)
    key = zt[rows, toks] + nz[rows] * counter_uniform(sd, ((rows * seed.row_key_mult) << 32) | toks)
    best = torch.full((B,), _NEG_INF, device=dev).scatter_reduce(0, rows, key, "amax")
    win = key == best[rows]
    token = torch.full((B,), V, dtype=torch.int64, device=dev).scatter_reduce(0, rows[win], toks[win], "amin")
    return torch.where(bad | (token >= V), -1, token)


# =========================================================================== beam candidates (issue 13)
# The PyTorch path of ``decodekit.beam_candidates``: one step of Hugging Face beam search / beam sampling.


def beam_logprobs_torch(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
    token_counts: torch.Tensor | None, min_tokens_to_keep: int,
) -> torch.Tensor:
    """fp32 ``[R, V]`` processed log-probabilities, ``-inf`` where filtered (see ``beam_logprobs_ref``).

    Top-k ranks ``torch.topk`` values (a tie group at the k-th is kept whole); top-p runs on the sorted top-k
    candidates, or on a sort of the whole row when top-k is off (this path's one vocabulary sort; the Triton
    kernel searches a threshold instead).
    """
    s = torch.log_softmax(logits.float(), dim=-1)  # a fresh tensor: updated in place below
    R, V = s.shape
    bad = torch.isnan(s.amax(dim=1))  # a NaN or +inf logit: NaN log-probabilities, the row has no candidates
    if bool(bad.any()):
        s[bad] = _NEG_INF
    if token_counts is not None and repetition_penalty != 1.0:
        r, c = (token_counts > 0).nonzero(as_tuple=True)  # the penalty touches the seen tokens only
        v = s[r, c]
        s[r, c] = torch.where(v < 0, v * repetition_penalty, v / repetition_penalty)
    if temperature != 1.0:
        s.div_(temperature)
    k = min(max(top_k, min_tokens_to_keep), V) if top_k > 0 else 0
    p_on = 0.0 < top_p < 1.0
    if k == 0 and not p_on:
        return s
    if not p_on and not 0 < k < V:
        return s
    if 0 < k < V:
        vals = torch.topk(s, k, dim=1).values  # [R, k] descending
        kth = vals[:, k - 1 : k]
        n_keep = int((s >= kth).sum(dim=1).max())  # tie groups crossing the k-th
        if n_keep > k:
            vals = torch.topk(s, n_keep, dim=1).values
        vals = torch.where(vals >= kth, vals, _NEG_INF)
    else:
        kth = None
        vals = torch.sort(s, dim=1, descending=True).values
    if p_on:
        probs = torch.softmax(vals, dim=1)  # renormalized over the top-k set (HF order)
        before = _group_start_mass(vals, probs)
        first = torch.ones_like(vals, dtype=torch.bool)
        first[:, 1:] = vals[:, 1:] != vals[:, :-1]
        rank = torch.arange(vals.shape[1], device=s.device).expand_as(vals)
        start = torch.where(first, rank, -1).cummax(dim=1).values  # position of each value's tie group start
        keep = (before < top_p) | (start < min_tokens_to_keep)
        keep &= vals > _NEG_INF
        cut = torch.where(keep, vals, _INF).amin(dim=1, keepdim=True)  # lowest kept value per row
        kth = cut if kth is None else torch.maximum(cut, kth)
    if kth is None:  # top-k keeps the whole row and top-p is off
        return s
    return s.masked_fill_(s < kth, _NEG_INF)


def beam_candidates_torch(
    logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, num_candidates: int, temperature: float,
    top_k: int, top_p: float, repetition_penalty: float, token_counts: torch.Tensor | None, min_tokens_to_keep: int,
    do_sample: bool, seed: Seed,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, beams, scores)`` int64 / int64 / fp32 ``[B, K]``, ordered by score, descending.

    ``do_sample=False``: ``torch.topk`` of the ``N * V`` accumulated scores of each prompt (what Hugging Face
    runs, so ties break alike). ``do_sample=True``: Gumbel-top-k, the ``K`` largest ``score + g`` with
    ``g = -log(-log u)`` and ``u`` = :func:`counter_uniform` at ``seed`` and counter
    ``((prompt * row_key_mult) << 40) + n * V + token``, drawn for the kept tokens only: ``K`` draws without
    replacement from the softmax of the scores. A prompt with fewer than ``K`` kept tokens (bad rows) pads its
    candidates with token ``-1``, beam ``-1``, score ``-inf``.
    """
    s = beam_logprobs_torch(logits, temperature, top_k, top_p, repetition_penalty, token_counts,
                            min_tokens_to_keep)
    R, V = s.shape
    N, K = num_beams, num_candidates
    B = R // N
    bs = beam_scores.to(torch.float32)
    if do_sample:  # keys for the kept tokens only, in per-prompt lists padded with -inf
        r, c = (s > _NEG_INF).nonzero(as_tuple=True)  # row-major: prompt by prompt
        val = s[r, c] + bs[r]  # the accumulated scores (fp32, as beam search adds them)
        b, f = r // N, (r % N) * V + c
        sd = seed.seed
        sd = sd.to(s.device)[b] if isinstance(sd, torch.Tensor) else torch.full_like(b, sd)
        # the midpoint of the uniform's 2**-24 cell: u in (0, 1), so every kept token gets a finite key
        u = counter_uniform(sd, ((b * seed.row_key_mult) << 40) + f).double() + 2.0**-25
        n = torch.bincount(b, minlength=B)
        col = torch.arange(b.numel(), device=s.device) - (n.cumsum(0) - n)[b]
        width = max(K, int(n.max()) if b.numel() else 0)
        keys = torch.full((B, width), _NEG_INF, dtype=torch.float64, device=s.device)
        keys[b, col] = val.double() - torch.log(-torch.log(u))
        flat = torch.zeros(B, width, dtype=torch.int64, device=s.device)
        flat[b, col] = f
        vals = torch.full((B, width), _NEG_INF, device=s.device)
        vals[b, col] = val
        kk, pos = torch.topk(keys, K, dim=1)
        idx, sc = flat.gather(1, pos), vals.gather(1, pos)
        sc = torch.where(kk > _NEG_INF, sc, _NEG_INF)
        sc, order = torch.sort(sc, dim=1, descending=True, stable=True)
        idx = idx.gather(1, order)
    else:
        acc = s.add_(bs.reshape(R, 1)).reshape(B, N * V)
        sc, idx = torch.topk(acc, K, dim=1)
    ok = sc > _NEG_INF
    tokens = torch.where(ok, idx % V, -1)
    beams = torch.where(ok, idx // V, -1)
    return tokens, beams, sc


# =========================================================================== issue 14: block sampling for
# diffusion LMs and the rwkv package's sampler (the PyTorch path)
#
# The masked positions of ``[B, L, V]`` logits are gathered into ``[R, V]`` rows; the kept set of each is a value
# threshold found as on the rows above (``torch.topk`` for the k-th value, the mass histogram of
# :func:`_topp_threshold` for top-p: no sort of the vocabulary), then one inverse-CDF draw per position with a
# counter-based uniform keyed by the position, and the confidences from the kept weights.

_CONF_FILTERED = ("prob", "margin", "neg_entropy")  # confidences taken on the filtered distribution


def _per_position(v: Param, rb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or per-batch-row ``[B]`` parameter as a ``[R]`` column for the gathered positions ``rb``."""
    if isinstance(v, torch.Tensor):
        return v.to(rb.device, dtype)[rb]
    return torch.full((rb.shape[0],), v, dtype=dtype, device=rb.device)


def _block_kept(z: torch.Tensor, lw: torch.Tensor, k: torch.Tensor, p: torch.Tensor, nfin: torch.Tensor,
                topp_first: bool) -> torch.Tensor:
    """Bool ``[R, V]`` kept set of each row: top-k (ties of the k-th value kept) and top-p (strictly higher mass
    below ``p``, on the full distribution when ``topp_first``, else renormalized over the top-k set)."""
    keep = z > _NEG_INF
    k_on = (k > 0) & (k < nfin)
    if bool(k_on.any()):
        kk = torch.where(k_on, k, 1)
        kmax = int(kk.max())
        kth = torch.topk(z, kmax, dim=1).values.gather(1, (kk - 1)[:, None])  # [R, 1] the k-th value
        keep &= (z >= kth) | ~k_on[:, None]
    p_on = p < 1.0
    if bool(p_on.any()):
        base = lw if topp_first else torch.where(keep, lw, _NEG_INF)
        pp = torch.where(p_on, p, 1.0)[:, None]
        if z.shape[1] <= _BINS:  # short rows: a sort costs less than the histogram's bins
            vals, order = base.sort(dim=1, descending=True)
            w = vals.exp()
            keep_s = _group_start_mass(vals, w) < pp * w.sum(dim=1, keepdim=True)
            keep_p = torch.zeros_like(keep).scatter_(1, order, keep_s)
        else:
            keep_p = base >= _topp_threshold(base, base.exp(), pp, tts=False)
        keep &= keep_p | (base == 0.0) | ~p_on[:, None]  # the max's group always stays (top_p = 0: rwkv)
    return keep


def _finite_count(z: torch.Tensor, zmax: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[R]``: the finite values of each ``[R, V]`` row (``zmax``: the rows' maxima, when known). A row
    whose minimum and maximum are finite has ``V`` (fast reductions); only the others are counted
    (``isfinite(z).sum(1)`` on 256 x 32000: 26 ms, ``amin`` 0.5 ms)."""
    R, V = z.shape
    n = torch.full((R,), V, dtype=torch.int64, device=z.device)
    zmax = z.amax(dim=1) if zmax is None else zmax
    rows = (~((z.amin(dim=1) > _NEG_INF) & (zmax < _INF))).nonzero().flatten()  # +-inf or NaN somewhere
    if rows.numel():
        n[rows] = torch.isfinite(z[rows]).sum(dim=1, dtype=torch.int64)
    return n


def _row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.max(dim=1)`` of fp32 ``[R, V]`` rows: the values and the index of each row's first maximum (a NaN, if
    any, is the maximum). On the CPU NumPy's argmax, which is vectorized where torch's is not (32 x 126464: 0.2
    against 1.2 ms, measured)."""
    if x.device.type != "cpu":
        return x.max(dim=1)
    arg = torch.from_numpy(np.argmax(x.detach().numpy(), axis=1)).to(torch.int64)
    return x.gather(1, arg[:, None])[:, 0], arg


def _exp_sum(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``sum(exp(x - shift), dim=1, keepdim=True)`` for ``[R, V]`` rows and ``[R, 1]`` shifts, through one reused
    buffer of a few rows: a fresh ``[R, V]`` temporary costs more in page faults than the exps (32 x 126464:
    4.9 ms with the temporary, 1.8 ms this way, measured)."""
    R, V = x.shape
    c = max(1, min(R, (1 << 19) // max(V, 1)))  # rows per chunk: about 2 MB of fp32
    buf = torch.empty(c, V, dtype=torch.float32, device=x.device)
    out = torch.empty(R, 1, dtype=torch.float32, device=x.device)
    for r in range(0, R, c):
        b = buf[: min(c, R - r)]
        torch.sub(x[r : r + c], shift[r : r + c], out=b)
        torch.sum(b.exp_(), dim=1, keepdim=True, out=out[r : r + c])
    return out


def _in_token_order(base: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A candidate list ``(lw, keep, tok)`` sorted by token id, as the whole-row draw walks the vocabulary."""
    order = idx.argsort(dim=1)
    return base.gather(1, order), keep.gather(1, order), idx.gather(1, order)


_BLOCK_CAND_MAX = 1024  # top-k up to this: the filters, weights and draw run on the k candidates, not the row


def _block_candidates(z: torch.Tensor, zmax: torch.Tensor, k: torch.Tensor, p: torch.Tensor, nfin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-k then top-p on each row's ``k`` largest values only: ``(lw, keep, tok)`` ``[R, C]`` in token order
    (``C`` = the largest k), the same kept set as :func:`_block_kept`; None where it does not apply (a row without
    top-k, a large k, or a tie group at a k-th value that runs past the candidates)."""
    if not bool(((k > 0) & (k < nfin)).all()):
        return None
    kmax = int(k.max())
    if kmax > _BLOCK_CAND_MAX:
        return None
    n = min(kmax + 1, z.shape[1])
    vals, idx = torch.topk(z, n, dim=1)  # descending
    kth = vals.gather(1, (k - 1)[:, None])  # [R, 1]
    if bool((vals.gather(1, k[:, None]) == kth).any()):  # k < nfin <= V, so column k exists
        return None  # ties at the k-th value past the candidates: the whole-row path keeps them all
    vals, idx = vals[:, :kmax], idx[:, :kmax]
    keep = torch.arange(kmax, device=z.device)[None, :] < k[:, None]
    base = torch.where(keep, z.gather(1, idx) - zmax, _NEG_INF)  # z / T - max, sorted descending
    p_on = p < 1.0
    if bool(p_on.any()):
        w = base.exp()
        keep_p = _group_start_mass(base, w) < torch.where(p_on, p, 1.0)[:, None] * w.sum(dim=1, keepdim=True)
        keep &= keep_p | (base == 0.0) | ~p_on[:, None]
    return _in_token_order(base, keep, idx)


_BLOCK_TOPP_CAND = 64  # top-p first: the candidates that stand for a row when they hold its whole kept set


def _block_topp_candidates(z: torch.Tensor, zmax: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                           nfin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-p (on the full distribution) then top-k on each row's ``_BLOCK_TOPP_CAND + 1`` largest values: the same
    kept set as :func:`_block_kept` with ``topp_first``, as ``(lw, keep, tok)`` in token order, when every row's
    kept set ends inside the list (a candidate after it is dropped, so is every token below it, ties included);
    None otherwise (a flat row, top-p off, or a short row), and the whole-row path runs.

    The one whole-row pass left is the normalizer, ``sum(exp(z - zmax))``: top-p's mass is taken on the full
    distribution. Peaked rows (a diffusion LM's usual low-temperature step) keep a few tokens, so the rest of the
    work is on the candidates."""
    R, V = z.shape
    n = _BLOCK_TOPP_CAND + 1
    if n >= V or not bool((p < 1.0).all()):
        return None
    vals, idx = torch.topk(z, n, dim=1)  # [R, n] descending
    base = z.gather(1, idx) - zmax  # z / T - max of the candidates
    total = _exp_sum(z, zmax)  # [R, 1] the full distribution's mass
    w = base.exp()
    keep = (_group_start_mass(base, w) < p[:, None] * total) | (base == 0.0)  # the max's group always stays
    keep &= base > _NEG_INF
    if bool(keep[:, -1].any()):  # some row's kept set may run past the list
        return None
    k_on = (k > 0) & (k < nfin) & (k < n)  # a k at or past the list keeps every candidate
    if bool(k_on.any()):
        kth = vals.gather(1, (torch.where(k_on, k, 1) - 1)[:, None])  # [R, 1]
        keep &= (vals >= kth) | ~k_on[:, None]
    return _in_token_order(base, keep, idx)


def block_torch(
    logits: torch.Tensor,
    masked: torch.Tensor,
    input_ids: torch.Tensor | None,
    temperature: Param,
    top_k: Param,
    top_p: Param,
    seeds: torch.Tensor,
    *,
    confidence: str,
    topp_first: bool,
    post_temp: bool,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The PyTorch path of ``sample_block`` (and, with ``post_temp``, of ``rwkv_sample_logits``).

    ``logits [B, L, V]``, ``masked`` bool ``[B, L]``, ``input_ids`` int64 ``[B, L]`` or None; parameters are Python
    scalars or per-batch-row ``[B]`` tensors (validated); ``seeds`` int64 ``[B]`` per batch row (row keys mixed in).
    ``post_temp``: the rwkv rule (filters on the untempered distribution, the kept weights then raised to ``1 / T``).
    Returns tokens int64 ``[B, L]``, fp32 confidences ``[B, L]`` and, with ``want_probs``, the fp32 ``[B, L, V]``
    distribution each masked position drew from (zeros for bad and unmasked positions).
    """
    B, L, V = logits.shape
    dev = logits.device
    tokens = input_ids.clone() if input_ids is not None else torch.full((B, L), -1, dtype=torch.int64, device=dev)
    conf = torch.full((B, L), _NEG_INF, dtype=torch.float32, device=dev)
    probs = torch.zeros(B, L, V, dtype=torch.float32, device=dev) if want_probs else None
    rb, rl = masked.nonzero(as_tuple=True)
    R = rb.shape[0]
    if R == 0:
        return tokens, conf, probs
    # [R, V] rows, read in place when every position is masked and the rows form a view (a block's first step)
    x = (logits.reshape(R, V) if R == B * L else logits[rb, rl]).float()
    T = _per_position(temperature, rb, torch.float32)
    P = _per_position(top_p, rb, torch.float32)
    K = _per_position(top_k, rb, torch.int64)
    greedy = T == 0.0
    one = torch.ones_like(T)
    t_eff = one if post_temp else torch.where(greedy, one, T)
    z = x / t_eff[:, None] if bool((t_eff != 1.0).any()) else x
    xmax, xarg = _row_max(x)  # the index of the first maximal value (NaN propagates to xmax)
    zmax = z.amax(dim=1) if z is not x else xmax
    bad = ~torch.isfinite(xmax)  # a NaN, a +inf, or nothing but -inf
    onehot = (zmax == _INF) & ~bad  # logits / T overflows: the T -> 0 limit
    bad |= (zmax == _NEG_INF) & ~bad  # every logits / T underflows to -inf
    nfin = _finite_count(z, zmax) if bool((K > 0).any()) else torch.full_like(K, V)  # top-k needs the count
    use = ~bad & ~onehot
    if confidence not in _CONF_FILTERED:
        use &= ~greedy
    tok = torch.where(greedy | onehot, xarg, -1)
    tok_lw = torch.zeros(R, device=dev)
    w_sum = torch.ones(R, device=dev)
    e_sum = torch.zeros(R, device=dev)
    w2 = torch.zeros(R, device=dev)
    f = use.nonzero().flatten()
    if f.numel():
        zf = z if f.numel() == R else z[f]  # no copy when every row samples (a block's usual step)
        zm = zmax[f][:, None]
        cand = None
        if not post_temp and probs is None:  # the candidate lists (the full rows are needed for probs / rwkv)
            pick = _block_topp_candidates if topp_first else _block_candidates
            cand = pick(zf, zm, K[f], P[f], nfin[f])
        ctok = None
        if cand is not None:  # the candidates of each row stand for the row (the rest weighs 0)
            lw, keep, ctok = cand
        else:
            lw = zf - zm
            keep = _block_kept(zf, lw, K[f], P[f], nfin[f], topp_first)
        C = lw.shape[1]
        if post_temp:
            inv = (1.0 / T[f])[:, None]
            lw = torch.where(lw == 0.0, 0.0, lw * inv)  # no 0 * inf at the max when 1 / T overflows
        lw = torch.where(keep, lw, _NEG_INF)
        w = lw.exp()
        ws = w.sum(dim=1)
        w_sum[f] = ws
        e_sum[f] = torch.where(w > 0, w * lw, 0.0).sum(dim=1)
        w2[f] = torch.topk(w, 2, dim=1).values[:, 1] if C > 1 else 0.0
        draw = ~greedy[f]
        if bool(draw.any()):
            d = draw.nonzero().flatten()
            cdf = w[d].double().cumsum_(dim=1)
            u = counter_uniform(seeds[rb[f[d]]], rl[f[d]] << 32).double()[:, None]
            pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=C - 1)
            tok[f[d]] = (ctok[d].gather(1, pick) if ctok is not None else pick)[:, 0]
            tok_lw[f[d]] = lw[d].gather(1, pick)[:, 0]
        if probs is not None and bool(draw.any()):
            d = draw.nonzero().flatten()
            probs[rb[f[d]], rl[f[d]]] = w[d] / ws[d][:, None]
    if probs is not None:
        oh = ((onehot | greedy) & ~bad).nonzero().flatten()
        probs[rb[oh], rl[oh], xarg[oh]] = 1.0
    if confidence == "prob":
        c = torch.where(onehot, 1.0, tok_lw.exp() / w_sum)
    elif confidence == "margin":
        c = torch.where(onehot, 1.0, (1.0 - w2) / w_sum)
    elif confidence == "neg_entropy":
        c = torch.where(onehot, 0.0, e_sum / w_sum - w_sum.log())
    elif confidence == "raw_prob":
        xs = _exp_sum(x, xmax[:, None])[:, 0]
        c = (x.gather(1, tok.clamp(min=0)[:, None])[:, 0] - xmax).exp() / xs
    elif confidence == "random":
        c = counter_uniform(seeds[rb], (rl << 32) + 0xFFFFFFFE)
    else:
        c = torch.zeros(R, device=dev)
    tokens[rb, rl] = torch.where(bad, -1, tok)
    conf[rb, rl] = torch.where(bad, float("nan"), c.float())
    return tokens, conf, probs
