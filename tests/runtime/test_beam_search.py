"""Beam search and beam sampling in the runtime (issue 13): token- and score-exact against transformers'
``generate(num_beams=N)`` on random-weight GPT-2 / Llama directories and on stories260K (converted to a
transformers Llama), both backends, sampling statistics of the first step, bad input."""

from __future__ import annotations

import pytest
import torch

from decodekit.errors import UsageError
from decodekit.export import export_decoder
from decodekit.runtime import GenerationConfig, OnnxDecoder, load_backend

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 42, 8, 23, 11, 3], [9, 31, 4]]  # two prompts of different lengths (left padding)
NEW = 10


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, rope_theta=500.0, rms_norm_eps=1e-5,
                                   initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{"gpt2": (transformers model, eager decoder, directory), "llama": ...} (random weights, save_pretrained)."""
    root = tmp_path_factory.mktemp("beam_hf")
    torch.manual_seed(0)
    out = {}
    for name, model in (("gpt2", _gpt2()), ("llama", _llama())):
        model.save_pretrained(root / name)
        out[name] = (model, load_backend(root / name, "eager", max_batch=16), root / name)
    return out


@pytest.fixture(scope="module")
def onnx_gpt2(hf_models, tmp_path_factory):
    out = export_decoder(hf_models["gpt2"][2], tmp_path_factory.mktemp("beam_onnx") / "gpt2", progress=False)
    return OnnxDecoder(out.out_dir, "cpu", max_batch=16)


def _hf_beam(model, rows, n_beams, stop, pad, **kw):
    """transformers' generate on the left-padded rows: (sequences [B * nrs, S0 + L], scores, S0)."""
    s0 = max(len(r) for r in rows)
    ids = torch.full((len(rows), s0), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), s0, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s0 - len(r):] = torch.tensor(r)
        mask[i, s0 - len(r):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, num_beams=n_beams, max_new_tokens=NEW, eos_token_id=stop,
                             pad_token_id=pad, return_dict_in_generate=True, output_scores=True, min_length=0,
                             **kw)
    return out.sequences, out.sequences_scores, s0


def _assert_same(res, seqs, scores, s0, fill):
    assert len(res.tokens) == seqs.shape[0]
    for i, toks in enumerate(res.tokens):
        hf = seqs[i, s0:].tolist()
        assert hf[: len(toks)] == toks, f"sequence {i}: {toks} vs transformers {hf}"
        assert all(t == fill for t in hf[len(toks):]), f"sequence {i}: transformers' is longer: {hf}"
    torch.testing.assert_close(torch.tensor(res.scores), scores.float(), rtol=1e-4, atol=1e-4)


def _stop_midway(model, rows, pad):
    """A token transformers' best beam emits at step 4, used as the stop id (so some beam stops mid-way)."""
    seqs, _, s0 = _hf_beam(model, rows, 3, None, pad, do_sample=False, early_stopping=False)
    return int(seqs[0, s0 + 3])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("n_beams", [2, 3, 5])
def test_beam_search_matches_transformers(hf_models, name, n_beams):
    """Tokens and scores equal transformers' beam search: a batch of two prompts of different lengths, a stop id
    reached mid-way, length_penalty 0 and 1, early_stopping True / False / "never", all beams returned."""
    model, dec, _ = hf_models[name]
    pad = 7
    stop = _stop_midway(model, PROMPTS, pad)
    for lp in (0.0, 1.0):
        for es in (True, False, "never"):
            seqs, scores, s0 = _hf_beam(model, PROMPTS, n_beams, stop, pad, do_sample=False, length_penalty=lp,
                                        early_stopping=es, num_return_sequences=n_beams)
            res = dec.generate(PROMPTS, max_new_tokens=NEW, num_beams=n_beams, do_sample=False, length_penalty=lp,
                               early_stopping=es, num_return_sequences=n_beams, stop_ids=[stop])
            _assert_same(res, seqs, scores, s0, pad)
            assert any(t[-1] == stop for t in res.tokens) or all(len(t) == NEW for t in res.tokens)


