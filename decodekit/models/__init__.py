"""Decoder models with an explicit KV cache, their loaders, and tokenizers.

Public entry points (re-exported by ``decodekit``):

* :func:`load_model` -- a llama2.c checkpoint file, a GGUF file or a Hugging Face model directory -> :class:`Decoder`
* :func:`load_tokenizer` -- a ``tok*.bin``/``tokenizer.json``/GGUF file, or a directory holding one

Example
-------
>>> import torch, decodekit
>>> model = decodekit.load_model("../shared/models/stories260K/stories260K.bin")  # doctest: +SKIP
>>> tok = decodekit.load_tokenizer("../shared/models/stories260K/tok512.bin")  # doctest: +SKIP
>>> ids = torch.tensor([tok.encode("Once upon")])  # doctest: +SKIP
>>> pos, mask = torch.arange(ids.shape[1])[None], torch.ones_like(ids)  # doctest: +SKIP
>>> logits, presents = model(ids, pos, mask)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder
from decodekit.models.tokenizer import HFTokenizer, Llama2cTokenizer, Tokenizer, find_tokenizer_file, load_tokenizer

__all__ = [
    "Decoder",
    "DecoderConfig",
    "HFTokenizer",
    "Llama2cTokenizer",
    "Tokenizer",
    "find_tokenizer_file",
    "load_model",
    "load_tokenizer",
    "model_format",
    "read_hf_config_checked",
]


def model_format(path: str | os.PathLike) -> str:
    """``"hf"`` for a directory with ``config.json``, ``"gguf"`` for a file that starts with the GGUF magic bytes,
    ``"llama2c"`` for any other file; UsageError otherwise (also for a ``.gguf`` file that is not GGUF)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise UsageError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    if path.is_file():
        from decodekit.models.gguf import is_gguf

        if is_gguf(path):
            return "gguf"
        if path.suffix.lower() == ".gguf":
            raise UsageError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        return "llama2c"
    if os.path.lexists(path):
        raise UsageError(f"model {path} is not a regular file or directory (a device, pipe, socket or broken link)")
    raise UsageError(f"model {path} does not exist")


def read_hf_config_checked(directory: str | os.PathLike) -> DecoderConfig:
    """:func:`decodekit.models.hf.read_hf_config`, with a malformed ``config.json`` (not an object, a key missing
    or of the wrong type) reported as :class:`UsageError` naming the file, never as a raw ``KeyError``."""
    from decodekit.models.hf import read_hf_config

    where = Path(directory) / "config.json"
    try:
        return read_hf_config(directory)
    except UsageError:
        raise
    except KeyError as e:
        raise UsageError(f"{where} lacks {e.args[0]!r}, which this architecture needs") from None
    except AttributeError:
        raise UsageError(f"{where} must hold a JSON object with the model's settings") from None
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise UsageError(f"{where} has a malformed entry: {e}") from None


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
    use_kernels: bool = False,
) -> Decoder:
    """Load a decoder from a llama2.c checkpoint, a GGUF file or a Hugging Face model directory, offline.

    Parameters
    ----------
    path : path-like
        A llama2.c ``.bin`` checkpoint, a GGUF file of the ``llama`` architecture (F32/F16/Q8_0/Q4_0/Q4_1
        tensors, dequantized; see :mod:`decodekit.models.gguf`), or a directory with ``config.json`` +
        ``model.safetensors`` (``GPT2LMHeadModel`` or ``LlamaForCausalLM``).
    dtype, device
        Where the weights end up (loaded in fp32/checkpoint dtype, then converted).
    max_seq_len : int, optional
        Override the context length recorded in the config (GPT-2: at most its ``n_positions``).
    use_kernels : bool
        Attention through the fused-kernel hook (see :mod:`decodekit.models.attention`).

    Returns
    -------
    Decoder
        In eval mode. ``model.config`` is the :class:`DecoderConfig`.

    Raises
    ------
    UsageError
        Missing/truncated checkpoint, unsupported architecture, weights that do not match the config.
    """
    fmt = model_format(path)
    if fmt == "hf":
        from decodekit.models.hf import load_hf

        read_hf_config_checked(path)  # a malformed config.json: one clear UsageError before any weight is read
        model = load_hf(path, dtype=dtype, device=device)
    elif fmt == "gguf":
        from decodekit.models.gguf import load_gguf

        model = load_gguf(path, dtype=dtype, device=device)
    else:
        from decodekit.models.llama2c import load_llama2c

        model = load_llama2c(path, dtype=dtype, device=device)
    if max_seq_len is not None:
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise UsageError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if model.config.arch == "gpt2" and max_seq_len > model.pos_embeddings.num_embeddings:
            raise UsageError(
                f"max_seq_len={max_seq_len} exceeds the {model.pos_embeddings.num_embeddings} learned positions"
            )
        model.config.max_seq_len = max_seq_len
    model.use_kernels = use_kernels
    return model
