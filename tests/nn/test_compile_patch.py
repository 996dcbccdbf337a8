"""``decodekit.patch(model)`` on random-weight Hugging Face GPT-2 and Llama, then the forward under
``torch.compile(fullgraph=True)``: one frame, no graph break, decodekit's fused ops in the graph, and the logits
of the uncompiled patched model. ``backend="triton"`` runs the real kernels (the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from test_patch import _hf_gpt2, _hf_llama  # the tiny random-weight models of tests/nn/test_patch.py
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import decodekit

pytest.importorskip("transformers")


@pytest.mark.parametrize("name, build, fused", [
    ("gpt2", _hf_gpt2, ("layer_norm_linear", "gelu_linear", "attention")),
    ("llama", _hf_llama, ("rms_norm_linear", "attention")),
])
def test_patched_hf_model_compiles_fullgraph(name, build, fused, device):
    model = build().eval().to(device)
    decodekit.patch(model, backend="triton")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        counters.clear()
        cnt = CompileCounterWithBackend("aot_eager")
        out = torch.compile(lambda ids: model(ids).logits, backend=cnt, fullgraph=True)(ids)
    assert cnt.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    targets = {str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in fused:
        assert f"decodekit.{op}" in targets, sorted(t for t in targets if "decodekit" in t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
