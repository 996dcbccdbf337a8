"""Plain progress lines with timings on stderr (no dependency, readable in logs and CI)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    """``with progress.step("exporting"):`` prints ``... exporting`` then ``    done in 1.2 s``.

    The measured seconds of every step are kept in :attr:`timings` (step name -> seconds).
    """

    def __init__(self, enabled: bool = True, prefix: str = "decodekit export", stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.stream = stream
        self.timings: dict[str, float] = {}

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix}: {message}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.info(f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.info(f"{name} failed after {time.perf_counter() - start:.1f} s")
            raise
        self.timings[name] = time.perf_counter() - start
        self.info(f"{name} done in {self.timings[name]:.1f} s")
