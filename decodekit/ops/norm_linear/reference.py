"""Plain PyTorch reference semantics of the fused norm + Linear ops (written for clarity, not speed).

Every function computes ``act(norm(x) @ weight.T + bias)`` the unfused way. With ``upcast=False`` it follows
PyTorch's own low-precision pipeline (norm output rounded to ``x.dtype``, Linear in ``x.dtype``, activation in
``x.dtype``), i.e. what eager ``nn.LayerNorm``/RMSNorm + ``nn.Linear`` produce; tests use it to measure
"PyTorch's own error". With ``upcast=True`` every input is cast to fp32 first and the result stays fp32
(pass fp64 tensors for an fp64 reference). All functions are differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _maybe_upcast(upcast: bool, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    if not upcast:
        return list(ts)
    return [None if t is None else (t if t.dtype == torch.float64 else t.float()) for t in ts]


def activation_ref(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The epilogue activations: None, "gelu" (erf), "gelu_tanh", "silu"."""
    if activation is None:
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be None, 'gelu', 'gelu_tanh' or 'silu', got {activation!r}")


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased variance), in x's dtype."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """LLaMA's RMSNorm as Hugging Face writes it: statistics in fp32, rounded to x's dtype, then the weight."""
    x32 = x.float() if x.dtype != torch.float64 else x
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out * weight.to(x.dtype) if weight is not None else out


def layer_norm_linear_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """``act(layer_norm(x) @ weight.T + bias)``; x [..., K], weight [N, K] -> [..., N]."""
    x, norm_weight, norm_bias, weight, bias = _maybe_upcast(upcast, x, norm_weight, norm_bias, weight, bias)
    if not upcast:
        # eager LayerNorm in low precision: PyTorch accumulates in fp32 internally and rounds once
        h = F.layer_norm(
            x,
            x.shape[-1:],
            None if norm_weight is None else norm_weight.to(x.dtype),
            None if norm_bias is None else norm_bias.to(x.dtype),
            eps,
        )
    else:
        h = layer_norm_ref(x, norm_weight, norm_bias, eps)
    return activation_ref(F.linear(h, weight, bias), activation)


def rms_norm_linear_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """``act(rms_norm(x) @ weight.T + bias)``; x [..., K], weight [N, K] -> [..., N]."""
    x, norm_weight, weight, bias = _maybe_upcast(upcast, x, norm_weight, weight, bias)
    return activation_ref(F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias), activation)


def gelu_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    upcast: bool = False,
) -> torch.Tensor:
    """``gelu(x) @ weight.T + bias``; x [..., K], weight [N, K] -> [..., N]."""
    x, weight, bias = _maybe_upcast(upcast, x, weight, bias)
    return F.linear(F.gelu(x, approximate=approximate), weight, bias)
