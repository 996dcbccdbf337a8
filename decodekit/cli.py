"""The ``decodekit`` command (also ``python -m decodekit``).

Subcommands are registered by the layers that own them, each with a typed function behind it:

* ``decodekit export``   -> :func:`decodekit.export.cli.register`
* ``decodekit generate`` / ``decodekit demo`` -> :func:`decodekit.runtime.cli.register`

Exit codes, for every subcommand:

* 0 -- done.
* 1 -- an export failed its validation (ONNX Runtime disagrees with PyTorch).
* 2 -- anything else that went wrong: bad flags, bad or corrupt files, a full disk, a read-only folder, an
  unexpected error. Always exactly ONE line on stderr, ``decodekit COMMAND: error: ...``; an unexpected error
  names its type. ``--debug`` (or ``DECODEKIT_DEBUG=1``) prints the traceback before that line.
* 130 -- interrupted (Ctrl-C); 143 -- terminated (SIGTERM). Partial output is removed first.
* 141 -- stdout was closed early (``decodekit generate ... | head -c 10``): nothing more is printed, no error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from decodekit import __version__
from decodekit.errors import DecodekitError

# modules whose ``register(subparsers)`` adds subcommands, in help order
_COMMAND_MODULES = ("decodekit.export.cli", "decodekit.runtime.cli")

# exceptions that mean "the user's input is wrong": their message alone is the error line
_USAGE_EXCEPTIONS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)

EXIT_OK, EXIT_VALIDATION, EXIT_ERROR, EXIT_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 141, 130, 143
_MAX_LINE = 500  # characters of an error message kept on its one line


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the usage block first) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that ``finally`` blocks (partial output) run."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="decodekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"decodekit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also DECODEKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for modname in _COMMAND_MODULES:
        importlib.import_module(modname).register(sub)
    for p in sub.choices.values():  # `decodekit export ... --debug` works as well as `decodekit --debug export`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(_commands=sub.choices)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """``parse_args``, but an unknown flag is reported by the subcommand that got it (``decodekit export: ...``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser_of = args._commands.get(getattr(args, "command", None), parser)
        parser_of.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(message: str) -> str:
    line = re.sub(r"\s+", " ", str(message)).strip()
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _describe(e: BaseException) -> str:
    """The error line's text: the message of decodekit's and usage errors, ``Type: message`` for the rest."""
    if isinstance(e, OSError) and not isinstance(e, DecodekitError) and e.strerror:
        where = f": {e.filename}" if e.filename is not None else ""
        return _one_line(f"{e.strerror}{where}")
    msg = _one_line(str(e))
    if isinstance(e, (DecodekitError, *_USAGE_EXCEPTIONS)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _silence_stdout() -> None:
    """stdout's reader is gone: point fd 1 at /dev/null so that the interpreter's last flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed as well: the exit code still tells
        pass


_signalled: list[int] = []  # signals received during this main(): an error that follows is their consequence


def _on_sigterm(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise _Terminated()


def _on_sigint(signum: int, frame: object) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt()


def _unraisable_hook(previous: Any) -> Any:
    """A signal's exception raised inside a ``__del__`` or a GC callback is only printed by Python ("Exception
    ignored in ...", a traceback) and the work goes on: print nothing and deliver the signal again instead."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, _Terminated)) and 0 < len(_signalled) < 16:
            # a moment later, from another thread, to the main thread (raised here it would be swallowed again)
            main = threading.main_thread().ident
            threading.Timer(0.01, signal.pthread_kill, (main, _signalled[-1])).start()
            return
        previous(unraisable)

    return hook


def main(argv: Sequence[str] | None = None) -> int:
    command = "decodekit"
    debug = os.environ.get("DECODEKIT_DEBUG", "").lower() in ("1", "true", "yes")
    previous: dict[int, Any] = {}
    _signalled.clear()
    unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(unraisable)
    try:
        try:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
        except ValueError:  # not the main thread (main() called from a thread): leave signals alone
            pass
        args = _parse(argv)  # a bad flag: one line, exit 2 (SystemExit)
        command = f"decodekit {args.command}"
        debug = debug or getattr(args, "debug", False)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        _say(f"{command}: interrupted")
        return EXIT_INTERRUPTED
    except _Terminated:
        _say(f"{command}: terminated")
        return EXIT_TERMINATED
    except SystemExit:
        raise  # argparse (--help, --version, bad flags) has printed what it prints
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        if _signalled:  # a library turned the KeyboardInterrupt into its own error (torch.export does)
            interrupted = _signalled[0] == signal.SIGINT
            _say(f"{command}: {'interrupted' if interrupted else 'terminated'}")
            return EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED
        if debug:
            with contextlib.suppress(OSError, ValueError):
                traceback.print_exc()
        _say(f"{command}: error: {_describe(e)}")
        if isinstance(e, DecodekitError):
            return e.exit_code
        return EXIT_ERROR
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        sys.unraisablehook = unraisable


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
