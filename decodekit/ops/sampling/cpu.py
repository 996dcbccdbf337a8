"""Fast PyTorch path of the sampler (what CPU tensors get with ``backend="auto"``).

Same semantics and the same random stream as the Triton kernels in :mod:`decodekit.ops.sampling`, without
ever sorting the vocabulary, and with as few full-row passes as the filters allow:

* **Candidates by a two-level selection.** A row of V tokens is viewed as ``V / 64`` blocks; one ``amax`` pass
  gives the block maxima (and with them the row max and the NaN / ``+inf`` / all ``-inf`` check), ``topk`` over
  the block maxima picks the ``Kb`` best blocks, and only their tokens are gathered and ranked. Every token
  above the ``Kb``-th block max ``t`` is in a picked block, so the ranked candidates ``>= t`` are an exact
  prefix of the row's descending order (at least ``Kb`` of them). ``torch.topk`` over the whole row costs
  ~15x more on CPU: it copies and partially sorts all V values. Blocks are copied as 64-value rows
  (``index_select``), and values below ``t`` are set to ``-inf`` before ranking (``topk`` is ~2x faster then).
  ``Kb`` (k + 1 for top-k rows, min(512, blocks / 4) for top-p alone) doubles only for the rows whose cut is
  not inside their prefix yet, up to every block; only then is a row ranked whole. Small rows (V <= 2048)
  start from their top max(64, k + 1) tokens instead.
* **Temperature only on candidates.** T > 0 is monotone, so the order of ``logits / T`` is the order of the
  logits; the division (the same fp32 ``x / T`` as the kernel) runs on the candidates.
* **No full softmax unless the semantics need one.** Top-k cuts, top-p after top-k (Hugging Face order:
  renormalized over the top-k set), min-p (``exp(z - max) >= min_p``) and the log-probabilities only need the
  candidates' ``exp(z - max)``. Only top-p without top-k (or the TTS rule, whose top-p runs on the
  un-renormalized probabilities) needs the row normalizer: one ``softmax`` pass.
* **Penalties only at seen tokens.** The nonzero ``token_counts`` are found block-wise (``aminmax`` over blocks,
  then ``nonzero`` inside the few blocks that hold a count), and only those logits of an fp32 copy are changed
  (the caller's tensor is never modified).
* **The draw** is the exponential race (Gumbel-max) ``argmax z_i - log(-log u_i)`` over the kept tokens only,
  with ``u_i`` the uniforms of Triton's ``tl.rand(seed, (row_key << 32) | token)`` (Philox-4x32, 10 rounds, the
  same uint32 -> float conversion): :func:`philox_uniform` in torch, and on CPU the same counters in NumPy
  ``uint64`` arithmetic, or for up to 256 counters as 64-bit lanes of Python big integers (a round is then a
  dozen integer operations): the draw runs on a few hundred values, where per-op overhead is everything. Hence the same seed gives the same token on CPU and on GPU (up
  to float rounding of ``log`` in a near-tie of two race keys, an event of probability ~1e-7 per draw).

* **Small rows in NumPy.** With V <= 2048 and scalar parameters (every small-vocabulary decoder: TTS codebooks,
  toy LLMs) the candidates, the cut and the race run as NumPy ufuncs on a few dozen values
  (:func:`_small_kept`): there a torch op is mostly dispatch (~3 us), a ufunc ~1 us, and the call drops from
  ~195 to ~120 us at B = 1, V = 512 on this project's CPU.
* **Wide top-p without a sort.** When top-p alone keeps most of a flat row (a random or high-temperature model),
  a weighted value histogram finds the bin holding the cut and only that window is ranked
  (:func:`_topp_window`), instead of ranking rounds that end in a full ``topk`` of V values.

Python scalars stay Python numbers all the way (no ``[B]`` tensors, no per-parameter reductions).
"""

from __future__ import annotations

import functools
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_U32_TO_FLOAT = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit case
_FLT_MAX = 3.4028234663852886e38
_NEG_BIG = -3.0e38  # race keys of kept tokens never fall below this (a uniform of exactly 0 gives -inf)

_BLOCK = 64  # tokens per block of the two-level candidate selection
_SORT_V = 2048  # rows up to this many tokens are sorted whole
_KB_TOPP = 512  # first-round blocks for rows whose cut is set by top-p alone (a few hundred tokens typically)
_KB_MIN = 64  # first-round blocks otherwise (top-k rows get k + 1)
_LITTLE_ENDIAN = sys.byteorder == "little"

Scalar = float | int
Param = float | int | torch.Tensor


# --------------------------------------------------------------------------- random numbers


