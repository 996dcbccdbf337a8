"""``decodekit export`` as a user runs it: a subprocess for the real command, ``decodekit.cli.main`` in-process
for every bad input (exit 2, one error line, nothing written) and for a failed validation (exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from decodekit.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.2)
    d = tmp_path_factory.mktemp("cli") / "gpt2"
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    return d


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _fake_previous_export(out):
    """What --force may replace: a folder holding only a decodekit export's files."""
    out.mkdir(parents=True)
    (out / "decodekit.json").write_text(json.dumps({"producer": "decodekit 0.0.9", "model_file": "model.onnx"}))
    (out / "model.onnx").write_bytes(b"previous export")


def _cli(*argv, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "decodekit", "export", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_subprocess_export_with_force(tiny_gpt2, tmp_path):
    out = tmp_path / "out"
    _fake_previous_export(out)
    r = _cli(tiny_gpt2, "-o", out, "--force", "--max-seq-len", "24")
    assert r.returncode == 0, r.stderr
    assert "validated: max |ORT - eager|" in r.stdout
    assert "exporting to ONNX" in r.stderr and "done in" in r.stderr and "logits" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["decodekit.json", "model.onnx"]
    meta = json.loads((out / "decodekit.json").read_text())
    assert meta["max_seq_len"] == 24 and meta["source"]["format"] == "hf" and meta["validation"]["atol"] == 1e-4
    assert _leftovers(tmp_path) == []


def test_cli_subprocess_missing_checkpoint(tmp_path):
    r = _cli(tmp_path / "nope.bin", "-o", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"decodekit export: error: model {tmp_path / 'nope.bin'} does not exist"]
    assert not (tmp_path / "out").exists()


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decodekit export: error: "), err
    for f in fragments:
        assert f in err[0], err[0]


def test_truncated_checkpoint(stories_dir, tmp_path, capsys):
    bad = tmp_path / "model.bin"
    bad.write_bytes((stories_dir / "stories260K.bin").read_bytes()[:500_000])
    assert main(["export", str(bad), "-o", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "truncated", "1056540")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path, capsys):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    assert main(["export", str(d), "-o", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "unknown architecture T5ForConditionalGeneration")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_is_refused(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_gpt2), "-o", str(out)]) == 2
    _one_error_line(capsys, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_dir_under_a_file(tiny_gpt2, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", str(tiny_gpt2), "-o", str(blocker / "out")]) == 2
    _one_error_line(capsys, "not a directory")
    assert main(["export", str(tiny_gpt2), "-o", str(blocker)]) == 2
    _one_error_line(capsys, "not a directory")


def test_unwritable_parent(tiny_gpt2, tmp_path, capsys):
    """A parent folder the process cannot write to: mode 0500, and for root (which ignores modes) the immutable
    flag as well; skipped only where neither can make the folder unwritable."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    immutable = False
    try:
        (ro / ".probe").write_text("x")
    except OSError:
        pass
    else:  # root: modes do not stop it
        (ro / ".probe").unlink()
        import shutil

        immutable = bool(shutil.which("chattr")) and subprocess.run(
            ["chattr", "+i", str(ro)], capture_output=True).returncode == 0
        if not immutable:
            ro.chmod(0o700)
            pytest.skip("running as root without a working chattr: no folder can be made unwritable here")
    try:
        assert main(["export", str(tiny_gpt2), "-o", str(ro / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("decodekit export: error: "), err
        assert "permission denied" in err[0].lower() or "not permitted" in err[0].lower(), err[0]
        assert os.listdir(ro) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o700)


@pytest.mark.parametrize("argv, fragment", [(["--opset", "11"], "opset"), (["--atol", "0"], "atol"),
                                            (["--max-seq-len", "1"], "max_seq_len")])
def test_bad_options(tiny_gpt2, tmp_path, capsys, argv, fragment):
    assert main(["export", str(tiny_gpt2), "-o", str(tmp_path / "out"), *argv]) == 2
    _one_error_line(capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_an_argparse_error(tiny_gpt2, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_gpt2), "-o", str(tmp_path / "out"), "--dtype", "bf16"])
    assert e.value.code == 2


def test_failed_validation_exits_1_and_keeps_the_old_out_dir(tiny_gpt2, tmp_path, capsys):
    """An impossible tolerance: exit 1, a clear message, and --force did NOT replace the previous OUT_DIR."""
    out = tmp_path / "deep" / "out"
    _fake_previous_export(out)
    assert main(["export", str(tiny_gpt2), "-o", str(out), "--force", "--atol", "1e-30"]) == 1
    err = capsys.readouterr().err
    assert "ABOVE TOLERANCE" in err
    assert "decodekit export: error: exported model disagrees with PyTorch" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["decodekit.json", "model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"previous export" and _leftovers(out.parent) == []


def test_validate_export_detects_a_wrong_model(stories_export_dir, stories_dir):
    """The validator itself: a slightly perturbed eager model must be reported, per output."""
    import torch

    from decodekit.errors import ValidationError
    from decodekit.export.validate import validate_export
    from decodekit.models import load_model

    model = load_model(stories_dir / "stories260K.bin")
    with torch.no_grad():
        model.layers[3].attn.wv.weight[0, 0] += 0.05
    lines = []
    with pytest.raises(ValidationError, match="disagrees"):
        validate_export(model, stories_export_dir, atol=1e-4, report_line=lines.append)
    flagged = {ln.split()[0] for ln in lines if "ABOVE" in ln}
    assert "present.3.value" in flagged and "logits" in flagged
    assert "present.2.value" not in flagged and "present.3.key" not in flagged  # earlier layers/keys untouched
    assert np.isfinite([float(ln.split("=")[1].split()[0]) for ln in lines]).all()
