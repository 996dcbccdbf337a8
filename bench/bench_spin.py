"""How ONNX Runtime's idle CPU workers wait (``OnnxDecoder(spin_wait=...)``), on quiet cores and on shared ones.

A decode step of SmolLM2-135M runs ~150 parallel ops (the MatMuls, the attention) with short sequential ops between
them. A worker that blocks as soon as it runs out of work must be woken (a futex round trip) for every parallel op; a
worker that spins through the step is never woken, but takes a core that another process may need. The policies
measured, side by side:

* ``block``: ``spin_wait=False``, block at once (decodekit's default before 2026-12-01);
* ``5us`` (the default, ``SPIN_WAIT_DEFAULT_US``) and ``10us``: spin that long for the next op, then block;
* ``step``: ``spin_wait=True``, spin through each step and stop at its end (as onnxruntime-genai's workers spin
  through each run).

Each under three loads: ``quiet``; ``one core busy``: a second process spinning on the CPU for the whole group
(what a sampler, a tokenizer or a server next to the model does to a small machine); ``every core busy``: one such
process per core (the machine oversubscribed). SmolLM2-135M fp32, the fused
``gqa`` graph, ``os.cpu_count()`` ORT threads, greedy, batch 1 and 8; the policies' tokens are checked equal.

Timing: in each (batch, load) group every policy first runs ``ROUNDS`` rounds interleaved (``interleaved_tok_s``),
then pytest-benchmark times ``ROUNDS`` rounds of each; ``cpu_s_per_generation`` is this process's CPU time per
generation in the interleaved rounds (spinning burns it).

Environment: ``DECODEKIT_BENCH_SPIN_TOKENS`` (default 64), ``DECODEKIT_BENCH_SPIN_ROUNDS`` (default 3),
``DECODEKIT_BENCH_EXPORTS=DIR`` (keep the exported folder between runs, shared with ``bench_peers.py``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench.bench_peers import PROMPT_LEN, _prompts, bench_root, decodekit_folder
from bench.conftest import run_bench
from decodekit.runtime import OnnxDecoder

NEW_TOKENS = int(os.environ.get("DECODEKIT_BENCH_SPIN_TOKENS", 64))
ROUNDS = int(os.environ.get("DECODEKIT_BENCH_SPIN_ROUNDS", 3))
THREADS = os.cpu_count() or 2
POLICIES = {"block": False, "5us": "5us", "10us": "10us", "step": True}  # name -> OnnxDecoder(spin_wait=...)
LOADS = ["quiet", "one core busy", "every core busy"]


@contextlib.contextmanager
def _load(load: str) -> Iterator[None]:
    """``one core busy``: a child process spinning on the CPU while the block runs; ``every core busy``: one per
    core this process may run on."""
    n = {"quiet": 0, "one core busy": 1, "every core busy": len(os.sched_getaffinity(0))}[load]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if busy:
            time.sleep(0.3)  # let them start spinning
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # noqa: ANN001, ANN201
    return decodekit_folder(bench_root(tmp_path_factory), "SmolLM2-135M", "gqa")


_DECODERS: dict[int, dict[str, OnnxDecoder]] = {}
_GROUPS: dict[tuple[int, str], dict] = {}


def _group(folder, batch: int, load: str) -> dict:  # noqa: ANN001
    """The decoders of a batch size (made once), and the interleaved rounds of one (batch, load) group."""
    if batch not in _DECODERS:
        _DECODERS[batch] = {name: OnnxDecoder(folder, "cpu", max_batch=batch, max_seq_len=PROMPT_LEN + NEW_TOKENS,
                                              intra_op_threads=THREADS, spin_wait=policy)
                            for name, policy in POLICIES.items()}
    decs = _DECODERS[batch]
    key = (batch, load)
    if key not in _GROUPS:
        prompts = _prompts("SmolLM2-135M", batch)
        kw = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=[])
        tokens = {name: dec.generate(prompts, **kw).tokens for name, dec in decs.items()}  # and the warm-up
        times: dict[str, list[float]] = {name: [] for name in decs}
        cpu: dict[str, float] = dict.fromkeys(decs, 0.0)
        with _load(load):
            for _ in range(ROUNDS):
                for name, dec in decs.items():
                    t, c = time.perf_counter(), time.process_time()
                    dec.generate(prompts, **kw)
                    times[name].append(time.perf_counter() - t)
                    cpu[name] += time.process_time() - c
        _GROUPS[key] = {"prompts": prompts, "kw": kw, "tokens": tokens,
                        "interleaved": {n: statistics.median(ts) for n, ts in times.items()},
                        "cpu": {n: c / ROUNDS for n, c in cpu.items()}}
    return _GROUPS[key]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_spin_wait(benchmark, folder, batch, load, policy):
    g = _group(folder, batch, load)
    assert g["tokens"][policy] == g["tokens"]["block"], f"{policy}: the tokens differ from blocking's"
    dec = _DECODERS[batch][policy]
    median = g["interleaved"][policy]
    with _load(load):
        run_bench(
            benchmark, lambda: dec.generate(g["prompts"], **g["kw"]),
            group=f"spin_wait SmolLM2-135M fp32 gqa B={batch} {load} ({THREADS} ORT threads, {NEW_TOKENS} tokens)",
            impl=f"spin {policy}", baseline=policy == "block", rounds=ROUNDS, host_only=True,
            tokens=batch * NEW_TOKENS, batch=batch, load=load, threads=THREADS, spin_wait=str(POLICIES[policy]),
            interleaved_median_s=round(median, 6), interleaved_tok_s=round(batch * NEW_TOKENS / median, 1),
            cpu_s_per_generation=round(g["cpu"][policy], 3),
        )
