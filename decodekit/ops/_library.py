"""decodekit's ops as PyTorch custom operators (``torch.ops.decodekit.*``): the shared helpers.

Why custom ops: ``torch.compile`` cannot trace into a Triton launch that reads Python-side state, nor into a
CPU path that branches on tensor values (the sampler's NumPy fast path, a range check of ``cache_seqlens``).
Registered with :func:`torch.library.custom_op`, each op is one opaque node in the graph: Dynamo traces the
public Python function (argument validation on shapes and dtypes, which raises the same ``TypeError`` /
``ValueError`` at trace time as in eager) and records a call of ``torch.ops.decodekit.<op>``; the fake (meta)
implementation gives the output shapes and dtypes without running anything; the real implementation runs the
Triton kernel or the PyTorch path at run time, in eager and compiled code alike. So ``fullgraph=True`` never
breaks on a decodekit op, and a compiled decode step gives exactly the eager result.

The pattern every public op follows (``decodekit/ops/<family>/__init__.py``):

1. validate and normalize in Python: types, dtypes, shapes, devices, Python scalars (all known at trace time);
2. call the custom op with tensors and plain scalars only (``backend`` already resolved to ``"triton"`` or
   ``"torch"``; per-row parameters split by :func:`split_params`);
3. everything that needs tensor *values* (range checks of per-row parameter tensors on the CPU,
   ``check=True``, ``validate_lengths=True``) runs inside the op's implementation, where it raises the same
   ``ValueError`` as in eager, also in compiled code, because the op is opaque to the compiler (the check
   synchronizes with the host, so it cannot be captured in a CUDA graph: leave it off there).

Helpers here: :func:`custom_op` (registration in the ``decodekit`` namespace, recorded in :data:`OPS` so the tests
can prove each op is covered), :func:`split_params` / :func:`join_params` (a Python scalar or a per-row tensor,
in a schema-friendly form), :func:`fake_rows` (fake outputs of a per-row op) and :func:`compiling` (for a host
check outside any op that must be skipped in traced code: say so in the docstring).

Python scalars in the traced code may be symbolic under ``torch.compile(dynamic=True)``: check them with
comparisons (``-math.inf < v < math.inf``), not ``math.isfinite``, which Dynamo cannot trace on a symbolic float.
The public functions call their op through :func:`call`: in plain eager code (not tracing, no dispatch mode or
functorch transform active, plain tensors that need no gradient) it runs the implementation directly, since the
dispatcher would do nothing else with such a call but cost 10-20 us (a third of a small sampler call on the CPU);
everything else goes through ``torch.ops.decodekit.<op>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = ["NAMESPACE", "OPS", "custom_op", "call", "split_params", "join_params", "fake_rows", "compiling"]

NAMESPACE = "decodekit"

#: Every decodekit custom op registered in this process, by qualified name (``"decodekit::sample"``).
OPS: dict[str, Any] = {}
#: The Python implementation of each op, by short name (``"sample"``), for :func:`call`'s direct path.
IMPLS: dict[str, Callable[..., Any]] = {}


def custom_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function as ``torch.ops.decodekit.<name>`` (see :func:`torch.library.custom_op`).

    The function's type annotations give the schema (``Tensor``, ``Optional[Tensor]``, ``list[float]``,
    ``list[Optional[Tensor]]``, ``int``, ``float``, ``bool``, ``str``; outputs: a tensor or a tuple of tensors,
    never an alias of an input). Register the fake implementation with ``@<op>.register_fake`` and, for a
    differentiable op, the backward with ``<op>.register_autograd``. Returns the ``CustomOpDef``, which is
    callable like the function itself (the call goes through the dispatcher).
    """
    qualname = f"{NAMESPACE}::{name}"

    def register(fn: Callable[..., Any]) -> Any:
        if qualname in OPS:
            raise RuntimeError(f"custom op {qualname} is registered twice")
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        OPS[qualname] = op
        if not tuple(mutates_args):  # the direct path skips the dispatcher's mutation bookkeeping
            IMPLS[name] = fn
        return op

    return register


