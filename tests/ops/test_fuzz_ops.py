"""Property-based fuzz tests (hypothesis) over every public op of decodekit.ops, on both backends.

Issue 10: "Same answer on both backends, always". Every test draws small random inputs (the kernels run under
Triton's interpreter here, compiled under ``make gpu-check``), runs the Triton kernel (``backend="triton"``) and
the PyTorch path (``backend="torch"``) and checks:

* sampling (``sample``, ``sampling_probs``, ``sample_logits``, ``sample_logits_probs``, ``sampler_simple_batch``):
  the kept set of both backends is the same, exactly, and equals a float64 oracle of the documented semantics
  (ties at a boundary kept whole, greedy = argmax with the lowest index, ``temperature -> 0`` greedy also when
  ``logits / T`` overflows) on every row where that oracle is not itself ambiguous (a top-p or min-p decision
  within rounding of its threshold); probabilities sum to 1; a masked (-inf) token is never drawn; a drawn token
  is in its backend's kept set with ``logprob == log(prob)``; same seed -> same tokens; a row alone draws what it
  draws inside a batch (per-row int64 seeds); the caller's tensors are never modified; bad rows (NaN, +inf, all
  -inf) give -1 / NaN / zeros on both backends; bad arguments raise the same exception type on both backends,
  naming the argument. The two backends draw from different random streams by design, so drawn tokens are
  compared within a backend only.
* norm_linear (``layer_norm_linear``, ``rms_norm_linear``, ``gelu_linear``): strided / transposed / sliced
  inputs, every dtype and activation, both backends within a rounding bound of the fp64 reference.
* attention (``attention``, ``decode_attention``): GQA, causal with any ``q_offset``, ``kv_start``,
  ``cache_seqlens``, strided inputs; both backends within tolerance of the fp64 reference; queries that see no
  key give zeros (and ``lse = -inf``), never NaN.

``DECODEKIT_FUZZ_SCALE`` (default 1) multiplies every test's example count (``make fuzz`` uses more); the
default run is derandomized so that CI is reproducible (a larger scale draws new inputs on every run).
``DECODEKIT_FUZZ_NO_SHRINK=1`` reports a failing input as found instead of shrinking it (shrinking re-runs the
interpreted kernels for minutes). ``pytest --hypothesis-show-statistics`` prints how many inputs each test tried
and the events (ambiguous rows, bad rows, rows skipped for a known bug, ...) it saw.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from decodekit.ops.attention import attention, decode_attention
from decodekit.ops.attention.reference import attention_ref, decode_attention_ref
from decodekit.ops.norm_linear import gelu_linear, layer_norm_linear, rms_norm_linear
from decodekit.ops.norm_linear.reference import gelu_linear_ref, layer_norm_linear_ref, rms_norm_linear_ref
from decodekit.ops.sampling import sample, sample_logits, sample_logits_probs, sampler_simple_batch, sampling_probs
from decodekit.ops.sampling.reference import apply_penalties_ref, sample_logits_ref, sampling_probs_ref

SCALE = max(1, int(os.environ.get("DECODEKIT_FUZZ_SCALE", "1") or 1))


# DECODEKIT_FUZZ_NO_SHRINK=1: report the first failing input as found (shrinking re-runs the slow interpreted
# kernels for minutes); the failure message already prints the tensors
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if os.environ.get("DECODEKIT_FUZZ_NO_SHRINK") else
                                                            [Phase.target, Phase.shrink, Phase.explain])


def fuzz(n: int) -> settings:
    """``n`` examples (times DECODEKIT_FUZZ_SCALE), no deadline (the interpreter is slow), reproducible at scale 1."""
    return settings(
        max_examples=n * SCALE,
        phases=PHASES,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_TINY = float(torch.finfo(torch.float32).smallest_normal)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included (the caller's tensors must come back unchanged)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


def _snapshot(*items):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in items]


def _assert_unmodified(before, after, what="input"):
    for i, (b, a) in enumerate(zip(before, after)):
        if isinstance(a, torch.Tensor):
            assert _same_bits(a, b), f"the caller's {what} #{i} was modified"


def _raises(fn, *args):
    """The exception ``fn(*args)`` raises (None when it returns)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - every exception type is compared across the backends
        return exc
    return None


# =========================================================================== sampling: inputs

INTERESTING_V = (97, 13, 128, 2, 257, 31, 64, 3, 127, 129, 251, 5, 256, 7, 293, 32, 300, 33, 1)
ROW_KINDS = ("plain",) * 10 + ("masked", "masked", "sparse", "all_masked", "nan", "posinf")


@dataclass
class LogitsCase:
    B: int
    V: int
    dtype: torch.dtype
    kind: str
    scale: float
    offset: float
    rows: list[str]
    seed: int
    layout: str = "contig"  # "row-strided": rows of a wider buffer whose padding holds NaN (must never be read)

    def make(self) -> torch.Tensor:
        """The logits ``[B, V]`` in ``dtype`` (built in fp32 from ``seed``)."""
        g = torch.Generator().manual_seed(self.seed)
        B, V = self.B, self.V
        x = torch.randn(B, V, generator=g)
        if self.kind == "ties":  # a few distinct levels: ties everywhere, also at every boundary
            x = torch.round(x * 2) / 2
        elif self.kind == "flat":
            x = torch.zeros(B, V) + torch.randint(0, 2, (B, V), generator=g) * 1e-3
        elif self.kind == "wide":  # magnitudes over many decades
            hi = 4.0 if self.dtype == torch.float16 else 30.0
            x = torch.sign(x) * 10.0 ** (torch.rand(B, V, generator=g) * 2 * hi - hi)
        elif self.kind == "peaked":
            x[:, torch.randint(0, V, (1,), generator=g)] += 20.0
        x = x * self.scale + self.offset
        for r, kind in enumerate(self.rows):
            if kind == "masked":
                m = torch.rand(V, generator=g) < 0.5
                m[torch.randint(0, V, (1,), generator=g)] = False
                x[r, m] = float("-inf")
            elif kind == "sparse":
                keep = torch.randint(0, V, (3,), generator=g)
                row = torch.full((V,), float("-inf"))
                row[keep] = x[r, keep]
                x[r] = row
            elif kind == "all_masked":
                x[r] = float("-inf")
            elif kind == "nan":
                x[r, torch.randint(0, V, (1,), generator=g)] = float("nan")
            elif kind == "posinf":
                x[r, torch.randint(0, V, (1,), generator=g)] = float("inf")
        x = x.to(self.dtype)
        if self.layout == "row-strided":  # last dim contiguous, any row stride (documented)
            buf = torch.full((B, V + 3), float("nan"), dtype=self.dtype)
            buf[:, 1 : V + 1] = x
            x = buf[:, 1 : V + 1]
        elif self.layout == "transposed" and V == 1:  # [B, 1] of strides (1, B): accepted, a 1-column last dim
            x = x.t().contiguous().t()
        return x


@st.composite
def logits_cases(draw, max_b: int = 5, max_v: int = 300) -> LogitsCase:
    B = draw(st.integers(1, max_b))
    V = draw(st.one_of(st.sampled_from([v for v in INTERESTING_V if v <= max_v]), st.integers(1, max_v)))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(("randn", "randn", "ties", "flat", "wide", "peaked")))
    scale = draw(st.sampled_from((0.01, 1.0, 3.0, 10.0, 40.0)))
    offsets = (0.0, 0.0, 100.0, 3e4) if dtype == torch.float16 else (0.0, 0.0, 0.0, 1e6, 1e12, 1e20, 1e30)
    offset = draw(st.sampled_from(offsets))
    rows = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(("contig", "contig", "row-strided", "transposed")))
    return LogitsCase(B, V, dtype, kind, scale, offset, rows, seed, layout)


@dataclass
class Params:
    """Per-row parameter values (for the oracle) and the arguments of the call (scalars or [B] tensors)."""

    B: int
    rows: dict[str, list[float]] = field(default_factory=dict)
    kwargs: dict[str, object] = field(default_factory=dict)

    def row(self, name: str, r: int) -> float:
        return self.rows[name][r]

    def sliced(self, r: int) -> dict[str, object]:
        """The call arguments of row ``r`` alone."""
        def one(v):
            if isinstance(v, torch.Tensor) and (v.dim() == 2 or (v.dim() == 1 and v.shape[0] == self.B)):
                return v[r : r + 1]
            return v  # a scalar, or a 0-dim / [1] tensor shared by every row

        return {k: one(v) for k, v in self.kwargs.items()}


def _param(draw, name: str, B: int, values, *, integer: bool = False, out: Params) -> None:
    """Draw one parameter: a Python scalar for every row, or a per-row tensor (one of several dtypes)."""
    if draw(st.booleans()):
        v = draw(values)
        out.rows[name] = [v] * B
        out.kwargs[name] = v
        return
    vals = [draw(values) for _ in range(B)]
    out.rows[name] = vals
    if integer:
        dt = draw(st.sampled_from((torch.int64, torch.int32)))
    else:
        dt = draw(st.sampled_from((torch.float32, torch.float64)))
        if any(v != 0 and float(np.float32(v)) == 0 for v in vals):
            dt = torch.float64  # an fp32 tensor would hold 0, another (invalid) value
    t = torch.tensor(vals, dtype=dt)
    if draw(st.integers(0, 5)) == 0 and vals and all(v == vals[0] for v in vals):
        t = t[0]  # a 0-dim tensor broadcasts
    out.kwargs[name] = t


