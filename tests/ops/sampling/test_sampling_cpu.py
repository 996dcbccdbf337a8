"""The PyTorch sampler path on every distribution shape: kept sets exactly equal to both references, the
histogram top-p cut on flat and tied rows, the counter-based random stream, and the numerically hard inputs
(huge offsets, overflowing temperatures, tiny top-p, masked tokens)."""

from __future__ import annotations

import pytest
import torch

from bench.logits import DISTRIBUTIONS, make_logits, stories_logits
from decodekit.ops.sampling import cpu as sampling_cpu
from decodekit.ops.sampling import sample, sample_logits, sample_logits_probs, sampler_simple_batch, sampling_probs
from decodekit.ops.sampling.cpu import counter_uniform
from decodekit.ops.sampling.reference import sample_logits_ref, sampling_probs_ref

M64 = (1 << 64) - 1


def _splitmix_ref(seed: int, counter: int) -> float:
    """The same hash in Python integers (unbounded, masked to 64 bits): the definition of the stream."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)


def _assert_same_kept(got: torch.Tensor, ref: torch.Tensor) -> None:
    diff = int(((got > 0) != (ref > 0)).sum())
    assert diff == 0, f"kept sets differ in {diff} places"
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


def test_counter_uniform_is_splitmix64():
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(-(2**63), 2**63 - 1, (300,), generator=g)
    counters = torch.randint(0, 2**62, (300,), generator=g)
    got = counter_uniform(seeds, counters)
    ref = torch.tensor([_splitmix_ref(s % (1 << 64), c) for s, c in zip(seeds.tolist(), counters.tolist())])
    assert torch.equal(got, ref.float())
    assert [sampling_cpu._splitmix(s % (1 << 64), c) for s, c in zip(seeds.tolist()[:50], counters.tolist())] == \
        ref[:50].tolist()  # the host evaluator of small batches is the same function
    u = counter_uniform(torch.full((100_000,), 7), torch.arange(100_000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002


HF_SETS = [  # the benchmark's Hugging Face set, and the filters one at a time
    dict(temperature=0.8, top_k=30, top_p=0.8),
    dict(temperature=1.0, top_p=0.85),
    dict(temperature=0.7, top_p=0.95, min_p=0.02),
    dict(temperature=1.3, top_k=300),
    dict(temperature=1.0, min_p=0.1),
]
TTS_SETS = [(1.0, 0.95, 20), (1.0, 0.95, 80), (1.0, 0.85, 0), (0.6, 0.5, 0)]


@pytest.fixture(params=["host", "torch"])
def row_path(request, monkeypatch):
    """Run a test on both paths: small calls in NumPy (sorted rows), the others in torch (top-k candidates, or the
    mass histogram over whole rows); the thresholds are moved so that each path takes the test's sizes."""
    if request.param != "host":
        monkeypatch.setattr(sampling_cpu, "_HOST_ELEMS", 0)
    else:
        monkeypatch.setattr(sampling_cpu, "_HOST_ELEMS", 1 << 30)
    return request.param


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("kw", HF_SETS)
def test_kept_sets_equal_hf_reference_on_every_distribution(dist, kw, row_path):
    x = make_logits(dist, 4, 1999, seed=11)
    _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("T,p,k", TTS_SETS)
def test_kept_sets_equal_tts_reference_on_every_distribution(dist, T, p, k, row_path):
    x = make_logits(dist, 4, 2003, seed=12)
    got = sample_logits_probs(x, T, p, k, backend="torch")
    _assert_same_kept(got, sample_logits_ref(x, T, p, k, return_probs=True))


def test_kept_sets_on_real_stories_logits(stories_dir, row_path):
    x = stories_logits(stories_dir, 32)
    for kw in HF_SETS:
        _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))
    for T, p, k in TTS_SETS:
        got = sample_logits_probs(x, T, p, k, backend="torch")
        _assert_same_kept(got, sample_logits_ref(x, T, p, k, return_probs=True))


@pytest.mark.parametrize("V", [1, 2, 63, 64, 65, 4096, 8194, 32000])
def test_awkward_sizes_and_the_hf_penalty_set(V, row_path):
    B = 3
    x = make_logits("randn*3", B, V, seed=V)
    counts = torch.randint(0, 3, (B, V), generator=torch.Generator().manual_seed(V)) * (torch.rand(B, V) < 0.05)
    kw = dict(temperature=0.8, top_k=min(30, V), top_p=0.8, repetition_penalty=10.0, token_counts=counts)
    _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))


