"""Sampler tests: the Triton kernels (interpreted here, compiled under make gpu-check) and the PyTorch path
against the plain references in decodekit.ops.sampling.reference."""

from __future__ import annotations

import pytest
import torch

from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import sample, sample_logits, sample_logits_probs, sampler_simple_batch, sampling_probs
from decodekit.ops.sampling.reference import (
    sample_logits_ref,
    sampler_simple_batch_ref,
    sampling_probs_ref,
)

BACKENDS = ["triton", "torch"]


def _logits(B: int, V: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def _assert_same_kept(got: torch.Tensor, ref: torch.Tensor, atol: float = 1e-6) -> None:
    got = got.cpu()
    assert torch.equal(got > 0, ref > 0), f"kept sets differ in {int(((got > 0) != (ref > 0)).sum())} places"
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(got.shape[0]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- kept sets vs the references

HF_CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (1.0, 20, 1.0, 0.0),
    (0.7, 0, 0.9, 0.0),
    (1.3, 50, 0.8, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 30, 0.95, 0.02),
    (0.5, 3000, 0.5, 0.0),
    (0.0, 0, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", HF_CASES)
def test_sampling_probs_hf_matches_reference(device, backend, temperature, top_k, top_p, min_p):
    x = _logits(3, 3001)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    with count_launches() as launches:
        got = sampling_probs(x.to(device), backend=backend, **kw)
    assert (launches["sampling_race"] == 1) == (backend == "triton")
    _assert_same_kept(got, sampling_probs_ref(x, **kw))


TTS_CASES = [(1.0, 0.95, 20), (1.0, 0.95, 80), (1.0, 0.85, 0), (0.7, 0.5, 10), (1.2, 0.0, 30), (0.0, 0.85, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_p,top_k", TTS_CASES)
def test_sample_logits_kept_set_matches_tts_reference(device, backend, temperature, top_p, top_k):
    x = _logits(3, 3001, seed=1)
    with count_launches() as launches:
        got = sample_logits_probs(x.to(device), temperature, top_p, top_k, backend=backend)
    assert (launches["sampling_probs"] == 1) == (backend == "triton")
    _assert_same_kept(got, sample_logits_ref(x, temperature, top_p, top_k, return_probs=True))
    tok = sample_logits(x.to(device), temperature, top_p, top_k, seed=3, backend=backend)
    assert tok.shape == (3, 1) and tok.dtype == torch.int64
    assert bool((got.cpu().gather(1, tok.cpu()) > 0).all())  # drawn tokens are in the kept set


@pytest.mark.parametrize("V", [1, 7, 1023, 32000])
def test_awkward_vocab_sizes(device, V):
    x = _logits(2, V, seed=V)
    kw = dict(temperature=0.9, top_k=min(5, V), top_p=0.9)
    with count_launches() as launches:
        got = sampling_probs(x.to(device), backend="triton", **kw)
        tok, lp = sample(x[:1].to(device), seed=1, return_logprobs=True, backend="triton", **kw)
    assert launches["sampling_stats"] == 2
    ref = sampling_probs_ref(x, **kw)
    _assert_same_kept(got, ref)
    assert tok.shape == (1,) and 0 <= int(tok) < V
    assert float(lp) == pytest.approx(float(torch.log(ref[0, int(tok)])), abs=1e-5)


def test_largest_vocab_one_row(device):
    x = _logits(1, 128256, scale=4.0, seed=7)
    kw = dict(temperature=0.8, top_k=30, top_p=0.8)
    got = sampling_probs(x.to(device), backend="triton", **kw)
    _assert_same_kept(got, sampling_probs_ref(x, **kw))
    for backend in BACKENDS:
        tok = sample(x.to(device), seed=5, backend=backend, **kw)
        assert float(got.cpu()[0, int(tok)]) > 0


# --------------------------------------------------------------------------- the draw: same distribution on both paths


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=20),
        dict(top_p=0.9, temperature=1.4),
        dict(top_k=40, top_p=0.8, min_p=0.01, temperature=0.7),
        dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, top_k=25),
    ],
)
def test_both_backends_draw_kept_tokens_with_consistent_logprobs(device, kw):
    """Each backend draws only kept tokens, and reports their log-probability under the reference distribution.
    (The two backends use different random streams: same distribution, not the same tokens.)"""
    B, V = 12, 1500
    x = _logits(B, V, seed=2)
    if "repetition_penalty" in kw:
        kw = dict(kw, token_counts=torch.randint(0, 3, (B, V), generator=torch.Generator().manual_seed(0)))
    seeds = torch.arange(B, dtype=torch.int64) * 1000 + 17
    kd = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with count_launches() as launches:
        tk, lk = sample(x.to(device), seed=seeds.to(device), return_logprobs=True, backend="triton", **kd)
    assert launches["sampling_race"] == 1 and launches["sampling_finalize"] == 1
    tt, lt = sample(x, seed=seeds, return_logprobs=True, backend="torch", **kw)
    probs = sampling_probs_ref(x, **kw)
    for tok, lp in ((tk.cpu(), lk.cpu()), (tt, lt)):
        p = probs.gather(1, tok[:, None]).squeeze(1)
        assert bool((p > 0).all())
        torch.testing.assert_close(lp, torch.log(p), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(top_k=50, top_p=0.95), dict(top_p=0.9), dict(min_p=0.05)])
