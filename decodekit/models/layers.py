"""Small building blocks of the decoders: RMSNorm, rotary position embedding, the two MLPs.

Everything here is plain PyTorch written to export cleanly with ``torch.onnx.export(..., dynamo=True)``:
no data-dependent Python control flow, no in-place updates of inputs, shapes derived from tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2, -1) + eps) * weight`` (Llama's norm; computed in fp32, cast back).

    Parameters
    ----------
    dim : int
        Size of the last axis.
    eps : float
        Added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim / 2`` (fp32, shape ``[head_dim // 2]``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles ``pos * inv_freq`` -> ``(cos, sin)``, each fp32 ``[B, 1, S, head_dim // 2]`` (broadcast over heads)."""
    angles = position_ids.float()[:, None, :, None] * inv_freq  # [B, 1, S, D/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate pairs of ``x`` ``[B, H, S, D]`` by the angles behind ``cos``/``sin`` ``[B, 1, S, D/2]``.

    ``layout="adjacent"`` pairs ``(2i, 2i+1)`` (llama2.c); ``layout="halves"`` pairs ``(i, i + D/2)``
    (Hugging Face). Computed in fp32 and cast back to ``x.dtype``.
    """
    xf = x.float()
    if layout == "adjacent":
        pairs = xf.unflatten(-1, (-1, 2))  # [B, H, S, D/2, 2]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    elif layout == "halves":
        half = xf.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    else:
        raise ValueError(f"layout must be 'adjacent' or 'halves', got {layout!r}")
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    """Llama MLP: ``w2(silu(w1(x)) * w3(x))`` with ``w1`` the gate, ``w3`` the up and ``w2`` the down projection."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """GPT-2 MLP: ``c_proj(gelu_tanh(c_fc(x)))``; ``act`` is a module so it can be fused with ``c_proj``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))
