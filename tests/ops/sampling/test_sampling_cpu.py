"""The PyTorch sampler path's own machinery: its Philox implementations, the block-wise nonzero search and the
two-level (block max) candidate selection, including the rounds that grow the candidate set, checked against the
plain references (and, for the block path's draw, against the Triton kernel)."""

from __future__ import annotations

import pytest
import torch

from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import sample, sample_logits, sample_logits_probs, sampling_probs
from decodekit.ops.sampling.cpu import (
    _BIGINT_LANES,
    Seed,
    _uniforms,
    nonzero_positions,
    philox_uniform,
)
from decodekit.ops.sampling.reference import sample_logits_ref, sampling_probs_ref


def _logits(B: int, V: int, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def _assert_same_kept(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(got > 0, ref > 0), f"kept sets differ in {int(((got > 0) != (ref > 0)).sum())} places"
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("R,K", [(1, 1), (1, 37), (3, 80), (4, 300), (16, 100)])
@pytest.mark.parametrize("mult", [0, 1])
def test_uniforms_equal_philox_uniform(R, K, mult):
    """Both CPU Philox paths (big-integer lanes below _BIGINT_LANES counters, NumPy above) are bit-exact."""
    g = torch.Generator().manual_seed(R * K + mult)
    tok = torch.randint(0, 2**18, (R, K), generator=g)
    rows = torch.arange(R) * 5 + 2  # batch rows of the R rows drawn
    seeds = torch.randint(-(2**63), 2**63 - 1, (5 * R + 2,), generator=g)  # negative int64 seeds too
    for seed in (Seed(seeds, mult), Seed(2**62 + 12345, mult)):
        got = _uniforms(seed, rows, tok)
        s = seeds[rows][:, None].expand(R, K) if isinstance(seed.seed, torch.Tensor) else torch.full((R, K), seed.seed)
        ref = philox_uniform(s, (rows * mult)[:, None].expand(R, K), tok)
        assert torch.equal(got, ref)
    assert (R * K <= _BIGINT_LANES) == (R * K in (1, 37, 240))  # both paths are covered


@pytest.mark.parametrize("V", [63, 64, 1000, 70001])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_nonzero_positions_match_nonzero(V, dtype):
    g = torch.Generator().manual_seed(V)
    vals = torch.randint(0 if dtype == torch.uint8 else -3, 4, (3, V), generator=g)
    counts = (vals * (torch.rand(3, V, generator=g) < 0.03)).to(dtype)
    wide = torch.zeros(3, V + 70, dtype=dtype)  # row stride not a multiple of the block
    wide[:, :V] = counts
    for c in (counts, wide[:, :V]):
        r, k = nonzero_positions(c)
        ref_r, ref_k = c.nonzero(as_tuple=True)
        assert torch.equal(torch.sort(r * V + k).values, ref_r * V + ref_k)


BLOCK_CASES = [  # kwargs; the first-round candidates suffice, or need one or more growth rounds
    dict(top_k=30, top_p=0.8, temperature=0.8),
    dict(top_k=20),
    dict(top_p=0.85),
    dict(top_p=0.99, temperature=1.3),  # thousands of tokens: rounds up to all blocks
    dict(top_k=3000, min_p=0.001),  # more blocks than the row has: ranked whole
]


@pytest.mark.parametrize("kw", BLOCK_CASES)
@pytest.mark.parametrize("V,stride", [(128256, 128256), (50021, 50050)])
def test_block_candidates_match_reference(kw, V, stride):
    x = _logits(2, stride, seed=V)[:, :V]  # (50021, 50050): tail tokens and a row stride that is no block multiple
    _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))


