"""Block-diffusion generation (issue 14): decodekit.diffusion_generate on a random-weight LLaDA-shaped model (a
bidirectional Llama with a mask token), on ONNX Runtime (all-position logits, one IO-bound session) and in eager
PyTorch, against a plain port of LLaDA's ``generate`` (greedy, low-confidence remasking)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import decodekit
from decodekit.errors import UsageError
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder
from decodekit.runtime.diffusion import EagerDiffusionModel, OnnxDiffusionModel, diffusion_generate

MASK = 127
PROMPTS = [[5, 17, 33, 2], [9, 9, 40, 71]]


def llada_shaped(seed: int = 0) -> Decoder:
    """A small random bidirectional Llama with LLaDA's layout (mask token, GQA, halves rotary, untied head);
    weights scaled up so the distributions are peaked and the steps' decisions are not near-ties."""
    cfg = DecoderConfig(arch="llama", vocab_size=128, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                        max_seq_len=64, rope_layout="halves", tie_embeddings=False, causal=False, mask_id=MASK)
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def llada(tmp_path_factory):
    """(eager model, export directory with all-position logits): exported once per session."""
    from decodekit.export import export_decoder

    model = llada_shaped()
    out = tmp_path_factory.mktemp("llada") / "export"
    export_decoder(model, out, all_logits=True, progress=False, atol=1e-3)
    return model, out


def _block_causal_logits(model: Decoder, x: torch.Tensor, P: int, block_length: int, s: int, e: int) -> torch.Tensor:
    """Logits of x[:, s:e] after a cache rebuilt from scratch: the prompt, then each finished block in turn."""
    past, done = None, 0
    for a, b in [(0, P)] + [(t, t + block_length) for t in range(P, s, block_length)]:
        if b > a:
            ids = x[:, a:b]
            _, past = model(ids, torch.arange(a, b)[None].expand(x.shape[0], -1),
                            torch.ones(x.shape[0], b, dtype=torch.long), past, all_logits=True)
            done = b
    assert done == s
    logits, _ = model(x[:, s:e], torch.arange(s, e)[None].expand(x.shape[0], -1),
                      torch.ones(x.shape[0], e, dtype=torch.long), past, all_logits=True)
    return logits


