"""Decoder building blocks: config round trip, rotary layouts, attention masking, the kernel hook."""

from __future__ import annotations

import pytest
import torch

from decodekit.errors import UsageError
from decodekit.models import Decoder, DecoderConfig
from decodekit.models import attention as attention_mod


def _cfg(**kw):
    base = dict(arch="llama", vocab_size=37, dim=24, n_layers=2, n_heads=6, n_kv_heads=3, hidden_dim=40,
                max_seq_len=64)
    base.update(kw)
    return DecoderConfig(**base)


def test_config_json_round_trip_and_validation():
    cfg = _cfg(rope_layout="halves", stop_ids=[2, 5])
    assert DecoderConfig.from_json(cfg.to_json()) == cfg
    assert (cfg.head_dim, cfg.kv_dim) == (4, 12)
    with pytest.raises(UsageError, match="unknown DecoderConfig field"):
        DecoderConfig.from_dict({**cfg.to_dict(), "rope_scaling": 2})
    with pytest.raises(UsageError, match="unknown architecture 'mamba'"):
        _cfg(arch="mamba")
    with pytest.raises(UsageError, match="multiple of config.n_kv_heads"):
        _cfg(n_kv_heads=4)
    with pytest.raises(UsageError, match="rope_layout"):
        _cfg(rope_layout="interleaved")
    with pytest.raises(UsageError, match="n_layers"):
        _cfg(n_layers=0)


@torch.no_grad()
def test_rotary_layouts_agree_after_permuting_wq_wk():
    """An "adjacent" model equals a "halves" model whose wq/wk rows are permuted per head (the README's fact)."""
    adj = Decoder(_cfg(rope_layout="adjacent")).eval()
    hal = Decoder(_cfg(rope_layout="halves")).eval()
    hal.load_state_dict(adj.state_dict())
    d = adj.config.head_dim
    perm_in_head = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # adjacent index -> halves slot
    for la, lh in zip(adj.layers, hal.layers):
        for name, heads in (("wq", adj.config.n_heads), ("wk", adj.config.n_kv_heads)):
            w = getattr(la.attn, name).weight
            perm = torch.cat([h * d + perm_in_head for h in range(heads)])
            getattr(lh.attn, name).weight.copy_(w[perm])
    ids = torch.randint(0, 37, (2, 9))
    pos, mask = torch.arange(9).expand(2, 9), torch.ones(2, 9, dtype=torch.long)
    la, _ = adj(ids, pos, mask, all_logits=True)
    lh, _ = hal(ids, pos, mask, all_logits=True)
    torch.testing.assert_close(la, lh, atol=1e-5, rtol=1e-5)
    # and rotary matters: without the permutation the halves model differs
    hal.load_state_dict(adj.state_dict())
    assert (hal(ids, pos, mask, all_logits=True)[0] - la).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_padding_is_invisible_and_cache_is_equivalent(arch):
    cfg = _cfg(arch=arch, n_kv_heads=6 if arch == "gpt2" else 3)
    model = Decoder(cfg).eval()
    ids = torch.randint(0, 37, (1, 7))
    pos, mask = torch.arange(7)[None], torch.ones(1, 7, dtype=torch.long)
    ref, ref_presents = model(ids, pos, mask, all_logits=True)
    # the same prompt after 4 pads of token 0 whose mask is 0: identical logits on the real positions
    pids = torch.cat([torch.full((1, 4), 5), ids], 1)
    pmask = torch.cat([torch.zeros(1, 4, dtype=torch.long), mask], 1)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    got, presents = model(pids, ppos, pmask, all_logits=True)
    assert torch.isfinite(got).all() and all(torch.isfinite(t).all() for kv in presents for t in kv)
    torch.testing.assert_close(got[:, 4:], ref, atol=1e-5, rtol=1e-5)
    # P = 0 with an explicit empty cache == no cache; prefill 4 + decode 3 == one prefill of 7
    empty, _ = model(ids, pos, mask, model.empty_cache(1), all_logits=True)
    torch.testing.assert_close(empty, ref, atol=0, rtol=0)
    _, past = model(ids[:, :4], pos[:, :4], mask[:, :4])
    tail, presents = model(ids[:, 4:], pos[:, 4:], mask, past, all_logits=True)
    torch.testing.assert_close(tail, ref[:, 4:], atol=1e-5, rtol=1e-5)
    for (k, v), (rk, rv) in zip(presents, ref_presents):
        assert k.shape == (1, cfg.n_kv_heads, 7, cfg.head_dim)
        torch.testing.assert_close((k, v), (rk, rv), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_use_kernels_goes_through_the_hook(monkeypatch):
    calls = []

    def fake_kernel(q, k, v, attention_mask, scale):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(attention_mask.shape), scale))
        return attention_mod.attend_reference(q, k, v, attention_mask, scale)

    monkeypatch.setattr(attention_mod, "kernel_attend", fake_kernel)
    model = Decoder(_cfg()).eval()
    ids, pos, mask = torch.randint(0, 37, (2, 5)), torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.long)
    ref, _ = model(ids, pos, mask)
    model.use_kernels = True
    got, _ = model(ids, pos, mask)
    assert calls == [((2, 6, 5, 4), (2, 3, 5, 4), (2, 5), 0.5)] * 2
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["adjacent", "halves"])
@pytest.mark.parametrize("d", [2, 8, 14, 128])
def test_rotary_export_form_is_bit_identical(monkeypatch, layout, d):
    """Under ONNX export apply_rotary swaps pairs with a MatMul by swap_matrix (one graph node instead of three);
    on finite inputs the result must be bit-identical to the eager flip. A non-finite element spreads to its whole
    head vector in the MatMul form (0 * inf = NaN); the next q.k product spreads it there in both forms anyway."""
    from decodekit.models.layers import apply_rotary, rotary_cos_sin, rotary_inv_freq

    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, 5, d, generator=g) * 100
    pos = torch.randint(0, 4096, (2, 5), generator=g)
    cos, sin = rotary_cos_sin(pos, rotary_inv_freq(d, 10000.0), layout)
    eager = apply_rotary(x, cos, sin, layout)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    bad[1, 2, 4, d - 1] = float("nan")
    eager_bad = apply_rotary(bad, cos, sin, layout)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(apply_rotary(x, cos, sin, layout), eager)
    exported_bad = apply_rotary(bad, cos, sin, layout)
    assert not torch.isfinite(eager_bad).all()
    hit = ~torch.isfinite(eager_bad).all(dim=-1)  # head vectors holding a non-finite value
    assert torch.isfinite(exported_bad[~hit]).all() and not torch.isfinite(exported_bad[hit]).any()
    assert torch.equal(exported_bad[~hit], eager_bad[~hit])
