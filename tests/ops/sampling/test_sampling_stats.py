"""Statistical tests of the draw: tens of thousands of draws match the renormalized kept distribution.

Both backends are checked: the PyTorch path with 40,000 draws, the Triton kernel with 256 (the interpreter runs
one Python program per row; a token kept by mistake still shows as a nonzero count of a filtered token, and a
token dropped by mistake moves the chi-square far past its bound). They use different random streams, so each is
held to the distribution on its own.
The logits are built so that the boundary token carries a large mass: an off-by-one threshold (keeping one
token too many or too few) moves the frequencies by far more than the chi-square bound allows.
"""

from __future__ import annotations

import math

import pytest
import torch

from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import sample, sample_logits

PROBS = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])
# HF top_p=0.7: exclusive masses 0, .30, .55, .75 -> keeps 3 tokens. TTS top_p=0.6 (<= on exclusive mass,
# no renormalization): keeps 3. top_k=2 keeps 2. min_p=0.45: keeps p >= 0.135 -> 4 tokens.
CASES = [
    ("hf", dict(top_p=0.7), 3),
    ("tts", dict(top_p=0.6, top_k=0), 3),
    ("tts", dict(top_p=0.95, top_k=2), 2),
    ("hf", dict(top_k=5, min_p=0.45), 4),
    ("hf", dict(temperature=2.0, top_k=3), 3),
]


def _draw(kind: str, logits: torch.Tensor, kw: dict, seeds: torch.Tensor, backend: str) -> torch.Tensor:
    if kind == "tts":
        return sample_logits(logits, kw.get("temperature", 1.0), kw["top_p"], kw["top_k"], seed=seeds,
                             backend=backend).squeeze(1)
    return sample(logits, seed=seeds, backend=backend, **kw)


@pytest.mark.parametrize("backend,B", [("torch", 40_000), ("triton", 256)])
@pytest.mark.parametrize("kind,kw,n_kept", CASES)
def test_frequencies_match_the_kept_distribution(device, kind, kw, n_kept, backend, B):
    logits = torch.log(PROBS).expand(B, -1).contiguous().to(device)
    seeds = (torch.arange(B, dtype=torch.int64) * 7919 + 1).to(device)
    with count_launches() as launches:
        tok = _draw(kind, logits, kw, seeds, backend).cpu()
    assert (launches["sampling_race"] == 1) == (backend == "triton")
    counts = torch.bincount(tok, minlength=len(PROBS)).double()
    assert counts[n_kept:].sum() == 0, f"drew filtered tokens: {counts.tolist()}"
    p = PROBS.double()
    if "temperature" in kw:
        p = p ** (1.0 / kw["temperature"])
    expected = p[:n_kept] / p[:n_kept].sum() * B
    chi2 = float(((counts[:n_kept] - expected) ** 2 / expected).sum())
    # chi-square with n_kept - 1 dof; 40 is beyond the 1e-6 quantile for <= 3 dof. Off by one token in either
    # direction changes a frequency by >= 6% of B (2,400 draws): chi2 in the thousands.
    assert chi2 < 40.0, (chi2, counts.tolist(), expected.tolist())
    # and per token: within 5 binomial standard deviations
    sd = torch.sqrt(expected * (1 - expected / B))
    assert bool(((counts[:n_kept] - expected).abs() < 5 * sd).all())
    assert math.isfinite(chi2)