def test_onnx_beam_search_matches_transformers_and_eager(hf_models, onnx_gpt2):
    """The ONNX Runtime backend (IO binding, KV cache gathered between the ping-pong storages): transformers'
    tokens and scores, and the eager backend's tokens."""
    model, dec, _ = hf_models["gpt2"]
    pad = 7
    stop = _stop_midway(model, PROMPTS, pad)
    seqs, scores, s0 = _hf_beam(model, PROMPTS, 3, stop, pad, do_sample=False, num_return_sequences=2)
    kw = dict(max_new_tokens=NEW, num_beams=3, do_sample=False, num_return_sequences=2, stop_ids=[stop])
    res = onnx_gpt2.generate(PROMPTS, **kw)
    _assert_same(res, seqs, scores, s0, pad)
    assert res.tokens == dec.generate(PROMPTS, **kw).tokens
    # the repetition penalty (applied in beam search too) reads each beam's token counts, reordered with the beams;
    # one prompt: transformers would also penalize the padding token of a left-padded batch
    seqs, scores, s0 = _hf_beam(model, PROMPTS[:1], 3, 0, pad, do_sample=False, repetition_penalty=1.5,
                                num_return_sequences=3)
    kw = dict(max_new_tokens=NEW, num_beams=3, do_sample=False, num_return_sequences=3, stop_ids=[0],
              repetition_penalty=1.5)
    res = onnx_gpt2.generate(PROMPTS[:1], **kw)
    _assert_same(res, seqs, scores, s0, pad)
    assert res.tokens == dec.generate(PROMPTS[:1], **kw).tokens


