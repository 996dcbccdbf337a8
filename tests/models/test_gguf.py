"""GGUF loading (decodekit.models.gguf): tiny files written with the gguf package, and SmolLM2-135M against
transformers (weights, tokenizer ids on a few hundred strings, chat templates, last-position logits)."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.errors import UsageError
from decodekit.models import load_model, load_tokenizer, model_format
from decodekit.models.gguf import load_gguf, read_gguf_config, read_gguf_state, read_int4_blocks
from decodekit.models.tokenizer import gguf_tokenizer

SMOLLM_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 日本 🤖"}],
]

# ---------------------------------------------------------------------------------------------------- tiny files


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_weights_are_the_dequantized_tensors_in_hf_layout(tiny_gguf, weight_type):
    path, expected = tiny_gguf(weight_type=weight_type, untied_output="F16")
    state = read_gguf_state(path)
    assert set(state) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(state[name].numpy(), want, err_msg=name)  # same dequantizer: exact


def _hf_llama(expected: dict, cfg) -> torch.nn.Module:  # noqa: ANN001
    """transformers' LlamaForCausalLM holding the expected (HF-layout) weights: the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    model = LlamaForCausalLM(hc).eval()
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
    sd = {}
    for k, v in expected.items():
        if k == "tok_embeddings.weight":
            sd["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            sd["model.norm.weight"] = v
        elif k == "lm_head.weight":
            sd["lm_head.weight"] = v
        else:
            _, i, rest = k.split(".", 2)
            module = rest.rsplit(".", 1)[0]
            sd[f"model.layers.{i}.{names[module]}.weight"] = v
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model


@pytest.mark.parametrize("untied", [None, "Q8_0"])
@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1"])
def test_tiny_model_matches_transformers_llama(tiny_gguf, weight_type, untied):
    """The q/k rows come back in HF's order and the rotary layout fits: logits equal HF Llama's on the weights."""
    path, expected = tiny_gguf(weight_type=weight_type, untied_output=untied, seed=3)
    model = load_model(path)
    cfg = model.config
    assert (cfg.arch, cfg.rope_layout, cfg.tie_embeddings) == ("llama", "halves", untied is None)
    sizes = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size)
    assert sizes == (2, 64, 4, 2, 128, 100)
    ref = _hf_llama(expected, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ours, _ = model(ids, torch.arange(11).expand(2, 11), torch.ones_like(ids), all_logits=True)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1"])
def test_int4_blocks_dequantize_to_the_loaded_weights(tiny_gguf, weight_type):
    """MatMulNBits' (code - zero_point) * scale on the repacked blocks gives the gguf package's dequantized weights."""
    path, expected = tiny_gguf(weight_type=weight_type)
    blocks = read_int4_blocks(path)
    assert len(blocks) == 2 * 7 and "tok_embeddings.weight" not in blocks
    for name, b in blocks.items():
        assert b.gguf_type == weight_type
        assert b.packed.dtype == np.uint8 and b.packed.shape == (b.shape[0], b.shape[1] // 32, 16)
        assert (b.zero_points is None) == (weight_type == "Q4_0")
        np.testing.assert_allclose(b.dequantize(), expected[name], atol=1e-6, rtol=1e-6, err_msg=name)


def test_tiny_tokenizer_and_chat_template(tiny_gguf):
    path, _ = tiny_gguf()
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 100)
    ids = tok.encode("the <|im_end|>", bos=True)  # add_bos is False: no BOS; the control token is matched whole
    assert ids == [tok.token_id("t"), tok.token_id("he"), tok.token_id("\u0120"), 2]
    assert tok.encode("", bos=True) == [1]  # an empty prompt still gets a first token
    assert tok.decode(ids) == "the "
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_format_and_errors(tiny_gguf, tmp_path):
    path, _ = tiny_gguf()
    assert model_format(path) == "gguf"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(UsageError, match="not a GGUF file"):
        model_format(fake)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "qwen2"}, "architecture 'qwen2'.*not supported"),
        ({"weight_type": "Q5_0"}, "tensor type Q5_0.*not supported"),
        ({"pre": "some-new-pre"}, "pre-tokenizer 'some-new-pre'.*not supported"),
        ({"truncate": 20_000}, "truncated or corrupt"),
    ],
)
def test_unsupported_files_are_one_usage_error(tiny_gguf, kwargs, message):
    path, _ = tiny_gguf(**kwargs)
    with pytest.raises(UsageError, match=message) as info:
        load_model(path)
        gguf_tokenizer(path)
    assert "\n" not in str(info.value)


