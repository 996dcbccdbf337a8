"""CUDA-graph check for the GPU run: a decode step that ends in ``decodekit.sample`` is captured once with
``torch.cuda.graph`` and replayed with new inputs and new per-row seeds on the device; every replay must give
exactly the tokens (and logits) of an uncaptured call on the same inputs.

Three cases, each reported in the returned flat dict (``bench/gpu_check.py`` emits it as one JSON line):

* ``sampler_*``: ``sample`` alone (per-row temperature, top-k, top-p, repetition penalty with token counts,
  per-row seeds, log-probabilities) on static ``[B, V]`` logits.
* ``step_*``: one decode step of a random-weight Llama-family ``decodekit.models.Decoder`` after
  ``decodekit.patch`` (fused RMSNorm + Linear kernels, ``decode_attention`` over a fixed KV cache with a left-padded
  row), then ``sample`` on its logits.
* ``compile_*``: the same step under ``torch.compile(fullgraph=True)`` (``aot_eager``: Dynamo + AOT autograd,
  the part that has to see decodekit's custom ops) gives the eager tokens, with no graph break.

``*_sync_free`` runs one uncaptured call under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
host synchronization (capture would fail on one too; this names it). Needs torch and triton only. On a machine
without CUDA, ``device="cpu"`` runs the same code without capture (the plumbing only; the test suite does that).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["capture", "cuda_graph_check"]


def _same(a, b) -> bool:  # noqa: ANN001 - tensors
    return a.shape == b.shape and bool((a == b).all())


def _max_diff(a, b) -> float:  # noqa: ANN001
    return 0.0 if a.numel() == 0 else float((a.float() - b.float()).abs().nan_to_num(posinf=1e30).max())


def _sync_free(fn: Callable[[], Any], cuda: bool) -> bool | None:
    """True when ``fn`` runs without a host synchronization (CUDA only; None elsewhere)."""
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def capture(fn: Callable[[], Any], cuda: bool) -> tuple[Callable[[], None], Any]:
    """Warm up ``fn`` on a side stream (Triton compiles and autotunes there), capture it; returns ``(replay, static
    outputs)``. Without CUDA: ``replay`` calls ``fn`` and refreshes the outputs in place."""
    import torch

    if not cuda:
        out = fn()

        def rerun() -> None:
            for dst, src in zip(out, fn(), strict=True):
                dst.copy_(src)

        return rerun, out
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _sampler_case(dev, B: int, V: int, rounds: int) -> dict[str, Any]:  # noqa: ANN001
    import torch

    import decodekit

    cuda = dev.type == "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, V, device=dev, generator=gen) * 3
    counts = torch.randint(0, 2, (B, V), device=dev, generator=gen, dtype=torch.int32)
    temp = torch.linspace(0.5, 1.2, B, device=dev)
    seeds = torch.arange(B, device=dev, dtype=torch.int64)

    def call(lg, sd):  # noqa: ANN001
        return decodekit.sample(lg, temperature=temp, top_k=50, top_p=0.9, repetition_penalty=1.1,
                                token_counts=counts, seed=sd, return_logprobs=True)

    replay, (tok, lp) = capture(lambda: call(logits, seeds), cuda)
    match, diff, seen = True, 0.0, []
    for _ in range(rounds):
        new_logits = torch.randn(B, V, device=dev, generator=gen) * 3
        new_seeds = torch.randint(0, 2**62, (B,), device=dev, generator=gen, dtype=torch.int64)
        logits.copy_(new_logits)
        seeds.copy_(new_seeds)
        replay()
        ref_tok, ref_lp = call(new_logits, new_seeds)  # uncaptured, on separate tensors
        match = match and _same(tok, ref_tok) and bool((ref_tok >= 0).all())
        diff = max(diff, _max_diff(lp, ref_lp))
        seen.append(tuple(tok.tolist()))
    return {"sampler_replays": rounds, "sampler_tokens_match": match, "sampler_logprobs_max_diff": diff,
            "sampler_outputs_follow_inputs": len(set(seen)) == len(seen),  # each replay drew from its own inputs
            "sampler_sync_free": _sync_free(lambda: call(logits, seeds), cuda)}


def _decode_model(dev, V: int):  # noqa: ANN001
    import torch

    import decodekit
    from decodekit.models import Decoder, DecoderConfig

    cfg = DecoderConfig(arch="llama", vocab_size=V, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512,
                        max_seq_len=256)
    torch.manual_seed(0)
    model = Decoder(cfg).to(dev).eval()
    decodekit.patch(model, backend="triton")  # the fused norm + linear kernels ("auto" takes cuBLAS on CUDA) and
    # decodekit attention (use_kernels)
    return model


def _step_case(dev, B: int, V: int, P: int, rounds: int, compile_check: bool) -> dict[str, Any]:  # noqa: ANN001
    import torch

    import decodekit

    cuda = dev.type == "cuda"
    model = _decode_model(dev, V)
    c = model.config
    gen = torch.Generator(device=dev).manual_seed(1)
    past = [(torch.randn(B, c.n_kv_heads, P, c.head_dim, device=dev, generator=gen),
             torch.randn(B, c.n_kv_heads, P, c.head_dim, device=dev, generator=gen)) for _ in range(c.n_layers)]
    mask = torch.ones(B, P + 1, dtype=torch.int64, device=dev)
    mask[-1, :5] = 0  # the last row is left-padded: decode_attention's kv_start
    pos = (mask.sum(1, keepdim=True) - 1).to(torch.int64)
    tok = torch.randint(0, V, (B, 1), device=dev, generator=gen)
    seeds = torch.arange(B, device=dev, dtype=torch.int64) + 100

    @torch.no_grad()
    def step(tk, sd):  # noqa: ANN001
        logits, _ = model(tk, pos, mask, past)
        return decodekit.sample(logits, temperature=0.8, top_p=0.95, seed=sd), logits

    replay, (next_tok, logits) = capture(lambda: step(tok, seeds), cuda)
    match, diff = True, 0.0
    for _ in range(rounds):
        new_tok = torch.randint(0, V, (B, 1), device=dev, generator=gen)
        new_seeds = torch.randint(0, 2**62, (B,), device=dev, generator=gen, dtype=torch.int64)
        tok.copy_(new_tok)
        seeds.copy_(new_seeds)
        replay()
        ref_tok, ref_logits = step(new_tok, new_seeds)
        match = match and _same(next_tok, ref_tok)
        diff = max(diff, _max_diff(logits, ref_logits))
    out: dict[str, Any] = {"step_replays": rounds, "step_tokens_match": match, "step_logits_max_diff": diff,
                           "step_sync_free": _sync_free(lambda: step(tok, seeds), cuda)}
    if not compile_check:
        return out

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c_tok, c_logits = compiled(tok, seeds)
    e_tok, e_logits = step(tok, seeds)
    out.update(compile_tokens_match=_same(c_tok, e_tok), compile_logits_max_diff=_max_diff(c_logits, e_logits),
               compile_graph_breaks=int(sum(counters["graph_break"].values())))
    return out


def cuda_graph_check(device: str | None = None, *, batch: int = 4, vocab: int = 32000, past: int = 64,
                     rounds: int = 3, compile_check: bool = True) -> dict[str, Any]:
    """Run the three cases; a flat, JSON-serializable dict of results (``ok``: every check passed).

    ``device``: ``"cuda"`` (default when available) captures real CUDA graphs; ``"cpu"`` runs the same code
    without capture. A case that raises is reported as ``<case>_error`` and fails ``ok``. ``compile_check=False``
    leaves out the ``compile_*`` case.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device"}
        device = "cuda"
    dev = torch.device(device)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "captured": dev.type == "cuda", "batch": batch, "vocab": vocab}
    for name, case in (("sampler", lambda: _sampler_case(dev, batch, vocab, rounds)),
                       ("step", lambda: _step_case(dev, batch, vocab, past, rounds, compile_check))):
        try:
            res.update(case())
        except Exception as exc:  # noqa: BLE001 - reported, the GPU check goes on
            from bench.gpu_check import where

            res[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400] + f" at {where(exc)}"
    flags = ["sampler_tokens_match", "sampler_outputs_follow_inputs", "step_tokens_match"]
    flags += ["compile_tokens_match"] if compile_check else []
    # the logits of a replay may differ from an uncaptured call's in the last bits (cuBLAS may pick another
    # algorithm under capture); the tokens may not
    res["ok"] = (all(res.get(k) is True for k in flags) and res.get("compile_graph_breaks", 0) == 0
                 and res.get("sampler_sync_free") is not False and res.get("step_sync_free") is not False
                 and res.get("step_logits_max_diff", 1.0) <= 1e-3 and res.get("sampler_logprobs_max_diff", 1.0) <= 1e-5)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(cuda_graph_check(), indent=1))
