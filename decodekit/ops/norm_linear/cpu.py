"""The PyTorch path of the norm + linear family: the unfused ops, as PyTorch runs them.

On CPU the fused kernel has nothing to save (no launch, no memory round trip worth avoiding), so ``F.layer_norm``
/ ``F.rms_norm`` + ``F.linear`` (one BLAS GEMM) is the fast path; autograd comes from PyTorch.
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


def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, eps, act):
    """``act(layer_norm(x) @ weight.T + bias)``; the norm parameters are used in ``x``'s dtype."""
    k = weight.shape[1]
    nw = norm_weight.to(x.dtype) if norm_weight is not None else None
    nb = norm_bias.to(x.dtype) if norm_bias is not None else None
    return activation(F.linear(F.layer_norm(x, (k,), nw, nb, eps), weight, bias), act)


def rms_norm_linear(x, norm_weight, weight, bias, eps, act):
    """``act(rms_norm(x) @ weight.T + bias)``."""
    k = weight.shape[1]
    nw = norm_weight.to(x.dtype) if norm_weight is not None else None
    return activation(F.linear(F.rms_norm(x, (k,), nw, eps), weight, bias), act)


def gelu_linear(x, weight, bias, approximate):
    """``gelu(x) @ weight.T + bias``."""
    return F.linear(F.gelu(x, approximate=approximate), weight, bias)
