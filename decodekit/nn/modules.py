"""Drop-in ``nn.Module``s over the fused norm + Linear kernels.

* :class:`LayerNormLinear` -- ``act(Linear(LayerNorm(x)))``; parameters ``norm_weight``, ``norm_bias``,
  ``weight``, ``bias`` (state_dict keys of the same names).
* :class:`RMSNormLinear` -- ``act(Linear(RMSNorm(x)))``; parameters ``norm_weight``, ``weight``, ``bias``.
* :class:`GeluLinear` -- ``Linear(gelu(x))``; parameters ``weight``, ``bias``.

``from_modules(norm, linear)`` builds one around existing modules and *shares* their ``nn.Parameter``
objects (no copy): training, ``load_state_dict`` and ``.to()`` on either side are seen by both.
``linear`` may be an ``nn.Linear`` (weight ``[N, K]``) or a Hugging Face GPT-2 ``Conv1D`` (weight
``[K, N]``); for the latter the module keeps the ``[K, N]`` parameter and hands the kernel its transposed
view, which the kernel reads in place through its strides.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decodekit.ops.norm_linear import ACTIVATIONS, gelu_linear, layer_norm_linear, rms_norm_linear

#: class names of RMSNorm modules whose semantics are ``x * rsqrt(mean(x^2) + eps) * weight``
#: (nn.RMSNorm and decodekit's RMSNorm are both called "RMSNorm"; Gemma's ``(1 + weight)`` variant is not listed)
RMS_NORM_CLASSES = ("RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _linear_layout(linear: nn.Module, op: str) -> tuple[str, int, int]:
    """('out_in' | 'in_out', K, N) for an nn.Linear or a GPT-2 Conv1D; ValueError naming ``linear`` otherwise."""
    if isinstance(linear, nn.Linear):
        return "out_in", linear.in_features, linear.out_features
    if type(linear).__name__ == "Conv1D" and hasattr(linear, "nf") and getattr(linear, "weight", None) is not None:
        k, n = linear.weight.shape
        return "in_out", k, n
    raise ValueError(f"{op}: linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")


def _rms_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", None)
    if eps is None:  # nn.RMSNorm(eps=None) uses the machine epsilon of the input dtype
        w = getattr(norm, "weight", None)
        eps = torch.finfo(w.dtype if w is not None else torch.get_default_dtype()).eps
    return float(eps)


def _gelu_approximate(act: nn.Module) -> str:
    """'none' or 'tanh' for a GELU module (torch or transformers); ValueError otherwise."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name = type(act).__name__
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "tanh"
    if name == "GELUActivation":
        return "none"
    raise ValueError(f"GeluLinear.from_modules: act must be a GELU module, got {name}")


