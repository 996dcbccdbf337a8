"""What ``decodekit export`` may replace, its lock, and what interrupted exports leave (issue 10: nothing lost).

The ONNX conversion itself is replaced by a stub that writes a small ``model.onnx`` (the rules under test are
about folders, and a real conversion takes 10 s here); ``test_export_cli.py`` runs real exports.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import decodekit.export as ex
from decodekit.cli import main
from decodekit.errors import UsageError
from decodekit.export import _outdir


def write_tiny_llama2c(path, *, dim=16, hidden=32, layers=1, heads=2, kv=2, vocab=32, seq=16, seed=0, fill=None):
    """A valid llama2.c checkpoint small enough to load in milliseconds."""
    hs = dim // heads
    kvd = kv * hs
    n = (vocab * dim + layers * dim + layers * dim * dim * 2 + layers * kvd * dim * 2 + layers * dim
         + layers * hidden * dim * 3 + dim + seq * hs)
    data = (np.random.default_rng(seed).standard_normal(n) * 0.1).astype("<f4")
    if fill is not None:
        data[n // 2] = fill
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq))
        f.write(data.tobytes())
    return path



@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Python's own SIGINT handler for every test here: an earlier test in the same xdist worker (torch's compile
    workers, for one) can leave SIGINT ignored, and the interrupt tests would then see no interrupt."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "notes.txt").write_text("the user's own file")
    return write_tiny_llama2c(d / "model.bin")


@pytest.fixture
def stub_export(monkeypatch):
    """Replace the ONNX conversion: write a small model.onnx; ``calls`` records each; ``hook`` may raise."""
    state = SimpleNamespace(calls=0, hook=None, opset=18)

    def fake(model, path, *, opset, all_logits):
        state.calls += 1
        path.write_bytes(b"onnx" * 100)
        if state.hook is not None:
            state.hook(path)
        return SimpleNamespace(model=SimpleNamespace(opset_imports={"": state.opset if opset is None else opset}))

    monkeypatch.setattr(ex, "_export_onnx", fake)
    return state


def digest(root):
    """{relative path: sha256} of every file under root (symlinks by target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def run_cli(capsys, *argv):
    code = main(["export", *map(str, argv), "-q", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


# --- the source is never replaced ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same dir", "ancestor", "the file", "grandparent"])

def test_out_dir_holding_the_source_is_refused(ckpt, tmp_path, capsys, stub_export, where):
    """Issue 10's data loss: `export DIR/model.bin -o DIR --force` deleted the checkpoint and DIR's files."""
    out = {"same dir": ckpt.parent, "ancestor": tmp_path, "the file": ckpt, "grandparent": tmp_path.parent}[where]
    before = digest(tmp_path)
    code, err = run_cli(capsys, ckpt, "-o", out, "--force")
    assert code == 2 and len(err) == 1
    assert "the input" in err[0] or "is not a directory" in err[0], err
    assert digest(tmp_path) == before and stub_export.calls == 0


def test_out_dir_holding_the_source_through_a_link_is_refused(ckpt, tmp_path, capsys, stub_export):
    alias = tmp_path / "alias"
    alias.symlink_to(ckpt.parent)
    before = digest(tmp_path)
    code, err = run_cli(capsys, alias / "model.bin", "-o", ckpt.parent, "--force")
    assert code == 2 and "contains the input" in err[0]
    assert digest(tmp_path) == before


def test_tokenizer_inside_out_dir_is_refused(ckpt, tmp_path, capsys, stub_export, stories_dir):
    out = tmp_path / "out"
    assert run_cli(capsys, ckpt, "-o", out)[0] == 0
    shutil.copyfile(stories_dir / "tok512.bin", out / "tok512.bin")
    code, err = run_cli(capsys, ckpt, "-o", out, "--force", "--tokenizer", out / "tok512.bin")
    assert code == 2 and "contains the input" in err[0]
    assert (out / "tok512.bin").read_bytes() == (stories_dir / "tok512.bin").read_bytes()


# --- what --force may replace --------------------------------------------------------------------------------


def test_force_replaces_a_previous_export_only(ckpt, tmp_path, capsys, stub_export):
    out = tmp_path / "out"
    assert run_cli(capsys, ckpt, "-o", out) == (0, [])
    first = json.loads((out / "decodekit.json").read_text())
    assert first["producer"].startswith("decodekit") and sorted(os.listdir(out)) == ["decodekit.json", "model.onnx"]
    assert run_cli(capsys, ckpt, "-o", out)[0] == 2  # not empty, no --force
    assert run_cli(capsys, ckpt, "-o", out, "--force") == (0, [])
    assert hidden(tmp_path) == [] and stub_export.calls == 2


@pytest.mark.parametrize("content", ["foreign", "extra file", "subfolder", "nonsense json", "foreign json"])
def test_force_never_deletes_foreign_files(ckpt, tmp_path, capsys, stub_export, content):
    out = tmp_path / "out"
    if content in ("extra file", "subfolder"):
        assert run_cli(capsys, ckpt, "-o", out)[0] == 0
        if content == "extra file":
            (out / "mine.txt").write_text("keep")
        else:
            (out / "runs").mkdir()
            (out / "runs" / "log").write_text("keep")
    else:
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        if content == "nonsense json":
            (out / "decodekit.json").write_text("{not json")
        elif content == "foreign json":
            (out / "decodekit.json").write_text('{"producer": "someone else"}')
    before = digest(out)
    code, err = run_cli(capsys, ckpt, "-o", out, "--force")
    assert code == 2 and len(err) == 1 and ("not a previous decodekit export" in err[0] or "not part of" in err[0])
    assert digest(out) == before and hidden(tmp_path) == []


def test_empty_out_dir_is_used(ckpt, tmp_path, capsys, stub_export):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(capsys, ckpt, "-o", out) == (0, [])
    assert (out / "decodekit.json").is_file()


@pytest.mark.parametrize("target", ["previous export", "dangling"])
@pytest.mark.parametrize("force", [False, True])
def test_symlinked_out_dir_is_neither_followed_nor_replaced(ckpt, tmp_path, capsys, stub_export, target, force):
    real = tmp_path / "real"
    if target == "previous export":
        assert run_cli(capsys, ckpt, "-o", real)[0] == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    before = digest(tmp_path)
    code, err = run_cli(capsys, ckpt, "-o", link, *(["--force"] if force else []))
    assert code == 2 and len(err) == 1 and "symbolic link" in err[0]
    assert link.is_symlink() and digest(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_folders_respect_the_umask(ckpt, tmp_path, capsys, stub_export, umask):
    old = os.umask(umask)
    try:
        assert run_cli(capsys, ckpt, "-o", tmp_path / "a" / "b" / "out")[0] == 0
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "out"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, d
    assert (tmp_path / "a" / "b" / "out" / "decodekit.json").stat().st_mode & 0o777 == 0o666 & ~umask


# --- failures while writing: nothing left behind ---------------------------------------------------------------


@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO])
def test_os_error_while_writing_is_one_line_and_cleans_up(ckpt, tmp_path, capsys, stub_export, err_no):
    def full(path):
        raise OSError(err_no, os.strerror(err_no), str(path))

    stub_export.hook = full
    out = tmp_path / "new" / "deeper" / "out"
    code, err = run_cli(capsys, ckpt, "-o", out)
    assert code == 2 and len(err) == 1
    assert err[0] == f"decodekit export: error: cannot write the export to {out}: {os.strerror(err_no)}"
    assert not (tmp_path / "new").exists() and hidden(tmp_path) == []  # created parents removed again


def test_os_error_keeps_the_previous_export(ckpt, tmp_path, capsys, stub_export):
    out = tmp_path / "out"
    assert run_cli(capsys, ckpt, "-o", out)[0] == 0
    before = digest(out)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    stub_export.hook = full
    code, err = run_cli(capsys, ckpt, "-o", out, "--force")
    assert code == 2 and "No space left on device" in err[0]
    assert digest(out) == before and hidden(tmp_path) == []


@pytest.mark.parametrize("exc, code_", [(KeyboardInterrupt, 130), (RuntimeError, 2), (MemoryError, 2)])
def test_interrupt_or_crash_during_export_cleans_up(ckpt, tmp_path, capsys, stub_export, exc, code_):
    def boom(path):
        raise exc("boom")

    stub_export.hook = boom
    code, err = run_cli(capsys, ckpt, "-o", tmp_path / "out")
    assert code == code_ and len(err) == 1
    want = "decodekit export: interrupted" if code_ == 130 else f"decodekit export: error: {exc.__name__}: boom"
    assert err[0] == want
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_debug_prints_the_traceback(ckpt, tmp_path, capsys, stub_export, monkeypatch):
    def boom(path):
        raise RuntimeError("boom")

    stub_export.hook = boom
    assert main(["export", str(ckpt), "-o", str(tmp_path / "o1"), "-q", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "decodekit export: error: RuntimeError: boom"
    monkeypatch.setenv("DECODEKIT_DEBUG", "1")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "o2"), "-q"]) == 2
    assert "Traceback" in capsys.readouterr().err


# --- interrupted exports: leftovers cleaned by the next one ------------------------------------------------------


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_partials_are_cleaned_and_unrelated_folders_kept(ckpt, tmp_path, capsys, stub_export):
    out = tmp_path / "out"
    stale = [f".out.{_dead_pid()}.0a1b2c3d.partial", ".out.k3j_x9qz.partial", f".out.{os.getpid()}.ff.partial"]
    kept = [".out2.123.ab.partial", ".out.b.123.ab.partial", ".outx.abcdefgh.partial", ".out.123.ab.partial.txt"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half")
    assert run_cli(capsys, ckpt, "-o", out)[0] == 0
    assert hidden(tmp_path) == sorted(kept)


def test_killed_between_the_two_renames_restores_the_previous_export(ckpt, tmp_path, capsys, stub_export):
    out = tmp_path / "out"
    assert run_cli(capsys, ckpt, "-o", out)[0] == 0
    before = digest(out)
    os.rename(out, tmp_path / f".out.{_dead_pid()}.abcd.old")  # what a kill -9 inside commit() leaves
    code, err = run_cli(capsys, ckpt, "-o", out)  # the previous export comes back, so: not empty
    assert code == 2 and "not empty" in err[0]
    assert digest(out) == before and hidden(tmp_path) == []


def test_a_partial_holding_the_input_is_never_removed(tmp_path, capsys, stub_export):
    odd = tmp_path / ".out.1.ab.partial"
    odd.mkdir()
    src = write_tiny_llama2c(odd / "model.bin")
    assert run_cli(capsys, src, "-o", tmp_path / "out")[0] == 0
    assert src.is_file()


def test_kill_9_leftovers_are_cleaned_by_the_next_export(ckpt, tmp_path, capsys, stub_export):
    """A real kill -9 of a process that holds the lock and has its partial folder."""
    out = tmp_path / "out"
    script = (
        "import sys, time; from pathlib import Path; from decodekit.export import _outdir\n"
        "out = Path(sys.argv[1])\n"
        "with _outdir.locked(out, print):\n"
        "    tmp = _outdir.make_partial(out); (tmp / 'model.onnx').write_bytes(b'x'); print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert any(n.endswith(".partial") for n in hidden(tmp_path)) and ".out.lock" in hidden(tmp_path)
    finally:
        p.kill()
        p.wait()
    assert run_cli(capsys, ckpt, "-o", out)[0] == 0
    assert hidden(tmp_path) == []


# --- concurrent exports to one OUT_DIR ---------------------------------------------------------------------------


def test_concurrent_exports_are_serialized(ckpt, tmp_path, stub_export, capsys):
    """A second export waits for the lock, says so, and then finds OUT_DIR taken (no --force) or replaces it."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    results = {}
    lines = []

    def second(force):
        try:
            results[force] = ex.export_decoder(ckpt, out, validate=False, force=force,
                                               progress=ex.Progress(stream=SimpleNamespace(write=lines.append,
                                                                                         flush=lambda: None)))
        except UsageError as e:
            results[force] = e

    t = threading.Thread(target=second, args=(False,))
    t.start()
    deadline = time.time() + 20
    while not any("waiting for pid 4242" in ln for ln in lines) and time.time() < deadline:
        time.sleep(0.02)
    assert any("waiting for pid 4242" in ln for ln in lines), lines
    assert stub_export.calls == 0 and t.is_alive()
    # meanwhile the "first" export finishes: OUT_DIR appears, then the lock is released (and its file removed)
    out.mkdir()
    (out / "model.onnx").write_bytes(b"first")
    (out / "decodekit.json").write_text(json.dumps({"producer": "decodekit 0.1.0"}))
    os.unlink(lock)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    t.join(20)
    assert isinstance(results[False], UsageError) and "not empty" in str(results[False])
    assert stub_export.calls == 0 and json.loads((out / "decodekit.json").read_text())["producer"] == "decodekit 0.1.0"
    # with force, a waiting export replaces the finished one once it has the lock
    second(True)
    assert results[True].out_dir == out and stub_export.calls == 1 and hidden(tmp_path) == []


def test_lock_file_is_removed_and_holds_the_pid(tmp_path):
    out = tmp_path / "out"
    with _outdir.locked(out, print):
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".out.lock").exists()


# --- options checked up front ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--opset", "99"], "opset 99 is not supported"), (["--opset", "17"], "opset must be"),
    (["--opset", "-1"], "opset must be"), (["--opset", "x"], "invalid int value"),
    (["--atol", "nan"], "atol"), (["--atol", "inf"], "atol"), (["--rtol", "-1"], "rtol"), (["--rtol", "inf"], "rtol"),
    (["--max-seq-len", "99999999999"], "max_seq_len"), (["--max-seq-len", "0"], "max_seq_len"),
    (["--dtype", "bf16"], "invalid choice"), (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_one_line_before_any_work(ckpt, tmp_path, capsys, stub_export, argv, fragment):
    try:
        code = main(["export", str(ckpt), "-o", str(tmp_path / "out"), *argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and err[0].startswith("decodekit export: error: "), err
    assert not (tmp_path / "out").exists() and stub_export.calls == 0


def test_opset_range(ckpt, tmp_path, stub_export, monkeypatch):
    import onnx

    assert 21 <= ex.max_opset() <= onnx.defs.onnx_opset_version()
    with pytest.raises(UsageError, match="opset must be"):
        ex.export_decoder(ckpt, tmp_path / "out", opset=True, validate=False, progress=False)
    stub_export.opset = 18
    # a converter that silently writes another opset than the one asked for is an error, not a success
    ex.export_decoder(ckpt, tmp_path / "o20", opset=20, validate=False, progress=False)

    def other(model, path, *, opset, all_logits):
        path.write_bytes(b"x")
        return SimpleNamespace(model=SimpleNamespace(opset_imports={"": 18}))

    monkeypatch.setattr(ex, "_export_onnx", other)
    with pytest.raises(UsageError, match="wrote opset 18 instead of the requested 20"):
        ex.export_decoder(ckpt, tmp_path / "o20b", opset=20, validate=False, progress=False)
    assert not (tmp_path / "o20b").exists() and hidden(tmp_path) == []


def test_non_finite_weights_are_refused(tmp_path, capsys, stub_export):
    bad = write_tiny_llama2c(tmp_path / "nan.bin", fill=np.nan)
    code, err = run_cli(capsys, bad, "-o", tmp_path / "out")
    assert code == 2 and "not a finite number" in err[0]
    bad = write_tiny_llama2c(tmp_path / "inf.bin", fill=np.inf)
    assert run_cli(capsys, bad, "-o", tmp_path / "out")[0] == 2


def test_interrupt_turned_into_another_error_is_still_an_interrupt(ckpt, tmp_path, capsys, stub_export):
    """torch.export catches the KeyboardInterrupt of a Ctrl-C and raises its own error: still exit 130."""
    import signal

    def wrapped(path):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export") from e

    stub_export.hook = wrapped
    code, err = run_cli(capsys, ckpt, "-o", tmp_path / "out")
    assert (code, err) == (130, ["decodekit export: interrupted"])
    assert hidden(tmp_path) == [] and not (tmp_path / "out").exists()


def test_an_in_memory_decoder_is_left_as_it_was(ckpt, tmp_path, stub_export):
    from decodekit.models import load_model

    model = load_model(ckpt).train()
    cfg = model.config
    ex.export_decoder(model, tmp_path / "out", validate=False, progress=False, max_seq_len=8)
    assert model.training and all(m.training for m in model.modules())
    assert model.config is cfg and cfg.max_seq_len == 16


def test_interrupt_swallowed_by_a_destructor_is_delivered_again(ckpt, tmp_path, capsys, stub_export):
    """Ctrl-C landing inside a __del__: Python would print "Exception ignored ... Traceback" and carry on."""
    import gc
    import signal

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the KeyboardInterrupt is raised here, inside __del__

    def hook(path):
        Finalized()
        gc.collect()
        for _ in range(500):  # ... and delivered again here, while Python code runs
            time.sleep(0.01)

    stub_export.hook = hook
    t0 = time.perf_counter()
    code, err = run_cli(capsys, ckpt, "-o", tmp_path / "out")
    assert (code, err) == (130, ["decodekit export: interrupted"]) and time.perf_counter() - t0 < 4
    assert hidden(tmp_path) == []


def test_interrupted_while_waiting_for_the_lock_leaves_the_holders_file(tmp_path):
    import signal

    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # Ctrl-C's own handler, whatever an earlier test in this worker left installed (else the signal may be ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt), _outdir.locked(out, lambda msg: None):
            pytest.fail("got a lock that another holds")
        assert (tmp_path / ".out.lock").exists()  # still the holder's
    finally:
        timer.cancel()
        os.close(fd)
        signal.signal(signal.SIGINT, previous)
    with _outdir.locked(out, print):
        pass
    assert os.listdir(tmp_path) == []
