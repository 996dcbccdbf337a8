"""Exceptions shared across layers (the CLI maps them to exit codes).

The rule for bad input, everywhere: an argument of the wrong type raises the built-in ``TypeError``; a value of
the right type that is out of range, or a bad file or directory, raises :class:`UsageError`, which is a
``ValueError``. Both messages name the argument, on one line. The CLI prints either as one line on stderr and
exits with code 2.
"""

from __future__ import annotations


class DecodekitError(Exception):
    """Base class. ``exit_code`` is what the CLI returns when this escapes a command."""

    exit_code = 1


class UsageError(DecodekitError, ValueError):
    """Bad input from the user (arguments, files, directories): the CLI exits with code 2."""

    exit_code = 2


class ValidationError(DecodekitError):
    """An exported model disagrees with PyTorch beyond the tolerance: the CLI exits with code 1."""

    exit_code = 1
