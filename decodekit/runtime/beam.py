"""Beam search and beam sampling for :func:`~decodekit.runtime.loop.run_generation` (``num_beams > 1``).

Hugging Face ``generate(num_beams=N)`` semantics, step for step (transformers' ``_beam_search`` as of 4.52 and
still in 5.x, which the tests run against; it serves beam search and beam sampling alike):

* the ``B`` prompts are prefilled once (``B`` rows), then the KV cache is expanded to ``B * N`` beam rows by the
  backend's :meth:`reorder_cache` (a gather, on ONNX Runtime from one preallocated ping-pong storage into the
  other); beam 0 of each prompt starts at score 0, the others at ``-1e9`` so the first step expands one beam;
* each step, :func:`decodekit.beam_candidates` reads the step's logits in place (the IO-bound buffer: no copy)
  and returns the ``K = max(2, 1 + number of stop ids) * N`` best (or sampled) continuations per prompt with
  their accumulated scores: ``log_softmax``, repetition penalty on the log-probabilities, and, when sampling,
  temperature, top-k and top-p with ``min_tokens_to_keep = K / N`` (the sampling filters are not applied with
  ``do_sample=False``, as in Hugging Face);
* the scorer (:class:`BeamScorer`, tiny ``[B, K]`` tensors on the host): a candidate whose token is a stop id,
  or that reaches ``max_new_tokens``, finishes when it is among the first ``N``, scored
  ``score / generated_length ** length_penalty``; the ``N`` best others (a finished one at ``-1e9``) continue;
  ``early_stopping`` ``"true"`` / ``"false"`` / ``"never"`` decides, as Hugging Face's heuristic does, when no
  running beam can still improve the finished ones; the loop stops when no prompt can improve, or every
  candidate finished;
* the KV cache (and the token counts of the repetition penalty) are reordered by the chosen beams' parents
  before the next step, inside the backend's buffers.

The result holds the ``num_return_sequences`` best finished hypotheses of each prompt, best first (prompt-major),
with their scores. Differences from Hugging Face, all outside the tested settings: the repetition penalty counts
the prompt's real tokens (Hugging Face also penalizes the padding token of a left-padded batch); top-k / top-p
keep a tie group at the cut whole; where a prompt has fewer kept tokens than ``K`` with a nonzero probability
(Hugging Face's ``torch.multinomial`` raises there), the dead beams' ``-1e9`` candidates fill the list. The same
seed gives the same tokens on every backend that runs the same sampler path (CPU tensors: the PyTorch path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodekit.errors import UsageError
from decodekit.runtime.config import GenerationConfig

__all__ = ["BeamOutput", "BeamScorer", "run_beam_search"]

_NEG = -1.0e9  # Hugging Face's "excluded" score offset


class BeamScorer:
    """Hugging Face's finished-hypotheses bookkeeping for ``B`` prompts of ``N`` beams, ``K`` candidates a step.

    All state is small host tensors: running sequences ``[B, N, T]`` and scores ``[B, N]``, finished hypotheses
    ``[B, N, T]`` with their scores, lengths and flags, the per-prompt "improvement still possible" flag.
    """

    def __init__(self, config: GenerationConfig, batch: int, num_candidates: int, horizon: int,
                 stops: Sequence[int]) -> None:
        """``config`` gives ``num_beams``, ``length_penalty`` and ``early_stopping``; ``horizon`` is the most tokens
        a sequence may get (``max_new_tokens``, clipped), ``stops`` the stop ids."""
        B, N, T = batch, config.num_beams, horizon
        self.B, self.N, self.K, self.T = B, N, num_candidates, T
        self.length_penalty = config.length_penalty
        self.early_stopping = config.early_stopping
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.int64)
        self.run_seq = torch.full((B, N, T), -1, dtype=torch.int64)
        self.run_scores = torch.zeros(B, N)
        self.run_scores[:, 1:] = _NEG
        self.fin_seq = torch.full((B, N, T), -1, dtype=torch.int64)
        self.fin_scores = torch.full((B, N), _NEG)
        self.fin_len = torch.zeros(B, N, dtype=torch.int64)
        self.is_fin = torch.zeros(B, N, dtype=torch.bool)
        self.unsatisfied = torch.ones(B, 1, dtype=torch.bool)
        self.top_n = torch.arange(num_candidates) < N

    def step(self, t: int, tokens: torch.Tensor, beams: torch.Tensor, scores: torch.Tensor) -> tuple[
            torch.Tensor, bool]:
        """Take step ``t``'s candidates (``[B, K]`` tokens, beams, scores, ordered by score) -> the parent beam of
        each next running beam ``[B, N]`` (int64) and whether the search goes on."""
        B, N, T = self.B, self.N, self.T
        lp, early = self.length_penalty, self.early_stopping
        cand_seq = self.run_seq.gather(1, beams[:, :, None].expand(B, self.K, T)).clone()
        cand_seq[:, :, t] = tokens
        hits = torch.isin(tokens, self.stop_ids) | (t + 1 >= T)  # a stop id, or max_new_tokens reached
        # the N best unfinished candidates run on (finished ones only if fewer than N are left)
        run_cand = scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_cand, N, dim=1).indices
        self.run_seq = cand_seq.gather(1, nxt[:, :, None].expand(B, N, T))
        self.run_scores = run_cand.gather(1, nxt)
        parents = beams.gather(1, nxt)
        # the finished candidates among the first N, length-penalized, merged with the finished so far
        did = hits & self.top_n[None, :]
        fin = scores / float((t + 1) ** lp)
        full = self.is_fin.all(dim=1, keepdim=True) & (early == "true")
        fin = fin + full.to(torch.float32) * _NEG
        fin = fin + (~self.unsatisfied).to(torch.float32) * _NEG
        fin = fin + (~did) * _NEG
        m_seq = torch.cat((self.fin_seq, cand_seq), dim=1)
        m_sc = torch.cat((self.fin_scores, fin), dim=1)
        m_fin = torch.cat((self.is_fin, did), dim=1)
        m_len = torch.cat((self.fin_len, torch.full((B, self.K), t + 1, dtype=torch.int64)), dim=1)
        top = torch.topk(m_sc, N, dim=1).indices
        self.fin_seq = m_seq.gather(1, top[:, :, None].expand(B, N, T))
        self.fin_scores = m_sc.gather(1, top)
        self.is_fin = m_fin.gather(1, top)
        self.fin_len = m_len.gather(1, top)
        # can a running beam still beat the worst finished one? (Hugging Face's heuristic, per prompt)
        best_len = T if (early == "never" and lp > 0.0) else t + 1
        best_running = self.run_scores[:, :1] / float(best_len**lp)
        worst = torch.where(self.is_fin, self.fin_scores.min(dim=1, keepdim=True).values, _NEG)
        self.unsatisfied = self.unsatisfied & (best_running > worst).any(dim=1, keepdim=True)
        go_on = bool(self.unsatisfied.any()) and not (bool(self.is_fin.all()) and early == "true") and not bool(
            hits.all())
        return parents, go_on

    def best(self, count: int) -> tuple[list[list[int]], list[float]]:
        """The ``count`` best finished hypotheses of each prompt (prompt-major), with their scores."""
        seqs, scores = [], []
        for b in range(self.B):
            for i in range(count):
                n = int(self.fin_len[b, i])
                seqs.append(self.fin_seq[b, i, :n].tolist())
                scores.append(float(self.fin_scores[b, i]))
        return seqs, scores


@dataclass
class BeamOutput:
    """What :func:`run_beam_search` returns (the loop turns it into a ``GenerationResult``): the returned sequences
    (prompt-major, best first), their prompts and scores, and the timings."""

    tokens: list[list[int]]
    prompts: list[list[int]]
    scores: list[float]
    ttft: float
    decode_time: float
    total_time: float
    steps: int


def run_beam_search(
    model: Any,
    rows: list[list[int]],
    config: GenerationConfig,
    buf: Any,
    *,
    new_tokens: int,
    stops: set[int],
    step_seeds: Callable[[int], torch.Tensor],
    decode_stepper: Callable[..., Callable[[int], torch.Tensor]],
) -> BeamOutput:
    """Beam search / beam sampling over an opened step model; see the module docstring.

    ``rows`` are the checked prompts and ``buf`` the loop's per-generation buffers for them (left-padded prompt ids,
    attention mask and positions of every reachable slot), ``new_tokens`` the most tokens to generate
    (``max_new_tokens`` clipped to the model's ``max_seq_len``), ``stops`` the stop ids in effect, and
    ``step_seeds(t)`` the prompts' int64 ``[B]`` seeds of step ``t`` on the model's device, and
    ``decode_stepper(model, next_ids, positions, mask)`` the loop's one-token step over fixed buffers
    (:func:`decodekit.runtime.loop.decode_stepper`, passed in: this module is imported by the loop).
    """
    from decodekit.ops.sampling import beam_candidates  # lazy: keeps `import decodekit.runtime` light

    B, N = len(rows), config.num_beams
    R = B * N
    if R > model.max_batch:
        raise UsageError(f"num_beams={N} x {B} prompt(s) = {R} rows exceeds max_batch={model.max_batch} "
                         f"(open the decoder with max_batch >= {R})")
    if not hasattr(model, "reorder_cache"):
        raise UsageError(f"num_beams > 1 needs a backend that can reorder its KV cache; "
                         f"{type(model).__name__} has no reorder_cache")
    V = model.vocab_size
    factor = max(2, 1 + len(stops))  # Hugging Face: keep (1 + number of stop ids) * N, at least 2 * N
    K = factor * N
    if K > 256 or K > N * V:
        raise UsageError(f"num_beams={N} with {len(stops)} stop ids needs {K} candidates per step; "
                         f"at most min(256, num_beams * vocab_size) are supported")
    device = model.device
    sampling = config.do_sample and config.temperature > 0.0
    filters = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p) if sampling else {}
    expand = torch.arange(B, device=device).repeat_interleave(N)  # beam row b * N + n <- prompt b
    mask, positions = buf.mask.index_select(0, expand), buf.positions.index_select(0, expand)
    next_ids = torch.zeros(R, 1, dtype=torch.int64, device=device)
    beam_scores = torch.zeros(B, N, device=device)
    beam_scores[:, 1:] = _NEG
    beam_scores = beam_scores.reshape(R)
    counts = None
    if config.repetition_penalty != 1.0:  # which tokens each beam holds (prompt + output); two buffers, swapped
        counts = torch.zeros(2, R, V, dtype=torch.int32, device=device)
        for b, r in enumerate(rows):
            ids = torch.tensor(r, device=device)
            counts[0, b * N].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        counts[0] = counts[0, expand * N]
        ones = torch.ones(R, 1, dtype=torch.int32, device=device)
    cur = 0
    scorer = BeamScorer(config, B, K, new_tokens, stops)
    batch_offset = (torch.arange(B) * N)[:, None]
    identity = torch.arange(R)
    src_dev = torch.empty(R, dtype=torch.int64, device=device)  # the parents' rows, on the device (reused)
    model.reset(B)
    t0 = time.perf_counter()
    ttft = decode_start = 0.0
    logits = model.step(buf.prompt_ids, buf.positions[:, : buf.s0], buf.mask[:, : buf.s0])
    model.reorder_cache(expand)  # B prompt rows -> B * N beam rows
    logits = logits.index_select(0, expand)
    decode_step = decode_stepper(model, next_ids, positions, mask)  # the beams' fixed buffers
    steps = 0
    for t in range(new_tokens):
        if t > 0:
            total = buf.s0 + t
            logits = decode_step(total)
        tok, beam, sc = beam_candidates(
            logits, beam_scores, N, num_candidates=K, do_sample=sampling, seed=step_seeds(t),
            repetition_penalty=config.repetition_penalty, token_counts=None if counts is None else counts[cur],
            min_tokens_to_keep=factor, **filters)
        tok, beam, sc = tok.cpu(), beam.cpu(), sc.cpu()  # the step's one host sync: [B, K] candidates
        if bool((tok < 0).any()):
            raise UsageError("beam search: the model produced NaN or +inf logits (no finite candidates left)")
        if t == 0:
            ttft = time.perf_counter() - t0
            decode_start = time.perf_counter()
        parents, go_on = scorer.step(t, tok, beam, sc)
        steps = t
        if not go_on:
            break
        src_host = (batch_offset + parents).reshape(R)  # the parent row of each next beam row
        moved = not torch.equal(src_host, identity)  # every beam continuing itself needs no gather
        if moved:
            src = src_dev.copy_(src_host)
            model.reorder_cache(src)
        next_ids.copy_(scorer.run_seq[:, :, t].reshape(R, 1))
        beam_scores.copy_(scorer.run_scores.reshape(R))
        if counts is not None:
            if moved:
                torch.index_select(counts[cur], 0, src, out=counts[1 - cur])
                cur = 1 - cur
            counts[cur].scatter_add_(1, next_ids, ones)
    end = time.perf_counter()
    nrs = config.num_return_sequences
    seqs, seq_scores = scorer.best(nrs)
    return BeamOutput(tokens=seqs, prompts=[rows[i // nrs] for i in range(len(seqs))], scores=seq_scores, ttft=ttft,
                      decode_time=end - decode_start if steps > 0 else 0.0, total_time=end - t0, steps=steps)
