"""Fused norm + Linear kernels against fp64 references (Triton under the interpreter on CPU, compiled on CUDA).

Coverage of the issue's shape grid: M in {1, 3, 127} (127: a row tail of the 128-row tile), K in {64, 1000}
(1000: several K iterations plus a tail), N in {1, 4*K, 209}. N = 50257 itself is not run under the
interpreter (its cost grows with every weight element loaded: ~5 s per call); 209 = 128 + 81 has the same
last-tile remainder as 50257 for the interpreter's BLOCK_N = 128 (and for 256/512), so the vocab-size
column tail is exercised. Activations and biases are rotated over a smaller grid; fp16/bf16 errors are
bounded by 2x PyTorch's own low-precision error against the same fp64 reference, plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.ops import norm_linear as nl
from decodekit.ops._dispatch import count_launches
from decodekit.ops.norm_linear import triton as nlk
from decodekit.ops.norm_linear.reference import gelu_linear_ref, layer_norm_linear_ref, rms_norm_linear_ref

DTYPES = [
    # dtype, atol (added to the 2x rule), rtol (fp32 only)
    (torch.float32, 1e-5, 1e-4),
    (torch.float16, 1e-3, 0.0),
    (torch.bfloat16, 1e-2, 0.0),
]
OPS = ["layer_norm", "rms_norm", "gelu"]


def _make(op: str, m: int | tuple, k: int, n: int, dtype, device, *, bias=True, norm_bias=True, scale=1.0):
    lead = m if isinstance(m, tuple) else (m,)
    x = (torch.randn(*lead, k, device=device) * 2.0 + 0.5).to(dtype)
    nw = (1.0 + 0.5 * torch.randn(k, device=device)) * scale
    nb = 0.3 * torch.randn(k, device=device) if (norm_bias and op == "layer_norm") else None
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if bias else None
    if op == "gelu":
        nw = None
    return x, nw, nb, w, b


def _call(op, x, nw, nb, w, b, act, backend="triton", **kw):
    if op == "layer_norm":
        return decodekit.layer_norm_linear(x, nw, nb, w, b, activation=act, backend=backend, **kw)
    if op == "rms_norm":
        return decodekit.rms_norm_linear(x, nw, w, b, activation=act, backend=backend, **kw)
    return decodekit.gelu_linear(x, w, b, approximate="tanh" if act == "gelu_tanh" else "none", backend=backend, **kw)


def _ref(op, x, nw, nb, w, b, act, upcast):
    if op == "layer_norm":
        return layer_norm_linear_ref(x, nw, nb, w, b, activation=act, upcast=upcast)
    if op == "rms_norm":
        return rms_norm_linear_ref(x, nw, w, b, activation=act, upcast=upcast)
    return gelu_linear_ref(x, w, b, approximate="tanh" if act == "gelu_tanh" else "none", upcast=upcast)


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def _assert_close(out, ref64, low, dtype, atol, rtol, what="output"):
    """fp32: rtol/atol against fp64; fp16/bf16: error <= 2x PyTorch's own low-precision error + atol."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel result"
    err = (out.double() - ref64).abs()
    if dtype == torch.float32:
        bound = atol + rtol * ref64.abs()
        assert (err <= bound).all(), f"{what}: max err {err.max().item():.3g}"
    else:
        torch_err = (low.double() - ref64).abs().max().item()
        assert err.max().item() <= 2 * torch_err + atol, f"{what}: {err.max().item():.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "m, k, n, act, bias",
    [
        (1, 64, 1, None, True),  # decode, single output column
        (3, 1000, 209, "gelu", False),  # K tail over 8 iterations, 50257-like N tail
        (127, 64, 256, "silu", True),  # N = 4K, row tail
        (1, 1000, 209, "gelu_tanh", True),
        ((2, 3), 64, 256, None, False),  # [..., K] input
        (127, 1000, 1, "gelu_tanh", True),  # full row tile, K tail, one output column
    ],
)
def test_forward_matches_reference(op, m, k, n, act, bias, dtype, atol, rtol, device):
    if op == "gelu" and act is not None and act != "gelu_tanh":
        act = None  # gelu_linear has a prologue GELU (exact or tanh), no epilogue activation
    x, nw, nb, w, b = _make(op, m, k, n, dtype, device, bias=bias)
    with count_launches() as launches:
        out = _call(op, x, nw, nb, w, b, act)
    assert launches["norm_linear_fwd"] == 1
    assert out.shape == (*x.shape[:-1], n) and out.dtype == dtype
    ref64 = _ref(op, *_f64(x, nw, nb, w, b), act, upcast=True)
    low = _ref(op, x, nw, nb, w, b, act, upcast=False)
    _assert_close(out, ref64, low, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:1])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_forward_n_equals_4k_at_k1000(op, dtype, atol, rtol, device):
    """N = 4*K = 4000 with K = 1000 (32 column blocks, 8 K iterations)."""
    x, nw, nb, w, b = _make(op, 3, 1000, 4000, dtype, device)
    out = _call(op, x, nw, nb, w, b, None)
    _assert_close(out, _ref(op, *_f64(x, nw, nb, w, b), None, upcast=True), None, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("act", nl.ACTIVATIONS)
@pytest.mark.parametrize("bias, norm_bias", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_activation_and_bias_grid(op, act, bias, norm_bias, dtype, atol, rtol, device):
    x, nw, nb, w, b = _make(op, 5, 96, 70, dtype, device, bias=bias, norm_bias=norm_bias)
    out = _call(op, x, nw, nb, w, b, act)
    ref64 = _ref(op, *_f64(x, nw, nb, w, b), act, upcast=True)
    _assert_close(out, ref64, _ref(op, x, nw, nb, w, b, act, upcast=False), dtype, atol, rtol)


@pytest.mark.parametrize(
    "config",
    [
        nlk.BlockConfig(16, 32, 32, group_m=2, num_stages=1),  # many row blocks, grouped order, short K steps
        nlk.BlockConfig(16, 32, 128, group_m=1, num_stages=1),  # a decode-family tile
        nlk.BlockConfig(128, 64, 64, group_m=8, num_stages=1),  # a prefill-family tile
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_forced_block_configs(op, config, device):
    """Tile shapes of the GPU config families, multi-row-block grids and grouped ordering (fp32)."""
    x, nw, nb, w, b = _make(op, 127, 100, 70, torch.float32, device)
    out = _call(op, x, nw, nb, w, b, "silu" if op != "gelu" else None, config=config)
    ref64 = _ref(op, *_f64(x, nw, nb, w, b), "silu" if op != "gelu" else None, upcast=True)
    _assert_close(out, ref64, None, torch.float32, 1e-5, 1e-4)


def test_block_configs_split_decode_and_prefill():
    for m in (1, 8, 64):
        cands = nlk.block_configs(m, 4096, 4096, interpreter=False)
        assert all(c.block_m == max(16, 1 << (m - 1).bit_length()) and c.block_n <= 128 for c in cands)
    prefill = nlk.block_configs(2048, 4096, 4096, interpreter=False)
    assert all(c.block_m >= 64 for c in prefill) and len(prefill) > 1
    assert len(nlk.block_configs(2048, 4096, 4096, interpreter=True)) == 1


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_strided_and_sliced_inputs(op, device):
    """x is a column slice of a wider buffer (row stride 2K): read in place, same result as a contiguous copy."""
    k, n = 80, 33
    big = torch.randn(2, 3, 2 * k, device=device)
    x = big[..., :k]
    assert x.stride(-2) == 2 * k
    _, nw, nb, w, b = _make(op, 1, k, n, torch.float32, device)
    out = _call(op, x, nw, nb, w, b, None)
    ref = _ref(op, *_f64(x, nw, nb, w, b), None, upcast=True)
    _assert_close(out, ref, None, torch.float32, 1e-5, 1e-4)
    # a transposed [K, N] weight view (GPT-2 Conv1D layout) needs no copy either
    w_kn = w.t().contiguous()
    out_t = _call(op, x, nw, nb, w_kn.t(), b, None)
    torch.testing.assert_close(out_t, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mu, sd", [(3000.0, 0.01), (300.0, 0.1)])
def test_layer_norm_stats_stable_for_large_mean(mu, sd, device):
    """Rows with |mean| >> std: within 2x of PyTorch's fp32 LayerNorm error, where a naive fp32
    E[x^2] - E[x]^2 estimate (checked here to exceed the bound) loses most of the variance."""
    k = 1000
    x = mu + sd * torch.randn(4, k, device=device)
    nw, w = torch.ones(k, device=device), torch.randn(8, k, device=device) / k**0.5
    out = decodekit.layer_norm_linear(x, nw, None, w, backend="triton")
    ref = layer_norm_linear_ref(*_f64(x, nw), None, w.double(), upcast=True)
    torch_err = (layer_norm_linear_ref(x, nw, None, w).double() - ref).abs().max().item()
    mean = x.mean(-1, keepdim=True)
    naive = ((x - mean) * torch.rsqrt(((x * x).mean(-1, keepdim=True) - mean * mean).clamp_min(0) + 1e-5)) @ w.T
    bound = 2 * torch_err + 1e-5
    assert (naive.double() - ref).abs().max().item() > bound
    assert (out.double() - ref).abs().max().item() <= bound


def test_no_garbage_leaks_from_output_buffers(monkeypatch, device):
    """Every launcher buffer starts as NaN; the kernel must overwrite all of y, the pre-activation and the stats."""
    def nan_empty(shape, dtype, dev):
        return torch.full(shape, float("nan"), dtype=dtype, device=dev)

    monkeypatch.setattr(nlk, "_empty", nan_empty)
    x, nw, nb, w, b = _make("layer_norm", 37, 100, 70, torch.float32, device)
    y, pre, mean, rstd = nlk.norm_linear_fwd(
        x, nw, nb, w, b, eps=1e-5, norm=1, epi_act=3, store_preact=True, store_stats=True
    )
    for t in (y, pre, mean, rstd):
        assert not torch.isnan(t).any()
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))
    torch.testing.assert_close(y, torch.nn.functional.silu(pre))


# --------------------------------------------------------------------------- gradients

GRAD_DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 0.0)]


@pytest.mark.parametrize("dtype, atol, rtol", GRAD_DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("m, k, n, act", [(3, 1000, 209, "gelu_tanh"), (127, 64, 256, None), (1, 64, 1, "silu")])
def test_gradients_of_every_input(op, m, k, n, act, dtype, atol, rtol, device):
    if op == "gelu" and act == "silu":
        act = "gelu"  # exact GELU prologue
    x, nw, nb, w, b = _make(op, m, k, n, dtype, device)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, nw, nb, w, b)]
    out = _call(op, *leaves, act)
    dy = torch.randn_like(out)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, dy)

    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref_present = [t for t in ref_leaves if t is not None]
    ref_grads = torch.autograd.grad(_ref(op, *ref_leaves, act, upcast=True), ref_present, dy.double())
    low_leaves = [None if t is None else t.detach().requires_grad_() for t in leaves]
    low_present = [t for t in low_leaves if t is not None]
    low_grads = torch.autograd.grad(_ref(op, *low_leaves, act, upcast=False), low_present, dy)
    names = [nm for nm, t in zip(("x", "norm_weight", "norm_bias", "weight", "bias"), leaves) if t is not None]
    for name, g, r, lo in zip(names, grads, ref_grads, low_grads):
        assert g.shape == r.shape
        scale = r.abs().max().item() + 1e-12
        if dtype == torch.float32:
            err = (g.double() - r).abs().max().item()
            assert err <= atol + rtol * scale, f"grad {name}: {err:.3g} (scale {scale:.3g})"
        else:
            _assert_close(g, r, lo, dtype, atol * scale, 0.0, what=f"grad {name}")


