"""Loader for GGUF files (llama.cpp's format), offline: the decoder, its tokenizer and its 4-bit blocks.

The file is read with the ``gguf`` package (``gguf.GGUFReader``, a memory map: opening a 100 MB file costs about a
second and no copy) and every tensor is dequantized with ``gguf.quants.dequantize``; nothing here parses GGUF
bytes by hand except the two 4-bit block layouts that :func:`read_int4_blocks` repacks for ONNX Runtime.

Supported: ``general.architecture = llama`` (Llama, SmolLM, TinyLlama, ... : RMSNorm, rotary positions, GQA,
SwiGLU) with tensors in F32, F16, Q8_0, Q4_0 or Q4_1. Anything else is one :class:`UsageError` line naming what
is not supported (the architecture, the tensor type, a rope scaling, an unexpected tensor).

Weight layout: llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` within each head so that its
rotary kernel can rotate adjacent pairs; the permutation is undone here, so the decoder uses Hugging Face's
``"halves"`` rotary layout and its KV cache holds exactly what transformers' would hold.

Tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE with merges) is rebuilt with the ``tokenizers``
library from the vocabulary, the merges, the token types (control tokens become special tokens) and the
pre-tokenizer named by ``tokenizer.ggml.pre``; the chat template, BOS/EOS/end-of-turn ids and whether BOS is
added come from the file too (see :func:`gguf_tokenizer_json`; :func:`decodekit.models.load_tokenizer` wraps it).

Example
-------
>>> from decodekit.models import load_tokenizer
>>> from decodekit.models.gguf import load_gguf
>>> model = load_gguf("../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> tok = load_tokenizer("../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
'<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n...'
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder

MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
#: the tensor types kept as 4-bit blocks by the int4 export (block size 32, see read_int4_blocks)
INT4_TYPES = ("Q4_0", "Q4_1")
INT4_BLOCK = 32

# GGUF tensor name (after "blk.{i}.") -> decodekit Decoder parameter (after "layers.{i}.")
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_gate.weight": "mlp.w1.weight",
    "ffn_up.weight": "mlp.w3.weight",
    "ffn_down.weight": "mlp.w2.weight",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}

# The pre-tokenizers of byte-level BPE vocabularies, by ``tokenizer.ggml.pre`` (llama.cpp's names): the regular
# expression text is split with before the bytes are mapped, as llama.cpp's llama-vocab.cpp splits it. "gpt2" is
# GPT-2's own expression (the ByteLevel pre-tokenizer's default); "digits+gpt2" splits every digit apart first
# (StarCoder, SmolLM, ...: also what SmolLM2's own tokenizer.json does). transformers' GGUF loader (5.x) applies
# GPT-2's expression alone for "smollm", so whitespace before a digit ("x  42") tokenizes differently there.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "command-r": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "exaone": "digits+gpt2",
    "minerva-7b": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class GGUFFile:
    """An opened GGUF file: metadata values by key and tensors by name (memory-mapped, read lazily).

    Raises :class:`UsageError` naming the file when it is not a readable GGUF file (bad magic, truncated).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UsageError(f"cannot read model {self.path}: {e.strerror or e}") from None
        if magic != MAGIC:
            raise UsageError(f"{self.path} is not a GGUF file (it does not start with b'GGUF')")
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/IndexError/struct errors on bad files
            raise UsageError(f"cannot read GGUF file {self.path} (truncated or corrupt?): {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (a str, a number, a list), or ``default``."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001 - a malformed field
            raise UsageError(f"{self.path}: cannot read metadata {key}: {e}") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UsageError(f"{self.path} lacks the metadata key {key!r}, which a {self.arch} model needs")
        return value

    @property
    def arch(self) -> str:
        return str(self.get("general.architecture", "<missing general.architecture>"))

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 array in PyTorch order (``[out, in]`` for a matrix)."""
        import gguf

        t = self.tensors[name]
        try:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - data cut short by a truncated file
            raise UsageError(f"cannot read tensor {name} of {self.path} (truncated or corrupt?): {e}") from None


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A :class:`GGUFFile`, shared by the config, weight and tokenizer readers while the file is unchanged."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise UsageError(f"cannot read model {p}: {e.strerror or e}") from None
    return _open_cached(str(p.absolute()), st.st_size, st.st_mtime_ns)


def _check_arch(g: GGUFFile) -> str:
    arch = g.arch
    if arch not in SUPPORTED_ARCHS:
        raise UsageError(f"GGUF architecture {arch!r} of {g.path} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHS)}")
    return arch


def _int(g: GGUFFile, key: str, default: int | None = None) -> int:
    value = g.get(key, default) if default is not None else g.require(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{g.path}: metadata {key} must be an integer, got {value!r}")
    return int(value)


def read_gguf_config(path: str | os.PathLike) -> DecoderConfig:
    """The :class:`DecoderConfig` of a GGUF file (metadata only; no tensor is read).

    Raises
    ------
    UsageError
        Not a GGUF file, an architecture other than ``llama``, a rope scaling or partial rotary, a tensor type
        outside F32/F16/Q8_0/Q4_0/Q4_1, or missing metadata.
    """
    g = open_gguf(path)
    arch = _check_arch(g)
    bad = sorted({t.tensor_type.name for t in g.tensors.values()} - set(SUPPORTED_TYPES))
    if bad:
        names = [n for n, t in g.tensors.items() if t.tensor_type.name in bad]
        raise UsageError(f"GGUF tensor type {', '.join(bad)} (e.g. {names[0]}) in {g.path} is not supported; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    scaling = g.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UsageError(f"rope scaling {scaling!r} in {g.path} is not supported (only the plain rotary embedding)")
    if "rope_freqs.weight" in g.tensors:
        raise UsageError(f"{g.path} has rope_freqs.weight (Llama 3.1 rope scaling), which is not supported")
    dim = _int(g, f"{arch}.embedding_length")
    n_heads = _int(g, f"{arch}.attention.head_count")
    n_kv = _int(g, f"{arch}.attention.head_count_kv", n_heads)
    head_dim = _int(g, f"{arch}.attention.key_length", dim // n_heads if n_heads else 1)
    rot = _int(g, f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise UsageError(f"{g.path} rotates {rot} of {head_dim} dimensions per head (partial rotary): not supported")
    if "token_embd.weight" not in g.tensors:
        raise UsageError(f"{g.path} has no token_embd.weight tensor")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = _int(g, f"{arch}.vocab_size", len(tokens) if tokens else int(g.tensors["token_embd.weight"].shape[-1]))
    eos = _int(g, "tokenizer.ggml.eos_token_id", 2)
    stop = [eos]
    eot = g.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, (int, np.integer)) and int(eot) not in stop:
        stop.append(int(eot))
    eps = g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    theta = g.get(f"{arch}.rope.freq_base", 10000.0)
    # eps is stored as float32 (9.999999747378752e-06): the nearest decimal with 7 digits is what was meant
    eps = float(f"{float(eps):.7g}")
    return DecoderConfig(
        arch="llama", vocab_size=vocab, dim=dim, n_layers=_int(g, f"{arch}.block_count"), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=_int(g, f"{arch}.feed_forward_length"),
        max_seq_len=_int(g, f"{arch}.context_length", 2048), norm_eps=eps, rope_theta=float(theta),
        rope_layout="halves", tie_embeddings="output.weight" not in g.tensors, attn_bias=False, mlp_bias=False,
        bos_id=_int(g, "tokenizer.ggml.bos_token_id", 1), eos_id=eos, stop_ids=stop,
    )


def decoder_name(gguf_name: str) -> str | None:
    """The :class:`Decoder` parameter a GGUF tensor becomes (``blk.3.attn_q.weight`` -> ``layers.3.attn.wq.weight``),
    or None for a name decodekit does not know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _rope_heads(gguf_name: str, cfg: DecoderConfig) -> int | None:
    """Heads whose rows llama.cpp permuted for ``gguf_name`` (q: n_heads, k: n_kv_heads), else None."""
    if gguf_name.endswith(".attn_q.weight"):
        return cfg.n_heads
    if gguf_name.endswith(".attn_k.weight"):
        return cfg.n_kv_heads
    return None


def unpermute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection (any trailing shape: values or 4-bit blocks).

    Within each head llama.cpp stores row ``2i`` / ``2i+1`` where Hugging Face has row ``i`` / ``i + D/2``.
    """
    rows = a.shape[0]
    if rows % (2 * n_heads):
        raise UsageError(f"a rotary projection of {rows} rows cannot hold {n_heads} heads of even size")
    half = rows // n_heads // 2
    return np.ascontiguousarray(a.reshape(n_heads, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


def read_gguf_state(path: str | os.PathLike, cfg: DecoderConfig | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32 and renamed into the :class:`Decoder` layout."""
    g = open_gguf(path)
    cfg = cfg or read_gguf_config(path)
    state: dict[str, torch.Tensor] = {}
    for name in g.tensors:
        target = decoder_name(name)
        if target is None:
            raise UsageError(f"unexpected tensor {name} in GGUF file {g.path} (architecture {g.arch})")
        a = g.dequantize(name)
        heads = _rope_heads(name, cfg)
        if heads is not None:
            a = unpermute_rows(a, heads)
        a = np.ascontiguousarray(a)
        state[target] = torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 tensors map the file read-only
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Decoder:
    """Build a :class:`Decoder` from a GGUF file, every tensor dequantized (to float32, then ``dtype``)."""
    cfg = read_gguf_config(path)
    return Decoder.from_state_dict(cfg, read_gguf_state(path, cfg), dtype=dtype, device=device)


@dataclass
class Int4Blocks:
    """One GGUF Q4_0/Q4_1 matrix ``W [N, K]`` in ONNX Runtime's ``com.microsoft::MatMulNBits`` layout.

    ``W[n, k] = (code[n, k] - zero_points[n, k // 32]) * scales[n, k // 32]`` where ``code`` is the 4-bit value
    packed two to a byte, low nibble first along ``K`` (``packed [N, K/32, 16] uint8``). ``zero_points`` is None
    for Q4_0 (the operator's default 8, exactly Q4_0's offset); for Q4_1 (``W = code * d + m``) it is the float
    ``-m / d`` per block (the block's minimum expressed as a zero point), and ``mins`` holds ``m`` itself (the
    int4 export adds the minimums apart: ONNX Runtime's fast kernel takes uint8 zero points only).
    """

    gguf_type: str
    packed: np.ndarray  # [N, K/32, 16] uint8
    scales: np.ndarray  # [N, K/32] float32
    zero_points: np.ndarray | None  # [N, K/32] float32, or None (= 8)
    mins: np.ndarray | None = None  # [N, K/32] float32: Q4_1's m itself (the int4 export adds it apart)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * INT4_BLOCK

    def dequantize(self) -> np.ndarray:
        """``W [N, K]`` float32, computed as MatMulNBits does (for tests)."""
        lo, hi = self.packed & 0x0F, self.packed >> 4
        code = np.stack([lo, hi], axis=-1).reshape(*self.packed.shape[:2], INT4_BLOCK).astype(np.float32)
        zp = 8.0 if self.zero_points is None else self.zero_points[..., None]
        return ((code - zp) * self.scales[..., None]).reshape(self.shape)


def _repack(raw: np.ndarray, gguf_type: str) -> Int4Blocks | None:
    """GGUF blocks (``raw [N, K/32 * bytes_per_block] uint8``) -> :class:`Int4Blocks`, or None when a Q4_1 block
    cannot be written with a zero point (scale 0 with a non-zero minimum)."""
    n = raw.shape[0]
    head = 4 if gguf_type == "Q4_1" else 2  # fp16 d (+ fp16 m), then 16 bytes of codes
    blocks = raw.reshape(n, -1, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    qs = blocks[..., head:]  # [N, K/32, 16]: byte j holds code j (low nibble) and code j + 16 (high nibble)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, K/32, 32] in K order
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: low nibble = even k
    if gguf_type == "Q4_0":
        return Int4Blocks(gguf_type, packed, d, None)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    if np.any((d == 0) & (m != 0)):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(d == 0, 0.0, -m / d).astype(np.float32)
    return Int4Blocks(gguf_type, packed, d, zp, m)


def read_int4_blocks(path: str | os.PathLike, cfg: DecoderConfig | None = None) -> dict[str, Int4Blocks]:
    """The Q4_0 / Q4_1 matrices of a GGUF file as MatMulNBits blocks, keyed by :class:`Decoder` parameter name.

    Only projection matrices (``K`` a multiple of 32) are returned; the embedding is never one (a Gather reads
    it). Q/K projections get the same row un-permutation as :func:`read_gguf_state`, so ``blocks.dequantize()``
    equals the dequantized parameter up to float rounding of the zero point. A Q4_1 matrix with a block of
    scale 0 and a non-zero minimum is left out (it stays dequantized in the export).
    """
    g = open_gguf(path)
    cfg = cfg or read_gguf_config(path)
    out: dict[str, Int4Blocks] = {}
    for name, t in g.tensors.items():
        kind = t.tensor_type.name
        target = decoder_name(name)
        if kind not in INT4_TYPES or target is None or target == "tok_embeddings.weight":
            continue
        raw = np.asarray(t.data)
        if raw.ndim != 2:
            continue
        blocks = _repack(raw, kind)
        if blocks is None:
            continue
        heads = _rope_heads(name, cfg)
        if heads is not None:
            blocks.packed = unpermute_rows(blocks.packed, heads)
            blocks.scales = unpermute_rows(blocks.scales, heads)
            if blocks.zero_points is not None:
                blocks.zero_points = unpermute_rows(blocks.zero_points, heads)
            if blocks.mins is not None:
                blocks.mins = unpermute_rows(blocks.mins, heads)
        out[target] = blocks
    return out


def _pre_tokenizer(kind: str, where: Path) -> Any:
    from tokenizers import Regex, pre_tokenizers

    split = _PRE_TOKENIZERS.get(kind)
    if split is None:
        raise UsageError(f"GGUF pre-tokenizer {kind!r} (tokenizer.ggml.pre) of {where} is not supported; supported: "
                         f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_tokenizer_json(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(tokenizer.json text, info)`` of the file's byte-level BPE tokenizer, built with ``tokenizers``.

    ``info``: ``bos_id``, ``eos_id``, ``eot_id`` (None when the file names none), ``add_bos`` and
    ``chat_template`` (None when the file has none).
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models
    except ImportError as e:  # pragma: no cover - a dependency of the hf extra
        raise UsageError("a GGUF tokenizer needs the 'tokenizers' package (pip install tokenizers)") from e
    g = open_gguf(path)
    kind = g.get("tokenizer.ggml.model")
    if kind is None:
        raise UsageError(f"{g.path} holds no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise UsageError(f"GGUF tokenizer model {kind!r} of {g.path} is not supported; supported: gpt2 "
                         "(byte-level BPE)")
    tokens = g.require("tokenizer.ggml.tokens")
    merges = g.require("tokenizer.ggml.merges")
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _pre_tokenizer(str(g.get("tokenizer.ggml.pre", "default")), g.path)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise UsageError(f"{g.path}: tokenizer.ggml.merges holds {m!r}, not two tokens separated by a space")
        pairs.append((a, b))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # noqa: BLE001 - a merge naming an unknown token
        raise UsageError(f"{g.path}: the tokenizer's merges do not fit its vocabulary: {e}") from None
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>, ...) are matched whole and dropped by decode(skip_special_tokens=True);
    # user-defined ones are matched whole and kept
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    eot = g.get("tokenizer.ggml.eot_token_id")
    info = {
        "bos_id": _int(g, "tokenizer.ggml.bos_token_id", 1),
        "eos_id": _int(g, "tokenizer.ggml.eos_token_id", 2),
        "eot_id": int(eot) if isinstance(eot, (int, np.integer)) else None,
        "add_bos": bool(g.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": g.get("tokenizer.chat_template"),
    }
    return tok.to_str(), info
