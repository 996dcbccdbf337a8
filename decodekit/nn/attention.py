"""decodekit attention inside models: Hugging Face's attention registry, ``patch_attention``, and the Decoder hook.

Hugging Face (transformers >= 5.19: tested at that floor and at the newest release). Importing this
module registers attention functions in ``transformers``' ``AttentionInterface`` (and the mask builder
:func:`causal_mask_or_none`, SDPA's masks, in ``AttentionMaskInterface``) under three names:

* ``"decodekit"``: the dispatch rule of :mod:`decodekit.ops._dispatch` (CUDA tensors -> Triton kernel, CPU
  tensors -> PyTorch), except that with ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (in
  Triton's interpreter, which is how the test suite exercises it);
* ``"decodekit_triton"`` and ``"decodekit_torch"``: that backend always.

So ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="decodekit")`` works after
``import decodekit.nn.attention``, and :func:`patch_attention` (also run by
``decodekit.patch(model, attention=True)``) switches an existing model's config to it and back.

Which calls reach the kernel: the mask builder returns no mask when the batch has no padding and the
causal pattern is implied (prefill of a full prompt, one-token decode steps): those calls run
:func:`decodekit.attention` (prefill) or :func:`decodekit.decode_attention` (one query token). A
call that carries a mask (padded batches, chunked prefill against a cache), attention dropout while
training, soft-capping, sliding windows, attention sinks or ``output_attentions`` falls back to
transformers' own SDPA function, so the result stays correct; :data:`FALLBACK_CALLS` counts those fallbacks.

decodekit's own :class:`~decodekit.models.Decoder` calls :func:`decodekit.ops.attention.decoder_attention`
when ``use_kernels`` is set (``patch_attention`` sets it).
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import nn

from decodekit.nn.swap import register_attention_patcher, swap
from decodekit.ops._dispatch import interpreter_enabled
from decodekit.ops.attention import attention, decode_attention

#: attn_implementation name -> decodekit backend
IMPLEMENTATIONS: dict[str, str] = {"decodekit": "auto", "decodekit_triton": "triton", "decodekit_torch": "torch"}
#: why calls went to transformers' SDPA function instead of decodekit (reason -> count)
FALLBACK_CALLS: collections.Counter[str] = collections.Counter()
PATCH_ATTR = "_decodekit_attention_patch"


def _backend(backend: str, device: torch.device) -> str:
    if backend == "auto" and device.type != "cuda" and interpreter_enabled():
        return "triton"
    return backend


def _fallback_reason(attention_mask: Any, dropout: float, kwargs: dict[str, Any]) -> str | None:
    if attention_mask is not None:
        return "attention_mask"
    if dropout and dropout > 0:
        return "dropout"
    for name in ("softcap", "sliding_window", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if kwargs.get("cache") is not None:
        return "paged cache"
    return None


def hf_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, S_q, D]
    key: torch.Tensor,  # [B, H_kv, S_k, D]
    value: torch.Tensor,  # [B, H_kv, S_k, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the ``sdpa_attention_forward`` contract) backed by decodekit.

    Returns ``([B, S_q, H, D] output, None)``. Without a mask, the causal pattern follows SDPA's: a single
    query sees every key (a decode step: :func:`decodekit.decode_attention` over the whole cache), and
    ``S_q > 1`` queries are causal aligned top-left (``q_offset = 0``), which is also right for a prefill
    into an empty static cache whose trailing keys are unused. Calls that need
    what the kernel does not do are forwarded to transformers' SDPA function (see the module docstring).
    """
    reason = _fallback_reason(attention_mask, dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        FALLBACK_CALLS[reason] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    backend = _backend(backend, query.device)
    b, s_q, s_k = query.shape[0], query.shape[2], key.shape[2]
    if s_q == 1 and s_k > 1:  # a decode step: split-K over the (dense) cache, all heads of a group together
        seqlens = torch.full((b,), s_k, dtype=torch.int32, device=query.device)
        out = decode_attention(query, key, value, seqlens, scaling, validate_lengths=False, backend=backend)
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = attention(query, key, value, causal=bool(causal) and s_q > 1, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _make_forward(backend: str):
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return hf_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, backend=backend, **kwargs
        )

    forward.__name__ = forward.__qualname__ = f"decodekit_attention_forward_{backend}"
    return forward


def causal_mask_or_none(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask builder registered for the decodekit implementations: transformers' ``sdpa_mask``, except that a
    plain causal pattern with no padding mask is skipped (None) under ``torch.compile`` as well.

    transformers skips that mask (and SDPA uses ``is_causal``) unless ``torch.compiler.is_exporting()`` is true,
    but dynamo in older torch reads that function as True while compiling (measured: True under torch 2.10, False
    under 2.13), so a compiled model always got a mask there and every attention call went to SDPA instead of the
    kernel. Skipped here: no ``attention_mask``, the causal mask function itself, no sliding window, an integer
    ``q_offset``, and one query (a decode step sees the whole cache) or as many keys as queries (a prefill). These
    are comparisons of sizes, which dynamo guards, so a compiled graph is never reused for sizes where the skip
    would be wrong.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if args:  # transformers passes keywords; anything else is its function's business
        return sdpa_mask(*args, **kwargs)
    q_length, kv_length, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    if (kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip", True)
            and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and kwargs.get("local_size") is None and not isinstance(q_offset, torch.Tensor)
            and isinstance(q_length, int | torch.SymInt) and (q_length == 1 or kv_length == q_length)):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Register the decodekit attention functions (and SDPA-style masks) with transformers; idempotent."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for name, backend in IMPLEMENTATIONS.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_forward(backend))
        if name not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, causal_mask_or_none)


try:  # transformers is an optional dependency (the "hf" extra)
    register()
except ImportError:  # pragma: no cover - depends on the environment
    pass


# --------------------------------------------------------------------------- patch / unpatch


def _attention_swaps(model: nn.Module, backend: str = "auto") -> list:
    """The attention patcher for :mod:`decodekit.nn.patch`: returns its :class:`~decodekit.nn.patch.Swap` s.

    Hugging Face models: every distinct config in the model gets ``_attn_implementation`` set to the
    decodekit name for ``backend``. decodekit ``Decoder``: ``use_kernels`` is set. Other models: nothing.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"patch_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if type(model).__name__ == "Decoder" and hasattr(model, "use_kernels"):
        return [swap(model, "use_kernels", True)]
    name = next(n for n, b in IMPLEMENTATIONS.items() if b == backend)
    register()
    swaps, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        swaps.append(swap(config, "_attn_implementation", name))
    return swaps


register_attention_patcher(_attention_swaps)


def patch_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make ``model`` compute attention with decodekit's kernels, in place; returns ``model``.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, Llama, ...): its
        config's ``attn_implementation`` becomes ``"decodekit"`` (or ``"decodekit_<backend>"``). A
        ``decodekit.models.Decoder``: ``use_kernels`` becomes True.
    backend : {"auto", "triton", "torch"}
        For Hugging Face models; the Decoder's kernels follow the device (and the interpreter) instead.

    Raises
    ------
    ValueError
        If the model is already attention-patched or has nothing to patch.

    Example
    -------
    >>> model = patch_attention(model)  # doctest: +SKIP
    >>> unpatch_attention(model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_attention: model must be an nn.Module, got {type(model).__name__}")
    if getattr(model, PATCH_ATTR, None) is not None:
        raise ValueError("patch_attention: model is already patched; call unpatch_attention(model) first")
    swaps = _attention_swaps(model, backend)
    if not swaps:
        raise ValueError(
            f"patch_attention: model ({type(model).__name__}) has no attention decodekit can switch; supported: "
            "Hugging Face models using the attention-function registry (GPT-2, Llama), decodekit.models.Decoder"
        )
    object.__setattr__(model, PATCH_ATTR, swaps)
    return model


def unpatch_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_attention` (restores the previous ``attn_implementation`` / ``use_kernels``)."""
    swaps = getattr(model, PATCH_ATTR, None)
    if swaps is None:
        raise ValueError("unpatch_attention: model is not patched by patch_attention")
    for s in reversed(swaps):
        setattr(s.parent, s.name, s.original)
    object.__delattr__(model, PATCH_ATTR)
    return model
