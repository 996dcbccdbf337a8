"""bench/gpu_cuda_graph.py, the CUDA-graph part of the GPU check, run on this CPU without capture: the same code
(the sampler alone, a patched Decoder step + sample) must work and agree, so the
GPU run (minutes of a short lease) does not fail on plumbing."""

from __future__ import annotations

import json

from bench.gpu_cuda_graph import cuda_graph_check


def test_cuda_graph_check_plumbing_on_cpu():
    # the compile case is tests/models/test_compile_decoder.py's business here (it is the slow part on a CPU)
    res = cuda_graph_check("cpu", batch=3, vocab=97, past=6, rounds=2, compile_check=False)
    json.dumps(res)  # the GPU check writes it as one JSON line
    assert not [k for k in res if k.endswith("_error")], res
    assert res["captured"] is False and res["sampler_sync_free"] is None
    assert res["sampler_tokens_match"] and res["step_tokens_match"] and res["ok"], res
    assert "compile_tokens_match" not in res