def test_seeds_batch_invariance_and_determinism(device, backend, filters):
    B, V = 6, 800
    x = _logits(B, V, seed=4).to(device)
    seeds = torch.tensor([5, 9, 11, 5, 70, 3], dtype=torch.int64, device=device)
    kw = dict(filters, backend=backend)
    full = sample(x, seed=seeds, **kw)
    assert torch.equal(full, sample(x, seed=seeds, **kw))  # deterministic
    perm = torch.tensor([4, 0, 5, 2], device=device)
    assert torch.equal(sample(x[perm], seed=seeds[perm], **kw), full[perm])  # row position / batch size
    # a shared int seed keys rows by their index: a prefix of the batch draws the same tokens
    shared = sample(x, seed=123, **kw)
    assert torch.equal(sample(x[:3], seed=123, **kw), shared[:3])
    outs = {tuple(sample(x, seed=s, **kw).tolist()) for s in range(2)}
    assert len(outs) > 1  # different seeds give different draws


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_uses_torch_generator(device, backend):
    x = _logits(4, 300).to(device)
    torch.manual_seed(1)
    a = sample(x, backend=backend)
    torch.manual_seed(1)
    b = sample(x, backend=backend)
    assert torch.equal(a, b)


def test_sampler_simple_batch(device):
    B, V = 5, 900
    x = _logits(B, V, seed=8)
    with count_launches() as launches:
        k = sampler_simple_batch(x.to(device), noise=1.5, temp=0.9, seed=4, backend="triton")
    assert launches["sampling_race"] == 1
    t = sampler_simple_batch(x, noise=1.5, temp=0.9, seed=4, backend="torch")
    assert k.shape == t.shape == (B, 1)
    z = x / 0.9
    for tok in (k.cpu(), t):  # a token can only beat the max by the noise
        assert bool((z.gather(1, tok) >= z.max(dim=1, keepdim=True).values - 1.5).all())
    for backend in BACKENDS:
        greedy = sampler_simple_batch(x.to(device), noise=0.0, seed=0, backend=backend)
        assert torch.equal(greedy.cpu(), sampler_simple_batch_ref(x, noise=0.0))


# --------------------------------------------------------------------------- parameters, penalties, precision


