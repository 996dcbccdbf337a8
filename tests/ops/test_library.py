"""decodekit.ops._library.call: the direct path (dispatcher skipped in plain eager code) gives the op's result, and
every other context (a dispatch mode, a gradient owed) still goes through ``torch.ops.decodekit``."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import decodekit
import decodekit.ops.attention
import decodekit.ops.norm_linear
import decodekit.ops.sampling  # noqa: F401 - the ops register on import; the spy wraps what is registered
from decodekit.ops import _library


@pytest.fixture
def spy(monkeypatch):
    """Count the calls that reach each op's implementation through the direct path."""
    hits: dict[str, int] = {}
    for name, fn in list(_library.IMPLS.items()):
        def wrapped(*args, _fn=fn, _name=name):  # noqa: ANN002
            hits[_name] = hits.get(_name, 0) + 1
            return _fn(*args)

        monkeypatch.setitem(_library.IMPLS, name, wrapped)
    return hits


def test_direct_path_equals_dispatcher(spy, monkeypatch):
    x = torch.randn(5, 7777) * 3  # past the sampler's NumPy lane (20K logits): the call goes through ``call``
    direct = decodekit.sample(x, temperature=0.8, top_k=40, top_p=0.9, seed=torch.arange(5))
    assert spy.get("sample") == 1
    monkeypatch.setattr(_library, "IMPLS", {})  # every call through torch.ops.decodekit
    via_op = decodekit.sample(x, temperature=0.8, top_k=40, top_p=0.9, seed=torch.arange(5))
    assert torch.equal(direct, via_op)
    w, nw = torch.randn(33, 64), torch.randn(64)
    h = torch.randn(7, 64)
    assert torch.equal(decodekit.rms_norm_linear(h, nw, w), decodekit.rms_norm_linear(h, nw, w))


def test_gradient_owed_goes_through_the_op(spy):
    x = torch.randn(3, 16, requires_grad=True)
    w, nw = torch.randn(8, 16, requires_grad=True), torch.randn(16)
    y = decodekit.rms_norm_linear(x, nw, w)
    assert "rms_norm_linear" not in spy and y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        decodekit.rms_norm_linear(x, nw, w)
    assert spy.get("rms_norm_linear") == 1


def test_dispatch_mode_goes_through_the_op(spy):
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 100))
        tok = decodekit.sample(x, temperature=1.0, seed=1)
    assert tok.shape == (4,) and "sample" not in spy


@pytest.mark.parametrize("op", ["sample", "sample_logits"])
def test_small_calls_take_the_host_lane_with_the_ops_result(spy, monkeypatch, op):
    """A small eager CPU call runs the NumPy path from the public function (no ``call``); it gives the op's tokens
    and log-probabilities bit for bit, with and without a repetition penalty."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1000, generator=g) * 3
    counts = torch.randint(0, 3, (3, 1000), generator=g, dtype=torch.int32)
    if op == "sample":
        run = lambda: decodekit.sample(x, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3,  # noqa: E731
                                       token_counts=counts, seed=torch.arange(3), return_logprobs=True)
    else:
        run = lambda: (decodekit.sample_logits(x, 1.0, 0.85, 0, seed=torch.arange(3)),)  # noqa: E731
    lane = run()
    assert op not in spy  # the lane: no op implementation was called
    monkeypatch.setattr(_library, "IMPLS", {})  # every call through torch.ops.decodekit
    via_op = run()
    for a, b in zip(lane, via_op, strict=True):
        assert torch.equal(a, b)
