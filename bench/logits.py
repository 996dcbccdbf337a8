"""Logits with the shapes users bring, for the sampler benchmarks and tests.

* ``randn*s``: Gaussian logits with scale ``s`` (1 is flat: top-p 0.85 keeps half of a 32k row; 4 and 6 are
  peaked: a few hundred or a few dozen tokens);
* ``zipf``: ``-1.1 * log(rank)``, shuffled (a heavy-tailed, LM-like frequency law);
* ``few+flat``: a handful of dominant tokens over a flat tail (a confident step of a large model);
* ``stories``: real next-token logits of the stories260K model (V = 512), collected along a sampled generation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

SCALES = (1, 2, 3, 4, 6)
DISTRIBUTIONS = tuple(f"randn*{s}" for s in SCALES) + ("zipf", "few+flat")
STORIES_V = 512


def make_logits(dist: str, B: int, V: int, seed: int = 0) -> torch.Tensor:
    """fp32 ``[B, V]`` logits of distribution ``dist`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if dist.startswith("randn*"):
        return torch.randn(B, V, generator=g) * float(dist[len("randn*"):])
    if dist == "zipf":
        base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
        perm = torch.stack([torch.randperm(V, generator=g) for _ in range(B)])
        return base[perm] + 0.01 * torch.randn(B, V, generator=g)
    if dist == "few+flat":
        x = torch.randn(B, V, generator=g) * 0.5
        top = torch.stack([torch.randperm(V, generator=g)[: min(5, V)] for _ in range(B)])
        return x.scatter_add_(1, top, torch.full(top.shape, 8.0) + torch.randn(top.shape, generator=g))
    raise ValueError(f"unknown distribution {dist!r}; known: {DISTRIBUTIONS + ('stories',)}")


@functools.cache
def _stories_rows(model_dir: str, steps: int) -> torch.Tensor:
    from decodekit.models import load_model

    model = load_model(Path(model_dir) / "stories260K.bin")
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1]])
    rows, past, n = [], None, 0
    with torch.no_grad():
        for _ in range(steps):
            s = ids.shape[1]
            logits, past = model(ids, torch.arange(n, n + s)[None], torch.ones(1, n + s, dtype=torch.long),
                                 past_key_values=past)
            n += s
            rows.append(logits[0].float() if logits.dim() == 2 else logits[0, -1].float())
            nxt = torch.multinomial(torch.softmax(rows[-1], dim=-1), 1, generator=g)
            ids = nxt[None] if int(nxt) != 2 else torch.tensor([[1]])  # a new story after end-of-text
            if n + 1 >= model.config.max_seq_len:
                past, n, ids = None, 0, torch.tensor([[1]])
    return torch.stack(rows)


def stories_logits(model_dir: Path, B: int, seed: int = 0) -> torch.Tensor:
    """``[B, 512]`` real stories260K logits: ``B`` rows picked from 128 consecutive generation steps."""
    rows = _stories_rows(str(model_dir), 128)
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randint(0, rows.shape[0], (B,), generator=g)].contiguous()