def philox_uniform(seed: torch.Tensor, row_key: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) equal to Triton's ``tl.rand(seed, (row_key << 32) | token)``.

    All arguments are int64 tensors of the same shape (``token`` and ``row_key`` below 2**32). Triton splits
    the 64-bit offset into the Philox counters ``c0 = low 32 bits``, ``c1 = high 32 bits`` (``c2 = c3 = 0``)
    and the seed into the key ``(k0, k1) = (low, high)``; uint32 arithmetic is emulated in int64 (products of
    two 32-bit values wrap modulo 2**64, whose low 64 bits are exact, so the masked high/low words are too).
    """
    c0 = token & _M32
    c1 = row_key & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(10):
        prod_b = c2 * _PHILOX_ROUND_B
        prod_a = c0 * _PHILOX_ROUND_A
        c0, c2 = ((prod_b >> 32) & _M32) ^ c1 ^ k0, ((prod_a >> 32) & _M32) ^ c3 ^ k1
        c1 = prod_b & _M32
        c3 = prod_a & _M32
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    # bitcast to int32, map negatives x -> ~x, then scale (all as Triton does, in fp32)
    x = torch.where(c0 >= 2**31, _M32 - c0, c0)
    return x.to(torch.float32) * torch.tensor(_U32_TO_FLOAT, dtype=torch.float32)


_ROUND_MUL = np.array([_PHILOX_ROUND_A, _PHILOX_ROUND_B], dtype=np.uint64)[:, None, None]
_KEY_STEP = np.array([_PHILOX_KEY_A, _PHILOX_KEY_B], dtype=np.uint64)[:, None, None]
_ROUNDS = np.arange(10, dtype=np.uint64)[:, None, None, None]
_SH32 = np.uint64(32)
_MASK = np.uint64(_M32)


_BIGINT_LANES = 256  # below this many counters, Python big integers beat NumPy's per-call overhead


@functools.lru_cache(maxsize=64)
def _lane_ones(n: int) -> int:
    """The integer with a 1 in each of its ``n`` 64-bit lanes."""
    return int.from_bytes((b"\x01" + b"\x00" * 7) * n, "little")


def _philox_bigint(seeds: list[int], row_keys: list[int], token: np.ndarray) -> np.ndarray:
    """:func:`philox_uniform` for a few counters, each a 64-bit lane of one Python integer.

    ``seeds`` / ``row_keys``: one int per row of ``token`` (non-negative int64 ``[R, K]``). Lane values stay
    below 2**32 and so do the multipliers, so a lane's product fits its 64 bits (no carry into the next lane):
    a round is a dozen big-integer operations whatever the number of lanes, where NumPy pays ~2 us per call.
    """
    R, K = token.shape
    n = R * K
    rep = _lane_ones(n)
    mlo = rep * _M32
    c0 = int.from_bytes(token.astype("<u8").tobytes(), "little")
    if R == 1:  # every lane shares the row's words: a broadcast is one product with `rep`
        (seed,), (row_key,) = seeds, row_keys
        c1 = rep * (row_key & _M32)
        k0, k1 = seed & _M32, (seed >> 32) & _M32
        round_keys = [(rep * ((k0 + r * _PHILOX_KEY_A) & _M32), rep * ((k1 + r * _PHILOX_KEY_B) & _M32))
                      for r in range(10)]
    else:
        def per_row(vals: list[int]) -> int:  # one value per row -> the lanes of its K counters
            return int.from_bytes(b"".join((v & _M32).to_bytes(8, "little") * K for v in vals), "little")

        c1 = per_row(row_keys)
        key0, key1 = per_row(seeds), per_row([s >> 32 for s in seeds])
        step0, step1 = rep * _PHILOX_KEY_A, rep * _PHILOX_KEY_B
        round_keys = [((key0 + r * step0) & mlo, (key1 + r * step1) & mlo) for r in range(10)]
    c2 = c3 = 0
    for rk0, rk1 in round_keys:
        prod_b = c2 * _PHILOX_ROUND_B
        prod_a = c0 * _PHILOX_ROUND_A
        c0 = ((prod_b >> 32) & mlo) ^ c1 ^ rk0
        c2 = ((prod_a >> 32) & mlo) ^ c3 ^ rk1
        c1 = prod_b & mlo
        c3 = prod_a & mlo
    x = np.frombuffer(c0.to_bytes(8 * n, "little"), dtype="<u8").astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)  # Triton: negative int32 x -> -x - 1
    return (x.astype(np.float32) * np.float32(_U32_TO_FLOAT)).reshape(R, K)


def philox_uniform_np(k0: np.ndarray, k1: np.ndarray, row_key: np.ndarray, token: np.ndarray) -> np.ndarray:
    """:func:`philox_uniform` in NumPy: fp32 uniforms ``[R, K]`` for uint32 counters.

    ``k0``/``k1`` (seed low / high words) and ``row_key`` are uint32 ``[R, 1]``, ``token`` is uint32 ``[R, K]``.
    Both lanes of a round run as one ``[2, R, K]`` array: ``X = (c0, c2)`` times ``(A, B)`` gives the exact
    uint64 products, whose high / low words are uint32 views (little-endian) and whose lane swap is a reversed
    view, so a round is one multiply and two XORs.
    """
    R, K = token.shape
    keys = ((np.stack([k0, k1]).astype(np.uint64) + _ROUNDS * _KEY_STEP) & _MASK).astype(np.uint32)  # [10, 2, R, 1]
    x = np.zeros((2, R, K), dtype=np.uint32)
    x[0] = token
    y = np.zeros((2, R, K), dtype=np.uint32)
    y[0] = row_key
    for r in range(10):
        prod = np.multiply(x, _ROUND_MUL, dtype=np.uint64)  # (A * c0, B * c2)
        if _LITTLE_ENDIAN:
            w = prod.view(np.uint32)
            hi, lo = w[..., 1::2], w[..., 0::2]
        else:
            hi, lo = (prod >> _SH32).astype(np.uint32), (prod & _MASK).astype(np.uint32)
        x = hi[::-1] ^ y ^ keys[r]  # c0 = hi(B c2) ^ c1 ^ k0, c2 = hi(A c0) ^ c3 ^ k1
        y = lo[::-1]  # c1 = lo(B c2), c3 = lo(A c0)
    c0 = x[0].view(np.int32)
    c0 = np.where(c0 < 0, ~c0, c0)  # Triton: negative int32 x -> -x - 1
    return c0.astype(np.float32) * np.float32(_U32_TO_FLOAT)


@dataclass
class Seed:
    """Where a row's random stream comes from: ``seed`` is a Python int shared by all rows, or an int64 ``[B]``
    tensor; row ``i``'s Philox row key is ``i * row_key_mult`` (1: a shared seed, rows keyed by index; 0: per-row
    seeds, the row index is not part of the key)."""

    seed: int | torch.Tensor
    row_key_mult: int


def _uniforms(seed: Seed, rows: torch.Tensor | None, tok: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms ``[R, K]`` for the tokens ``tok`` (int64 ``[R, K]``) of batch rows ``rows`` (None: all)."""
    R = tok.shape[0]
    dev = tok.device
    s = seed.seed
    if dev.type != "cpu":
        row_idx = rows if rows is not None else torch.arange(R, device=dev)
        key = (row_idx * seed.row_key_mult)[:, None].expand_as(tok)
        if isinstance(s, torch.Tensor):
            sd = s[row_idx][:, None].expand_as(tok)
        else:
            sd = torch.full_like(tok, s)
        return philox_uniform(sd, key, tok)
    if tok.numel() <= _BIGINT_LANES:
        seeds = (s if rows is None else s[rows]).tolist() if isinstance(s, torch.Tensor) else [s] * R
        mult = seed.row_key_mult
        keys = ([r * mult for r in range(R)] if rows is None else [r * mult for r in rows.tolist()]) if mult else [0] * R
        return torch.from_numpy(_philox_bigint(seeds, keys, tok.numpy()))
    if isinstance(s, torch.Tensor):
        sd = (s if rows is None else s[rows]).numpy().view(np.uint64)[:, None]
        k0, k1 = (sd & _MASK).astype(np.uint32), (sd >> _SH32).astype(np.uint32)
    else:
        k0 = np.full((R, 1), s & _M32, dtype=np.uint32)
        k1 = np.full((R, 1), (s >> 32) & _M32, dtype=np.uint32)
    if seed.row_key_mult:
        row_idx = np.arange(R, dtype=np.uint32) if rows is None else rows.numpy().astype(np.uint32)
        key = (row_idx * np.uint32(seed.row_key_mult))[:, None]
    else:
        key = np.zeros((R, 1), dtype=np.uint32)
    return torch.from_numpy(_philox_np_parallel(k0, k1, key, tok.numpy().astype(np.uint32)))


