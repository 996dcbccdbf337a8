"""``export_decoder(graph="gqa")``: ONNX Runtime's fused ops with an in-place KV cache (issue 16).

The references are eager PyTorch (the decodekit ``Decoder`` the graph was written from) and the plain graph, whose
own tests compare it with eager PyTorch and transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch

from decodekit.errors import UsageError, ValidationError
from decodekit.export import export_decoder
from decodekit.export.gqa import _probe_gqa, _probe_rotary, gqa_unsupported, ort_version_at_least
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder
from decodekit.runtime import OnnxDecoder, chat_prompt, load_backend
from decodekit.runtime.eager import EagerDecoder


def _random_decoder(arch: str, head_dim: int, **kw) -> Decoder:
    n_heads, n_kv = (6, 2) if arch == "llama" else (3, 3)
    cfg = DecoderConfig(arch=arch, vocab_size=131, dim=n_heads * head_dim, n_layers=3, n_heads=n_heads,
                        n_kv_heads=n_kv, hidden_dim=72, max_seq_len=96, **kw)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init: logits spread out, greedy ties are rare
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.08)
    return model


def _kv_concats(path: Path) -> int:
    """Concat nodes whose output is a graph output (the plain graph's per-step copy of the cache)."""
    model = onnx.load(str(path), load_external_data=False)
    outs = {o.name for o in model.graph.output}
    return sum(1 for n in model.graph.node if n.op_type == "Concat" and set(n.output) & outs)


@pytest.fixture(scope="module")
def stories_gqa(stories_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gqa") / "stories260K"
    export_decoder(stories_dir / "stories260K.bin", out, graph="gqa", progress=False)
    return out


@pytest.mark.parametrize("arch, layout, bias", [("llama", "adjacent", False), ("llama", "adjacent", True),
                                                ("llama", "halves", True), ("gpt2", "adjacent", False)])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_random_model_gqa_graph_greedy_equals_eager(arch, layout, bias, head_dim, tmp_path):
    model = _random_decoder(arch, head_dim, rope_layout=layout, attn_bias=bias, mlp_bias=bias)
    res = export_decoder(model, tmp_path / "gqa", graph="gqa", progress=False)
    meta = res.metadata
    assert meta["graph"] == "gqa" and meta["graph_note"] is None
    assert meta["kv_cache"]["shared_buffer"] is True
    assert meta["io"]["present.0.key"]["shape"] == ["batch", model.config.n_kv_heads, "capacity", head_dim]
    assert max(res.validation.max_abs_diff.values()) <= 1e-4
    graph = onnx.load(str(res.onnx_path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("GroupQueryAttention") == 3
    # rotation inside GroupQueryAttention when the installed ORT does it right (head size 16 here, not 24): no rotary
    # node, no Split; else adjacent pairs: one RotaryEmbedding per layer on the packed q|k span, no Split of q/k/v;
    # halves: q and k apart
    inside = arch == "llama" and _probe_rotary(6, 2, head_dim, False, int(layout == "adjacent"), True)
    assert meta["kv_cache"]["key_positions"] == ("cache_slots" if inside else "positions")
    gqa_rotary = {onnx.helper.get_attribute_value(a) for n in graph.graph.node if n.op_type == "GroupQueryAttention"
                  for a in n.attribute if a.name == "do_rotary"}
    assert gqa_rotary == ({1} if inside else set())
    rotary, qkv_split = {"adjacent": (3, 0), "halves": (6, 3)}[layout] if arch == "llama" else (0, 0)
    if inside:
        rotary, qkv_split = 0, 0
    splits = [n.name for n in graph.graph.node if n.op_type == "Split"]
    assert ops.count("RotaryEmbedding") == rotary and sum("/qkv/" in n for n in splits) == qkv_split
    # packed projections: per layer q/k/v, o, gate|up (Llama; split once), down; plus the classifier
    assert ops.count("MatMul") == 3 * 4 + 1 and sum("/mlp/" in n for n in splits) == (3 if arch == "llama" else 0)
    assert ops.count("SkipSimplifiedLayerNormalization" if arch == "llama" else "SkipLayerNormalization") == 6
    assert _kv_concats(res.onnx_path) == 0
    # left-padded batch of three prompts of different lengths, then single-token steps
    prompts = [[5, 17, 99, 3, 42, 8, 77], [1], [64, 2, 30]]
    onnx_dec = OnnxDecoder(res.out_dir, max_batch=4)
    eager = EagerDecoder(model, max_batch=4)
    a = onnx_dec.generate(prompts, max_new_tokens=40, temperature=0.0, stop_ids=[])
    b = eager.generate(prompts, max_new_tokens=40, temperature=0.0, stop_ids=[])
    assert a.tokens == b.tokens
    for i, p in enumerate(prompts):  # each row alone (no padding) gives the batched row's tokens
        assert onnx_dec.generate([p], max_new_tokens=40, temperature=0.0, stop_ids=[]).tokens[0] == a.tokens[i]


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("n_heads, n_kv, head_dim, span", [(8, 4, 64, True), (8, 8, 48, False), (4, 4, 96, False)])
def test_span_rotary_only_up_to_1024_values(n_heads, n_kv, head_dim, span, inside, monkeypatch):
    """One RotaryEmbedding on the packed q|k|v row only while that row fits ONNX Runtime's CUDA kernel (<= 1024
    values: (8 + 8) * 64 does, (8 + 16) * 48 and (4 + 8) * 96 do not); wider rows keep Split + a node each. With an
    ORT that rotates inside GroupQueryAttention (``inside``: the probe's answer forced), no rotary node and no q/k/v
    Split at any width: only each layer's gate|up Split."""
    import decodekit.export.gqa as gqa
    from decodekit.export.gqa import build_gqa_graph

    monkeypatch.setattr(gqa, "_probe_rotary", lambda *a: inside)
    if inside:
        span = None

    cfg = DecoderConfig(arch="llama", vocab_size=64, dim=n_heads * head_dim, n_layers=2, n_heads=n_heads,
                        n_kv_heads=n_kv, hidden_dim=32, max_seq_len=16)
    graph = build_gqa_graph(Decoder(cfg).eval(), opset=18).graph
    ops = [n.op_type for n in graph.node]
    if span is None:
        assert ops.count("RotaryEmbedding") == 0 and ops.count("Split") == 2
        gqa_nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert all(list(n.input[1:3]) == ["", ""] and n.input[7] == "rotary.cos_cache" for n in gqa_nodes)
        return
    assert ops.count("RotaryEmbedding") == (2 if span else 4)
    assert ops.count("Split") == (2 if span else 4)  # the gate|up Split of each layer, plus q/k/v's without span


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp16_gqa_graph_validates(arch, tmp_path):
    res = export_decoder(_random_decoder(arch, 16).half(), tmp_path / "fp16", graph="gqa", dtype="fp16",
                         progress=False)
    assert res.metadata["graph"] == "gqa" and res.metadata["kv_cache"]["dtype"] == "float16"
    assert res.validation.ok and res.validation.atol == 1e-2  # the fp16 default, as the plain graph
    dec = OnnxDecoder(res.out_dir, max_batch=2)
    out = dec.generate([[5, 6, 7], [9]], max_new_tokens=8, temperature=0.0, stop_ids=[])
    assert all(len(t) == 8 and all(0 <= x < 131 for x in t) for t in out.tokens)


def test_stories260k_gqa_greedy_sampled_and_beam_equal_eager(stories_gqa, stories_export_dir, stories_dir):
    meta = json.loads((stories_gqa / "decodekit.json").read_text())
    assert meta["graph"] == "gqa", meta["graph_note"]  # head size 8: the installed ORT's CPU kernel takes it
    nodes = len(onnx.load(str(stories_gqa / "model.onnx")).graph.node)
    plain = len(onnx.load(str(stories_export_dir / "model.onnx")).graph.node)
    assert nodes < plain / 3, (nodes, plain)
    eager = load_backend(stories_dir / "stories260K.bin", "eager", max_batch=6)
    dec = OnnxDecoder(stories_gqa, max_batch=6)
    a = dec.generate([[1]], max_new_tokens=200, temperature=0.0, stop_ids=[])
    assert a.tokens == eager.generate([[1]], max_new_tokens=200, temperature=0.0, stop_ids=[]).tokens
    assert a.text[0].startswith("Once upon a time, there was a little girl named Lily.")
    prompts = ["Once upon a time there was a dog", "Tom", "The sun was hot and the"]
    kw = dict(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=7, stop_ids=[])
    assert dec.generate(prompts, **kw).tokens == eager.generate(prompts, **kw).tokens
    kw = dict(max_new_tokens=24, num_beams=3, do_sample=False, num_return_sequences=2, stop_ids=[1, 2])
    assert dec.generate(prompts[:2], **kw).tokens == eager.generate(prompts[:2], **kw).tokens


def test_shared_buffer_is_bound_once_per_generation(stories_gqa, monkeypatch):
    dec = OnnxDecoder(stories_gqa, max_batch=2)
    assert dec._kv.shape[0] == 1  # one storage: no ping-pong copy to hold
    calls = []
    real = dec._binder.kv
    monkeypatch.setattr(dec._binder, "kv", lambda *a: (calls.append(a[1]), real(*a)))
    ptr = dec._kv.data_ptr()
    dec.generate(["Once upon a time", "Tom"], max_new_tokens=20, temperature=0.0, stop_ids=[])
    assert len(calls) == 1 and calls[0] == (2, 4, dec.max_seq_len, 8)  # [B, H_kv, capacity, D]
    assert dec._kv.data_ptr() == ptr
    dec.generate(["Tom"], max_new_tokens=5, temperature=0.0, stop_ids=[])
    assert len(calls) == 2 and calls[1][0] == 1  # a new batch size: bound again, once


def test_gqa_export_refusals(stories_gqa):
    with pytest.raises(UsageError, match="io_binding=True only"):
        OnnxDecoder(stories_gqa, io_binding=False)
    dec = OnnxDecoder(stories_gqa, max_batch=2)
    dec.reset(2)
    mask = torch.ones(2, 3, dtype=torch.long)
    dec.step(torch.tensor([[1, 5, 6], [1, 7, 8]]), torch.arange(3).expand(2, 3), mask)
    with pytest.raises(UsageError, match="needs batch 1"):
        dec.step(torch.tensor([[1, 5], [1, 7]]), torch.tensor([[3, 4], [3, 4]]), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(UsageError, match="graph must be one of"):
        export_decoder(_random_decoder("llama", 16), "/nonexistent", graph="fused")


def test_unsupported_model_falls_back_to_the_plain_graph_with_a_note(tmp_path, capsys):
    model = _random_decoder("llama", 12)  # ORT 1.2x's CPU kernel: head sizes in multiples of 8
    res = export_decoder(model, tmp_path / "out", graph="gqa")
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "instead of graph='gqa'" in line]
    assert len(notes) == 1 and "rejects head size 12" in notes[0], err
    assert res.metadata["graph"] == "plain" and "head size 12" in res.metadata["graph_note"]
    assert "shared_buffer" not in res.metadata["kv_cache"]
    assert _kv_concats(res.onnx_path) == 2 * model.config.n_layers  # the plain graph, validated as always
    assert max(res.validation.max_abs_diff.values()) <= 1e-4


@pytest.mark.parametrize("version", ["1.21.1", "1.9.0"])  # 1.9 < 1.22 as numbers, not as strings
def test_an_onnx_runtime_without_attention_bias_gets_the_plain_graph(version, tmp_path, capsys, monkeypatch):
    """ONNX Runtime before 1.22 refuses GroupQueryAttention's attention_bias input (``has input size 11 not in
    range [min=7, max=9]``, seen with 1.20.1 and 1.21.1): the exporter says so and writes the plain graph rather
    than failing. The version string is replaced here (make test-floor runs the real floor, 1.22.0)."""
    import onnxruntime

    model = _random_decoder("llama", 16)  # a head size every tested release takes
    monkeypatch.setattr(onnxruntime, "__version__", version)
    res = export_decoder(model, tmp_path / "out", graph="gqa")
    notes = [line for line in capsys.readouterr().err.splitlines() if "instead of graph='gqa'" in line]
    assert len(notes) == 1 and f"ONNX Runtime {version} is older than 1.22" in notes[0], notes
    assert res.metadata["graph"] == "plain" and "attention_bias" in res.metadata["graph_note"]
    assert _kv_concats(res.onnx_path) == 2 * model.config.n_layers
    monkeypatch.undo()
    assert gqa_unsupported(model, all_logits=False) is None  # the installed release (>= 1.22) takes it


@pytest.mark.parametrize(("version", "want", "expected"), [
    ("1.22.0", (1, 22), True), ("1.21.9", (1, 22), False), ("1.100.0", (1, 22), True), ("2.0", (1, 26), True),
    ("1.26.0.dev20260101", (1, 26), True), ("1.25.1+cu124", (1, 26), False), ("", (1, 22), False),
    ("1", (1, 22), False), ("x.y", (1, 0), False)])
def test_ort_version_at_least(version, want, expected):
    assert ort_version_at_least(version, want) is expected


def test_bidirectional_and_all_logits_keep_the_plain_graph():
    assert gqa_unsupported(_random_decoder("llama", 16), all_logits=False) is None
    assert "bidirectional" in gqa_unsupported(_random_decoder("llama", 16, causal=False), all_logits=False)
    assert "all_logits" in gqa_unsupported(_random_decoder("gpt2", 16), all_logits=True)


def test_probe_finds_the_cpu_kernel_head_sizes():
    assert _probe_gqa(4, 2, 16, False) is None
    assert _probe_gqa(4, 4, 64, True) is None
    assert "head size 12" in _probe_gqa(4, 2, 12, False)
    # rotary inside the op (ORT 1.31's CPU kernel: head sizes that are multiples of 16), both layouts and input forms
    for interleaved in (0, 1):
        assert _probe_rotary(6, 2, 16, False, interleaved, True) and _probe_rotary(9, 3, 64, True, interleaved, False)
        assert not _probe_rotary(8, 8, 8, False, interleaved, True) and not _probe_rotary(6, 2, 24, False, interleaved,
                                                                                          True)


def test_cli_export_graph_flag(stories_dir, tmp_path, capsys):
    from decodekit.cli import main

    assert main(["export", str(stories_dir / "stories260K.bin"), "-o", str(tmp_path / "e"), "--graph", "gqa",
                 "-q"]) == 0
    assert json.loads((tmp_path / "e" / "decodekit.json").read_text())["graph"] == "gqa"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(stories_dir / "stories260K.bin"), "-o", str(tmp_path / "f"), "--graph", "fast"])
    assert exc.value.code == 2 and "--graph" in capsys.readouterr().err


@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1"])
def test_int4_gguf_gqa_graph_keeps_q_k_v_as_matmul_nbits(tiny_gguf, tmp_path, weight_type):
    path, _ = tiny_gguf(weight_type=weight_type, seed=5)
    res = export_decoder(path, tmp_path / "gqa4", graph="gqa", weights="int4", progress=False)
    meta = res.metadata
    assert meta["graph"] == "gqa" and meta["weights"]["matrices"] == 14 and res.validation.ok
    nodes = onnx.load(str(res.onnx_path)).graph.node
    ops = [n.op_type for n in nodes]
    # per layer: q/k/v packed in one MatMulNBits (their blocks side by side), o, gate|up packed, down
    assert ops.count("MatMulNBits") == 2 * 4 and ops.count("GroupQueryAttention") == 2
    # the float classifier (the tied Q8_0 embedding), and the small MatMuls of the Q4_1 block minimums
    # ((x @ S) @ M, see decodekit/export/int4.py): x @ S once per input (4 per layer), @ M once per MatMulNBits;
    # no projection is left in float
    sums = [n.name for n in nodes if n.op_type == "MatMul" and n.name.endswith(".BlockSum")]
    mins = [n.name for n in nodes if n.op_type == "MatMul" and n.name.endswith(".Mins")]
    want = (2 * 4, 2 * 4) if weight_type == "Q4_1" else (0, 0)  # Q4_0: no minimums, the operator's zero point 8
    assert (len(sums), len(mins)) == want and ops.count("MatMul") == 1 + len(sums) + len(mins)
    onnx_dec, eager = OnnxDecoder(res.out_dir, max_batch=2), load_backend(path, "eager", max_batch=2)
    kw = dict(max_new_tokens=12, temperature=0, stop_ids=())
    assert onnx_dec.generate(["the", "he the"], **kw).tokens == eager.generate(["the", "he the"], **kw).tokens


def test_int4_matrices_pack_only_when_a_group_shares_one_gguf_type(tiny_gguf, tmp_path, monkeypatch):
    """q/k/v (and gate/up) become one MatMulNBits only when all of them are 4-bit blocks of one type; a group with
    a float matrix or two types keeps every matrix of the model apart (the graph then has no packed MatMul)."""
    from decodekit.export.int4 import int4_blocks_for, packed_groups
    from decodekit.models import load_model

    path, _ = tiny_gguf(weight_type="Q4_1", seed=5)
    decoder = load_model(path)
    blocks = int4_blocks_for(path, "gguf", decoder)
    groups = packed_groups(decoder, blocks)
    assert groups is not None and len(groups) == 2 * decoder.config.n_layers
    assert groups[0] == ("layers.0.attn.wq.weight", "layers.0.attn.wk.weight", "layers.0.attn.wv.weight")
    mixed = dict(blocks)
    mixed["layers.1.mlp.w3.weight"] = dataclasses.replace(blocks["layers.1.mlp.w3.weight"], gguf_type="Q4_0")
    assert packed_groups(decoder, mixed) is None
    assert packed_groups(decoder, {k: v for k, v in blocks.items() if k != "layers.0.attn.wk.weight"}) is None
    # such a model: one MatMulNBits per matrix, and the same tokens as eager
    import decodekit.export.int4 as int4

    monkeypatch.setattr(int4, "packed_groups", lambda *a: None)
    res = export_decoder(path, tmp_path / "apart", graph="gqa", weights="int4", progress=False)
    ops = [n.op_type for n in onnx.load(str(res.onnx_path)).graph.node]
    assert res.validation.ok and ops.count("MatMulNBits") == 14 and ops.count("Split") == 0  # nothing packed
    names = [n.name for n in onnx.load(str(res.onnx_path)).graph.node]
    # Q4_1's block sums once per input (q/k/v share one, gate/up another: 4 per layer), the minimums per matrix
    assert (sum(n.endswith(".BlockSum") for n in names), sum(n.endswith(".Mins") for n in names)) == (2 * 4, 14)
    kw = dict(max_new_tokens=12, temperature=0, stop_ids=())
    want = load_backend(path, "eager", max_batch=1).generate(["he the"], **kw).tokens
    assert OnnxDecoder(res.out_dir, max_batch=1).generate(["he the"], **kw).tokens == want


# ------------------------------------------------------------------------------------------- SmolLM2-135M (real)

CHAT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def smollm_export_gqa(request, smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M exported with graph='gqa' once per test run (tests/conftest.py's shared_export; found through
    pytest's plugin manager, since ``import conftest`` may name another folder's conftest)."""
    root = Path(__file__).resolve().parents[1] / "conftest.py"
    plugin = next(p for p in request.config.pluginmanager.get_plugins()
                  if getattr(p, "__file__", None) and Path(p.__file__).resolve() == root)
    return plugin.shared_export(tmp_path_factory, "smollm2-gqa", smollm_gguf, graph="gqa")


def test_smollm_gqa_greedy_equals_the_plain_graph(smollm_export_gqa, smollm_export_fp32):
    gqa = smollm_export_gqa
    meta = json.loads((gqa / "decodekit.json").read_text())
    assert meta["graph"] == "gqa" and meta["weights"]["format"] == "fp32"
    assert max(meta["validation"]["max_abs_diff"].values()) <= 1e-4
    a, b = OnnxDecoder(gqa, max_batch=2, max_seq_len=128), OnnxDecoder(smollm_export_fp32, max_batch=2, max_seq_len=128)
    rows = [chat_prompt(a.tokenizer, q)[0] for q in CHAT_PROMPTS]
    kw = dict(max_new_tokens=24, temperature=0.0, stop_ids=[])
    assert a.generate(rows, **kw).tokens == b.generate(rows, **kw).tokens


def test_in_attention_rotary_keys_are_eager_keys_turned_by_the_padding(tmp_path):
    """With the rotary inside GroupQueryAttention a left-padded row's cached keys are eager's turned by its padding
    (decodekit.json: key_positions = cache_slots). The validation turns eager's keys so: compared as positions, the
    padded row's keys disagree, the unpadded row's and all values agree."""
    from decodekit.export.validate import compare_with_eager

    model = _random_decoder("llama", 16, rope_layout="halves")
    res = export_decoder(model, tmp_path / "gqa", graph="gqa", progress=False)
    meta = res.metadata
    ok = compare_with_eager(model, res.onnx_path, meta, atol=1e-4, lengths=(7, 4))
    assert ok.ok, ok.max_abs_diff
    if not _probe_rotary(6, 2, 16, False, 0, True):  # an ORT that refuses: RotaryEmbedding nodes, eager's keys
        assert meta["kv_cache"]["key_positions"] == "positions"
        return
    assert meta["kv_cache"]["key_positions"] == "cache_slots"
    as_positions = dict(meta, kv_cache=dict(meta["kv_cache"], key_positions="positions"))
    bad = compare_with_eager(model, res.onnx_path, as_positions, atol=1e-4, lengths=(7, 4))
    assert set(bad.failed) == {f"present.{i}.key" for i in range(3)}, bad.failed
    same = compare_with_eager(model, res.onnx_path, as_positions, atol=1e-4, lengths=(5, 5))  # no padding
    assert same.ok, same.max_abs_diff
    with pytest.raises(ValidationError, match="key_positions"):
        compare_with_eager(model, res.onnx_path, dict(meta, kv_cache=dict(meta["kv_cache"], key_positions="slots")),
                           atol=1e-4)
