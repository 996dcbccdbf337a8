"""Test-suite set-up.

The suite executes the real Triton kernels on this GPU-less machine: Triton's interpreter is
switched on here, before anything imports ``triton`` (``triton.jit`` reads the variable when a
kernel is decorated). ``make gpu-check`` sets ``TRITON_INTERPRET=0`` and ``DECODEKIT_DEVICE=cuda``
so that the same tests run compiled on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("DECODEKIT_SHARED_MODELS", ROOT.parent / "shared" / "models"))
STORIES_DIR = SHARED_MODELS / "stories260K"

# The suite runs on two xdist workers over two cores: one thread each for torch and ONNX Runtime, or their
# spinning thread pools fight over the cores (measured: eager decoding 6x slower with 2 threads per worker).
torch.set_num_threads(1)
os.environ.setdefault("DECODEKIT_ORT_THREADS", "1")


def test_device() -> torch.device:
    """The device the kernel tests run on: CPU under the interpreter, CUDA for make gpu-check."""
    return torch.device(os.environ.get("DECODEKIT_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    dev = test_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("DECODEKIT_DEVICE=cuda but torch sees no CUDA device")
    return dev


def require_file(path: Path) -> Path:
    """Return ``path``; skip when it is missing, except in CI (``CI=true``) where that fails."""
    if not path.exists():
        msg = f"missing shared file {path} (the project reads it from ../shared, never from the repo)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    require_file(STORIES_DIR / "stories260K.bin")
    require_file(STORIES_DIR / "tok512.bin")
    return STORIES_DIR


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


# --- appended by the models/export work (issue 3): exports shared by several test files ---------------------


@pytest.fixture(scope="session")
def stories_export_dir(stories_dir, tmp_path_factory) -> Path:
    """stories260K exported ONCE per session (per xdist worker): fp32, validated, via ``export_decoder``.

    Read-only for the tests: ``model.onnx``, ``decodekit.json`` (format_version 1) and ``tok512.bin``.
    """
    from decodekit.export import export_decoder

    out = tmp_path_factory.mktemp("stories_export") / "stories260K"
    export_decoder(stories_dir / "stories260K.bin", out, progress=False)
    return out


@pytest.fixture
def compile_offline(tmp_path, device):
    """``run(script, timeout)``: run a script that compiles kernels ahead of time for sm_90 (interpreter off, a fresh
    Triton cache) and prints "compiled"; returns its stdout. Skipped where the case cannot run: on a GPU run
    (``make gpu-check`` runs the kernels compiled for real) and where triton has no NVIDIA backend or no ptxas
    (every release in pyproject.toml's range ships both on Linux x86-64)."""
    import subprocess
    import sys

    if device.type == "cuda":
        pytest.skip("make gpu-check compiles and runs every kernel on the GPU")
    import triton
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend in this installation")
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018 (raises where no ptxas is found)
    except (ImportError, AttributeError, RuntimeError) as exc:
        pytest.skip(f"triton {triton.__version__} has no ptxas for the sm_90 compile: {exc!r}")

    def run(script: str, timeout: int = 300) -> str:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
        return proc.stdout

    return run
