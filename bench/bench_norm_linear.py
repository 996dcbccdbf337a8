"""Fused norm + Linear (one Triton kernel) vs eager norm + ``nn.Linear`` (baseline) and ``torch.compile`` of it.

Shapes per issue 5: decode M in {1, 8, 64} and prefill M in {2048, 8192}, (K, N) in {(2048, 2048),
(4096, 4096), (4096, 11008)}, bf16. Forward for LayerNorm and RMSNorm; forward + backward for RMSNorm
(gradients of x, the norm weight and the weight through ``torch.autograd.grad``, so no ``.grad`` accumulation
is timed). TFLOP/s use 2*M*N*K per forward (6*M*N*K forward + backward); GB/s use the compulsory traffic of
the op (x, W, y; plus dy, dx, dW for the backward). Peak memory of one call (bytes above what was allocated
before it) is stored in ``extra_info["peak_mem_bytes"]``.

CUDA only: on CPU every case is skipped with that reason (the kernel is only meaningful compiled on a GPU).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from bench.conftest import cuda_only, run_bench

pytestmark = cuda_only("CUDA benchmark: the fused norm+Linear Triton kernel is only timed compiled on a GPU")

DTYPE = torch.bfloat16
MS = [1, 8, 64, 2048, 8192]
KNS = [(2048, 2048), (4096, 4096), (4096, 11008)]
IMPLS = ["eager", "torch.compile", "decodekit"]


def _eager_fn(norm: str, k: int):
    def fn(x, nw, nb, w):
        if norm == "layer_norm":
            h = nn.functional.layer_norm(x, (k,), nw, nb, 1e-5)
        else:
            h = nn.functional.rms_norm(x, (k,), nw, 1e-6)
        return nn.functional.linear(h, w)

    return fn


@functools.cache
def _compiled_fn(norm: str, k: int):
    return torch.compile(_eager_fn(norm, k))


def _fused_fn(norm: str):
    import decodekit

    def fn(x, nw, nb, w):
        if norm == "layer_norm":
            return decodekit.layer_norm_linear(x, nw, nb, w, None, 1e-5, backend="triton")
        return decodekit.rms_norm_linear(x, nw, w, None, 1e-6, backend="triton")

    return fn


def _impl_fn(impl: str, norm: str, k: int):
    if impl == "eager":
        return _eager_fn(norm, k)
    if impl == "torch.compile":
        return _compiled_fn(norm, k)
    return _fused_fn(norm)


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _bench(benchmark, impl, norm, mode, m, k, n):
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=DTYPE)
    nw = (1 + 0.1 * torch.randn(k, device=dev)).to(DTYPE)
    nb = (0.1 * torch.randn(k, device=dev)).to(DTYPE) if norm == "layer_norm" else None
    w = (torch.randn(n, k, device=dev) / k**0.5).to(DTYPE)
    op = _impl_fn(impl, norm, k)
    elt = x.element_size()
    if mode == "fwd":
        call = lambda: op(x, nw, nb, w)
        flops = 2.0 * m * n * k
        bytes_moved = elt * (m * k + n * k + m * n)
    else:
        x.requires_grad_(True)
        nw.requires_grad_(True)
        w.requires_grad_(True)
        dy = torch.randn(m, n, device=dev, dtype=DTYPE)

        def call():
            y = op(x, nw, nb, w)
            return torch.autograd.grad(y, (x, nw, w), dy)

        flops = 6.0 * m * n * k
        # forward (x, W, y) + backward (dy, W, x, dx, dW)
        bytes_moved = elt * (m * k + n * k + m * n) + elt * (m * n + n * k + 2 * m * k + n * k)
    call()  # compile / autotune outside the timing
    peak = _peak_bytes(call)
    run_bench(
        benchmark,
        call,
        group=f"norm_linear/{norm}/{mode}/M={m}/K={k}/N={n}",
        impl=impl,
        baseline=impl == "eager",
        bytes_moved=bytes_moved,
        flops=flops,
        dtype="bf16",
        M=m,
        K=k,
        N=n,
        norm=norm,
        mode=mode,
        peak_mem_bytes=peak,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k, n", KNS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norm_linear_forward(benchmark, norm, m, k, n, impl):
    _bench(benchmark, impl, norm, "fwd", m, k, n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k, n", KNS)
@pytest.mark.parametrize("m", MS)
def test_rms_norm_linear_forward_backward(benchmark, m, k, n, impl):
    _bench(benchmark, impl, "rms_norm", "fwd_bwd", m, k, n)