def test_per_row_parameters(device):
    B, V = 4, 2000
    x = _logits(B, V, seed=3)
    kw = dict(
        temperature=torch.tensor([0.7, 1.0, 0.0, 1.5]),
        top_k=torch.tensor([10, 0, 5, 100]),
        top_p=torch.tensor([1.0, 0.8, 0.9, 0.7]),
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.02]),
    )
    got = sampling_probs(x.to(device), backend="triton", **{k: v.to(device) for k, v in kw.items()})
    ref = sampling_probs_ref(x, **kw)
    _assert_same_kept(got, ref)
    for r in range(B):  # each row as if alone with scalar parameters
        row_kw = {k: (v[r].item()) for k, v in kw.items()}
        row_kw["top_k"] = int(row_kw["top_k"])
        _assert_same_kept(sampling_probs(x[r:r + 1], backend="torch", **row_kw), ref[r:r + 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties_match_reference(device, backend):
    B, V = 3, 1200
    x = _logits(B, V, seed=6)
    counts = torch.randint(0, 4, (B, V), generator=torch.Generator().manual_seed(1)) * (torch.rand(B, V) < 0.1)
    kw = dict(repetition_penalty=torch.tensor([1.3, 10.0, 0.8]), presence_penalty=0.5, frequency_penalty=0.25,
              temperature=0.8, top_k=40, top_p=0.9)
    dk = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = sampling_probs(x.to(device), token_counts=counts.to(device, torch.int32), backend=backend, **dk)
    ref = sampling_probs_ref(x, token_counts=counts, **kw)
    _assert_same_kept(got, ref)
    assert not torch.equal(ref > 0, sampling_probs_ref(x, temperature=0.8, top_k=40, top_p=0.9) > 0)  # it matters


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_logits(device, backend, dtype, atol):
    x = _logits(3, 2500, seed=9).to(dtype)
    kw = dict(temperature=0.9, top_k=25, min_p=0.01)  # value ties are common in 16 bits: test tie-safe filters
    got = sampling_probs(x.to(device), backend=backend, **kw)
    _assert_same_kept(got, sampling_probs_ref(x.float(), **kw), atol=atol)
    # top-k keeps whole tie groups (like the reference's '<' comparison)
    tts = sample_logits_probs(x.to(device), 1.0, 0.0, 40, backend=backend)
    _assert_same_kept(tts, sample_logits_ref(x.float(), 1.0, 0.0, 40, return_probs=True), atol=atol)


# --------------------------------------------------------------------------- masks, bad rows, bad inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_never_drawn_and_bad_rows(device, backend):
    B, V = 16, 300
    x = _logits(B, V, seed=10)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 77, 150, 299]] = True
    x[:, ~allowed] = float("-inf")
    x[5] = float("-inf")  # all masked
    x[9, 17] = float("nan")
    seeds = torch.arange(B, dtype=torch.int64)
    tok, lp = sample(x.to(device), seed=seeds.to(device), return_logprobs=True, backend=backend)
    tok, lp = tok.cpu(), lp.cpu()
    good = torch.ones(B, dtype=torch.bool)
    good[[5, 9]] = False
    assert tok[5] == -1 and tok[9] == -1 and torch.isnan(lp[[5, 9]]).all()
    assert bool(allowed[tok[good]].all())
    assert len(set(tok[good].tolist())) > 1
    with pytest.raises(ValueError, match=r"rows \[5, 9\]"):
        sample(x.to(device), seed=0, check=True, backend=backend)
    probs = sampling_probs(x.to(device), top_p=0.9, backend=backend).cpu()
    assert torch.equal(probs[[5, 9]], torch.zeros(2, V)) and not torch.isnan(probs).any()
    assert sample_logits(x.to(device), seed=1, backend=backend)[9, 0] == -1


