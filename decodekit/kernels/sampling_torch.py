"""Fast PyTorch path of the sampler (what CPU tensors get with ``backend="auto"``).

Same semantics and the same random stream as the Triton kernels in :mod:`decodekit.kernels.sampling`, without
ever sorting the vocabulary:

* the row max and the softmax normalizer take one pass over ``[B, V]``;
* the top-k / top-p cut is found on a *candidate set* from ``torch.topk`` (a partial selection, linear in V):
  the candidates are the K highest tokens of each row, K grows (x4) only for the rows whose cut is not inside
  their candidates yet, so a peaked distribution touches a few dozen values per row;
* the draw is the exponential race (Gumbel-max) over the kept tokens only, with uniforms from
  :func:`philox_uniform`, a vectorized int64 re-implementation of Triton's ``tl.rand`` (Philox-4x32, 10
  rounds, the same uint32 -> float conversion), keyed by ``(seed, row key, token index)`` exactly as in the
  kernel. Hence the same seed gives the same token on CPU and on GPU (up to float rounding of ``log`` in a
  near-tie of two race keys, an event of probability ~1e-7 per draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_U32_TO_FLOAT = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit case
_NEG_BIG = -3.0e38  # race keys of kept tokens never fall below this (a uniform of exactly 0 gives -inf)


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


def gumbel_keys(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Race keys ``z - log(-log u)`` (argmax = a draw from softmax(z)); never below ``_NEG_BIG``."""
    return torch.clamp(z - torch.log(-torch.log(u)), min=_NEG_BIG)


@dataclass
class RowParams:
    """Per-row sampling parameters, already validated and broadcast to ``[B]`` tensors on the logits' device."""

    temperature: torch.Tensor  # fp32 [B]
    top_k: torch.Tensor  # int64 [B]
    top_p: torch.Tensor  # fp32 [B]
    min_p: torch.Tensor  # fp32 [B]
    repetition_penalty: torch.Tensor  # fp32 [B]
    presence_penalty: torch.Tensor  # fp32 [B]
    frequency_penalty: torch.Tensor  # fp32 [B]
    token_counts: torch.Tensor | None  # int [B, V]
    tts: bool  # True: sample_logits semantics (top-p on un-renormalized post-top-k probs, "<=")
    greedy_top1: bool  # True: top_k == 1 means greedy (sample); False: it keeps the ties of the max (TTS)


