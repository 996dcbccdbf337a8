"""Fixtures shared by the runtime tests: stories260K exported once per session, opened on both backends."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from decodekit.runtime import EagerDecoder, OnnxDecoder, load_backend


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
