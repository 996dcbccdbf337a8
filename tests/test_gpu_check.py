"""The GPU check's script (``bench/gpu_check.py``) run dry on this CPU, so it cannot rot between GPU lends: every
stage runs (interpreter on, tiny shapes) and leaves its JSON lines and the markdown report; a tiny budget skips
stages with a line saying so instead of running past it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    lines = (out / "gpu_check.jsonl").read_text().splitlines() if (out / "gpu_check.jsonl").exists() else []
    return proc, [json.loads(line) for line in lines]


def test_dry_run_runs_every_stage(tmp_path):
    proc, recs = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {r["stage"] for r in recs}
    assert {"env", "correctness", "cuda_graph", "bench_sampling", "bench_block_beam", "bench_norm_linear",
            "bench_attention", "launch_overhead", "kernel_profile", "tests"} <= stages, stages  # fmt: skip
    assert not [r for r in recs if "error" in r or r.get("passed") is False], recs
    ops = {r["op"] for r in recs if r["stage"] == "correctness"}
    assert ops == {"sampling_probs+sample", "rwkv_sampling_probs", "sample_block", "beam_candidates",
                   "layer_norm_linear", "rms_norm_linear", "gelu_linear", "attention", "decode_attention"}  # fmt: skip
    timed = [r for r in recs if r["stage"].startswith("bench_") and "decodekit_us" in r]
    assert len(timed) >= 4 and all(r["decodekit_us"] > 0 for r in timed)
    md = (tmp_path / "cpu-dry-run.md").read_text()
    assert "## correctness" in md and "## bench_attention" in md


def test_tiny_budget_skips_stages_and_says_so(tmp_path):
    proc, recs = _run(tmp_path, "--budget", "0.5", timeout=300)
    skipped = [r for r in recs if "skipped" in r]
    assert {r["stage"] for r in skipped} >= {"bench_sampling", "bench_norm_linear", "bench_attention"}, recs
    assert all("budget" in r["skipped"] or "dry run" in r["skipped"] for r in skipped)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_runs_collect_only_the_device_tests():
    """``DECODEKIT_DEVICE=cuda`` (the GPU check's tests stage) deselects the tests that build CPU tensors
    themselves: they would fail there on "needs CUDA tensors", and the CPU suite already runs them."""
    env = dict(os.environ, DECODEKIT_DEVICE="cuda")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/ops/sampling/test_block.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300).stdout
    assert "test_greedy_is_exact" in out  # takes the device fixture
    assert "test_greedy_confidences_by_hand" not in out and "deselected" in out  # builds CPU tensors itself
