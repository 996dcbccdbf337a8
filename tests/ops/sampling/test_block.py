"""sample_block / block_probs / select_positions / transfer_schedule (issue 14): the Triton kernel (interpreted here,
compiled under make gpu-check) and the PyTorch path against the plain references in
decodekit.ops.sampling.reference (ported from Dream's sample_tokens, SDAR's sampler, LLaDA's generate.py, Fast-dLLM's
threshold rule and SDAR's entropy-bounded rule).

Exact at temperature 0 (tokens, confidences within fp32 rounding, committed positions); exact kept sets at T > 0;
statistical draws; awkward L and V; all-masked / none-masked rows; NaN / +inf / all -inf positions; bad arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import decodekit
from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import block_probs, sample_block, select_positions, transfer_schedule
from decodekit.ops.sampling.reference import (
    block_probs_ref,
    sample_block_ref,
    select_positions_ref,
    transfer_schedule_ref,
)

BACKENDS = ["triton", "torch"]
ORDERS = ["top_k_first", "top_p_first"]
CONFS = ["prob", "raw_prob", "margin", "neg_entropy"]


def _block(B: int, L: int, V: int, *, scale: float = 3.0, seed: int = 0, p_mask: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, V, generator=g) * scale
    masked = torch.rand(B, L, generator=g) < p_mask
    ids = torch.randint(0, V, (B, L), generator=g)
    return x, masked, ids


def _garbage_check(tokens: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Unmasked positions keep their input token (or -1) and get confidence -inf."""
    keep = ids if ids is not None else torch.full_like(tokens, -1)
    assert torch.equal(tokens.cpu()[~masked], keep[~masked])
    assert bool((conf.cpu()[~masked] == float("-inf")).all())


# --------------------------------------------------------------------------- kept sets vs the reference

CASES = [  # temperature, top_k, top_p
    (1.0, 0, 1.0),
    (0.7, 20, 1.0),
    (1.3, 0, 0.8),
    (0.8, 30, 0.9),
    (1.0, 5, 0.5),
    (0.5, 200, 0.95),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_kept_set_matches_reference(device, backend, order, temperature, top_k, top_p):
    x, masked, _ = _block(2, 3, 257, seed=hash((temperature, top_k, top_p)) % 1000)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, order=order)
    with count_launches() as launches:
        got = block_probs(x.to(device), masked.to(device), backend=backend, **kw).cpu()
    assert (launches["block_sample"] == 1) == (backend == "triton")
    ref = block_probs_ref(x, **kw)
    m = masked
    assert torch.equal(got[m] > 0, ref[m] > 0), f"kept sets differ in {int(((got[m] > 0) != (ref[m] > 0)).sum())}"
    torch.testing.assert_close(got[m].double(), ref[m], atol=2e-6, rtol=1e-4)
    assert bool((got[~m] == 0).all())


def test_orders_differ_where_they_should():
    """Dream's order (top-p on the full distribution) vs Hugging Face's (top-p renormalized over the top-k set):
    with top-k 2 of p = [.4, .3, .2, .1] and top-p .6, Dream keeps {0, 1} and HF keeps {0, 1} too; with top-p .5
    HF keeps {0, 1} (.4 / .7 < .5) while Dream keeps {0, 1} (.4 < .5) -- and with top-p .45 they split."""
    x = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))[None, None, :]
    m = torch.ones(1, 1, dtype=torch.bool)
    for be in BACKENDS:
        hf = block_probs(x, m, top_k=2, top_p=0.45, order="top_k_first", backend=be)[0, 0]
        dream = block_probs(x, m, top_k=2, top_p=0.45, order="top_p_first", backend=be)[0, 0]
        # HF: renormalized [.571, .429]: .571 >= .45 -> only token 0; Dream: .4 < .45 -> tokens 0 and 1
        assert torch.equal(hf > 0, torch.tensor([True, False, False, False])), be
        assert torch.equal(dream > 0, torch.tensor([True, True, False, False])), be
        torch.testing.assert_close(dream[:2], torch.tensor([4 / 7, 3 / 7]))


# --------------------------------------------------------------------------- temperature 0: exact

