"""Exceptions shared across layers (the CLI maps them to exit codes)."""

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
