"""Statistical tests of the draw: tens of thousands of draws match the renormalized kept distribution.

The kernel's draw is first shown to be token-for-token identical to the PyTorch path for the same per-row
seeds; the big statistical runs then use the PyTorch path (the interpreter is too slow for 40,000 rows).
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


@pytest.mark.parametrize("kind,kw,n_kept", CASES)
def test_kernel_draws_equal_torch_draws(device, kind, kw, n_kept):
    B = 24
    logits = torch.log(PROBS).expand(B, -1).contiguous()
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 1
    with count_launches() as launches:
        tk = _draw(kind, logits.to(device), kw, seeds.to(device), "triton")
    assert launches["sampling_race"] == 1
    tt = _draw(kind, logits, kw, seeds, "torch")
    assert torch.equal(tk.cpu(), tt)
    assert int(tt.max()) < n_kept


@pytest.mark.parametrize("kind,kw,n_kept", CASES)
def test_frequencies_match_the_kept_distribution(kind, kw, n_kept):
    B = 40_000
    logits = torch.log(PROBS).expand(B, -1).contiguous()
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 1
    tok = _draw(kind, logits, kw, seeds, "torch")
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
