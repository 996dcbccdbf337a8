"""OnnxDecoder checks an export directory before it allocates anything: decodekit.json is consistent, model.onnx
loads and is the graph decodekit.json describes, and the buffers fit in memory. Each failure is one UsageError line,
which the CLI prints as one stderr line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from decodekit.cli import main
from decodekit.errors import UsageError
from decodekit.runtime import OnnxDecoder


def _config(**changes):  # noqa: ANN003, ANN202
    """An edit of ``config`` that keeps decodekit.json's redundant entries in step (only the graph disagrees)."""

    def change(meta: dict) -> None:
        meta["config"].update(changes)
        if "vocab_size" in changes:
            meta["vocab_size"] = meta["logits"]["vocab_size"] = changes["vocab_size"]
        if "max_seq_len" in changes:
            meta["max_seq_len"] = changes["max_seq_len"]
        kv = meta["kv_cache"]
        for key, attr in (("num_layers", "n_layers"), ("num_kv_heads", "n_kv_heads"), ("head_dim", "head_dim")):
            kv[key] = meta["config"][attr]
        n = meta["config"]["n_layers"]
        meta["inputs"] = meta["inputs"][:3] + [f"past_key_values.{i}.{w}" for i in range(n) for w in ("key", "value")]
        meta["outputs"] = ["logits"] + [f"present.{i}.{w}" for i in range(n) for w in ("key", "value")]

    return change


def _set(**entries):  # noqa: ANN003, ANN202
    return lambda meta: meta.update(entries)


GRAPH_MISMATCHES = [
    pytest.param(_config(vocab_size=1000), r"logits vocabulary 512 != config.vocab_size 1000", id="vocab"),
    pytest.param(_config(n_layers=6), r"does not match .*missing inputs/outputs", id="more-layers"),
    pytest.param(_config(n_layers=4), r"does not match .*unexpected inputs/outputs", id="fewer-layers"),
    pytest.param(_config(n_kv_heads=2), r"4 KV heads, config.n_kv_heads is 2", id="kv-heads"),
    pytest.param(_config(head_dim=4), r"4 head size|has 8 head size, config.head_dim is 4", id="head-dim"),
    pytest.param(_set(dtype="float16"), r"computes in float32, decodekit.json says 'float16'", id="dtype"),
    pytest.param(_set(inputs=["input_ids"]), r"in one but not the other", id="input-list"),
]

METADATA_ERRORS = [
    pytest.param(_set(vocab_size=513), r"inconsistent: vocab_size is 513 but config.vocab_size is 512", id="vocab"),
    pytest.param(_set(max_seq_len=10**12), r"inconsistent: max_seq_len", id="max-seq-len-only-top"),
    pytest.param(_set(max_seq_len=1e12), r"max_seq_len must be an int", id="max-seq-len-float"),
    pytest.param(_config(max_seq_len=1e12), r"config.max_seq_len must be a positive int", id="config-float"),
    pytest.param(_config(max_seq_len=10**12), r"max_seq_len=1000000000000 \(from decodekit.json\) need .* more than",
                 id="max-seq-len-huge"),
    pytest.param(_set(format_version=99), r"format_version", id="format-version"),
    pytest.param(_set(config=[1, 2]), r"malformed", id="config-not-a-dict"),
]


@pytest.mark.parametrize("change, needle", GRAPH_MISMATCHES + METADATA_ERRORS)
def test_export_directory_checked_before_allocating(broken_copy, edit_metadata, no_allocation, change, needle):
    bad = broken_copy(lambda d: edit_metadata(d, change))
    with pytest.raises(UsageError, match=needle) as info:
        OnnxDecoder(bad)
    assert "\n" not in str(info.value)


def _tiny_foreign_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)


MODEL_DAMAGE = [
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]), "cannot be loaded", id="truncated"),
    pytest.param(lambda p: p.write_bytes(b"not an onnx model " * 20), "cannot be loaded", id="garbage"),
    pytest.param(lambda p: p.write_bytes(b""), "cannot be loaded|does not match", id="empty"),
    pytest.param(_tiny_foreign_model, "does not match .*missing inputs/outputs", id="foreign"),
    pytest.param(lambda p: p.unlink(), "missing", id="missing"),
]