DTYPES = [(torch.float32, 2e-6, 1e-5), (torch.float16, 2e-6, 1e-5), (torch.bfloat16, 2e-6, 1e-5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("confidence", CONFS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,L,V", [(2, 4, 131), (1, 1, 1), (1, 5, 2)])
def test_greedy_is_exact(device, backend, confidence, dtype, atol, rtol, B, L, V):
    x, masked, ids = _block(B, L, V, seed=B * 100 + V)
    x = x.to(dtype)  # the reference reads the same rounded values
    kw = dict(temperature=0.0, top_k=min(5, V), top_p=0.9, order="top_k_first")
    tok, conf = sample_block(x.to(device), masked.to(device), input_ids=ids.to(device), confidence=confidence,
                             seed=3, backend=backend, **kw)
    rt, rc = sample_block_ref(x, masked, ids, confidence=confidence, **kw)
    assert tok.dtype == torch.int64 and conf.dtype == torch.float32 and tok.shape == conf.shape == (B, L)
    assert torch.equal(tok.cpu(), rt)
    torch.testing.assert_close(conf.cpu().double(), rc, atol=atol, rtol=rtol, equal_nan=True)
    _garbage_check(tok, conf, masked, ids)
    # the committed positions follow exactly (LLaDA's k, Fast-dLLM's threshold)
    for sel in (dict(k=2), dict(threshold=0.3)):
        assert torch.equal(select_positions(conf, masked.to(device), **sel).cpu(),
                           select_positions_ref(rc.float(), masked, **sel)), sel


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_confidences_by_hand(backend):
    """A position with p = [.5, .25, .125, .125] (logits log p, T = 0): every confidence, by hand."""
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    x = torch.log(p)[None, None, :].expand(1, 2, 4).contiguous()
    m = torch.tensor([[True, False]])
    expect = {"prob": 0.5, "raw_prob": 0.5, "margin": 0.25, "neg_entropy": float((p * p.log()).sum())}
    for conf, want in expect.items():
        tok, c = sample_block(x, m, temperature=0.0, confidence=conf, backend=backend)
        assert tok.tolist() == [[0, -1]]
        assert c[0, 0].item() == pytest.approx(want, abs=1e-6), conf
        assert c[0, 1].item() == float("-inf")
    # top-k 2 renormalizes: prob 2/3, margin 1/3, raw_prob is still the unfiltered .5
    for conf, want in {"prob": 2 / 3, "margin": 1 / 3, "raw_prob": 0.5}.items():
        _, c = sample_block(x, m, temperature=0.0, top_k=2, confidence=conf, backend=backend)
        assert c[0, 0].item() == pytest.approx(want, abs=1e-6), conf


# --------------------------------------------------------------------------- statistics at T > 0

PROBS = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])
STAT_CASES = [  # kwargs, kept tokens (by hand)
    (dict(top_p=0.7), 3),  # exclusive masses 0, .30, .55, .75 -> 3
    (dict(top_k=2), 2),
    (dict(temperature=2.0, top_k=4, top_p=0.8, order="top_k_first"), None),  # computed from the reference
    (dict(top_k=3, top_p=0.5, order="top_p_first"), 2),  # full-distribution masses 0, .30, .55 -> 2
]


@pytest.mark.parametrize("backend,N", [("torch", 40_000), ("triton", 64)])
@pytest.mark.parametrize("kw,n_kept", STAT_CASES)
def test_frequencies_and_prob_confidence(device, backend, N, kw, n_kept):
    x = torch.log(PROBS)[None, None, :].expand(2, N // 2, -1).contiguous()
    m = torch.ones(2, N // 2, dtype=torch.bool)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    tok, conf = sample_block(x.to(device), m.to(device), seed=seeds.to(device), backend=backend, **kw)
    tok, conf = tok.cpu().flatten(), conf.cpu().flatten()
    ref = block_probs_ref(x[:1, :1], **kw)[0, 0]
    n = int((ref > 0).sum()) if n_kept is None else n_kept
    assert int((ref > 0).sum()) == n
    counts = torch.bincount(tok, minlength=len(PROBS)).double()
    assert counts[n:].sum() == 0, counts.tolist()
    expected = ref[:n] * N
    chi2 = float(((counts[:n] - expected) ** 2 / expected).sum())
    assert chi2 < 40.0, (chi2, counts.tolist(), expected.tolist())
    # "prob" confidence: the drawn token's probability under the filtered distribution
    torch.testing.assert_close(conf.double(), ref[tok], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,L", [("torch", 64), ("triton", 16)])
def test_raw_prob_and_random_confidence(backend, L):
    x = torch.log(PROBS)[None, None, :].expand(1, L, -1).contiguous()
    m = torch.ones(1, L, dtype=torch.bool)
    tok, conf = sample_block(x, m, temperature=0.7, top_k=3, confidence="raw_prob", seed=5, backend=backend)
    torch.testing.assert_close(conf.double(), PROBS.double()[tok], atol=1e-6, rtol=1e-5)  # untempered, unfiltered
    _, r1 = sample_block(x, m, confidence="random", seed=5, backend=backend)
    _, r2 = sample_block(x, m, confidence="random", seed=5, backend=backend)
    _, r3 = sample_block(x, m, confidence="random", seed=6, backend=backend)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert bool(((r1 >= 0) & (r1 < 1)).all()) and len(set(r1.flatten().tolist())) == L


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    x, m, _ = _block(3, 4, 50, p_mask=1.0)
    a = sample_block(x, m, seed=7, backend=backend)[0]
    assert torch.equal(a, sample_block(x, m, seed=7, backend=backend)[0])
    seeds = torch.tensor([4, 5, 6])
    full = sample_block(x, m, seed=seeds, backend=backend)[0]
    alone = sample_block(x[1:2], m[1:2], seed=seeds[1:2], backend=backend)[0]  # per-row seeds: batch invariant
    assert torch.equal(full[1:2], alone)
    assert not torch.equal(sample_block(x, m, seed=8, backend=backend)[0], a)


# --------------------------------------------------------------------------- awkward inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_and_none_masked_rows_bad_positions(backend):
    x, _, ids = _block(3, 5, 33)
    x[0, 1] = float("nan")
    x[0, 2, 7] = float("inf")
    x[0, 3] = float("-inf")
    x[0, 4, :] = float("-inf")
    x[0, 4, 9] = 1.0  # one finite token: always drawn
    masked = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, True]])
    garbage = x.clone()
    tok, conf = sample_block(x, masked, input_ids=ids, temperature=0.9, top_p=0.9, seed=1, backend=backend)
    torch.testing.assert_close(x, garbage, rtol=0, atol=0, equal_nan=True)  # the caller's logits are untouched
    assert tok[0, 1:4].tolist() == [-1, -1, -1] and bool(torch.isnan(conf[0, 1:4]).all())
    assert tok[0, 4].item() == 9 and conf[0, 4].item() == pytest.approx(1.0)
    assert torch.equal(tok[1], ids[1]) and bool((conf[1] == float("-inf")).all())
    _garbage_check(tok, conf, masked, ids)
    with pytest.raises(ValueError, match=r"sample_block: logits at masked positions \[\[0, 1\]"):
        sample_block(x, masked, check=True, backend=backend)
    # NaN confidences are never committed; an all-unmasked row commits nothing
    assert not bool(select_positions(conf, masked, k=5)[0, 1:4].any())
    assert not bool(select_positions(conf, masked, threshold=-1.0)[1].any())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's NumPy, on purpose
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_and_overflowing_temperature(backend):
    big = torch.randn(2, 9, 300)
    x = big[:, 1:8, :257]  # batch / position strides of a larger buffer, last dim contiguous
    m = torch.ones(2, 7, dtype=torch.bool)
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    torch.testing.assert_close(block_probs(x, m, backend=backend, **kw), block_probs(x.contiguous(), m, **kw,
                                                                                      backend="torch"))
    tok, conf = sample_block(x, m, temperature=1e-38, top_k=3, confidence="margin", backend=backend)
    assert torch.equal(tok, x.argmax(dim=-1)) and bool((conf == 1.0).all())  # logits / T overflows: T -> 0


def test_empty_shapes():
    for shape in [(0, 4, 10), (2, 0, 10)]:
        x = torch.randn(shape)
        tok, conf = sample_block(x, torch.ones(shape[:2], dtype=torch.bool), backend="torch")
        assert tok.shape == conf.shape == shape[:2]


def test_bad_arguments():
    x = torch.randn(2, 3, 10)
    m = torch.ones(2, 3, dtype=torch.bool)
    cases = [
        (dict(logits=x[0]), ValueError, "logits"),
        (dict(logits=x.long()), TypeError, "logits"),
        (dict(masked=m.int()), TypeError, "masked"),
        (dict(masked=m[:, :2]), ValueError, "masked"),
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "input_ids"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=1.5), TypeError, "top_k"),
        (dict(order="dream"), ValueError, "order"),
        (dict(confidence="entropy"), ValueError, "confidence"),
        (dict(confidence=None), TypeError, "confidence"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(temperature=torch.tensor([0.5, -1.0])), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(logits=x.transpose(1, 2)), ValueError, "logits|masked"),
    ]
    for kw, exc, name in cases:
        args = dict(logits=x, masked=m)
        args.update(kw)
        with pytest.raises(exc, match=f"sample_block: ({name})"):
            sample_block(args.pop("logits"), args.pop("masked"), **args)


