"""The ``decodekit`` command (also ``python -m decodekit``).

Subcommands are registered by the layers that own them, each with a typed function behind it:

* ``decodekit export``   -> :func:`decodekit.export.cli.register`
* ``decodekit generate`` / ``decodekit demo`` -> :func:`decodekit.runtime.cli.register`

Bad input ends with one line on stderr and exit code 2; a failed export validation with exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from decodekit import __version__
from decodekit.errors import DecodekitError

# modules whose ``register(subparsers)`` adds subcommands, in help order
_COMMAND_MODULES = ("decodekit.export.cli", "decodekit.runtime.cli")

# exceptions that mean "the user's input is wrong": one line on stderr, exit code 2
_USAGE_EXCEPTIONS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"decodekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in _COMMAND_MODULES:
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad flags
    try:
        return int(args.func(args) or 0)
    except DecodekitError as e:
        print(f"decodekit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except _USAGE_EXCEPTIONS as e:
        print(f"decodekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"decodekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
