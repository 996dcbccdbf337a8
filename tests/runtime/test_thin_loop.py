"""The greedy fast path of ``run_generation`` (issue 16): the sampler's greedy answer, without the sampler.

A scripted step model returns chosen logits (ties, NaN, +inf, all -inf rows, fp16, strided views); every step's
tokens must be what ``decodekit.sample(temperature=0)`` gives on the same logits.
"""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.runtime.config import resolve_config
from decodekit.runtime.loop import run_generation

inf, nan = float("inf"), float("nan")


class _Scripted:
    """A step model whose step ``t`` returns ``script[t]`` (``[B, V]``), recording the ids it was fed."""

    default_stop_ids: list[int] = []

    def __init__(self, script: list[torch.Tensor], strided: bool) -> None:
        self.script, self.strided = script, strided
        self.vocab_size = script[0].shape[1]
        self.max_batch, self.max_seq_len, self.device = 8, 64, torch.device("cpu")
        self.fed: list[list[int]] = []

    def reset(self, batch_size: int) -> None:
        self.t = 0

    def step(self, input_ids, position_ids, attention_mask):  # noqa: ANN001, ANN201
        self.fed.append(input_ids[:, -1].tolist())
        x = self.script[self.t]
        self.t += 1
        if self.strided:  # a non-contiguous view, as an eager model's logits[:, -1] can be
            wide = torch.full((x.shape[0], 2 * x.shape[1]), -7.0, dtype=x.dtype)
            wide[:, ::2] = x
            return wide[:, ::2]
        return x


def _script(dtype: torch.dtype, b: int, v: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for t in range(steps):
        x = torch.randn(b, v, generator=gen).round(decimals=1)  # coarse values: ties inside rows
        x[0, 3] = x[0, 11] = x[0].max() + 1  # an exact tie: the lower index wins
        if t == 2:
            x[1 % b, 5] = nan
        if t == 3:
            x[b - 1] = -inf
        if t == 4:
            x[0, 7] = inf
        out.append(x.to(dtype))
    return out


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, v", [(1, 13), (3, 97), (8, 509)])
def test_greedy_fast_path_is_the_samplers_greedy_answer(b, v, dtype, strided, monkeypatch):
    script = _script(dtype, b, v, 6)
    want = [decodekit.sample(x, temperature=0.0).tolist() for x in script]
    import decodekit.ops.sampling as sampling

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("greedy decoding without penalties must not call the sampler")

    monkeypatch.setattr(sampling, "sample", refuse)
    model = _Scripted(script, strided)
    res = run_generation(model, [[1]] * b, resolve_config(max_new_tokens=6, do_sample=False, stop_ids=[]))
    got = [[res.tokens[i][t] for i in range(b)] for t in range(6)]
    assert got == want
    assert model.fed[1:] == want[:-1]  # each step fed the previous step's tokens (-1 for a bad row, as the sampler)


def test_penalties_keep_the_sampler(monkeypatch):
    script = _script(torch.float32, 2, 31, 2)  # the first two steps: finite rows
    calls = []
    import decodekit.ops.sampling as sampling

    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    run_generation(_Scripted(script, False), [[1], [2]],
                   resolve_config(max_new_tokens=2, temperature=0.0, repetition_penalty=1.3, stop_ids=[]))
    assert len(calls) == 2 and calls[0]["token_counts"] is not None


def test_penalties_with_a_bad_row_do_not_crash():
    """A row whose logits go bad (NaN, all -inf) under a penalty: the sampler's -1, no count update for it."""
    script = _script(torch.float32, 3, 31, 5)  # NaN: row 1 at step 2; all -inf: row 2 at step 3; +inf: row 0 at 4
    res = run_generation(_Scripted(script, False), [[1], [2], [3]],
                         resolve_config(max_new_tokens=5, temperature=0.0, repetition_penalty=1.3, stop_ids=[]))
    bad = {(1, 2), (2, 3), (0, 4)}
    assert all((t == -1) == ((i, s) in bad) for i, row in enumerate(res.tokens) for s, t in enumerate(row))
