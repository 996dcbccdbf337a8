"""Attention kernels (prefill forward/backward, split-K decode) against the fp32 matmul+softmax reference.

Under ``make test`` the Triton kernels run in the interpreter on CPU tensors; under ``make gpu-check``
the same tests run compiled on CUDA (``device`` fixture). The low-precision rule is flash-attention's:
the kernel's error against the fp32 reference must stay within 2x PyTorch's own fp16/bf16 error
(the reference evaluated in the low precision) plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

from decodekit.ops._dispatch import count_launches
from decodekit.ops.attention import attention, decode_attention
from decodekit.ops.attention.reference import attention_ref, decode_attention_ref
from decodekit.ops.attention.triton import attention_config

# (dtype, atol): atol is the slack added to 2x PyTorch's own low-precision error
DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 4e-3, id="bf16"),
]


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floats, so any output element the kernel misses shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))


def _qkv(b, h, h_kv, s_q, s_k, d, dtype, device):
    q = torch.randn(b, h, s_q, d, device=device, dtype=dtype)
    k = torch.randn(b, h_kv, s_k, d, device=device, dtype=dtype)
    v = torch.randn(b, h_kv, s_k, d, device=device, dtype=dtype)
    return q, k, v


def _assert_within(name, got, ref, pt, atol):
    """max|got - ref| <= 2 max|pt - ref| + atol, treating matching infinities as equal."""
    got, ref, pt = got.double(), ref.double(), pt.double()
    same_inf = torch.isinf(ref) & (got == ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{name}: infinities differ from the reference"
    err = torch.where(same_inf, 0.0, got - ref).abs().max().item()
    pt_err = torch.where(torch.isinf(ref) & (pt == ref), 0.0, pt - ref).abs().max().item()
    assert err <= 2 * pt_err + atol, f"{name}: kernel error {err:.3g} > 2 x torch error {pt_err:.3g} + {atol}"


# (B, H, H_kv, S_q, S_k, D, causal, q_offset): lengths {1, 17, 128, 1000}, GQA {1, 2, 8}, D {32..256}
PREFILL_CASES = [
    pytest.param(1, 2, 2, 1, 1, 64, False, 0, id="len1"),
    pytest.param(1, 2, 1, 17, 17, 32, True, 0, id="len17-gqa2-d32-causal"),
    pytest.param(1, 8, 1, 17, 17, 80, True, 0, id="len17-gqa8-d80-causal"),
    pytest.param(1, 2, 2, 128, 128, 96, False, 0, id="len128-d96"),
    pytest.param(1, 2, 1, 17, 128, 128, True, 111, id="chunked-prefill-offset-d128"),
    pytest.param(2, 2, 1, 40, 17, 64, False, 0, id="sq-gt-sk"),
    pytest.param(1, 2, 1, 33, 70, 160, True, 37, id="d160-pads-to-256"),
    pytest.param(1, 4, 2, 20, 20, 64, True, -5, id="negative-offset-empty-rows"),
    pytest.param(1, 2, 2, 17, 70, 256, True, 0, id="d256-top-left-causal"),
]


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("b, h, h_kv, s_q, s_k, d, causal, q_offset", PREFILL_CASES)
def test_prefill_forward(b, h, h_kv, s_q, s_k, d, causal, q_offset, dtype, atol, device, nan_empty):
    q, k, v = _qkv(b, h, h_kv, s_q, s_k, d, dtype, device)
    with count_launches() as launches:
        out, lse = attention(q, k, v, causal, q_offset=q_offset, return_lse=True, backend="triton")
    assert launches["attn_fwd"] == 1
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, s_q)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref, ref_lse = attention_ref(q, k, v, causal, q_offset=q_offset, return_lse=True)
    pt, pt_lse = attention_ref(q, k, v, causal, q_offset=q_offset, upcast=False, return_lse=True)
    _assert_within("out", out, ref, pt, atol)
    _assert_within("lse", lse, ref_lse, pt_lse.float(), atol * 4)


@pytest.mark.parametrize("dtype, atol", [DTYPES[1]])
def test_prefill_forward_long(dtype, atol, device, nan_empty):
    """Length 1000 (many tiles, not a multiple of any block), causal, GQA 2, one head dim to keep it fast."""
    q, k, v = _qkv(1, 2, 1, 1000, 1000, 64, dtype, device)
    with count_launches() as launches:
        out = attention(q, k, v, causal=True, backend="triton")
    assert launches["attn_fwd"] == 1
    _assert_within("out", out, attention_ref(q, k, v, True), attention_ref(q, k, v, True, upcast=False), atol)


def test_prefill_noncontiguous_and_no_lse(device):
    """HF hands q/k/v as transposes of [B, S, H, D]: strided inputs work without copies."""
    q = torch.randn(2, 17, 4, 64, device=device).transpose(1, 2)
    k = torch.randn(2, 30, 2, 64, device=device).transpose(1, 2)
    v = torch.randn(2, 2, 64, 30, device=device).transpose(2, 3)
    with count_launches() as launches:
        out = attention(q, k, v, causal=True, q_offset=13, scale=0.3, backend="triton")
    assert launches["attn_fwd"] == 1
    torch.testing.assert_close(out, attention_ref(q, k, v, True, 0.3, 13), atol=2e-5, rtol=1e-5)


# (B, H, H_kv, S_q, S_k, D, causal, q_offset)
BACKWARD_CASES = [
    pytest.param(1, 4, 2, 17, 17, 64, True, 0, id="gqa2-causal"),
    pytest.param(1, 2, 1, 70, 70, 80, True, 0, id="multi-tile-d80"),
    pytest.param(1, 2, 2, 17, 40, 32, True, 23, id="offset"),
    pytest.param(1, 8, 1, 33, 50, 64, False, 0, id="mqa8-noncausal"),
    pytest.param(1, 2, 1, 20, 20, 32, True, -5, id="empty-rows"),
]


@pytest.mark.parametrize("b, h, h_kv, s_q, s_k, d, causal, q_offset", BACKWARD_CASES)
def test_prefill_backward_fp32(b, h, h_kv, s_q, s_k, d, causal, q_offset, device):
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, h_kv, s_q, s_k, d, torch.float32, device))
    with count_launches() as launches:
        out = attention(q, k, v, causal, q_offset=q_offset, backend="triton")
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
    assert {n: launches[n] for n in ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")} == {
        "attn_fwd": 1,
        "attn_bwd_preprocess": 1,
        "attn_bwd_dkdv": 1,
        "attn_bwd_dq": 1,
    }
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out = attention_ref(q64, k64, v64, causal, q_offset=q_offset)
    want = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and not torch.isnan(g).any(), name
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


def test_prefill_backward_bf16(device):
    dtype, atol = torch.bfloat16, 1e-2
    q, k, v = _qkv(1, 4, 2, 70, 70, 64, dtype, device)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with count_launches() as launches:
        got = torch.autograd.grad(attention(*leaves, causal=True, backend="triton"), leaves, dout)
    assert launches["attn_bwd_dkdv"] == 1 and launches["attn_bwd_dq"] == 1
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attention_ref(*ref_leaves, causal=True), ref_leaves, dout.float())
    pt_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    pt = torch.autograd.grad(attention_ref(*pt_leaves, causal=True, upcast=False), pt_leaves, dout)
    for name, g, w, p in zip(("dq", "dk", "dv"), got, want, pt):
        assert g.dtype == dtype
        _assert_within(name, g, w, p, atol)


def test_prefill_kv_start_forward_backward(device):
    """Left padding: keys before kv_start[b] are hidden; rows that see nothing are 0 (and get zero grads)."""
    q, k, v = (t.requires_grad_() for t in _qkv(3, 2, 1, 20, 20, 32, torch.float32, device))
    kv_start = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    with count_launches() as launches:
        out = attention(q, k, v, causal=True, kv_start=kv_start, backend="triton")
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
    assert launches["attn_fwd"] == 1 and launches["attn_bwd_dq"] == 1
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, causal=True, kv_start=kv_start)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert out[2, :, :19].abs().max() == 0  # row 2: queries before position 19 see no key
    for g, w in zip(got, torch.autograd.grad(ref, ref_leaves, dout.double())):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        attention(q, k, v, True, kv_start=kv_start, backend="torch").double(), ref, atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("causal, q_offset", [(False, 0), (True, 0), (True, 9), (True, -3)])
def test_torch_backend_matches_reference(causal, q_offset):
    q, k, v = _qkv(2, 4, 2, 11, 20, 32, torch.float32, "cpu")
    with count_launches() as launches:
        out = attention(q, k, v, causal, q_offset=q_offset)  # auto on CPU -> torch path
        out_lse, lse = attention(q, k, v, causal, q_offset=q_offset, return_lse=True, backend="torch")
    assert sum(launches.values()) == 0
    ref, ref_lse = attention_ref(q, k, v, causal, q_offset=q_offset, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out_lse, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    assert not torch.isnan(out).any()


# --------------------------------------------------------------------------- decode

# (B, H, H_kv, S_q, S_max, D, cache_seqlens)
DECODE_CASES = [
    pytest.param(3, 8, 2, 1, 70, 64, [0, 1, 70], id="gqa4-len0-1-max"),
    pytest.param(3, 4, 4, 4, 50, 128, [0, 2, 50], id="spec4-mha-d128"),
    pytest.param(2, 8, 1, 1, 130, 80, [129, 17], id="mqa8-d80"),
    pytest.param(2, 4, 2, 4, 33, 96, [33, 5], id="spec4-gqa2-d96"),
]


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("b, h, h_kv, s_q, s_max, d, lens", DECODE_CASES)
def test_decode(b, h, h_kv, s_q, s_max, d, lens, dtype, atol, num_splits, device, nan_empty):
    q = torch.randn(b, h, s_q, d, device=device, dtype=dtype)
    kc = torch.randn(b, h_kv, s_max, d, device=device, dtype=dtype)
    vc = torch.randn(b, h_kv, s_max, d, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    with count_launches() as launches:
        out = decode_attention(q, kc, vc, seqlens, num_splits=num_splits, backend="triton")
    assert launches["decode_split"] == 1 and launches["decode_merge"] == 1
    assert out.shape == q.shape and out.dtype == dtype and not torch.isnan(out).any()
    ref = decode_attention_ref(q, kc, vc, seqlens)
    _assert_within("out", out, ref, decode_attention_ref(q, kc, vc, seqlens, upcast=False), atol)
    # rows whose queries see no key are exact zeros (length 0; or query i with L - S_q + 1 + i <= 0)
    for row, n in enumerate(lens):
        for i in range(s_q):
            if n - s_q + 1 + i <= 0:
                assert out[row, :, i].abs().max() == 0
    torch.testing.assert_close(
        decode_attention(q, kc, vc, seqlens, backend="torch").double(),
        ref.double(),
        atol=atol + 2e-2 * (dtype != torch.float32),
        rtol=0,
    )


def test_decode_long_cache(device, nan_empty):
    """Cache length 1000 (many key tiles per split, lengths not multiples of the chunk), GQA 8, Sq 1, fp16."""
    dtype, atol = torch.float16, 1e-3
    q = torch.randn(2, 8, 1, 64, device=device, dtype=dtype)
    kc = torch.randn(2, 1, 1000, 64, device=device, dtype=dtype)
    vc = torch.randn(2, 1, 1000, 64, device=device, dtype=dtype)
    seqlens = torch.tensor([1000, 517], dtype=torch.int32, device=device)
    with count_launches() as launches:
        out = decode_attention(q, kc, vc, seqlens, num_splits=5, backend="triton")
    assert launches["decode_split"] == 1
    ref = decode_attention_ref(q, kc, vc, seqlens)
    _assert_within("out", out, ref, decode_attention_ref(q, kc, vc, seqlens, upcast=False), atol)


def test_decode_split_plan():
    cfg = attention_config("decode", 64, torch.float16, torch.device("cpu"), batch=1, kv_heads=1, s_max=100, rows=4)
    assert cfg.block_r >= 16 and cfg.chunk_size % cfg.block_n == 0
    assert (cfg.num_splits - 1) * cfg.chunk_size < 100 <= cfg.num_splits * cfg.chunk_size
    many = attention_config("decode", 64, torch.float16, torch.device("cpu"), s_max=100, num_splits=1000)
    assert many.num_splits == -(-100 // many.block_n)  # never more splits than key tiles


def test_decode_strided_views_and_kv_start(device):
    """Caches as views into a larger buffer, q as a transpose, left padding via kv_start; several splits."""
    buf = torch.randn(2, 3, 90, 64, device=device)
    kc, vc = buf[:, :2, :80], buf[:, 1:, 5:85]
    q = torch.randn(2, 4, 4, 64, device=device).transpose(1, 2)  # [B, H=4, S_q=4, D]
    seqlens = torch.tensor([80, 41], dtype=torch.int32, device=device)
    kv_start = torch.tensor([3, 38], dtype=torch.int64, device=device)
    with count_launches() as launches:
        out = decode_attention(q, kc, vc, seqlens, kv_start=kv_start, num_splits=4, backend="triton")
    assert launches["decode_split"] == 1
    ref = decode_attention_ref(q, kc, vc, seqlens, kv_start=kv_start)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attention(q, kc, vc, seqlens, kv_start=kv_start, backend="torch"), ref)


def test_decode_matches_prefill_on_last_positions(device):
    """Decode of the last S_q positions over a full cache equals causal prefill with q_offset = L - S_q."""
    q, k, v = _qkv(1, 4, 2, 3, 45, 32, torch.float32, device)
    full = torch.tensor([45], dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, full, num_splits=2, backend="triton")
    torch.testing.assert_close(out, attention(q, k, v, causal=True, q_offset=42, backend="triton"), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bad input


def _bad_prefill_cases():
    q, k = torch.randn(1, 6, 4, 32), torch.randn(1, 4, 4, 32)
    return [
        ((q, k, k), {}, ValueError, "multiple of k heads"),
        (
            (torch.randn(1, 4, 4, 32), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)),
            {},
            ValueError,
            "head dim of k",
        ),
        ((torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 5, 32)), {}, ValueError, "v shape"),
        ((torch.randn(2, 2, 4, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)), {}, ValueError, "k batch"),
        (
            (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32).half(), torch.randn(1, 2, 4, 32)),
            {},
            TypeError,
            "k must",
        ),
        ((torch.randn(2, 4, 32),) * 3, {}, ValueError, "q must have 4 dims"),
        ((torch.randn(1, 1, 4, 300),) * 3, {}, ValueError, "head dim of q"),
        ((torch.randn(1, 1, 4, 32),) * 3, {"scale": float("nan")}, ValueError, "scale"),
        ((torch.randn(1, 1, 4, 32),) * 3, {"q_offset": 1.5}, TypeError, "q_offset"),
        ((torch.randn(1, 1, 4, 32),) * 3, {"kv_start": torch.zeros(2, dtype=torch.int32)}, ValueError, "kv_start"),
        ((torch.randn(1, 1, 4, 32),) * 3, {"backend": "cuda"}, ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_prefill_cases())))
def test_attention_bad_input(case):
    args, kwargs, exc, match = _bad_prefill_cases()[case]
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


def test_decode_bad_input(device):
    q, kc = torch.randn(2, 4, 1, 32, device=device), torch.randn(2, 2, 16, 32, device=device)
    lens = torch.tensor([3, 16], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of k_cache heads"):
        decode_attention(torch.randn(2, 3, 1, 32, device=device), kc, kc, lens)
    with pytest.raises(ValueError, match="head dim of k_cache"):
        decode_attention(torch.randn(2, 4, 1, 64, device=device), kc, kc, lens)
    # lengths are read on the host by default for CPU tensors only (on CUDA it would synchronize): ask for it
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        decode_attention(q, kc, kc, torch.tensor([3, 17], dtype=torch.int32, device=device), backend="triton",
                         validate_lengths=True)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        decode_attention(q, kc, kc, torch.tensor([-1, 2], dtype=torch.int32, device=device), validate_lengths=True)
    if device.type == "cpu":  # the default check of CPU lengths
        with pytest.raises(ValueError, match="cache_seqlens must lie in"):
            decode_attention(q, kc, kc, torch.tensor([-1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        decode_attention(q, kc, kc, lens[:1])
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        decode_attention(q, kc, kc, lens.float())
    with pytest.raises(ValueError, match="new queries"):
        decode_attention(torch.randn(2, 4, 17, 32, device=device), kc, kc, lens)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kc, kc, lens, num_splits=0)
    with pytest.raises(TypeError, match="v_cache must"):
        decode_attention(q, kc, kc.double(), lens)


def test_decode_unchecked_lengths_are_clamped(device):
    """validate_lengths=False skips the host check; an out-of-range length is clamped in the kernel."""
    q, kc = torch.randn(1, 2, 1, 32, device=device), torch.randn(1, 2, 16, 32, device=device)
    bad = torch.tensor([1000], dtype=torch.int32, device=device)
    out = decode_attention(q, kc, kc, bad, validate_lengths=False, backend="triton")
    torch.testing.assert_close(out, decode_attention_ref(q, kc, kc, torch.tensor([16], device=device)))


# Compiled code generation: every attention kernel configuration is compiled for sm_90 / sm_100 with its
# resources checked in tests/ops/test_compile_sm90.py (bf16, fp16 and fp32, every head-dim class and flag).