@pytest.mark.parametrize("damage, needle", MODEL_DAMAGE)
def test_damaged_model_onnx_is_one_usage_error(broken_copy, no_allocation, damage, needle):
    bad = broken_copy(lambda d: damage(d / "model.onnx"))
    with pytest.raises(UsageError, match=needle) as info:
        OnnxDecoder(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage, needle", [MODEL_DAMAGE[0], MODEL_DAMAGE[3]])
def test_cli_damaged_export_exit_2_with_one_line(broken_copy, damage, needle, capsys):
    bad = broken_copy(lambda d: damage(d / "model.onnx"))
    assert main(["generate", str(bad), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decodekit generate: error:"), err


def test_cli_huge_max_seq_len_exit_2_with_one_line(broken_copy, edit_metadata, capsys):
    bad = broken_copy(lambda d: edit_metadata(d, _config(max_seq_len=10**12)))
    assert main(["generate", str(bad), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_seq_len" in err[0], err


# --- decodekit.json of the wrong shape: one UsageError naming the file and the entry, never Python's own text ------


WRONG_TYPES = [
    pytest.param(_set(config=None), "'config' entry: it must be a JSON object", id="config-null"),
    pytest.param(_set(config=True), "'config' entry: it must be a JSON object", id="config-true"),
    pytest.param(_set(inputs=None), "'inputs' entry: it must be a list", id="inputs-null"),
    pytest.param(_set(inputs=True), "'inputs' entry: it must be a list", id="inputs-true"),
    pytest.param(_set(outputs={"logits": 1}), "'outputs' entry: it must be a list", id="outputs-object"),
    pytest.param(_set(outputs=["logits", 3]), "'outputs' entry: it must be a list", id="outputs-number-name"),
    pytest.param(_set(model_file=["model.onnx"]), "'model_file' entry: it must be a file name", id="model-file-list"),
    pytest.param(_set(model_file="../model.onnx"), "'model_file' entry: it must be a file name", id="model-file-up"),
    pytest.param(_set(logits=[1]), "'logits' entry: it must be a JSON object or null", id="logits-list"),
    pytest.param(_set(kv_cache=5), "'kv_cache' entry: it must be a JSON object or null", id="kv-cache-number"),
    pytest.param(_set(dtype=5), "'dtype' entry", id="dtype-number"),
    pytest.param(_set(tokenizer="tok512.bin"), "'tokenizer' entry: it must be null or an object", id="tok-string"),
    pytest.param(_set(tokenizer={"file": 5, "type": "x"}), "'tokenizer.file' entry", id="tok-file-number"),
    pytest.param(_set(tokenizer={"file": "tok512.bin", "type": "x"}), "'tokenizer.type' entry", id="tok-type"),
    pytest.param(_set(tokenizer={"file": "tok512.bin", "type": "llama2c", "bos_id": -1}), "'tokenizer.bos_id'",
                 id="tok-bos"),
    pytest.param(_set(source=5), "'source' entry", id="source-number"),
    pytest.param(_set(format_version=True), "format_version true", id="format-version-true"),
    pytest.param(_set(format_version="1"), 'format_version string "1"', id="format-version-string"),
    pytest.param(_config(norm_eps="x"), "config.norm_eps must be a number", id="config-norm-eps"),
    pytest.param(_config(stop_ids=None), "config.stop_ids must be a list of token ids", id="config-stop-ids-null"),
    pytest.param(_config(stop_ids=["x"]), "config.stop_ids must be a list of token ids", id="config-stop-ids-str"),
    pytest.param(_config(eos_id=[2]), "config.eos_id must be a token id", id="config-eos-list"),
    pytest.param(_config(arch=5), "config.arch must be a string", id="config-arch-number"),
    pytest.param(_config(n_kv_heads=True), "config.n_kv_heads must be a positive int", id="config-bool-int"),
    pytest.param(_config(tie_embeddings="no"), "config.tie_embeddings must be true or false", id="config-bool"),
    pytest.param(lambda meta: meta["config"].pop("arch"), "config.arch is missing", id="config-missing-field"),
    pytest.param(lambda meta: meta.pop("inputs"), "no 'inputs' entry", id="inputs-missing"),
]


@pytest.mark.parametrize("change, needle", WRONG_TYPES)
def test_wrong_types_in_decodekit_json_name_the_file_and_entry(broken_copy, edit_metadata, no_allocation, change,
                                                                needle):
    bad = broken_copy(lambda d: edit_metadata(d, change))
    with pytest.raises(UsageError) as info:
        OnnxDecoder(bad)
    msg = str(info.value)
    assert str(bad / "decodekit.json") in msg and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", b'{"format_version": 1, "producer": "\xe9"}',
                                  b"[" * 100_000, b'{"format_version": ' + b"9" * 5000 + b"}"],
                         ids=["binary", "latin-1", "deep", "huge-int"])
def test_unreadable_decodekit_json_is_one_usage_error(broken_copy, data):
    from decodekit.runtime import read_metadata

    bad = broken_copy(lambda d: (d / "decodekit.json").write_bytes(data))
    with pytest.raises(UsageError) as info:
        read_metadata(bad)
    msg = str(info.value)
    assert str(bad / "decodekit.json") in msg and "\n" not in msg and "codec" not in msg, msg


def test_cli_tokenizer_entry_nonsense_is_one_line(broken_copy, edit_metadata, capsys):
    bad = broken_copy(lambda d: edit_metadata(d, _set(tokenizer={"file": 5, "type": "x"})))
    assert main(["generate", str(bad), "--max-new-tokens", "2", "--prompt", "Once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.file" in err[0] and "PosixPath" not in err[0], err


def test_tokenizer_file_that_is_not_a_regular_file(broken_copy):
    import os

    bad = broken_copy(lambda d: ((d / "tok512.bin").unlink(), os.mkfifo(d / "tok512.bin")))
    dec = OnnxDecoder(bad)
    with pytest.raises(UsageError, match="is not a regular file"):
        dec.tokenizer  # noqa: B018 - a pipe would block the read: refused
