"""Eager PyTorch backend for :func:`decodekit.runtime.loop.run_generation`.

It runs decodekit's own :class:`~decodekit.models.Decoder` with its explicit KV cache (the ``presents`` of
one step are the ``past_key_values`` of the next), so it computes exactly what the exported ONNX graph
computes and the two backends can be compared token for token.
"""

from __future__ import annotations

import torch

from decodekit.models import Decoder
from decodekit.runtime.loop import GenerateMixin


class EagerDecoder(GenerateMixin):
    """A :class:`~decodekit.runtime.loop.StepModel` over an eager :class:`Decoder`.

    Parameters
    ----------
    model : Decoder
        Any decodekit decoder (patched or not); put in eval mode here.
    max_batch, max_seq_len : int, optional
        Limits checked by the generation loop (defaults: 64 and the model's ``max_seq_len``).
    """

    def __init__(self, model: Decoder, *, max_batch: int = 64, max_seq_len: int | None = None) -> None:
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.device = model.tok_embeddings.weight.device
        self._past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.tokenizer = None  # set by decodekit.runtime.load_backend when the checkpoint has one

    @property
    def default_stop_ids(self) -> list[int]:
        return list(self.config.stop_ids or [self.config.eos_id])

    def reset(self, batch_size: int) -> None:
        self._past = None

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, self._past = self.model(input_ids, position_ids, attention_mask, self._past)
        return logits