# --------------------------------------------------------------------------- selection and the schedule


def test_transfer_schedule_matches_llada():
    m = torch.rand(5, 40) < torch.linspace(0, 1, 5)[:, None]
    for steps in (1, 3, 7, 64):
        got = transfer_schedule(m, steps)
        assert torch.equal(got, transfer_schedule_ref(m, steps))
        assert torch.equal(got.sum(dim=1), m.sum(dim=1))
    assert transfer_schedule(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="steps"):
        transfer_schedule(m, 0)
    with pytest.raises(TypeError, match="masked"):
        transfer_schedule(m.float(), 2)


SELECTIONS = [
    dict(k=3),
    dict(k=0),
    dict(k=100),
    dict(k="per_row"),
    dict(threshold=0.4),
    dict(threshold=2.0),  # nothing reaches it: the best one alone
    dict(entropy_bound=1.0),
    dict(entropy_bound=0.0),
    dict(k=2, block=(4, 12)),
    dict(threshold=0.1, block=(0, 0)),
    dict(entropy_bound=3.0, block=(10, 17)),
]


@pytest.mark.parametrize("sel", SELECTIONS)
@pytest.mark.parametrize("B,L", [(1, 1), (3, 17), (2, 64)])
def test_select_positions_matches_reference(sel, B, L):
    g = torch.Generator().manual_seed(B * L)
    conf = torch.rand(B, L, generator=g).round(decimals=1)  # many ties: the lower position first
    masked = torch.rand(B, L, generator=g) < 0.6
    conf[0, 0] = float("nan")
    sel = dict(sel)
    if sel.get("k") == "per_row":
        sel["k"] = torch.arange(B) * 2 + 1
    if "entropy_bound" in sel:
        conf = -conf * 2  # neg_entropy confidences
    if "block" in sel:
        sel["block"] = (min(sel["block"][0], L), min(sel["block"][1], L))
    got = select_positions(conf, masked, **sel)
    assert got.dtype == torch.bool and got.shape == (B, L)
    assert torch.equal(got, select_positions_ref(conf, masked, **sel))
    assert not bool((got & ~masked).any()) and not bool(got[0, 0])


