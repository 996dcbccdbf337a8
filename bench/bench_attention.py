"""Attention: decodekit's Triton kernels vs PyTorch (eager math and ``scaled_dot_product_attention``).

Prefill (issue 6): B 4, H 32, D 128, H_kv 32 (MHA) or 8 (GQA), S = S_q = S_k in {1k, 2k, 4k, 8k, 16k}, causal
and not, bf16; forward, and forward + backward (``torch.autograd.grad`` of q, k, v with a fixed output
gradient). Implementations: ``eager`` (matmul, fp32 softmax, matmul; k/v repeated for GQA) is the baseline
where its ``S x S`` score matrices fit (S <= 4096; beyond that it is skipped and the group has no ratio
column, only times and TFLOP/s), ``sdpa-flash`` (SDPA forced to its flash backend; given k/v repeated
outside the timed call if that torch's flash backend rejects ``enable_gqa``) and ``decodekit``.
FLOPs: forward ``4 * B * H * S_q * S_k * D`` (two matmuls), halved for causal; forward + backward is
3.5x the forward (the backward's five matmuls count 2.5x, the convention of the FlashAttention papers).

Decode: B in {1, 32, 128}, cache length L in {1k, 4k, 16k, 32k} (every row full), H 32, H_kv 8, D 128, one
query token, bf16. Implementations: ``sdpa`` (baseline: ``scaled_dot_product_attention`` with GQA, no
mask, whatever backend it picks), ``decodekit`` (split-K ``decode_attention``) and ``copy`` (a device
memcpy of the same number of KV bytes, the bandwidth yardstick). Bytes: the KV read, ``2 * B * H_kv * L
* D * 2``; the copy entry counts its read + write.

CUDA only: on CPU every case is skipped with that reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.conftest import cuda_only, run_bench

pytestmark = cuda_only("CUDA benchmark: the attention Triton kernels are only timed compiled on a GPU")

DTYPE = torch.bfloat16
B, H, D = 4, 32, 128
SEQS = [1024, 2048, 4096, 8192, 16384]
EAGER_MAX_S = 4096


def _eager(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


@functools.cache
def _flash_supports_gqa() -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=DTYPE)
    k = torch.randn(1, 2, 128, 64, device="cuda", dtype=DTYPE)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except (RuntimeError, TypeError):
        return False
    return True


def _sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def _decodekit(q, k, v, causal):
    import decodekit

    return decodekit.attention(q, k, v, causal=causal, backend="triton")


@pytest.mark.parametrize("impl", ["eager", "sdpa-flash", "decodekit"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("h_kv", [32, 8], ids=["mha", "gqa8"])
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_prefill(benchmark, mode, s, h_kv, causal, impl):
    if impl == "eager" and s > EAGER_MAX_S:
        pytest.skip(f"eager materializes B*H*S*S scores ({B * H * s * s * 6 / 1e9:.0f} GB at S={s})")
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    q = torch.randn(B, H, s, D, device="cuda", dtype=DTYPE, requires_grad=grad)
    k = torch.randn(B, h_kv, s, D, device="cuda", dtype=DTYPE, requires_grad=grad)
    v = torch.randn(B, h_kv, s, D, device="cuda", dtype=DTYPE, requires_grad=grad)
    op = {"eager": _eager, "sdpa-flash": _sdpa_flash, "decodekit": _decodekit}[impl]
    if impl == "sdpa-flash" and h_kv != H and not _flash_supports_gqa():
        # this torch's flash backend rejects enable_gqa: give it repeated k/v, prepared outside the timed call
        k, v = (t.detach().repeat_interleave(H // h_kv, 1).requires_grad_(grad) for t in (k, v))
    fwd_flops = 4.0 * B * H * s * s * D / (2 if causal else 1)
    if grad:
        dout = torch.randn(B, H, s, D, device="cuda", dtype=DTYPE)

        def fn():
            return torch.autograd.grad(op(q, k, v, causal), (q, k, v), dout)

        flops = 3.5 * fwd_flops
    else:

        def fn():
            with torch.no_grad():
                return op(q, k, v, causal)

        flops = fwd_flops
    run_bench(
        benchmark,
        fn,
        group=f"attention {mode} B{B} H{H}/{h_kv} D{D} S{s} {'causal' if causal else 'full'} bf16",
        impl=impl,
        baseline=impl == "eager",
        flops=flops,
        rounds=5 if s >= 8192 else None,
        B=B,
        H=H,
        H_kv=h_kv,
        S=s,
        D=D,
        causal=causal,
        mode=mode,
        dtype="bf16",
    )


@pytest.mark.parametrize("impl", ["sdpa", "decodekit", "copy"])
@pytest.mark.parametrize("cache_len", [1024, 4096, 16384, 32768])
@pytest.mark.parametrize("batch", [1, 32, 128])
def test_decode(benchmark, batch, cache_len, impl):
    import decodekit

    h, h_kv = 32, 8
    torch.manual_seed(0)
    kv_bytes = 2.0 * batch * h_kv * cache_len * D * 2
    if impl == "copy":
        src = torch.empty(int(kv_bytes) // 2, device="cuda", dtype=DTYPE)
        dst = torch.empty_like(src)
        fn = functools.partial(dst.copy_, src)
        moved = 2 * kv_bytes  # read + write
    else:
        q = torch.randn(batch, h, 1, D, device="cuda", dtype=DTYPE)
        kc = torch.randn(batch, h_kv, cache_len, D, device="cuda", dtype=DTYPE)
        vc = torch.randn(batch, h_kv, cache_len, D, device="cuda", dtype=DTYPE)
        seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
        moved = kv_bytes
        if impl == "sdpa":
            fn = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, kc, vc, enable_gqa=True)
        else:
            fn = functools.partial(decodekit.decode_attention, q, kc, vc, seqlens, backend="triton")
    run_bench(
        benchmark,
        fn,
        group=f"decode_attention B{batch} H32/8 D{D} L{cache_len} bf16",
        impl=impl,
        baseline=impl == "sdpa",
        bytes_moved=moved,
        B=batch,
        H=h,
        H_kv=h_kv,
        L=cache_len,
        D=D,
        dtype="bf16",
    )