@pytest.mark.parametrize("op", OPS)
def test_saved_tensor_memory_below_unfused(op, device):
    """saved_tensors_hooks bytes: the fused op keeps no normalized activations (saves M*K elements)."""
    m, k, n = 64, 96, 48
    x, nw, nb, w, b = _make(op, m, k, n, torch.float32, device)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, nw, nb, w, b)]

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    fused = saved_bytes(lambda: _call(op, *leaves, None))
    unfused = saved_bytes(lambda: _ref(op, *leaves, None, upcast=False))
    elt = x.element_size()
    params = sum(t.numel() * t.element_size() for t in leaves[1:4] if t is not None)  # the bias is not saved
    stats = {"layer_norm": 8 * m, "rms_norm": 4 * m, "gelu": 0}[op]
    # fused: exactly x + references to the parameters + fp32 statistics, as the docstrings state
    assert fused == m * k * elt + params + stats
    assert unfused - fused >= m * k * elt, (fused, unfused)


# --------------------------------------------------------------------------- dispatch and bad input


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_is_the_cpu_fast_path(op):
    x, nw, nb, w, b = _make(op, 4, 64, 40, torch.float32, torch.device("cpu"))
    with count_launches() as launches:
        out_auto = _call(op, x, nw, nb, w, b, "gelu_tanh", backend="auto")
        out_torch = _call(op, x, nw, nb, w, b, "gelu_tanh", backend="torch")
    assert not launches
    ref = _ref(op, *_f64(x, nw, nb, w, b), "gelu_tanh", upcast=True)
    _assert_close(out_auto, ref, None, torch.float32, 1e-5, 1e-4)
    torch.testing.assert_close(out_auto, out_torch)


