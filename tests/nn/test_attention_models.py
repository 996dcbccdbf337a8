"""decodekit attention inside models: transformers' registry (GPT-2, Llama), patch/unpatch, and the Decoder hook.

The kernels run under Triton's interpreter here (``count_launches`` proves it) with tiny random-weight
models; logits must match the models' own eager attention.
"""

from __future__ import annotations

import copy

import pytest
import torch

import decodekit
from decodekit.models.config import DecoderConfig
from decodekit.models.decoder import Decoder
from decodekit.nn import attention as nn_attention
from decodekit.nn.attention import patch_attention, unpatch_attention
from decodekit.ops._dispatch import count_launches
from decodekit.ops.attention import decoder_attention, left_padding_starts

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _hf_config(arch: str):
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )


def _hf_model(arch: str, attn_implementation: str, device):
    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    return cls._from_config(copy.deepcopy(_hf_config(arch)), attn_implementation=attn_implementation).to(device).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_attn_implementation_decodekit_matches_eager(arch, device):
    eager = _hf_model(arch, "eager", device)
    ours = _hf_model(arch, "decodekit", device)
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, VOCAB, (2, 19), device=device)
    fallbacks = sum(nn_attention.FALLBACK_CALLS.values())
    with torch.no_grad():
        with count_launches() as launches:
            want = eager(ids).logits
        assert sum(launches.values()) == 0  # eager really is eager
        with count_launches() as launches:
            got = ours(ids).logits
        assert launches["attn_fwd"] == 2  # one prefill launch per layer
        # greedy generation with a KV cache: prefill, then decode steps through the split-K kernel
        gen_want = eager.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with count_launches() as launches:
            gen_got = ours.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert launches["decode_split"] == 2 * 2 and launches["decode_merge"] == 2 * 2  # 2 steps x 2 layers
    assert sum(nn_attention.FALLBACK_CALLS.values()) == fallbacks
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(gen_got, gen_want)


def test_hf_padded_batch_falls_back_correctly(device):
    """A padded batch carries a mask: transformers' SDPA handles it (counted), results stay right."""
    eager = _hf_model("llama", "eager", device)
    ours = _hf_model("llama", "decodekit_triton", device)
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, VOCAB, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    before = nn_attention.FALLBACK_CALLS["attention_mask"]
    with torch.no_grad():
        want = eager(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert nn_attention.FALLBACK_CALLS["attention_mask"] == before + 2
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patch_attention_and_unpatch(arch, device):
    model = _hf_model(arch, "eager", device)
    ids = torch.randint(0, VOCAB, (1, 17), device=device)
    with torch.no_grad():
        want = model(ids).logits
        patch_attention(model)
        assert model.config._attn_implementation == "decodekit"
        with pytest.raises(ValueError, match="already patched"):
            patch_attention(model)
        with count_launches() as launches:
            got = model(ids).logits
        assert launches["attn_fwd"] == 2
        unpatch_attention(model)
        assert model.config._attn_implementation == "eager"
        with count_launches() as launches:
            again = model(ids).logits
        assert sum(launches.values()) == 0
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(again, want)


def test_decodekit_patch_runs_attention_kernels_with_backward(device):
    """decodekit.patch(model, attention=True) (norm+linear off): kernels forward and backward, then unpatch."""
    model = _hf_model("llama", "eager", device)
    ids = torch.randint(0, VOCAB, (1, 11), device=device)
    want = model(ids).logits
    (want_grad,) = torch.autograd.grad(want.square().sum(), [model.model.layers[0].self_attn.q_proj.weight])
    decodekit.patch(model, norm_linear=False, attention=True, backend="triton")
    assert model.config._attn_implementation == "decodekit_triton"
    with count_launches() as launches:
        got = model(ids).logits
        (grad,) = torch.autograd.grad(got.square().sum(), [model.model.layers[0].self_attn.q_proj.weight])
    assert launches["attn_fwd"] == 2 and launches["attn_bwd_dkdv"] == 2 and launches["attn_bwd_dq"] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-3)
    decodekit.unpatch(model)
    assert model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------- decodekit Decoder


def _decoder_pair(arch: str, device):
    kw = {"n_kv_heads": 2} if arch == "llama" else {}
    cfg = DecoderConfig(arch=arch, vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_seq_len=64, **kw)
    torch.manual_seed(0)
    ref = Decoder(cfg).to(device).eval()
    fast = Decoder(cfg, use_kernels=True).to(device).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_use_kernels_matches_reference(arch, device):
    """Left-padded batch: prefill (prefill kernel with kv_start) then two decode steps (split-K kernel)."""
    ref, fast = _decoder_pair(arch, device)
    ids = torch.randint(0, VOCAB, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded by 3
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want, past_w = ref(ids, pos, mask, all_logits=True)
        with count_launches() as launches:
            got, past_g = fast(ids, pos, mask, all_logits=True)
        assert launches["attn_fwd"] == 2
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
        nxt = want[:, -1].argmax(-1, keepdim=True)
        with count_launches() as launches:
            for _ in range(2):  # decode steps
                pos = pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                want, past_w = ref(nxt, pos, mask, past_w)
                got, past_g = fast(nxt, pos, mask, past_g)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
                nxt = want.argmax(-1, keepdim=True)
    assert launches["decode_split"] == 2 * 2


def test_decodekit_patch_sets_decoder_use_kernels(device):
    ref, _ = _decoder_pair("llama", device)
    decodekit.patch(ref, norm_linear=False, attention=True)
    assert ref.use_kernels is True
    decodekit.unpatch(ref)
    assert ref.use_kernels is False


def test_decoder_attention_rejects_holes_in_the_mask():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="left padding only"):
        decoder_attention(q, k, k, torch.tensor([[1, 0, 1, 1, 1]]), 0.25)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        decoder_attention(q, k, k, torch.ones(1, 4), 0.25)
    assert left_padding_starts(torch.tensor([[0, 0, 1], [1, 1, 1], [0, 0, 0]])).tolist() == [2, 0, 3]
