"""Chat: decodekit.chat / decodekit generate --chat on SmolLM2-135M-Instruct (GGUF, exported once per test run)."""

from __future__ import annotations

import pytest

import decodekit
from decodekit.cli import main
from decodekit.errors import UsageError
from decodekit.runtime import OnnxDecoder, chat_prompt

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm(smollm_export_fp32) -> OnnxDecoder:
    return OnnxDecoder(smollm_export_fp32, "cpu", max_batch=1, max_seq_len=512)


def test_chat_answers_streams_and_stops_at_end_of_turn(smollm):
    streamed = []
    res = decodekit.chat(smollm, QUESTION, temperature=0, max_new_tokens=48,
                         stream=lambda row, tok: streamed.append((row, tok)))
    assert "Paris" in res.text[0]
    assert res.finish_reasons == ["stop"] and res.tokens[0][-1] == 2  # <|im_end|> ended the turn
    assert streamed == [(0, t) for t in res.tokens[0]]
    assert "<|im_end|>" not in res.text[0] and "assistant" not in res.text[0]


def test_chat_prompt_equals_transformers_template(smollm, hf_tokenizer):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And 2+2?"}]
    ids, stops = chat_prompt(smollm.tokenizer, conv, system="You are terse.")
    want = hf_tokenizer.apply_chat_template([{"role": "system", "content": "You are terse."}, *conv], tokenize=True,
                                            add_generation_prompt=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert stops == [2]
    ids1, _ = chat_prompt(smollm.tokenizer, QUESTION)
    assert smollm.tokenizer.decode(ids1).startswith("system\nYou are a helpful AI assistant named SmolLM")


def test_chat_eager_backend_on_the_gguf_file_equals_onnx(smollm, smollm_gguf):
    a = decodekit.chat(smollm, QUESTION, temperature=0, max_new_tokens=24)
    b = decodekit.chat(smollm_gguf, QUESTION, temperature=0, max_new_tokens=24, backend="eager")
    assert a.tokens == b.tokens and a.text == b.text


@pytest.mark.parametrize(
    ("messages", "error"),
    [(5, TypeError), ([], UsageError), ([{"role": "user"}], TypeError), ([{"role": 1, "content": "x"}], TypeError),
     (["hi"], TypeError)],
)
def test_chat_bad_messages(smollm, messages, error):
    with pytest.raises(error, match="messages"):
        decodekit.chat(smollm, messages)


def test_chat_needs_a_chat_template(stories_export_dir):
    with pytest.raises(UsageError, match="no chat template"):
        decodekit.chat(stories_export_dir, "hi", max_new_tokens=2)


def test_cli_generate_chat(smollm_export_fp32, capsys):
    rc = main(["generate", str(smollm_export_fp32), "--chat", QUESTION, "--temperature", "0",
               "--max-new-tokens", "48"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out and out.endswith("\n") and "<|im" not in out and "system" not in out
    assert "(stop)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chat", "hi", "--prompt", "x"], "either --prompt or --chat"),
        (["--system", "be brief"], "--system goes with --chat"),
    ],
)
def test_cli_chat_usage_errors(smollm_export_fp32, capsys, args, message):
    assert main(["generate", str(smollm_export_fp32), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_chat_without_template_is_one_error_line(stories_export_dir, capsys):
    assert main(["generate", str(stories_export_dir), "--chat", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat template" in err[0], err
