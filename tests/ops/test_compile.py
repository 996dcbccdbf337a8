"""torch.compile(fullgraph=True) of every public op, on CPU: no graph break, the eager result, ``opcheck``.

Each public function validates in Python and calls its ``torch.ops.decodekit.*`` custom op (see
``decodekit/ops/_library.py``). Here every op is compiled inside a user function with ``fullgraph=True`` (any
graph break is an error) through a counting backend: exactly one frame is compiled, ``torch._dynamo``'s
``graph_break`` counter stays empty, the decodekit op is a node of the captured graph (it was not traced
through or run eagerly), and the compiled result is the eager one: the same tokens for the same seed, outputs
equal, gradients equal for the differentiable ops. Both backends run: ``"torch"`` (the CPU path) and
``"triton"`` (the real kernels, under the interpreter). ``aot_eager`` is the compiler backend (Dynamo + AOT
autograd, the part that has to see the ops); inductor (C++ codegen, slow to build) compiles the sampler and one
norm + linear op. :func:`torch.library.opcheck` checks schema, fake implementation, autograd registration and
AOT dispatch of every registered op (the table must cover them all).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import decodekit
import decodekit.ops.attention  # noqa: F401  (importing a family registers its ops: the opcheck table below)
import decodekit.ops.norm_linear  # noqa: F401
import decodekit.ops.sampling  # noqa: F401
from decodekit.ops import _library

BACKENDS = ["torch", "triton"]


def run_compiled(fn, *args, ops: tuple[str, ...], backend: str = "aot_eager"):
    """``torch.compile(fn, fullgraph=True)(*args)`` with the checks every test shares."""
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend(backend)
    out = torch.compile(fn, backend=cnt, fullgraph=True)(*args)
    assert cnt.frame_count == 1, cnt.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    targets = {str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ops:  # the packet (torch.ops.decodekit.x) or its overload (a CustomOpDef called directly)
        assert {f"decodekit.{op}", f"decodekit.{op}.default"} & targets, (op, sorted(targets))
    return out


def _logits(B: int, V: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 3).to(dtype)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("backend, B, V", [("torch", 1, 7), ("torch", 5, 131), ("triton", 3, 29)])
def test_sample_per_row_everything(backend, B, V):
    logits = _logits(B, V, B * V)
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 3, (B, V), generator=g)
    temp = torch.rand(B, generator=g) + 0.5
    top_p = torch.rand(B, generator=g) * 0.5 + 0.5
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 11

    def fn(logits, temp, top_p, counts, seeds):
        return decodekit.sample(logits, temperature=temp, top_k=17, top_p=top_p, min_p=0.02, repetition_penalty=1.2,
                                presence_penalty=0.1, frequency_penalty=0.05, token_counts=counts, seed=seeds,
                                return_logprobs=True, check=True, backend=backend)

    tok_e, lp_e = fn(logits, temp, top_p, counts, seeds)
    tok_c, lp_c = run_compiled(fn, logits, temp, top_p, counts, seeds, ops=("sample",))
    assert tok_c.dtype == torch.int64 and tok_c.shape == (B,)
    torch.testing.assert_close(tok_c, tok_e, rtol=0, atol=0)
    torch.testing.assert_close(lp_c, lp_e, rtol=0, atol=0)
    assert (tok_c >= 0).all()


# the Triton sampler runs slowly under the interpreter: its cases keep to the filters without a search pass
FILTERS = {"torch": dict(temperature=0.7, top_k=20, top_p=0.9), "triton": dict(temperature=0.7, min_p=0.1)}


@pytest.mark.parametrize("backend", ["torch"])  # sampling_probs' kernel: test_opcheck (fake vs real) and below
def test_sample_shared_seed_and_probs(backend):
    logits = _logits(4, 97, 3, torch.bfloat16)

    def fn(logits):
        tok = decodekit.sample(logits, seed=1234, backend=backend, **FILTERS[backend])
        probs = decodekit.sampling_probs(logits, backend=backend, **FILTERS[backend])
        return tok, probs

    tok_e, probs_e = fn(logits)
    tok_c, probs_c = run_compiled(fn, logits, ops=("sample", "sampling_probs"))
    torch.testing.assert_close(tok_c, tok_e, rtol=0, atol=0)
    torch.testing.assert_close(probs_c, probs_e, rtol=0, atol=0)
    assert (probs_c[torch.arange(4), tok_c] > 0).all()  # the drawn token is in the kept set


@pytest.mark.parametrize("backend", ["torch"])  # their kernels: test_opcheck (fake vs real), the time budget
def test_sample_logits_and_simple_batch(backend):
    logits = _logits(6, 53, 5)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9], dtype=torch.int64)

    def fn(logits, seeds):
        a = decodekit.sample_logits(logits, 1.0, 0.95, 20, seed=seeds, backend=backend)
        b = decodekit.sampler_simple_batch(logits, noise=0.5, temp=0.8, seed=7, backend=backend)
        return a, b

    a_e, b_e = fn(logits, seeds)
    a_c, b_c = run_compiled(fn, logits, seeds, ops=("sample_logits", "sampler_simple_batch"))
    assert a_c.shape == (6, 1) and b_c.shape == (6, 1)
    torch.testing.assert_close(a_c, a_e, rtol=0, atol=0)
    torch.testing.assert_close(b_c, b_e, rtol=0, atol=0)


def test_sampler_under_inductor():
    """The calls of the issue (inductor failed on uint64 promotion, fullgraph on a data-dependent branch)."""
    x = _logits(4, 1000, 0)

    def fn(x):
        return decodekit.sample(x, temperature=0.8, top_p=0.9, seed=1), decodekit.sample_logits(x, seed=2)

    eager = fn(x)
    compiled = run_compiled(fn, x, ops=("sample", "sample_logits"), backend="inductor")
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_seed_none_draws_from_torch_generator_in_the_graph():
    """``seed=None``: the seed is a random op of the graph (not a constant baked in at trace time); under
    aot_eager it comes from torch's default generator exactly as in eager."""
    x = torch.zeros(16, 1000)  # uniform rows: every token equally likely

    def fn(x):
        return decodekit.sample(x)

    torch.manual_seed(123)
    eager = fn(x)
    torch.manual_seed(123)
    first = run_compiled(fn, x, ops=("sample",))
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert not torch.equal(compiled(x), compiled(x))  # fresh draws on every call (p of a tie ~ 1e-48)


