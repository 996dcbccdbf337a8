"""Small building blocks of the decoders: RMSNorm, rotary position embedding, the two MLPs.

Everything here is plain PyTorch written to export cleanly with ``torch.onnx.export(..., dynamo=True)``:
no data-dependent Python control flow, no in-place updates of inputs, shapes derived from tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` only when needed (a no-op ``.to`` still costs a node in the exported graph)."""
    return x if x.dtype == dtype else x.to(dtype)


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
        xf = cast(x, torch.float32)
        # a division by sqrt, not a product with rsqrt: ONNX Runtime fuses exactly this pattern of the export into
        # one SimplifiedLayerNormalization node (the rsqrt form stays seven nodes per norm)
        y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast(y * cast(self.weight, torch.float32), x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim / 2`` (fp32, shape ``[head_dim // 2]``)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width ``(cos, signed_sin)``, each fp32 ``[B, 1, S, head_dim]``, laid out for :func:`apply_rotary`.

    Element ``j`` holds the angle of the pair that ``j`` belongs to: ``(2i, 2i+1)`` share angle ``i`` in the
    ``"adjacent"`` layout, ``(i, i + D/2)`` in the ``"halves"`` layout. The sine carries the rotation's sign:
    ``-sin`` on the first element of each pair, ``+sin`` on the second. Computed once per forward.
    """
    angles = cast(position_ids, torch.float32)[:, None, :, None] * inv_freq  # [B, 1, S, D/2]
    sin = torch.sin(angles)
    if layout == "adjacent":
        cos = torch.stack((torch.cos(angles), torch.cos(angles)), dim=-1).flatten(-2)  # c0 c0 c1 c1 ...
        signed_sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # -s0 s0 -s1 s1 ...
    elif layout == "halves":
        cos = torch.cat((torch.cos(angles), torch.cos(angles)), dim=-1)  # c0 c1 ... c0 c1 ...
        signed_sin = torch.cat((-sin, sin), dim=-1)  # -s0 -s1 ... s0 s1 ...
    else:
        raise ValueError(f"layout must be 'adjacent' or 'halves', got {layout!r}")
    return cos, signed_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate pairs of ``x`` ``[B, H, S, D]`` by the angles behind ``cos``/``signed_sin`` ``[B, 1, S, D]``.

    ``layout="adjacent"`` pairs ``(2i, 2i+1)`` (llama2.c); ``layout="halves"`` pairs ``(i, i + D/2)``
    (Hugging Face). With ``(a, b)`` a pair, the result is ``(a cos - b sin, b cos + a sin)``, written as
    ``x * cos + swap(x) * signed_sin`` where ``swap`` exchanges the two elements of each pair: one flip,
    the same for both layouts and cheap in the exported graph (the signs live in ``signed_sin``, built once
    per forward by :func:`rotary_cos_sin`). Computed in fp32 and cast back to ``x.dtype``; the roundings are
    those of llama2.c's ``v0*fcr - v1*fci`` (adding ``b * (-sin)`` is exactly subtracting ``b * sin``).
    """
    xf = cast(x, torch.float32)
    d = xf.shape[-1]
    if layout not in ("adjacent", "halves"):
        raise ValueError(f"layout must be 'adjacent' or 'halves', got {layout!r}")
    if torch.onnx.is_in_onnx_export():
        # one MatMul by a 0/1 permutation (exact on finite values: one input times 1 plus zeros) instead of the
        # reshape-flip-reshape below, which the exporter writes as three nodes per call: 20 fewer nodes in a
        # stories260K step, where ONNX Runtime's cost is per node
        swapped = xf @ swap_matrix(d, layout, xf.device)
    elif layout == "adjacent":
        swapped = xf.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)  # (b, a) for each pair (a, b)
    else:
        swapped = xf.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)  # second half first
    return cast(xf * cos + swapped * signed_sin, x.dtype)


def swap_matrix(d: int, layout: str, device: torch.device | None = None) -> torch.Tensor:
    """fp32 ``[d, d]`` 0/1 matrix ``M`` with ``x @ M`` the pair swap of :func:`apply_rotary`."""
    # built from Python lists: under export it is one constant, not a subgraph of arange / index_put
    src = [j ^ 1 if layout == "adjacent" else (j + d // 2) % d for j in range(d)]  # output j reads input src[j]
    return torch.tensor([[1.0 if src[j] == i else 0.0 for j in range(d)] for i in range(d)], device=device)


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