def test_block_candidates_per_row_parameters_and_penalties():
    B, V = 5, 70001
    x = _logits(B, V, seed=3)
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 3, (B, V), generator=g) * (torch.rand(B, V, generator=g) < 0.01)
    kw = dict(
        temperature=torch.tensor([0.7, 1.0, 0.0, 1.5, 0.9]),
        top_k=torch.tensor([10, 0, 5, 100, 0]),
        top_p=torch.tensor([1.0, 0.9, 0.9, 0.7, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.02, 0.05]),
        repetition_penalty=torch.tensor([1.3, 10.0, 1.0, 0.8, 2.0]),
        presence_penalty=0.5,
    )
    got = sampling_probs(x, token_counts=counts.to(torch.int32), backend="torch", **kw)
    _assert_same_kept(got, sampling_probs_ref(x, token_counts=counts, **kw))
    for r in range(B):  # each row as if alone, with scalar parameters
        rk = {k: (v[r].item() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        rk["top_k"] = int(rk["top_k"])
        alone = sampling_probs(x[r:r + 1], token_counts=counts[r:r + 1], backend="torch", **rk)
        _assert_same_kept(alone, got[r:r + 1])


@pytest.mark.parametrize("T,p,k", [(1.0, 0.85, 0), (1.0, 0.95, 20), (0.7, 0.99, 0), (1.2, 0.5, 3000)])
def test_block_candidates_match_tts_reference(T, p, k):
    x = _logits(2, 128256, seed=11)
    got = sample_logits_probs(x, T, p, k, backend="torch")
    _assert_same_kept(got, sample_logits_ref(x, T, p, k, return_probs=True))
    tok = sample_logits(x, T, p, k, seed=3, backend="torch")
    assert bool((got.gather(1, tok) > 0).all())


def test_block_path_draws_the_kernel_tokens(device):
    """V = 5000 with top-k: the torch path picks candidates block-wise (78 blocks); its draw must stay the
    kernel's draw, penalties and per-row seeds included."""
    B, V = 4, 5000
    x = _logits(B, V, scale=3.0, seed=5)
    counts = torch.randint(0, 3, (B, V), generator=torch.Generator().manual_seed(2)).to(torch.int32)
    kw = dict(top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.1)
    seeds = torch.arange(B, dtype=torch.int64) * 101 + 7
    with count_launches() as launches:
        tk, lk = sample(x.to(device), token_counts=counts.to(device), seed=seeds.to(device), return_logprobs=True,
                        backend="triton", **kw)
    assert launches["sampling_race"] == 1
    tt, lt = sample(x, token_counts=counts, seed=seeds, return_logprobs=True, backend="torch", **kw)
    assert torch.equal(tk.cpu(), tt)
    torch.testing.assert_close(lk.cpu(), lt, atol=1e-5, rtol=1e-5)


def test_caller_logits_are_not_modified():
    x = _logits(3, 4000, seed=9)
    before = x.clone()
    counts = torch.ones(3, 4000, dtype=torch.int32)
    sample(x, token_counts=counts, repetition_penalty=5.0, presence_penalty=1.0, top_k=50, seed=0, backend="torch")
    assert torch.equal(x, before)


def _spy(monkeypatch, name: str) -> list[bool]:
    """Wrap ``sampling_torch.<name>`` to record, per call, whether it returned a result (not None), so that a test
    knows which path ran."""
    from decodekit.ops.sampling import cpu as sampling_torch

    calls: list[bool] = []
    real = getattr(sampling_torch, name)

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(sampling_torch, name, spy)
    return calls


WIDE_CASES = [  # (kwargs, quantized): flat rows, top-p keeps most of the vocabulary, the window decides the cut
    (dict(temperature=0.8, top_p=0.95), False),
    (dict(top_p=0.5, min_p=0.9), False),
    (dict(top_p=0.99, temperature=1.3), False),
    # rounded rows are tested at T = 1 only: x / T in fp32 (the kernel's semantics) merges values that the fp64
    # reference keeps apart, so at other temperatures the two would disagree on what is a tie
    (dict(top_p=0.95), True),
    (dict(top_p=0.5, min_p=0.9), True),
]


@pytest.mark.parametrize("kw,quantized", WIDE_CASES)
@pytest.mark.parametrize("V,stride", [(50257, 50257), (50021, 50050), (128256, 128256)])
def test_wide_top_p_window_matches_reference(monkeypatch, kw, quantized, V, stride):
    """Rows as flat as a random model's (scale 0.05), and the same rows rounded to 1e-3 (~100 tokens per tie
    group, groups on histogram bin edges): kept sets exactly the reference's, with the window path taken."""
    calls = _spy(monkeypatch, "_topp_window")
    x = _logits(3, stride, scale=0.05, seed=V)[:, :V]
    if quantized:
        x = torch.round(x * 1000) / 1000
    _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))
    assert sum(calls) == 3, "every row must be resolved by the histogram window"