def _stories_as_transformers(model):
    """stories260K's weights in a transformers LlamaForCausalLM (q/k rows permuted from llama2.c's adjacent
    rotary pairs to transformers' halves)."""
    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)).eval()
    sd = model.state_dict()

    def halves(w, heads):
        return w.view(heads, c.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["tok_embeddings.weight"]}
    for i in range(c.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        new[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        new[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        new[q + "self_attn.q_proj.weight"] = halves(sd[p + "attn.wq.weight"], c.n_heads)
        new[q + "self_attn.k_proj.weight"] = halves(sd[p + "attn.wk.weight"], c.n_kv_heads)
        new[q + "self_attn.v_proj.weight"] = sd[p + "attn.wv.weight"]
        new[q + "self_attn.o_proj.weight"] = sd[p + "attn.wo.weight"]
        new[q + "mlp.gate_proj.weight"] = sd[p + "mlp.w1.weight"]
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.w2.weight"]
        new[q + "mlp.up_proj.weight"] = sd[p + "mlp.w3.weight"]
    hf.load_state_dict(new)
    return hf


def test_stories260k_beam_search_matches_transformers(stories_dir, stories_export_dir):
    """stories260K on both backends: transformers' beam search tokens and scores (N = 3, stop at BOS/EOS)."""
    eager = load_backend(stories_dir / "stories260K.bin", "eager", max_batch=6)
    hf = _stories_as_transformers(eager.model)
    rows = [eager.tokenizer.encode("Once upon a time", bos=True), eager.tokenizer.encode("Tom", bos=True)]
    seqs, scores, s0 = _hf_beam(hf, rows, 3, [1, 2], 0, do_sample=False, num_return_sequences=2)
    kw = dict(max_new_tokens=NEW, num_beams=3, do_sample=False, num_return_sequences=2, stop_ids=[1, 2])
    for dec in (eager, OnnxDecoder(stories_export_dir, "cpu", max_batch=6)):
        _assert_same(dec.generate(rows, **kw), seqs, scores, s0, 0)


def test_beam_sampling_same_seed_same_tokens_on_both_backends(hf_models, onnx_gpt2):
    """do_sample=True with the IndexTTS2 filters: one seed, the same tokens on ONNX Runtime and eager; another
    seed, other tokens."""
    _, dec, _ = hf_models["gpt2"]
    kw = dict(max_new_tokens=NEW, num_beams=3, temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0,
              length_penalty=0.0, stop_ids=[])
    a = onnx_gpt2.generate(PROMPTS, seed=11, **kw)
    assert a.tokens == dec.generate(PROMPTS, seed=11, **kw).tokens
    assert a.tokens != onnx_gpt2.generate(PROMPTS, seed=12, **kw).tokens
    assert all(len(t) == NEW for t in a.tokens)


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two-sample chi-square statistic of count vectors ``a``, ``b`` (cells with fewer than 10 expected pooled into
    one) and its 1e-4 upper quantile (Wilson-Hilferty)."""
    na, nb = a.sum(), b.sum()
    tot = a + b
    small = tot * min(na, nb) / (na + nb) < 10
    a = torch.cat([a[~small], a[small].sum()[None]])
    b = torch.cat([b[~small], b[small].sum()[None]])
    tot = a + b
    keep = tot > 0
    a, b, tot = a[keep], b[keep], tot[keep]
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum())
    df = len(tot) - 1
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    return stat, df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_first_step_distribution_matches_transformers(hf_models):
    """Beam sampling's first step: the best candidate of the K drawn without replacement has the distribution it
    has in transformers (its warpers with min_tokens_to_keep=2, torch.multinomial, then the sort by score; a
    two-sample chi-square over many draws), and every drawn candidate lies in transformers' kept set."""
    from decodekit.ops.sampling import beam_candidates

    model, _, _ = hf_models["llama"]
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float()  # [1, V]
    N, K, V = 3, 6, logits.shape[1]
    temp, top_k, top_p, rep = 0.9, 20, 0.95, 1.5
    procs = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(rep), transformers.TemperatureLogitsWarper(temp),
        transformers.TopKLogitsWarper(top_k, min_tokens_to_keep=2),
        transformers.TopPLogitsWarper(top_p, min_tokens_to_keep=2)])
    hf_s = procs(ids, torch.log_softmax(logits, -1))[0]  # transformers' processed scores of beam 0
    kept = torch.nonzero(hf_s > float("-inf")).flatten()
    assert len(kept) >= K  # else transformers' multinomial cannot draw K
    counts = torch.zeros(N, V, dtype=torch.int32)
    counts[:, ids[0]] = 1
    scores = torch.tensor([0.0, -1e9, -1e9])
    draws = 4000
    ours, theirs = torch.zeros(V), torch.zeros(V)
    for s in range(draws):
        tok, beam, _ = beam_candidates(logits.expand(N, -1), scores, N, num_candidates=K, do_sample=True,
                                       temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rep,
                                       token_counts=counts, seed=s)
        assert bool(torch.isin(tok[0], kept).all()) and bool((beam[0] == 0).all())
        assert len(set(tok[0].tolist())) == K  # without replacement
        ours[tok[0, 0]] += 1
    gen = torch.Generator().manual_seed(0)
    acc = torch.cat([hf_s, hf_s - 1e9, hf_s - 1e9])[None]  # transformers' flattened [1, N * V] scores
    probs = torch.softmax(acc, -1)
    for _ in range(draws):
        idx = torch.multinomial(probs, K, generator=gen)[0]
        theirs[idx[acc[0, idx].argmax()] % V] += 1
    stat, limit = _chi2_two_sample(ours, theirs)
    assert stat < limit, (stat, limit)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=9), "num_beams"),  # 2 prompts x 9 beams > max_batch=16
        (dict(num_beams=2, min_p=0.1), "min_p"),
        (dict(num_beams=2, early_stopping="soon"), "early_stopping"),
    ],
)
def test_bad_beam_arguments(hf_models, kw, match):
    _, dec, _ = hf_models["llama"]
    with pytest.raises(UsageError, match=match):
        dec.generate(PROMPTS, max_new_tokens=2, **kw)


def test_bad_beam_argument_types():
    with pytest.raises(TypeError, match="num_beams"):
        GenerationConfig(num_beams=2.0)
    with pytest.raises(TypeError, match="early_stopping"):
        GenerationConfig(early_stopping=None)


