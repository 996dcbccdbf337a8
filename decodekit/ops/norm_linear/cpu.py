"""The PyTorch path of the norm + linear family: the unfused ops, as PyTorch runs them.

On CPU the fused kernel has nothing to save (no launch, no memory round trip worth avoiding), so ``F.layer_norm``
/ ``F.rms_norm`` + ``F.linear`` (one BLAS GEMM) is the fast path; autograd comes from PyTorch. fp16 / bf16 inputs
are normalized in fp32 (with fp32 norm parameters) and rounded once, as the kernel does, so both backends give the
same normalized activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """``None | "gelu" | "gelu_tanh" | "silu"`` applied to ``y``."""
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    return y


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _norm(x: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
    """The normalized input as the kernel forms it: statistics, normalization and the affine parameters in fp32,
    one rounding to ``x``'s dtype. (PyTorch's own fp16/bf16 CPU norms round inside: a constant row, which
    normalizes to exactly 0, comes out as ~1e-5 .. 2e-3 there instead, and an fp32 norm weight would be rounded
    to ``x``'s dtype first.)"""
    if x.dtype == torch.float32:
        return fn(x)
    return fn(x.float()).to(x.dtype)


def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, eps, act):
    """``act(layer_norm(x) @ weight.T + bias)``; the norm in fp32 (parameters included), as in the kernel."""
    k = weight.shape[1]
    h = _norm(x, lambda x32: F.layer_norm(x32, (k,), _f32(norm_weight), _f32(norm_bias), eps))
    return activation(F.linear(h, weight, bias), act)


def rms_norm_linear(x, norm_weight, weight, bias, eps, act):
    """``act(rms_norm(x) @ weight.T + bias)``; the norm in fp32 (weight included), as in the kernel."""
    k = weight.shape[1]
    return activation(F.linear(_norm(x, lambda x32: F.rms_norm(x32, (k,), _f32(norm_weight), eps)), weight, bias), act)


def gelu_linear(x, weight, bias, approximate):
    """``gelu(x) @ weight.T + bias``."""
    return F.linear(F.gelu(x, approximate=approximate), weight, bias)