TEMPERATURES = st.sampled_from((1.0, 0.7, 1.5, 0.3, 4.0, 1.0, 1e-3, 1e-30, 0.0))
TOP_PS = st.one_of(st.sampled_from((1.0, 1.0, 0.9, 0.5, 0.1, 1e-3, 1e-46)), st.floats(0.01, 1.0))
MIN_PS = st.sampled_from((0.0, 0.0, 0.0, 0.05, 0.3, 1.0))


def TOP_KS(V: int):  # noqa: N802
    return st.one_of(st.sampled_from((0, 2, 0, 3, 0, 1)), st.integers(0, V + 2))


@st.composite
def hf_params(draw, B: int, V: int, penalties: bool = True) -> Params:
    out = Params(B)
    _param(draw, "temperature", B, TEMPERATURES, out=out)
    _param(draw, "top_k", B, TOP_KS(V), integer=True, out=out)
    _param(draw, "top_p", B, TOP_PS, out=out)
    _param(draw, "min_p", B, MIN_PS, out=out)
    if penalties and draw(st.integers(0, 2)) == 0:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        dt = draw(st.sampled_from((torch.int64, torch.int32, torch.int16, torch.uint8)))
        counts = (torch.randint(0, 4, (B, V), generator=g) * (torch.rand(B, V, generator=g) < 0.3)).to(dt)
        if draw(st.booleans()):  # rows of a wider buffer whose padding is a large count (must never be read)
            buf = torch.full((B, V + 2), 100, dtype=dt)
            buf[:, :V] = counts
            counts = buf[:, :V]
        out.kwargs["token_counts"] = counts
        _param(draw, "repetition_penalty", B, st.sampled_from((1.0, 1.3, 0.7, 2.0)), out=out)
        _param(draw, "presence_penalty", B, st.sampled_from((0.0, 0.5, -0.5)), out=out)
        _param(draw, "frequency_penalty", B, st.sampled_from((0.0, 0.2, -0.1)), out=out)
    return out


@st.composite
def tts_params(draw, B: int, V: int) -> Params:
    out = Params(B)
    _param(draw, "temperature", B, TEMPERATURES, out=out)
    # sample_logits: top_p <= 0 disables top-p, any finite value is accepted
    _param(draw, "top_p", B, st.one_of(TOP_PS, st.sampled_from((0.0, -0.5, 1.5, 0.85))), out=out)
    _param(draw, "top_k", B, TOP_KS(V), integer=True, out=out)
    return out


def _to(kwargs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


# =========================================================================== sampling: the float64 oracle


@dataclass
class RowTruth:
    """What one row must give: ``status`` "bad", "greedy" (``token``) or "sample" (``probs`` float64 [V])."""

    status: str
    token: int = -1
    probs: np.ndarray | None = None
    ambiguous: str = ""  # why the oracle's own decision is within rounding of a threshold ("" = it is not)
    ties: bool = False  # some kept-candidate values tie (sort-based references may cut inside the group)


AMB_MASS = 5e-5  # top-p: a group whose preceding mass is this close to top_p may go either way in fp32
AMB_RATIO = 1e-4  # min-p: relative closeness of p_i / p_max to min_p


def _effective(v: float) -> float:
    """A positive parameter as the op uses it (positive values stay positive in fp32)."""
    return FP32_TINY if 0 < v < FP32_TINY else float(np.float32(v)) if v != 0 else 0.0


def oracle_row(z: np.ndarray, T: float, k: int, p: float, mp: float, *, tts: bool, greedy_top1: bool) -> RowTruth:
    """The documented semantics of one row, in float64 after the fp32 penalties and the fp32 division by T.

    ``z``: fp32 penalized logits. HF (``tts=False``): top-k keeps every token tying the k-th value; top-p keeps a
    tie group iff the renormalized mass of the strictly higher tokens is < p; min-p keeps p_i >= min_p * p_max.
    TTS: top-p on the whole-row probabilities, kept iff the strictly-higher mass is <= p; top_p <= 0 is off.
    """
    with np.errstate(all="ignore"):
        if np.isnan(z).any() or np.isposinf(z).any() or np.isneginf(z).all():
            return RowTruth("bad")
        T32 = np.float32(_effective(T))
        if T == 0 or (greedy_top1 and k == 1):
            return RowTruth("greedy", int(np.argmax(z)))
        zt = (z / T32).astype(np.float32)
        if not np.isfinite(np.float32(z.max()) / T32):  # temperature -> 0 in the limit: greedy
            return RowTruth("greedy", int(np.argmax(z)))
        V = z.shape[0]
        zt = zt.astype(np.float64)
        m = zt.max()
        w = np.exp(zt - m)
        keep = zt > -np.inf
        amb = ""
        distinct = np.unique(zt[keep])[::-1]  # descending
        if 0 < k < V:
            kth = np.sort(zt)[::-1][k - 1]
            keep &= zt >= kth
        ties = len(np.unique(zt[keep])) < int(keep.sum())
        p_on = (p > 0) if tts else (0 < p < 1)
        if p_on:
            p_eff = _effective(p)
            if tts:
                probs = w / w[zt > -np.inf].sum()
            else:
                probs = np.where(keep, w, 0.0) / w[keep].sum()
            groups = [g for g in distinct if keep[zt == g].any()]
            before = 0.0
            for gi, g in enumerate(groups):
                in_g = zt == g
                if gi > 0:
                    if abs(before - p_eff) <= AMB_MASS:
                        amb = amb or f"top-p: mass {before:.9g} before a group vs top_p {p_eff:.9g}"
                    ok = before <= p_eff if tts else before < p_eff
                    if not ok:
                        keep &= ~in_g
                before += probs[in_g & keep].sum() if gi == 0 or ok else probs[in_g].sum()
        if not tts and mp > 0:
            mp_eff = _effective(mp)
            ratio = np.exp(zt - m)
            near = keep & (zt < m) & (np.abs(ratio - mp_eff) <= AMB_RATIO * mp_eff)  # the max group stays
            if near.any():
                amb = amb or f"min-p: p/p_max {ratio[near][0]:.9g} vs min_p {mp_eff:.9g}"
            keep &= ratio >= mp_eff
        probs = np.where(keep, w, 0.0)
        probs /= probs.sum()
        return RowTruth("sample", probs=probs, ambiguous=amb, ties=ties)


def oracle(logits: torch.Tensor, prm: Params, *, tts: bool, greedy_top1: bool) -> list[RowTruth]:
    counts = prm.kwargs.get("token_counts")
    z = logits.float()
    if counts is not None:
        z = apply_penalties_ref(z, counts, prm.kwargs.get("repetition_penalty", 1.0),
                                prm.kwargs.get("presence_penalty", 0.0), prm.kwargs.get("frequency_penalty", 0.0))
    zn = z.numpy()
    out = []
    for r in range(z.shape[0]):
        k = int(prm.row("top_k", r))
        p = prm.row("top_p", r)
        mp = prm.rows.get("min_p", [0.0] * z.shape[0])[r]
        out.append(oracle_row(zn[r], prm.row("temperature", r), k, p, mp, tts=tts, greedy_top1=greedy_top1))
    return out


SIGNIFICANT = 1e-30  # probabilities below this may flush to zero on one path and not on the other


def _kept(p: torch.Tensor) -> torch.Tensor:
    return p > 0


def _assert_same_kept_sets(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Exactly the same kept set (ignoring probabilities that are denormal-small on the side that keeps them)."""
    differ = _kept(a) != _kept(b)
    differ &= torch.maximum(a, b) > SIGNIFICANT
    rows = differ.any(dim=1).nonzero().flatten().tolist()
    assert not rows, f"{what}: kept sets differ in rows {rows}: " + "; ".join(
        f"row {r}: only first {(_kept(a[r]) & ~_kept(b[r])).nonzero().flatten().tolist()[:8]}, only second "
        f"{(_kept(b[r]) & ~_kept(a[r])).nonzero().flatten().tolist()[:8]}" for r in rows[:3])


def _check_probs_against_truth(probs: torch.Tensor, truth: list[RowTruth], what: str) -> int:
    """Probabilities of one backend against the oracle; returns how many rows were ambiguous (not compared)."""
    V = probs.shape[1]
    assert probs.dtype == torch.float32 and not torch.isnan(probs).any(), f"{what}: NaN probabilities"
    assert bool((probs >= 0).all()) and bool((probs <= 1).all()), f"{what}: probabilities outside [0, 1]"
    n_amb = 0
    for r, t in enumerate(truth):
        row = probs[r].double()
        if t.status == "bad":
            assert bool((row == 0).all()), f"{what}: bad row {r} has nonzero probabilities"
            continue
        assert abs(float(row.sum()) - 1.0) <= 1e-5, f"{what}: row {r} sums to {float(row.sum())}"
        if t.status == "greedy":
            one_hot = torch.zeros(V, dtype=torch.float64)
            one_hot[t.token] = 1.0
            assert torch.equal(row, one_hot), f"{what}: greedy row {r} is not the one-hot at {t.token}"
            continue
        if t.ambiguous:
            n_amb += 1
            event(f"ambiguous row ({t.ambiguous.split(':')[0]})")
            continue
        ref = torch.from_numpy(t.probs)
        got_k, ref_k = row > 0, ref > 0
        differ = (got_k != ref_k) & (torch.maximum(row, ref) > SIGNIFICANT)
        assert not differ.any(), (
            f"{what}: row {r} kept set differs from the documented semantics: kept but should not "
            f"{(got_k & ~ref_k & differ).nonzero().flatten().tolist()[:8]}, dropped but should be kept "
            f"{(~got_k & ref_k & differ).nonzero().flatten().tolist()[:8]}")
        torch.testing.assert_close(row, ref, atol=2e-6, rtol=2e-4, msg=lambda m, r=r: f"{what}: row {r}: {m}")
    return n_amb


def _assert_backends_agree(out: dict[str, torch.Tensor], truth: list[RowTruth]) -> None:
    """The same kept sets, exactly, and the same probabilities (to fp32 rounding) on both backends."""
    _assert_same_kept_sets(out["triton"], out["torch"], "triton vs torch")
    torch.testing.assert_close(out["triton"], out["torch"], atol=2e-6, rtol=2e-4)


# =========================================================================== sampling: properties


@fuzz(30)
@given(case=logits_cases(), data=st.data())
def test_sampling_probs_same_kept_set_on_both_backends_and_the_oracle(device, case, data):
    """sampling_probs: both backends equal (kept sets exactly), equal to the float64 oracle and to
    sampling_probs_ref where the oracle is unambiguous; bad rows zeros; the caller's tensors untouched."""
    x = case.make()
    prm = data.draw(hf_params(case.B, case.V))
    before = _snapshot(x, *prm.kwargs.values())
    out = {}
    for backend in BACKENDS:
        xd = x.to(device)
        out[backend] = sampling_probs(xd, backend=backend, **_to(prm.kwargs, device)).cpu()
        assert out[backend].shape == (case.B, case.V)
    _assert_unmodified(before, [x, *prm.kwargs.values()])
    truth = oracle(x, prm, tts=False, greedy_top1=True)
    _assert_backends_agree(out, truth)
    for backend in BACKENDS:
        _check_probs_against_truth(out[backend], truth, backend)
    # the plain reference (fp32, full sort) where the oracle is unambiguous and it does not overflow
    ref = sampling_probs_ref(x, **prm.kwargs)
    for r, t in enumerate(truth):
        event(f"row status {t.status}")
        if (t.status == "sample" and not t.ambiguous and torch.isfinite(ref[r]).all()
                and not 0 < prm.row("top_p", r) < FP32_TINY):  # the reference rounds such a top_p to 0
            differ = (_kept(ref[r]) != _kept(out["torch"][r])) & (torch.maximum(ref[r], out["torch"][r]) > SIGNIFICANT)
            assert not differ.any(), f"sampling_probs_ref disagrees on row {r}"


@fuzz(20)
@given(case=logits_cases(), data=st.data())
def test_sample_logits_probs_same_kept_set_and_draws(device, case, data):
    """sample_logits_probs on both backends against the TTS oracle (and sample_logits_ref on rows without ties);
    sample_logits draws only kept tokens, -1 for bad rows, [B, 1] int64."""
    x = case.make()
    prm = data.draw(tts_params(case.B, case.V))
    kw = prm.kwargs
    before = _snapshot(x, *kw.values())
    out = {b: sample_logits_probs(x.to(device), backend=b, **_to(kw, device)).cpu() for b in BACKENDS}
    _assert_unmodified(before, [x, *kw.values()])
    truth = oracle(x, prm, tts=True, greedy_top1=False)
    _assert_backends_agree(out, truth)
    for backend in BACKENDS:
        _check_probs_against_truth(out[backend], truth, backend)
    scalar = all(not isinstance(v, torch.Tensor) for v in kw.values())
    if scalar:  # the verbatim TTS sampler (scalars only); ties at a top-p boundary it cuts arbitrarily
        ref = sample_logits_ref(x, kw["temperature"], kw["top_p"], kw["top_k"], return_probs=True)
        for r, t in enumerate(truth):
            if (t.status == "sample" and not t.ambiguous and not t.ties and torch.isfinite(ref[r]).all()
                    and not 0 < prm.row("top_p", r) < FP32_TINY):
                differ = (_kept(ref[r]) != _kept(out["torch"][r])) & (
                    torch.maximum(ref[r], out["torch"][r]) > SIGNIFICANT)
                assert not differ.any(), f"sample_logits_ref disagrees on row {r}"
    seed = data.draw(st.integers(0, 2**63 - 1))
    for backend in BACKENDS:
        tok = sample_logits(x.to(device), backend=backend, seed=seed, **_to(kw, device)).cpu()
        assert tok.shape == (case.B, 1) and tok.dtype == torch.int64
        for r, t in enumerate(truth):
            tr = int(tok[r, 0])
            if t.status == "bad":
                assert tr == -1, f"{backend}: bad row {r} drew {tr}"
            elif t.status == "greedy":
                assert tr == t.token, f"{backend}: greedy row {r} drew {tr}, argmax is {t.token}"
            else:
                assert 0 <= tr < case.V and float(out[backend][r, tr]) > 0, f"{backend}: row {r} drew {tr}, not kept"


@st.composite
def seed_args(draw, B: int):
    kind = draw(st.sampled_from(("int", "rows", "rows", "shared1", "shared0")))
    if kind == "int":
        return kind, draw(st.integers(0, 2**63 - 1))
    if kind == "rows":
        return kind, torch.tensor(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=B, max_size=B)))
    s = torch.tensor([draw(st.integers(-(2**63), 2**63 - 1))])
    return kind, (s if kind == "shared1" else s.reshape(()))