@pytest.mark.parametrize("tts", [False, True])
@pytest.mark.parametrize("step", [0.5, 0.125])
def test_top_p_cut_inside_a_tie_group_keeps_it_whole(tts, step, row_path):
    """Rounded logits put many tokens on one value: the cut lands inside a tie group of the crossing bin."""
    x = (make_logits("randn*2", 3, 5000, seed=3) / step).round() * step
    for p in (0.3, 0.5, 0.85, 0.99):
        if tts:  # the verbatim TTS reference cuts a tie group in sort order; decodekit keeps it whole (documented)
            got = sample_logits_probs(x, 1.0, p, 0, backend="torch")
            probs = torch.softmax(x.double(), dim=1)
            srt = probs.sort(dim=1).values  # ascending
            suffix = srt.flip(1).cumsum(1).flip(1)  # mass of the values >= srt[j]
            idx = torch.searchsorted(srt, probs, right=True)  # first position strictly above each token
            above = torch.where(idx < x.shape[1], suffix.gather(1, idx.clamp(max=x.shape[1] - 1)), 0.0)
            keep = above <= p
            assert torch.equal(got > 0, keep), int(((got > 0) != keep).sum())
        else:
            _assert_same_kept(sampling_probs(x, top_p=p, backend="torch"), sampling_probs_ref(x, top_p=p))


def test_flat_rows_and_the_last_bin(row_path):
    """All-equal rows (one tie group) and rows whose cut lies beyond the histogram's range (the catch-all bin)."""
    flat = torch.zeros(2, 1000)
    _assert_same_kept(sampling_probs(flat, top_p=0.5, backend="torch"), torch.full((2, 1000), 1e-3))
    deep = torch.cat([torch.zeros(1, 1), torch.full((1, 999), -40.0) + torch.randn(1, 999) * 0.1], dim=1)
    for p in (0.5, 1 - 1e-7):
        _assert_same_kept(sampling_probs(deep, top_p=p, backend="torch"), sampling_probs_ref(deep, top_p=p))


def test_mixed_row_groups_equal_rows_alone(row_path):
    """Per-row parameters split rows into greedy / top-k / whole-row groups (and a bad row): each row's
    distribution and draw are what it gets alone with scalar parameters and its own seed."""
    B, V = 6, 3000
    x = make_logits("zipf", B, V, seed=5)
    x[4] = float("nan")
    kw = dict(temperature=torch.tensor([0.0, 0.9, 1.0, 0.7, 1.0, 1.2]), top_k=torch.tensor([0, 40, 0, 0, 5, 1]),
              top_p=torch.tensor([1.0, 0.9, 0.8, 1.0, 0.9, 1.0]), min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.0]))
    seeds = torch.arange(B, dtype=torch.int64) * 31 + 7
    probs = sampling_probs(x, backend="torch", **kw)
    tok, lp = sample(x, seed=seeds, return_logprobs=True, backend="torch", **kw)
    assert int(tok[4]) == -1 and bool(torch.isnan(lp[4])) and float(probs[4].sum()) == 0
    for r in (0, 1, 2, 3, 5):
        row = {k: v[r].item() for k, v in kw.items()}
        row["top_k"] = int(row["top_k"])
        _assert_same_kept(probs[r:r + 1], sampling_probs_ref(x[r:r + 1], **row))
        t1, l1 = sample(x[r:r + 1], seed=seeds[r:r + 1], return_logprobs=True, backend="torch", **row)
        assert int(t1) == int(tok[r]) and float(l1) == pytest.approx(float(lp[r]), abs=1e-6)
        assert float(lp[r]) == pytest.approx(float(torch.log(probs[r, int(tok[r])])), abs=1e-5)


def test_huge_common_offset_keeps_the_distribution(row_path):
    """Four equal tokens at +1e8: each is drawn a quarter of the time (the offset is removed before the draw)."""
    B = 8000
    x = torch.full((B, 10), -1e30)
    x[:, :4] = 1e8
    probs = sampling_probs(x[:1], backend="torch")
    torch.testing.assert_close(probs[0, :4], torch.full((4,), 0.25))
    tok = sample(x, seed=torch.arange(B), backend="torch")
    freq = torch.bincount(tok, minlength=10)[:4].double() / B
    assert bool(((freq - 0.25).abs() < 0.025).all()), freq.tolist()


