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
