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


# --------------------------------------------------------------------------- statistics and backward (both backends)


def norm_stats(x2d: torch.Tensor, norm: str | None, eps: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``(mean, rstd)`` [M] of the rows of ``x2d`` as the fused kernel computes them (``mean`` for LayerNorm
    only; both None without a norm)."""
    if norm is None:
        return None, None
    x32 = x2d.float()
    if norm == "layer":
        mean = x32.mean(-1)
        return mean, torch.rsqrt((x32 - mean[:, None]).square().mean(-1) + eps)
    return None, torch.rsqrt(x32.square().mean(-1) + eps)


def _act_backward(grad: torch.Tensor, z: torch.Tensor, act: str | None) -> torch.Tensor:
    """d act(z) / dz * grad, in fp32."""
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, z, approximate="none")
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return grad


def norm_linear_backward(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    preact: torch.Tensor | None,
    *,
    eps: float,
    norm: str | None,
    prologue: str | None,
    epilogue: str | None,
    need: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(d_x, d_norm_weight, d_norm_bias, d_weight, d_bias)`` of ``act(norm(x) @ W.T + b)`` in plain
    PyTorch ops (so ``torch.compile`` traces the backward), ``None`` where ``need`` is False.

    ``dy`` and ``x2d`` are 2-D [M, N] / [M, K]. The normalized input ``h`` is recomputed from ``x`` and the fp32
    statistics instead of being saved (the memory the fused op exists to save); ``mean`` / ``rstd`` / ``preact``
    (the pre-activation output, needed with an epilogue activation) are recomputed when not given; ``bias`` is
    read only to recompute ``preact``.
    """
    dtype = x2d.dtype
    if rstd is None and norm is not None:
        mean, rstd = norm_stats(x2d, norm, eps)
    x32 = x2d.float()
    if norm == "layer":
        xhat = (x32 - mean[:, None]) * rstd[:, None]
    elif norm == "rms":
        xhat = x32 * rstd[:, None]
    else:
        xhat = x32
    nw32 = norm_weight.float() if norm_weight is not None else None
    h32 = xhat * nw32 if nw32 is not None else xhat
    if norm_bias is not None:
        h32 = h32 + norm_bias.float()
    pre32 = h32  # input of the prologue activation (GELU + Linear)
    if prologue is not None:
        h32 = activation(pre32, prologue)
    if epilogue is not None and preact is None:
        preact = F.linear(h32.to(dtype), weight, bias)
    # dz: gradient at the pre-activation output, rounded to the GEMM dtype like an unfused Linear's input
    dz32 = _act_backward(dy.float(), preact.float(), epilogue) if epilogue is not None else dy.float()
    dz = dz32.to(dtype)
    d_weight = (dz.t() @ h32.to(dtype)) if need[3] else None  # [N, K]
    d_bias = dz32.sum(0).to(dtype) if need[4] else None  # need[4]: there is a bias and it requires grad
    d_x = d_nw = d_nb = None
    if need[0] or need[1] or need[2]:
        dh = (dz @ weight).float()  # [M, K]
        if prologue is not None:
            dh = _act_backward(dh, pre32, prologue)
        if norm_bias is not None and need[2]:
            d_nb = dh.sum(0).to(norm_bias.dtype)
        if norm_weight is not None and need[1]:
            d_nw = (dh * xhat).sum(0).to(norm_weight.dtype)
        if need[0]:
            dxhat = dh * nw32 if nw32 is not None else dh
            if norm == "layer":
                proj = (dxhat * xhat).mean(-1, keepdim=True)
                d_x = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * proj) * rstd[:, None]
            elif norm == "rms":
                d_x = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd[:, None]
            else:
                d_x = dxhat
            d_x = d_x.to(dtype)
    return d_x, d_nw, d_nb, d_weight, d_bias