def penalized_logits(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """fp32 ``[B, V]`` logits after the penalties and the temperature (greedy rows are not divided)."""
    z = logits.float()
    if prm.token_counts is not None:
        counts = prm.token_counts
        seen = counts > 0
        rep = prm.repetition_penalty[:, None]
        if bool((prm.repetition_penalty != 1).any()):
            z = torch.where(seen, torch.where(z > 0, z / rep, z * rep), z)
        if bool((prm.presence_penalty != 0).any()):
            z = z - prm.presence_penalty[:, None] * seen.to(torch.float32)
        if bool((prm.frequency_penalty != 0).any()):
            z = z - prm.frequency_penalty[:, None] * counts.to(torch.float32)
    temp = prm.temperature
    if bool(((temp != 1) & (temp != 0)).any()):
        z = z / torch.where(temp > 0, temp, 1.0)[:, None]
    return z


def _cut_from_candidates(
    vals: torch.Tensor, cprobs: torch.Tensor, s_ref: torch.Tensor, k: torch.Tensor, p: torch.Tensor, tts: bool,
    k_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given each row's K highest values ``vals`` (descending) and their softmax probabilities ``cprobs``,
    return (keep mask [R, K], resolved flag [R]).

    Token value v is kept iff ``#(z > v) < k`` and ``mass(z > v) / s_ref < p`` (``<=`` for TTS). The cut is
    the smallest candidate value kept; a row is resolved when some candidate is not kept (so the cut lies
    inside the candidates). ``k_only`` ignores top-p (used to find the top-k cut first).
    """
    R, K = vals.shape
    pos = torch.arange(K, device=vals.device).expand(R, K)
    new_group = torch.ones_like(vals, dtype=torch.bool)
    new_group[:, 1:] = vals[:, 1:] != vals[:, :-1]
    start = torch.where(new_group, pos, 0).cummax(dim=1).values  # index where each value's tie group starts
    keep = start < k[:, None]
    if not k_only:
        probs = cprobs / s_ref[:, None]
        cum = torch.cumsum(probs, dim=1)
        excl = torch.zeros_like(cum)
        excl[:, 1:] = cum[:, :-1]
        excl = excl.gather(1, start)  # mass strictly above the value (whole tie group shares it)
        keep_p = excl <= p[:, None] if tts else excl < p[:, None]
        keep &= keep_p | (p[:, None] >= 1.0)
    return keep, keep.sum(dim=1) < K  # keep is a prefix (monotone)


def _kept_candidates(
    z: torch.Tensor, probs: torch.Tensor, s_ref: torch.Tensor, k: torch.Tensor, p: torch.Tensor, tts: bool,
    k_only: bool, k_start: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Grow top-K candidate sets until every row's cut lies inside its candidates.

    Returns groups ``(rows [R], token ids [R, K], keep [R, K], cut [R])``. A resolved row has a candidate that
    is not kept, and keep status is shared by a whole tie group, so every token at or above the cut is a
    candidate: the kept set is exactly ``token ids[keep]``.
    """
    B, V = z.shape
    groups = []
    rows = torch.arange(B, device=z.device)
    K = min(V, max(k_start, 1))
    while rows.numel():
        sub_z = z if rows.numel() == B else z[rows]
        sub_p = probs if rows.numel() == B else probs[rows]
        vals, idx = torch.topk(sub_z, K, dim=1, sorted=True)
        keep, done = _cut_from_candidates(vals, sub_p.gather(1, idx), s_ref[rows], k[rows], p[rows], tts, k_only)
        if K >= V:
            done = torch.ones_like(done)
        keep &= vals > float("-inf")
        cut = vals.gather(1, (keep.sum(dim=1) - 1).clamp(min=0)[:, None]).squeeze(1)
        groups.append((rows[done], idx[done], keep[done], cut[done]))
        rows = rows[~done]
        K = min(V, K * 4)
    return groups


def filter_rows(logits: torch.Tensor, prm: RowParams) -> dict:
    """The kept set of every row as (row, token) pairs, plus z, probs = softmax(z) and the bad/greedy flags.

    Full-row passes: the fp32 conversion / temperature, max, softmax and topk; the rest runs on candidates.
    ``torch.softmax`` gives the normalized masses (it is vectorized; ``torch.exp`` is slow on some CPU builds).
    """
    z = penalized_logits(logits, prm)
    B, V = z.shape
    m = z.max(dim=1).values  # NaN propagates: one pass finds the bad rows
    bad = torch.isnan(m) | torch.isinf(m)
    if bool(bad.any()):
        z = torch.where(bad[:, None], 0.0, z)  # bad rows: compute on zeros, report token -1 at the end
    probs = torch.softmax(z, dim=1)
    greedy = prm.temperature == 0
    if prm.greedy_top1:
        greedy = greedy | (prm.top_k == 1)
    k_on = (prm.top_k > 0) & (prm.top_k < V)
    p_on = (prm.top_p > 0) & (prm.top_p < 1)
    filt = (k_on | p_on) & ~greedy
    pair_rows, pair_toks = [], []
    if bool(filt.any()):
        k = torch.where(k_on, prm.top_k, V + 1)
        p = torch.where(p_on, prm.top_p, 2.0)  # >= 1: no top-p
        # one more than the largest k: a row whose cut is its top-k cut resolves in the first round
        k_start = max(64, int(torch.where(k_on & filt, prm.top_k, 0).max()) + 1)
        s_ref = torch.ones_like(m)
        if not prm.tts and bool((k_on & p_on & filt).any()):
            # HF order: top-p acts on the distribution renormalized over the top-k set
            for rows, idx, keep, _ in _kept_candidates(z, probs, s_ref, k, p, True, True, k_start):
                s_ref[rows] = torch.where(keep, probs[rows].gather(1, idx), 0.0).sum(dim=1)
        for rows, idx, keep, _ in _kept_candidates(z, probs, s_ref, k, p, prm.tts, False, k_start):
            sel = filt[rows]
            rows, idx, keep = rows[sel], idx[sel], keep[sel]
            r2 = rows[:, None].expand_as(idx)
            pair_rows.append(r2[keep])
            pair_toks.append(idx[keep])
    rest = ~filt & ~greedy
    if bool(rest.any()):  # no top-k/top-p: every finite token
        r, t = (z[rest] > float("-inf")).nonzero(as_tuple=True)
        pair_rows.append(rest.nonzero().squeeze(1)[r])
        pair_toks.append(t)
    if bool(greedy.any()):
        g = greedy.nonzero().squeeze(1)
        pair_rows.append(g)
        pair_toks.append(z[g].argmax(dim=1))
    rows = torch.cat(pair_rows) if pair_rows else torch.zeros(0, dtype=torch.int64, device=z.device)
    toks = torch.cat(pair_toks) if pair_toks else torch.zeros(0, dtype=torch.int64, device=z.device)
    if bool((prm.min_p > 0).any()):
        pmax = probs.max(dim=1).values
        ok = (probs[rows, toks] >= prm.min_p[rows] * pmax[rows]) | greedy[rows]
        rows, toks = rows[ok], toks[ok]
    return {"z": z, "rows": rows, "toks": toks, "probs": probs, "bad": bad, "greedy": greedy}


def sample_torch(
    logits: torch.Tensor, prm: RowParams, seeds: torch.Tensor, row_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64; -1 for bad rows) and their log-probabilities [B] under the kept, renormalized set."""
    f = filter_rows(logits, prm)
    z, rows, toks, probs, bad, greedy = f["z"], f["rows"], f["toks"], f["probs"], f["bad"], f["greedy"]
    B, V = z.shape
    u = philox_uniform(seeds[rows], row_keys[rows], toks)
    zk = z[rows, toks]
    key = torch.where(greedy[rows], zk, gumbel_keys(zk, u))
    best = torch.full((B,), float("-inf"), device=z.device).scatter_reduce(0, rows, key, "amax")
    is_best = key == best[rows]
    token = torch.full((B,), V, dtype=torch.int64, device=z.device)
    token = token.scatter_reduce(0, rows[is_best], toks[is_best], "amin")  # lowest index on ties
    s_kept = torch.zeros(B, device=z.device).index_add_(0, rows, probs[rows, toks])
    token = torch.where(bad | (token >= V), -1, token)
    tok_safe = token.clamp(min=0)
    logprob = torch.log(probs.gather(1, tok_safe[:, None]).squeeze(1)) - torch.log(s_kept)
    logprob = torch.where(greedy, 0.0, logprob)
    logprob = torch.where(token < 0, float("nan"), logprob)
    return token, logprob


def sampling_probs_torch(logits: torch.Tensor, prm: RowParams) -> torch.Tensor:
    """Filtered, renormalized probabilities [B, V] fp32 (zeros outside the kept set; bad rows all zero)."""
    f = filter_rows(logits, prm)
    rows, toks, probs = f["rows"], f["toks"], f["probs"]
    w = torch.zeros_like(probs)
    w[rows, toks] = torch.where(f["greedy"][rows], 1.0, probs[rows, toks])
    out = w / w.sum(dim=1, keepdim=True)
    return torch.where(f["bad"][:, None], 0.0, out)


def simple_batch_torch(
    logits: torch.Tensor, noise: torch.Tensor, temp: torch.Tensor, seeds: torch.Tensor, row_keys: torch.Tensor
) -> torch.Tensor:
    """argmax of ``logits / temp + noise * u`` with Philox uniforms, evaluated on the only tokens that can win
    (``z > max(z) - noise``); ``temp == 0`` rows are plain argmax. Returns int64 [B] (-1 for NaN rows)."""
    z = logits.float()
    B, V = z.shape
    bad = torch.isnan(z).any(dim=1) | torch.isneginf(z).all(dim=1)
    z = torch.where(temp[:, None] > 0, z / torch.where(temp > 0, temp, 1.0)[:, None], z)
    nz = torch.where(temp > 0, noise, 0.0)
    m = z.max(dim=1).values
    cand = z >= (m - nz)[:, None]  # u < 1: a token below max - noise can never beat the max
    rows, toks = cand.nonzero(as_tuple=True)
    u = philox_uniform(seeds[rows], row_keys[rows], toks)
    key = z[rows, toks] + nz[rows] * u
    best = torch.full((B,), float("-inf"), device=z.device).scatter_reduce(0, rows, key, "amax")
    is_best = key == best[rows]
    token = torch.full((B,), V, dtype=torch.int64, device=z.device)
    token = token.scatter_reduce(0, rows[is_best], toks[is_best], "amin")
    return torch.where(bad | (token >= V), -1, token)