def test_select_positions_rules_by_hand():
    conf = torch.tensor([[0.9, 0.5, 0.95, 0.5, 0.1, 0.99]])
    masked = torch.tensor([[True, True, True, True, True, False]])
    assert select_positions(conf, masked, k=2).tolist() == [[True, False, True, False, False, False]]
    assert select_positions(conf, masked, k=3).tolist() == [[True, True, True, False, False, False]]  # tie: lower
    assert select_positions(conf, masked, threshold=0.92).tolist() == [[False, False, True, False, False, False]]
    assert select_positions(conf, masked, threshold=0.99).tolist() == [[False, False, True, False, False, False]]
    assert select_positions(conf, masked, k=2, block=(1, 4)).tolist() == [[False, True, True, False, False, False]]
    ent = torch.tensor([[-0.2, -0.5, -0.1, -0.3, -2.0, 0.0]])  # entropies .2 .5 .1 .3 2.0
    # ascending: .1 (2), .2 (0), .3 (3), .5 (1): cumulative .1 .3 .6 1.1 -> bound .65 takes three
    assert select_positions(ent, masked, entropy_bound=0.65).tolist() == [[True, False, True, True, False, False]]
    assert select_positions(ent, masked, entropy_bound=0.05).tolist() == [[False, False, True, False, False, False]]