def test_wide_top_p_window_tts_rule(monkeypatch):
    """sample_logits (top-p with "<=", no top-k) through the window agrees with the TTS reference."""
    calls = _spy(monkeypatch, "_topp_window")
    x = _logits(2, 50257, scale=0.05, seed=4)
    got = sample_logits_probs(x, 1.0, 0.95, 0, backend="torch")
    _assert_same_kept(got, sample_logits_ref(x, 1.0, 0.95, 0, return_probs=True))
    assert sum(calls) == 2


def test_wide_top_p_window_draw_is_the_race_over_the_kept_set(monkeypatch):
    """The draw after the window: argmax over the reference kept set of z - log(-log u), u = tl.rand's Philox
    stream (philox_uniform), lowest index on ties: the exact token the kernel's race gives."""
    calls = _spy(monkeypatch, "_topp_window")
    B, V = 3, 50257
    x = _logits(B, V, scale=0.05, seed=8)
    seeds = torch.tensor([3, 2**40 + 5, 77], dtype=torch.int64)
    kw = dict(temperature=0.8, top_p=0.95)
    got, lp = sample(x, seed=seeds, return_logprobs=True, backend="torch", **kw)
    assert sum(calls) == B
    ref_p = sampling_probs_ref(x, **kw)
    tok = torch.arange(V)
    for r in range(B):
        u = philox_uniform(torch.full((V,), int(seeds[r])), torch.zeros(V, dtype=torch.int64), tok)
        z = x[r] / 0.8
        key = torch.where(ref_p[r] > 0, z - torch.log(-torch.log(u)), float("-inf"))
        want = int(torch.nonzero(key == key.max())[0])
        assert int(got[r]) == want
        torch.testing.assert_close(lp[r], torch.log(ref_p[r, want]).float(), atol=1e-4, rtol=1e-4)


SMALL_CASES = [  # (kind, kwargs): the NumPy small-row path against the general torch path
    ("hf", dict(top_p=0.9, temperature=0.8)),
    ("hf", dict(top_k=20)),
    ("hf", dict(top_k=40, top_p=0.8, min_p=0.02, temperature=0.7)),
    ("hf", dict(top_k=70, top_p=0.5)),  # k + 1 > 64: the first candidates are k + 1
    ("hf", dict(top_p=0.999)),  # flat enough that the cut is below the first 64: the whole row is ranked
    ("hf", dict(top_k=5, repetition_penalty=1.5, presence_penalty=0.3)),
    ("hf", dict(top_p=0.9, repetition_penalty=0.7, frequency_penalty=0.2)),  # negative counts too (below)
    ("tts", dict(temperature=1.0, top_p=0.95, top_k=20)),
    ("tts", dict(temperature=0.7, top_p=0.6, top_k=0)),
    ("tts", dict(temperature=1.2, top_p=1.0, top_k=3)),
]


def _draw_torch(kind, x, kw, seeds, counts=None):
    if kind == "tts":
        t, p, k = kw["temperature"], kw["top_p"], kw["top_k"]
        return sample_logits(x, t, p, k, seed=seeds, backend="torch").squeeze(1), None
    extra = dict(token_counts=counts) if "repetition_penalty" in kw else {}
    return sample(x, seed=seeds, return_logprobs=True, backend="torch", **kw, **extra)