_MASK = torch.tensor([[True, False, True, True]])
OTHER_SAMPLING = {  # the sampling ops of the beam-search and diffusion / RWKV issues: (call, input, custom op)
    "beam_candidates": (lambda x: decodekit.ops.sampling.beam_candidates(
        x, torch.tensor([0.0, -1.0, -2.0] * 2), 3, do_sample=True, top_k=4, seed=3), (6, 11), "beam_candidates"),
    "sample_block": (lambda x: decodekit.ops.sampling.sample_block(x, _MASK, temperature=0.8, top_k=5, seed=1),
                     (1, 4, 13), "sample_block"),
    "block_probs": (lambda x: decodekit.ops.sampling.block_probs(x, _MASK, top_p=0.9), (1, 4, 13), "block_probs"),
    "rwkv_sample_logits": (lambda x: decodekit.ops.sampling.rwkv_sample_logits(x, 1.0, 0.85, 4, seed=2), (2, 13),
                           "rwkv_sample_logits"),
    "rwkv_sampling_probs": (lambda x: decodekit.ops.sampling.rwkv_sampling_probs(x, 0.7, 0.9), (2, 13),
                            "rwkv_sampling_probs"),
    # plain PyTorch functions (no custom op): they must trace without a graph break too
    "select_positions": (lambda x: decodekit.ops.sampling.select_positions(x.softmax(-1), x > 0, k=2), (2, 8), None),
    "transfer_schedule": (lambda x: decodekit.ops.sampling.transfer_schedule(x > 0, 3), (2, 8), None),
}


