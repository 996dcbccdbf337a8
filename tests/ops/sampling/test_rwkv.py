"""rwkv_sample_logits / rwkv_sampling_probs (issue 14): the rwkv package's sampler, which RWKV-TTS calls, on both
backends against decodekit.ops.sampling.reference.rwkv_probs_ref (its steps in its order: softmax, top-p cutoff with
its ties, top-k, then the temperature on the kept probabilities)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import rwkv_sample_logits, rwkv_sampling_probs
from decodekit.ops.sampling.reference import rwkv_probs_ref

BACKENDS = ["triton", "torch"]


def _tts_logits(B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 8193, generator=g) * 3  # RWKV-TTS samples [0:4096] (global) and [0:8193] (semantic)


def _package_kept(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """The rwkv package's NumPy branch, step by step, for one row without ties: the kept token mask."""
    if temperature == 0:
        temperature, top_p = 1.0, 0.0
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    sorted_ids = np.argsort(probs)
    sorted_probs = probs[sorted_ids][::-1]
    cumulative_probs = np.cumsum(sorted_probs)
    cutoff = float(sorted_probs[np.argmax(cumulative_probs >= top_p)])
    probs[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        probs[sorted_ids[:-top_k]] = 0
    return probs > 0


CASES = [  # temperature, top_p, top_k, columns
    (1.0, 0.95, 20, 4096),  # RWKV-TTS global tokens
    (1.0, 0.95, 80, 8193),  # RWKV-TTS semantic tokens
    (1.0, 0.85, 0, 8193),  # the package's defaults
    (0.5, 0.85, 0, 4096),
    (2.0, 0.6, 30, 1000),
    (0.0, 0.85, 0, 4096),  # T = 0: T = 1, top_p = 0 -> the argmax
    (1.3, 0.0, 0, 1000),
    (1.0, 1.0, 0, 257),
    (0.7, 1.0, 5, 257),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_p,top_k,cols", CASES)
def test_kept_set_and_distribution_match_the_package(device, backend, temperature, top_p, top_k, cols):
    x = _tts_logits(3, seed=cols + top_k)[:, :cols]  # a slice: row stride 8193, read in place
    with count_launches() as launches:
        got = rwkv_sampling_probs(x.to(device), temperature, top_p, top_k, backend=backend).cpu()
    assert (launches["block_sample"] == 1) == (backend == "triton")
    ref = rwkv_probs_ref(x, temperature, top_p, top_k)
    assert torch.equal(got > 0, ref > 0), f"kept sets differ in {int(((got > 0) != (ref > 0)).sum())} places"
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-4)
    for b in range(3 if top_p < 1.0 else 0):  # the package's own code (no ties in random logits): the same set
        # (top_p = 1: its cumulative sum may end just short of 1.0 and keep the argmax alone; see rwkv_probs_ref)
        assert np.array_equal(_package_kept(x[b].double().numpy(), temperature, top_p, top_k), ref[b].numpy() > 0)
    tok = rwkv_sample_logits(x.to(device), temperature, top_p, top_k, seed=4, backend=backend).cpu()
    assert tok.shape == (3,) and tok.dtype == torch.int64
    assert bool((got.gather(1, tok[:, None]) > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_boundaries_by_hand(backend):
    """Dyadic probabilities make the cumulative sums exact: the cutoff's tie group survives, and a token whose
    strictly-higher mass already reaches top_p is dropped."""
    cases = [  # probs, top_p, top_k, kept
        ([0.5, 0.25, 0.25], 0.5, 0, [True, False, False]),  # cumsum .5 >= .5 at the first token
        ([0.25, 0.5, 0.125, 0.125], 0.7, 0, [True, True, False, False]),
        ([0.375, 0.25, 0.25, 0.125], 0.5, 0, [True, True, True, False]),  # the .25 tie group survives whole
        ([0.375, 0.25, 0.25, 0.125], 0.9, 1, [True, False, False, False]),  # top-k after top-p
        ([0.375, 0.25, 0.25, 0.125], 0.0, 0, [True, False, False, False]),  # top_p 0: the argmax's group
        ([0.25, 0.25, 0.25, 0.25], 0.0, 0, [True, True, True, True]),
    ]
    for probs, top_p, top_k, kept in cases:
        x = torch.log(torch.tensor([probs]))
        got = rwkv_sampling_probs(x, 1.0, top_p, top_k, backend=backend)[0]
        assert (got > 0).tolist() == kept, (probs, top_p, top_k, got)
        assert (rwkv_probs_ref(x, 1.0, top_p, top_k)[0] > 0).tolist() == kept


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("backend,N", [("torch", 20_000), ("triton", 64)])
def test_temperature_comes_after_truncation(device, backend, N):
    """top_p .7 keeps {0, 1} from p (cumsum .5, .8); then p ** (1 / 2): [.707, .548] -> [.563, .437]. Tempering
    first would keep three tokens (softmax(log p / 2) = [.379, .294, .208, .120]: cumsum .673 < .7)."""
    x = torch.log(PROBS).expand(N, -1).contiguous()
    seeds = torch.arange(N, dtype=torch.int64) * 7919 + 3
    tok = rwkv_sample_logits(x.to(device), 2.0, 0.7, 0, seed=seeds.to(device), backend=backend).cpu()
    counts = torch.bincount(tok, minlength=4).double()
    assert counts[2:].sum() == 0, counts.tolist()
    q = PROBS[:2].double().sqrt()
    expected = q / q.sum() * N
    chi2 = float(((counts[:2] - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_draws_uniformly_from_the_argmax_ties(backend):
    x = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]).expand(24, -1).contiguous()
    tok = rwkv_sample_logits(x, 0.0, 0.85, 0, seed=torch.arange(24), backend=backend)
    assert set(tok.tolist()) == {1, 2, 4}  # the package's T = 0: top_p = 0 keeps the whole tie group
    probs = rwkv_sampling_probs(x[:1], 0.0, 0.85, 0, backend=backend)[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 1 / 3, 1 / 3, 0.0, 1 / 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_per_row_parameters_and_bad_rows(backend):
    v = _tts_logits(1)[0]
    t = rwkv_sample_logits(v[0:4096], temperature=1.0, top_p=0.95, top_k=20, seed=1, backend=backend)
    assert t.dim() == 0 and 0 <= int(t) < 4096  # the package returns an int for a [V] row
    assert rwkv_sampling_probs(v[0:4096], 1.0, 0.95, 20, backend=backend).shape == (4096,)
    x = _tts_logits(3, seed=2)[:, :512].clone()
    x[1, 5] = float("nan")
    temps, ps, ks = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.9, 0.9, 0.5]), torch.tensor([0, 3, 10])
    probs = rwkv_sampling_probs(x, temps, ps, ks, backend=backend)
    tok = rwkv_sample_logits(x, temps, ps, ks, seed=0, backend=backend)
    assert tok[1].item() == -1 and bool((probs[1] == 0).all())
    for b in (0, 2):
        ref = rwkv_probs_ref(x[b : b + 1], float(temps[b]), float(ps[b]), int(ks[b]))[0]
        assert torch.equal(probs[b] > 0, ref > 0)
    assert tok[2].item() == int(x[2].argmax())


def test_bad_arguments():
    x = torch.randn(2, 50)
    cases = [
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=-0.1), ValueError, "top_p"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(temperature=torch.tensor([1.0, float("nan")])), ValueError, "temperature"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(backend="gpu"), ValueError, "backend"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=f"rwkv_sample_logits: {name}"):
            rwkv_sample_logits(x, **kw)
    with pytest.raises(ValueError, match="rwkv_sample_logits: logits"):
        rwkv_sample_logits(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="rwkv_sampling_probs: logits"):
        rwkv_sampling_probs(torch.zeros(3, dtype=torch.int64))