@fuzz(15)
@given(case=logits_cases(max_b=4, max_v=200), data=st.data())
def test_sample_draws_kept_tokens_with_consistent_logprobs(device, case, data):
    """sample on each backend: a kept token (never a masked one), logprob == log(prob) of that backend's
    sampling_probs, -1 / NaN on bad rows, deterministic, batch invariant with per-row seeds, inputs untouched."""
    x = case.make()
    prm = data.draw(hf_params(case.B, case.V))
    seed_kind, seed = data.draw(seed_args(case.B))
    note(f"seed={seed!r}")
    truth = oracle(x, prm, tts=False, greedy_top1=True)
    r_alone = data.draw(st.integers(0, case.B - 1))
    z = x.float()
    if "token_counts" in prm.kwargs:
        z = apply_penalties_ref(z, prm.kwargs["token_counts"], prm.kwargs.get("repetition_penalty", 1.0),
                                prm.kwargs.get("presence_penalty", 0.0), prm.kwargs.get("frequency_penalty", 0.0))
    for backend in BACKENDS:
        kw = _to(prm.kwargs, device)
        sd = seed.to(device) if isinstance(seed, torch.Tensor) else seed
        before = _snapshot(x, seed, *prm.kwargs.values())
        tok, lp = sample(x.to(device), seed=sd, return_logprobs=True, backend=backend, **kw)
        _assert_unmodified(before, [x, seed, *prm.kwargs.values()])
        assert tok.shape == (case.B,) and tok.dtype == torch.int64 and lp.dtype == torch.float32
        tok2, lp2 = sample(x.to(device), seed=sd, return_logprobs=True, backend=backend, **kw)
        assert torch.equal(tok, tok2) and _same_bits(lp.cpu(), lp2.cpu()), f"{backend}: not deterministic"
        tok, lp = tok.cpu(), lp.cpu()
        probs = sampling_probs(x.to(device), backend=backend, **kw).cpu()
        for r, t in enumerate(truth):
            tr = int(tok[r])
            if t.status == "bad":
                assert tr == -1 and math.isnan(float(lp[r])), f"{backend}: bad row {r} gave {tr}, {float(lp[r])}"
                continue
            assert 0 <= tr < case.V, f"{backend}: row {r} drew {tr}"
            assert float(x[r, tr]) != float("-inf") and float(z[r, tr]) != float("-inf"), \
                f"{backend}: row {r} drew the masked token {tr}"
            if t.status == "greedy":
                assert tr == t.token and float(lp[r]) == 0.0, f"{backend}: greedy row {r} drew {tr}, lp {float(lp[r])}"
                continue
            pr = float(probs[r, tr])
            assert pr > 0, f"{backend}: row {r} drew {tr}, outside its kept set"
            assert abs(float(lp[r]) - math.log(pr)) <= 1e-4, \
                f"{backend}: row {r} logprob {float(lp[r])} vs log(prob) {math.log(pr)}"
        bad = [r for r, t in enumerate(truth) if t.status == "bad"]
        if bad:  # check=True names the bad rows instead of returning -1
            err = _raises(lambda b=backend, s=sd, k=kw: sample(x.to(device), seed=s, check=True, backend=b, **k))
            assert isinstance(err, ValueError) and str(bad) in str(err), f"{backend}: check=True gave {err!r}"
        # a row alone draws what it draws inside the batch (per-row seeds), a prefix what it draws in the batch
        if seed_kind == "int" and case.B > 1:
            j = r_alone + 1
            kw_j = {k: (v[:j] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v) for k, v in kw.items()}
            head = sample(x[:j].to(device), seed=sd, backend=backend, **kw_j).cpu()
            assert torch.equal(head, tok[:j]), f"{backend}: the first {j} rows alone drew {head.tolist()}"
        if seed_kind == "rows":
            r = r_alone
            kw1 = _to(prm.sliced(r), device)
            t1, l1 = sample(x[r : r + 1].to(device), seed=seed[r : r + 1].to(device), return_logprobs=True,
                            backend=backend, **kw1)
            assert int(t1) == int(tok[r]), f"{backend}: row {r} alone drew {int(t1)}, in the batch {int(tok[r])}"
            assert abs(float(l1) - float(lp[r])) <= 1e-5 or (math.isnan(float(l1)) and math.isnan(float(lp[r])))


