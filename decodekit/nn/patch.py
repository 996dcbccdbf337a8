"""``decodekit.patch(model)`` / ``decodekit.unpatch(model)``: swap fused modules into a model in place.

How it works, without editing any forward code: in each transformer block, a pre-norm (``ln_1``,
``input_layernorm``, ...) is replaced by ``nn.Identity`` and every Linear that consumes its output (the q/k/v
or fused qkv projection, the MLP input/gate/up projections) by a fused module (:mod:`decodekit.nn.modules`)
that carries the norm, sharing -- not copying -- the original parameters. When several Linears read one norm,
each fused module recomputes the row statistics itself, which costs far less than writing the normalized
activations out and reading them back. The residual stream never went through the norm, so it is unchanged.
GELU-before-Linear (GPT-2's MLP) becomes a :class:`GeluLinear`, and Llama's SiLU gate moves into the gate
projection's epilogue. The final norm + ``lm_head`` pair is fused too.

Supported: Hugging Face ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` and decodekit's own ``Decoder`` (both
families), recognised by block class and attribute names; blocks or norms of any other kind are left alone.

``unpatch`` puts the ORIGINAL module objects back (they are kept on the model in the private attribute
``_decodekit_patch``), so ``model.state_dict()`` and every module identity are exactly as before.

Extending: a patcher is ``fn(model, backend) -> list[Swap]`` that performs its swaps with :func:`swap` and
returns them. ``NORM_LINEAR_PATCHERS`` run for ``norm_linear=True`` and ``ATTENTION_PATCHERS`` for
``attention=True``; the attention kernels' module registers its patcher with
:func:`register_attention_patcher` (both live in :mod:`decodekit.nn.swap`, which imports nothing of decodekit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from decodekit.nn.modules import RMS_NORM_CLASSES, GeluLinear, LayerNormLinear, RMSNormLinear, _linear_layout
from decodekit.nn.swap import ATTENTION_PATCHERS, Patcher, Swap, swap

PATCH_ATTR = "_decodekit_patch"


@dataclass
class PatchRecord:
    """What :func:`patch` did to a model (kept on it as ``model._decodekit_patch``)."""

    swaps: list[Swap] = field(default_factory=list)
    norm_linear: bool = False
    attention: bool = False


#: patchers run by ``patch(norm_linear=True)``
NORM_LINEAR_PATCHERS: list[Patcher] = []


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition(".")
    return head, tail


# --------------------------------------------------------------------------- norm + linear rules


@dataclass(frozen=True)
class NormGroup:
    """A norm (``norm``, a path from the block) and the Linears that are its only consumers.

    ``gated`` maps a consumer to the activation module applied to its output alone (Llama's gate), which
    then moves into the fused epilogue. ``gelu_then`` is ``(gelu module path, Linear path)`` for a GELU whose
    output only feeds that Linear (GPT-2's MLP).
    """

    norm: str
    consumers: tuple[str, ...]
    gated: tuple[tuple[str, str], ...] = ()
    gelu_then: tuple[str, str] | None = None


#: block class name -> its norm groups (HF and decodekit blocks share names and attribute layout per family)
BLOCK_RULES: dict[str, tuple[NormGroup, ...]] = {
    "GPT2Block": (
        NormGroup("ln_1", ("attn.c_attn",)),
        NormGroup("ln_2", ("mlp.c_fc",), gelu_then=("mlp.act", "mlp.c_proj")),
    ),
    "LlamaDecoderLayer": (
        NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormGroup(
            "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), gated=(("mlp.gate_proj", "mlp.act_fn"),)
        ),
    ),
    "LlamaBlock": (  # decodekit: SwiGLU calls F.silu in its forward, so the gate is fused without the activation
        NormGroup("attn_norm", ("attn.wq", "attn.wk", "attn.wv")),
        NormGroup("ffn_norm", ("mlp.w1", "mlp.w3")),
    ),
}

#: model class name -> (final norm path, lm_head path)
FINAL_RULES: dict[str, tuple[str, str]] = {
    "GPT2LMHeadModel": ("transformer.ln_f", "lm_head"),
    "LlamaForCausalLM": ("model.norm", "lm_head"),
    "Decoder": ("norm", "lm_head"),
}


def _silu_like(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fuse_norm_linear(norm: nn.Module, linear: nn.Module, activation: str | None, backend: str) -> nn.Module | None:
    """A fused module for ``linear(norm(x))``, or None if this norm/linear kind is not supported."""
    try:
        _, k, _ = _linear_layout(linear, "patch")
    except ValueError:
        return None
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (k,):
            return None
        return LayerNormLinear.from_modules(norm, linear, activation=activation, backend=backend)
    if type(norm).__name__ in RMS_NORM_CLASSES:
        w = getattr(norm, "weight", None)
        if w is not None and tuple(w.shape) != (k,):
            return None
        return RMSNormLinear.from_modules(norm, linear, activation=activation, backend=backend)
    return None


def _patch_group(block: nn.Module, group: NormGroup, backend: str) -> list[Swap]:
    norm = _get(block, group.norm)
    if norm is None:
        return []
    gated = dict(group.gated)
    fused: dict[str, nn.Module] = {}
    for path in group.consumers:
        linear = _get(block, path)
        act_path = gated.get(path)
        act_mod = _get(block, act_path) if act_path else None
        activation = "silu" if act_mod is not None and _silu_like(act_mod) else None
        module = None if linear is None else _fuse_norm_linear(norm, linear, activation, backend)
        if module is None:
            return []  # all consumers fused or none: the norm can only go if nobody needs its output
        fused[path] = module
    swaps = []
    for path, module in fused.items():
        head, tail = _split(path)
        swaps.append(swap(_get(block, head) if head else block, tail, module))
        act_path = gated.get(path)
        if act_path and module.activation is not None:
            a_head, a_tail = _split(act_path)
            swaps.append(swap(_get(block, a_head) if a_head else block, a_tail, nn.Identity()))
    n_head, n_tail = _split(group.norm)
    swaps.append(swap(_get(block, n_head) if n_head else block, n_tail, nn.Identity()))
    if group.gelu_then is not None:
        swaps += _patch_gelu_linear(block, *group.gelu_then, backend)
    return swaps


def _patch_gelu_linear(block: nn.Module, act_path: str, linear_path: str, backend: str) -> list[Swap]:
    act, linear = _get(block, act_path), _get(block, linear_path)
    if act is None or linear is None:
        return []
    try:
        fused = GeluLinear.from_modules(act, linear, backend=backend)
    except ValueError:
        return []  # not a GELU (e.g. a config with another activation) or not a Linear
    a_head, a_tail = _split(act_path)
    l_head, l_tail = _split(linear_path)
    return [
        swap(_get(block, l_head) if l_head else block, l_tail, fused),
        swap(_get(block, a_head) if a_head else block, a_tail, nn.Identity()),
    ]


def _patch_blocks(model: nn.Module, backend: str) -> list[Swap]:
    swaps: list[Swap] = []
    for block in list(model.modules()):
        for group in BLOCK_RULES.get(type(block).__name__, ()):
            swaps += _patch_group(block, group, backend)
    return swaps


def _patch_final(model: nn.Module, backend: str) -> list[Swap]:
    rule = FINAL_RULES.get(type(model).__name__)
    if rule is None:
        return []
    norm_path, head_path = rule
    norm, head = _get(model, norm_path), _get(model, head_path)
    if norm is None or head is None:
        return []
    fused = _fuse_norm_linear(norm, head, None, backend)
    if fused is None:
        return []
    h_head, h_tail = _split(head_path)
    n_head, n_tail = _split(norm_path)
    return [
        swap(_get(model, h_head) if h_head else model, h_tail, fused),
        swap(_get(model, n_head) if n_head else model, n_tail, nn.Identity()),
    ]


NORM_LINEAR_PATCHERS += [_patch_blocks, _patch_final]


# --------------------------------------------------------------------------- public API


def patch(model: nn.Module, norm_linear: bool = True, attention: bool = True, *, backend: str = "auto") -> nn.Module:
    """Swap decodekit's fused ops into ``model`` in place and return it.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face ``GPT2LMHeadModel`` or ``LlamaForCausalLM``, or a ``decodekit.models.Decoder``.
    norm_linear : bool
        Fuse every pre-norm with the Linears that consume it (q/k/v or c_attn; gate/up or c_fc; the final
        norm with ``lm_head``), GPT-2's MLP GELU with ``c_proj``, and Llama's SiLU gate into the gate
        projection.
    attention : bool
        Run the registered attention patchers (``ATTENTION_PATCHERS``): decodekit's attention kernels
        (:func:`decodekit.nn.attention.patch_attention`) switch a Hugging Face model's
        ``attn_implementation`` to ``"decodekit"`` and set a ``Decoder``'s ``use_kernels``.
    backend : "auto", "triton" or "torch"
        Backend of the fused modules ("auto": Triton on CUDA tensors, PyTorch on CPU).

    Returns
    -------
    The same ``model`` object, patched. Parameters are shared, not copied: training, ``.to()``,
    ``load_state_dict`` keep working, and :func:`unpatch` restores the original modules exactly.

    Notes
    -----
    Logits match the unpatched model within rounding (the fused kernel rounds once where eager code rounds
    twice). While patched, the model's state_dict keys differ (the norms' parameters appear under the fused
    modules) and a base model's ``last_hidden_state`` is the pre-final-norm hidden state (the final norm
    now lives inside ``lm_head``); unpatch before saving a checkpoint.

    Raises
    ------
    ValueError
        If ``model`` is already patched, or nothing in it is supported.

    Example
    -------
    >>> model = decodekit.patch(model)  # doctest: +SKIP
    >>> logits = model(input_ids).logits  # doctest: +SKIP
    >>> decodekit.unpatch(model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    if getattr(model, PATCH_ATTR, None) is not None:
        raise ValueError("patch: model is already patched; call decodekit.unpatch(model) first")
    record = PatchRecord(norm_linear=norm_linear, attention=attention)
    try:
        if norm_linear:
            for patcher in NORM_LINEAR_PATCHERS:
                record.swaps += patcher(model, backend)
        if attention:
            import decodekit.nn.attention  # noqa: F401 - registers the attention kernels' patcher

            for patcher in ATTENTION_PATCHERS:
                record.swaps += patcher(model, backend)
    except BaseException:
        _restore(record.swaps)
        raise
    if not record.swaps and (norm_linear or (attention and ATTENTION_PATCHERS)):
        raise ValueError(
            f"patch: model ({type(model).__name__}) has nothing decodekit can fuse; supported: "
            "GPT2LMHeadModel, LlamaForCausalLM, decodekit.models.Decoder"
        )
    object.__setattr__(model, PATCH_ATTR, record)
    return model


def _restore(swaps: list[Swap]) -> None:
    for s in reversed(swaps):
        setattr(s.parent, s.name, s.original)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: put every original module object back, in reverse order; return ``model``.

    Raises ``ValueError`` if ``model`` is not patched.
    """
    record = getattr(model, PATCH_ATTR, None)
    if record is None:
        raise ValueError("unpatch: model is not patched by decodekit.patch")
    _restore(record.swaps)
    object.__delattr__(model, PATCH_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """True while ``model`` carries a :func:`patch` record."""
    return getattr(model, PATCH_ATTR, None) is not None
