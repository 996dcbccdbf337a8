"""Backend dispatch and argument validation shared by every op family.

The rule every public op follows:

* ``backend="auto"`` (the default): CUDA tensors run the Triton kernel, CPU tensors run the
  fast PyTorch path.
* ``backend="triton"``: always the Triton kernel. On CPU tensors this needs Triton's
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported); the test suite
  runs that way so that the real kernels execute on a GPU-less machine.
* ``backend="torch"``: always the PyTorch path.

Launchers call :func:`record_launch` so tests can prove which path really ran.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
from collections.abc import Iterable, Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

#: How many times each Triton kernel was launched in this process (name -> count).
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # a fact of the process: torch.compile reads it once, without tracing it
def triton_available() -> bool:
    """True when ``triton`` imports (it is a dependency on Linux only). Looked up once per process."""
    if not _TRITON_FOUND:
        try:  # find_spec, not import: Triton is imported only by the ops/<family>/triton.py modules, on first launch
            _TRITON_FOUND.append(importlib.util.find_spec("triton") is not None)
        except (ImportError, ValueError):  # pragma: no cover - depends on the platform
            _TRITON_FOUND.append(False)
    return _TRITON_FOUND[0]


_TRITON_FOUND: list[bool] = []  # the cache of triton_available (not functools.cache: Dynamo warns on its wrapper)


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose tensors live on ``device``.

    Raises ``ValueError`` for an unknown backend and when the Triton path cannot run on
    ``device`` (CPU tensors without the interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' but triton is not installed")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors (got {device})"
            )
    return backend


def record_launch(kernel_name: str) -> None:
    """Count one launch of ``kernel_name``; launchers call this right before launching."""
    KERNEL_LAUNCHES[kernel_name] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Context manager yielding a Counter of the kernel launches made inside the block."""
    before = KERNEL_LAUNCHES.copy()
    delta: collections.Counter[str] = collections.Counter()
    try:
        yield delta
    finally:
        after = KERNEL_LAUNCHES.copy()
        after.subtract(before)
        delta.update({k: v for k, v in after.items() if v > 0})


def register_budget(warps_per_sm: int) -> int:
    """Registers per thread that still leave ``warps_per_sm`` warps resident on one SM: a launch's ``maxnreg``.

    Every NVIDIA SM from sm_80 to sm_100 holds 64K 32-bit registers, allocated in units of 8 per thread, and a thread
    may use at most 255. Why state it: without ``maxnreg`` ptxas picks its own target and, with registers to spare,
    sometimes keeps a few values in local memory (a spill) to stay at 64 or 80 registers; told the budget the
    kernel's occupancy allows, it keeps them in registers. ``tests/ops/test_compile_sm90.py`` compiles every
    configuration for sm_90 and sm_100 and fails on any spill and on an occupancy below the kernel's floor.
    The interpreter ignores the option.

    >>> register_budget(16), register_budget(4)
    (128, 255)
    """
    if warps_per_sm < 1:
        raise ValueError(f"warps_per_sm must be >= 1, got {warps_per_sm}")
    return min(255, 65536 // (warps_per_sm * 32) // 8 * 8)


# --------------------------------------------------------------------------- validation helpers

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    op: str = "",
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a fitting tensor."""
    where = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            dims = " or ".join(map(str, allowed))
            raise ValueError(f"{where}{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{where}{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{where}{name} is on {t.device} but the other inputs are on {device}")
    return t
