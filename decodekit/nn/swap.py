"""The swap record and the attention-patcher registry shared by :mod:`decodekit.nn.patch` and
:mod:`decodekit.nn.attention` (a leaf module, so that neither of them imports the other back)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["ATTENTION_PATCHERS", "Patcher", "Swap", "register_attention_patcher", "swap"]


@dataclass
class Swap:
    """One replaced submodule: ``parent.<name>`` was ``original`` and is now ``replacement``."""

    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module


Patcher = Callable[[nn.Module, str], list[Swap]]

#: patchers run by ``patch(attention=True)``; empty until the attention module registers one
ATTENTION_PATCHERS: list[Patcher] = []


def register_attention_patcher(fn: Patcher) -> Patcher:
    """Add ``fn`` to the patchers that ``patch(model, attention=True)`` runs (usable as a decorator)."""
    if fn not in ATTENTION_PATCHERS:
        ATTENTION_PATCHERS.append(fn)
    return fn


def swap(parent: nn.Module, name: str, replacement: nn.Module) -> Swap:
    """Replace ``parent.<name>`` by ``replacement`` and return the record."""
    record = Swap(parent, name, getattr(parent, name), replacement)
    setattr(parent, name, replacement)
    return record
