"""The output directory of an export: what may be replaced, the lock, the partial folder, stale leftovers.

Rules (an export never deletes or overwrites anything but its own previous output):

* ``OUT_DIR`` may not be, contain, or lie above the source checkpoint / model directory / tokenizer file.
* ``OUT_DIR`` must not exist, or be an empty directory, or (``force``) a previous decodekit export: a directory
  whose ``decodekit.json`` is decodekit's and that holds nothing but the files that export wrote.
* A symbolic link as ``OUT_DIR`` is refused: it is neither followed nor replaced (name the directory it points to).
* Writers of one ``OUT_DIR`` are serialized by ``fcntl.flock`` on ``.OUT_DIR.lock`` beside it: a second export
  waits for the first to finish (and says so), then checks ``OUT_DIR`` again (without ``force`` it is then
  refused as not empty). The lock file holds the writer's pid and is removed by the writer that holds it.
* Output is written into ``.OUT_DIR.<pid>.<hex>.partial`` beside ``OUT_DIR`` (created with mode ``0o777``
  filtered by the umask, like any ``mkdir``), renamed into place at the end. A previous export is first renamed
  to ``.OUT_DIR.<pid>.<hex>.old`` and removed once the new one is in place.
* Leftovers of an interrupted export (``kill -9``, power loss) are cleaned by the next export to the same
  ``OUT_DIR`` (even one refused later, e.g. for its tokenizer, once ``OUT_DIR`` itself passed the checks):
  under the lock no other writer exists, so every ``.partial`` of that name is stale (a free lock means its
  owner is dead); an ``.old`` is moved back when ``OUT_DIR`` itself is missing (the previous export comes
  back), removed otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from decodekit.errors import UsageError

try:  # pragma: no cover - always there on Linux/macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (documented)
    fcntl = None  # type: ignore[assignment]

METADATA_FILE = "decodekit.json"


def normalize(out_dir: str | os.PathLike) -> Path:
    """Absolute, ``..``-free path of ``out_dir`` whose LAST component is not resolved (so a link is seen)."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    if out.parent == out:
        raise UsageError(f"output directory {out} is a filesystem root")
    return out


def check_not_source(out: Path, sources: Iterable[Path | None]) -> None:
    """Refuse an ``out`` that is, or lies above, one of the inputs (it would be replaced with them)."""
    out_real = _resolve(out)
    out_stat = _stat(out)
    for src in sources:
        if src is None:
            continue
        src_real = _resolve(Path(src))
        chain = [src_real, *src_real.parents]
        same = out_real in chain
        if not same and out_stat is not None:  # bind mounts, case-insensitive file systems
            same = any((st := _stat(p)) is not None and os.path.samestat(st, out_stat) for p in chain)
        if same:
            what = "is" if src_real == out_real else "contains"
            raise UsageError(
                f"output directory {out} {what} the input {src}: an export replaces its output directory; "
                "choose another OUT_DIR"
            )


