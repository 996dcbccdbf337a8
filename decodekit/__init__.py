"""decodekit: fused Triton kernels, ONNX export and an IO-binding ONNX Runtime decoder.

Public names are imported lazily, so ``import decodekit`` stays cheap and the export and
runtime layers never import Triton or touch a GPU unless a kernel is actually used.

Example
-------
>>> import torch, decodekit
>>> logits = torch.randn(4, 32000)
>>> tokens = decodekit.sample(logits, temperature=0.8, top_k=40, top_p=0.95, seed=0)
>>> tokens.shape
torch.Size([4])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # sampling (ops/sampling/)
    "sample": "decodekit.ops.sampling",
    "sampling_probs": "decodekit.ops.sampling",
    "sample_logits": "decodekit.ops.sampling",
    "sampler_simple_batch": "decodekit.ops.sampling",
    "beam_candidates": "decodekit.ops.sampling",
    # diffusion-LM block sampling and the rwkv package's sampler (issue 14)
    "sample_block": "decodekit.ops.sampling",
    "select_positions": "decodekit.ops.sampling",
    "transfer_schedule": "decodekit.ops.sampling",
    "rwkv_sample_logits": "decodekit.ops.sampling",
    "rwkv_sampling_probs": "decodekit.ops.sampling",
    # fused norm + linear (ops/norm_linear/)
    "layer_norm_linear": "decodekit.ops.norm_linear",
    "rms_norm_linear": "decodekit.ops.norm_linear",
    "gelu_linear": "decodekit.ops.norm_linear",
    # attention (ops/attention/)
    "attention": "decodekit.ops.attention",
    "decode_attention": "decodekit.ops.attention",
    # drop-in replacement (nn/patch.py)
    "patch": "decodekit.nn.patch",
    "unpatch": "decodekit.nn.patch",
    # models, export, runtime
    "load_model": "decodekit.models",
    "load_tokenizer": "decodekit.models",
    "export_decoder": "decodekit.export",
    "OnnxDecoder": "decodekit.runtime",
    "generate": "decodekit.runtime",
    "chat": "decodekit.runtime",
    "GenerationConfig": "decodekit.runtime",
    "diffusion_generate": "decodekit.runtime.diffusion",
    "DiffusionSampling": "decodekit.runtime.config",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'decodekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