# private torch hooks of the direct path's test; where a torch release lacks one, every call takes the dispatcher
_DISPATCH_DEPTH = getattr(torch._C, "_len_torch_dispatch_stack", None)
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _plain(args: Sequence[Any], grad: bool) -> bool:
    """Every tensor in ``args`` (lists included) is a plain ``torch.Tensor`` that needs no gradient."""
    for a in args:
        t = type(a)
        if t is torch.Tensor:
            if grad and a.requires_grad:
                return False
        elif t in _LEAF:  # the common case first: a Python scalar, string or None
            continue
        elif isinstance(a, torch.Tensor) or (isinstance(a, list | tuple) and not _plain(a, grad)):
            return False  # a tensor subclass (FakeTensor, DTensor, ...), or a list holding something not plain
    return True


_LEAF = frozenset({float, int, bool, str, type(None)})


def call(name: str, *args: Any) -> Any:
    """``torch.ops.decodekit.<name>(*args)``, with the dispatcher skipped where it has nothing to do.

    The direct path runs the registered implementation itself when the call is plain eager code: not traced by
    Dynamo / ``torch.export``, no ``TorchDispatchMode`` (FakeTensor, ``make_fx``, ...) or functorch transform
    active, every tensor argument a plain tensor that needs no gradient (so no autograd node is owed). The
    result is the op's, bit for bit; only the dispatcher's overhead is gone.
    """
    fn = IMPLS.get(name)
    if fn is not None and direct(args):
        return fn(*args)
    return getattr(torch.ops.decodekit, name)(*args)


def direct(args: Sequence[Any]) -> bool:
    """Whether an op called with ``args`` may run its implementation directly (see :func:`call`): plain eager
    code, no dispatch mode or functorch transform active, only plain tensors that need no gradient."""
    return (_DISPATCH_DEPTH is not None and _FUNCTORCH_ACTIVE is not None and not torch.compiler.is_compiling()
            and _DISPATCH_DEPTH() == 0 and not _FUNCTORCH_ACTIVE() and _plain(args, torch.is_grad_enabled()))


def compiling() -> bool:
    """True while ``torch.compile`` / ``torch.export`` traces the calling Python code (Dynamo)."""
    return bool(torch.compiler.is_compiling())


def split_params(values: Sequence[float | int | torch.Tensor]) -> tuple[list[float], list[torch.Tensor | None]]:
    """Validated parameters (each a Python number or a per-row tensor) -> ``(scalars, tensors)`` for an op schema.

    Slot ``i`` holds ``float(values[i])`` and ``None``, or ``0.0`` and the tensor. A Python scalar stays a Python
    scalar all the way into the implementation (the fast paths that need no per-row column keep working); an
    integer parameter comes back from :func:`join_params` as an ``int``.
    """
    scalars: list[float] = []
    tensors: list[torch.Tensor | None] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            scalars.append(0.0)
            tensors.append(v)
        else:
            scalars.append(float(v))
            tensors.append(None)
    return scalars, tensors


def join_params(
    scalars: Sequence[float], tensors: Sequence[torch.Tensor | None], integer: Sequence[bool] | None = None
) -> list[float | int | torch.Tensor]:
    """Inverse of :func:`split_params` inside an op implementation (``integer[i]``: slot ``i`` is an int)."""
    out: list[float | int | torch.Tensor] = []
    for i, (s, t) in enumerate(zip(scalars, tensors, strict=True)):
        if t is not None:
            out.append(t)
        elif integer is not None and integer[i]:
            out.append(int(s))
        else:
            out.append(float(s))
    return out


def fake_rows(logits: torch.Tensor, *dtypes: torch.dtype, cols: int | None = None) -> tuple[torch.Tensor, ...]:
    """Fake outputs of a per-row op: one new ``[B]`` tensor per dtype (``[B, cols]`` when ``cols`` is given)."""
    shape = (logits.shape[0],) if cols is None else (logits.shape[0], cols)
    return tuple(logits.new_empty(shape, dtype=d) for d in dtypes)
