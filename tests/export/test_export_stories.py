"""The exported stories260K graph (shared session fixture ``stories_export_dir``) run directly in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from decodekit.models import DecoderConfig, Llama2cTokenizer, load_model, load_tokenizer

L, H_KV, D, V = 5, 4, 8, 512


@pytest.fixture(scope="module")
def meta(stories_export_dir):
    return json.loads((stories_export_dir / "decodekit.json").read_text())


@pytest.fixture(scope="module")
def session(stories_export_dir):
    return ort.InferenceSession(str(stories_export_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def eager(stories_dir):
    return load_model(stories_dir / "stories260K.bin")


def test_files_and_metadata(stories_export_dir, meta, eager):
    assert sorted(p.name for p in stories_export_dir.iterdir()) == ["decodekit.json", "model.onnx", "tok512.bin"]
    assert meta["format_version"] == 1 and meta["model_file"] == "model.onnx" and meta["external_data"] is None
    assert meta["architecture"] == "llama" and meta["dtype"] == "float32" and meta["opset"] >= 18
    past = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert meta["inputs"] == ["input_ids", "position_ids", "attention_mask", *past]
    assert meta["outputs"] == ["logits", *present]
    assert meta["kv_cache"]["shape"] == ["batch", H_KV, "past_seq", D]
    assert meta["kv_cache"]["past_names"][2] == ["past_key_values.2.key", "past_key_values.2.value"]
    assert meta["logits"] == {"name": "logits", "all_positions": False, "vocab_size": V}
    assert (meta["max_seq_len"], meta["bos_id"], meta["eos_id"], meta["stop_ids"]) == (512, 1, 2, [1])
    assert meta["tokenizer"]["file"] == "tok512.bin" and meta["tokenizer"]["type"] == "llama2c"
    assert DecoderConfig.from_dict(meta["config"]) == eager.config
    val = meta["validation"]
    assert set(val["max_abs_diff"]) == set(meta["outputs"])
    assert all(0 <= v <= 1e-4 for v in val["max_abs_diff"].values())
    assert val["steps"] == 5 and len(set(val["prompt_lengths"])) == 2
    assert set(meta["timings_s"]) >= {"loading stories260K.bin", "exporting to ONNX (torch.onnx.export, dynamo)"}


def test_graph_signature_is_dynamic(session, meta):
    ins = {i.name: (i.shape, i.type) for i in session.get_inputs()}
    outs = {o.name: (o.shape, o.type) for o in session.get_outputs()}
    assert list(ins) == meta["inputs"] and list(outs) == meta["outputs"]
    assert ins["input_ids"] == (["batch", "seq"], "tensor(int64)")
    assert ins["position_ids"] == (["batch", "seq"], "tensor(int64)")
    assert ins["attention_mask"] == (["batch", "total_seq"], "tensor(int64)")
    assert ins["past_key_values.4.value"] == (["batch", H_KV, "past_seq", D], "tensor(float)")
    assert outs["logits"] == (["batch", V], "tensor(float)")
    assert outs["present.0.key"] == (["batch", H_KV, "total_seq", D], "tensor(float)")
    for name, (shape, _) in {**ins, **outs}.items():
        assert all(isinstance(d, str) for d in shape[:1]), f"{name}: batch must be symbolic, got {shape}"


def _run_ort(session, ids, pos, mask, past):
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = k.numpy()
        feeds[f"past_key_values.{i}.value"] = v.numpy()
    return session.run(None, feeds)


@pytest.mark.parametrize(
    "batch, past_len, new_len",
    [(1, 0, 1), (1, 0, 9), (2, 0, 6), (3, 5, 1), (3, 17, 4), (1, 40, 1)],
)
@torch.no_grad()
def test_ort_matches_eager(session, eager, batch, past_len, new_len):
    """Left-padded rows (row r has r pad tokens in the cached part), real caches from an eager prefill."""
    gen = torch.Generator().manual_seed(batch * 100 + past_len)
    total = past_len + new_len
    ids_all = torch.randint(3, V, (batch, total), generator=gen)
    mask = torch.ones(batch, total, dtype=torch.long)
    for r in range(batch):
        mask[r, : min(r, max(past_len - 1, 0))] = 0  # pads only inside the cached prefix, leaving >= 1 real token
    pos_all = (mask.cumsum(-1) - 1).clamp(min=0)
    if past_len:
        _, past = eager(ids_all[:, :past_len], pos_all[:, :past_len], mask[:, :past_len])
    else:
        past = eager.empty_cache(batch)
    ids, pos = ids_all[:, past_len:], pos_all[:, past_len:]
    logits, presents = eager(ids, pos, mask, past)
    outs = _run_ort(session, ids, pos, mask, past)
    assert outs[0].shape == (batch, V)
    np.testing.assert_allclose(outs[0], logits.numpy(), atol=1e-4, rtol=0)
    for o, e in zip(outs[1:], [t for kv in presents for t in kv]):
        assert o.shape == (batch, H_KV, total, D)
        np.testing.assert_allclose(o, e.numpy(), atol=1e-4, rtol=0)


def test_ort_greedy_story(session, stories_export_dir):
    """Greedy decoding driven only by ONNX Runtime + the copied tokenizer tells run.c's story."""
    tok = load_tokenizer(stories_export_dir)
    assert isinstance(tok, Llama2cTokenizer)
    tokens = [1]
    past = [(torch.zeros(1, H_KV, 0, D), torch.zeros(1, H_KV, 0, D)) for _ in range(L)]
    for step in range(24):
        outs = _run_ort(session, torch.tensor([[tokens[-1]]]), torch.tensor([[step]]),
                        torch.ones(1, step + 1, dtype=torch.long), past)
        tokens.append(int(outs[0].argmax()))
        past = [(torch.from_numpy(outs[1 + 2 * i]), torch.from_numpy(outs[2 + 2 * i])) for i in range(L)]
    assert tok.decode(tokens).startswith("Once upon a time, there was a little girl named Lily.")


def test_norms_fuse_in_onnx_runtime(stories_export_dir, tmp_path, meta):
    """The RMSNorm is exported as x / sqrt(mean(x^2) + eps) * w, the pattern ONNX Runtime fuses into one
    SimplifiedLayerNormalization node (an rsqrt form stays seven nodes per norm: a quarter of the step's nodes)."""
    import onnx

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(stories_export_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    n_norms = 2 * meta["config"]["n_layers"] + 1  # attention and FFN norm per layer, the final norm
    assert ops.count("SimplifiedLayerNormalization") == n_norms
    assert "Reciprocal" not in ops and "ReduceMean" not in ops
