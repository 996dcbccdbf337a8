"""The GPU check, sized to a short GPU lease: correctness compiled on CUDA, CUDA-graph replay, headline benchmarks,
then the rest of the test suite if time remains.

Usage (on the GPU machine: torch, triton, numpy and pytest only; nothing is installed)::

    python -m bench.gpu_check [--out bench/results/gpu-run] [--budget 420] [--stages a,b] [--tests P,Q]
    python -m bench.gpu_check --dry-run --out /tmp/x     # this CPU: interpreter on, tiny shapes (part of make test)

Each stage has a time budget; a stage (or a case inside one) that would start after its budget or the total is
spent is skipped with a line saying so. Every result is appended to ``OUT/gpu_check.jsonl`` the moment it is
measured and ``OUT/<gpu>.md`` is rewritten from the lines so far (``bench.report --gpu-check OUT`` does the same
offline), so a run killed at any point still leaves everything it measured.

Timing: CUDA events around the call after warm-up (``triton.testing.do_bench``, median), inputs drawn at random
(never zeros); every candidate's output is checked against the reference before it is timed. In a dry run the
clock is ``time.perf_counter`` over a few calls and the numbers mean nothing: the run only proves the script
works.
"""

# ruff: noqa: B023 - each timed closure is called only within the loop iteration that made it
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# stage name -> seconds it may start within (cumulative deadlines are computed from these, in this order)
STAGES: dict[str, float] = {"cuda_graph": 30.0, "correctness": 120.0, "bench_sampling": 50.0,
                            "bench_block_beam": 30.0, "bench_norm_linear": 50.0, "bench_attention": 40.0,
                            "launch_overhead": 40.0, "kernel_profile": 30.0, "tests": 0.0}  # fmt: skip


