"""Fixtures shared by the runtime tests: stories260K exported once per session, opened on both backends."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from decodekit.runtime import EagerDecoder, OnnxDecoder, load_backend
from decodekit.runtime.onnx import _ORT_SPIN_DURATION, _ort_version_at_least


@pytest.fixture(scope="module")
def export_dir(stories_export_dir) -> Path:
    return stories_export_dir


@pytest.fixture(scope="module")
def ckpt(stories_dir) -> Path:
    return stories_dir / "stories260K.bin"


@pytest.fixture(scope="module")
def eager(ckpt) -> EagerDecoder:
    return load_backend(ckpt, "eager", max_batch=4)


@pytest.fixture(scope="module")
def onnx4(export_dir) -> OnnxDecoder:
    return OnnxDecoder(export_dir, "cpu", max_batch=4)


@pytest.fixture
def no_allocation(monkeypatch) -> None:
    """Make torch's allocating constructors fail: a check that must come before the buffers proves it does."""

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a buffer was allocated before the arguments/export were checked")

    for name in ("zeros", "empty", "full", "ones"):
        monkeypatch.setattr(torch, name, refuse)


@pytest.fixture
def broken_copy(export_dir, tmp_path) -> Callable[[Callable[[Path], None]], Path]:
    """``broken_copy(edit)``: a copy of the export directory, passed to ``edit(dir)`` to be damaged."""

    def make(edit: Callable[[Path], None]) -> Path:
        dst = tmp_path / "broken"
        shutil.copytree(export_dir, dst)
        edit(dst)
        return dst

    return make


def _edit_metadata(d: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((d / "decodekit.json").read_text())
    change(meta)
    (d / "decodekit.json").write_text(json.dumps(meta))


@pytest.fixture
def edit_metadata() -> Callable[[Path, Callable[[dict], None]], None]:
    """``edit_metadata(dir, change)``: rewrite ``dir/decodekit.json`` after ``change(meta)`` edited it in place."""
    return _edit_metadata


def _spin_config(session) -> tuple[str, str, str]:  # noqa: ANN001 - an onnxruntime.InferenceSession
    """A session's (allow_spinning, spin_duration_us, force_spinning_stop) config entries ('' when unset)."""
    opts = session.get_session_options()

    def entry(key: str) -> str:
        try:
            return opts.get_session_config_entry(key)
        except RuntimeError:  # ORT: "SessionOptions does not have configuration with key"
            return ""

    keys = ("session.intra_op.allow_spinning", "session.intra_op.spin_duration_us", "session.force_spinning_stop")
    return tuple(entry(k) for k in keys)


def _bounded(us: str) -> tuple[bool | str, tuple[str, str, str]]:
    """The policy and config entries a duration ``"<n>us"`` gives on this ONNX Runtime (blocking at once before
    1.26, which cannot bound the spin)."""
    import onnxruntime as ort

    if _ort_version_at_least(ort.__version__, _ORT_SPIN_DURATION):
        return us, ("1", us.removesuffix("us"), "1")
    return False, ("0", "", "")


@pytest.fixture
def spin_config() -> Callable[..., tuple[str, str, str]]:
    """``spin_config(session)``: its (allow_spinning, spin_duration_us, force_spinning_stop) entries."""
    return _spin_config


@pytest.fixture
def bounded() -> Callable[[str], tuple[bool | str, tuple[str, str, str]]]:
    """``bounded("<n>us")``: the (policy, config entries) that duration gives on this ONNX Runtime."""
    return _bounded
