"""Loader for Hugging Face model directories on disk (``config.json`` + ``model.safetensors``), offline.

Supported architectures: ``GPT2LMHeadModel`` and ``LlamaForCausalLM``. The weights are renamed into the
:class:`~decodekit.models.decoder.Decoder` layout; GPT-2's ``Conv1D`` matrices (stored ``[in, out]``) are
transposed into ``nn.Linear`` layout. Llama checkpoints keep Hugging Face's rotary layout (``"halves"``),
so no q/k permutation is needed. Sharded checkpoints (``model.safetensors.index.json``) are read too.
``transformers`` is NOT needed: only ``safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM")


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else default


def _stop_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def read_hf_config(directory: str | os.PathLike) -> DecoderConfig:
    """Translate ``directory/config.json`` into a :class:`DecoderConfig` (UsageError if unsupported)."""
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{directory} is not a Hugging Face model directory: no config.json") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        got = ", ".join(archs) or f"model_type={hf.get('model_type')!r}"
        raise UsageError(f"unknown architecture {got} in {path}; supported: {', '.join(SUPPORTED)}")
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UsageError(f"GPT-2 activation_function {act!r} is not supported (only the tanh GELU)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if hf.get(flag):
                raise UsageError(f"GPT-2 option {flag}=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise UsageError("GPT-2 option scale_attn_weights=false is not supported")
        dim = hf["n_embd"]
        eos = _first_id(hf.get("eos_token_id"), 50256)
        return DecoderConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            hidden_dim=hf.get("n_inner") or 4 * dim, max_seq_len=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=True,
            bos_id=_first_id(hf.get("bos_token_id"), eos), eos_id=eos,
            stop_ids=_stop_ids(hf.get("eos_token_id")) or [eos],
        )
    # LlamaForCausalLM
    if hf.get("hidden_act", "silu") != "silu":
        raise UsageError(f"Llama hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UsageError(f"Llama rope scaling {rope_type!r} is not supported (only the default rotary embedding)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    eos = _first_id(hf.get("eos_token_id"), 2)
    return DecoderConfig(
        arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_layout="halves", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_id=_first_id(hf.get("bos_token_id"), 1), eos_id=eos, stop_ids=_stop_ids(hf.get("eos_token_id")) or [eos],
    )


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise UsageError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise UsageError(f"cannot read weights {f}: {e}") from None
    return state


def _rename_llama(hf: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
        "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2",
    }
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints saved the (recomputed) rotary buffer
        k = key.removeprefix("model.")
        if k == "embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif k in ("norm.weight", "lm_head.weight"):
            out[k] = t
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module not in names:
                raise UsageError(f"unexpected Llama weight {key}")
            out[f"layers.{i}.{names[module]}.{param}"] = t
        else:
            raise UsageError(f"unexpected Llama weight {key}")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _rename_gpt2(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        k = key.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the classifier is tied to wte
        if k == "wte.weight":
            out["tok_embeddings.weight"] = t
        elif k == "wpe.weight":
            out["pos_embeddings.weight"] = t
        elif k.startswith("ln_f."):
            out["norm." + k.split(".", 1)[1]] = t
        elif k.startswith("h."):
            _, i, rest = k.split(".", 2)
            if rest.endswith(".weight") and rest.split(".")[0] in ("attn", "mlp"):
                t = t.t()  # Conv1D stores [in, out]; nn.Linear wants [out, in]
            out[f"layers.{i}.{rest}"] = t
        else:
            raise UsageError(f"unexpected GPT-2 weight {key}")
    return out


def load_hf(
    directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Decoder:
    """Build a :class:`Decoder` from a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` directory."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    hf = _read_safetensors(directory)
    state = _rename_gpt2(hf) if cfg.arch == "gpt2" else _rename_llama(hf, cfg)
    state = {k: v.contiguous() for k, v in state.items()}
    return Decoder.from_state_dict(cfg, state, dtype=dtype, device=device)