def test_empty_rows(device):
    x = torch.randn(0, 64, device=device)
    out = decodekit.rms_norm_linear(x, None, torch.randn(8, 64, device=device), backend="triton")
    assert out.shape == (0, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(3, 63)), r"x has K=63"),
        (dict(weight=torch.randn(8, 64, dtype=torch.float16)), r"weight must have dtype"),
        (dict(x=torch.randn(3, 64, dtype=torch.float64), weight=torch.randn(8, 64, dtype=torch.float64)), r"\bx must"),
        (dict(norm_weight=torch.randn(65)), r"norm_weight must have shape \(64,\)"),
        (dict(norm_bias=torch.randn(32)), r"norm_bias must have shape"),
        (dict(bias=torch.randn(9)), r"bias must have shape \(8,\)"),
        (dict(bias=torch.randn(8, dtype=torch.bfloat16)), r"bias must have dtype"),
        (dict(weight=torch.randn(8, 64, 1)), r"weight must have 2 dims"),
        (dict(activation="relu"), r"activation must be one of"),
        (dict(eps=-1.0), r"eps must be"),
        (dict(backend="cuda"), r"backend must be one of"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, match):
    """A wrong dtype is a TypeError, any other bad value a ValueError; both name the argument."""
    args = dict(
        x=torch.randn(3, 64),
        norm_weight=torch.randn(64),
        norm_bias=torch.randn(64),
        weight=torch.randn(8, 64),
        bias=torch.randn(8),
        activation=None,
        eps=1e-5,
        backend="triton",
    )
    args.update(kwargs)
    exc = TypeError if "dtype" in match or match == r"\bx must" else ValueError
    with pytest.raises(exc, match=match):
        decodekit.layer_norm_linear(**args)


