"""A compact decoder-only transformer with an explicit KV cache (tensors in, tensors out, no hidden state).

One :class:`Decoder` class covers both families, chosen by ``config.arch``:

* ``"llama"``: blocks ``attn_norm`` (RMSNorm) -> ``attn.wq/wk/wv`` -> rotary -> attention -> ``attn.wo``,
  ``ffn_norm`` (RMSNorm) -> ``mlp.w1`` (gate), ``mlp.w3`` (up), ``mlp.w2`` (down); grouped-query attention.
* ``"gpt2"``: learned positions, blocks ``ln_1`` (LayerNorm) -> ``attn.c_attn`` (fused qkv) -> attention ->
  ``attn.c_proj``, ``ln_2`` -> ``mlp.c_fc`` -> ``mlp.act`` (GELU tanh) -> ``mlp.c_proj``.

Every norm and projection is a plain submodule called through its attribute, so ``decodekit.patch`` can swap
a norm and the Linears that consume it for fused modules without touching the forward code. Attention goes
through :func:`decodekit.models.attention.attend` (one place, with the ``use_kernels`` hook).

The forward signature is exactly the exported ONNX graph's (see ``decodekit.export``)::

    logits, presents = model(input_ids, position_ids, attention_mask, past_key_values)

Example
-------
>>> import torch
>>> from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
>>> from decodekit.models.decoder import Decoder
>>> cfg = DecoderConfig(arch="llama", vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2)
>>> model = Decoder(cfg).eval()
>>> ids = torch.tensor([[1, 5, 7]])
>>> logits, presents = model(ids, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.long))
>>> logits.shape, presents[0][0].shape
(torch.Size([1, 32]), torch.Size([1, 2, 3, 4]))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decodekit.errors import UsageError
from decodekit.models.attention import attend, attention_keep_mask
from decodekit.models.config import DecoderConfig
from decodekit.models.layers import GeluMLP, RMSNorm, SwiGLU, apply_rotary, rotary_cos_sin, rotary_inv_freq

KV = tuple[torch.Tensor, torch.Tensor]

_META_INIT_PARAMS = 50_000_000  # from_state_dict builds larger models on the meta device


def _concat_past(past: KV | None, k: torch.Tensor, v: torch.Tensor) -> KV:
    if past is None:
        return k, v
    return torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_layout = cfg.rope_layout
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attn_bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, dim] normed hidden states
        cos: torch.Tensor,  # [B, 1, S, D] from rotary_cos_sin
        sin: torch.Tensor,  # [B, 1, S, D]
        attention_mask: torch.Tensor,  # [B, P+S]
        keep: torch.Tensor | None,  # [B, 1, G*S, P+S] attention_keep_mask, shared by the layers
        past: KV | None,  # ([B, H_kv, P, D], [B, H_kv, P, D])
        use_kernels: bool,
    ) -> tuple[torch.Tensor, KV]:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, S, D]
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, self.rope_layout)
        k = apply_rotary(k, cos, sin, self.rope_layout)
        k, v = _concat_past(past, k, v)  # [B, H_kv, P+S, D]
        out = attend(q, k, v, attention_mask, scale=self.scale, use_kernels=use_kernels, keep=keep)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.wo(out), (k, v)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)

    def forward(self, x, cos, sin, attention_mask, keep, past, use_kernels):  # see LlamaAttention
        a, present = self.attn(self.attn_norm(x), cos, sin, attention_mask, keep, past, use_kernels)
        x = x + a
        x = x + self.mlp(self.ffn_norm(x))
        return x, present


class GPT2Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dim = cfg.n_heads, cfg.head_dim, cfg.dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, dim] normed hidden states
        attention_mask: torch.Tensor,  # [B, P+S]
        keep: torch.Tensor | None,  # [B, 1, S, P+S] attention_keep_mask, shared by the layers
        past: KV | None,
        use_kernels: bool,
    ) -> tuple[torch.Tensor, KV]:
        b, s, _ = x.shape
        qkv = self.c_attn(x).view(b, s, 3, self.n_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each [B, H, S, D]
        k, v = _concat_past(past, k, v)
        out = attend(q, k, v, attention_mask, scale=self.scale, use_kernels=use_kernels, keep=keep)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, self.dim)), (k, v)


class GPT2Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = GeluMLP(cfg.dim, cfg.hidden_dim)

    def forward(self, x, attention_mask, keep, past, use_kernels):  # see GPT2Attention
        a, present = self.attn(self.ln_1(x), attention_mask, keep, past, use_kernels)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class Decoder(nn.Module):
    """Decoder-only transformer (Llama or GPT-2 family) with an explicit KV cache.

    Parameters
    ----------
    config : DecoderConfig
        Architecture. Weights start random (normal, std 0.02; norms at 1); loaders overwrite them.
    use_kernels : bool
        Route attention through the fused-kernel hook (:func:`decodekit.models.attention.kernel_attend`).
    """

    def __init__(self, config: DecoderConfig, use_kernels: bool = False, *, _init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.use_kernels = use_kernels
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.arch == "gpt2":
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
            self.layers = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layers))
            self.norm: nn.Module = nn.LayerNorm(config.dim, eps=config.norm_eps)
        else:
            self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if _init:
            self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @classmethod
    def from_state_dict(
        cls,
        config: DecoderConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Decoder:
        """Build a model whose parameters are exactly ``state`` (names as in ``Decoder.state_dict()``).

        No random initialisation is spent: the module is built on the meta device and the tensors are
        assigned. With ``config.tie_embeddings`` the ``lm_head.weight`` entry may be omitted.
        """
        c = config
        approx_params = c.vocab_size * c.dim + c.n_layers * (4 * c.dim**2 + 3 * c.dim * c.hidden_dim)
        if approx_params > _META_INIT_PARAMS:
            with torch.device("meta"):  # no memory and no time spent on weights that are overwritten
                model = cls(config)
        else:  # small: plain construction is cheaper than the one-off import the meta device triggers
            model = cls(config, _init=False)
        state = dict(state)
        if config.tie_embeddings:
            state.setdefault("lm_head.weight", state["tok_embeddings.weight"])
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UsageError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in model.state_dict().items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise UsageError(
                    f"weight {name} has shape {tuple(state[name].shape)}, the config implies {tuple(tensor.shape)}"
                )
        model.load_state_dict(state, assign=True, strict=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_embeddings.weight
        return model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.tok_embeddings.weight.is_meta:
            return  # from_state_dict assigns the real tensors
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def empty_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> list[KV]:
        """A KV cache with ``P = 0``: ``n_layers`` pairs of ``[batch_size, H_kv, 0, D]`` tensors."""
        ref = self.tok_embeddings.weight
        shape = (batch_size, self.config.n_kv_heads, 0, self.config.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return [(make(), make()) for _ in range(self.config.n_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        position_ids: torch.Tensor,  # [B, S] int64, position of each new token (after left padding)
        attention_mask: torch.Tensor,  # [B, P+S], 1 = real token, 0 = left padding
        past_key_values: list[KV] | None = None,  # n_layers x ([B, H_kv, P, D], [B, H_kv, P, D]); None = P = 0
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Run ``S`` new tokens after ``P`` cached ones.

        Returns
        -------
        logits : Tensor
            ``[B, V]`` for the last position, or ``[B, S, V]`` with ``all_logits=True``.
        presents : list of (Tensor, Tensor)
            Per layer the updated keys and values, ``[B, H_kv, P+S, D]`` each (keys already rotated).
        """
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError(
                f"past_key_values must hold {self.config.n_layers} (key, value) pairs, got {len(past_key_values)}"
            )
        h = self.tok_embeddings(input_ids)  # [B, S, dim]
        presents: list[KV] = []
        # the causal + padding mask is built once here, not in every layer (the kernel path ignores it)
        group = self.config.n_heads // self.config.n_kv_heads
        causal = self.config.causal
        use_kernels = self.use_kernels and causal  # the fused attention kernels are causal: bidirectional -> reference
        keep = None if use_kernels else attention_keep_mask(attention_mask, input_ids.shape[1], group, causal)
        if self.config.arch == "gpt2":
            h = h + self.pos_embeddings(position_ids)
            for i, layer in enumerate(self.layers):
                past = None if past_key_values is None else past_key_values[i]
                h, present = layer(h, attention_mask, keep, past, use_kernels)
                presents.append(present)
        else:
            # fp32 frequencies computed here (not a buffer): model.half() must not round them
            inv_freq = rotary_inv_freq(self.config.head_dim, self.config.rope_theta, input_ids.device)
            cos, sin = rotary_cos_sin(position_ids, inv_freq, self.config.rope_layout)
            for i, layer in enumerate(self.layers):
                past = None if past_key_values is None else past_key_values[i]
                h, present = layer(h, cos, sin, attention_mask, keep, past, use_kernels)
                presents.append(present)
        if not all_logits:
            h = h[:, -1, :]  # only the last position feeds the next token: skip the classifier elsewhere
        logits = self.lm_head(self.norm(h))
        return logits, presents