def test_select_positions_bad_arguments():
    c = torch.rand(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    cases = [
        (dict(), ValueError, "exactly one"),
        (dict(k=1, threshold=0.5), ValueError, "exactly one"),
        (dict(k=-1), ValueError, "k"),
        (dict(k=1.0), TypeError, "k"),
        (dict(k=torch.tensor([1.0, 2.0])), TypeError, "k"),
        (dict(k=torch.tensor([1, 2, 3])), ValueError, "k"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(entropy_bound="1"), TypeError, "entropy_bound"),
        (dict(k=1, block=(3, 2)), ValueError, "block"),
        (dict(k=1, block=(0, 6)), ValueError, "block"),
        (dict(k=1, block=3), TypeError, "block"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=f"select_positions: .*{msg}"):
            select_positions(c, m, **kw)
    with pytest.raises(TypeError, match="confidence"):
        select_positions(c.long(), m, k=1)
    with pytest.raises(ValueError, match="masked"):
        select_positions(c, m[:, :3], k=1)


def test_exported_from_decodekit():
    for name in ("sample_block", "select_positions", "transfer_schedule", "rwkv_sample_logits",
                 "rwkv_sampling_probs"):
        assert callable(getattr(decodekit, name))
    assert hasattr(torch.ops.decodekit, "sample_block") and hasattr(torch.ops.decodekit, "rwkv_sample_logits")


# --------------------------------------------------------------------------- fuzz: both backends agree


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: it reruns the interpreted kernel
@given(
    B=st.integers(1, 2), L=st.integers(1, 5), V=st.sampled_from([1, 2, 3, 17, 64, 129]),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]), top_k=st.integers(0, 8),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.2]), order=st.sampled_from(ORDERS),
    confidence=st.sampled_from(CONFS), scale=st.sampled_from([0.0, 1.0, 4.0]), data=st.data(),
)
def test_fuzz_backends_agree(B, L, V, temperature, top_k, top_p, order, confidence, scale, data):
    seed = data.draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, V, generator=g) * scale).round(decimals=1)  # ties on purpose
    masked = torch.rand(B, L, generator=g) < 0.8
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, order=order)
    probs = {be: block_probs(x, masked, backend=be, **kw) for be in BACKENDS}
    ref = block_probs_ref(x, **kw).float()
    # exact kept sets, except where the reference's own top-p decision is within rounding of its threshold (a greedy
    # position's distribution is the one-hot it draws from; its confidences are checked against the reference below)
    for be, pr in probs.items():
        diff = ((pr > 0) != (ref > 0)) & masked[..., None] if temperature > 0 else torch.zeros(1, dtype=torch.bool)
        assert not bool((pr[~masked] != 0).any())
        if bool(diff.any()):
            assert top_p < 1.0, (be, diff.nonzero().tolist())
            cum = ref.sort(dim=-1, descending=True).values.cumsum(dim=-1)
            assert bool(((cum - top_p).abs() < 1e-5).any()), (be, diff.nonzero().tolist())
        torch.testing.assert_close(pr.sum(dim=-1)[masked], torch.ones(int(masked.sum())), atol=1e-5, rtol=0)
    for be in BACKENDS:
        tok, conf = sample_block(x, masked, confidence=confidence, seed=seed, backend=be, **kw)
        assert bool((probs[be][masked].gather(-1, tok[masked][:, None]) > 0).all())  # drawn from the kept set
        if temperature == 0:
            assert torch.equal(tok, x.argmax(dim=-1).where(masked, -1))
        if confidence == "prob":
            torch.testing.assert_close(conf[masked], probs[be][masked].gather(-1, tok[masked][:, None])[:, 0]
                                       if temperature > 0 else conf[masked])
        assert bool(torch.isfinite(conf[masked]).all()) and bool((conf[~masked] == float("-inf")).all())
    if temperature == 0:  # greedy: both backends give the reference's tokens and confidences
        rt, rc = sample_block_ref(x, masked, confidence=confidence, **kw)
        for be in BACKENDS:
            tok, conf = sample_block(x, masked, confidence=confidence, backend=be, **kw)
            assert torch.equal(tok, rt)
            torch.testing.assert_close(conf.double(), rc, atol=2e-6, rtol=1e-5)
    assert math.isfinite(float(ref.sum()))