@dataclass
class Check:
    """The running check: clock, output files, the dry-run switch."""

    out: Path
    budget: float
    dry: bool
    t0: float = field(default_factory=time.monotonic)
    records: list[dict[str, Any]] = field(default_factory=list)
    gpu: str = "cpu-dry-run"

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def emit(self, stage: str, **rec: Any) -> None:
        """Append one result (JSON line, flushed) and rewrite the markdown report."""
        rec = {"stage": stage, "t": round(time.monotonic() - self.t0, 1), **rec}
        self.records.append(rec)
        with open(self.out / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        (self.out / f"{self.gpu}.md").write_text(render(self.records))
        print(f"[{rec['t']:6.1f}s] {stage}: " + ", ".join(f"{k}={v}" for k, v in rec.items() if k not in
                                                          ("stage", "t")), flush=True)  # fmt: skip


def where(exc: BaseException, frames: int = 3) -> str:
    """The innermost ``frames`` frames of ``exc``'s traceback inside this repository, as ``file:line`` (the
    report must say where a failure happened: a lease is too short to rerun for a traceback)."""
    root = str(Path(__file__).resolve().parents[1])
    tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
    return " < ".join(f"{Path(f.filename).relative_to(root)}:{f.lineno}" for f in reversed(tb[-frames:]))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# --------------------------------------------------------------------------- timing and data


def timer(chk: Check) -> Callable[[Callable[[], Any]], float]:
    """Median seconds per call: CUDA events via triton.testing.do_bench, or a few host-timed calls (dry run)."""
    if chk.dry:

        def host(fn: Callable[[], Any]) -> float:  # one warm-up call, one timed call: the script's plumbing only
            fn()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        return host
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def rel_err(out, ref) -> float:  # noqa: ANN001 - tensors
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def copy_bandwidth(chk: Check, dev) -> float:  # noqa: ANN001 - a torch.device
    """Device-to-device copy bandwidth (bytes read + written per second): the memory-bound yardstick."""
    import torch

    n = (1 << 28) if not chk.dry else (1 << 16)  # 1 GiB of fp32 on a GPU: well past the L2
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timer(chk)(lambda: b.copy_(a))


# --------------------------------------------------------------------------- stage 1: correctness


def stage_correctness(chk: Check, dev) -> None:  # noqa: ANN001
    """Each op family compiled on the device against its reference on awkward shapes and every dtype."""
    import torch

    import decodekit
    from decodekit.ops.attention.reference import attention_ref, decode_attention_ref
    from decodekit.ops.norm_linear.reference import gelu_linear_ref, layer_norm_linear_ref, rms_norm_linear_ref
    from decodekit.ops.sampling.reference import (
        beam_candidates_ref,
        rwkv_probs_ref,
        sample_block_ref,
        sampling_probs_ref,
    )

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=1.0):  # noqa: ANN002, ANN003
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)

    tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}

    def guarded(check: Callable[[], None], **what: Any) -> None:
        """One check; an exception is reported with where it happened, and the other checks go on."""
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - reported, the stage goes on
            chk.emit("correctness", **what, passed=False, error=f"{type(exc).__name__}: {str(exc)[:200]}",
                     where=where(exc))  # fmt: skip

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        d = str(dt)[6:]
        # sampler: the probabilities of the kept set, and the greedy draw
        for B, V in ((1, 1), (3, 1000), (7, 32003)) if not chk.dry else ((3, 37),):

            def probs_check(B: int = B, V: int = V) -> None:
                x = rnd(B, V, dtype=dt, scale=3.0)
                kw = dict(temperature=0.8, top_k=min(40, V), top_p=0.9)
                p = decodekit.sampling_probs(x, backend="triton", **kw)
                ref = sampling_probs_ref(x.float().cpu(), **kw)  # the references are plain CPU code
                greedy = decodekit.sample(x, temperature=0.0, backend="triton")
                ok = bool(torch.equal(greedy.cpu(), x.float().argmax(-1).cpu()))
                e = rel_err(p.cpu(), ref)
                chk.emit("correctness", op="sampling_probs+sample", dtype=d, shape=f"{B}x{V}", err=e, greedy_ok=ok,
                         passed=ok and e < 1e-4)  # fmt: skip

            guarded(probs_check, op="sampling_probs+sample", dtype=d, shape=f"{B}x{V}")
        # the other sampling ops: rwkv distribution, block sampling (greedy: exact), beam candidates (top 2N: exact)
        for B, V in ((2, 8193), (3, 4096)) if not chk.dry else ((2, 37),):

            def rwkv_check(B: int = B, V: int = V) -> None:
                x = rnd(B, V, dtype=dt, scale=3.0)
                p = decodekit.rwkv_sampling_probs(x, temperature=1.0, top_p=0.95, top_k=min(80, V), backend="triton")
                e = rel_err(p.cpu(), rwkv_probs_ref(x.float().cpu(), temperature=1.0, top_p=0.95, top_k=min(80, V)))
                chk.emit("correctness", op="rwkv_sampling_probs", dtype=d, shape=f"{B}x{V}", err=e, passed=e < 1e-4)

            def block_check(B: int = B, V: int = V, L: int = 5) -> None:
                xl = rnd(B, L, V, dtype=dt, scale=3.0)
                masked = torch.rand(B, L, generator=g).to(dev) < 0.7
                tok, conf = decodekit.sample_block(xl, masked, temperature=0.0, top_k=20, confidence="margin",
                                                   backend="triton")  # fmt: skip
                rtok, rconf = sample_block_ref(xl.cpu(), masked.cpu(), temperature=0.0, top_k=20, confidence="margin")
                m = masked.cpu()
                ok = bool(torch.equal(tok.cpu()[m], rtok[m])) and bool(
                    torch.allclose(conf.cpu()[m].double(), rconf[m], atol=1e-4))  # fmt: skip
                chk.emit("correctness", op="sample_block", dtype=d, shape=f"{B}x{L}x{V}", passed=ok)

            def beam_check(B: int = B, V: int = V, N: int = 3) -> None:
                xb, scores = rnd(B * N, V, dtype=dt, scale=3.0), rnd(B * N).float()
                out = decodekit.beam_candidates(xb, scores, N, top_k=30, top_p=0.8, backend="triton")
                ref = beam_candidates_ref(xb.float().cpu(), scores.cpu(), N, top_k=30, top_p=0.8)
                ok = all(bool(torch.equal(a.cpu(), b)) for a, b in zip(out[:2], ref[:2])) and bool(
                    torch.allclose(out[2].cpu(), ref[2].float(), atol=1e-4))  # fmt: skip
                chk.emit("correctness", op="beam_candidates", dtype=d, shape=f"{B}x{N}x{V}", passed=ok)

            guarded(rwkv_check, op="rwkv_sampling_probs", dtype=d, shape=f"{B}x{V}")
            guarded(block_check, op="sample_block", dtype=d, shape=f"{B}x5x{V}")
            guarded(beam_check, op="beam_candidates", dtype=d, shape=f"{B}x3x{V}")
        # norm + linear: [M, K] @ [K, N]^T with awkward M, K, N
        for M, K, N in ((1, 4096, 4096), (17, 1000, 333), (300, 777, 515)) if not chk.dry else ((3, 40, 24),):

            def norm_linear_check(M: int = M, K: int = K, N: int = N) -> None:
                x, w, nw, nb, b = rnd(M, K, dtype=dt), rnd(N, K, dtype=dt, scale=K**-0.5), rnd(K, dtype=dt), rnd(
                    K, dtype=dt), rnd(N, dtype=dt)  # fmt: skip
                for name, out, ref in (
                    ("layer_norm_linear", decodekit.layer_norm_linear(x, nw, nb, w, b, backend="triton"),
                     layer_norm_linear_ref(*(t.double() for t in (x, nw, nb, w, b)))),
                    ("rms_norm_linear", decodekit.rms_norm_linear(x, nw, w, b, backend="triton"),
                     rms_norm_linear_ref(*(t.double() for t in (x, nw, w, b)))),
                    ("gelu_linear", decodekit.gelu_linear(x, w, b, backend="triton"),
                     gelu_linear_ref(*(t.double() for t in (x, w, b)))),
                ):  # fmt: skip
                    e = rel_err(out, ref)
                    chk.emit("correctness", op=name, dtype=d, shape=f"{M}x{K}x{N}", err=e, passed=e < tol[dt])

            guarded(norm_linear_check, op="norm_linear", dtype=d, shape=f"{M}x{K}x{N}")
        # attention: prefill (causal, GQA) and split-K decode with per-row lengths
        for B, H, Hkv, S, D in ((2, 8, 2, 333, 128), (1, 4, 4, 77, 64)) if not chk.dry else ((1, 2, 1, 9, 16),):
            shape = f"{B}x{H}/{Hkv}x{S}x{D}"

            def attention_check(B: int = B, H: int = H, Hkv: int = Hkv, S: int = S, D: int = D) -> None:
                q, k, v = rnd(B, H, S, D, dtype=dt), rnd(B, Hkv, S, D, dtype=dt), rnd(B, Hkv, S, D, dtype=dt)
                out = decodekit.attention(q, k, v, causal=True, backend="triton")
                e = rel_err(out, attention_ref(q.double(), k.double(), v.double(), causal=True))
                chk.emit("correctness", op="attention", dtype=d, shape=shape, err=e, passed=e < tol[dt])
                lens = torch.randint(1, S + 1, (B,), generator=g).to(dev, torch.int32)
                q1 = rnd(B, H, 1, D, dtype=dt)
                out = decodekit.decode_attention(q1, k, v, lens, backend="triton")
                e = rel_err(out, decode_attention_ref(q1.double(), k.double(), v.double(), lens))
                chk.emit("correctness", op="decode_attention", dtype=d, shape=shape, err=e, passed=e < tol[dt])

            guarded(attention_check, op="attention", dtype=d, shape=shape)