def test_cli_beam_search(stories_export_dir, capsys):
    """decodekit generate --num-beams 3 --no-do-sample: the text of the best beam, as from Python."""
    from decodekit.cli import main

    argv = ["generate", str(stories_export_dir), "--prompt", "Tom", "--num-beams", "3", "--no-do-sample",
            "--max-new-tokens", "12", "--early-stopping", "never", "--length-penalty", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = OnnxDecoder(stories_export_dir, "cpu", max_batch=3).generate(
        "Tom", max_new_tokens=12, num_beams=3, do_sample=False, early_stopping="never", length_penalty=0.0)
    assert out.startswith("Tom") and res.text[0].strip() in out


@pytest.mark.parametrize("io_binding", [True, False])
def test_onnx_reorder_cache_gathers_in_place(stories_export_dir, monkeypatch, io_binding):
    """reorder_cache: row i of the cache becomes old row index[i] (also 2 -> 3 rows), the next step sees it, the KV
    storages stay the same two tensors and nothing is allocated by torch's constructors; a bad index is refused."""
    dec = OnnxDecoder(stories_export_dir, "cpu", max_batch=4, io_binding=io_binding)
    ref = OnnxDecoder(stories_export_dir, "cpu", max_batch=4)
    prompts = torch.tensor([[1, 403, 261, 30], [1, 87, 29, 300]])
    pos, mask = torch.arange(4).expand(2, 4), torch.ones(2, 4, dtype=torch.long)
    dec.reset(2)
    dec.step(prompts, pos, mask)
    ptr = dec._kv.data_ptr()
    index = torch.tensor([1, 0, 1])

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("reorder_cache allocated a tensor")

    with monkeypatch.context() as m:
        for name in ("zeros", "empty", "full", "ones", "empty_like", "zeros_like"):
            m.setattr(torch, name, refuse)
        dec.reorder_cache(index)
    assert dec._kv.data_ptr() == ptr
    nxt = torch.tensor([[5], [6], [7]])
    got = dec.step(nxt, torch.full((3, 1), 4), torch.ones(3, 5, dtype=torch.long)).clone()
    ref.reset(3)
    ref.step(prompts[index], pos[index], mask[index])
    want = ref.step(nxt, torch.full((3, 1), 4), torch.ones(3, 5, dtype=torch.long))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bad_indices = (torch.tensor([0, 1, 1, 2, 0]), torch.tensor([[0]]), torch.tensor([0.0]), torch.tensor([0, 3]),
                   torch.tensor([-1]), torch.tensor([], dtype=torch.long))
    for bad in bad_indices:
        with pytest.raises(UsageError, match="reorder_cache"):
            dec.reorder_cache(bad)


def test_beam_candidates_under_torch_compile():
    """One opaque custom op: torch.compile(fullgraph=True) gives the eager result, sampling included."""
    from decodekit.ops.sampling import beam_candidates

    def step(logits, scores, seeds):  # noqa: ANN001, ANN202
        return beam_candidates(logits, scores, 3, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, seed=seeds)

    logits, scores, seeds = torch.randn(6, 100), -torch.rand(6), torch.tensor([3, 4])
    got = torch.compile(step, fullgraph=True)(logits, scores, seeds)
    assert all(torch.equal(a, b) for a, b in zip(got, step(logits, scores, seeds)))


def test_do_sample_false_is_greedy_with_one_beam(hf_models):
    """num_beams=1, do_sample=False: greedy decoding whatever the sampling fields say (as in transformers)."""
    _, dec, _ = hf_models["llama"]
    greedy = dec.generate(PROMPTS, max_new_tokens=6, temperature=0.0, stop_ids=[])
    res = dec.generate(PROMPTS, max_new_tokens=6, do_sample=False, temperature=1.3, top_k=3, seed=5, stop_ids=[])
    assert res.tokens == greedy.tokens and res.scores is None


def test_two_stop_ids_keep_three_candidates_per_beam(hf_models):
    """With two stop ids transformers keeps 3 * N candidates a step (1 + number of stop ids): same tokens and
    scores, a batch of two prompts."""
    model, dec, _ = hf_models["llama"]
    pad = 7
    stop = _stop_midway(model, PROMPTS, pad)
    stops = [stop, (stop + 1) % 97]
    seqs, scores, s0 = _hf_beam(model, PROMPTS, 2, stops, pad, do_sample=False, num_return_sequences=2)
    res = dec.generate(PROMPTS, max_new_tokens=NEW, num_beams=2, do_sample=False, num_return_sequences=2,
                       stop_ids=stops)
    _assert_same(res, seqs, scores, s0, pad)