def test_cli_export_refuses_unsupported_architecture(tiny_gguf, tmp_path, capsys):
    from decodekit.cli import main

    path, _ = tiny_gguf(arch="qwen2")
    assert main(["export", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qwen2" in err[0], err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- SmolLM2-135M (real)


def test_smollm_config(smollm_gguf):
    cfg = read_gguf_config(smollm_gguf)
    got = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size)
    assert got == (30, 576, 9, 3, 64, 1536, 49152)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.max_seq_len) == (100000.0, 1e-5, True, 8192)
    assert (cfg.bos_id, cfg.eos_id, cfg.stop_ids) == (1, 2, [2])


def _strings() -> list[str]:
    """A few hundred strings: Unicode, whitespace runs, numbers, code, special tokens, chat-formatted text."""
    fixed = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello world", " Hello", "Hello ", "hello  world   !",
        "What is the capital of France?", "The capital of France is Paris.", "It's, we're, I'll, they've, she'd",
        "2024", "3.14159", "1,234,567.89", "-42", "1e-10", "0x1F", "12:30", "v2.0.1", "phone 555-0123",
        "héllo wörld", "naïve café", "Ünïcödé", "日本語のテキスト", "中文测试", "한국어", "Привет, мир",
        "مرحبا بالعالم",
        "שלום", "ελληνικά", "emoji 🤖🚀 ok", "👨‍👩‍👧‍👦", "🇫🇷", "a\u200bb", "\u00a0nbsp", "tab\tseparated\tvalues",
        "def f(x):\n    return x ** 2\n", "<html><body>hi</body></html>", '{"key": [1, 2, 3]}', "C:\\path\\to",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b", "<|im_start",
        "<repo_name>x<file_sep>", "!!!???...", "----", "____init____", "x" * 200, "ab" * 64, "  leading", "trailing  ",
    ]
    rng = random.Random(1234)
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \n\n\t.,;:!?'\"()[]{}-_+=*/\\@#$%^&~`"
            "éüñøßçàæœ日本語中文한국어Жж€£¥©®™…—–“”‘’🙂🚀🤖")
    words = ["the", "The", " of", "Paris", "France", "capital", "<|im_end|>", "<|im_start|>", "2024", " 42", "  ",
             "\n", "don't", "I'm", "SmolLM", "Hugging Face", "model", "tokenizer", "café", "über"]
    out = list(fixed)
    for _ in range(200):
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    for _ in range(150):
        out.append("".join(rng.choice(words) + rng.choice(["", " ", "\n", ", "]) for _ in range(rng.randint(1, 12))))
    return out


_DIGITS: dict[int, object] = {}


def _digits_reference(hf_tokenizer):  # noqa: ANN001, ANN202
    """:func:`_smollm_pre_tokenizer`, built once per transformers tokenizer."""
    if id(hf_tokenizer) not in _DIGITS:
        _DIGITS[id(hf_tokenizer)] = _smollm_pre_tokenizer(hf_tokenizer)
    return _DIGITS[id(hf_tokenizer)]


def _smollm_pre_tokenizer(hf_tokenizer):  # noqa: ANN001, ANN202
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json and of llama.cpp's
    "smollm" type (every digit split apart, then GPT-2's expression), which transformers' GGUF loader omits."""
    import copy

    from tokenizers import pre_tokenizers

    fixed = copy.deepcopy(hf_tokenizer)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return fixed


def test_smollm_tokenizer_ids_equal_transformers(smollm_gguf, hf_tokenizer):
    """Every string gives transformers' ids (and decodes as transformers decodes), except that whitespace before a
    digit follows the file's pre-tokenizer ("smollm": digits split first, as llama.cpp and SmolLM2's own
    tokenizer.json do); on those strings the ids equal transformers' with that pre-tokenizer."""
    tok = load_tokenizer(smollm_gguf)
    digits = _smollm_pre_tokenizer(hf_tokenizer)
    strings = _strings()
    assert len(strings) >= 400
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 49152)
    bad, compared = [], 0
    for s in strings:
        ours = tok.encode(s, bos=False)
        plain = hf_tokenizer.encode(s, add_special_tokens=False)
        if not re.search(r"\s\d", s):  # no whitespace before a digit: transformers' GGUF tokenizer is the reference
            compared += 1
            if ours != plain:
                bad.append((s, ours, plain))
        if ours != digits.encode(s, add_special_tokens=False):
            bad.append((s, ours, "digits pre-tokenizer"))
        if tok.decode(ours) != hf_tokenizer.decode(ours, skip_special_tokens=True):
            bad.append((s, "decode", tok.decode(ours)))
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]}"
    assert compared >= 300