BAD_INPUTS = [
    (dict(logits=torch.randn(4)), ValueError, "logits"),
    (dict(logits=torch.randn(2, 8, dtype=torch.float64)), TypeError, "logits"),
    (dict(logits=torch.randn(8, 2).t()), ValueError, "logits"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(min_p=-0.2), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(top_k=torch.tensor([1, 2, 3])), ValueError, "top_k"),
    (dict(temperature=torch.ones(5)), ValueError, "temperature"),
    (dict(top_p=torch.tensor([0.5, 2.0])), ValueError, "top_p"),
    (dict(token_counts=torch.ones(2, 7, dtype=torch.int32)), ValueError, "token_counts"),
    (dict(token_counts=torch.ones(2, 8)), TypeError, "token_counts"),
    (dict(seed=torch.tensor([1, 2, 3])), ValueError, "seed"),
    (dict(seed=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_INPUTS)
def test_bad_inputs_are_rejected_before_any_launch(kwargs, exc, name):
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", torch.randn(2, 8))
    kwargs.setdefault("backend", "triton")
    with count_launches() as launches, pytest.raises(exc, match=name):
        sample(logits, **kwargs)
    assert not launches


def test_bad_inputs_other_entry_points():
    with pytest.raises(ValueError, match="logits"):
        sample_logits(torch.randn(3))
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(torch.randn(2, 5), temperature=-1.0)
    with pytest.raises(ValueError, match="noise"):
        sampler_simple_batch(torch.randn(2, 5), noise=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sampling_probs(torch.randn(2, 5), top_k=-3)


# --------------------------------------------------------------------------- numerically hard inputs, both paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_common_offset_keeps_the_distribution(device, backend):
    """Four equal tokens at +1e8 (and masked ones): each drawn about a quarter of the time, never a masked one.
    The race subtracts the row max before the noise; without that, fp32 rounding makes one token win ~94 %."""
    B = 400
    x = torch.full((B, 12), float("-inf"))
    x[:, 2:6] = 1e8
    tok = sample(x.to(device), seed=torch.arange(B, device=device), backend=backend).cpu()
    freq = torch.bincount(tok, minlength=12).double() / B
    assert float(freq[2:6].sum()) == 1.0
    assert bool(((freq[2:6] - 0.25).abs() < 0.08).all()), freq.tolist()  # 4 sd of a binomial(400, 1/4)
    probs = sampling_probs(x[:2].to(device), backend=backend).cpu()
    torch.testing.assert_close(probs[:, 2:6], torch.full((2, 4), 0.25))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_temperature_is_greedy_on_both_paths(device, backend):
    """logits / T overflows to +inf for several tokens: the limit T -> 0 is the argmax of the logits."""
    x = torch.tensor([[3.0e36, 1.0e36, -2.0, 2.9e36], [1.0, 5.0, 2.0, 4.0]])
    tok, lp = sample(x.to(device), temperature=1e-3, seed=0, return_logprobs=True, backend=backend)
    assert tok.cpu().tolist() == [0, 1] and bool(torch.isfinite(lp.cpu()).all())
    assert sampling_probs(x.to(device), temperature=1e-3, backend=backend).cpu()[0].tolist() == [1.0, 0, 0, 0]
    assert sample_logits(x.to(device), 1e-3, 0.9, 0, seed=1, backend=backend).cpu()[:, 0].tolist() == [0, 1]
    assert sampler_simple_batch(x.to(device), 1.0, 1e-3, seed=1, backend=backend).cpu()[:, 0].tolist() == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_logits_are_bad_rows_on_both_paths(device, backend):
    x = _logits(3, 40, seed=5)
    x[0, 7] = float("inf")
    x[1] = float("-inf")
    got = sampler_simple_batch(x.to(device), 1.0, 1.0, seed=2, backend=backend).cpu()[:, 0]
    assert got[:2].tolist() == [-1, -1] and 0 <= int(got[2]) < 40
    tok = sample(x.to(device), seed=2, backend=backend).cpu()
    assert tok[:2].tolist() == [-1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x,kw,expected",
    [
        ([[0.7, 0.7]], dict(top_p=0.9), [0.5, 0.5]),  # one tie group: pivots interpolated between equal values
        ([[3.3, 3.3]], dict(top_p=0.9), [0.5, 0.5]),
        ([[0.7, 0.7, 0.7]], dict(top_k=2), [1 / 3, 1 / 3, 1 / 3]),
        ([[1e9, 1e9 - 128]], dict(top_p=0.9), [1.0, 0.0]),  # values one or two fp32 spacings apart
        ([[100.0, 200.0]], dict(temperature=1e-37), [0.0, 1.0]),  # every logit / T overflows: greedy
    ],
)
def test_rows_found_by_the_fuzz_suite(device, backend, x, kw, expected):
    """Rounding made the interpolated search pivots non-monotone (an empty kept set), and a row whose every
    logit / T overflows was taken for a bad row: found by tests/ops/test_fuzz_ops.py, fixed in the kernel."""
    x = torch.tensor(x)
    got = sampling_probs(x.to(device), backend=backend, **kw).cpu()
    torch.testing.assert_close(got, torch.tensor([expected]))
    tok = sample(x.to(device), seed=3, backend=backend, **kw).cpu()
    assert got[0, int(tok)] > 0


def test_packed_kernel_parameters_are_cached_per_setting():
    """The Triton launch's parameters (fp32 [B, NPARAM] in the kernels' column order and the int32 top-k): built once
    per setting of Python scalars and reused (a decode loop's settings repeat every step), rebuilt for new values,
    never cached for per-row tensors."""
    import decodekit.ops.sampling as sampling
    from decodekit.ops.sampling import triton as kernels

    prm = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5,
               frequency_penalty=0.25)
    dev = torch.device("cpu")
    params, topk = sampling._pack(prm, 3, dev)
    want = dict(prm, noise=0.0)
    assert params.dtype == torch.float32 and params.shape == (3, len(kernels.KERNEL_PARAMS)) and params.is_contiguous()
    for j, name in enumerate(kernels.KERNEL_PARAMS):
        assert torch.equal(params[:, j], torch.full((3,), float(want[name]))), name
    assert topk.dtype == torch.int32 and topk.tolist() == [5, 5, 5]
    again = sampling._pack(dict(prm), 3, dev)
    assert again[0] is params and again[1] is topk  # the same setting: the cached tensors
    other = sampling._pack(dict(prm, top_p=0.8), 3, dev)
    assert other[0] is not params and float(other[0][0, kernels.KERNEL_PARAMS.index("top_p")]) == pytest.approx(0.8)
    assert sampling._pack(prm, 4, dev)[0].shape[0] == 4  # another batch size
    per_row = dict(prm, temperature=torch.tensor([0.5, 1.0, 2.0]))
    a, b = sampling._pack(per_row, 3, dev), sampling._pack(per_row, 3, dev)
    assert a[0] is not b[0] and a[0][:, 0].tolist() == [0.5, 1.0, 2.0]
    noisy = sampling._pack(prm, 3, dev, noise=0.3)[0]  # sampler_simple_batch's noise column
    assert float(noisy[0, kernels.KERNEL_PARAMS.index("noise")]) == pytest.approx(0.3)
