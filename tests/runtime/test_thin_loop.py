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


# ------------------------------------------------------------------------ OnnxDecoder.decode_stepper (fixed buffers)

@pytest.fixture(scope="module", params=["plain", "gqa"])
def stories_graph(request, stories_dir, stories_export_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    if request.param == "plain":
        return stories_export_dir
    from tests.conftest import shared_export

    return shared_export(tmp_path_factory, "stories260K-gqa", stories_dir / "stories260K.bin", graph="gqa")


@pytest.mark.parametrize("prompts", [[[1, 5, 9]], [[1, 5, 9, 30, 7, 8, 2], [1], [1, 44, 2]]])
def test_decode_stepper_steps_as_step_does(stories_graph, prompts):
    """Step after step, the stepper's logits are ``step``'s on the same inputs, bit for bit (B = 1 reads the mask
    in place, B > 1 stages it), and a generation with it gives the tokens of one without it."""
    from decodekit.runtime import OnnxDecoder
    from decodekit.runtime.loop import _Buffers

    a, b = OnnxDecoder(stories_graph, max_batch=3), OnnxDecoder(stories_graph, max_batch=3)
    buf = _Buffers(prompts, 40, a.vocab_size, a.device)
    stepper = b.decode_stepper(buf.next_ids, buf.positions, buf.mask)
    assert stepper is not None
    n = len(prompts)
    for dec in (a, b):
        dec.reset(n)
        first = dec.step(buf.prompt_ids, buf.positions[:, : buf.s0], buf.mask[:, : buf.s0]).clone()
    gen = torch.Generator().manual_seed(0)
    for total in range(buf.s0 + 1, 40):
        buf.next_ids.copy_(torch.randint(0, a.vocab_size, (n, 1), generator=gen))
        want = a.step(buf.next_ids, buf.positions[:, total - 1 : total], buf.mask[:, :total])
        assert torch.equal(stepper(total), want)
    assert not torch.equal(first, want)  # the steps did move on
    kw = dict(max_new_tokens=24, stop_ids=[])

    def runs() -> list:  # greedy, sampled, beam search (3 beams per prompt: the stepper binds the beams' buffers)
        beams = b.generate(prompts[:1], num_beams=3, do_sample=False, **kw)
        return [b.generate(prompts, temperature=0.0, **kw).tokens, b.generate(prompts, seed=3, **kw).tokens,
                beams.tokens, beams.scores]

    made, calls = [], []
    real = b.decode_stepper

    def counting(*args):  # noqa: ANN002, ANN202 - the loops must take the stepper, and step through it
        fast = real(*args)
        made.append(fast is not None)
        return lambda total: (calls.append(total), fast(total))[1]

    b.decode_stepper = counting
    with_it = runs()
    assert made == [True] * 3 and len(calls) == 2 * 23 + 23  # greedy + sampled: 23 steps each; beams: 23
    b.decode_stepper = lambda *args: None  # the loops fall back to step()
    assert with_it == runs()


def test_decode_stepper_refuses_what_it_cannot_do(stories_export_dir):
    from decodekit.errors import UsageError
    from decodekit.runtime import OnnxDecoder
    from decodekit.runtime.loop import _Buffers

    dec = OnnxDecoder(stories_export_dir, max_batch=2)
    buf = _Buffers([[1, 5], [1]], 12, dec.vocab_size, dec.device)
    stepper = dec.decode_stepper(buf.next_ids, buf.positions, buf.mask)
    dec.reset(2)
    with pytest.raises(UsageError, match="decode_stepper"):  # no prefill yet
        stepper(3)
    dec.step(buf.prompt_ids, buf.positions[:, :2], buf.mask[:, :2])
    for total in (2, 4, 13):  # not one token after the cache, or past the buffers
        with pytest.raises(UsageError, match="decode_stepper"):
            stepper(total)
    assert stepper(3).shape == (2, dec.vocab_size)
    dec.reset(1)  # another batch size: this stepper's buffers are for two rows
    dec.step(buf.prompt_ids[:1], buf.positions[:1, :2], buf.mask[:1, :2])
    with pytest.raises(UsageError, match="decode_stepper"):
        stepper(3)
    # buffers it cannot bind as they are: the loop calls step() instead
    assert dec.decode_stepper(buf.next_ids.int(), buf.positions, buf.mask) is None
    assert dec.decode_stepper(buf.next_ids, buf.positions, buf.mask[:, :5]) is None
    assert dec.decode_stepper(buf.next_ids.T, buf.positions, buf.mask) is None
    assert OnnxDecoder(stories_export_dir, io_binding=False).decode_stepper(buf.next_ids, buf.positions,
                                                                            buf.mask) is None
    dec.step = lambda *a: a  # a replaced step (post-processing logits, tracing) is kept: no stepper
    assert dec.decode_stepper(buf.next_ids, buf.positions, buf.mask) is None