@fuzz(25)
@given(case=logits_cases(), data=st.data())
def test_sampler_simple_batch_both_backends(device, case, data):
    """sampler_simple_batch: greedy rows equal on both backends (argmax, lowest index), every other token is within
    ``noise`` of the row max of ``logits / temp``, never masked; -1 for bad rows; deterministic; batch invariant."""
    x = case.make()
    B, V = case.B, case.V
    prm = Params(B)
    _param(data.draw, "noise", B, st.sampled_from((0.0, 1.0, 1.0, 0.5, 5.0, 1e-3)), out=prm)
    _param(data.draw, "temp", B, st.sampled_from((0.0, 1.0, 1.0, 0.5, 2.0, 1e-30)), out=prm)
    seed_kind, seed = data.draw(seed_args(B))
    xf = x.float()
    r_alone = data.draw(st.integers(0, B - 1))
    for backend in BACKENDS:
        before = _snapshot(x, seed, *prm.kwargs.values())
        sd = seed.to(device) if isinstance(seed, torch.Tensor) else seed
        kw = _to(prm.kwargs, device)
        tok = sampler_simple_batch(x.to(device), seed=sd, backend=backend, **kw).cpu()
        _assert_unmodified(before, [x, seed, *prm.kwargs.values()])
        assert tok.shape == (B, 1) and tok.dtype == torch.int64
        again = sampler_simple_batch(x.to(device), seed=sd, backend=backend, **kw).cpu()
        assert torch.equal(tok, again), f"{backend}: not deterministic"
        with np.errstate(all="ignore"):
            for r in range(B):
                row, t = xf[r], int(tok[r, 0])
                noise, temp = prm.row("noise", r), prm.row("temp", r)
                if torch.isnan(row).any() or torch.isposinf(row).any() or torch.isneginf(row).all():
                    assert t == -1, f"{backend}: bad row {r} drew {t}"
                    continue
                zt = row / np.float32(temp) if temp > 0 else row  # fp32, as both paths divide
                assert 0 <= t < V and float(row[t]) != float("-inf"), f"{backend}: row {r} drew masked {t}"
                if temp == 0 or not torch.isfinite(zt.max()):  # temperature -> 0: greedy on the logits
                    assert t == int(row.argmax()), f"{backend}: greedy row {r} drew {t}, argmax {int(row.argmax())}"
                elif noise == 0:  # plain greedy on logits / temp (lowest index on ties)
                    assert t == int(zt.argmax()), f"{backend}: greedy row {r} drew {t}, argmax {int(zt.argmax())}"
                else:
                    m = float(zt.max())
                    assert float(zt[t]) >= m - noise - 1e-6 * abs(m), f"{backend}: row {r} drew {t} below max - noise"
        if seed_kind == "rows":  # a row alone draws what it draws in the batch
            r = r_alone
            alone = sampler_simple_batch(x[r : r + 1].to(device), seed=seed[r : r + 1].to(device), backend=backend,
                                         **_to(prm.sliced(r), device)).cpu()
            assert int(alone) == int(tok[r, 0]), f"{backend}: row {r} alone drew {int(alone)}, batched {int(tok[r])}"
        elif seed_kind == "int" and B > 1:  # a shared seed keys rows by index: a prefix draws the same tokens
            j = r_alone + 1
            kw_j = {k: (v[:j] if isinstance(v, torch.Tensor) and v.dim() == 1 else v) for k, v in kw.items()}
            head = sampler_simple_batch(x[:j].to(device), seed=seed, backend=backend, **kw_j).cpu()
            assert torch.equal(head, tok[:j]), f"{backend}: the first {j} rows alone drew {head.flatten().tolist()}"


@fuzz(30)
@given(V=st.integers(1, 50), dtype=st.sampled_from(DTYPES), data=st.data())
def test_samplers_on_an_empty_batch(device, V, dtype, data):
    """B = 0: every sampler returns its empty result, of the documented shape and dtype, on both backends."""
    x = torch.empty(0, V, dtype=dtype, device=device)
    prm = data.draw(hf_params(0, V))
    tts = data.draw(tts_params(0, V))
    for backend in BACKENDS:
        kw = _to(prm.kwargs, device)
        tok, lp = sample(x, seed=1, return_logprobs=True, backend=backend, **kw)
        assert tok.shape == (0,) and tok.dtype == torch.int64 and lp.shape == (0,) and lp.dtype == torch.float32
        p = sampling_probs(x, backend=backend, **kw)
        assert p.shape == (0, V) and p.dtype == torch.float32
        t2 = sample_logits(x, seed=torch.empty(0, dtype=torch.int64, device=device), backend=backend,
                           **_to(tts.kwargs, device))
        assert t2.shape == (0, 1) and t2.dtype == torch.int64
        p2 = sample_logits_probs(x, backend=backend, **_to(tts.kwargs, device))
        assert p2.shape == (0, V) and p2.dtype == torch.float32
        t3 = sampler_simple_batch(x, 0.5, 1.0, seed=3, backend=backend)
        assert t3.shape == (0, 1) and t3.dtype == torch.int64


# --------------------------------------------------------------------------- sampling: what the fuzz found
# Minimal reproducers of the bugs this suite found in decodekit/ops/sampling (fixed there). In the kernel: K1, a
# valid row needing a top-k / top-p search came back with an empty kept set (zeros, and -1 as for a bad row): rows
# whose finite values all tie at some values, or values one fp32 spacing apart at large magnitude (rounded pivots
# were not monotone); K2, a row whose every logit / T overflows fp32 was a bad row instead of greedy. On the
# PyTorch path: S1, top-k and the top-p tie groups were taken before the division by T (ties made by the fp32
# division were cut apart); S2, with per-row seeds a row's token depended on the batch when its kept set had ties
# (the draw ran over tied candidates in an order that changed with the batch's largest top_k).


@pytest.mark.parametrize("row,kw,probs", [
    ([0.7, 0.7], dict(top_p=0.9), [0.5, 0.5]),  # a flat row (kernel: [0, 0] and token -1)
    ([3.3, 3.3, float("-inf")], dict(top_p=0.5), [0.5, 0.5, 0.0]),
    ([0.7, 0.7, 0.7], dict(top_k=2), [1 / 3, 1 / 3, 1 / 3]),  # the tie of the 2nd is kept whole
    ([1e9, 1e9 - 128], dict(top_p=0.9), [1.0, 0.0]),  # adjacent fp32 values (their spacing at 1e9 is 64)
])
def test_k1_tied_and_near_tied_rows_keep_their_top_set(device, row, kw, probs):
    x = torch.tensor([row], device=device)
    assert sampling_probs(x, backend="torch", **kw).cpu().tolist() == [pytest.approx(probs)]
    assert sample(x, seed=0, backend="torch", **kw).item() >= 0
    assert sampling_probs(x, backend="triton", **kw).cpu().tolist() == [pytest.approx(probs)]  # was: zeros
    assert sample(x, seed=0, backend="triton", **kw).item() >= 0  # was: -1


@pytest.mark.parametrize("op", ["sampling_probs", "sample", "sample_logits", "sampler_simple_batch"])
def test_k2_every_logit_overflowing_at_tiny_temperature_is_greedy(device, op):
    x = torch.tensor([[100.0, 200.0]], device=device)  # x / 1e-37 overflows fp32: greedy in the limit

    def run(backend):
        if op == "sampling_probs":
            return sampling_probs(x, temperature=1e-37, backend=backend).cpu().tolist()
        if op == "sample":
            return sample(x, temperature=1e-37, seed=0, backend=backend).cpu().tolist()
        if op == "sample_logits":
            return sample_logits(x, 1e-37, 0.9, 0, seed=0, backend=backend).cpu().tolist()
        return sampler_simple_batch(x, 0.5, 1e-37, seed=0, backend=backend).cpu().tolist()

    want = {"sampling_probs": [[0.0, 1.0]], "sample": [1]}.get(op, [[1]])
    assert run("torch") == want
    assert run("triton") == want  # was: zeros / -1


