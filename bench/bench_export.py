"""Export time and validation error of ``decodekit export`` (one round each: an export takes seconds).

* stories260K (the real llama2.c checkpoint from ../shared), fp32
* a GPT-2-small-shaped decoder with random weights (d 768, 12 layers, 12 heads, vocab 50257), built in
  decodekit directly, fp32

The timed call is the whole ``export_decoder`` (load, torch.onnx.export with dynamo, save, ONNX Runtime
validation); ``extra_info`` also holds the per-step timings, the validation's max |ORT - eager| per output
and the size of the written files. These are host-side timings (the export runs on the CPU), so they go
through ``benchmark.pedantic`` directly rather than ``run_bench`` (whose CUDA path would re-run the call).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bench.conftest import device_name
from decodekit.export import export_decoder
from decodekit.models import Decoder, DecoderConfig

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "stories260K.bin"


def _bench_export(benchmark, source, out_dir: Path, *, group: str, **info) -> None:
    results = []

    def run():
        start = time.process_time()
        results.append(export_decoder(source, out_dir, force=True, progress=False))
        results[-1].timings["process_cpu_s"] = time.process_time() - start

    benchmark.group = group
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    res = results[-1]
    name, worst = res.validation.worst
    benchmark.extra_info.update(
        impl="decodekit export (torch.onnx dynamo + ORT validation)",
        baseline=True,
        device=device_name(torch.device("cpu")),
        validation_max_abs_diff=worst,
        validation_worst_output=name,
        validation_logits_max_abs_diff=res.validation.max_abs_diff["logits"],
        validation_provider=res.validation.provider,
        step_timings_s={k: round(v, 2) for k, v in res.timings.items()},
        files_mb=round(sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6, 1),
        **info,
    )


def test_export_stories260k(benchmark, tmp_path):
    if not STORIES.exists():
        pytest.skip(f"missing {STORIES}")
    _bench_export(benchmark, STORIES, tmp_path / "stories", group="export stories260K fp32", model="stories260K",
                  params=260_032)


def test_export_gpt2_small_random(benchmark, tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(arch="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, hidden_dim=3072,
                        max_seq_len=1024, bos_id=50256, eos_id=50256)
    model = Decoder(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    _bench_export(benchmark, model, tmp_path / "gpt2", group="export gpt2-small-shaped (random) fp32",
                  model="gpt2-small-shaped random", params=params)