@pytest.mark.parametrize("name", list(OTHER_SAMPLING))
def test_other_sampling_ops(name):
    call, shape, op = OTHER_SAMPLING[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    eager = call(x)
    compiled = run_compiled(call, x, ops=(op,) if op else ())
    eager, compiled = (eager, compiled) if isinstance(eager, tuple) else ((eager,), (compiled,))
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


# --------------------------------------------------------------------------- norm + linear


def _norm_linear_inputs(op: str, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(7)
    m, k, n = 5, 48, 19  # odd sizes: every block is partial
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    x, w, b = mk(2, m, k), (torch.randn(n, k, generator=g) / k**0.5).to(dtype).requires_grad_(), mk(n)
    nw, nb = (torch.rand(k, generator=g) + 0.5).requires_grad_(), mk(k)
    if op == "layer_norm_linear":
        return lambda be: decodekit.layer_norm_linear(x, nw, nb, w, b, 1e-5, "gelu_tanh", backend=be), [x, nw, nb, w, b]
    if op == "rms_norm_linear":
        return lambda be: decodekit.rms_norm_linear(x, nw, w, b, 1e-6, "silu", backend=be), [x, nw, w, b]
    return lambda be: decodekit.gelu_linear(x, w, b, "tanh", backend=be), [x, w, b]


NORM_LINEAR = ["layer_norm_linear", "rms_norm_linear", "gelu_linear"]


def _grads(y: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Gradients of a fixed, non-uniform function of ``y`` (through the compiled backward for a compiled ``y``)."""
    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    return torch.autograd.grad((y.float() * dy).sum(), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", NORM_LINEAR)
def test_norm_linear_forward_and_gradients(op, backend):
    call, leaves = _norm_linear_inputs(op)
    y_e = call(backend)
    y_c = run_compiled(lambda: call(backend), ops=(op,))
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    assert y_c.requires_grad
    for name, c, e in zip(op, _grads(y_c, leaves), _grads(y_e, leaves), strict=False):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_rms_norm_linear_under_inductor():
    """Inference (the backward is AOT autograd's business, checked above; inductor only generates its code)."""
    call, _ = _norm_linear_inputs("rms_norm_linear")
    with torch.no_grad():
        y_e = call("torch")
        y_c = run_compiled(lambda: call("torch"), ops=("rms_norm_linear",), backend="inductor")
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_forward_lse_and_gradients(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 7, 16, generator=g).requires_grad_()
    k = torch.randn(2, 2, 11, 16, generator=g).requires_grad_()  # GQA, S_k prime
    v = torch.randn(2, 2, 11, 16, generator=g).requires_grad_()
    kv_start = torch.tensor([0, 3])

    def fn(q, k, v, kv_start):
        out = decodekit.attention(q, k, v, causal=True, q_offset=4, kv_start=kv_start, backend=backend)
        _, lse = decodekit.attention(q.detach(), k.detach(), v.detach(), causal=True, q_offset=4, kv_start=kv_start,
                                     return_lse=True, backend=backend)
        return out, lse

    out_e, lse_e = fn(q, k, v, kv_start)
    out_c, lse_c = run_compiled(fn, q, k, v, kv_start, ops=("attention",))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, rtol=1e-5, atol=1e-5)
    for c, e in zip(_grads(out_c, [q, k, v]), _grads(out_e, [q, k, v]), strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention(backend):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 2, 16, generator=g)
    kc, vc = torch.randn(3, 1, 23, 16, generator=g), torch.randn(3, 1, 23, 16, generator=g)
    lens = torch.tensor([2, 23, 9], dtype=torch.int32)

    def fn(q, kc, vc, lens):
        return decodekit.decode_attention(q, kc, vc, lens, kv_start=torch.zeros_like(lens), backend=backend)

    torch.testing.assert_close(run_compiled(fn, q, kc, vc, lens, ops=("decode_attention",)), fn(q, kc, vc, lens),
                               rtol=1e-5, atol=1e-5)


def test_dynamic_shapes():
    """``dynamic=True``: the fake implementations take symbolic sizes; batch / row counts change without a graph
    break and every size gives the eager result (Python scalar parameters may be symbolic floats too)."""
    torch._dynamo.reset()
    counters.clear()
    sample = torch.compile(lambda x, s: decodekit.sample(x, temperature=0.7, top_k=5, seed=s), fullgraph=True,
                           dynamic=True, backend="aot_eager")
    w, nw = torch.randn(7, 16), torch.rand(16) + 0.5
    norm = torch.compile(lambda x: decodekit.rms_norm_linear(x, nw, w, activation="silu"), fullgraph=True,
                         dynamic=True, backend="aot_eager")
    decode = torch.compile(lambda q, kv, n: decodekit.decode_attention(q, kv, kv, n), fullgraph=True, dynamic=True,
                           backend="aot_eager")
    for B in (2, 3, 6):
        x, seeds = torch.randn(B, 50), torch.arange(B) * 31
        torch.testing.assert_close(sample(x, seeds), decodekit.sample(x, temperature=0.7, top_k=5, seed=seeds),
                                   rtol=0, atol=0)
        h = torch.randn(B, 3, 16)
        torch.testing.assert_close(norm(h), decodekit.rms_norm_linear(h, nw, w, activation="silu"))
        q, kv, n = torch.randn(B, 4, 1, 8), torch.randn(B, 2, 10, 8), torch.arange(B, dtype=torch.int32) + 5
        torch.testing.assert_close(decode(q, kv, n), decodekit.decode_attention(q, kv, kv, n))
    assert not counters["graph_break"], dict(counters["graph_break"])


# --------------------------------------------------------------------------- bad input under compile


def _eager_error(fn, *args) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    return info.value


BAD_CALLS = {
    "sample dtype": (lambda x: decodekit.sample(x.int(), seed=1), TypeError),
    "sample top_p": (lambda x: decodekit.sample(x, top_p=1.5, seed=1), ValueError),
    "sample seed shape": (lambda x: decodekit.sample(x, seed=torch.zeros(3, dtype=torch.int64)), ValueError),
    "rms_norm_linear K": (lambda x: decodekit.rms_norm_linear(x, None, torch.randn(4, 9)), ValueError),
    "attention heads": (lambda x: decodekit.attention(x[None, None], x[None, None].expand(1, 2, 4, 16), x[None, None]
                                                      .expand(1, 2, 4, 16)), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_trace_time_errors_are_the_eager_errors(case):
    """Shapes and dtypes are checked while Dynamo traces: without ``fullgraph`` the very exception of eager is
    raised; with ``fullgraph=True`` Dynamo reports it as an ``Unsupported`` error whose message carries the same
    text (Dynamo wraps every exception raised at trace time in fullgraph mode)."""
    fn, kind = BAD_CALLS[case]
    x = torch.randn(4, 16)
    expected = _eager_error(fn, x)
    assert type(expected) is kind
    torch._dynamo.reset()
    with pytest.raises(kind) as info:
        torch.compile(fn, backend="aot_eager")(x)
    assert str(info.value) == str(expected)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    assert str(expected) in str(info.value)


VALUE_ERRORS = {
    "sample check=True": lambda x: decodekit.sample(torch.where(torch.arange(4)[:, None] == 2, float("nan"), x),
                                                    seed=1, check=True),
    "per-row temperature < 0": lambda x: decodekit.sample(x, temperature=torch.tensor([1.0, 0.5, -1.0, 1.0]), seed=0),
    "per-row top_k < 0": lambda x: decodekit.sampling_probs(x, top_k=torch.tensor([1, -2, 3, 4])),
    "validate_lengths": lambda x: decodekit.decode_attention(x[:, None, None], x[:, None, None], x[:, None, None],
                                                             torch.tensor([1, 1, 2, 1], dtype=torch.int32)),
}


@pytest.mark.parametrize("case", list(VALUE_ERRORS))
def test_value_checks_raise_the_same_error_compiled(case):
    """Checks that read tensor values run inside the ops at run time: the compiled function (fullgraph, no
    graph break) raises the same ``ValueError`` as eager."""
    fn = VALUE_ERRORS[case]
    x = torch.randn(4, 16)
    expected = _eager_error(fn, x)
    assert type(expected) is ValueError
    torch._dynamo.reset()
    counters.clear()
    with pytest.raises(ValueError) as info:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    assert str(info.value) == str(expected)
    assert not counters["graph_break"]


# --------------------------------------------------------------------------- opcheck


class _CaptureOps(TorchDispatchMode):
    """Records every ``decodekit::*`` op call (with its real arguments) made by the public functions."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func.namespace == _library.NAMESPACE:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _t(*shape, seed: int, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_() if grad else t


def _public_calls(backend: str) -> None:
    """One small call of every public op on ``backend`` (gradients through the differentiable ones). The
    Triton sampler cases skip the search passes (no top-k / top-p): the interpreter is slow."""
    B, V = 3, 37
    lg = _t(B, V, seed=1) * 2
    counts = torch.randint(0, 3, (B, V), generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([5, 6, 7], dtype=torch.int64)
    temp = torch.tensor([0.5, 1.0, 2.0])
    filt = dict(top_k=5, top_p=0.9) if backend == "torch" else {}
    decodekit.sample(lg, temperature=temp, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.1,
                     token_counts=counts, seed=seeds, return_logprobs=True, backend=backend, **filt)
    decodekit.sampling_probs(lg, temperature=0.8, min_p=0.05, token_counts=counts, backend=backend, **filt)
    tk, tp = (5, 0.9) if backend == "torch" else (0, 0.0)
    decodekit.sample_logits(lg, 1.0, tp, tk, seed=42, backend=backend)
    decodekit.ops.sampling.sample_logits_probs(lg, 1.0, tp, tk, backend=backend)
    decodekit.sampler_simple_batch(lg, noise=torch.tensor([1.0, 0.0, 0.5]), temp=0.7, seed=seeds, backend=backend)
    x, nw, nb = _t(2, 3, 24, seed=3, grad=True), _t(24, seed=4, grad=True), _t(24, seed=5, grad=True)
    w, b = _t(10, 24, seed=6, grad=True), _t(10, seed=7, grad=True)
    ys = [decodekit.layer_norm_linear(x, nw, nb, w, b, activation="silu", backend=backend),
          decodekit.rms_norm_linear(x, nw, w, None, backend=backend),
          decodekit.gelu_linear(x, w, b, approximate="tanh", backend=backend)]
    q, k, v = _t(1, 4, 5, 8, seed=8, grad=True), _t(1, 2, 6, 8, seed=9, grad=True), _t(1, 2, 6, 8, seed=10, grad=True)
    ys.append(decodekit.attention(q, k, v, causal=True, q_offset=1, kv_start=torch.tensor([1]), backend=backend))
    sum(y.float().square().sum() for y in ys).backward()  # the backward ops run too
    decodekit.decode_attention(q.detach(), k.detach(), v.detach(), torch.tensor([6], dtype=torch.int32),
                               backend=backend)
    if backend == "torch":  # the sampling ops of the other issues (their kernels are tested in their own files)
        decodekit.ops.sampling.beam_candidates(_t(6, 11, seed=11), torch.tensor([0.0, -1.0, -2.0] * 2), 3,
                                               do_sample=True, top_k=4, seed=3, backend=backend)
        masked = torch.tensor([[True, False, True, True]])
        decodekit.ops.sampling.sample_block(_t(1, 4, 13, seed=12), masked, temperature=0.8, top_k=5, seed=1,
                                            backend=backend)
        decodekit.ops.sampling.block_probs(_t(1, 4, 13, seed=12), masked, top_p=0.9, backend=backend)
        decodekit.ops.sampling.rwkv_sample_logits(_t(2, 13, seed=13), 1.0, 0.85, 4, seed=2, backend=backend)
        decodekit.ops.sampling.rwkv_sampling_probs(_t(2, 13, seed=13), 0.7, 0.9, backend=backend)


@functools.cache
def _opcheck_cases() -> dict[str, list[tuple[str, torch._ops.OpOverload, tuple, dict]]]:
    """qualified op name -> the calls the public functions made, per backend."""
    cases: dict[str, list] = {}
    for backend in BACKENDS:
        with _CaptureOps() as capture:
            _public_calls(backend)
        for func, args, kwargs in capture.calls:
            cases.setdefault(func._schema.name, []).append((backend, func, args, kwargs))
    return cases


def test_opcheck_table_covers_every_registered_op():
    missing = sorted(set(_library.OPS) - set(_opcheck_cases()))
    assert not missing, f"custom ops no public call in tests/ops/test_compile.py reaches: {missing}"


@pytest.mark.parametrize("name", sorted(_library.OPS))
def test_opcheck(name):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration and AOT dispatch."""
    cases = _opcheck_cases().get(name, [])
    assert cases, f"{name}: no public call reaches it (see test_opcheck_table_covers_every_registered_op)"
    seen = set()
    for backend, func, args, kwargs in cases:
        if backend in seen:  # one call per backend is enough
            continue
        seen.add(backend)
        if name == "decodekit::attention_backward":  # no double backward: the op is checked without autograd
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        # the Triton calls (interpreter) check the schema and the fake implementation against the kernels; the
        # full suite (autograd registration, AOT dispatch with dynamic shapes) runs on the PyTorch path
        utils = ("test_schema", "test_faketensor") if backend == "triton" and len(cases) > 1 else None
        torch.library.opcheck(func, args, kwargs, **({"test_utils": utils} if utils else {}))