@pytest.mark.parametrize("confidence", ["prob", "margin", "neg_entropy", "raw_prob"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 0.9), (0.7, 3, 1.0), (0.0, 7, 0.5), (1.3, 1, 0.9)])
@pytest.mark.parametrize("B, L, V", [(2, 5, 97), (1, 3, 1000)])
def test_candidate_path_equals_the_whole_row_path(B, L, V, temperature, top_k, top_p, confidence, monkeypatch):
    """The PyTorch path's top-k-first shortcut (filters, weights and draw on the k candidates) draws the tokens of
    the whole-row path and gives its confidences; coarse logits make tie groups at the k-th value (the shortcut
    then steps aside)."""
    import decodekit.ops.sampling.cpu as cpu

    gen = torch.Generator().manual_seed(V + top_k)
    x = (torch.randn(B, L, V, generator=gen) * 3).round(decimals=1)
    masked = torch.rand(B, L, generator=gen) < 0.8
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence, seed=5, backend="torch")
    calls = []
    real = cpu._block_candidates
    monkeypatch.setattr(cpu, "_block_candidates", lambda *a: calls.append(1) or real(*a))
    tok, conf = decodekit.sample_block(x, masked, **kw)
    monkeypatch.setattr(cpu, "_block_candidates", lambda *a: None)
    tok_full, conf_full = decodekit.sample_block(x, masked, **kw)
    greedy_raw = temperature == 0.0 and confidence == "raw_prob"  # nothing filtered: neither path runs
    assert bool(calls) != greedy_raw and torch.equal(tok, tok_full)
    torch.testing.assert_close(conf, conf_full, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("confidence", ["prob", "margin", "neg_entropy", "raw_prob"])
@pytest.mark.parametrize("temperature, top_k, top_p, taken", [
    (0.2, 0, 0.95, True),  # Dream's step on peaked rows: the 65 candidates hold every kept set
    (0.3, 5, 0.9, True),  # top-p then top-k
    (0.3, 200, 0.9, True),  # a k past the list keeps every candidate
    (1.0, 0, 0.95, False),  # flat rows: the kept sets run past the list, the whole-row path runs
])
@pytest.mark.parametrize("B, L, V", [(2, 5, 97), (1, 3, 1000)])
def test_top_p_first_candidates_equal_the_whole_row_path(B, L, V, temperature, top_k, top_p, taken, confidence,
                                                         monkeypatch):
    """The PyTorch path's top-p-first shortcut (the kept set found among each row's 65 largest values, with the
    full row's mass as normalizer) draws the whole-row path's tokens and gives its confidences; coarse logits make
    ties. On rows whose kept set may run past the list it steps aside."""
    import decodekit.ops.sampling.cpu as cpu

    gen = torch.Generator().manual_seed(V + top_k)
    x = (torch.randn(B, L, V, generator=gen) * 3).round(decimals=1)
    masked = torch.rand(B, L, generator=gen) < 0.8
    masked[0, 0] = True
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence, order="top_p_first", seed=5,
              backend="torch")
    results = []
    real = cpu._block_topp_candidates
    monkeypatch.setattr(cpu, "_block_topp_candidates", lambda *a: results.append(real(*a)) or results[-1])
    tok, conf = decodekit.sample_block(x, masked, **kw)
    monkeypatch.setattr(cpu, "_block_topp_candidates", lambda *a: None)
    tok_full, conf_full = decodekit.sample_block(x, masked, **kw)
    assert len(results) == 1
    if taken:
        assert results[0] is not None
    elif V > 10 * cpu._BLOCK_TOPP_CAND:  # a flat row of 1000 tokens keeps more than 65 at top-p 0.95
        assert results[0] is None
    assert torch.equal(tok, tok_full)
    torch.testing.assert_close(conf, conf_full, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_finite_count_counts_every_row():
    """The PyTorch path's count of finite logits (the min-first shortcut) against ``isfinite(...).sum``."""
    import decodekit.ops.sampling.cpu as cpu

    gen = torch.Generator().manual_seed(11)
    z = torch.randn(7, 301, generator=gen)
    z[1, ::3] = float("-inf")
    z[2] = float("-inf")
    z[3, 5] = float("nan")
    z[4, 7] = float("inf")
    z[5, -1] = float("-inf")
    assert torch.equal(cpu._finite_count(z), torch.isfinite(z).sum(dim=1))
