"""Drop-in fused modules and the model patcher.

* :class:`LayerNormLinear`, :class:`RMSNormLinear`, :class:`GeluLinear` -- ``nn.Module``s over the fused
  norm + Linear kernels, with ``from_modules(norm, linear)`` sharing existing parameters.
* :func:`patch` / :func:`unpatch` -- swap them into Hugging Face GPT-2 / Llama models and decodekit's
  ``Decoder`` in place, and restore the original modules exactly.
"""

from decodekit.nn.modules import GeluLinear, LayerNormLinear, RMSNormLinear
from decodekit.nn.patch import is_patched, patch, unpatch
from decodekit.nn.swap import register_attention_patcher

__all__ = [
    "GeluLinear",
    "LayerNormLinear",
    "RMSNormLinear",
    "is_patched",
    "patch",
    "register_attention_patcher",
    "unpatch",
]
