"""The package layout holds: no import cycles, dependencies point one way, and Triton stays optional.

Layers, lowest first: ``ops`` (kernels, CPU paths, references) <- ``nn`` <- ``models`` <- ``export`` <- ``runtime``
<- ``cli``. A module may import its own layer and the layers below it, never above; ``errors`` is shared by all.
Every ``import`` statement counts, also the ones inside functions (a lazy import still closes a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "decodekit"
LAYERS = {"ops": 0, "nn": 1, "models": 2, "export": 3, "runtime": 4, "cli": 5, "__main__": 5}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """decodekit modules imported anywhere in ``path`` (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "decodekit")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "decodekit":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_detector_finds_a_cycle(tmp_path, monkeypatch):
    """The walker itself: two modules importing each other inside functions are reported."""
    pkg = tmp_path / "decodekit"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("def f():\n    from decodekit.ops import b\n")
    (pkg / "ops" / "b.py").write_text("import decodekit.ops.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert _graph()["decodekit.ops.a"] == {"decodekit.ops.b"}
    assert _graph()["decodekit.ops.b"] == {"decodekit.ops.a"}


def test_dependencies_point_one_way():
    bad = []
    for module, targets in _graph().items():
        lm = _layer(module)
        for t in targets:
            lt = _layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{module} -> {t}")
    assert not bad, "imports against the layering (ops <- nn <- models <- export <- runtime <- cli): " + ", ".join(bad)


def test_triton_is_imported_only_by_kernel_modules():
    offenders = []
    for name, path in _modules().items():
        if name.endswith(".triton"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "triton" or n.startswith("triton.") for n in names):
                offenders.append(name)
    assert not offenders, f"modules other than ops/<family>/triton.py import triton: {sorted(set(offenders))}"


_NO_TRITON = r"""
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Block())
import torch
import decodekit
from decodekit.ops._dispatch import resolve_backend
assert resolve_backend("auto", torch.device("cpu"), "t") == "torch"
x = torch.randn(3, 50)
tok = decodekit.sample(x, temperature=0.8, top_k=5, top_p=0.9, seed=1)
assert tok.shape == (3,) and bool((tok >= 0).all())
assert decodekit.sample_logits(x, 1.0, 0.9, 10, seed=2).shape == (3, 1)
assert decodekit.sampler_simple_batch(x, 0.5, 1.0, seed=3).shape == (3, 1)
p = decodekit.sampling_probs(x, top_k=5)
assert int((p > 0).sum()) == 15
w = torch.randn(4, 8)
assert decodekit.rms_norm_linear(torch.randn(2, 8), torch.ones(8), w).shape == (2, 4)
q = torch.randn(1, 2, 3, 8)
assert decodekit.attention(q, q, q).shape == (1, 2, 3, 8)
from decodekit import export_decoder, OnnxDecoder  # noqa: F401
import decodekit.nn, decodekit.models, decodekit.export, decodekit.runtime, decodekit.cli  # noqa: F401
try:
    decodekit.sample(x, backend="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("backend='triton' without triton must raise")
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
print("ok")
"""


def test_everything_but_the_kernels_works_without_triton(tmp_path):
    """With ``import triton`` failing, the package, the CPU ops, export and the ONNX runtime still import and run."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PKG.parent), "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
