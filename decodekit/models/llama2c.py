"""Loader for llama2.c checkpoints (the legacy "version 0" ``.bin`` format of ``run.c``).

Layout (little-endian): a header of 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
max_seq_len`` (a negative ``vocab_size`` means an unshared classifier stored at the end), then fp32 arrays
back to back: token embedding, attention RMSNorm weights, wq, wk, wv, wo, FFN RMSNorm weights, w1, w2, w3,
final RMSNorm weight, two legacy RoPE tables (skipped: recomputed), and the optional classifier. Every
matrix is row-major ``[out_features, in_features]``, i.e. already ``nn.Linear.weight``'s layout.

The file size is checked against the size the header implies before anything is read, so a truncated
or padded file is a clear :class:`~decodekit.errors.UsageError`, never a garbage model; so are weights that
are NaN or infinite (a corrupt file with a plausible header).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder

HEADER = struct.Struct("<7i")
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export formats (version 1/2), not supported here


def read_llama2c_config(path: str | os.PathLike) -> tuple[DecoderConfig, bool, int]:
    """Parse and sanity-check the header of ``path``.

    Returns ``(config, shared_classifier, expected_file_size)``; raises :class:`UsageError` for a header
    that cannot describe a model, and for a file whose size differs from what the header implies.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UsageError(f"checkpoint {path} is truncated: {size} bytes, shorter than the 28-byte llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if dim == _MAGIC_V1:
        raise UsageError(f"checkpoint {path} uses llama2.c's versioned export format; only the legacy format is read")
    shared = vocab > 0
    vocab = abs(vocab)
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab, max_seq_len=seq_len)
    bad = [f"{k}={v}" for k, v in fields.items() if v <= 0 or v > 1 << 20]
    if bad or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise UsageError(f"{path} is not a llama2.c checkpoint: implausible header ({', '.join(bad) or fields})")
    hs = dim // n_heads
    kv_dim = n_kv_heads * hs
    n_floats = (
        vocab * dim  # token embedding
        + n_layers * dim  # attention norms
        + n_layers * dim * dim * 2  # wq, wo
        + n_layers * kv_dim * dim * 2  # wk, wv
        + n_layers * dim  # ffn norms
        + n_layers * hidden * dim * 3  # w1, w2, w3
        + dim  # final norm
        + seq_len * hs  # two legacy RoPE tables of [seq_len, hs/2]
        + (0 if shared else vocab * dim)
    )
    expected = HEADER.size + 4 * n_floats
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise UsageError(f"checkpoint {path} is {what}: the header implies {expected} bytes, the file has {size}")
    config = DecoderConfig(
        arch="llama", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=hs, hidden_dim=hidden, max_seq_len=seq_len, norm_eps=1e-5, rope_theta=10000.0,
        rope_layout="adjacent", tie_embeddings=shared, bos_id=1, eos_id=2, stop_ids=[1],
    )
    return config, shared, expected


def _check_finite(data: np.ndarray, path: str | os.PathLike, chunk: int = 1 << 24) -> None:
    """Refuse weights with NaN or infinity (a corrupt file with a plausible header): never a garbage model."""
    for start in range(0, data.size, chunk):
        part = data[start : start + chunk]
        if not np.isfinite(part).all():
            bad = start + int(np.argmin(np.isfinite(part)))
            raise UsageError(
                f"checkpoint {path} is corrupt: weight {bad} of {data.size} (byte {HEADER.size + 4 * bad}) is "
                f"{part[bad - start]}, not a finite number"
            )


def load_llama2c(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Decoder:
    """Build a :class:`Decoder` from a llama2.c checkpoint file (rotary layout ``"adjacent"``)."""
    config, shared, _ = read_llama2c_config(path)
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    _check_finite(data, path)
    c = config
    hs, kv_dim, L = c.head_dim, c.kv_dim, c.n_layers
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = int(np.prod(shape))
        out = torch.from_numpy(data[offset : offset + n].reshape(shape).copy())
        offset += n
        return out

    emb = take(c.vocab_size, c.dim)
    attn_norm = take(L, c.dim)
    wq, wk, wv, wo = take(L, c.dim, c.dim), take(L, kv_dim, c.dim), take(L, kv_dim, c.dim), take(L, c.dim, c.dim)
    ffn_norm = take(L, c.dim)
    w1, w2, w3 = take(L, c.hidden_dim, c.dim), take(L, c.dim, c.hidden_dim), take(L, c.hidden_dim, c.dim)
    final_norm = take(c.dim)
    offset += c.max_seq_len * hs  # legacy RoPE tables: recomputed from the positions instead
    classifier = emb if shared else take(c.vocab_size, c.dim)
    assert offset == data.size, (offset, data.size)  # guaranteed by the size check in read_llama2c_config

    state = {"tok_embeddings.weight": emb, "norm.weight": final_norm, "lm_head.weight": classifier}
    for i in range(L):
        p = f"layers.{i}."
        state.update({
            p + "attn_norm.weight": attn_norm[i], p + "ffn_norm.weight": ffn_norm[i],
            p + "attn.wq.weight": wq[i], p + "attn.wk.weight": wk[i], p + "attn.wv.weight": wv[i],
            p + "attn.wo.weight": wo[i],
            p + "mlp.w1.weight": w1[i], p + "mlp.w2.weight": w2[i], p + "mlp.w3.weight": w3[i],
        })
    return Decoder.from_state_dict(config, state, dtype=dtype, device=device)
