"""Shared pytest-benchmark plumbing for ``bench/``.

Every benchmark goes through :func:`run_bench`, which

* names the comparison it belongs to (``group``: op + shape + parameters) and the implementation
  (``impl``); exactly one implementation per group is the ``baseline`` (PyTorch eager), and
  ``bench/report.py`` turns the medians into speedup ratios against it, measured side by side
  in the same run;
* attaches the work done per call (``bytes_moved`` and/or ``flops``) so the report can show GB/s
  or TFLOP/s next to the times;
* on CUDA, synchronizes inside the timed call and also records a CUDA-event median after warm-up
  (``triton.testing.do_bench``), which the report prefers over the host-timer median.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import pytest
import torch


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | None = None) -> str:
    device = device or bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{os.cpu_count()} ({platform.processor() or 'unknown'})"


def cuda_only(reason: str = "CUDA benchmark: the Triton kernel is only timed compiled on a GPU"):
    """Skip marker for benchmarks that only mean something on a GPU (the reason shows in the report)."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{reason}; no CUDA device here")


def run_bench(
    benchmark,
    fn: Callable[[], Any],
    *,
    group: str,
    impl: str,
    baseline: bool = False,
    bytes_moved: float | None = None,
    flops: float | None = None,
    rounds: int | None = None,
    warmup_rounds: int = 1,
    host_only: bool = False,
    **info: Any,
) -> Any:
    """Time ``fn`` under pytest-benchmark and record what the report needs.

    ``rounds`` switches to pedantic mode (for calls that take seconds); otherwise pytest-benchmark
    calibrates. ``host_only`` marks work that runs on the CPU even where a GPU exists (no device sync, no
    CUDA-event timing). Extra keyword arguments (shapes, dtype, parameters) are stored in ``extra_info``.
    """
    device = torch.device("cpu") if host_only else bench_device()
    benchmark.group = group
    benchmark.extra_info.update(
        impl=impl,
        baseline=baseline,
        device=device_name(device),
        bytes_moved=bytes_moved,
        flops=flops,
        **{k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in info.items()},
    )
    timed = fn
    if device.type == "cuda":
        import triton.testing

        def timed():  # noqa: F811 - synchronize so the host timer sees the device work
            out = fn()
            torch.cuda.synchronize()
            return out

        benchmark.extra_info["cuda_event_median_s"] = (
            triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        )
    if rounds is not None:
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    for _ in range(warmup_rounds):
        timed()
    return benchmark(timed)
