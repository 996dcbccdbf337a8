"""The one configuration dataclass every decoder is built from.

A :class:`DecoderConfig` describes the architecture completely (no weights): the loaders fill it from a
llama2.c header or a Hugging Face ``config.json``, the exporter writes it into ``decodekit.json``, and
:meth:`DecoderConfig.from_dict` reads it back, so it must stay JSON round-trippable (plain ints, floats,
strings, bools and lists of ints only).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from decodekit.errors import UsageError

ARCHS = ("llama", "gpt2")
ROPE_LAYOUTS = ("adjacent", "halves")


@dataclass
class DecoderConfig:
    """Architecture of a decoder-only transformer (Llama or GPT-2 family).

    Attributes
    ----------
    arch : {"llama", "gpt2"}
        Llama family: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.
        GPT-2 family: LayerNorm, learned positions, fused QKV projection, GELU (tanh) MLP.
    vocab_size, dim, n_layers, n_heads : int
        Vocabulary size, model width, number of blocks, number of query heads.
    n_kv_heads : int
        Key/value heads (``n_heads`` for plain multi-head attention; fewer for GQA). Must divide ``n_heads``.
    head_dim : int
        Width of one head (``dim // n_heads`` unless the checkpoint says otherwise).
    hidden_dim : int
        Inner width of the MLP.
    max_seq_len : int
        Longest sequence (prompt + generated) the model supports.
    norm_eps : float
        Epsilon of RMSNorm / LayerNorm.
    rope_theta : float
        Rotary base (Llama family only).
    rope_layout : {"adjacent", "halves"}
        Which pairs rotary rotates within a head: llama2.c rotates adjacent pairs ``(2i, 2i+1)``,
        Hugging Face rotates element ``i`` with ``i + head_dim/2``.
    tie_embeddings : bool
        The classifier shares the token-embedding matrix.
    attn_bias, mlp_bias : bool
        Llama family: biases on the q/k/v/o and MLP projections (GPT-2 always has biases).
    bos_id, eos_id : int
        Special token ids.
    stop_ids : list of int
        Tokens that end generation (llama2.c's ``run.c`` stops when the model emits BOS).
    causal : bool
        ``True``: causal self-attention (autoregressive decoders). ``False``: bidirectional attention over the
        whole (unpadded) sequence, as in masked-diffusion language models (LLaDA, Dream).
    mask_id : int
        The mask token of a diffusion language model (LLaDA: 126336); ``-1`` when the model has none.
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 0  # 0 -> n_heads
    head_dim: int = 0  # 0 -> dim // n_heads
    hidden_dim: int = 0  # 0 -> 4 * dim
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_layout: str = "adjacent"
    tie_embeddings: bool = True
    attn_bias: bool = False
    mlp_bias: bool = False
    bos_id: int = 1
    eos_id: int = 2
    stop_ids: list[int] = field(default_factory=list)
    causal: bool = True
    mask_id: int = -1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"config.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise UsageError(f"config.dim ({self.dim}) is not divisible by config.n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim == 0:
            self.hidden_dim = 4 * self.dim
        for name in ("n_kv_heads", "head_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"config.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise UsageError(
                f"config.n_heads ({self.n_heads}) must be a multiple of config.n_kv_heads ({self.n_kv_heads})"
            )
        if self.rope_layout not in ROPE_LAYOUTS:
            raise UsageError(f"config.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.arch == "llama" and self.head_dim % 2:
            raise UsageError(f"config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.arch == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise UsageError("config.n_kv_heads must equal config.n_heads for arch='gpt2'")
            if self.head_dim * self.n_heads != self.dim:
                raise UsageError("config.head_dim * config.n_heads must equal config.dim for arch='gpt2'")
        if not (self.norm_eps > 0):
            raise UsageError(f"config.norm_eps must be > 0, got {self.norm_eps!r}")
        self.stop_ids = [int(t) for t in self.stop_ids]
        if not isinstance(self.causal, bool):
            raise UsageError(f"config.causal must be a bool, got {self.causal!r}")
        if not isinstance(self.mask_id, int) or isinstance(self.mask_id, bool) or not -1 <= self.mask_id < \
                self.vocab_size:
            raise UsageError(f"config.mask_id must be -1 or a token id below vocab_size, got {self.mask_id!r}")

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values) for one token: ``n_kv_heads * head_dim``."""
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently lost)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown DecoderConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderConfig:
        return cls.from_dict(json.loads(text))