class _FusedLinearBase(nn.Module):
    """Shared Linear half: ``weight`` in ``nn.Linear`` layout ``[N, K]`` or Conv1D layout ``[K, N]``."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_linear(self, in_features, out_features, bias, device, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.weight_layout = "out_in"
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _reset_linear(self) -> None:
        # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _share_linear(self, linear: nn.Module, op: str) -> int:
        layout, k, n = _linear_layout(linear, op)
        self.in_features, self.out_features, self.weight_layout = k, n, layout
        self.weight = linear.weight
        self.bias = linear.bias
        return k

    def weight_nk(self) -> torch.Tensor:
        """The weight as the kernel reads it, ``[N, K]`` (a transposed view for the Conv1D layout)."""
        return self.weight if self.weight_layout == "out_in" else self.weight.t()

    def _linear_repr(self) -> str:
        layout = "" if self.weight_layout == "out_in" else ", weight_layout=in_out"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}"


class LayerNormLinear(_FusedLinearBase):
    """``act(LayerNorm(x) @ weight.T + bias)`` in one kernel (:func:`decodekit.layer_norm_linear`).

    Parameters
    ----------
    in_features, out_features : int
        K and N.
    bias : bool
        Linear bias.
    eps : float
        LayerNorm epsilon.
    norm_bias : bool
        LayerNorm bias (``nn.LayerNorm(bias=...)``).
    activation : None, "gelu", "gelu_tanh" or "silu"
        Applied to the output in the kernel's epilogue.
    backend : "auto", "triton" or "torch"
        Dispatch rule of :mod:`decodekit.ops._dispatch`.

    Input ``[..., K]``, output ``[..., N]``; fp32/fp16/bf16. See :func:`decodekit.layer_norm_linear` for the
    saved-tensor memory of training, determinism and CUDA-graph notes.

    Example
    -------
    >>> ln, lin = nn.LayerNorm(64), nn.Linear(64, 32)
    >>> fused = LayerNormLinear.from_modules(ln, lin)
    >>> fused.weight is lin.weight and fused.norm_weight is ln.weight
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        eps: float = 1e-5,
        norm_bias: bool = True,
        activation: str | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"LayerNormLinear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.eps, self.activation, self.backend = eps, activation, backend
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))
        if norm_bias:
            self.norm_bias = nn.Parameter(torch.zeros(in_features, device=device, dtype=dtype))
        else:
            self.register_parameter("norm_bias", None)
        self._init_linear(in_features, out_features, bias, device, dtype)
        self._reset_linear()

    @classmethod
    def from_modules(
        cls, norm: nn.LayerNorm, linear: nn.Module, *, activation: str | None = None, backend: str = "auto"
    ) -> LayerNormLinear:
        """Fuse an existing ``nn.LayerNorm`` and ``nn.Linear``/``Conv1D``, sharing their parameters."""
        op = "LayerNormLinear.from_modules"
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise ValueError(f"{op}: norm must be an nn.LayerNorm over the last dim, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        k = self._share_linear(linear, op)
        if norm.normalized_shape[0] != k:
            raise ValueError(f"{op}: norm has {norm.normalized_shape[0]} features but linear expects K={k}")
        self.eps, self.activation, self.backend = norm.eps, activation, backend
        self.norm_weight = norm.weight  # None when elementwise_affine=False
        self.norm_bias = norm.bias
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_linear(
            x, self.norm_weight, self.norm_bias, self.weight_nk(), self.bias, self.eps, self.activation,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self._linear_repr()}, eps={self.eps}, activation={self.activation}"


class RMSNormLinear(_FusedLinearBase):
    """``act(RMSNorm(x) @ weight.T + bias)`` in one kernel (:func:`decodekit.rms_norm_linear`).

    Same arguments as :class:`LayerNormLinear` without ``norm_bias`` (``eps`` defaults to 1e-6).
    ``from_modules`` accepts ``nn.RMSNorm``, decodekit's ``RMSNorm`` and Hugging Face's Llama-style RMSNorms
    (class names in ``RMS_NORM_CLASSES``).

    Example
    -------
    >>> norm, lin = nn.RMSNorm(64, eps=1e-6), nn.Linear(64, 128, bias=False)
    >>> fused = RMSNormLinear.from_modules(norm, lin, activation="silu")
    >>> fused(torch.randn(2, 64)).shape
    torch.Size([2, 128])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        eps: float = 1e-6,
        activation: str | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"RMSNormLinear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.eps, self.activation, self.backend = eps, activation, backend
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))
        self._init_linear(in_features, out_features, bias, device, dtype)
        self._reset_linear()

    @classmethod
    def from_modules(
        cls, norm: nn.Module, linear: nn.Module, *, activation: str | None = None, backend: str = "auto"
    ) -> RMSNormLinear:
        """Fuse an existing RMSNorm and ``nn.Linear``/``Conv1D``, sharing their parameters."""
        op = "RMSNormLinear.from_modules"
        if type(norm).__name__ not in RMS_NORM_CLASSES:
            raise ValueError(f"{op}: norm must be one of {RMS_NORM_CLASSES}, got {type(norm).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        k = self._share_linear(linear, op)
        w = getattr(norm, "weight", None)
        if w is not None and tuple(w.shape) != (k,):
            raise ValueError(f"{op}: norm weight has shape {tuple(w.shape)} but linear expects K={k}")
        self.eps, self.activation, self.backend = _rms_eps(norm), activation, backend
        self.norm_weight = w
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_linear(
            x, self.norm_weight, self.weight_nk(), self.bias, self.eps, self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"{self._linear_repr()}, eps={self.eps}, activation={self.activation}"


class GeluLinear(_FusedLinearBase):
    """``gelu(x) @ weight.T + bias`` with the GELU in the kernel's prologue (:func:`decodekit.gelu_linear`).

    Parameters: ``in_features``, ``out_features``, ``bias``, ``approximate`` ("none" | "tanh"), ``backend``.
    Training saves only ``x`` (``gelu(x)`` is recomputed in the backward).

    Example
    -------
    >>> fused = GeluLinear.from_modules(nn.GELU(approximate="tanh"), nn.Linear(64, 16))
    >>> fused.approximate
    'tanh'
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        approximate: str = "none",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluLinear: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate, self.backend = approximate, backend
        self._init_linear(in_features, out_features, bias, device, dtype)
        self._reset_linear()

    @classmethod
    def from_modules(cls, act: nn.Module, linear: nn.Module, *, backend: str = "auto") -> GeluLinear:
        """Fuse a GELU module (``nn.GELU`` or transformers' GELU activations) into the following Linear."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.approximate = _gelu_approximate(act)
        self._share_linear(linear, "GeluLinear.from_modules")
        self.backend = backend
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_linear(x, self.weight_nk(), self.bias, self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self._linear_repr()}, approximate={self.approximate!r}"

