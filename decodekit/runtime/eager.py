"""Eager PyTorch backend for :func:`decodekit.runtime.loop.run_generation`.

It runs decodekit's own :class:`~decodekit.models.Decoder` with its explicit KV cache (the ``presents`` of
one step are the ``past_key_values`` of the next), so it computes exactly what the exported ONNX graph
computes and the two backends can be compared token for token.
"""

from __future__ import annotations

import torch

from decodekit.errors import UsageError
from decodekit.models import Decoder
from decodekit.runtime.config import check_int
from decodekit.runtime.loop import MAX_BATCH, GenerateMixin, check_reset_batch


class EagerDecoder(GenerateMixin):
    """A :class:`~decodekit.runtime.loop.StepModel` over an eager :class:`Decoder`.

    Parameters
    ----------
    model : Decoder
        Any decodekit decoder (patched or not); put in eval mode here.
    max_batch : int
        Most rows a generation may have, in ``[1, MAX_BATCH]`` (default 64).
    max_seq_len : int, optional
        Longest prompt + generation, at least 2 (default and upper limit: the model's ``max_seq_len``).

    Wrong argument types raise ``TypeError``, bad values ``UsageError`` (a ``ValueError``), naming the argument.

    Threads: one decoder holds one KV cache, so :meth:`generate` takes the decoder's lock; threads sharing a
    decoder take turns, and each call returns exactly the tokens it would return alone. Calling :meth:`reset` /
    :meth:`step` directly is not locked: do not mix that with concurrent ``generate`` calls.
    """

    def __init__(self, model: Decoder, *, max_batch: int = 64, max_seq_len: int | None = None) -> None:
        if not isinstance(model, Decoder):
            raise TypeError(f"model must be a decodekit Decoder, got {type(model).__name__}")
        cfg = model.config
        max_batch = check_int("max_batch", max_batch, lo=1, hi=MAX_BATCH)
        if max_seq_len is not None:
            max_seq_len = check_int("max_seq_len", max_seq_len, lo=2)
        self.model = model.eval()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.device = model.tok_embeddings.weight.device
        self._past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.tokenizer = None  # set by decodekit.runtime.load_backend when the checkpoint has one
        self._init_generate_lock()

    @property
    def default_stop_ids(self) -> list[int]:
        return list(self.config.stop_ids or [self.config.eos_id])

    def reset(self, batch_size: int) -> None:
        check_reset_batch(batch_size, self.max_batch)
        self._past = None

    @torch.inference_mode()
    def reorder_cache(self, index: torch.Tensor) -> None:
        """Make row ``i`` of the KV cache the old row ``index[i]`` (beam search), int64 ``[B']`` ``index``."""
        n = index.shape[0] if index.dim() == 1 else -1
        if index.dtype != torch.int64 or not 1 <= n <= self.max_batch:
            raise UsageError(f"reorder_cache: index must be an int64 [B'] tensor with 1 <= B' <= "
                             f"max_batch={self.max_batch}, got {index.dtype} {tuple(index.shape)}")
        rows = None if self._past is None else self._past[0][0].shape[0]
        if rows is not None and index.device.type == "cpu" and not 0 <= int(index.min()) <= int(index.max()) < rows:
            raise UsageError(f"reorder_cache: index values must be rows in [0, {rows}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        if self._past is not None:
            index = index.to(self.device)
            self._past = [tuple(t.index_select(0, index) for t in layer) for layer in self._past]

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, self._past = self.model(input_ids, position_ids, attention_mask, self._past)
        return logits
