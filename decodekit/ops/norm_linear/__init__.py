"""Fused LayerNorm/RMSNorm + Linear and GELU + Linear: the public functions (validation + dispatch).

``layer_norm_linear``, ``rms_norm_linear`` and ``gelu_linear`` validate here, then run the fused Triton kernel
of :mod:`decodekit.ops.norm_linear.triton` (with its autograd Function) or the unfused PyTorch ops of
:mod:`decodekit.ops.norm_linear.cpu`. Plain-PyTorch references for the tests live in
:mod:`decodekit.ops.norm_linear.reference`. Triton is imported on the first kernel launch only.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from decodekit.ops._dispatch import FLOAT_DTYPES, check_tensor, resolve_backend
from decodekit.ops._library import call, custom_op
from decodekit.ops.norm_linear import cpu

if TYPE_CHECKING:
    from decodekit.ops.norm_linear.triton import BlockConfig

__all__ = ["ACTIVATIONS", "layer_norm_linear", "rms_norm_linear", "gelu_linear"]

ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")


#: With ``backend="auto"`` on CUDA, inputs of more rows than this run the unfused ops (the norm, then cuBLAS's GEMM);
#: 0: the fused kernel runs only when asked for (``backend="triton"``). Measured on an H200 (bf16, K = N = 4096,
#: ``bench/results/nvidia-h200.md``), fused kernel against ``F.rms_norm`` + ``F.linear``, device time from CUDA-graph
#: replays: M = 1 29.4 vs 27.3 us, M = 16 31.0 vs 33.2, M = 64 78.9 vs 32.0, M = 256 98.9 vs 39.7; as called,
#: M = 2048: 425 vs 104 (Triton's GEMM at 162 TFLOP/s). Called eagerly the kernel also costs ~90 us of host time
#: against 26-68. It pays nowhere yet, so "auto" does not pick it on CUDA; raise this once a sweep shows it winning.
FUSED_MAX_ROWS = 0


def _auto_path(backend: str, path: str, x: torch.Tensor, config: BlockConfig | None) -> str:
    """The path ``backend="auto"`` takes: the fused kernel on CUDA up to :data:`FUSED_MAX_ROWS` rows, else the
    PyTorch ops (an explicit ``backend="triton"`` or a forced ``config`` always runs the kernel)."""
    if backend != "auto" or path != "triton" or config is not None or x.device.type != "cuda":
        return path
    # the row count last, and not at all while FUSED_MAX_ROWS is 0: under torch.compile a data-dependent row count
    # (x[mask], an MoE dispatch) cannot be compared
    if FUSED_MAX_ROWS == 0 or x.numel() > FUSED_MAX_ROWS * x.shape[-1]:
        return "torch"
    return path


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with stride 1 in its last dim, copied only when it has another one.

    The kernel reads ``x`` rows, the norm vectors and the bias with unit stride (any row stride and any weight
    strides are fine). ``.contiguous()`` is not enough: a dim of size 1 may keep any stride (``torch.randn(2)[::2]``
    is "contiguous" with stride 2), hence a clone in the contiguous format. Differentiable (autograd flows back
    through the copy to the caller's view).
    """
    if t is None or t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _nothing_to_launch(weight: torch.Tensor) -> bool:
    """No output feature (``N == 0``): the result is an empty ``[..., 0]`` tensor and every gradient is zero; the
    PyTorch ops give exactly that. (The kernel launcher returns before writing the statistics its backward reads,
    so its gradients there would come from uninitialized memory.)"""
    return weight.shape[0] == 0


def _config_list(config: BlockConfig | None) -> list[int]:
    """A forced block configuration in the op schema's form (``[]``: autotune)."""
    if config is None:
        return []
    return [config.block_m, config.block_n, config.block_k, config.group_m, config.num_warps, config.num_stages]


