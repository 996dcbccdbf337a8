"""Hugging Face directories on disk (random tiny GPT-2 / Llama via save_pretrained): loading, eager vs
transformers, export + ONNX Runtime vs eager, tokenizer.json."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from decodekit.errors import UsageError
from decodekit.export import export_decoder
from decodekit.models import HFTokenizer, load_model, load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

GPT2_VOCAB = 300  # >= 256 byte-level symbols, so a real ByteLevel BPE tokenizer.json fits
LLAMA_VOCAB = 97  # prime


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=GPT2_VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.2, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(**kw):
    base = dict(vocab_size=LLAMA_VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2)
    base.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()


def _byte_level_tokenizer(path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = ["Once upon a time there was a little robot.", "It liked the sun, the sea and the stars."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"gpt2": (hf_model, dir), "llama": (hf_model, dir)} saved with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, model in (("gpt2", _gpt2()), ("llama", _llama())):
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    _byte_level_tokenizer(root / "gpt2" / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def exported(hf_dirs, tmp_path_factory):
    """Each HF directory exported once (fp32, validated)."""
    root = tmp_path_factory.mktemp("hf_export")
    return {name: export_decoder(d, root / name, progress=False) for name, (_, d) in hf_dirs.items()}


def _left_padded(vocab, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), s), generator=gen)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, s - n :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_eager_matches_transformers(hf_dirs, name):
    hf, d = hf_dirs[name]
    model = load_model(d)
    assert model.config.arch == name
    ids, mask, pos = _left_padded(model.config.vocab_size, [9, 5, 1])
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits, presents = model(ids, pos, mask, all_logits=True)
    real = mask.bool()
    assert ref.abs().max() > 1.0, "random weights too small to make the comparison meaningful"
    torch.testing.assert_close(logits[real], ref[real], atol=2e-5, rtol=1e-5)
    # two decode steps with the cache equal transformers' full forward on the longer sequence
    last = logits[:, -1]
    for _ in range(2):
        nxt = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last, presents = model(nxt, pos[:, -1:], mask, presents)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        torch.testing.assert_close(last, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
                                     dict(num_key_value_heads=6, head_dim=16)])
@torch.no_grad()
def test_llama_variants(tmp_path, variant):
    torch.manual_seed(1)
    hf = _llama(**variant)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    cfg = model.config
    assert cfg.rope_layout == "halves" and cfg.rope_theta == 500.0
    assert cfg.tie_embeddings == variant.get("tie_word_embeddings", False)
    ids, mask, pos = _left_padded(LLAMA_VOCAB, [6, 4], seed=3)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    logits, _ = model(ids, pos, mask)
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)


def _feeds(ids, pos, mask, past):
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    return feeds


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("batch, past_len, new_len", [(1, 0, 1), (2, 0, 7), (3, 6, 1), (2, 11, 3)])
@torch.no_grad()
def test_exported_matches_eager(hf_dirs, exported, name, batch, past_len, new_len):
    result = exported[name]
    assert result.validation.ok and result.metadata["architecture"] == name
    model = load_model(hf_dirs[name][1])
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    lengths = [past_len + new_len - r for r in range(batch)]  # left padding of 0, 1, 2 tokens
    ids, mask, pos = _left_padded(model.config.vocab_size, lengths, seed=batch + past_len)
    if past_len:
        _, past = model(ids[:, :past_len], pos[:, :past_len], mask[:, :past_len])
    else:
        past = model.empty_cache(batch)
    logits, presents = model(ids[:, past_len:], pos[:, past_len:], mask, past)
    outs = sess.run(None, _feeds(ids[:, past_len:], pos[:, past_len:], mask, past))
    np.testing.assert_allclose(outs[0], logits.numpy(), atol=1e-4, rtol=0)
    for o, e in zip(outs[1:], [t for kv in presents for t in kv]):
        np.testing.assert_allclose(o, e.numpy(), atol=1e-4, rtol=0)


def test_gpt2_export_copies_tokenizer_json(hf_dirs, exported):
    out = exported["gpt2"].out_dir
    meta = json.loads((out / "decodekit.json").read_text())
    assert meta["tokenizer"] == {"file": "tokenizer.json", "type": "hf", "bos_id": 0, "eos_id": 0}
    assert meta["config"]["max_seq_len"] == 64 and meta["stop_ids"] == [0]
    assert exported["llama"].metadata["tokenizer"] is None  # no tokenizer in that directory
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer)
    ref = tokenizers.Tokenizer.from_file(str(hf_dirs["gpt2"][1] / "tokenizer.json"))
    text = "Once upon a time the robot liked the stars."
    assert tok.encode(text, bos=False) == ref.encode(text).ids
    assert tok.encode(text) == [0, *ref.encode(text).ids]
    assert tok.decode(tok.encode(text)) == text


@torch.no_grad()
def test_fp16_and_all_logits_export(hf_dirs, tmp_path):
    _, d = hf_dirs["llama"]
    res = export_decoder(d, tmp_path / "fp16", dtype="fp16", all_logits=True, progress=False)
    meta = res.metadata
    assert meta["dtype"] == "float16" and meta["kv_cache"]["dtype"] == "float16"
    assert meta["logits"]["all_positions"] and meta["validation"]["atol"] == 1e-2
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape == ["batch", "seq", LLAMA_VOCAB]
    assert sess.get_inputs()[3].type == "tensor(float16)"
    ids, mask, pos = _left_padded(LLAMA_VOCAB, [5, 3], seed=7)
    past = [(torch.zeros(2, 2, 0, 8, dtype=torch.float16),) * 2 for _ in range(2)]
    outs = sess.run(None, _feeds(ids, pos, mask, past))
    assert outs[0].dtype == np.float16 and outs[0].shape == (2, 5, LLAMA_VOCAB)
    ref, _ = load_model(d)(ids, pos, mask, all_logits=True)  # fp32 eager
    real = mask.bool().numpy()
    scale = float(ref.abs().max())
    assert np.abs(outs[0].astype(np.float32)[real] - ref.numpy()[real]).max() <= 1e-2 * max(1.0, scale)


def test_unsupported_and_broken_directories(hf_dirs, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(UsageError, match="unknown architecture BertForMaskedLM"):
        load_model(bert)
    broken = tmp_path / "broken"
    broken.mkdir()
    src = hf_dirs["gpt2"][1]
    (broken / "config.json").write_bytes((src / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(UsageError, match="cannot read weights"):
        load_model(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no model.safetensors"):
        load_model(broken)
    with pytest.raises(UsageError, match="without config.json"):
        load_model(tmp_path)