def test_bad_input_other_ops():
    with pytest.raises(ValueError, match="approximate"):
        decodekit.gelu_linear(torch.randn(2, 8), torch.randn(4, 8), approximate="fast")
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        decodekit.rms_norm_linear(torch.randn(2, 8), torch.randn(7), torch.randn(4, 8))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        decodekit.gelu_linear(torch.randn(2, 8), [[1.0] * 8])


def test_auto_backend_threshold_on_cuda(monkeypatch):
    """``backend="auto"`` on CUDA runs the fused kernel up to FUSED_MAX_ROWS rows and the unfused ops above; an
    explicit ``"triton"`` or a forced config always runs the kernel; CPU paths are left alone. (A stand-in for a
    CUDA tensor: only its device, shape and size are read.)"""
    import types

    import decodekit.ops.norm_linear as nl
    from decodekit.ops.norm_linear.triton import BlockConfig

    def cuda_x(m: int, k: int = 64):
        return types.SimpleNamespace(device=torch.device("cuda"), shape=(m, k), numel=lambda: m * k)

    monkeypatch.setattr(nl, "FUSED_MAX_ROWS", 16)
    assert nl._auto_path("auto", "triton", cuda_x(16), None) == "triton"
    assert nl._auto_path("auto", "triton", cuda_x(17), None) == "torch"
    assert nl._auto_path("triton", "triton", cuda_x(4096), None) == "triton"
    assert nl._auto_path("auto", "triton", cuda_x(4096), BlockConfig(16, 32, 64)) == "triton"
    assert nl._auto_path("auto", "torch", torch.zeros(4096, 64), None) == "torch"
    assert nl._auto_path("auto", "triton", torch.zeros(4096, 64), None) == "triton"  # CPU under the interpreter
    monkeypatch.setattr(nl, "FUSED_MAX_ROWS", 0)  # today's setting: never on CUDA unless asked for
    assert nl._auto_path("auto", "triton", cuda_x(1), None) == "torch"