def test_smollm_digits_after_whitespace_follow_the_file(smollm_gguf, hf_tokenizer):
    """The one known difference from transformers' GGUF tokenizer, pinned: "x  42" is x, '  ', 4, 2 (llama.cpp)."""
    tok = load_tokenizer(smollm_gguf)
    ids = tok.encode("x  42", bos=False)
    assert [tok.token(i) for i in ids] == ["x", "\u0120\u0120", "4", "2"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("x  42", add_special_tokens=False)) == [
        "x", "\u0120", "\u0120", "4", "2"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(SMOLLM_CONVERSATIONS)))
def test_smollm_chat_template_equals_transformers(smollm_gguf, hf_tokenizer, conversation, add_generation_prompt):
    tok = load_tokenizer(smollm_gguf)
    msgs = SMOLLM_CONVERSATIONS[conversation]
    text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == want
    want_ids = hf_tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
    want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
    assert tok.encode(text, bos=False) == list(want_ids)


def test_smollm_eager_logits_equal_transformers(smollm_gguf, hf_smollm, hf_tokenizer):
    model = load_gguf(smollm_gguf)
    for msgs in SMOLLM_CONVERSATIONS:
        text = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([hf_tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            ours, _ = model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))
            theirs = hf_smollm(ids).logits[:, -1]
        assert (ours - theirs).abs().max().item() <= 1e-3


# ------------------------------------------------------------------------------------------------ hypothesis fuzz

_FUZZ_SCALE = int(os.environ.get("DECODEKIT_FUZZ_SCALE", "1"))


@pytest.fixture(scope="module")
def smollm_tok(smollm_gguf):  # noqa: ANN201
    return load_tokenizer(smollm_gguf)
_PIECES = st.one_of(st.characters(codec="utf-8"), st.sampled_from([" ", "  ", "\n", "\t", "0", "7", "<|im_end|>",
                                                                    "<|im_start|>", " the", "Paris"]))
_TEXT = st.lists(_PIECES, max_size=30).map("".join)


@settings(max_examples=200 * _FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXT)
def test_fuzz_smollm_tokenizer_equals_transformers_with_its_pre_tokenizer(smollm_tok, hf_tokenizer, text):
    """Any text: the ids equal transformers' GGUF tokenizer with SmolLM2's digits-first pre-tokenizer, and decode
    back as transformers decodes them."""
    tok = smollm_tok
    ids = tok.encode(text, bos=False)
    assert ids == _digits_reference(hf_tokenizer).encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=60 * _FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=st.lists(_TEXT, min_size=1, max_size=4), system=st.one_of(st.none(), _TEXT),
       add_generation_prompt=st.booleans())
def test_fuzz_smollm_chat_template_equals_transformers(smollm_tok, hf_tokenizer, contents, system,
                                                       add_generation_prompt):
    tok = smollm_tok
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if system is not None:
        msgs = [{"role": "system", "content": system}, *msgs]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    assert ours == hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_tokenizer_json_directory_reads_the_chat_template_beside_it(tiny_gguf, tiny_gguf_config, tmp_path):
    """A Hugging Face tokenizer.json with tokenizer_config.json beside it gets that file's chat template."""
    import json

    TINY_CHAT_TEMPLATE = tiny_gguf_config["chat_template"]  # noqa: N806
    path, _ = tiny_gguf()
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "tokenizer.json").write_text(load_tokenizer(path).to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}))
    tok = load_tokenizer(d)
    assert tok.chat_template == TINY_CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|im_start|>user\nx<|im_end|>\n")