_PARALLEL_LANES = 16384  # from this many counters, split them over torch's intra-op thread count
_pool: ThreadPoolExecutor | None = None


def _philox_np_parallel(k0: np.ndarray, k1: np.ndarray, key: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """:func:`philox_uniform_np` with the token columns split over threads (NumPy releases the GIL in its ufuncs;
    measured 2.2 -> 1.2 ms for 47,000 counters on 2 cores). Chunks are independent counters: bit-identical."""
    global _pool
    n = min(torch.get_num_threads(), 8, tok.size // (_PARALLEL_LANES // 2))
    if n < 2:
        return philox_uniform_np(k0, k1, key, tok)
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="decodekit-philox")
    parts = [_pool.submit(philox_uniform_np, k0, k1, key, c) for c in np.array_split(tok, n, axis=1)]
    return np.concatenate([f.result() for f in parts], axis=1)


def gumbel_keys(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Race keys ``z - log(-log u)`` (argmax = a draw from softmax(z)); never below ``_NEG_BIG``."""
    return torch.sub(z, torch.log(u).neg_().log_()).clamp_(min=_NEG_BIG)  # in place: the same fp32 operations


# --------------------------------------------------------------------------- parameters


@dataclass
class RowParams:
    """Validated sampling parameters: Python scalars (broadcast) or ``[B]`` tensors on the logits' device
    (fp32; ``top_k`` int64)."""

    temperature: Param
    top_k: Param
    top_p: Param
    min_p: Param
    repetition_penalty: Param
    presence_penalty: Param
    frequency_penalty: Param
    token_counts: torch.Tensor | None  # int [B, V]
    tts: bool  # True: sample_logits semantics (top-p on un-renormalized post-top-k probs, "<=")
    greedy_top1: bool  # True: top_k == 1 means greedy (sample); False: it keeps the ties of the max (TTS)


def _sub(v: Param, rows: torch.Tensor | None) -> Param:
    """Parameter values of the batch rows ``rows`` (None: all rows)."""
    return v[rows] if rows is not None and isinstance(v, torch.Tensor) else v


def _col(v: Param) -> Param:
    """Broadcastable against ``[R, K]``."""
    return v[:, None] if isinstance(v, torch.Tensor) else v


def _any(v: bool | torch.Tensor) -> bool:
    return bool(v.any()) if isinstance(v, torch.Tensor) else bool(v)


def _all(v: bool | torch.Tensor) -> bool:
    return bool(v.all()) if isinstance(v, torch.Tensor) else bool(v)


def _not(v: bool | torch.Tensor) -> bool | torch.Tensor:
    return ~v if isinstance(v, torch.Tensor) else not v


def _rows_of(mask: bool | torch.Tensor) -> torch.Tensor | None:
    """Row indices where ``mask`` holds (None when that is every row; only called when some row does)."""
    if not isinstance(mask, torch.Tensor) or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


# --------------------------------------------------------------------------- penalties


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[B, V // _BLOCK, _BLOCK]`` view of the leading whole blocks of a ``[B, V]`` tensor (unit column stride)."""
    B, V = x.shape
    return x.as_strided((B, V // _BLOCK, _BLOCK), (x.stride(0), _BLOCK, 1), x.storage_offset())


def nonzero_positions(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the nonzero entries of an int ``[B, V]`` tensor (blocks first, then the tail), read block-wise.

    A token history touches few tokens: ``amax`` / ``amin`` over blocks of 64 find the blocks holding a count,
    and ``nonzero`` runs on those blocks only (a full ``nonzero`` is several times slower on CPU).
    """
    B, V = counts.shape
    nb = V // _BLOCK
    rows, cols = [], []
    if nb:
        cb = _blocks(counts)
        hit = cb.amax(dim=2) != 0
        if counts.dtype != torch.uint8:
            hit |= cb.amin(dim=2) != 0
        r, b = hit.nonzero(as_tuple=True)
        i, j = _gather_blocks(counts, r, b[:, None], tail=False).nonzero(as_tuple=True)
        rows.append(r[i])
        cols.append(b[i] * _BLOCK + j)
    if nb * _BLOCK < V:
        r, c = counts[:, nb * _BLOCK:].nonzero(as_tuple=True)
        rows.append(r)
        cols.append(c + nb * _BLOCK)
    if len(rows) == 1:
        return rows[0], cols[0]
    return torch.cat(rows), torch.cat(cols)


def penalized_logits(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """fp32 ``[B, V]`` logits after the penalties (no temperature). The caller's tensor is never modified: a
    penalized copy is made when some penalty is active; otherwise fp32 logits are returned as they are."""
    z = logits.float()
    counts = prm.token_counts
    if counts is None:
        return z
    rep, pres, freq = prm.repetition_penalty, prm.presence_penalty, prm.frequency_penalty
    rep_on, pres_on, freq_on = _any(rep != 1), _any(pres != 0), _any(freq != 0)
    if not (rep_on or pres_on or freq_on):
        return z
    r, c = nonzero_positions(counts)
    z = z.clone() if z.data_ptr() == logits.data_ptr() else z
    x = z[r, c]
    cnt = counts[r, c].to(torch.float32)
    seen = cnt > 0
    # the kernel's fp32 operations, in its order (tokens with a zero count are unchanged by all of them)
    if rep_on:
        rr = _sub(rep, r)
        x = torch.where(seen, torch.where(x > 0, x / rr, x * rr), x)
    if pres_on:
        x = x - _sub(pres, r) * seen.to(torch.float32)
    if freq_on:
        x = x - _sub(freq, r) * cnt
    z[r, c] = x
    return z


# --------------------------------------------------------------------------- the kept set


@dataclass
class _Kept:
    """The kept set of some rows as a descending prefix of candidates: ``tok`` / ``z`` (temperature-scaled
    values) ``[R, K]``, ``keep`` ``[R, K]`` (True on a prefix of each row), ``w = exp(z - m)``, ``m`` ``[R]``."""

    rows: torch.Tensor | None  # batch rows (None: all)
    tok: torch.Tensor
    z: torch.Tensor
    keep: torch.Tensor
    w: torch.Tensor
    m: torch.Tensor  # [R, 1]
    prefix: bool = True  # False: ``keep`` is any subset (every token a candidate, in index order)


def _cut(
    z: torch.Tensor, w: torch.Tensor, norm: tuple[torch.Tensor, Param] | None, k: Param, p: Param,
    k_on: bool | torch.Tensor, p_on: bool | torch.Tensor, min_p: Param, tts: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask ``[R, K]`` of descending candidates ``z`` and the value ``[R, 1]`` that decides the cut.

    Top-k keeps ``z >= z[k-1]`` (every token tying the k-th). Top-p keeps a token iff the mass strictly above
    its tie group is ``< p * s_ref`` (``<=`` for TTS): the raw test ``excl_j < p * s_ref`` holds on a prefix,
    and its last value, extended to its whole tie group, is the cut. ``s_ref`` is the row mass (``norm``:
    ``(mass, s_ref)`` of the full-row distribution) or, in Hugging Face order with top-k, the mass of the
    top-k set (``w = exp(z - max)``), where the top-k cut alone decides (the top-p cut lies inside it).

    The candidates are an exact prefix of the row above some value ``t``; the result is exact iff the
    deciding value is ``> t`` (every token above it is a candidate, its tie group included).
    """
    R, K = z.shape
    ninf = float("-inf")
    kth = None
    if _any(k_on):
        if isinstance(k, torch.Tensor):
            on = k_on & (k <= K)
            kth = torch.where(_col(on), z.gather(1, (torch.where(on, k, 1) - 1)[:, None]), ninf)
        elif k <= K:
            kth = z[:, k - 1:k]
        else:  # the k-th value is past the candidates: nothing is decided (-inf never exceeds the prefix bound)
            kth = torch.full((R, 1), ninf, device=z.device)
    cut = decide = kth  # [R, 1]: the lowest kept value
    if _any(p_on):
        both = k_on & p_on
        s_k = None
        if not tts and _any(both):
            s_k = (w * (z >= kth)).sum(dim=1, keepdim=True)  # top-k set mass (exact when the k-th value decides)
        if s_k is None:
            mass, s_ref = norm
        elif norm is None:
            mass, s_ref = w, s_k
        else:
            mass = torch.where(_col(both), w, norm[0])
            s_ref = torch.where(_col(both), s_k, norm[1])
        excl = torch.cumsum(mass, dim=1) - mass  # mass strictly above each candidate
        lim = _col(p) if isinstance(s_ref, float) and s_ref == 1.0 else _col(p) * s_ref
        raw = excl <= lim if tts else excl < lim
        if R == 1 and z.device.type == "cpu":  # one CPU row: index on the host (two tensor ops fewer)
            n_raw = int(raw.sum())
            c_p = z[:, n_raw - 1:n_raw]
        else:
            c_p = z.gather(1, raw.sum(dim=1, keepdim=True) - 1)  # >= 1: the max passes (p > 0)
        if isinstance(p_on, torch.Tensor):
            c_p = torch.where(_col(p_on), c_p, ninf)
        cut = c_p if cut is None else torch.maximum(cut, c_p)
        if s_k is None:
            decide = cut
        elif isinstance(both, torch.Tensor):
            decide = torch.where(_col(both), kth, cut)
    if cut is None:  # only top-k rows with k beyond the candidates
        cut = decide = torch.full((R, 1), ninf, device=z.device)
    keep = z >= cut.clamp(min=-_FLT_MAX)  # the prefix down to the cut (never a -inf token)
    if not tts and _any(min_p > 0):
        keep = keep & (w >= _col(min_p))
    return keep, decide


def _gather_blocks(z: torch.Tensor, rows: torch.Tensor | None, bi: torch.Tensor, tail: bool = True) -> torch.Tensor:
    """The tokens of blocks ``bi`` (``[R, Kb]``) of rows ``rows`` of ``z`` (None: all), then (``tail``) the tail past
    the last whole block: ``[R, Kb * 64 + V % 64]``. Blocks are copied as 64-value rows (``index_select`` of a
    ``[*, 64]`` view, ~4x faster than an element-wise ``gather``) when the row stride allows it."""
    B, V = z.shape
    nb = V // _BLOCK
    R, kb = bi.shape
    r = torch.arange(B, device=z.device) if rows is None else rows
    if z.stride(0) % _BLOCK == 0:
        s64 = z.stride(0) // _BLOCK
        flat = z.as_strided(((B - 1) * s64 + nb, _BLOCK), (_BLOCK, 1), z.storage_offset())
        cand = flat.index_select(0, (bi + (r * s64)[:, None]).flatten()).view(R, kb * _BLOCK)
    else:
        cand = _blocks(z)[r[:, None], bi].flatten(1)
    if tail and nb * _BLOCK < V:
        cand = torch.cat([cand, z[:, nb * _BLOCK:] if rows is None else z[rows, nb * _BLOCK:]], dim=1)
    return cand


_HIST_BINS = 1024  # value bins of the top-p window search


def _topp_window(zr: torch.Tensor, probs: torch.Tensor, p: float, min_p: float, tts: bool) -> _Kept | None:
    """Kept set of one row whose cut is set by top-p alone, found from a value histogram instead of a sort.

    Top-p keeps token ``j`` iff ``F(z_j) < p`` (``<=`` for TTS), ``F(t)`` being the mass of the tokens above
    ``t``. One weighted ``histogram`` pass gives the mass per value bin; the cut lies in the lowest bin whose mass
    above is below ``p``. Only the tokens of that bin and its two neighbours are ranked, their offset ``F(U)``
    (the mass above the window) is one masked sum, and :func:`_cut` finishes exactly as it does on a prefix.
    For wide top-p (most of a flat row kept) this replaces a full ``topk`` of V values (~4 ms at V = 50257
    on this CPU) by a few row passes. Returns None when the window does not bracket the cut (a float-rounding
    corner): the caller ranks the row whole then.

    ``zr``: ``[V]`` temperature-scaled fp32 values; ``probs``: ``[V]`` their softmax (index order).
    """
    finite = zr > float("-inf")
    lo, hi = float(zr.where(finite, float("inf")).min()), float(zr.max())
    if not lo < hi:
        return None
    mass, edges = torch.histogram(zr, bins=_HIST_BINS, range=(lo, hi), weight=probs)
    above = mass.flip(0).cumsum(0).flip(0) - mass  # [bins] mass in the bins above each bin
    b = int((above < p).to(torch.int8).argmax())  # lowest bin with less than p above it (above is non-increasing)
    lower, upper = float(edges[max(b - 1, 0)]), float(edges[min(b + 2, _HIST_BINS)])
    inside = (zr >= lower) & (zr <= upper)
    idx = inside.nonzero().squeeze(1)
    f_u = float((probs * (zr > upper)).sum())  # mass strictly above the window
    if not (f_u <= p if tts else f_u < p) or idx.numel() == 0:
        return None
    vals, order = torch.topk(zr[idx], idx.numel())
    tok = idx[order]
    pw = probs[tok]
    keep, _ = _cut(vals[None], torch.exp(vals - hi)[None], (pw[None], 1.0), 0, p - f_u, False, True, 0.0, tts)
    n_keep = int(keep.sum())
    below = f_u + float(pw.sum())  # F of the first token under the window
    if n_keep == 0 or (n_keep == idx.numel() and lower > lo and (below <= p if tts else below < p)):
        return None  # the cut is not inside the window
    kept = zr >= vals[n_keep - 1]
    if not tts and min_p > 0:
        kept &= torch.exp(zr - hi) >= min_p
    tok = kept.nonzero().transpose(0, 1)  # [1, n] the kept tokens in index order: the race runs on them only
    z = zr[tok]
    return _Kept(None, tok, z, torch.ones_like(tok, dtype=torch.bool), torch.exp(z - hi), torch.tensor([[hi]]),
                 prefix=False)


def _filtered(
    z: torch.Tensor, rows: torch.Tensor | None, bm: torch.Tensor | None, prm: RowParams,
) -> list[_Kept]:
    """Kept sets of rows with a top-k / top-p filter (``rows`` of ``z``; ``bm``: block maxima of ``z``)."""
    B, V = z.shape
    zr = z if rows is None else z[rows]
    temp = _sub(prm.temperature, rows)
    k, p, min_p = _sub(prm.top_k, rows), _sub(prm.top_p, rows), _sub(prm.min_p, rows)
    k_on = (k > 0) & (k < V)
    p_on = (p > 0) & (p < 1)
    scaled = isinstance(temp, torch.Tensor) or temp != 1.0
    # the row normalizer, only where top-p is not preceded by a renormalizing top-k
    need_norm = _any(p_on if prm.tts else p_on & _not(k_on))
    pre = scaled and (need_norm or bm is None)
    if pre:  # whole rows are scaled anyway: rank the scaled values (T > 0 keeps the order)
        zr, scaled = zr / _col(temp), False
    probs_full = torch.softmax(zr, dim=1) if need_norm else None  # index order, as the eager reference
    # blocks to start from: k + 1 for top-k rows (>= k + 1 exact candidates), more for top-p alone
    k_max = int(torch.where(k_on, k, 0).max()) if isinstance(k, torch.Tensor) else (k if k_on else 0)
    nb = V // _BLOCK
    kb = min(nb, max(_KB_MIN, k_max + 1) if _all(k_on) else max(min(_KB_TOPP, nb // 4), _KB_MIN, k_max + 1))
    kt = min(V, max(_KB_MIN, k_max + 1))  # small rows: the top kt tokens first (cheaper than ranking all)
    out: list[_Kept] = []
    sub = None  # indices into the group's rows still unresolved (None: all)
    # top-p alone with scalar parameters on CPU: unresolved rows go to _topp_window (needs the scaled rows)
    window = (probs_full is not None and bm is not None and zr.device.type == "cpu" and not _any(k_on)
              and all(not isinstance(v, torch.Tensor) for v in (temp, p, min_p)))
    while True:
        full = kt >= V if bm is None else kb > nb  # (after a round with every block)
        rsub = rows if sub is None else (sub if rows is None else rows[sub])
        t_s = _sub(temp, sub)
        if bm is None:  # small rows: the top kt tokens are an exact prefix down to the kt-th value
            vals, tok = torch.topk(zr if sub is None else zr[sub], kt, dim=1)
            thr = vals[:, -1:]  # zr is scaled here
            kt = min(V, kt * 4)
        elif full:  # rank the whole row
            vals, tok = torch.topk(zr if sub is None else zr[sub], V, dim=1)
        else:
            bv, bi = torch.topk(bm if rsub is None else bm[rsub], kb, dim=1, sorted=False)
            thr = bv.amin(dim=1, keepdim=True)  # every token above thr is in a picked block
            if pre:
                thr = thr / _col(t_s)  # the block maxima are unscaled
            cand = _gather_blocks(zr, sub, bi)
            valid = cand >= thr
            # -inf outside the exact prefix: topk over mostly -inf is ~2x faster on CPU
            vals, o = torch.topk(torch.where(valid, cand, float("-inf")), int(valid.sum(dim=1).max()), dim=1)
            tok = bi.gather(1, torch.div(o, _BLOCK, rounding_mode="floor").clamp(max=kb - 1)) * _BLOCK + o % _BLOCK
            if nb * _BLOCK < V:  # positions past the blocks are the tail tokens
                tok = torch.where(o >= kb * _BLOCK, o + (nb - kb) * _BLOCK, tok)
        if scaled:  # (never for small rows: they were scaled whole)
            zc = vals / _col(t_s)
            thr = None if full else thr / _col(t_s)
        else:
            zc = vals
        m = zc[:, :1]
        w = torch.exp(zc - m)
        norm = None if probs_full is None else ((probs_full if sub is None else probs_full[sub]).gather(1, tok), 1.0)
        keep, decide = _cut(zc, w, norm, _sub(k, sub), _sub(p, sub), _sub(k_on, sub), _sub(p_on, sub),
                            _sub(min_p, sub), prm.tts)
        if full:
            out.append(_Kept(rsub, tok, zc, keep, w, m))
            return out
        gt = decide > thr
        if bool(gt.all()):
            out.append(_Kept(rsub, tok, zc, keep, w, m))
            return out
        done = gt.squeeze(1)
        d = done.nonzero().squeeze(1)
        if d.numel():
            out.append(_Kept(d if rsub is None else rsub[d], tok[d], zc[d], keep[d], w[d], m[d]))
        nd = (~done).nonzero().squeeze(1)
        cover = (norm[0] * (zc >= thr)).sum(dim=1)[nd].tolist() if window else []  # mass of the exact prefix
        sub = nd if sub is None else sub[nd]
        if window:  # wide top-p rows (the prefix holds < 80 % of p): a value-histogram window, not more rounds
            left = []
            for i, c in zip(sub.tolist(), cover):
                kp = _topp_window(zr[i], probs_full[i], p, min_p, prm.tts) if c < 0.8 * p else None  # zr: scaled
                if kp is None:
                    left.append(i)
                else:
                    kp.rows = torch.tensor([i]) if rows is None else rows[i:i + 1]
                    out.append(kp)
            if not left:
                return out
            sub = torch.tensor(left)
        kb = nb + 1 if kb >= nb else min(nb, kb * 2)


def _all_tokens(z: torch.Tensor, rows: torch.Tensor | None, prm: RowParams) -> _Kept:
    """Kept set of rows without top-k / top-p: every finite token (minus min-p)."""
    B, V = z.shape
    zr = z if rows is None else z[rows]
    temp, min_p = _sub(prm.temperature, rows), _sub(prm.min_p, rows)
    zc = zr / _col(temp) if isinstance(temp, torch.Tensor) or temp != 1.0 else zr
    m = zc.amax(dim=1, keepdim=True)
    w = torch.exp(zc - m)
    keep = zc > float("-inf")
    if not prm.tts and _any(min_p > 0):
        keep = keep & (w >= _col(min_p))
    tok = torch.arange(V, device=z.device).expand(zr.shape[0], V)
    return _Kept(rows, tok, zc, keep, w, m, prefix=False)


@dataclass
class _Plan:
    z: torch.Tensor  # fp32 [B, V] penalized logits (bad rows zeroed)
    bad: torch.Tensor | None  # [B] bool (None: no bad row)
    greedy: torch.Tensor | None  # batch rows that are greedy (all rows: arange)
    kept: list[_Kept]


def _plan(logits: torch.Tensor, prm: RowParams) -> _Plan:
    """Penalties, bad-row check and the kept set of every non-greedy row."""
    z = penalized_logits(logits, prm)
    B, V = z.shape
    bm = None
    if V > _SORT_V:
        bm = _blocks(z).amax(dim=2)  # [B, V // 64] block maxima (NaN propagates)
        rmax = bm.amax(dim=1)
        if V % _BLOCK:
            rmax = torch.maximum(rmax, z[:, V // _BLOCK * _BLOCK:].amax(dim=1))  # the tail (< 64 tokens)
    else:
        rmax = z.amax(dim=1)
    bad = None
    if not math.isfinite(float(rmax[0] if B == 1 else rmax.sum())):  # a row max is NaN/+-inf (or the sum overflowed)
        bad = ~torch.isfinite(rmax)
        if bool(bad.any()):
            z = torch.where(bad[:, None], 0.0, z)  # compute on zeros, report token -1 at the end
        else:
            bad = None
    temp, k, p = prm.temperature, prm.top_k, prm.top_p
    greedy = temp == 0
    if prm.greedy_top1:
        greedy = greedy | (k == 1)
    if bad is not None:
        greedy = greedy | bad  # their token is -1 anyway: no search
    filt = (((k > 0) & (k < V)) | ((p > 0) & (p < 1))) & _not(greedy)
    rest = _not(filt) & _not(greedy)
    kept: list[_Kept] = []
    if _any(filt):
        kept += _filtered(z, _rows_of(filt), bm, prm)
    if _any(rest):
        kept.append(_all_tokens(z, _rows_of(rest), prm))
    g = None
    if _any(greedy):
        g = _rows_of(greedy)
        g = torch.arange(B, device=z.device) if g is None else g
    return _Plan(z, bad, g, kept)


# --------------------------------------------------------------------------- small rows in NumPy


def _small_eligible(logits: torch.Tensor, prm: RowParams) -> bool:
    """Rows the NumPy path takes: CPU, at most ``_SORT_V`` tokens, scalar filter parameters."""
    return (logits.device.type == "cpu" and logits.shape[1] <= _SORT_V and logits.shape[0] > 0
            and not any(isinstance(v, torch.Tensor) for v in (prm.temperature, prm.top_k, prm.top_p, prm.min_p)))


def _penalized_small(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """:func:`penalized_logits` for small CPU rows with scalar penalties: the same fp32 operations on the whole row in
    NumPy (a token with a zero count is left exactly as it is: ``x - p * 0`` is ``x``), where the block-wise search
    for the seen tokens would be a dozen torch ops on a row of a thousand values."""
    counts = prm.token_counts
    rep, pres, freq = prm.repetition_penalty, prm.presence_penalty, prm.frequency_penalty
    if counts is None or any(isinstance(v, torch.Tensor) for v in (rep, pres, freq)):
        return penalized_logits(logits, prm)
    if rep == 1 and pres == 0 and freq == 0:
        return logits.float()
    z = logits.float().numpy()
    cnt = counts.numpy()
    seen = cnt > 0
    if rep != 1:
        rr = np.float32(rep)
        z = np.where(seen, np.where(z > 0, z / rr, z * rr), z)
    if pres != 0:
        z = z - np.float32(pres) * seen.astype(np.float32)
    if freq != 0:
        z = z - np.float32(freq) * cnt.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))


@dataclass
class _SmallKept:
    """Kept sets of :func:`_small_kept` (NumPy, ``[B, n]``, each row's kept tokens a prefix of its candidates)."""

    tok: np.ndarray  # int64 candidates, descending value
    vals: np.ndarray  # fp32 temperature-scaled values
    keep: np.ndarray  # bool
    w: np.ndarray  # fp32 exp(vals - m)
    m: np.ndarray  # fp32 [B, 1] row max


def _small_kept(z_t: torch.Tensor, prm: RowParams, full: bool = False) -> _SmallKept | None:
    """Kept sets of small CPU rows (V <= 2048, scalar parameters), computed in NumPy on the candidates.

    The same selection as :func:`_filtered` (the top ``max(64, k + 1)`` values, exact above the last one; the whole
    sorted row when the cut is not decided above it) and the same cut rules as :func:`_cut`, with NumPy ufuncs
    instead of torch ops: at this size a torch op is ~3 us of dispatch for a few hundred flops, a NumPy ufunc
    ~1 us, and this is the per-token cost of every small-vocabulary decoder (TTS codebooks). The temperature
    division stays the torch op of the other path; exp and the sums are NumPy's fp32 ones, which may differ in the
    last bit from torch's: a kept set or a draw can differ from the general path only in a near-tie.

    Returns None where the general path must run: greedy rows, no filter, a non-finite row max.
    """
    B, V = z_t.shape
    T, k, p, min_p, tts = prm.temperature, prm.top_k, prm.top_p, prm.min_p, prm.tts
    if T == 0 or (prm.greedy_top1 and k == 1):
        return None
    k_on, p_on = 0 < k < V, 0 < p < 1
    if not (k_on or p_on):
        return None
    zs = (z_t / T if T != 1.0 else z_t).numpy()  # [B, V] fp32, the other path's scaled values
    rmax = zs.max(axis=1, keepdims=True)  # NaN propagates
    if not np.isfinite(rmax).all():
        return None
    rows = np.arange(B)[:, None]
    kt = V if full else min(V, max(_KB_MIN, k + 1 if k_on else 0))
    if kt < V:  # the top kt values (ties at the last one in any order), then ranked
        part = np.argpartition(-zs, kt - 1, axis=1)[:, :kt]
        pv = zs[rows, part]
        order = np.argsort(-pv, axis=1, kind="stable")
        tok, vals = part[rows, order], pv[rows, order]  # [B, kt] descending
    else:
        tok = np.argsort(-zs, axis=1, kind="stable")
        vals = zs[rows, tok]
    m = vals[:, :1]
    w = np.exp(vals - m)
    cut = decide = kth = vals[:, k - 1:k] if k_on else None  # [B, 1]
    if p_on:
        if k_on and not tts:  # Hugging Face order: top-p renormalized over the top-k set
            mass, lim = w, p * (w * (vals >= kth)).sum(axis=1, keepdims=True)
        else:  # the row's own normalizer (softmax), as the other path's probs_full
            e = np.exp(zs - rmax)
            mass, lim = e[rows, tok] / e.sum(axis=1, keepdims=True), p
        excl = np.cumsum(mass, axis=1) - mass  # mass strictly above each candidate
        raw = excl <= lim if tts else excl < lim
        c_p = vals[rows[:, 0], raw.sum(axis=1) - 1][:, None]  # >= 1 passes: the max (p > 0)
        cut = c_p if cut is None else np.maximum(cut, c_p)
        decide = kth if (k_on and not tts) else cut
    keep = vals >= np.maximum(cut, np.float32(-_FLT_MAX))  # a prefix of each row (never a -inf token)
    if not tts and min_p > 0:
        keep &= w >= np.float32(min_p)
    if kt < V and not (decide[:, 0] > vals[:, -1]).all():  # the cut is not decided above the candidates
        return _small_kept(z_t, prm, full=True)
    n = int(keep.sum(axis=1).max())
    return _SmallKept(tok[:, :n], vals[:, :n], keep[:, :n], w[:, :n], m)


def _sample_small(
    z_t: torch.Tensor, prm: RowParams, seed: Seed, logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`sample_torch` on :func:`_small_kept`: the same race, in NumPy (None: the general path must run)."""
    kp = _small_kept(z_t, prm)
    if kp is None:
        return None
    V = z_t.shape[1]
    rows = np.arange(kp.tok.shape[0])[:, None]
    u = _uniforms(seed, None, torch.from_numpy(np.ascontiguousarray(kp.tok))).numpy()
    with np.errstate(divide="ignore"):  # u == 0: -inf, clamped as in gumbel_keys
        key = np.maximum(kp.vals - np.log(-np.log(u)), np.float32(_NEG_BIG))
    key = np.where(kp.keep, key, np.float32(-np.inf))
    pos = np.where(key == key.max(axis=1, keepdims=True), kp.tok, V).argmin(axis=1)[:, None]  # lowest index on ties
    token = torch.from_numpy(kp.tok[rows, pos][:, 0])
    if not logprobs:
        return token, None
    lp = (kp.vals[rows, pos] - kp.m)[:, 0] - np.log((kp.w * kp.keep).sum(axis=1))
    return token, torch.from_numpy(lp.astype(np.float32))


# --------------------------------------------------------------------------- entry points


def sample_torch(
    logits: torch.Tensor, prm: RowParams, seed: Seed, logprobs: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [B] (int64; -1 for bad rows) and, with ``logprobs``, their log-probabilities [B] under the kept,
    renormalized set (else None: at small V the log-probabilities are a sixth of the call's tensor ops)."""
    if _small_eligible(logits, prm):
        res = _sample_small(_penalized_small(logits, prm), prm, seed, logprobs)
        if res is not None:
            return res
    plan = _plan(logits, prm)
    z = plan.z
    B, V = z.shape
    dev = z.device
    parts = []
    for kp in plan.kept:
        R = kp.tok.shape[0]
        if not kp.prefix:
            n = kp.tok.shape[1]
        else:  # race on the kept prefixes only
            n = int(kp.keep.sum()) if R == 1 else int(kp.keep.sum(dim=1).max())
        tok, zk, keep, w = kp.tok[:, :n], kp.z[:, :n], kp.keep[:, :n], kp.w[:, :n]
        key = gumbel_keys(zk, _uniforms(seed, kp.rows, tok))
        if not (kp.prefix and R == 1):  # (one row's prefix of n is all kept)
            key = key.masked_fill(~keep, float("-inf"))
            w = w * keep
        best = key.amax(dim=1, keepdim=True)
        pos = torch.where(key == best, tok, V).argmin(dim=1, keepdim=True)  # lowest token index on ties
        lp = (zk.gather(1, pos) - kp.m).squeeze(1) - torch.log(w.sum(dim=1)) if logprobs else None
        parts.append((kp.rows, tok.gather(1, pos).squeeze(1), lp))
    if plan.greedy is not None:
        g = plan.greedy
        parts.append((g if g.numel() != B else None, z[g].argmax(dim=1) if g.numel() != B else z.argmax(dim=1),
                      torch.zeros(g.numel(), device=dev) if logprobs else None))
    if len(parts) == 1 and parts[0][0] is None:
        token, logprob = parts[0][1], parts[0][2]
    else:
        token = torch.empty(B, dtype=torch.int64, device=dev)
        logprob = torch.empty(B, dtype=torch.float32, device=dev) if logprobs else None
        for rows, t, lp in parts:
            token[rows if rows is not None else slice(None)] = t
            if logprobs:
                logprob[rows if rows is not None else slice(None)] = lp
    if plan.bad is not None:
        token = torch.where(plan.bad, -1, token)
        if logprobs:
            logprob = torch.where(plan.bad, float("nan"), logprob)
    return token, logprob


def sampling_probs_torch(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """Filtered, renormalized probabilities [B, V] fp32 (zeros outside the kept set; bad rows all zero)."""
    if _small_eligible(logits, prm):
        kp = _small_kept(_penalized_small(logits, prm), prm)
        if kp is not None:
            w = np.where(kp.keep, kp.w, np.float32(0))
            out = np.zeros(logits.shape, dtype=np.float32)
            np.put_along_axis(out, kp.tok, w / w.sum(axis=1, keepdims=True), axis=1)
            return torch.from_numpy(out)
    plan = _plan(logits, prm)
    z = plan.z
    B, V = z.shape
    out = torch.zeros(B, V, dtype=torch.float32, device=z.device)
    for kp in plan.kept:
        w = torch.where(kp.keep, kp.w, 0.0)
        pr = w / w.sum(dim=1, keepdim=True)
        if kp.rows is None:
            out.scatter_(1, kp.tok, pr)
        else:
            out[kp.rows[:, None], kp.tok] = pr
    if plan.greedy is not None:
        g = plan.greedy
        out[g, z[g].argmax(dim=1)] = 1.0
    if plan.bad is not None:
        out = torch.where(plan.bad[:, None], 0.0, out)
    return out


def simple_batch_torch(logits: torch.Tensor, noise: Param, temp: Param, seed: Seed) -> torch.Tensor:
    """argmax of ``logits / temp + noise * u`` with Philox uniforms, evaluated on the only tokens that can win
    (``z > max(z) - noise``); ``temp == 0`` rows are plain argmax. Returns int64 [B] (-1 for NaN rows)."""
    z = logits.float()
    B, V = z.shape
    dev = z.device
    bad = torch.isnan(z).any(dim=1) | torch.isneginf(z).all(dim=1)
    if isinstance(temp, torch.Tensor):
        z = torch.where(temp[:, None] > 0, z / torch.where(temp > 0, temp, 1.0)[:, None], z)
        nz = torch.where(temp > 0, noise, 0.0).expand(B)
    else:
        z = z / temp if temp > 0 else z
        nz = (noise.expand(B) if isinstance(noise, torch.Tensor) else torch.full((B,), float(noise), device=dev))
        nz = nz if temp > 0 else torch.zeros_like(nz)
    m = z.amax(dim=1)
    cand = z >= (m - nz)[:, None]  # u < 1: a token below max - noise can never beat the max
    rows, toks = cand.nonzero(as_tuple=True)
    u = _uniforms(seed, rows, toks[:, None]).squeeze(1)
    key = z[rows, toks] + nz[rows] * u
    best = torch.full((B,), float("-inf"), device=dev).scatter_reduce(0, rows, key, "amax")
    is_best = key == best[rows]
    token = torch.full((B,), V, dtype=torch.int64, device=dev)
    token = token.scatter_reduce(0, rows[is_best], toks[is_best], "amin")
    return torch.where(bad | (token >= V), -1, token)
