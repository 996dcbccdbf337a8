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


@pytest.mark.parametrize("old_dynamo", [False, True], ids=["dynamo", "old-dynamo"])
@pytest.mark.parametrize("name, build, fused", [
    ("gpt2", _hf_gpt2, ("layer_norm_linear", "gelu_linear", "attention")),
    ("llama", _hf_llama, ("rms_norm_linear", "attention")),
])
def test_patched_hf_model_compiles_fullgraph(name, build, fused, old_dynamo, device, monkeypatch):
    """``old_dynamo``: ``torch.compiler.is_exporting()`` reads True while compiling, as dynamo made it in older
    torch (measured: under 2.10, not under 2.13); transformers then builds the causal mask and the attention falls
    back to SDPA unless decodekit's mask builder skips it."""
    if old_dynamo:
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
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


@pytest.mark.parametrize("q_length, kv_length", [(1, 1), (1, 7), (5, 5), (3, 8)])
@pytest.mark.parametrize("form", ["causal", "padding", "sliding", "tensor_offset", "no_skip", "other_function"])
def test_mask_builder_skips_exactly_the_plain_causal_cases(q_length, kv_length, form, monkeypatch):
    """decodekit's mask builder returns None for the causal pattern with no padding mask and one query or as many
    keys as queries (what the attention function then runs: the whole cache / causal top-left), also where
    transformers would not skip (``torch.compiler.is_exporting()`` reads True, as under torch 2.10's dynamo);
    otherwise it answers as transformers' ``sdpa_mask`` does (releases differ in what they skip), and a mask it
    returns is checked against the pattern it must have."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    from decodekit.nn.attention import causal_mask_or_none

    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    kw = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=kv_length - q_length, kv_offset=0,
              mask_function=causal_mask_function, attention_mask=None, allow_is_causal_skip=True, device="cpu")
    if form == "padding":
        kw["attention_mask"] = torch.ones(2, kv_length, dtype=torch.bool)
        kw["attention_mask"][0, 0] = kv_length == 1  # one padded slot in row 0 (none when there is one key)
    elif form == "sliding":
        kw["local_size"], kw["mask_function"] = 2, sliding_window_causal_mask_function(2)
    elif form == "tensor_offset":
        kw["q_offset"] = torch.tensor(kv_length - q_length)
    elif form == "no_skip":
        kw["allow_is_causal_skip"] = False
    elif form == "other_function":
        kw["mask_function"] = sliding_window_causal_mask_function(kv_length + 1)  # the same pattern, not known so
    got = causal_mask_or_none(**kw)
    if form == "causal" and (q_length == 1 or q_length == kv_length):
        assert got is None
        return
    theirs = sdpa_mask(**kw)
    assert (got is None) == (theirs is None), form
    if form == "causal":
        assert got is not None  # 3 queries, 8 keys: a mask is needed whatever the release
    if got is None:
        return
    # key j is visible to query i iff j <= i + offset (and unpadded, and inside the window)
    i = torch.arange(q_length)[:, None] + (kv_length - q_length)
    j = torch.arange(kv_length)[None, :]
    pattern = (j <= i) & ((i - j < 2) if form == "sliding" else True)
    if form == "padding":
        pattern = pattern & kw["attention_mask"][:, None, None, :]
    assert torch.equal(got, pattern.expand(2, 1, q_length, kv_length)), form