def test_s1_ties_made_by_the_temperature_are_kept_whole_on_the_cpu_path(device):
    # / 1.5 in fp32: 666669.3125, 666668.6875, 666668.4375, 666668.4375 -- the 3rd and 4th tie at top_k=3
    x = torch.tensor([[1000004.0, 1000003.0625, 1000002.625, 1000002.6875]], device=device)
    want = sampling_probs_ref(x.cpu(), temperature=1.5, top_k=3)
    assert bool((want > 0).all())  # the reference keeps the tie group whole (so does the kernel)
    assert torch.equal(sampling_probs(x, temperature=1.5, top_k=3, backend="triton").cpu() > 0, want > 0)
    assert torch.equal(sampling_probs(x, temperature=1.5, top_k=3, backend="torch").cpu() > 0, want > 0)  # S1


def test_s2_a_row_alone_draws_what_it_draws_in_a_batch_on_the_cpu_path(device):
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], [0.0] * 8], device=device)
    k, seeds = torch.tensor([5, 0], device=device), torch.tensor([0, 0], device=device)
    for backend in ("triton", "torch"):
        batch = sample(x, top_k=k, seed=seeds, backend=backend)
        alone = sample(x[:1], top_k=k[:1], seed=seeds[:1], backend=backend)
        assert int(batch[0]) == int(alone[0]), f"{backend}: batch {int(batch[0])}, alone {int(alone[0])}"  # S2


# --------------------------------------------------------------------------- sampling: bad arguments

_SAMPLERS = ("sample", "sampling_probs", "sample_logits", "sample_logits_probs", "sampler_simple_batch")


def _call_sampler(name: str, logits, kw: dict, backend: str):
    if name == "sample":
        return sample(logits, backend=backend, seed=kw.pop("seed", 0), **kw)
    if name == "sampling_probs":
        kw.pop("seed", None)
        return sampling_probs(logits, backend=backend, **kw)
    if name == "sample_logits":
        return sample_logits(logits, backend=backend, seed=kw.pop("seed", 0), **kw)
    if name == "sample_logits_probs":
        kw.pop("seed", None)
        return sample_logits_probs(logits, backend=backend, **kw)
    return sampler_simple_batch(logits, backend=backend, seed=kw.pop("seed", 0), **kw)


def _bad_sampler_args(B: int, V: int):
    """(entry points, argument name, value): each value is invalid for the named argument."""
    hf = ("sample", "sampling_probs")
    tts = ("sample_logits", "sample_logits_probs")
    flt = hf + tts
    nan, inf = float("nan"), float("inf")
    return [
        (flt, "temperature", st.sampled_from((-0.1, nan, inf, -inf, "1.0", None, True, torch.tensor([-1.0] * B),
                                              torch.full((B + 1,), 1.0), torch.tensor([1.0 + 1j] * B),
                                              torch.ones(B, 1), torch.tensor([True] * B)))),
        (flt, "top_k", st.sampled_from((-1, 2.5, nan, "3", True, torch.tensor([1.5] * B), torch.tensor([-1] * B),
                                        torch.tensor([True] * B), torch.full((B + 2,), 1, dtype=torch.int64)))),
        (hf, "top_p", st.sampled_from((0.0, -0.1, 1.5, nan, inf, torch.tensor([0.0] * B), torch.tensor([2.0] * B),
                                       torch.tensor([nan] * B)))),
        (tts, "top_p", st.sampled_from((nan, inf, -inf, "0.9", torch.tensor([nan] * B)))),
        (hf, "min_p", st.sampled_from((-0.2, 1.5, nan, torch.tensor([-0.5] * B)))),
        (hf, "repetition_penalty", st.sampled_from((0.0, -1.0, nan, inf, torch.tensor([0.0] * B)))),
        (hf, "presence_penalty", st.sampled_from((nan, inf, "0", torch.tensor([inf] * B)))),
        (hf, "frequency_penalty", st.sampled_from((nan, -inf, torch.tensor([nan] * B)))),
        (hf, "token_counts", st.sampled_from((torch.ones(B, V + 1, dtype=torch.int32), torch.ones(B, V),
                                              torch.ones(V, dtype=torch.int64), [[0] * V] * B,
                                              torch.ones(B, V, dtype=torch.bool),
                                              torch.ones(B, 2 * V, dtype=torch.int64)[:, ::2] if V > 1 else
                                              torch.ones(B, V, dtype=torch.float16)))),
        (("sample", "sample_logits", "sampler_simple_batch"), "seed",
         st.sampled_from((-1, 2**63, 1.5, "0", True, torch.tensor([1] * B, dtype=torch.int32),
                          torch.zeros(B + 1, dtype=torch.int64), torch.zeros(B, 1, dtype=torch.int64)))),
        (("sampler_simple_batch",), "noise", st.sampled_from((-1.0, nan, inf, "1", torch.tensor([-1.0] * B)))),
        (("sampler_simple_batch",), "temp", st.sampled_from((-1.0, nan, inf, torch.full((B + 1,), 1.0)))),
        (_SAMPLERS, "backend", st.sampled_from(("cuda", "Triton", "", None, 1))),
        (_SAMPLERS, "logits", st.sampled_from(("logits-1d", "logits-3d", "logits-f64", "logits-int", "logits-v0",
                                               "logits-strided", "logits-list", "logits-bool"))),
    ]


def _bad_logits(tag: str, B: int, V: int):
    return {
        "logits-1d": torch.randn(V),
        "logits-3d": torch.randn(B, V, 1),
        "logits-f64": torch.randn(B, V, dtype=torch.float64),
        "logits-int": torch.ones(B, V, dtype=torch.int64),
        "logits-v0": torch.randn(B, 0),
        "logits-strided": torch.randn(B, 2 * max(V, 2))[:, ::2],
        "logits-list": [[0.0] * V] * B,
        "logits-bool": torch.ones(B, V, dtype=torch.bool),
    }[tag]


@fuzz(200)
@given(data=st.data())
def test_sampler_bad_arguments_raise_the_same_error_on_both_backends(device, data):
    """Every invalid argument: the same exception type on both backends, its message naming the argument."""
    B = data.draw(st.integers(1, 4))
    V = data.draw(st.integers(1, 9))
    cases = _bad_sampler_args(B, V)
    ops, name, values = data.draw(st.sampled_from(cases))
    op = data.draw(st.sampled_from(ops))
    value = data.draw(values)
    logits = torch.randn(B, V)
    kw: dict = {}
    if name == "logits":
        logits = _bad_logits(value, B, V)
    elif name != "backend":
        kw[name] = value
    if op == "sampler_simple_batch":
        kw = {k: v for k, v in kw.items() if k in ("noise", "temp", "seed")}
    note(f"{op}({name}={value!r})")
    errors = {}
    for backend in BACKENDS:
        b = value if name == "backend" else backend
        dev_kw = _to(kw, device)
        lg = logits.to(device) if isinstance(logits, torch.Tensor) else logits
        errors[backend] = _raises(_call_sampler, op, lg, dict(dev_kw), b)
    e_t, e_c = errors["triton"], errors["torch"]
    assert e_t is not None and e_c is not None, f"{op}: {name}={value!r} accepted: triton {e_t!r}, torch {e_c!r}"
    assert type(e_t) is type(e_c), f"{op}: {name}={value!r}: triton raised {e_t!r}, torch {e_c!r}"
    assert isinstance(e_t, (TypeError, ValueError)), f"{op}: {name}={value!r} raised {e_t!r}"
    assert name in str(e_t) and name in str(e_c), f"{op}: the error does not name {name}: {e_t!r} / {e_c!r}"
    event(f"{op}: {name} -> {type(e_t).__name__}")


# =========================================================================== norm_linear


@dataclass
class NormLinearCase:
    op: str
    lead: tuple[int, ...]
    K: int
    N: int
    dtype: torch.dtype
    x_layout: str
    w_layout: str
    nw: str  # "none", "contig", "strided", "fp32", "strided-fp32"
    nb: str
    bias: str  # "none", "contig", "strided"
    eps: float
    activation: str | None
    seed: int


def _vector(kind: str, n: int, dtype, g, base: float, spread: float):
    if kind == "none":
        return None
    dt = torch.float32 if "fp32" in kind else dtype
    v = base + spread * torch.randn(2 * n, generator=g)
    return (v[::2] if "strided" in kind else v[:n]).to(dt)


def _matrix(layout: str, rows: int, cols: int, dtype, g, scale: float = 1.0):
    """A [rows, cols] tensor of the named memory layout."""
    if layout == "transposed":  # a [cols, rows] buffer seen transposed (a Conv1D weight, HF's q.transpose)
        return (torch.randn(cols, rows, generator=g) * scale).to(dtype).t()
    if layout == "row-strided":  # rows of a wider buffer
        return (torch.randn(rows, cols + 5, generator=g) * scale).to(dtype)[:, 2 : 2 + cols]
    if layout == "col-strided":  # every other column (last-dim stride 2)
        return (torch.randn(rows, 2 * cols, generator=g) * scale).to(dtype)[:, ::2]
    if layout == "expanded":  # one row repeated with stride 0
        return (torch.randn(1, cols, generator=g) * scale).to(dtype).expand(rows, cols)
    return (torch.randn(rows, cols, generator=g) * scale).to(dtype)