@pytest.mark.parametrize("kind,kw", SMALL_CASES)
@pytest.mark.parametrize("B,V", [(1, 1), (1, 2), (3, 64), (7, 65), (1, 512), (12, 1500), (2, 2048)])
def test_small_rows_numpy_path_draws_the_general_paths_tokens(monkeypatch, kind, kw, B, V):
    """Up to 2048 tokens with scalar parameters the CPU path runs in NumPy; its tokens and log-probabilities must
    be those of the general torch path (forced by declaring no row eligible), -inf tokens and ties included."""
    from decodekit.ops.sampling import cpu as sampling_torch

    scale = 0.01 if kw.get("top_p") == 0.999 else 3.0
    x = _logits(B, V, scale=scale, seed=B * V)
    if V > 4:
        x[:, ::5] = float("-inf")  # masked tokens
        x[:, 1] = x[:, 2]  # a tie
    counts = torch.randint(-1 if "frequency_penalty" in kw else 0, 3, (B, V),
                           generator=torch.Generator().manual_seed(V)).to(torch.int32)
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 3
    for shared in (False, True):
        sd = 99 if shared else seeds
        calls = _spy(monkeypatch, "_sample_small")
        got, got_lp = _draw_torch(kind, x, kw, sd, counts)
        k, p = kw.get("top_k", 0), kw.get("top_p", 1.0)
        assert calls == [0 < k < V or 0 < p < 1], "the NumPy path draws exactly the rows with a filter"
        monkeypatch.setattr(sampling_torch, "_small_eligible", lambda *a: False)
        want, want_lp = _draw_torch(kind, x, kw, sd, counts)
        monkeypatch.undo()
        assert torch.equal(got, want)
        assert bool((x.gather(1, got.view(B, 1)) > float("-inf")).all())
        if got_lp is not None:
            torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)


def test_small_rows_fall_back_for_bad_rows_and_greedy():
    x = _logits(3, 300)
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    tok = sample(x, top_p=0.9, seed=1, backend="torch")
    assert tok[1] == -1 and tok[2] == -1 and tok[0] >= 0
    assert torch.equal(sample(x[:1], temperature=0.0, backend="torch"), x[:1].argmax(dim=1))


SMALL_KEPT_HF = [  # temperature, top_k, top_p, min_p
    (0.7, 0, 0.9, 0.0),
    (1.3, 50, 0.8, 0.0),
    (1.0, 20, 1.0, 0.0),
    (0.8, 30, 0.95, 0.02),
    (1.0, 0, 0.9, 0.2),  # min-p binding inside the top-p set
    (0.5, 1500, 0.5, 0.0),
    (1.0, 0, 0.999, 0.0),  # the cut below the first 64 candidates: whole rows ranked
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SMALL_KEPT_HF)
@pytest.mark.parametrize("V", [300, 1999])
def test_small_rows_kept_sets_match_reference(monkeypatch, temperature, top_k, top_p, min_p, V):
    calls = _spy(monkeypatch, "_small_kept")
    x = _logits(4, V, scale=0.05 if top_p == 0.999 else 3.0, seed=V + top_k)
    x[:, 3] = x[:, 4]  # a tie
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    _assert_same_kept(sampling_probs(x, backend="torch", **kw), sampling_probs_ref(x, **kw))
    assert calls and calls[0], "the NumPy path must have chosen these kept sets"


@pytest.mark.parametrize("T,p,k", [(1.0, 0.95, 20), (1.0, 0.85, 0), (0.7, 0.5, 10), (1.2, 0.0, 30), (1.0, 0.99, 0)])
def test_small_rows_kept_sets_match_tts_reference(monkeypatch, T, p, k):
    calls = _spy(monkeypatch, "_small_kept")
    x = _logits(3, 1024, seed=12)
    got = sample_logits_probs(x, T, p, k, backend="torch")
    _assert_same_kept(got, sample_logits_ref(x, T, p, k, return_probs=True))
    assert calls and calls[0]


def test_uniforms_split_over_threads_are_bit_exact(monkeypatch):
    """Many counters (a flat row's race) are split over threads; every chunk must equal the single-pass result."""
    from decodekit.ops.sampling import cpu as sampling_torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 2**17, (2, 20011), generator=g)
    seeds = torch.tensor([7, 2**62 + 9])
    submitted = []
    real_pool = sampling_torch.ThreadPoolExecutor

    class CountingPool(real_pool):
        def submit(self, *args, **kwargs):
            submitted.append(args[-1].shape)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(sampling_torch, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(sampling_torch, "_pool", None)
    got = _uniforms(Seed(seeds, 0), None, tok)
    assert len(submitted) == 3  # the parallel path ran, in three column chunks
    ref = philox_uniform(seeds[:, None].expand(2, 20011), torch.zeros(2, 20011, dtype=torch.int64), tok)
    assert torch.equal(got, ref)