def _resolve(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return Path(os.path.abspath(p))


def _stat(p: Path) -> os.stat_result | None:
    try:
        return p.stat()
    except OSError:
        return None


def export_files(meta: dict) -> set[str]:
    """The file names a decodekit export with this ``decodekit.json`` consists of."""
    names = {METADATA_FILE, "model.onnx", "model.onnx.data"}
    for key in ("model_file", "external_data"):
        if isinstance(meta.get(key), str):
            names.add(meta[key])
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("file"), str):
        names.add(tok["file"])
    return names


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse an ``out`` that an export may not (re)place; see the module docstring."""
    if os.path.islink(out):
        raise UsageError(
            f"output {out} is a symbolic link; decodekit export neither follows nor replaces links: give the "
            f"directory it points to ({os.path.realpath(out)})"
        )
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise UsageError(f"cannot read output directory {out}: {e.strerror}") from None
    if not entries:
        return
    if not force:
        raise UsageError(f"output directory {out} is not empty (use --force to replace a previous export)")
    meta = None
    try:
        meta = json.loads((out / METADATA_FILE).read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(meta, dict) or not str(meta.get("producer", "")).startswith("decodekit"):
        raise UsageError(
            f"output directory {out} is not a previous decodekit export (no {METADATA_FILE} written by decodekit); "
            "--force only replaces a previous export or an empty directory"
        )
    allowed = export_files(meta)
    foreign = [n for n in entries if n not in allowed or not (out / n).is_file() or (out / n).is_symlink()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(
            f"output directory {out} holds files that are not part of its export ({shown}); --force never deletes "
            "them: move them away or choose another OUT_DIR"
        )


def _leftover_pattern(name: str) -> re.Pattern[str]:
    n = re.escape(name)
    # .NAME.<pid>.<hex>.partial / .old (this version), .NAME.<8 chars>.partial and .NAME.old-<pid> (older ones)
    return re.compile(rf"^\.{n}\.(?:\d+\.[0-9a-f]+\.(?P<kind>partial|old)|[a-z0-9_]{{8}}\.partial|old-\d+)$")


def clean_leftovers(out: Path, keep: Iterable[Path | None] = ()) -> list[str]:
    """Remove what interrupted exports to ``out`` left beside it (call with the lock held). Returns their names."""
    pattern = _leftover_pattern(out.name)
    keep_real = [_resolve(Path(k)) for k in keep if k is not None]
    removed = []
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        p = out.parent / name
        if p.is_symlink() or not p.is_dir():
            continue
        if any(_resolve(p) in (k, *k.parents) for k in keep_real):
            continue  # never delete an input, whatever it is called
        is_old = m.group("kind") == "old" or ".old-" in name
        if is_old and not os.path.lexists(out):
            os.rename(p, out)  # killed between the two renames of a commit: the previous export comes back
            removed.append(f"{name} (restored as {out.name})")
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(name)
    return removed


def clean_stale(out: Path, keep: Iterable[str | os.PathLike | None] = ()) -> list[str]:
    """:func:`clean_leftovers` when no export to ``out`` is running (its lock is free); else nothing."""
    lock_path = out.parent / f".{out.name}.lock"
    if fcntl is None or not out.parent.is_dir():
        return []
    fd: int | None = None
    held = False
    try:
        try:
            with _signals_held():
                fd = os.open(lock_path, _LOCK_FLAGS, 0o666)
        except OSError:
            return []  # a read-only folder: whatever is there stays, and the export fails with its own message
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # a live export holds it: its partial folder is not stale
        held = _is_current(fd, lock_path)
        if not held:
            return []
        return clean_leftovers(out, keep=[Path(k) if k is not None else None for k in keep])
    finally:
        if fd is not None:
            if held:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            with contextlib.suppress(OSError):
                os.close(fd)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def locked(out: Path, info: Callable[[str], None]) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (``.NAME.lock`` beside it); wait, saying so, when another export has it.

    The lock file is unlinked by its holder before unlocking; a waiter that then gets the lock of the unlinked
    file notices (the path is gone or names another file) and locks the path again. An interrupt at any point
    (even before the lock is held) leaves no lock file behind that this call created and could lock.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    fd: int | None = None
    held = False
    try:
        while True:
            with _signals_held():
                fd = os.open(lock_path, _LOCK_FLAGS, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info(f"waiting for {_holder(fd)}, which is exporting to {out} ({lock_path.name})")
                # poll rather than block in flock: CPython runs signal handlers between calls, so a Ctrl-C that
                # lands just before a blocking flock starts would wait unseen until the holder finishes
                while True:
                    time.sleep(_LOCK_POLL_S)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        continue
            held = _is_current(fd, lock_path)
            if held:
                break
            stale, fd = fd, None
            os.close(stale)  # the previous holder removed that file: lock the current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if fd is not None:
            if not held:  # interrupted while opening or waiting: remove the file only if nobody holds it
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = _is_current(fd, lock_path)
            if held:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            with contextlib.suppress(OSError):
                os.close(fd)


_LOCK_POLL_S = 0.05  # how often a waiting export retries the lock
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block are handled (their handler called) as the block ends.

    ``fd = os.open(...)`` inside it: Python runs a signal's handler right after a call returns, before its result
    is assigned, so an interrupt during the call would lose the descriptor (and leave the file it created). A
    signal mask is not enough: another thread of the process (torch, ONNX Runtime) may take the signal, and the
    main thread then runs the handler all the same. So the handlers record instead, inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers only run in the main thread
        return
    got: list[tuple[int, Any]] = []
    old: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, OSError):
                old[signum] = signal.signal(signum, lambda n, frame: got.append((n, frame)))
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if got:
            signum, frame = got[0]
            handler = old.get(signum)
            if callable(handler):
                handler(signum, frame)  # KeyboardInterrupt, decodekit's SIGTERM exception, ...
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _is_current(fd: int, lock_path: Path) -> bool:
    """Is the locked ``fd`` still the file at ``lock_path``?"""
    try:
        st = os.stat(lock_path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def partial_path(out: Path) -> Path:
    """A fresh name ``.NAME.<pid>.<hex>.partial`` beside ``out`` (not created)."""
    return out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"


def make_partial(out: Path) -> Path:
    """Create ``.NAME.<pid>.<hex>.partial`` beside ``out`` (mode 0o777 & ~umask, as ``mkdir`` does)."""
    while True:
        tmp = partial_path(out)
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


def commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; a previous ``out`` is removed only after the new one is there."""
    old = None
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