@st.composite
def norm_linear_cases(draw) -> NormLinearCase:
    op = draw(st.sampled_from(("layer", "rms", "gelu")))
    M = draw(st.integers(0, 9))
    lead = draw(st.sampled_from(((), (M,), (M,), (2, M))))
    K = draw(st.one_of(st.sampled_from((1, 2, 3, 7, 13, 31, 32, 37, 64, 67, 70)), st.integers(1, 70)))
    N = draw(st.one_of(st.integers(1, 40), st.sampled_from((1, 0, 17, 40))))
    dtype = draw(st.sampled_from(DTYPES))
    x_layout = draw(st.sampled_from(("contig", "contig", "transposed", "row-strided", "col-strided", "expanded")))
    w_layout = draw(st.sampled_from(("contig", "contig", "transposed", "row-strided", "col-strided")))
    vec = st.sampled_from(("none", "contig", "contig", "strided", "fp32", "strided-fp32"))
    nw = draw(vec) if op != "gelu" else "none"
    nb = draw(vec) if op == "layer" else "none"
    bias = draw(st.sampled_from(("none", "contig", "strided")))
    eps = draw(st.sampled_from((1e-5, 1e-6, 1e-2, 0.0, 1)))
    act = draw(st.sampled_from((None, "gelu", "gelu_tanh", "silu")))
    if op == "gelu":
        act = draw(st.sampled_from(("gelu", "gelu_tanh")))
    return NormLinearCase(op, lead, K, N, dtype, x_layout, w_layout, nw, nb, bias, eps, act,
                          draw(st.integers(0, 2**31 - 1)))


def _norm_linear_inputs(c: NormLinearCase):
    g = torch.Generator().manual_seed(c.seed)
    M = math.prod(c.lead) if c.lead else 1
    x2 = _matrix(c.x_layout, M, c.K, c.dtype, g, 2.0)
    x = x2.reshape(*c.lead, c.K) if c.lead else x2[0]
    if c.x_layout == "transposed" and len(c.lead) == 1:
        x = x2  # keep the transposed strides
    w = _matrix(c.w_layout, c.N, c.K, c.dtype, g, c.K**-0.5)
    nw = _vector(c.nw, c.K, c.dtype, g, 1.0, 0.5)
    nb = _vector(c.nb, c.K, c.dtype, g, 0.0, 0.3)
    b = _vector(c.bias, c.N, c.dtype, g, 0.0, 0.5)
    if b is not None:
        b = b.to(c.dtype)
    return x, nw, nb, w, b


def _norm_linear_call(c: NormLinearCase, x, nw, nb, w, b, backend):
    if c.op == "layer":
        return layer_norm_linear(x, nw, nb, w, b, c.eps, c.activation, backend=backend)
    if c.op == "rms":
        return rms_norm_linear(x, nw, w, b, c.eps, c.activation, backend=backend)
    return gelu_linear(x, w, b, "tanh" if c.activation == "gelu_tanh" else "none", backend=backend)


def _norm_linear_ref(c: NormLinearCase, x, nw, nb, w, b):
    x, nw, nb, w, b = (None if t is None else t.double() for t in (x, nw, nb, w, b))
    if c.op == "layer":
        return layer_norm_linear_ref(x, nw, nb, w, b, c.eps, c.activation, upcast=True)
    if c.op == "rms":
        return rms_norm_linear_ref(x, nw, w, b, c.eps, c.activation, upcast=True)
    return gelu_linear_ref(x, w, b, "tanh" if c.activation == "gelu_tanh" else "none", upcast=True)


# unit roundoff of the dtype the normalized tile is rounded to (fp32 accumulation throughout)
_EPS = {torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@fuzz(150)
@given(c=norm_linear_cases())
def test_norm_linear_both_backends_match_the_fp64_reference(device, c):
    """Both backends, any layout, within a rounding bound of the fp64 reference: |y - ref| <= 4 u (|h| |W|^T +
    |b| + |ref|) + 1e-5, with h the normalized input (the bound of a dot product whose inputs were rounded once)."""
    x, nw, nb, w, b = _norm_linear_inputs(c)
    note(f"x strides {x.stride()}, w strides {w.stride()}, nw {None if nw is None else nw.stride()}")
    ref = _norm_linear_ref(c, x, nw, nb, w, b)
    # the magnitude the rounding errors scale with: |h| @ |W|^T (+ |bias|) with h the fp64 normalized input
    ident = _norm_linear_ref(
        NormLinearCase(**{**c.__dict__, "activation": None}), x, nw, nb,
        torch.eye(c.K, dtype=torch.float64), None) if c.op != "gelu" else torch.nn.functional.gelu(x.double())
    mag = ident.abs() @ w.double().abs().t() + (b.double().abs() if b is not None else 0) + ref.abs()
    bound = torch.nan_to_num(4 * _EPS[c.dtype] * mag + 1e-5, nan=0.0)  # NaN where the reference is NaN
    before = _snapshot(x, nw, nb, w, b)
    outs = {}
    for backend in BACKENDS:
        args = [None if t is None else t.to(device) for t in (x, nw, nb, w, b)]
        y = _norm_linear_call(c, *args, backend).cpu()
        assert y.shape == (*c.lead, c.N) and y.dtype == c.dtype, f"{backend}: {tuple(y.shape)} {y.dtype}"
        outs[backend] = y
    _assert_unmodified(before, [x, nw, nb, w, b])
    nan_ref = torch.isnan(ref)
    for backend, y in outs.items():
        yd = y.double()
        assert torch.equal(torch.isnan(yd), nan_ref), f"{backend}: NaN where the reference has none (or vice versa)"
        err = torch.where(nan_ref, 0.0, (yd - ref).abs())
        worst = (err - bound).max() if err.numel() else torch.tensor(-1.0)
        assert float(worst) <= 0, f"{backend}: error {float(err.max()):.3g} over the bound (by {float(worst):.3g})"
    assert torch.equal(torch.isnan(outs["triton"]), torch.isnan(outs["torch"]))


@fuzz(60)
@given(c=norm_linear_cases(), gseed=st.integers(0, 2**31 - 1))
def test_norm_linear_gradients_match_on_both_backends(device, c, gseed):
    """fp32 gradients of every input (strided views included: the gradient reaches the caller's view) on both
    backends against the fp64 autograd of the reference."""
    c = NormLinearCase(**{**c.__dict__, "dtype": torch.float32, "eps": c.eps or 1e-5})
    x, nw, nb, w, b = _norm_linear_inputs(c)
    names = ("x", "norm_weight", "norm_bias", "weight", "bias")
    # detach() keeps each view's strides: the leaves have the fuzzed layouts
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, nw, nb, w, b)]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, nw, nb, w, b)]
    gy = torch.randn(*c.lead, c.N, generator=torch.Generator().manual_seed(gseed))
    ref = _norm_linear_ref(c, *ref_leaves)
    used = [i for i, t in enumerate(leaves) if t is not None]
    want = torch.autograd.grad((ref * gy.double()).sum(), [ref_leaves[i] for i in used], allow_unused=True)
    # dx of a norm is rstd * (a difference of terms of size |dh|): fp32 cancellation there is amplified by rstd
    # (up to 1/sqrt(eps) for a constant row, e.g. K = 1)
    x64 = x.double().reshape(-1, c.K)
    ms = x64.var(-1, unbiased=False) if c.op == "layer" else x64.pow(2).mean(-1)
    rstd = float((ms + c.eps).rsqrt().max()) if c.op != "gelu" and x64.numel() else 1.0
    dh = float((gy.double().abs().reshape(-1, c.N) @ w.double().abs()).max()) if gy.numel() and c.K else 0.0
    for backend in BACKENDS:
        args = [None if t is None else t.to(device) for t in leaves]
        y = _norm_linear_call(c, *args, backend)
        got = torch.autograd.grad((y * gy.to(device)).sum(), [leaves[i] for i in used], allow_unused=True)
        for i, g, r in zip(used, got, want):
            r = torch.zeros_like(ref_leaves[i]) if r is None else r
            g = torch.zeros_like(r) if g is None else g.cpu().double()
            assert g.shape == r.shape, f"{backend}: d{names[i]} has shape {tuple(g.shape)}"
            atol = 1e-4 * (1 + float(r.abs().max()) if r.numel() else 1.0)
            if i == 0:  # dx
                atol += 4e-6 * rstd * dh
            elif i == 1:  # dnorm_weight = sum over rows of dh * xhat, xhat rounded at |x| * rstd
                atol += 4e-6 * rstd * dh * float(x64.abs().max()) * x64.shape[0] if x64.numel() else 0.0
            torch.testing.assert_close(g, r, atol=atol, rtol=1e-3,
                                       msg=lambda m, i=i, b=backend: f"{b}: d{names[i]}: {m}")


