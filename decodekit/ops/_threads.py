"""How many threads torch's CPU ops may use inside a block (a leaf module: importing it pulls in torch only, not
``torch._dynamo`` and with it Triton, so the runtime can import it at package import)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the torch CPU ops of the block on at most ``n`` intra-op threads; the caller's setting is restored on exit.

    Why: each parallel torch op ends in a barrier. When another process holds one of the cores, a worker waits for
    a time slice at every barrier, so a path of many short full-row passes slows 5-10x while one thread runs on
    the free core at its quiet speed. ``torch.set_num_threads`` sets the OpenMP team size of the calling thread.
    """
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