def llada_generate_ref(model: Decoder, prompt: torch.Tensor, gen_length: int, block_length: int,
                       steps: int, kv_cache: bool = False) -> torch.Tensor:
    """LLaDA's generate (temperature 0, remasking='low_confidence') written out in plain PyTorch; ``kv_cache``:
    block-causal logits (the prompt and finished blocks as a prefix that does not see the later positions)."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), MASK, dtype=torch.long)
    x[:, :P] = prompt
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for blk in range(n_blocks):
        s, e = P + blk * block_length, P + (blk + 1) * block_length
        m = (x[:, s:e] == MASK).sum(dim=1, keepdim=True)
        num = (m // per_block).repeat(1, per_block)
        for b in range(B):
            num[b, : int(m[b, 0] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == MASK
            with torch.no_grad():
                if kv_cache:  # only the current block's logits exist; the other positions are never chosen
                    logits = torch.zeros(B, x.shape[1], model.config.vocab_size)
                    logits[:, s:e] = _block_causal_logits(model, x, P, block_length, s, e)
                else:
                    logits, _ = model(x, torch.arange(x.shape[1])[None].expand(B, -1), torch.ones_like(x), None,
                                      all_logits=True)
            logits[..., MASK] = float("-inf")  # as decodekit: the mask token is never committed
            x0 = logits.argmax(dim=-1)
            x0_p = torch.softmax(logits.double(), dim=-1).gather(-1, x0[..., None])[..., 0]
            x0_p[:, e:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for b in range(B):
                _, idx = torch.topk(conf[b], k=int(num[b, i]))
                transfer[b, idx] = True
            x[transfer] = x0[transfer]
    return x


@pytest.mark.parametrize("kv_cache", [False, True])
def test_llada_reference_eager_and_onnx_agree(llada, kv_cache):
    model, out = llada
    prompt = torch.tensor(PROMPTS)
    ref = llada_generate_ref(model, prompt, 16, 8, 8, kv_cache=kv_cache)
    eager = diffusion_generate(model, PROMPTS, 16, 8, 8, kv_cache=kv_cache)
    onnx = diffusion_generate(OnnxDiffusionModel(out, max_batch=2), PROMPTS, 16, 8, 8, kv_cache=kv_cache)
    assert torch.equal(eager.tokens, ref)
    assert torch.equal(onnx.tokens, ref)
    assert eager.steps == onnx.steps == 8
    assert not bool((onnx.tokens == MASK).any()) and torch.equal(onnx.tokens[:, :4], prompt)
    assert len(set(onnx.generated.flatten().tolist())) > 3  # a real generation, not one repeated token


@pytest.mark.parametrize("kw", [
    dict(temperature=0.8, top_k=20, top_p=0.95, confidence="prob"),
    dict(temperature=1.0, order="top_p_first", top_p=0.9, confidence="margin"),
    dict(temperature=0.7, confidence="random"),
    dict(threshold=0.6),
    dict(temperature=0.5, confidence="neg_entropy", entropy_bound=0.5),
])
@pytest.mark.parametrize("kv_cache", [False, True])
def test_same_tokens_on_both_backends(llada, kw, kv_cache):
    model, out = llada
    onnx_model = OnnxDiffusionModel(out, max_batch=2)
    a = diffusion_generate(model, PROMPTS, 16, 8, 8, seed=11, kv_cache=kv_cache, **kw)
    b = diffusion_generate(onnx_model, PROMPTS, 16, 8, 8, seed=11, kv_cache=kv_cache, **kw)
    assert torch.equal(a.tokens, b.tokens), kw
    assert not bool((b.tokens == MASK).any())
    c = diffusion_generate(onnx_model, PROMPTS, 16, 8, 8, seed=11, kv_cache=kv_cache, **kw)
    assert torch.equal(b.tokens, c.tokens)  # deterministic for a seed
    if "threshold" in kw or "entropy_bound" in kw:
        assert 2 <= b.steps <= 16  # at least one position per step, until each block is done


def test_one_session_and_bound_buffers_reused(llada):
    _, out = llada
    m = OnnxDiffusionModel(out, max_batch=2)
    session, binder = m.session, m._binder
    diffusion_generate(m, PROMPTS, 16, 8, 8)
    bound = dict(binder._last)
    ptr = m.logits(torch.full((2, 20), MASK)).data_ptr()
    res = diffusion_generate(m, PROMPTS, 16, 8, 8, temperature=0.5, confidence="prob", seed=1)
    assert m.session is session and m._binder is binder
    assert binder._last == bound  # same shapes: nothing was re-bound, only the token buffer changed
    assert m.logits(res.tokens).data_ptr() == ptr == m._logits.data_ptr()  # logits: a view of the bound output
    assert m.calls == 8 + 1 + 8 + 1


def test_worker_wait_and_threads_follow_the_decoder_rules(llada, monkeypatch, spin_config, bounded):
    """The diffusion session takes ``spin_wait`` / ``$DECODEKIT_ORT_SPIN`` and ``$DECODEKIT_ORT_THREADS`` exactly as
    :class:`OnnxDecoder` does (default: spin 5 us then block, never between steps); no policy changes the tokens;
    a bad argument or variable is refused naming it."""
    _, out = llada
    monkeypatch.delenv("DECODEKIT_ORT_SPIN", raising=False)
    monkeypatch.delenv("DECODEKIT_ORT_THREADS", raising=False)
    kw = dict(temperature=0.8, top_k=20, confidence="prob", seed=3)
    tokens = []
    for arg, env, (policy, config) in [
        (None, None, bounded("5us")),
        (True, None, (True, ("1", "", "1"))),
        (False, None, (False, ("0", "", ""))),
        ("20us", None, bounded("20us")),
        (None, "1", (True, ("1", "", "1"))),
        (None, "0", (False, ("0", "", ""))),
        (False, "1", (False, ("0", "", ""))),  # the argument wins
    ]:
        if env is not None:
            monkeypatch.setenv("DECODEKIT_ORT_SPIN", env)
        m = OnnxDiffusionModel(out, max_batch=2, intra_op_threads=2, spin_wait=arg)
        monkeypatch.delenv("DECODEKIT_ORT_SPIN", raising=False)
        assert m.spin_wait == policy and type(m.spin_wait) is type(policy), (arg, env)
        assert spin_config(m.session) == config, (arg, env)
        tokens.append(diffusion_generate(m, PROMPTS, 16, 8, 8, kv_cache=True, **kw).tokens)
    assert all(torch.equal(t, tokens[0]) for t in tokens)

    # unset: ORT's own count (0 in its options), not the decoder's one thread for small models (this one is small)
    assert OnnxDiffusionModel(out).session.get_session_options().intra_op_num_threads == 0
    monkeypatch.setenv("DECODEKIT_ORT_THREADS", " 3 ")
    assert OnnxDiffusionModel(out).session.get_session_options().intra_op_num_threads == 3
    for value in ("0", "two", "-1", "1.5", "4097", "9" * 5000):  # an earlier release ignored all but digits, took "0"
        monkeypatch.setenv("DECODEKIT_ORT_THREADS", value)
        with pytest.raises(UsageError, match="DECODEKIT_ORT_THREADS"):
            OnnxDiffusionModel(out)
    monkeypatch.delenv("DECODEKIT_ORT_THREADS")
    monkeypatch.setenv("DECODEKIT_ORT_SPIN", "yes")
    with pytest.raises(UsageError, match="DECODEKIT_ORT_SPIN"):
        OnnxDiffusionModel(out)
    monkeypatch.delenv("DECODEKIT_ORT_SPIN")
    for bad, exc in [(dict(spin_wait=1), TypeError), (dict(spin_wait="5"), UsageError),
                     (dict(intra_op_threads=0), UsageError), (dict(intra_op_threads=1.0), TypeError),
                     (dict(intra_op_threads=2**40), UsageError), (dict(device=0), TypeError)]:
        with pytest.raises(exc, match=next(iter(bad))):
            OnnxDiffusionModel(out, **bad)
        with pytest.raises(exc, match=next(iter(bad))):  # checked before the directory is read
            OnnxDiffusionModel(out.parent / "no-such-export", **bad)


def test_missing_model_file_is_named(llada, tmp_path):
    import shutil

    _, out = llada
    shutil.copytree(out, tmp_path / "export")
    (tmp_path / "export" / "model.onnx").unlink()
    with pytest.raises(UsageError, match="model.onnx is missing from the export directory"):
        OnnxDiffusionModel(tmp_path / "export")


def test_bad_arguments(llada):
    model, out = llada
    cases = [
        (dict(gen_length=12, block_length=8), UsageError, "multiple of block_length"),
        (dict(steps=7), UsageError, "multiple of the number of blocks"),
        (dict(confidence="entropy"), UsageError, "confidence"),
        (dict(threshold=0.5, entropy_bound=1.0), UsageError, "at most one"),
        (dict(gen_length=64), UsageError, "max_seq_len"),
        (dict(seed=-1), UsageError, "seed"),
    ]
    for kw, exc, msg in cases:
        args = dict(gen_length=16, block_length=8, steps=8)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            diffusion_generate(model, PROMPTS, **args)
    with pytest.raises(UsageError, match="device"):
        OnnxDiffusionModel(out, "tpu")
    with pytest.raises(UsageError, match="all_logits"):
        _last_position_export_refused(out)
    with pytest.raises(TypeError, match="kv_cache"):
        diffusion_generate(model, PROMPTS, 16, 8, 8, kv_cache=1)
    with pytest.raises(UsageError, match="same length"):
        diffusion_generate(model, [[1, 2], [3]], 8, 8, 8)
    with pytest.raises(TypeError, match="model"):
        diffusion_generate(3.5, PROMPTS, 8, 8, 8)
    with pytest.raises(UsageError, match=r"prompt token ids"):
        diffusion_generate(model, [[1, 500]], 8, 8, 8)
    causal = Decoder(DecoderConfig(arch="llama", vocab_size=32, dim=16, n_layers=1, n_heads=2))
    with pytest.raises(UsageError, match="causal"):
        EagerDiffusionModel(causal)
    assert decodekit.diffusion_generate is diffusion_generate


def _last_position_export_refused(out):
    """A copy of the export whose decodekit.json says last-position logits is refused."""
    import json
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp()) / "last"
    shutil.copytree(out, tmp)
    meta = json.loads((tmp / "decodekit.json").read_text())
    meta["logits"]["all_positions"] = False
    (tmp / "decodekit.json").write_text(json.dumps(meta))
    try:
        OnnxDiffusionModel(tmp)
    finally:
        shutil.rmtree(tmp.parent)


def test_config_causal_and_mask_id():
    cfg = llada_shaped().config
    assert DecoderConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(UsageError, match="causal"):
        DecoderConfig(arch="llama", vocab_size=32, dim=16, n_layers=1, n_heads=2, causal=1)
    with pytest.raises(UsageError, match="mask_id"):
        DecoderConfig(arch="llama", vocab_size=32, dim=16, n_layers=1, n_heads=2, mask_id=32)
    model = llada_shaped()
    ids = torch.randint(0, 100, (1, 6))
    later = ids.clone()
    later[0, 5] = MASK
    run = lambda t: model(t, torch.arange(6)[None], torch.ones_like(t), None, all_logits=True)[0]  # noqa: E731
    assert not torch.allclose(run(ids)[0, 0], run(later)[0, 0])  # bidirectional: a later token moves position 0


def test_sampling_dataclass_equals_keywords(llada):
    """The sampling parameters are one frozen dataclass (declared once); keywords override its fields."""
    from decodekit.runtime.config import DiffusionSampling

    model, _ = llada
    sp = DiffusionSampling(temperature=0.7, top_k=5, confidence="prob", seed=3)
    a = diffusion_generate(model, PROMPTS, 16, 8, 8, sp)
    b = diffusion_generate(model, PROMPTS, 16, 8, 8, temperature=0.7, top_k=5, confidence="prob", seed=3)
    c = diffusion_generate(model, PROMPTS, 16, 8, 8, sp, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    with pytest.raises(TypeError, match="top_n"):
        diffusion_generate(model, PROMPTS, 16, 8, 8, top_n=3)
    with pytest.raises(TypeError, match="sampling"):
        diffusion_generate(model, PROMPTS, 16, 8, 8, {"temperature": 1.0})