def _bad_norm_linear_args(K: int, N: int):
    """(op, argument name, replacement value)."""
    nan = float("nan")
    return [
        ("*", "x", st.sampled_from((torch.ones(3, K, dtype=torch.int32), torch.randn(3, K, dtype=torch.float64),
                                    torch.randn(3, K + 1), torch.tensor(1.0), [[1.0] * K]))),
        ("*", "weight", st.sampled_from((torch.randn(N, K + 1), torch.randn(K), torch.randn(N, K, dtype=torch.float16),
                                         torch.randn(N, 0), torch.randn(1, N, K), None))),
        ("*", "bias", st.sampled_from((torch.randn(N + 1), torch.randn(N, 1), torch.randn(N, dtype=torch.float64),
                                       torch.ones(N, dtype=torch.int64), 1.0))),
        (("layer", "rms"), "norm_weight", st.sampled_from((torch.randn(K + 1), torch.randn(1, K),
                                                           torch.ones(K, dtype=torch.int32), torch.randn(K, 2)[:, 0:1],
                                                           torch.empty(K, device="meta"), 1.0))),
        (("layer",), "norm_bias", st.sampled_from((torch.randn(K + 2), torch.ones(K, dtype=torch.bool),
                                                   torch.randn(K, dtype=torch.complex64)))),
        (("layer", "rms"), "eps", st.sampled_from((-1e-5, nan, float("inf"), True, "1e-5", None))),
        (("layer", "rms"), "activation", st.sampled_from(("relu", "GELU", "", 1))),
        (("gelu",), "approximate", st.sampled_from(("erf", "TANH", None, ""))),
        ("*", "backend", st.sampled_from(("cuda", "", None, "Torch"))),
    ]


@fuzz(200)
@given(data=st.data())
def test_norm_linear_bad_arguments_raise_the_same_error_on_both_backends(device, data):
    K = data.draw(st.integers(1, 9))
    N = data.draw(st.integers(1, 5))
    op_name, name, values = data.draw(st.sampled_from(_bad_norm_linear_args(K, N)))
    op = data.draw(st.sampled_from(("layer", "rms", "gelu"))) if op_name == "*" else data.draw(st.sampled_from(op_name))
    value = data.draw(values)
    args = {"x": torch.randn(3, K), "norm_weight": torch.randn(K), "norm_bias": torch.randn(K),
            "weight": torch.randn(N, K), "bias": torch.randn(N), "eps": 1e-5, "activation": None,
            "approximate": "none"}
    if name != "backend":
        args[name] = value
    note(f"{op}({name}={value!r})")
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in args.items()}

    def call(b):
        if op == "layer":
            return layer_norm_linear(a["x"], a["norm_weight"], a["norm_bias"], a["weight"], a["bias"], a["eps"],
                                     a["activation"], backend=b)
        if op == "rms":
            return rms_norm_linear(a["x"], a["norm_weight"], a["weight"], a["bias"], a["eps"], a["activation"],
                                   backend=b)
        return gelu_linear(a["x"], a["weight"], a["bias"], a["approximate"], backend=b)

    errors = {backend: _raises(call, value if name == "backend" else backend) for backend in BACKENDS}
    e_t, e_c = errors["triton"], errors["torch"]
    assert e_t is not None and e_c is not None, f"{op}: {name}={value!r} accepted: triton {e_t!r}, torch {e_c!r}"
    assert type(e_t) is type(e_c), f"{op}: {name}={value!r}: triton raised {e_t!r}, torch {e_c!r}"
    assert isinstance(e_t, (TypeError, ValueError)), f"{op}: {name}={value!r} raised {e_t!r}"
    assert name in str(e_t) and name in str(e_c), f"{op}: the error does not name {name}: {e_t!r} / {e_c!r}"
    event(f"{op}: {name} -> {type(e_t).__name__}")


# =========================================================================== attention


def _heads_tensor(layout: str, B: int, H: int, S: int, D: int, dtype, g):
    """A [B, H, S, D] tensor of the named layout."""
    if layout == "bshd":  # HF hands q/k/v as transposes of [B, S, H, D]
        return torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    if layout == "sliced":  # the head dim sliced out of a wider buffer
        return torch.randn(B, H, S, D + 3, generator=g).to(dtype)[..., 1 : 1 + D]
    if layout == "expanded":  # one kv head broadcast (stride 0)
        return torch.randn(B, 1, S, D, generator=g).to(dtype).expand(B, H, S, D)
    return torch.randn(B, H, S, D, generator=g).to(dtype)


@st.composite
def attention_cases(draw, decode: bool):
    B = draw(st.integers(1, 3))
    H_kv = draw(st.integers(1, 3))
    group = draw(st.sampled_from((2, 1, 3, 1)))
    D = draw(st.sampled_from((16, 8, 4, 17, 3, 32, 33, 2, 64, 1)))
    dtype = draw(st.sampled_from(DTYPES))
    S_q = draw(st.integers(1, 5)) if decode else draw(st.integers(1, 9))
    S_k = draw(st.integers(1, 13))
    # one in ten: a size is 0 (no batch row, no query head -- 0 is a multiple of H_kv --, no query, no key)
    zero = draw(st.sampled_from(("",) * 9 + ("B", "group", "S_k") + (() if decode else ("S_q",))))
    B, group, S_q, S_k = (0 if zero == n else v for n, v in (("B", B), ("group", group), ("S_q", S_q), ("S_k", S_k)))
    layouts = st.sampled_from(("contig", "contig", "bshd", "sliced", "expanded"))
    lq, lk, lv = draw(layouts), draw(layouts), draw(layouts)
    lq = "contig" if lq == "expanded" else lq
    kv_start = None
    if draw(st.booleans()):
        vals = draw(st.lists(st.integers(-2, S_k + 2), min_size=B, max_size=B))
        kv_start = torch.tensor(vals, dtype=draw(st.sampled_from((torch.int32, torch.int64))))
    scale = draw(st.sampled_from((None, None, 0.1, 1.0, 2.5)))
    seed = draw(st.integers(0, 2**31 - 1))
    case = dict(B=B, H_kv=H_kv, H=H_kv * group, D=D, dtype=dtype, S_q=S_q, S_k=S_k, layouts=(lq, lk, lv),
                kv_start=kv_start, scale=scale, seed=seed)
    if decode:
        lens = draw(st.lists(st.integers(0, S_k), min_size=B, max_size=B))
        case["cache_seqlens"] = torch.tensor(lens, dtype=draw(st.sampled_from((torch.int32, torch.int64))))
        case["num_splits"] = draw(st.sampled_from((None, None, 1, 2, 3, 7)))
    else:
        case["causal"] = draw(st.booleans())
        case["q_offset"] = draw(st.one_of(st.integers(-12, 12), st.just(S_k - S_q)))
        case["return_lse"] = draw(st.booleans())
    return case


def _qkv(c):
    g = torch.Generator().manual_seed(c["seed"])
    lq, lk, lv = c["layouts"]
    q = _heads_tensor(lq, c["B"], c["H"], c["S_q"], c["D"], c["dtype"], g)
    k = _heads_tensor(lk, c["B"], c["H_kv"], c["S_k"], c["D"], c["dtype"], g)
    v = _heads_tensor(lv, c["B"], c["H_kv"], c["S_k"], c["D"], c["dtype"], g)
    return q, k, v