def test_temperature_overflow_is_greedy(row_path):
    x = torch.tensor([[3.0e36, 1.0e36, -2.0], [1.0, 5.0, 2.0]])
    tok, lp = sample(x, temperature=1e-3, seed=0, return_logprobs=True, backend="torch")
    assert tok.tolist() == [0, 1] and bool(torch.isfinite(lp).all())
    probs = sampling_probs(x, temperature=1e-3, backend="torch")
    assert probs[0].tolist() == [1.0, 0.0, 0.0]


def test_tiny_positive_top_p_stays_effective(row_path):
    x = make_logits("randn*1", 2, 500, seed=1)
    probs = sampling_probs(x, top_p=1e-46, backend="torch")  # rounds to 0 in fp32: must still mean "the top token"
    assert ((probs > 0).sum(dim=1) == 1).all()
    assert torch.equal(probs.argmax(dim=1), x.argmax(dim=1))


def test_masked_and_infinite_logits(row_path):
    x = make_logits("randn*2", 3, 50, seed=2)
    x[0, 7] = float("inf")
    x[1, :] = float("-inf")
    x[2, ::2] = float("-inf")
    assert sampler_simple_batch(x, 1.0, 1.0, seed=1, backend="torch")[:2, 0].tolist() == [-1, -1]
    tok = sample(x, top_p=0.9, seed=torch.arange(3), backend="torch")
    assert tok[:2].tolist() == [-1, -1] and int(tok[2]) % 2 == 1
    assert int(sample_logits(x, 1.0, 0.9, 5, seed=3, backend="torch")[2, 0]) % 2 == 1


def test_caller_logits_and_counts_are_not_modified(row_path):
    x = make_logits("randn*3", 2, 700, seed=4)
    counts = torch.randint(0, 3, (2, 700), dtype=torch.int32)
    x0, c0 = x.clone(), counts.clone()
    sample(x, token_counts=counts, repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.1,
           top_p=0.9, seed=1, backend="torch")
    sampling_probs(x, temperature=0.5, top_k=10, backend="torch")
    assert torch.equal(x, x0) and torch.equal(counts, c0)


@pytest.mark.parametrize("dist", ["randn*1", "zipf"])
def test_frequencies_on_a_wide_row(dist, row_path):
    """The inverse-CDF draw over a whole-row kept set (thousands of tokens) has the kept distribution."""
    V, B = 300, 30_000
    x = make_logits(dist, 1, V, seed=9).expand(B, V)
    p = sampling_probs_ref(x[:1], top_p=0.9)[0].double()
    tok = sample(x, top_p=0.9, seed=torch.arange(B), backend="torch")
    freq = torch.bincount(tok, minlength=V).double()
    assert float(freq[p == 0].sum()) == 0
    expected = p * B
    big = expected > 50
    sd = torch.sqrt(expected * (1 - p))
    assert bool(((freq - expected).abs()[big] < 5 * sd[big]).all())


def test_one_op_path_per_call(monkeypatch):
    """Scalar parameters: one group, no per-row indexing; the whole-row path never sorts a whole row."""
    calls = []
    real_sort = torch.Tensor.sort

    def spy(self, *a, **k):
        calls.append(self.shape[-1])
        return real_sort(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "sort", spy)
    x = make_logits("randn*1", 4, 32000, seed=0)
    sampling_cpu.sampling_probs_torch(
        x, sampling_cpu.RowParams(1.0, 0, 0.85, 0.0, 1.0, 0.0, 0.0, None, tts=True, greedy_top1=False))
    assert calls and max(calls) < 32000 // 8, calls  # only the crossing bin is sorted


@pytest.mark.parametrize("kind", ["tts", "hf"])
def test_host_and_torch_paths_draw_the_same_tokens(monkeypatch, kind):
    """Tie-free rows: the NumPy path and the torch path rank the same candidates and use the same uniforms."""
    B, V = 16, 700
    x = make_logits("randn*2", B, V, seed=21)
    seeds = torch.arange(B) * 13 + 5

    def draw():
        if kind == "tts":
            return sample_logits(x, 1.0, 0.9, 40, seed=seeds, backend="torch")[:, 0], None
        return sample(x, temperature=0.7, top_p=0.8, min_p=0.02, seed=seeds, return_logprobs=True, backend="torch")

    monkeypatch.setattr(sampling_cpu, "_HOST_ELEMS", 1 << 30)
    host = draw()
    monkeypatch.setattr(sampling_cpu, "_HOST_ELEMS", 0)
    dev = draw()
    assert torch.equal(host[0], dev[0])
    if kind == "hf":
        torch.testing.assert_close(host[1], dev[1], atol=1e-6, rtol=1e-6)
