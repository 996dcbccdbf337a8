"""Exporting GGUF files: fp32 (dequantized) and int4 (Q4_0/Q4_1 blocks as com.microsoft::MatMulNBits).

Tiny GGUF files (written with the gguf package) check the graph surgery and the numbers against transformers'
Llama; SmolLM2-135M (exported once per test run, shared) checks greedy parity with transformers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from decodekit.errors import UsageError
from decodekit.export import export_decoder
from decodekit.export.int4 import INT4_ATOL
from decodekit.runtime import OnnxDecoder, chat_prompt, load_backend

CHAT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three primary colors."]
N_TOKENS = 48


def _ort_logits(onnx_path, ids: np.ndarray, n_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:  # noqa: ANN001
    """All-in-one prefill through ONNX Runtime with plain session.run (independent of the runtime package)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    b, s = ids.shape
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy(),
             "attention_mask": np.ones((b, s), np.int64)}
    for i in range(n_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((b, kv_heads, 0, head_dim), np.float32)
    return sess.run(["logits"], feeds)[0]


# ---------------------------------------------------------------------------------------------------- tiny files


@pytest.fixture
def hf_reference(tiny_gguf_config):  # noqa: ANN201
    """(expected HF-layout weights) -> transformers LlamaForCausalLM for the tiny GGUF config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    C = tiny_gguf_config  # noqa: N806 - the tiny file's sizes

    def build(expected: dict) -> torch.nn.Module:
        vocab = expected["tok_embeddings.weight"].shape[0]
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=C["dim"], intermediate_size=C["hidden"],
                          num_hidden_layers=C["n_layers"], num_attention_heads=C["n_heads"],
                          num_key_value_heads=C["n_kv_heads"], max_position_embeddings=C["ctx"],
                          rms_norm_eps=C["eps"], rope_theta=C["theta"], tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
        rename = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
                  "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
                  "mlp.w2": "mlp.down_proj"}
        emb = expected["tok_embeddings.weight"]
        sd = {"model.embed_tokens.weight": emb, "model.norm.weight": expected["norm.weight"], "lm_head.weight": emb}
        for k, v in expected.items():
            if k.startswith("layers."):
                _, i, rest = k.split(".", 2)
                sd[f"model.layers.{i}.{rename[rest.rsplit('.', 1)[0]]}.weight"] = v
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
        return model

    return build


@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1"])
def test_tiny_int4_export_uses_matmul_nbits_and_matches_transformers(tiny_gguf, tmp_path, hf_reference, weight_type):
    path, expected = tiny_gguf(weight_type=weight_type, seed=5)
    res = export_decoder(path, tmp_path / "int4", weights="int4", progress=False)
    assert res.validation.ok and res.validation.atol == INT4_ATOL
    meta = json.loads((tmp_path / "int4" / "decodekit.json").read_text())
    w = meta["weights"]
    assert (w["format"], w["op"], w["bits"], w["block_size"], w["matrices"]) == (
        "int4", "com.microsoft::MatMulNBits", 4, 32, 14)
    assert w["gguf_types"] == {weight_type: 14}
    assert w["float_matrices"] == ["lm_head.weight", "tok_embeddings.weight"]

    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and all(n.domain == "com.microsoft" for n in nbits)
    assert all(len(n.input) == (3 if weight_type == "Q4_0" else 4) for n in nbits)  # Q4_0: the default zero point 8
    if weight_type == "Q4_1":  # uint8 zero points (ONNX Runtime's fast kernel; float ones fall back to a slow path)
        inits = {i.name: i for i in model.graph.initializer}
        assert all(inits[n.input[3]].data_type == onnx.TensorProto.UINT8 for n in nbits)
        assert sum(n.op_type == "Add" and n.name.endswith(".Add") for n in model.graph.node) == 14  # + minimums
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (4, 32, 64, 64)  # layer 0's wq
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    dims = {tuple(i.dims) for i in floats}
    assert (100, 64) in dims  # the Q8_0 embedding (also the tied classifier) stays float
    assert not dims & {(64, 64), (64, 32), (64, 128), (128, 64)}  # no projection matrix is left in float

    ids = np.random.default_rng(0).integers(0, 100, (2, 9))
    ours = _ort_logits(tmp_path / "int4" / "model.onnx", ids, 2, 2, 16)
    with torch.no_grad():
        want = hf_reference(expected)(torch.from_numpy(ids)).logits[:, -1].numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)


def test_tiny_fp32_export_carries_the_gguf_tokenizer(tiny_gguf, tmp_path):
    path, _ = tiny_gguf(weight_type="Q8_0")
    export_decoder(path, tmp_path / "fp32", progress=False)
    meta = json.loads((tmp_path / "fp32" / "decodekit.json").read_text())
    assert meta["source"]["format"] == "gguf" and meta["weights"] == {"format": "fp32"}
    tok = meta["tokenizer"]
    assert (tok["file"], tok["type"], tok["bos_id"], tok["eos_id"], tok["add_bos"]) == (
        "tokenizer.json", "hf", 1, 2, False)
    assert "<|im_start|>" in tok["chat_template"]
    onnx_dec = OnnxDecoder(tmp_path / "fp32", "cpu", max_batch=2)
    eager = load_backend(path, "eager", max_batch=2)
    for dec in (onnx_dec, eager):
        assert dec.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("assistant\n")
    a = onnx_dec.generate(["the", "he the"], max_new_tokens=12, temperature=0, stop_ids=())
    b = eager.generate(["the", "he the"], max_new_tokens=12, temperature=0, stop_ids=())
    assert a.tokens == b.tokens


def test_int4_refusals(tiny_gguf, stories_dir, tmp_path):
    path, _ = tiny_gguf(weight_type="Q8_0")
    with pytest.raises(UsageError, match="no Q4_0/Q4_1"):
        export_decoder(path, tmp_path / "a", weights="int4", progress=False)
    with pytest.raises(UsageError, match="must be a GGUF file"):
        export_decoder(stories_dir / "stories260K.bin", tmp_path / "b", weights="int4", progress=False)
    with pytest.raises(UsageError, match="needs dtype='fp32'"):
        export_decoder(path, tmp_path / "c", weights="int4", dtype="fp16", progress=False)
    with pytest.raises(UsageError, match="weights must be one of"):
        export_decoder(path, tmp_path / "d", weights="int8", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_weights_int4_on_a_llama2c_checkpoint_is_one_error_line(stories_dir, tmp_path, capsys):
    from decodekit.cli import main

    assert main(["export", str(stories_dir / "stories260K.bin"), "-o", str(tmp_path / "o"), "--weights", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GGUF" in err[0], err


# ------------------------------------------------------------------------------------------- SmolLM2-135M (real)


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm, hf_tokenizer):  # noqa: ANN201
    """transformers' greedy continuations of the chat prompts (48 tokens, past the end of the turn: its own forward
    with its KV cache, argmax each step; ``generate``, which stops at EOS, must agree up to there) and its
    last-position logits of each prompt."""
    out = []
    for q in CHAT_PROMPTS:
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                               add_generation_prompt=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        tokens, past, cur = [], None, ids
        with torch.no_grad():
            for _ in range(N_TOKENS):
                step = hf_smollm(input_ids=cur, past_key_values=past, use_cache=True)  # noqa: B023
                if past is None:
                    logits = step.logits[0, -1].numpy()
                past = step.past_key_values
                cur = step.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(cur))
            gen = hf_smollm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_TOKENS,
                                     do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert tokens[: len(gen)] == gen
        out.append((ids[0].tolist(), tokens, logits))
    return out


def test_smollm_fp32_export_greedy_equals_transformers(smollm_export_fp32, hf_greedy):
    dec = OnnxDecoder(smollm_export_fp32, "cpu", max_batch=1, max_seq_len=256)
    meta = json.loads((smollm_export_fp32 / "decodekit.json").read_text())
    assert meta["validation"]["max_abs_diff"]["logits"] <= 1e-4
    for q, (hf_ids, hf_tokens, hf_logits) in zip(CHAT_PROMPTS, hf_greedy):
        ids, _ = chat_prompt(dec.tokenizer, q)
        assert ids == hf_ids
        res = dec.generate([ids], max_new_tokens=N_TOKENS, temperature=0, stop_ids=())
        assert res.tokens[0] == hf_tokens, (q, dec.tokenizer.decode(res.tokens[0]), dec.tokenizer.decode(hf_tokens))
        logits = _ort_logits(smollm_export_fp32 / "model.onnx", np.array([ids]), 30, 3, 64)[0]
        assert float(np.abs(logits - hf_logits).max()) <= 1e-3
    assert "Paris" in dec.tokenizer.decode(hf_greedy[0][1])


def test_smollm_int4_export(smollm_export_int4, smollm_export_fp32, hf_greedy, capsys):
    meta = json.loads((smollm_export_int4 / "decodekit.json").read_text())
    w = meta["weights"]
    assert (w["format"], w["matrices"], w["gguf_types"]) == ("int4", 210, {"Q4_1": 210})
    assert meta["validation"]["atol"] == INT4_ATOL and meta["validation"]["rtol"] == 0
    assert max(meta["validation"]["max_abs_diff"].values()) <= INT4_ATOL
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(smollm_export_int4) < 0.45 * size(smollm_export_fp32)
    dec = OnnxDecoder(smollm_export_int4, "cpu", max_batch=1, max_seq_len=256)
    lines = []
    for q, (_, hf_tokens, _) in zip(CHAT_PROMPTS, hf_greedy):
        ids, _ = chat_prompt(dec.tokenizer, q)
        res = dec.generate([ids], max_new_tokens=N_TOKENS, temperature=0)
        agree = 0
        for a, b in zip(res.tokens[0], hf_tokens):
            if a != b:
                break
            agree += 1
        lines.append(f"int4 greedy: {q!r} -> {res.text[0]!r} (first {agree} tokens equal transformers' fp32)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert "Paris" in lines[0]
