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
