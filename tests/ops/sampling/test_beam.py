"""decodekit.beam_candidates (issue 13): the Triton kernel (under the interpreter here) and the PyTorch path
against the plain-PyTorch reference of one Hugging Face beam-search step and against transformers' own logits
processors; sampling without replacement checked against its exact law; bad arguments; a hypothesis fuzz."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decodekit.ops._dispatch import count_launches
from decodekit.ops.sampling import beam_candidates
from decodekit.ops.sampling.reference import beam_candidates_ref, beam_logprobs_ref

BACKENDS = ["torch", "triton"]
FILTERS = [
    {},  # beam search (do_sample=False): no warper
    {"temperature": 0.8, "top_k": 30, "top_p": 0.8, "repetition_penalty": 10.0},  # the IndexTTS2 settings
    {"top_p": 0.5},
    {"top_k": 7, "repetition_penalty": 0.7},
    {"top_k": 1, "top_p": 0.01},  # min_tokens_to_keep=2 overrides both
]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-4, 1e-5), (torch.bfloat16, 1e-4, 1e-5)]


def _inputs(B, N, V, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B * N, V, generator=gen) * 3).to(dtype)
    scores = -torch.rand(B * N, generator=gen) * 5  # distinct running scores: no ties between candidates
    counts = (torch.rand(B * N, V, generator=gen) < 0.1).to(torch.int32)
    return logits.to(device), scores.to(device), counts.to(device)


# small awkward sizes: every filter setting in fp32, fp16 / bf16 with beam search and the IndexTTS2 filters; the
# large vocabularies (more than one 2048-token tile under the interpreter, the IndexTTS2 V = 8194) in fp32 with those
_CASES = [(b, s, d, f) for b in BACKENDS for s in [(1, 1, 1), (2, 3, 101), (3, 2, 7)] for d in DTYPES
          for f in range(len(FILTERS)) if d is DTYPES[0] or f in (0, 1)]
_CASES += [(b, s, DTYPES[0], f) for b in BACKENDS for s in [(1, 5, 2049), (1, 3, 8194)] for f in (0, 1)]


@pytest.mark.parametrize("backend, shape, dtype_tol, filters_i", _CASES)
def test_matches_reference(backend, shape, dtype_tol, filters_i, device):
    (B, N, V), (dtype, atol, rtol), filters = shape, dtype_tol, FILTERS[filters_i]
    logits, scores, counts = _inputs(B, N, V, dtype, device)
    K = min(2 * N, N * V)
    tok, beam, sc = beam_candidates(logits, scores, N, num_candidates=K, token_counts=counts, backend=backend,
                                    **filters)
    rt, rb, rs = beam_candidates_ref(logits.cpu(), scores.cpu(), N, K, token_counts=counts.cpu(), **filters)
    assert tok.dtype == beam.dtype == torch.int64 and sc.dtype == torch.float32
    assert tok.shape == beam.shape == sc.shape == (B, K)
    torch.testing.assert_close(sc.cpu(), rs, atol=atol, rtol=rtol)
    # the same candidates, except that equal scores (equal fp16 / bf16 logits) may come in another order
    acc = (beam_logprobs_ref(logits.cpu(), token_counts=counts.cpu(), **filters) + scores.cpu()[:, None])
    acc = acc.reshape(B, N * V)
    unique = (acc[:, None, :] == rs[:, :, None]).sum(dim=2) == 1  # [B, K] no other token has this score
    assert dtype != torch.float32 or bool(unique.all())
    assert torch.equal(tok.cpu()[unique], rt[unique]) and torch.equal(beam.cpu()[unique], rb[unique])


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_path_runs_the_kernels(backend, device):
    logits, scores, _ = _inputs(2, 3, 50, torch.float32, device)
    with count_launches() as launches:
        beam_candidates(logits, scores, 3, backend=backend)
    want = {"beam_rows": 1, "beam_merge": 1} if backend == "triton" else {}
    assert {k: v for k, v in launches.items() if k.startswith("beam")} == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters, do_sample", [(f, i % 2 == 1) for i, f in enumerate(FILTERS[1:])],
                         ids=range(1, len(FILTERS)))
def test_kept_set_is_transformers(backend, filters, do_sample, device):
    """With K = N * V every kept token comes back: the kept set is exactly transformers' (its logits processors
    with min_tokens_to_keep=2 on the log-probabilities), with transformers' scores."""
    transformers = pytest.importorskip("transformers")
    B, N, V = 2, 2, 61
    logits, scores, counts = _inputs(B, N, V, torch.float32, device, seed=3)
    procs = [transformers.RepetitionPenaltyLogitsProcessor(filters.get("repetition_penalty", 1.0))]
    if "temperature" in filters:
        procs.append(transformers.TemperatureLogitsWarper(filters["temperature"]))
    if "top_k" in filters:
        procs.append(transformers.TopKLogitsWarper(filters["top_k"], min_tokens_to_keep=2))
    if "top_p" in filters:
        procs.append(transformers.TopPLogitsWarper(filters["top_p"], min_tokens_to_keep=2))
    # the repetition penalty processor reads the token history: one occurrence of each counted token
    hist = [torch.nonzero(c).flatten() for c in counts.cpu()]
    width = max(len(h) for h in hist)
    ids = torch.stack([torch.cat([h, h[:1].expand(width - len(h))]) for h in hist])
    hf = transformers.LogitsProcessorList(procs)(ids, torch.log_softmax(logits.cpu().float(), -1))
    acc = (hf + scores.cpu()[:, None]).reshape(B, N * V)
    tok, beam, sc = beam_candidates(logits, scores, N, num_candidates=N * V, token_counts=counts,
                                    do_sample=do_sample, seed=5, backend=backend, **filters)
    for b in range(B):
        ok = tok[b] >= 0
        got = sorted((beam[b][ok] * V + tok[b][ok]).tolist())
        assert got == torch.nonzero(acc[b] > float("-inf")).flatten().tolist()
        torch.testing.assert_close(sc[b][ok].cpu(), acc[b][beam[b][ok].cpu() * V + tok[b][ok].cpu()])
        assert (sc[b][~ok] == float("-inf")).all() and (beam[b][~ok] == -1).all()
        assert (sc[b][ok][1:] <= sc[b][ok][:-1]).all()