def _forward(
    norm: str | None, x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None, eps: float, prologue: str, epilogue: str, config: list[int],
    save: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The implementation of the three ops: ``(y [..., N], preact [M, N], mean [M], rstd [M])``, the last three
    stored for the backward only when ``save`` (and needed), else empty."""
    n, k = weight.shape
    pro, epi = prologue or None, epilogue or None
    if backend == "triton":
        from decodekit.ops.norm_linear import triton as kernels  # Triton on first use

        # strided norm weights / biases (a slice of a fused parameter, a view with stride != 1) are accepted by
        # validation and by the PyTorch path, so they are made dense here rather than refused by the launcher
        x_u, norm_weight, norm_bias, bias = (_unit_stride(t) for t in (x, norm_weight, norm_bias, bias))
        y, preact, mean, rstd = kernels.norm_linear_fwd(
            x_u.reshape(-1, k), norm_weight, norm_bias, weight, bias, eps=eps, norm=kernels._NORM_CODE[norm],
            pro_act=kernels._ACT_CODE[pro], epi_act=kernels._ACT_CODE[epi], store_preact=save and epi is not None,
            store_stats=save, config=kernels.BlockConfig(*config) if config else None,
        )
        y = y.reshape(*x.shape[:-1], n)
    else:
        if norm == "layer":
            z = cpu.layer_norm_linear(x, norm_weight, norm_bias, weight, bias, eps, None)
        elif norm == "rms":
            z = cpu.rms_norm_linear(x, norm_weight, weight, bias, eps, None)
        else:
            z = cpu.gelu_linear(x, weight, bias, "tanh" if pro == "gelu_tanh" else "none")
        y = cpu.activation(z, epi).contiguous()  # the fake implementation's layout, whatever x's strides are
        preact = z.reshape(math.prod(x.shape[:-1]), n) if save and epi is not None else None  # N may be 0
        mean, rstd = cpu.norm_stats(x.reshape(-1, k), norm, eps) if save else (None, None)
    empty = x.new_empty(0)
    return y, empty if preact is None else preact, _or_empty(mean, empty), _or_empty(rstd, empty)


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32) if t is None else t


def _fake(norm: str | None, x, norm_weight, norm_bias, weight, bias, eps, prologue, epilogue, config, save, backend):
    n = weight.shape[0]
    m = math.prod(x.shape[:-1])
    f32 = torch.float32
    return (
        x.new_empty((*x.shape[:-1], n)),
        x.new_empty((m, n)) if save and epilogue else x.new_empty(0),
        x.new_empty((m,), dtype=f32) if save and norm == "layer" else x.new_empty(0, dtype=f32),
        x.new_empty((m,), dtype=f32) if save and norm is not None else x.new_empty(0, dtype=f32),
    )


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, norm_weight, norm_bias, weight, bias, eps, prologue, epilogue, _config, save, _backend = inputs
    _y, preact, mean, rstd = output
    recompute = not save and bool(epilogue)  # the bias is read only to recompute an unsaved pre-activation
    ctx.save_for_backward(x, norm_weight, norm_bias, weight, bias if recompute else None, mean, rstd, preact)
    ctx.eps, ctx.prologue, ctx.epilogue, ctx.saved = eps, prologue or None, epilogue or None, save


def _define(name: str, norm: str | None):
    """Register ``torch.ops.decodekit.<name>`` (one schema for the three ops) with its fake and its backward."""

    def forward(
        x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, weight: torch.Tensor,
        bias: torch.Tensor | None, eps: float, prologue: str, epilogue: str, config: list[int], save: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(norm, x, norm_weight, norm_bias, weight, bias, eps, prologue, epilogue, config, save, backend)

    forward.__name__ = name
    forward.__doc__ = (f"``torch.ops.decodekit.{name}``: ``(y, preact, mean, rstd)``; the public function returns "
                       "``y``, the others are what the backward reads (empty unless ``save``).")

    def backward(ctx, dy, _dpreact, _dmean, _drstd):  # noqa: ANN001
        x, norm_weight, norm_bias, weight, bias, mean, rstd, preact = ctx.saved_tensors
        n, k = weight.shape
        saved = ctx.saved
        d_x, d_nw, d_nb, d_w, d_b = cpu.norm_linear_backward(
            dy.reshape(math.prod(x.shape[:-1]), n), x.reshape(-1, k), norm_weight, norm_bias, weight, bias,
            mean if saved and norm == "layer" else None, rstd if saved and norm is not None else None,
            preact if saved and ctx.epilogue is not None else None, eps=ctx.eps, norm=norm, prologue=ctx.prologue,
            epilogue=ctx.epilogue, need=tuple(ctx.needs_input_grad[:5]),
        )
        return (None if d_x is None else d_x.reshape(x.shape), d_nw, d_nb, d_w, d_b) + (None,) * 6

    op = custom_op(name)(forward)
    op.register_fake(functools.partial(_fake, norm))
    op.register_autograd(backward, setup_context=_setup_context)
    return op


_layer_norm_linear_op = _define("layer_norm_linear", "layer")
_rms_norm_linear_op = _define("rms_norm_linear", "rms")
_gelu_linear_op = _define("gelu_linear", None)


def _call(op, x, norm_weight, norm_bias, weight, bias, eps, prologue, epilogue, config, path) -> torch.Tensor:  # noqa: ANN001
    """Run ``torch.ops.decodekit.<op>`` on validated arguments; the statistics for the backward are stored only when
    a gradient can be asked for (known at trace time under ``torch.compile``)."""
    if _nothing_to_launch(weight):
        path = "torch"
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, norm_weight, norm_bias, weight, bias)
    )
    return call(op, x, norm_weight, norm_bias, weight, bias, float(eps), prologue or "", epilogue or "",
                _config_list(config), save, path)[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {_dtype_name(t.dtype)}")


def _check_vector(name: str, t: torch.Tensor | None, size: int, device: torch.device, op: str) -> None:
    if t is None:
        return
    check_tensor(name, t, ndim=1, device=device, op=op)
    _check_dtype(name, t, FLOAT_DTYPES, op)
    if t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(t.shape)}")


def _validate(
    op: str,
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> tuple[int, int]:
    """Check every argument loudly; return (N, K)."""
    check_tensor("x", x, op=op)
    _check_dtype("x", x, FLOAT_DTYPES, op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., K], got a 0-d tensor")
    check_tensor("weight", weight, ndim=2, device=x.device, op=op)
    _check_dtype("weight", weight, (x.dtype,), op)
    n, k = weight.shape
    if k == 0:
        raise ValueError(f"{op}: weight must have K >= 1 input features, got shape {tuple(weight.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has K={x.shape[-1]} features but weight has shape [N, K]={tuple(weight.shape)}")
    _check_vector("norm_weight", norm_weight, k, x.device, op)
    _check_vector("norm_bias", norm_bias, k, x.device, op)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device, op=op)
        _check_dtype("bias", bias, (x.dtype,), op)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape ({n},) to match weight, got {tuple(bias.shape)}")
    # comparisons, not math.isfinite: under torch.compile a module's float attribute may be a symbolic float
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return n, k


def layer_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    backend: str = "auto",
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """``act(layer_norm(x) @ weight.T + bias)`` in one Triton kernel.

    Parameters
    ----------
    x : Tensor [..., K]
        fp32, fp16 or bf16. Any leading shape (M = their product, 1 included); row-strided inputs are read in
        place (a last dim with stride != 1 is copied first).
    norm_weight, norm_bias : Tensor [K] or None
        LayerNorm affine parameters (any float dtype; used in fp32; any stride, a strided view is copied for
        the kernel). ``None`` means 1 / 0.
    weight : Tensor [N, K]
        Linear weight in ``nn.Linear`` layout, dtype of ``x``; any strides (a transposed view of a ``[K, N]``
        Conv1D weight works without a copy).
    bias : Tensor [N] or None
        Linear bias, dtype of ``x`` (any stride).
    eps : float
        LayerNorm epsilon.
    activation : None, "gelu", "gelu_tanh" or "silu"
        Applied after the bias, in fp32, before the single rounding to the output dtype.
    backend : "auto", "triton" or "torch"
        "auto": the fused Triton kernel on CUDA for up to :data:`FUSED_MAX_ROWS` rows, the norm and cuBLAS's
        GEMM above that (today everywhere: on an H200 the kernel did not beat them, see the constant);
        ``F.layer_norm`` + ``F.linear`` on CPU. "triton" always runs the fused kernel.
    config : BlockConfig, optional
        Force one block configuration instead of autotuning (testing / tuning).

    Returns
    -------
    Tensor [..., N] in ``x.dtype``. Statistics and accumulation are fp32; the normalized tile is rounded to the
    weight dtype right before the tensor-core dot, which is where an unfused ``LayerNorm`` would round it.

    Notes
    -----
    Autograd: gradients for ``x``, ``norm_weight``, ``norm_bias``, ``weight`` and ``bias``. Saved-tensor
    memory is ``x`` (M*K elements) + 8*M bytes of fp32 statistics (+ M*N for the pre-activation output when
    ``activation`` is set); unfused LayerNorm + Linear also saves the normalized activations (another M*K
    elements), which this op recomputes in the backward instead.
    Determinism: the forward is deterministic (no atomics; fixed reduction order per config). The autotuner
    benchmarks configs on the first call of each (M bucket, N, K, dtype) key, so run one warm-up call before
    capturing a CUDA graph; after that the launch is graph-capturable (no host sync, no allocation besides
    the output).
    ``torch.compile(fullgraph=True)``: one ``torch.ops.decodekit.layer_norm_linear`` node (likewise
    ``rms_norm_linear`` and ``gelu_linear``) whose extra outputs are the statistics the backward reads, with its
    autograd registered (the backward is plain PyTorch ops, traced by AOT autograd).

    Example
    -------
    >>> x = torch.randn(2, 5, 64)
    >>> ln, lin = torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)
    >>> y = layer_norm_linear(x, ln.weight, ln.bias, lin.weight, lin.bias)
    >>> torch.allclose(y, lin(ln(x)), atol=1e-5)
    True
    """
    op = "layer_norm_linear"
    _validate(op, x, norm_weight, norm_bias, weight, bias, eps, activation)
    path = _auto_path(backend, resolve_backend(backend, x.device, op), x, config)
    return _call(op, x, norm_weight, norm_bias, weight, bias, eps, None, activation, config, path)


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    activation: str | None = None,
    *,
    backend: str = "auto",
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """``act(rms_norm(x) @ weight.T + bias)`` in one Triton kernel.

    ``rms_norm(x) = x / sqrt(mean(x**2) + eps) * norm_weight`` (LLaMA's RMSNorm). Arguments, dtypes,
    shapes and notes are as in :func:`layer_norm_linear`; saved-tensor memory is ``x`` + 4*M bytes (fp32
    ``rstd``) (+ M*N with an activation), versus ``x`` + ``h`` (2*M*K elements) for RMSNorm + Linear.

    Example
    -------
    >>> x, g = torch.randn(3, 64), torch.ones(64)
    >>> w = torch.randn(16, 64)
    >>> y = rms_norm_linear(x, g, w, activation="silu")
    >>> y.shape
    torch.Size([3, 16])
    """
    op = "rms_norm_linear"
    _validate(op, x, norm_weight, None, weight, bias, eps, activation)
    path = _auto_path(backend, resolve_backend(backend, x.device, op), x, config)
    return _call(op, x, norm_weight, None, weight, bias, eps, None, activation, config, path)


def gelu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    *,
    backend: str = "auto",
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """``gelu(x) @ weight.T + bias`` with the GELU applied to each input tile in the kernel's prologue.

    ``approximate`` is ``"none"`` (exact, erf) or ``"tanh"`` as in ``F.gelu``. Shapes and dtypes as in
    :func:`layer_norm_linear` (no norm). Saved-tensor memory: ``x`` only, versus ``x`` + ``gelu(x)`` for
    GELU + Linear; ``gelu(x)`` is recomputed in the backward.

    Example
    -------
    >>> x, w = torch.randn(4, 64), torch.randn(8, 64)
    >>> torch.allclose(gelu_linear(x, w), torch.nn.functional.gelu(x) @ w.T, atol=1e-4)
    True
    """
    op = "gelu_linear"
    _validate(op, x, None, None, weight, bias, 0.0, None)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    path = _auto_path(backend, resolve_backend(backend, x.device, op), x, config)
    return _call(op, x, None, None, weight, bias, 0.0, "gelu" if approximate == "none" else "gelu_tanh", None, config,
                 path)
