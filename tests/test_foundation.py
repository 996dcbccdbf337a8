"""The package foundation: lazy public API, dispatch rule, and proof that kernels really run."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import decodekit
from decodekit.ops import _dispatch


def test_interpreter_is_on_under_pytest(device):
    if device.type == "cuda":
        assert not _dispatch.interpreter_enabled()
    else:
        assert _dispatch.interpreter_enabled(), "conftest must switch Triton's interpreter on for CPU runs"


def test_every_public_name_resolves():
    for name in decodekit.__all__:
        assert getattr(decodekit, name) is not None, name


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_op"):
        decodekit.no_such_op  # noqa: B018


def test_import_does_not_pull_triton_or_kernels():
    code = (
        "import sys, decodekit, decodekit.export, decodekit.runtime; "
        "bad = [m for m in ('triton', 'decodekit.ops.sampling.triton') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the package or export/runtime pulled in: {out.stdout}"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_resolve_backend_cpu(backend):
    assert _dispatch.resolve_backend(backend, torch.device("cpu"), "op") == "torch"


def test_resolve_backend_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _dispatch.resolve_backend("triton", torch.device("cpu"), "op")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve_backend("triton", torch.device("cpu"), "op") == "triton"


def test_resolve_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve_backend("cuda", torch.device("cpu"), "op")


def test_kernels_are_interpreted_functions(device):
    """Under the interpreter every @triton.jit kernel is an InterpretedFunction: the suite runs real kernels. On a
    GPU run (interpreter off) none is: the suite runs them compiled."""
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import KernelInterface

    interpreted = device.type != "cuda"
    for family in ("sampling", "norm_linear", "attention"):
        modname = f"decodekit.ops.{family}.triton"
        mod = importlib.import_module(modname)
        kernels = [v for k, v in vars(mod).items() if k.endswith("_kernel") and isinstance(v, KernelInterface)]
        assert kernels, f"{modname} defines no _*_kernel"
        for k in kernels:
            fn = k
            while not isinstance(fn, interp.InterpretedFunction) and hasattr(fn, "fn"):
                fn = fn.fn  # autotuner / heuristics wrappers
            assert isinstance(fn, interp.InterpretedFunction) == interpreted, f"{modname}.{k}: interpreted is wrong"


def test_check_tensor_messages():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        _dispatch.check_tensor("logits", [1, 2])
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        _dispatch.check_tensor("logits", torch.zeros(3), ndim=2)
    with pytest.raises(TypeError, match="logits must have dtype"):
        _dispatch.check_tensor("logits", torch.zeros(3, dtype=torch.int32), dtypes=_dispatch.FLOAT_DTYPES)
