"""Plain PyTorch reference semantics of the samplers (the ground truth the kernels are tested against).

Written for clarity, not speed: full sorts over the vocabulary are fine here. Three samplers:

* :func:`sample_logits_ref` -- the user's TTS sampler, verbatim (plus ``temperature == 0`` meaning greedy,
  which the original would turn into a division by zero). Top-p runs on the probabilities left after top-k
  *without* renormalizing them.
* :func:`sampling_probs_ref` / :func:`sample_ref` -- Hugging Face ``generate`` order: repetition penalty,
  presence/frequency penalties, temperature, top-k, top-p on the distribution renormalized after top-k,
  min-p, then a draw.
* :func:`sampler_simple_batch_ref` -- argmax of ``logits / temp + U[0, noise)``.

``upcast=True`` (the default) computes in fp32 whatever the input dtype, which is what the kernels do;
``upcast=False`` keeps the input dtype like the original eager code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_logits_ref(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0, *, upcast: bool = True,
    generator: torch.Generator | None = None, return_probs: bool = False,
) -> torch.Tensor:
    """The TTS reference sampler. Returns tokens ``[B, 1]`` (or the final probabilities ``[B, V]``)."""
    if upcast:
        logits = logits.float()
    if temperature == 0:  # meant as greedy
        if return_probs:
            out = torch.zeros_like(logits, dtype=torch.float32)
            return out.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return logits.argmax(dim=-1, keepdim=True)
    if temperature != 1.0:
        logits = logits / temperature
    probs = F.softmax(logits, dim=-1)
    if top_k > 0:
        top_k = min(top_k, probs.shape[-1])
        indices_to_remove = probs < torch.topk(probs, top_k)[0][..., -1, None]
        probs[indices_to_remove] = 0
    if top_p > 0:
        sorted_probs, sorted_indices = torch.sort(probs, descending=True)
        cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
        probs[indices_to_remove] = 0
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if return_probs:
        return probs.float()
    return torch.multinomial(probs, 1, generator=generator)


def _per_row(value: float | int | torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.to(dtype=dtype, device="cpu").reshape(-1)
        return value.expand(batch) if value.numel() == 1 else value
    return torch.full((batch,), value, dtype=dtype)


def apply_penalties_ref(
    logits: torch.Tensor,
    token_counts: torch.Tensor | None,
    repetition_penalty: float | torch.Tensor = 1.0,
    presence_penalty: float | torch.Tensor = 0.0,
    frequency_penalty: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """HF repetition penalty (divide positive / multiply negative logits of seen tokens), then the OpenAI
    presence/frequency penalties (``logit - presence * [count > 0] - frequency * count``). fp32 in, fp32 out."""
    if token_counts is None:
        return logits
    out = logits.clone()
    B = out.shape[0]
    rep = _per_row(repetition_penalty, B, torch.float32)
    pres = _per_row(presence_penalty, B, torch.float32)
    freq = _per_row(frequency_penalty, B, torch.float32)
    for b in range(B):
        counts = token_counts[b].cpu()
        seen = counts > 0
        row = out[b]
        if float(rep[b]) != 1.0:
            row[seen] = torch.where(row[seen] > 0, row[seen] / rep[b], row[seen] * rep[b])
        if float(pres[b]) != 0.0:
            row[seen] = row[seen] - pres[b]
        if float(freq[b]) != 0.0:
            row -= freq[b] * counts.to(torch.float32)
    return out


def sampling_probs_ref(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    repetition_penalty: float | torch.Tensor = 1.0,
    presence_penalty: float | torch.Tensor = 0.0,
    frequency_penalty: float | torch.Tensor = 0.0,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final filtered, renormalized distribution ``[B, V]`` (fp32) in Hugging Face ``generate`` order.

    Row by row, with a full sort: top-k keeps every token whose value ties the k-th largest; top-p keeps a
    token iff the renormalized mass of the tokens with a strictly higher value (exclusive cumulative sum in
    descending order, taken at the start of the token's tie group) is below ``top_p``, so a tie group at the
    boundary is kept or dropped whole; min-p drops tokens with ``p < min_p * p_max``. Greedy rows
    (``temperature == 0`` or ``top_k == 1``) give a one-hot at the argmax (lowest index on ties).
    """
    z = apply_penalties_ref(logits.float(), token_counts, repetition_penalty, presence_penalty, frequency_penalty)
    B, V = z.shape
    temp = _per_row(temperature, B, torch.float32)
    ks = _per_row(top_k, B, torch.int64)
    ps = _per_row(top_p, B, torch.float32)
    mps = _per_row(min_p, B, torch.float32)
    out = torch.zeros(B, V, dtype=torch.float32)
    for b in range(B):
        row = z[b].cpu()
        if float(temp[b]) == 0.0 or int(ks[b]) == 1:
            out[b, int(row.argmax())] = 1.0
            continue
        row = row / temp[b]
        keep = row > float("-inf")
        k = int(ks[b])
        if 0 < k < V:
            kth = torch.sort(row, descending=True).values[k - 1]
            keep &= row >= kth
        if float(ps[b]) < 1.0:
            probs = torch.where(keep, torch.softmax(torch.where(keep, row, float("-inf")), dim=-1), 0.0)
            # rank by value (probs tie exactly where values do); a token's "mass before it" is the mass of the
            # tokens with a strictly higher value: a tie group is kept or dropped whole
            sorted_v, order = torch.sort(torch.where(keep, row, float("-inf")), descending=True)
            sorted_p = probs[order]
            exclusive = torch.cumsum(sorted_p, dim=-1) - sorted_p
            first_of_group = torch.searchsorted(-sorted_v, -sorted_v, side="left")
            keep_sorted = exclusive[first_of_group] < ps[b]
            keep_sorted[0] = True
            keep &= torch.zeros_like(keep).scatter(0, order, keep_sorted)
        if float(mps[b]) > 0.0:
            probs = torch.softmax(torch.where(keep, row, float("-inf")), dim=-1)
            keep &= probs >= mps[b] * probs.max()
        out[b] = torch.softmax(torch.where(keep, row, float("-inf")), dim=-1)
    return out


