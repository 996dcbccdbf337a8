"""decodekit's ``Decoder``: one decode step (one token after a fixed-size KV cache) under
``torch.compile(fullgraph=True)``: one frame, no graph break, the eager logits and presents.

Both attention paths: the reference (plain PyTorch) and ``use_kernels=True`` (``decodekit.decode_attention``, the
Triton kernel under the interpreter on CPU), with a left-padded row so that the kernels' ``kv_start`` is used.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from decodekit.models import Decoder, DecoderConfig


def _model(arch: str, use_kernels: bool) -> Decoder:
    kw = dict(n_kv_heads=2) if arch == "llama" else {}
    cfg = DecoderConfig(arch=arch, vocab_size=53, dim=32, n_layers=2, n_heads=4, max_seq_len=32, **kw)
    torch.manual_seed(0)
    return Decoder(cfg, use_kernels=use_kernels).eval()


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_step_compiles_fullgraph(arch, use_kernels):
    model = _model(arch, use_kernels)
    B, P = 2, 7
    ids = torch.randint(1, 53, (B, P), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, P, dtype=torch.int64)
    mask[1, :2] = 0  # row 1 is left-padded
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        _, past = model(ids, pos, mask)  # the prefill fills the static [B, H_kv, P, D] buffers
        tok = torch.tensor([[5], [9]])
        step_pos = pos[:, -1:] + 1
        step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], dim=1)

        def step(tok, step_pos, step_mask, past):
            return model(tok, step_pos, step_mask, past)

        logits_e, presents_e = step(tok, step_pos, step_mask, past)
        torch._dynamo.reset()
        counters.clear()
        cnt = CompileCounterWithBackend("aot_eager")
        logits_c, presents_c = torch.compile(step, backend=cnt, fullgraph=True)(tok, step_pos, step_mask, past)
    assert cnt.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    if use_kernels:
        targets = {str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert "decodekit.decode_attention" in targets
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    for (kc, vc), (ke, ve) in zip(presents_c, presents_e, strict=True):
        assert kc.shape == (B, model.config.n_kv_heads, P + 1, model.config.head_dim)
        torch.testing.assert_close(kc, ke, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vc, ve, rtol=1e-6, atol=1e-6)