def _set_law(p: torch.Tensor, k: int) -> dict[tuple[int, ...], float]:
    """P(the set of k draws without replacement from p) for every k-subset (a sum over the draw orders)."""
    law = {}
    for subset in itertools.combinations(range(len(p)), k):
        total = 0.0
        for order in itertools.permutations(subset):
            pr, left = 1.0, 1.0
            for i in order:
                pr *= float(p[i]) / left
                left -= float(p[i])
            total += pr
        law[subset] = total
    return law


@pytest.mark.parametrize("backend, draws", [("torch", 4000), ("triton", 150)])
def test_sampling_without_replacement_has_the_exact_law(backend, draws, device):
    """do_sample=True: the set of K candidates has the law of K draws without replacement from the softmax of the
    N * V accumulated scores (chi-square over all K-subsets, one prompt per seed), each returned once, ordered by
    score."""
    N, V, K = 2, 2, 2
    logits = torch.tensor([[0.3, -0.4], [0.9, 0.0]], device=device)
    scores = torch.tensor([0.0, -0.5], device=device)
    acc = (torch.log_softmax(logits.cpu(), -1) + scores.cpu()[:, None]).reshape(-1)
    law = _set_law(torch.softmax(acc, -1), K)
    seeds = torch.arange(draws, dtype=torch.int64, device=device) * 7919 + 3  # one prompt per seed
    tok, beam, sc = beam_candidates(logits.repeat(draws, 1), scores.repeat(draws), N, num_candidates=K,
                                    do_sample=True, seed=seeds, backend=backend)
    flat = (beam * V + tok).cpu()
    assert (sc[:, 1:] <= sc[:, :-1]).all()
    seen = {s: 0 for s in law}
    for row in flat.tolist():
        assert len(set(row)) == K
        seen[tuple(sorted(row))] += 1
    chi2 = sum((seen[s] - draws * q) ** 2 / (draws * q) for s, q in law.items())
    df = len(law) - 1
    assert chi2 < df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3, (chi2, seen, law)
    # deterministic for a seed, and a prompt draws alone what it draws inside the batch (per-prompt seeds)
    again = beam_candidates(logits, scores, N, num_candidates=K, do_sample=True, seed=seeds[5:6], backend=backend)
    assert torch.equal(again[0][0], tok[5]) and torch.equal(again[1][0], beam[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_expands_beam_zero(backend, device):
    """Hugging Face's first step: beams 1.. at -1e9, so the K best all continue beam 0 (its top-K tokens)."""
    logits = torch.randn(1, 97, device=device).expand(4, 97).contiguous()
    scores = torch.tensor([0.0, -1e9, -1e9, -1e9], device=device)
    tok, beam, sc = beam_candidates(logits, scores, 4, backend=backend)
    assert (beam == 0).all()
    ref = torch.topk(torch.log_softmax(logits[0].cpu(), -1), 8)
    assert torch.equal(tok[0].cpu(), ref.indices)
    torch.testing.assert_close(sc[0].cpu(), ref.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_give_no_candidates(backend, device):
    """A NaN / +inf row contributes nothing; a prompt left with fewer than K kept tokens pads with -1 / -inf."""
    logits = torch.randn(4, 5, device=device)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("nan")
    tok, beam, sc = beam_candidates(logits, torch.zeros(4, device=device), 2, num_candidates=7, backend=backend)
    assert (beam[0][tok[0] >= 0] == 0).all() and int((tok[0] >= 0).sum()) == 5
    assert (tok[1] == -1).all() and (beam[1] == -1).all() and (sc[1] == float("-inf")).all()


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(num_beams=2.0), TypeError, "num_beams"),
        (dict(num_beams=4), ValueError, "num_beams"),  # 6 rows
        (dict(num_candidates=0), ValueError, "num_candidates"),
        (dict(num_candidates=300), ValueError, "num_candidates"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(min_tokens_to_keep=0), ValueError, "min_tokens_to_keep"),
        (dict(do_sample=1), TypeError, "do_sample"),
        (dict(beam_scores=torch.zeros(5)), ValueError, "beam_scores"),
        (dict(beam_scores=torch.zeros(6, dtype=torch.float64)), TypeError, "beam_scores"),
        (dict(token_counts=torch.zeros(6, 40)), TypeError, "token_counts"),
        (dict(token_counts=torch.zeros(6, 41, dtype=torch.int32)), ValueError, "token_counts"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(logits=torch.zeros(6, 40, dtype=torch.int32)), TypeError, "logits"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kw, exc, match):
    args = dict(logits=torch.randn(6, 40), beam_scores=torch.zeros(6), num_beams=3)
    args.update(kw)
    with pytest.raises(exc, match=match):
        beam_candidates(args.pop("logits"), args.pop("beam_scores"), args.pop("num_beams"), **args)


@st.composite
def _cases(draw):
    B, N = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    V = draw(st.sampled_from([1, 2, 5, 31, 64]))
    K = draw(st.integers(1, min(N * V, 12)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    filters = dict(
        temperature=draw(st.sampled_from([1.0, 0.7, 1.3])), top_k=draw(st.integers(0, V + 1)),
        top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.05])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8])),
        min_tokens_to_keep=draw(st.integers(1, 3)))
    seed = draw(st.integers(0, 2**31))
    return B, N, V, K, dtype, filters, draw(st.booleans()), seed


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_cases())
def test_fuzz_both_backends(case):
    """Random sizes and filters, both backends: every candidate is a kept token of the reference with its score,
    scores descend, no candidate twice, min(K, kept) valid ones; beam search returns the reference's K best
    scores; sampling is deterministic for a seed."""
    B, N, V, K, dtype, filters, do_sample, seed = case
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B * N, V, generator=gen) * 4).to(dtype)
    scores = -torch.rand(B * N, generator=gen) * 3
    counts = (torch.rand(B * N, V, generator=gen) < 0.2).to(torch.int32)
    ref = beam_logprobs_ref(logits, token_counts=counts, **filters)
    acc = (ref + scores[:, None]).reshape(B, N * V)
    n_kept = (acc > float("-inf")).sum(dim=1)
    for backend in BACKENDS:
        out = beam_candidates(logits, scores, N, num_candidates=K, do_sample=do_sample, seed=seed,
                              token_counts=counts, backend=backend, **filters)
        tok, beam, sc = out
        for b in range(B):
            ok = tok[b] >= 0
            assert int(ok.sum()) == min(K, int(n_kept[b])), backend
            flat = beam[b][ok] * V + tok[b][ok]
            assert len(set(flat.tolist())) == len(flat)
            assert (acc[b][flat] > float("-inf")).all(), backend
            torch.testing.assert_close(sc[b][ok], acc[b][flat], atol=1e-4, rtol=1e-5)
            assert (sc[b][ok][1:] <= sc[b][ok][:-1]).all()
            if not do_sample:
                best = torch.sort(acc[b], descending=True).values[: int(ok.sum())]
                torch.testing.assert_close(sc[b][ok], best, atol=1e-4, rtol=1e-5)
        if do_sample:
            again = beam_candidates(logits, scores, N, num_candidates=K, do_sample=True, seed=seed,
                                    token_counts=counts, backend=backend, **filters)
            assert all(torch.equal(x, y) for x, y in zip(out, again))