# --------------------------------------------------------------------------- stage 2: CUDA graphs


def stage_cuda_graph(chk: Check, dev) -> None:  # noqa: ANN001
    """Capture a decode step with ``sample`` and per-row device seeds; replay with new logits and seeds
    (``bench/gpu_cuda_graph.py``; in a dry run the same code on the CPU, without capture, tiny sizes)."""
    from bench.gpu_cuda_graph import cuda_graph_check

    if chk.dry:
        res = cuda_graph_check("cpu", batch=2, vocab=64, past=4, rounds=1, compile_check=False)
    else:
        res = cuda_graph_check("cuda")
    chk.emit("cuda_graph", passed=bool(res.pop("ok", False)), **res)


# --------------------------------------------------------------------------- stage 3: benchmarks


def _row(chk: Check, stage: str, case: str, t_ref: float, rows: dict[str, float], **extra: Any) -> None:
    chk.emit(stage, case=case, **{f"{k}_us": round(v * 1e6, 2) for k, v in rows.items()},
             **{f"x_vs_{k}": round(v / rows["decodekit"], 2) for k, v in rows.items() if k != "decodekit"},
             **extra)  # fmt: skip


def _compiled(fn: Callable, dry: bool) -> Callable:
    import torch

    return torch.compile(fn, backend="eager" if dry else "inductor")