def _no_keys(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention over zero keys is: zeros, and lse = -inf."""
    return torch.zeros(q.shape, dtype=torch.float64), torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)


_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _assert_attention_close(got: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, dtype, what: str) -> None:
    """Within 2x PyTorch's own low-precision error (the reference evaluated in the inputs' dtype) + a dtype atol."""
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    if got.numel() == 0:
        return
    ref, got, lowp = ref.double(), got.double(), lowp.double()
    both_inf = torch.isinf(ref) & (got == ref)
    err = torch.where(both_inf, 0.0, (got - ref).abs())
    own = torch.where(torch.isinf(ref) & (lowp == ref), 0.0, (lowp - ref).abs())
    own = torch.nan_to_num(own, nan=0.0, posinf=0.0)
    assert float(err.max()) <= 2 * float(own.max()) + _ATOL[dtype], \
        f"{what}: error {float(err.max()):.3g} > 2 x torch's {float(own.max()):.3g} + {_ATOL[dtype]}"


@fuzz(80)
@given(c=attention_cases(decode=False))
def test_attention_both_backends_match_the_reference(device, c):
    q, k, v = _qkv(c)
    kv_start = c["kv_start"]
    note(f"strides q {q.stride()} k {k.stride()} v {v.stride()}")
    event("no output element" if q.numel() == 0 else "no key" if c["S_k"] == 0 else f"{c['dtype']}, GQA "
          f"{c['H'] // c['H_kv']}, {'causal' if c['causal'] else 'full'}{', kv_start' if kv_start is not None else ''}")
    kw = dict(causal=c["causal"], scale=c["scale"], q_offset=c["q_offset"], return_lse=c["return_lse"])
    if c["S_k"] == 0:  # no key at all (the reference's amax needs one): zeros and lse = -inf by definition
        ref, ref_lse = _no_keys(q)
        lowp, lowp_lse = _no_keys(q)
    else:
        ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), c["causal"], c["scale"], c["q_offset"],
                                     kv_start=kv_start, return_lse=True)
        lowp, lowp_lse = attention_ref(q, k, v, c["causal"], c["scale"], c["q_offset"], kv_start=kv_start,
                                       upcast=False, return_lse=True)
    # which queries see no key: zeros and lse = -inf
    empty = torch.isinf(ref_lse) & (ref_lse < 0)
    before = _snapshot(q, k, v, kv_start)
    for backend in BACKENDS:
        ks = kv_start.to(device) if kv_start is not None else None
        res = attention(q.to(device), k.to(device), v.to(device), kv_start=ks, backend=backend, **kw)
        out, lse = res if c["return_lse"] else (res, None)
        out = out.cpu()
        assert out.shape == q.shape and out.dtype == q.dtype, f"{backend}: {tuple(out.shape)} {out.dtype}"
        assert out.is_contiguous(), f"{backend}: the output is not contiguous (strides {out.stride()})"
        _assert_attention_close(out, ref, lowp, c["dtype"], f"{backend} out")
        assert bool((out[empty] == 0).all()), f"{backend}: a query that sees no key is not zero"
        if lse is not None:
            lse = lse.cpu()
            assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
            assert torch.equal(torch.isneginf(lse), empty), f"{backend}: lse = -inf exactly where no key is seen"
            _assert_attention_close(lse, ref_lse, lowp_lse.float(), c["dtype"], f"{backend} lse")
    _assert_unmodified(before, [q, k, v, kv_start])


@fuzz(70)
@given(c=attention_cases(decode=True))
def test_decode_attention_both_backends_match_the_reference(device, c):
    q, k, v = _qkv(c)
    kv_start, lens = c["kv_start"], c["cache_seqlens"]
    note(f"strides q {q.stride()} k {k.stride()} v {v.stride()}")
    event("no output element" if q.numel() == 0 else "empty cache" if c["S_k"] == 0 else
          f"{c['dtype']}, GQA {c['H'] // c['H_kv']}{', kv_start' if kv_start is not None else ''}")
    if c["S_k"] == 0:
        (ref, ref_lse), (lowp, _) = _no_keys(q), _no_keys(q)
    else:
        ref, ref_lse = decode_attention_ref(q.double(), k.double(), v.double(), lens, c["scale"], kv_start=kv_start,
                                            return_lse=True)
        lowp = decode_attention_ref(q, k, v, lens, c["scale"], kv_start=kv_start, upcast=False)
    empty = torch.isneginf(ref_lse)
    before = _snapshot(q, k, v, kv_start, lens)
    for backend in BACKENDS:
        ks = kv_start.to(device) if kv_start is not None else None
        out = decode_attention(q.to(device), k.to(device), v.to(device), lens.to(device), c["scale"], kv_start=ks,
                               num_splits=c["num_splits"], backend=backend).cpu()
        assert out.shape == q.shape and out.dtype == q.dtype
        assert out.is_contiguous(), f"{backend}: the output is not contiguous (strides {out.stride()})"
        _assert_attention_close(out, ref, lowp, c["dtype"], f"{backend} out")
        assert bool((out[empty] == 0).all()), f"{backend}: a query that sees no key is not zero"
    _assert_unmodified(before, [q, k, v, kv_start, lens])


@fuzz(25)
@given(c=attention_cases(decode=False), gseed=st.integers(0, 2**31 - 1))
def test_attention_gradients_match_on_both_backends(device, c, gseed):
    """fp32 gradients of q, k and v (FlashAttention-2 backward kernels vs SDPA's autograd) against the fp64
    reference; queries that see no key contribute nothing, never NaN."""
    c = {**c, "dtype": torch.float32}
    q, k, v = (t.detach().requires_grad_() for t in _qkv(c))
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(gseed))
    kw = dict(causal=c["causal"], scale=c["scale"], q_offset=c["q_offset"])
    if c["S_k"] and q.numel():
        rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_ref(rq, rk, rv, c["causal"], c["scale"], c["q_offset"], kv_start=c["kv_start"])
        want = torch.autograd.grad((ref * gy.double()).sum(), (rq, rk, rv))
    else:
        want = tuple(torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for backend in BACKENDS:
        ks = c["kv_start"].to(device) if c["kv_start"] is not None else None
        out = attention(q.to(device), k.to(device), v.to(device), kv_start=ks, backend=backend, **kw)
        got = torch.autograd.grad((out * gy.to(device)).sum(), (q, k, v), allow_unused=True)
        for name, g, r in zip("qkv", got, want):
            g = torch.zeros_like(r) if g is None else g.cpu().double()
            assert not torch.isnan(g).any(), f"{backend}: NaN in d{name}"
            torch.testing.assert_close(g, r, atol=1e-4 * (1 + float(r.abs().max()) if r.numel() else 1.0), rtol=1e-3,
                                       msg=lambda m, n=name, b=backend: f"{b}: d{n}: {m}")


def _bad_attention_args(B: int, H: int, S: int, D: int, decode: bool):
    nan = float("nan")
    common = [
        ("q", st.sampled_from((torch.randn(B, H, D), torch.ones(B, H, 1, D, dtype=torch.int32),
                               torch.randn(B, H, 1, D, dtype=torch.float64), torch.randn(B, H, 1, D + 1),
                               torch.randn(B + 1, H, 1, D), torch.randn(B, H + 1, 1, D), "q"))),
        ("scale", st.sampled_from((nan, float("inf"), True, "0.1", torch.tensor(0.5)))),
        ("kv_start", st.sampled_from((torch.zeros(B + 1, dtype=torch.int32), torch.zeros(B), [0] * B,
                                      torch.zeros(B, 1, dtype=torch.int64)))),
        ("backend", st.sampled_from(("cuda", None, "TRITON"))),
    ]
    if decode:
        return common + [
            ("q", st.just(torch.randn(B, H, 17, D))),
            ("k_cache", st.sampled_from((torch.randn(B, 1, S, D, dtype=torch.float16), torch.randn(B, 1, S, D + 1),
                                         torch.randn(B + 1, 1, S, D), torch.randn(B, 0, S, D),
                                         torch.randn(B, 3, S, D)))),
            ("cache_seqlens", st.sampled_from((torch.tensor([S + 1] * B), torch.tensor([-1] * B),
                                               torch.zeros(B + 1, dtype=torch.int32), torch.zeros(B),
                                               torch.zeros(B, dtype=torch.int16), [0] * B))),
            ("num_splits", st.sampled_from((0, -1, True, 1.5, "2"))),
        ]
    return common + [
        ("k", st.sampled_from((torch.randn(B, 1, S, D, dtype=torch.float16), torch.randn(B, 1, S, D + 1),
                               torch.randn(B, 1, S, D)[..., :0], torch.randn(B, 3, S, D)))),
        ("v", st.sampled_from((torch.randn(B, 1, S + 1, D), torch.randn(B, 1, S, D, dtype=torch.bfloat16)))),
        ("q_offset", st.sampled_from((1.0, True, 2**30, -(2**31), "0", None))),
    ]


@fuzz(200)
@given(data=st.data())
def test_attention_bad_arguments_raise_the_same_error_on_both_backends(device, data):
    decode = data.draw(st.booleans())
    B, H, S = data.draw(st.integers(1, 3)), 2, data.draw(st.integers(1, 6))
    D = data.draw(st.sampled_from((4, 8)))
    name, values = data.draw(st.sampled_from(_bad_attention_args(B, H, S, D, decode)))
    value = data.draw(values)
    args = {"q": torch.randn(B, H, 1, D), "k": torch.randn(B, 2, S, D), "v": torch.randn(B, 2, S, D),
            "scale": None, "kv_start": None, "q_offset": 0, "num_splits": None,
            "cache_seqlens": torch.full((B,), S, dtype=torch.int32)}
    key = {"k_cache": "k"}.get(name, name)
    if name != "backend":
        args[key] = value
    if decode and name == "k_cache":
        args["v"] = value  # a consistent pair, wrong against q
    if not decode and name == "k" and isinstance(value, torch.Tensor) and value.dtype == torch.float32 \
            and value.shape[1] == 3:
        args["v"] = value  # 3 kv heads for 2 query heads
    note(f"{'decode_attention' if decode else 'attention'}({name}={value!r})")
    a = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}

    def call(b):
        if decode:
            return decode_attention(a["q"], a["k"], a["v"], a["cache_seqlens"], a["scale"], kv_start=a["kv_start"],
                                    num_splits=a["num_splits"], backend=b)
        return attention(a["q"], a["k"], a["v"], True, a["scale"], a["q_offset"], kv_start=a["kv_start"], backend=b)

    errors = {backend: _raises(call, value if name == "backend" else backend) for backend in BACKENDS}
    e_t, e_c = errors["triton"], errors["torch"]
    assert e_t is not None and e_c is not None, f"{name}={value!r} accepted: triton {e_t!r}, torch {e_c!r}"
    assert type(e_t) is type(e_c), f"{name}={value!r}: triton raised {e_t!r}, torch {e_c!r}"
    assert isinstance(e_t, (TypeError, ValueError)), f"{name}={value!r} raised {e_t!r}"
    shown = "heads" if name in ("k", "k_cache") and "heads" in str(e_t) else name
    assert shown in str(e_t) and shown in str(e_c), f"the error does not name {name}: {e_t!r} / {e_c!r}"
    event(f"{name} -> {type(e_t).__name__}")
