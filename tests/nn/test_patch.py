"""decodekit.patch / unpatch on random-weight Hugging Face GPT-2 and Llama, decodekit's Decoder and stories260K.

Each check runs the patched model with the Triton kernels (interpreter on CPU) and compares with the original
model: fp32 logits within 1e-4 relative, gradients of every parameter too (training mode); fp16/bf16 logits
within 2x the error of the unpatched low-precision model against the fp32 one, plus a small atol. ``unpatch``
must restore the very same module objects and state_dict.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import decodekit
from decodekit.nn import GeluLinear, LayerNormLinear, RMSNormLinear, is_patched, patch, unpatch
from decodekit.ops._dispatch import count_launches

transformers = pytest.importorskip("transformers")

VOCAB = 101


def _hf_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _hf_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norm weights, so a dropped or misplaced norm weight cannot go unnoticed
        for mod in model.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return model


def _dk_decoder(arch: str) -> nn.Module:
    from decodekit.models.config import DecoderConfig
    from decodekit.models.decoder import Decoder

    kw = dict(n_kv_heads=2) if arch == "llama" else {}
    cfg = DecoderConfig(arch=arch, vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_seq_len=32, **kw)
    model = Decoder(cfg)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm,)) or type(mod).__name__ == "RMSNorm":
                mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.uniform_(-0.2, 0.2)
    return model


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if type(model).__name__ == "Decoder":
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        logits, _ = model(ids, pos, torch.ones_like(ids), all_logits=True)
        return logits
    return model(ids).logits


MODELS = {
    "hf_gpt2": (_hf_gpt2, 7),  # per layer c_attn, c_fc, c_proj (GELU) + final = 2 * 3 + 1 launches
    "hf_llama": (_hf_llama, 11),  # per layer q, k, v, gate, up + final
    "dk_gpt2": (lambda: _dk_decoder("gpt2"), 7),
    "dk_llama": (lambda: _dk_decoder("llama"), 11),
}


def _snapshot(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _assert_unpatched_exactly(model, before_modules, before_state):
    assert not is_patched(model)
    after = dict(model.named_modules())
    assert list(after) == list(before_modules)
    assert all(after[k] is before_modules[k] for k in after)
    state = model.state_dict()
    assert list(state) == list(before_state)
    assert all(state[k].data_ptr() == before_state[k].data_ptr() for k in state)


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_fp32_eval_and_training(name, device):
    factory, launches_per_forward = MODELS[name]
    model = factory().to(device)
    ids = torch.randint(0, VOCAB, (2, 5), device=device)
    before_modules, before_state = _snapshot(model), model.state_dict()

    model.eval()
    with torch.no_grad():
        ref = _run(model, ids)
    model.train()
    ref_train = _run(model, ids)
    ref_train.float().square().mean().backward()
    ref_grads = {id(p): (n, p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert patch(model, backend="triton") is model and is_patched(model)
    fused = [m for m in model.modules() if isinstance(m, (LayerNormLinear, RMSNormLinear, GeluLinear))]
    assert len(fused) == launches_per_forward
    # sharing, not copying: the fused modules hold the original Parameter objects
    assert all(id(p) in ref_grads for m in fused for p in m.parameters())

    model.eval()
    with torch.no_grad(), count_launches() as launches:
        out = _run(model, ids)
    assert launches["norm_linear_fwd"] == launches_per_forward
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    model.train()
    out_train = _run(model, ids)
    out_train.float().square().mean().backward()
    assert {id(p) for p in model.parameters()} == set(ref_grads)  # the same Parameter objects, none added
    for p in model.parameters():
        n, g = ref_grads[id(p)]
        scale = g.abs().max().item() + 1e-12
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"grad of {n}: {m}")

    unpatch(model)
    _assert_unpatched_exactly(model, before_modules, before_state)
    with torch.no_grad():
        torch.testing.assert_close(_run(model.eval(), ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "dk_llama"])
def test_patch_low_precision_2x_rule(name, dtype, atol, device):
    factory, _ = MODELS[name]
    model32 = factory().to(device).eval()
    ids = torch.randint(0, VOCAB, (2, 5), device=device)
    model = copy.deepcopy(model32).to(dtype)
    with torch.no_grad():
        ref32 = _run(model32, ids).double()
        low = _run(model, ids).double()
        patch(model, backend="triton")
        out = _run(model, ids).double()
    torch_err = (low - ref32).abs().max().item()
    err = (out - ref32).abs().max().item()
    assert err <= 2 * torch_err + atol, f"patched {err:.3g} vs PyTorch {dtype} {torch_err:.3g}"
    unpatch(model)


def test_patch_stories260k(stories_dir, device):
    model = decodekit.load_model(stories_dir / "stories260K.bin", device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), device=device)
    before_modules, before_state = _snapshot(model), model.state_dict()
    with torch.no_grad():
        ref = _run(model, ids)
        patch(model, backend="triton")
        with count_launches() as launches:
            out = _run(model, ids)
    # every block: wq, wk, wv, w1, w3; plus norm + lm_head
    assert launches["norm_linear_fwd"] == 5 * model.config.n_layers + 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    unpatch(model)
    _assert_unpatched_exactly(model, before_modules, before_state)


def test_patch_errors_and_attention_flag():
    model = _hf_gpt2()
    with pytest.raises(ValueError, match="nothing decodekit can fuse"):
        patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        patch("gpt2")
    patch(model, attention=True)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    # attention=True leaves attention untouched until an attention patcher is registered
    assert all(type(m).__name__ != "GPT2Attention" or type(m.c_proj).__name__ == "Conv1D" for m in model.modules())
    unpatch(model)


def test_patch_only_attention_is_a_no_op_without_attention_patchers(monkeypatch):
    patch_mod = importlib.import_module("decodekit.nn.patch")  # the module (decodekit.nn.patch is the function)
    monkeypatch.setattr(patch_mod, "ATTENTION_PATCHERS", [])
    model = _hf_llama()
    before = _snapshot(model)
    patch(model, norm_linear=False, attention=True)
    assert all(a is b for a, b in zip(_snapshot(model).values(), before.values()))
    unpatch(model)


def test_from_modules_shares_and_matches(device):
    ln, lin = nn.LayerNorm(48).to(device), nn.Linear(48, 20).to(device)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    fused = LayerNormLinear.from_modules(ln, lin, activation="gelu_tanh", backend="triton")
    assert fused.norm_weight is ln.weight and fused.norm_bias is ln.bias and fused.weight is lin.weight
    assert set(fused.state_dict()) == {"norm_weight", "norm_bias", "weight", "bias"}
    x = torch.randn(3, 48, device=device)
    torch.testing.assert_close(fused(x), nn.functional.gelu(lin(ln(x)), approximate="tanh"), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place update of the shared parameter is seen by the fused module
    torch.testing.assert_close(fused(x), nn.functional.gelu(lin(ln(x)), approximate="tanh"), rtol=1e-4, atol=1e-5)

    rms = nn.RMSNorm(48, eps=1e-6).to(device)
    fr = RMSNormLinear.from_modules(rms, lin, backend="triton")
    assert set(fr.state_dict()) == {"norm_weight", "weight", "bias"}
    torch.testing.assert_close(fr(x), lin(rms(x)), rtol=1e-4, atol=1e-5)
    gl = GeluLinear.from_modules(nn.GELU(), nn.Linear(48, 8).to(device), backend="triton")
    torch.testing.assert_close(gl(x), nn.functional.linear(nn.functional.gelu(x), gl.weight, gl.bias))


def test_module_constructors_and_errors():
    m = LayerNormLinear(16, 8, bias=False, norm_bias=False, activation="silu")
    assert set(m.state_dict()) == {"norm_weight", "weight"} and m(torch.randn(2, 16)).shape == (2, 8)
    r = RMSNormLinear(16, 4, dtype=torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16 and r(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    g = GeluLinear(16, 4, approximate="tanh")
    assert g(torch.randn(1, 16)).shape == (1, 4)
    with pytest.raises(ValueError, match="activation"):
        LayerNormLinear(16, 8, activation="relu")
    with pytest.raises(ValueError, match="norm has 12 features"):
        LayerNormLinear.from_modules(nn.LayerNorm(12), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="linear must be"):
        RMSNormLinear.from_modules(nn.RMSNorm(16), nn.Conv1d(16, 4, 1))
    with pytest.raises(ValueError, match="norm must be"):
        RMSNormLinear.from_modules(nn.LayerNorm(16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="GELU"):
        GeluLinear.from_modules(nn.ReLU(), nn.Linear(16, 4))