def stage_bench_sampling(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    import torch

    import decodekit
    from bench.bench_sampling import hf_eager  # Hugging Face's warpers, vectorized, on the device
    from decodekit.ops.sampling.reference import sampling_probs_ref

    bw = copy_bandwidth(chk, dev)
    chk.emit("bench_sampling", case="device copy bandwidth", GBps=round(bw / 1e9, 1))
    time_it = timer(chk)
    V = 128256 if not chk.dry else 1000
    for dt in (torch.float32, torch.bfloat16) if not chk.dry else (torch.float32,):
        for B in (1, 64, 256) if not chk.dry else (2,):
            if time.monotonic() > stop:
                chk.emit("bench_sampling", skipped=f"B={B} {dt}: stage budget spent")
                continue
            x = (torch.randn(B, V, device=dev) * 4).to(dt)
            kw = dict(temperature=0.8, top_k=40, top_p=0.95)
            ours = lambda: decodekit.sample(x, seed=1, backend="triton", **kw)  # noqa: E731
            eager = lambda: hf_eager(x, kw)  # noqa: E731
            tok = ours()
            # the kept set from the project's reference (plain CPU code, row by row)
            kept = sampling_probs_ref(x.float().cpu(), **kw).gather(1, tok.cpu().view(B, 1)) > 0
            rows = {"decodekit": time_it(ours), "eager": time_it(eager)}
            extra: dict[str, Any] = {}
            if B == 64 or chk.dry:  # torch.compile of the eager pipeline at the headline point
                try:
                    comp = _compiled(lambda t: hf_eager(t, kw), chk.dry)
                    rows["compile"] = time_it(lambda: comp(x))
                except Exception as exc:  # noqa: BLE001 - an Inductor failure is a row of the report, not a stop
                    extra["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            read_s = x.numel() * x.element_size() / (bw / 2)  # one read of the logits at copy speed
            _row(chk, "bench_sampling", f"sample B={B} V={V} {str(dt)[6:]} top-k 40 top-p 0.95", rows["eager"], rows,
                 x_of_one_read=round(rows["decodekit"] / read_s, 2), kept_ok=bool(kept.all()), **extra)  # fmt: skip


def stage_bench_block_beam(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    """sample_block on the diffusion shapes against the same step in PyTorch (``bench/bench_block.py``'s); one
    IndexTTS2 beam-sampling step (3 beams, V 8194, top-k 30, top-p 0.8, penalty 10) against its reference."""
    import torch

    import decodekit
    from bench.bench_block import PARAM_SETS, eager_block
    from decodekit.ops.sampling.reference import beam_candidates_ref

    time_it = timer(chk)
    for B, L, V in ((1, 32, 126464), (8, 32, 32000)) if not chk.dry else ((1, 4, 300),):
        for pname, kw in PARAM_SETS.items():
            if time.monotonic() > stop:
                chk.emit("bench_block_beam", skipped=f"sample_block {B}x{L}x{V} {pname}: stage budget spent")
                continue
            x = torch.randn(B, L, V, device=dev) * 3
            masked = torch.ones(B, L, dtype=torch.bool, device=dev)
            ids = torch.zeros(B, L, dtype=torch.int64, device=dev)
            ours = lambda: decodekit.sample_block(x, masked, input_ids=ids, seed=1, backend="triton", **kw)  # noqa: E731
            rows = {"decodekit": time_it(ours), "eager": time_it(lambda: eager_block(x, masked, ids, **kw))}
            _row(chk, "bench_block_beam", f"sample_block {B}x{L}x{V} {pname}", rows["eager"], rows)
    V, N = (8194, 3) if not chk.dry else (300, 3)
    if time.monotonic() > stop:
        chk.emit("bench_block_beam", skipped="beam_candidates: stage budget spent")
        return
    x, scores = torch.randn(N, V, device=dev) * 3, torch.zeros(N, device=dev)
    counts = torch.zeros(N, V, dtype=torch.int32, device=dev)
    counts[:, :50] = 1
    kw = dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0, token_counts=counts)
    ours = lambda: decodekit.beam_candidates(x, scores, N, do_sample=True, seed=1, backend="triton", **kw)  # noqa: E731
    ref = lambda: beam_candidates_ref(x, scores, N, do_sample=True, **kw)  # noqa: E731
    rows = {"decodekit": time_it(ours), "eager": time_it(ref)}
    _row(chk, "bench_block_beam", f"beam_candidates 1x{N} beams V={V} IndexTTS2 settings", rows["eager"], rows)


def stage_bench_norm_linear(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    import torch
    import torch.nn.functional as F

    import decodekit

    time_it = timer(chk)
    K = N = 4096 if not chk.dry else 64
    dt = torch.bfloat16 if not chk.dry else torch.float32
    for norm in ("rms", "layer"):
        for M in (1, 16, 64, 2048) if not chk.dry else (3,):
            if time.monotonic() > stop:
                chk.emit("bench_norm_linear", skipped=f"{norm} M={M}: stage budget spent")
                continue
            x = torch.randn(M, K, device=dev, dtype=dt)
            w = (torch.randn(N, K, device=dev) * K**-0.5).to(dt)
            nw, nb = torch.randn(K, device=dev, dtype=dt), torch.randn(K, device=dev, dtype=dt)
            if norm == "rms":
                ours = lambda: decodekit.rms_norm_linear(x, nw, w, backend="triton")  # noqa: E731
                base = lambda x: F.linear(F.rms_norm(x, (K,), nw, 1e-6), w)  # noqa: E731
            else:
                ours = lambda: decodekit.layer_norm_linear(x, nw, nb, w, backend="triton")  # noqa: E731
                base = lambda x: F.linear(F.layer_norm(x, (K,), nw, nb, 1e-5), w)  # noqa: E731
            comp = _compiled(base, chk.dry)
            with torch.no_grad():  # the reference in fp64: the same function on upcast copies
                nw_, nb_, w_ = nw, nb, w
                nw, nb, w = nw.double(), nb.double(), w.double()
                ref = base(x.double())
                nw, nb, w = nw_, nb_, w_
            err = rel_err(ours(), ref)
            rows = {"decodekit": time_it(ours), "eager": time_it(lambda: base(x)), "compile": time_it(lambda: comp(x))}
            tflops = 2 * M * N * K / rows["decodekit"] / 1e12
            _row(chk, "bench_norm_linear", f"{norm}_norm_linear M={M} K=N={K} {str(dt)[6:]}", rows["eager"], rows,
                 TFLOPs=round(tflops, 1), rel_err=round(err, 5))  # fmt: skip


def stage_bench_attention(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    import torch
    import torch.nn.functional as F

    import decodekit
    from decodekit.ops.attention.reference import attention_flops

    time_it = timer(chk)
    bw = copy_bandwidth(chk, dev)
    dt = torch.bfloat16 if not chk.dry else torch.float32
    B, H, S, D = (4, 32, 4096, 128) if not chk.dry else (1, 4, 64, 16)
    for Hkv in (H, H // 4) if not chk.dry else (H // 4,):
        if time.monotonic() > stop:
            chk.emit("bench_attention", skipped=f"prefill Hkv={Hkv}: stage budget spent")
            continue
        q = torch.randn(B, H, S, D, device=dev, dtype=dt)
        k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=dt) for _ in range(2))
        ours = lambda: decodekit.attention(q, k, v, causal=True, backend="triton")  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)  # noqa: E731
        err = rel_err(ours(), sdpa())
        rows = {"decodekit": time_it(ours), "sdpa": time_it(sdpa)}
        flops = attention_flops(B, H, S, S, D, causal=True)
        _row(chk, "bench_attention", f"prefill B={B} H={H}/{Hkv} S={S} D={D} causal", rows["sdpa"], rows,
             TFLOPs=round(flops / rows["decodekit"] / 1e12, 1), sdpa_TFLOPs=round(flops / rows["sdpa"] / 1e12, 1),
             rel_err=round(err, 5))  # fmt: skip
    for Bd in (1, 16) if not chk.dry else (2,):
        for S_c in (4096, 32768) if not chk.dry else (64,):
            if time.monotonic() > stop:
                chk.emit("bench_attention", skipped=f"decode B={Bd} cache={S_c}: stage budget spent")
                continue
            Hkv = H // 4
            q = torch.randn(Bd, H, 1, D, device=dev, dtype=dt)
            kc, vc = (torch.randn(Bd, Hkv, S_c, D, device=dev, dtype=dt) for _ in range(2))
            lens = torch.full((Bd,), S_c, device=dev, dtype=torch.int32)
            ours = lambda: decodekit.decode_attention(q, kc, vc, lens, backend="triton")  # noqa: E731
            sdpa = lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)  # noqa: E731
            err = rel_err(ours(), sdpa())
            rows = {"decodekit": time_it(ours), "sdpa": time_it(sdpa)}
            bytes_ = 2 * kc.numel() * kc.element_size()
            _row(chk, "bench_attention", f"decode B={Bd} H={H}/{Hkv} cache={S_c} D={D}", rows["sdpa"], rows,
                 GBps=round(bytes_ / rows["decodekit"] / 1e9, 1),
                 of_copy_bw=round(bytes_ / rows["decodekit"] / (bw / 2), 2), rel_err=round(err, 5))  # fmt: skip


def graph_timer(chk: Check) -> Callable[[Callable[[], Any]], float]:
    """Median seconds of one CUDA-graph replay of ``fn`` (captured after a warm-up on a side stream): the
    device time alone, without the host's launch and dispatch cost. Dry run: the host timer."""
    if chk.dry:
        return timer(chk)
    from bench.gpu_cuda_graph import capture

    return lambda fn: timer(chk)(capture(fn, True)[0])


def host_seconds(fn: Callable[[], Any], calls: int = 20) -> float:
    """Host seconds per call when calls are only queued (no synchronization inside the loop): the launch cost.
    Few calls, so that the device's launch queue does not fill: a call whose device work outlasts its host cost
    would otherwise measure the device (the value is then bounded below by the device time either way)."""
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - t) / calls
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return per_call