def sample_ref(logits: torch.Tensor, *, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Tokens ``[B]`` drawn (``torch.multinomial``) from :func:`sampling_probs_ref`."""
    probs = sampling_probs_ref(logits, **kwargs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sampler_simple_batch_ref(
    logits: torch.Tensor, noise: float = 1.0, temp: float = 1.0, *, generator: torch.Generator | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """argmax of ``logits / temp + U[0, noise)`` -> ``[B, 1]``; ``noise = 0`` is plain greedy."""
    if upcast:
        logits = logits.float()
    if temp == 0:
        return logits.argmax(dim=-1, keepdim=True)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    return torch.argmax(logits / temp + u * noise, dim=-1, keepdim=True)


# =========================================================================== beam candidates (issue 13)
# Hugging Face beam search / beam sampling, one step: what ``decodekit.beam_candidates`` is tested against.


def beam_logprobs_ref(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    token_counts: torch.Tensor | None = None,
    min_tokens_to_keep: int = 2,
) -> torch.Tensor:
    """The processed log-probabilities of one beam-search step, fp32 ``[R, V]`` (``-inf`` where filtered).

    ``log_softmax`` of the fp32 logits; the repetition penalty on those log-probabilities at every token with a
    nonzero count (``s * r`` where ``s < 0``, ``s / r`` otherwise); ``s / temperature``; top-k with
    ``k = max(top_k, min_tokens_to_keep)`` keeping every token tying the k-th; top-p keeping a token iff the
    softmax mass of the strictly higher values is below ``top_p`` or fewer than ``min_tokens_to_keep`` tokens are
    strictly higher (whole tie groups, where Hugging Face's sort keeps an arbitrary part of one).
    """
    s = torch.log_softmax(logits.float(), dim=-1)
    R, V = s.shape
    if token_counts is not None and repetition_penalty != 1.0:
        seen = token_counts.to(s.device) > 0
        s = torch.where(seen, torch.where(s < 0, s * repetition_penalty, s / repetition_penalty), s)
    if temperature != 1.0:
        s = s / temperature
    keep = s > float("-inf")
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), V)
        kth = torch.sort(s, dim=-1, descending=True).values[:, k - 1 : k]
        keep &= s >= kth
    if top_p < 1.0:
        for r in range(R):
            row = torch.where(keep[r], s[r], float("-inf"))
            vals, order = torch.sort(row, descending=True)
            probs = torch.softmax(vals, dim=-1)
            excl = torch.cumsum(probs, dim=-1) - probs
            start = torch.searchsorted(-vals, -vals, side="left")  # first position of each tie group
            keep_sorted = (excl[start] < top_p) | (start < min_tokens_to_keep)
            keep[r] &= torch.zeros_like(keep[r]).scatter(0, order, keep_sorted)
    return torch.where(keep, s, float("-inf"))


def beam_candidates_ref(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    num_beams: int,
    num_candidates: int | None = None,
    *,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    **filters,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Hugging Face's ``_beam_search``: ``(tokens, beams, scores)``, each ``[B, K]``.

    ``logits`` ``[B * N, V]`` (prompt-major: row ``b * N + n`` is beam ``n`` of prompt ``b``), ``beam_scores``
    ``[B * N]`` the running scores. Each candidate's score is ``beam_score + s`` with ``s`` from
    :func:`beam_logprobs_ref`; over the ``N * V`` scores of a prompt, the ``K`` (default ``2N``) best (ties: the
    lowest flat index ``n * V + token``), or ``K`` drawn without replacement from their softmax
    (``torch.multinomial``), in both cases ordered by score, descending.
    """
    s = beam_logprobs_ref(logits, **filters)
    R, V = s.shape
    B, N = R // num_beams, num_beams
    K = 2 * N if num_candidates is None else num_candidates
    acc = (s + beam_scores.float().reshape(R, 1)).reshape(B, N * V)
    if do_sample:
        idx = torch.multinomial(torch.softmax(acc, dim=-1), K, generator=generator)
        sc = acc.gather(1, idx)
        sc, order = torch.sort(sc, dim=-1, descending=True, stable=True)
        idx = idx.gather(1, order)
    else:
        sc, idx = torch.sort(acc, dim=-1, descending=True, stable=True)
        sc, idx = sc[:, :K], idx[:, :K]
    return idx % V, idx // V, sc


# =========================================================================== issue 14: diffusion block sampling,
# position selection and the rwkv package's sampler (references)


def rwkv_probs_ref(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0
) -> torch.Tensor:
    """The rwkv package's ``sample_logits`` distribution, row by row: fp64 ``[B, V]``.

    Its steps, in its order: ``p = softmax(logits.float())``; ``cutoff`` = the sorted-descending ``p`` at the first
    index where the cumulative sum reaches ``top_p``, and ``p[p < cutoff] = 0`` (the cutoff's ties survive); for
    ``0 < top_k < V`` everything below the ``top_k``-th largest ``p`` is zeroed; ``p ** (1 / T)`` (the temperature
    comes *after* the truncation); renormalize. ``temperature == 0`` means ``T = 1, top_p = 0`` (the argmax's tie
    group, drawn uniformly). Two documented choices where the package's result is an accident of its arithmetic:
    ``top_p >= 1`` keeps every token (the package's fp32 cumulative sum may fall just short of 1.0 and then keep
    only the argmax's group), and the ``top_k``-th value's tie group is kept whole (its ``argsort`` keeps an
    unspecified part of it). The temperature power is taken in float64.
    """
    x = logits.float()
    B, V = x.shape
    out = torch.zeros(B, V, dtype=torch.float64)
    for b in range(B):
        row = x[b].cpu()
        T, p_top = float(temperature), float(top_p)
        if T == 0.0:
            T, p_top = 1.0, 0.0
        p = torch.softmax(row, dim=-1)
        if p_top < 1.0:
            sp = torch.sort(p, descending=True).values
            cum = torch.cumsum(sp, dim=-1)
            cutoff = sp[int(torch.argmax((cum >= p_top).to(torch.int8)))]
            p = torch.where(p < cutoff, 0.0, p)
        if 0 < top_k < V:
            kth = torch.sort(p, descending=True).values[top_k - 1]
            p = torch.where(p < kth, 0.0, p)
        q = p.double() ** (1.0 / T) if T != 1.0 else p.double()
        out[b] = q / q.sum()
    return out


def _group_kept(vals_desc: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p on one row sorted by value (descending): a token is kept iff the mass of the tokens with a strictly
    higher value is below ``top_p`` (whole tie groups; the first group always)."""
    excl = torch.cumsum(probs, dim=-1) - probs
    first = torch.searchsorted(-vals_desc, -vals_desc, side="left")
    keep = excl[first] < top_p
    keep[first == 0] = True
    return keep


def block_probs_ref(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    order: str = "top_k_first",
) -> torch.Tensor:
    """The filtered distribution of every position of ``sample_block``: fp64 ``[B, L, V]``.

    Per position (Dream's ``sample_tokens`` / SDAR's sampler / ``sample``'s filters): values ``z = logits / T``
    (``T = 1`` when ``temperature == 0``: the confidences of a greedy step are taken on the untempered filtered
    distribution, as in Dream); top-k keeps every token tying the k-th largest; top-p keeps a token iff the mass of
    the strictly higher tokens is below ``top_p`` (a tie group kept or dropped whole), measured on the distribution
    renormalized over the top-k set (``order="top_k_first"``: Hugging Face, SDAR, llama.cpp) or on the full
    distribution before top-k (``"top_p_first"``: Dream). Then ``softmax`` over the kept tokens.
    """
    x = logits.float().cpu()
    B, L, V = x.shape
    out = torch.zeros(B, L, V, dtype=torch.float64)
    T = float(temperature) if temperature > 0 else 1.0
    for b in range(B):
        for i in range(L):
            z = (x[b, i] / T).double() if T != 1.0 else x[b, i].double()
            z32 = x[b, i] / T if T != 1.0 else x[b, i]  # the fp32 values the filters rank (ties as the ops see them)
            if not bool(torch.isfinite(z32).any()) or bool(torch.isnan(z32).any()) or bool((z32 == float("inf")).any()):
                continue
            keep = z32 > float("-inf")
            nfin = int(keep.sum())
            vals, idx = torch.sort(z32, descending=True)
            if 0 < top_k < nfin:
                keep &= z32 >= vals[top_k - 1]
            if top_p < 1.0:
                base = keep if order == "top_k_first" else z32 > float("-inf")
                pz = torch.where(base, z, float("-inf"))
                probs = torch.softmax(pz, dim=-1)
                kp = _group_kept(torch.where(base[idx], vals, float("-inf")), probs[idx], top_p)
                keep &= torch.zeros_like(keep).scatter(0, idx, kp)
            out[b, i] = torch.softmax(torch.where(keep, z, float("-inf")), dim=-1)
    return out


def block_confidence_ref(
    probs: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor, confidence: str
) -> torch.Tensor:
    """fp64 ``[B, L]`` confidence of ``tokens`` under the filtered distribution ``probs`` (:func:`block_probs_ref`):
    ``prob`` = ``probs[token]``; ``raw_prob`` = ``softmax(logits)[token]`` (no temperature, no filter: LLaDA's
    ``low_confidence``); ``margin`` = top-1 minus top-2 of ``probs`` (Dream's ``margin_confidence``);
    ``neg_entropy`` = ``sum p log p`` over the kept tokens (Dream's ``neg_entropy``: larger is more confident)."""
    tok = tokens.clamp(min=0)[..., None].cpu()
    if confidence == "prob":
        return probs.gather(-1, tok)[..., 0]
    if confidence == "raw_prob":
        return torch.softmax(logits.double().cpu(), dim=-1).gather(-1, tok)[..., 0]
    if confidence == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values if probs.shape[-1] > 1 else torch.cat(
            [probs, torch.zeros_like(probs)], dim=-1)
        return top2[..., 0] - top2[..., 1]
    if confidence == "neg_entropy":
        return torch.where(probs > 0, probs * probs.clamp(min=1e-300).log(), 0.0).sum(dim=-1)
    raise ValueError(confidence)


def sample_block_ref(
    logits: torch.Tensor, masked: torch.Tensor, input_ids: torch.Tensor | None = None, *,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, order: str = "top_k_first",
    confidence: str = "prob", generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_block`` in plain PyTorch: tokens int64 ``[B, L]`` and fp64 confidences ``[B, L]``.

    Masked positions draw from :func:`block_probs_ref` (``torch.multinomial``), or take the argmax of the logits
    (lowest index on ties) when ``temperature == 0``; their confidence is :func:`block_confidence_ref`'s (``random``:
    a uniform draw). Unmasked positions keep ``input_ids`` (``-1`` without them) with confidence ``-inf``; a masked
    position whose logits hold a NaN or ``+inf``, or are all ``-inf``, gives token ``-1`` and confidence NaN.
    """
    B, L, V = logits.shape
    probs = block_probs_ref(logits, temperature=temperature, top_k=top_k, top_p=top_p, order=order)
    x = logits.float().cpu()
    if temperature == 0:
        tokens = x.argmax(dim=-1)
    else:
        flat = probs.reshape(B * L, V)
        ok = flat.sum(dim=-1) > 0
        tokens = torch.zeros(B * L, dtype=torch.int64)
        if bool(ok.any()):
            tokens[ok] = torch.multinomial(flat[ok], 1, generator=generator)[:, 0]
        tokens = tokens.reshape(B, L)
    if confidence == "random":
        conf = torch.rand(B, L, generator=generator, dtype=torch.float64)
    else:
        conf = block_confidence_ref(probs, x, tokens, confidence)
    bad = torch.isnan(x).any(dim=-1) | (x == float("inf")).any(dim=-1) | (x == float("-inf")).all(dim=-1)
    m = masked.cpu()
    keep_ids = input_ids.cpu() if input_ids is not None else torch.full((B, L), -1, dtype=torch.int64)
    tokens = torch.where(m, torch.where(bad, -1, tokens), keep_ids)
    conf = torch.where(m, torch.where(bad, float("nan"), conf), float("-inf"))
    return tokens, conf


def transfer_schedule_ref(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: int64 ``[B, steps]``, ``k_i = M // S + (i < M % S)`` for ``M`` masked
    positions per row."""
    M = masked.sum(dim=1, keepdim=True).cpu()
    out = torch.zeros(M.shape[0], steps, dtype=torch.int64) + M // steps
    for b in range(M.shape[0]):
        out[b, : int(M[b, 0] % steps)] += 1
    return out


def select_positions_ref(
    confidence: torch.Tensor, masked: torch.Tensor, *, k: int | torch.Tensor | None = None,
    threshold: float | None = None, entropy_bound: float | None = None, block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Which masked positions to commit, row by row: bool ``[B, L]``.

    Candidates: masked positions inside ``block = (start, end)`` whose confidence is not NaN, ranked by confidence
    (descending; the lower position first on ties). ``k``: the first ``k`` of them (LLaDA's ``topk`` over the
    confidences). ``threshold``: every candidate with confidence ``>= threshold``, and the first one always
    (Fast-dLLM's parallel decoding rule). ``entropy_bound``: entropy ``= -confidence`` (``neg_entropy``) in
    ascending order, the longest prefix whose cumulative entropy is ``<= entropy_bound``, at least one (SDAR's
    entropy-bounded rule).
    """
    B, L = confidence.shape
    c = confidence.double().cpu()
    out = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        cand = [i for i in range(L) if bool(masked[b, i]) and not math.isnan(float(c[b, i]))
                and (block is None or block[0] <= i < block[1])]
        cand.sort(key=lambda i: (-float(c[b, i]), i))
        if not cand:
            continue
        if k is not None:
            kb = int(k[b]) if isinstance(k, torch.Tensor) else int(k)
            chosen = cand[:kb]
        elif threshold is not None:
            chosen = [cand[0]] + [i for i in cand[1:] if float(c[b, i]) >= threshold]
        else:
            chosen, total = [cand[0]], -float(c[b, cand[0]])
            for i in cand[1:]:
                total += -float(c[b, i])
                if not total <= entropy_bound:
                    break
                chosen.append(i)
        out[b, chosen] = True
    return out