def stage_launch_overhead(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    """Small decode-time calls three ways: as called (``do_bench``), replayed from a CUDA graph (device time
    only) and the host's cost per queued call; each against its PyTorch counterpart timed the same ways."""
    import torch
    import torch.nn.functional as F

    import decodekit
    from bench.bench_block import PARAM_SETS, eager_block
    from bench.bench_sampling import hf_eager

    time_it, time_graph = timer(chk), graph_timer(chk)
    bf = torch.bfloat16 if not chk.dry else torch.float32
    V, K, S = (128256, 4096, 4096) if not chk.dry else (300, 64, 64)
    L, calls = (32, 20) if not chk.dry else (4, 1)
    x = (torch.randn(1, V, device=dev) * 4).to(bf)
    kw = dict(temperature=0.8, top_k=40, top_p=0.95)
    seed = torch.ones(1, dtype=torch.int64, device=dev)
    h, nw = torch.randn(1, K, device=dev, dtype=bf), torch.randn(K, device=dev, dtype=bf)
    w = (torch.randn(K, K, device=dev) * K**-0.5).to(bf)
    q = torch.randn(1, 32, 1, 128 if not chk.dry else 16, device=dev, dtype=bf)
    kc, vc = (torch.randn(1, 8, S, q.shape[-1], device=dev, dtype=bf) for _ in range(2))
    lens = torch.full((1,), S, device=dev, dtype=torch.int32)
    xl = torch.randn(1, L, V, device=dev) * 3
    masked = torch.ones(1, L, dtype=torch.bool, device=dev)
    ids = torch.zeros(1, L, dtype=torch.int64, device=dev)
    cases = {
        f"sample B=1 V={V} {str(bf)[6:]} top-k 40 top-p 0.95": (
            lambda: decodekit.sample(x, seed=seed, backend="triton", **kw), lambda: hf_eager(x, kw)),
        f"rms_norm_linear M=1 K=N={K} {str(bf)[6:]}": (
            lambda: decodekit.rms_norm_linear(h, nw, w, backend="triton"),
            lambda: F.linear(F.rms_norm(h, (K,), nw, 1e-6), w)),
        f"decode_attention B=1 H=32/8 cache={S} {str(bf)[6:]}": (
            lambda: decodekit.decode_attention(q, kc, vc, lens, backend="triton"),
            lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)),
    }
    # the decode-size sweep of the fused norm + linear against norm + cuBLAS (the "auto" backend's threshold)
    for M in (16, 64, 256) if not chk.dry else (3,):
        hm = torch.randn(M, K, device=dev, dtype=bf)
        cases[f"rms_norm_linear M={M} K=N={K} {str(bf)[6:]}"] = (
            lambda hm=hm: decodekit.rms_norm_linear(hm, nw, w, backend="triton"),
            lambda hm=hm: decodekit.rms_norm_linear(hm, nw, w, backend="torch"))
    for Bd, Sd in ((16, 4096), (1, 32768)) if not chk.dry else ((2, 64),):
        qd = torch.randn(Bd, 32, 1, q.shape[-1], device=dev, dtype=bf)
        kd, vd = (torch.randn(Bd, 8, Sd, q.shape[-1], device=dev, dtype=bf) for _ in range(2))
        ld = torch.full((Bd,), Sd, device=dev, dtype=torch.int32)
        cases[f"decode_attention B={Bd} H=32/8 cache={Sd} {str(bf)[6:]}"] = (
            lambda qd=qd, kd=kd, vd=vd, ld=ld: decodekit.decode_attention(qd, kd, vd, ld, backend="triton"),
            lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
    for pname in ("llada-T0-raw_prob", "sdar-T1-k50-p0.9-prob"):
        bkw = PARAM_SETS[pname]
        cases[f"sample_block 1x{L}x{V} {pname}"] = (
            lambda bkw=bkw: decodekit.sample_block(xl, masked, input_ids=ids, seed=seed, backend="triton", **bkw),
            lambda bkw=bkw: eager_block(xl, masked, ids, **bkw))
    for case, (ours, base) in cases.items():
        if time.monotonic() > stop:
            chk.emit("launch_overhead", skipped=f"{case}: stage budget spent")
            continue
        try:
            row = {"decodekit_us": time_it(ours), "decodekit_graph_us": time_graph(ours),
                   "decodekit_host_us": host_seconds(ours, calls), "torch_us": time_it(base),
                   "torch_graph_us": time_graph(base), "torch_host_us": host_seconds(base, calls)}  # fmt: skip
            chk.emit("launch_overhead", case=case, **{k: round(v * 1e6, 2) for k, v in row.items()},
                     graph_x_vs_torch=round(row["torch_graph_us"] / row["decodekit_graph_us"], 2))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported, the stage goes on
            chk.emit("launch_overhead", case=case, error=f"{type(exc).__name__}: {str(exc)[:200]}", where=where(exc))


def stage_kernel_profile(chk: Check, dev, stop: float) -> None:  # noqa: ANN001
    """Where the device time of the calls that missed their targets goes: ``torch.profiler`` over 10 calls after
    warm-up, the kernels by device time per call (CPU time in a dry run, which has no CUDA activity)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import decodekit
    from bench.bench_block import PARAM_SETS

    cuda = dev.type == "cuda"
    Bp, V, L, K = (64, 128256, 32, 4096) if not chk.dry else (2, 300, 4, 64)
    kw = dict(temperature=0.8, top_k=40, top_p=0.95)
    cases: dict[str, Callable[[], Any]] = {}
    for dt in (torch.float32, torch.bfloat16) if not chk.dry else (torch.float32,):
        x = (torch.randn(Bp, V, device=dev) * 4).to(dt)
        cases[f"sample B={Bp} V={V} {str(dt)[6:]} top-k 40 top-p 0.95"] = lambda x=x: decodekit.sample(
            x, seed=1, backend="triton", **kw)
    xp = torch.randn(Bp, V, device=dev) * 4
    cases[f"sample B={Bp} V={V} float32 top-p 0.95 alone"] = lambda: decodekit.sample(
        xp, temperature=0.8, top_p=0.95, seed=1, backend="triton")
    xl = torch.randn(1, L, V, device=dev) * 3
    masked = torch.ones(1, L, dtype=torch.bool, device=dev)
    bkw = PARAM_SETS["sdar-T1-k50-p0.9-prob"]
    cases[f"sample_block 1x{L}x{V} sdar"] = lambda: decodekit.sample_block(xl, masked, seed=1, backend="triton",
                                                                          **bkw)  # fmt: skip
    bf = torch.bfloat16 if not chk.dry else torch.float32
    h, nw = torch.randn(Bp, K, device=dev, dtype=bf), torch.randn(K, device=dev, dtype=bf)
    w = (torch.randn(K, K, device=dev) * K**-0.5).to(bf)
    cases[f"rms_norm_linear M={Bp} K=N={K}"] = lambda: decodekit.rms_norm_linear(h, nw, w, backend="triton")
    calls = 10 if not chk.dry else 1
    for case, fn in cases.items():
        if time.monotonic() > stop:
            chk.emit("kernel_profile", skipped=f"{case}: stage budget spent")
            continue
        try:
            fn()
            fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
            rows = []
            for ev in prof.key_averages():
                us = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / calls
                if us > 0:
                    rows.append((us, ev.count // calls, ev.key[:60]))
            rows.sort(reverse=True)
            chk.emit("kernel_profile", case=case, device_us_per_call=round(sum(r[0] for r in rows), 1),
                     top=[f"{name} x{n}: {us:.1f} us" for us, n, name in rows[:6]])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported, the stage goes on
            chk.emit("kernel_profile", case=case, error=f"{type(exc).__name__}: {str(exc)[:200]}", where=where(exc))


# --------------------------------------------------------------------------- stage 4: the rest of the tests


#: the test paths of the tests stage, in order (the fuzz tests come last: they compile the most). No path may lie
#: inside another: pytest merges overlapping arguments into the outer one, at its place, and the order is lost.
TEST_PATHS = ("tests/ops/sampling", "tests/ops/attention", "tests/ops/norm_linear", "tests/nn",
              "tests/ops/test_dispatch.py", "tests/ops/test_library.py", "tests/ops/test_compile.py",
              "tests/ops/test_fuzz_ops.py")


def stage_tests(chk: Check, seconds: float, paths: tuple[str, ...] = TEST_PATHS) -> None:
    """The test suite compiled on the GPU (interpreter off), for as long as the budget allows. At the deadline
    pytest gets SIGINT, so it still prints every failure so far (a kill would lose them)."""
    if chk.dry:
        chk.emit("tests", skipped="dry run: the suite itself is what runs here")
        return
    if seconds < 30:
        chk.emit("tests", skipped=f"only {seconds:.0f} s left")
        return
    env = dict(os.environ, TRITON_INTERPRET="0", DECODEKIT_DEVICE="cuda")
    root = Path(__file__).resolve().parents[1]
    # not -x: one lease must list every failure it can reach
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=30", "-rfE", "--tb=short",
           *paths]  # fmt: skip
    log = chk.out / "gpu_check_tests.log"
    with open(log, "w") as f:
        # SIGINT back to its default in the child: a check started in the background has it ignored, and pytest
        # would then never see the interrupt that makes it print its failures
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            proc.wait(timeout=max(seconds - 20, 10))
            stopped = None
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # pytest reports what failed so far, then exits
            stopped = f"time budget ({seconds:.0f} s) ran out"
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lines = log.read_text(errors="replace").strip().splitlines()
    failed = [ln.split(" ", 1)[1][:193] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln), lines[-1] if lines else "")
    chk.emit("tests", cmd=" ".join(cmd[2:]), rc=proc.returncode, summary=summary.strip("= "), failed=failed[:30],
             stopped=stopped or "", passed=not failed and (stopped is not None or proc.returncode == 0))  # fmt: skip


# --------------------------------------------------------------------------- report


def render(records: list[dict[str, Any]]) -> str:
    """Markdown from the JSON lines: one table per stage, columns from the records' keys."""
    lines = ["# GPU check", ""]
    env = next((r for r in records if r["stage"] == "env"), None)
    if env:
        lines += [", ".join(f"{k}: {v}" for k, v in env.items() if k not in ("stage", "t")), ""]
    for stage in STAGES:
        recs = [r for r in records if r["stage"] == stage]
        if not recs:
            continue
        keys = [k for k in dict.fromkeys(k for r in recs for k in r) if k not in ("stage",)]
        lines += [f"## {stage}", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        for r in recs:
            cells = []
            for k in keys:
                v = r.get(k, "")
                cells.append(f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    # not bench/results itself: a run rewrites OUT/<gpu>.md, and the committed report there may merge several runs
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu-run")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s != "tests"),
                    help="comma-separated stages to run, in the check's order (default: all)")
    ap.add_argument("--tests", default=",".join(TEST_PATHS), help="comma-separated test paths of the tests stage")
    args = ap.parse_args(argv)
    chosen = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in chosen if s not in STAGES or s == "tests"]:
        ap.error(f"unknown stage(s) {unknown}; choose from {[s for s in STAGES if s != 'tests']}")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    chk = Check(args.out, args.budget, args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if not args.dry_run else "cpu")
    if not args.dry_run:
        chk.gpu = slug(torch.cuda.get_device_name())
    (args.out / "gpu_check.jsonl").unlink(missing_ok=True)
    chk.emit("env", gpu=chk.gpu, torch=torch.__version__, triton=triton.__version__,
             python=platform.python_version(), budget_s=args.budget, dry_run=args.dry_run)  # fmt: skip
    deadline = 0.0
    # the CUDA-graph case first: it is short and nothing else shows capture working
    stages = [("cuda_graph", lambda stop: stage_cuda_graph(chk, dev)),
              ("correctness", lambda stop: stage_correctness(chk, dev)),
              ("bench_sampling", lambda stop: stage_bench_sampling(chk, dev, stop)),
              ("bench_block_beam", lambda stop: stage_bench_block_beam(chk, dev, stop)),
              ("bench_norm_linear", lambda stop: stage_bench_norm_linear(chk, dev, stop)),
              ("bench_attention", lambda stop: stage_bench_attention(chk, dev, stop)),
              ("launch_overhead", lambda stop: stage_launch_overhead(chk, dev, stop)),
              ("kernel_profile", lambda stop: stage_kernel_profile(chk, dev, stop))]  # fmt: skip
    stages = [(name, run) for name, run in stages if name in chosen]
    # the chosen stages share what all of them would get (the rest of the budget is the tests stage's)
    scale = args.budget / 420.0 * sum(STAGES.values()) / sum(STAGES[name] for name, _ in stages) if stages else 0
    failed = False
    for name, run in stages:
        deadline += STAGES[name] * scale
        stop = chk.t0 + min(deadline, args.budget)
        if time.monotonic() > stop:
            chk.emit(name, skipped="time budget spent before the stage started")
            continue
        try:
            run(stop)
        except Exception as exc:  # one stage failing must not lose the others' results
            failed = True
            traceback.print_exc()
            chk.emit(name, error=f"{type(exc).__name__}: {str(exc)[:300]}", where=where(exc))
    stage_tests(chk, chk.left() - 10, tuple(p for p in args.tests.split(",") if p))
    bad = [r for r in chk.records if r.get("passed") is False or "error" in r]
    print(f"gpu_check: {len(chk.records)} records, {len(bad)} failed, {time.monotonic() - chk.t0:.0f} s; "
          f"report: {args.out / (chk.gpu + '.md')}")  # fmt: skip
    return 1 if (bad or failed) else 0


if __name__ == "__main__":
    sys.exit(main())
