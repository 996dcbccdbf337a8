"""Compile one op family's Triton kernels ahead of time for an NVIDIA target, without a GPU, and read the resources.

Usage: ``python tests/ops/aot_compile.py FAMILY ARCH OUT.json`` (FAMILY: norm_linear, sampling, attention; ARCH: 90
for Hopper, 100 for Blackwell). Run with the interpreter off; ``tests/ops/test_compile_sm90.py`` runs it in a
subprocess and checks the JSON it writes.

How: every ``@triton.jit`` kernel of the family's ``triton.py`` is replaced by a recorder, the family's real
launchers run on meta tensors for a list of launches that reaches every configuration their block-size helpers can
pick (with the launchers believing they are on a 132-SM CUDA device), and each recorded launch is specialized the
way Triton's JIT specializes it on CUDA (integer ``1`` -> constexpr, multiples of 16 and tensor pointers ->
16-divisible) and compiled to a cubin with the ptxas that ships with Triton. The resources come from the compiled
kernel: shared memory from Triton's metadata, registers, stack and local-memory (spill) bytes from
``cuobjdump --dump-resource-usage`` (also shipped with Triton). Occupancy is the CUDA occupancy calculator's rule
for compute capability 9.0 and 10.0 (the same per-SM limits on both).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, never interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

# per-SM limits of compute capability 9.0 (H100/H200) and 10.0 (B200): identical for what is checked here
SM_REGS = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
WARP_ALLOC_GRAN = 4  # warps are allocated to the 4 SM sub-partitions
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SMEM = 228 * 1024
BLOCK_MAX_SMEM = 227 * 1024  # the opt-in maximum per block
SMEM_RESERVED = 1024  # reserved per resident block by the driver
SMS = 132  # the launchers size their grids from this (an H100/H200 SXM)

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
       torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
LAUNCHES: list[tuple[JITFunction, dict, int, int, int | None]] = []  # kernel, arguments, warps, stages, maxnreg


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's bound arguments instead of running it."""

    def __init__(self, fn: JITFunction) -> None:
        self.fn = fn

    def __getitem__(self, grid):  # noqa: ANN001 - a grid tuple or callable, unused
        def launch(*args, num_warps=4, num_stages=3, maxnreg=None, **kwargs):  # noqa: ANN002, ANN003
            bound = dict(zip(self.fn.arg_names, args), **kwargs)
            LAUNCHES.append((self.fn, bound, num_warps, num_stages, maxnreg))
            # "write" the real float buffers (zeros): the sampler's off-GPU early exit reads its state buffer
            # and must not stop on uninitialized memory, so every search pass is recorded as on CUDA
            for v in bound.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta":
                    v.zero_()

        return launch


def record(module) -> set[str]:  # noqa: ANN001 - a kernel module
    """Replace every ``@triton.jit`` ``*_kernel`` of ``module`` by a :class:`Recorder`; return their names."""
    names = [n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")]
    for n in names:
        setattr(module, n, Recorder(getattr(module, n)))
    return set(names)


def specialize(fn: JITFunction, bound: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT builds them on CUDA for these argument values."""
    assert set(bound) == set(fn.arg_names), set(bound) ^ set(fn.arg_names)
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        v = bound[name]
        if p.is_constexpr:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            sig[name] = mangle_type(v, True)
            if sig[name] == "constexpr":  # the JIT turns an integer 1 into a constant
                consts[(i,)] = v
            elif sig[name][0] in "iu" and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def cuobjdump_resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in ``cubin``, read by the cuobjdump Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    assert {"REG", "STACK", "SHARED", "LOCAL"} <= set(fields), out
    return {k.lower(): int(v) for k, v in fields.items()}


def occupancy(regs: int, smem: int, warps: int) -> tuple[int, str]:
    """Resident blocks per SM (the CUDA occupancy calculator's rule) and the resource that limits it."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (SM_REGS // regs_per_warp) // WARP_ALLOC_GRAN * WARP_ALLOC_GRAN
    limits = {
        "registers": warps_by_regs // warps,
        "shared memory": SM_SMEM // (smem + SMEM_RESERVED),
        "warps": SM_MAX_WARPS // warps,
        "blocks": SM_MAX_BLOCKS,
    }
    by = min(limits, key=lambda k: limits[k])
    return limits[by], by


def _label(fn: JITFunction, sig: dict, consts: dict) -> str:
    """A short name for one specialization: the first pointer's dtype and the upper-case constexprs."""
    first_ptr = next((t[1:] for t in sig.values() if t.startswith("*")), "")
    parts = [first_ptr]
    for (i,), v in sorted(consts.items()):
        name = fn.arg_names[i]
        if name.isupper() and sig[name] == "constexpr" and v is not None and not isinstance(v, bool | str):
            parts.append(f"{name}={v}")
        elif name.isupper() and v is True:
            parts.append(name)
        elif name.isupper() and isinstance(v, str):
            parts.append(f"{name}={v}")
    return " ".join(parts)


def compile_all(expected: set[str], arch: int) -> list[dict]:
    """Compile every distinct recorded specialization for ``arch``; one resource row per compiled kernel."""
    seen, rows = set(), []
    for fn, bound, warps, stages, maxnreg in LAUNCHES:
        sig, consts, attrs = specialize(fn, bound)
        key = (fn.__name__, repr(sig), repr(sorted(consts.items())), repr(sorted(attrs)), warps, stages, maxnreg)
        if key in seen:
            continue
        seen.add(key)
        opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
        t0 = time.time()
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
        except Exception:
            print("FAILED", fn.__name__, sig, consts, opts, file=sys.stderr)
            raise
        assert k.asm.get("cubin"), f"no cubin for {fn.__name__}"
        res = cuobjdump_resources(k.asm["cubin"])
        smem = int(k.metadata.shared) + res["shared"]
        blocks, by = occupancy(res["reg"], smem, warps)
        rows.append(dict(
            kernel=fn.__name__, spec=_label(fn, sig, consts), num_warps=warps, num_stages=stages, maxnreg=maxnreg,
            regs=res["reg"],
            spill_bytes=res["local"], stack_bytes=res["stack"], shared_bytes=smem, blocks_per_sm=blocks,
            warps_per_sm=blocks * warps, limited_by=by, compile_s=round(time.time() - t0, 2),
        ))  # fmt: skip
    done = {r["kernel"] for r in rows}
    assert done == expected, f"kernels never launched by the launches here: {sorted(expected - done)}"
    return rows


# --------------------------------------------------------------------------- the launches of each family

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
META = torch.device("meta")


def launch_norm_linear() -> set[str]:
    """Every config ``block_configs`` can give the autotuner, for each dtype (fp32 has its own tiles) and decode
    ``BLOCK_M`` (16, 32, 64) and prefill, each compiled with the heaviest flags of its group: the plain configs
    alternately with training LayerNorm (affine, bias, tanh-GELU epilogue, pre-activation and stats stored) and
    training RMSNorm + SiLU; the tanh-GELU-prologue configs with that prologue on a transposed (Conv1D) weight.
    fp16 compiles like bf16; it is checked at BLOCK_M 16 and in prefill."""
    import decodekit.ops.norm_linear.triton as NL

    expected = record(NL)
    N = K = 4096
    LN, RMS, NONE = NL._NORM_LAYER, NL._NORM_RMS, NL._NORM_NONE
    TANH = NL._ACT_CODE["gelu_tanh"]
    # (norm, pro_act, epi_act, norm weight, norm bias, bias, training, W transposed)
    plain = [(LN, 0, TANH, True, True, True, True, False), (RMS, 0, NL._ACT_CODE["silu"], True, False, False, True,
                                                             False)]  # fmt: skip
    heavy = (NONE, TANH, 0, False, False, True, False, True)
    for dt in (BF16, F16, F32):
        for m in (1, 32, NL.DECODE_MAX_M, NL.DECODE_MAX_M + 1):
            if dt == F16 and m in (32, NL.DECODE_MAX_M):
                continue
            cases = [(c, plain[i % 2]) for i, c in enumerate(NL.block_configs(m, N, K, interpreter=False, dtype=dt))]
            cases += [(c, heavy) for c in NL.block_configs(m, N, K, interpreter=False, dtype=dt, heavy_prologue=True)]
            for cfg, (norm, pro, epi, has_nw, has_nb, has_b, train, transposed) in cases:
                x = torch.empty(m, K, dtype=dt, device=META)
                w = torch.empty(K, N, dtype=dt, device=META)
                w = w.t() if transposed else w.view(N, K)
                nw_dt = F32 if dt != F32 and norm == LN else dt  # HF keeps LayerNorm weights in fp32
                nw = torch.empty(K, dtype=nw_dt, device=META) if has_nw else None
                nb = torch.empty(K, dtype=nw_dt, device=META) if has_nb else None
                b = torch.empty(N, dtype=dt, device=META) if has_b else None
                NL.norm_linear_fwd(x, nw, nb, w, b, eps=1e-5, norm=norm, pro_act=pro, epi_act=epi,
                                   store_preact=train and epi != 0, store_stats=train, config=cfg)
    assert all(not bound["INTERP_BF16"] for _, bound, *_ in LAUNCHES), "interpreter-only path taken"
    return expected


def launch_sampling() -> set[str]:
    """Every sampler kernel for fp32/fp16/bf16 logits, with and without token counts, in each launcher mode and
    grid regime (one row split over many programs; one program per row; a tiny vocabulary)."""
    import decodekit.ops.sampling.triton as S

    expected = record(S)

    class _H100:
        multi_processor_count = SMS

    # the launcher sizes its grid from the CUDA device: let it see an H100 while the tensors stay on the CPU
    torch.cuda.get_device_properties = lambda device=None: _H100()
    launch_config = S._launch_config
    S._launch_config = lambda B, V, device: launch_config(B, V, torch.device("cuda"))

    def launch(dt, B, V, counts, mode, *, tts=False, npass=16, mult=1):  # noqa: ANN001
        logits = torch.zeros(B, V, dtype=dt)
        params, topk = torch.zeros(B, len(S.KERNEL_PARAMS)), torch.zeros(B, dtype=torch.int32)
        seeds = torch.zeros(B, dtype=torch.int64)
        cnt = torch.zeros(B, V, dtype=counts) if counts is not None else None
        S.run(logits, params, topk, seeds, mult, cnt, tts=tts, greedy_top1=not tts, npass=npass, mode=mode)

    launch(F32, 1, 128256, None, "sample")  # sample(): HF order, two search phases, 64 programs per row
    launch(BF16, 8, 50257, torch.int64, "sample", mult=0)  # per-row seed tensor, penalties
    launch(F16, 600, 1000, torch.int32, "probs", npass=8)  # sampling_probs(), one program per row
    launch(BF16, 3, 5, torch.uint8, "probs", npass=8)  # tiny vocabulary (8-wide tiles)
    launch(BF16, 4, 32000, None, "sample", tts=True, npass=8)  # sample_logits()
    launch(F32, 2, 32000, None, "simple", tts=True, npass=0)  # sampler_simple_batch()

    # sample_block (diffusion LMs): one program per position, every confidence mode and filter order
    if hasattr(S, "block_run"):
        block_config = S._block_config
        S._block_config = lambda V, device: block_config(V, torch.device("cuda"))
        for dt, V, ids, conf, topp_first, post_temp, kept in (
            (BF16, 126464, True, "prob", False, False, False), (F32, 32000, False, "neg_entropy", True, False, True),
            (F16, 8193, False, "margin", False, True, False), (BF16, 4096, True, "raw_prob", True, False, False),
            (F32, 1000, False, "random", False, False, False), (BF16, 7, False, "none", False, False, False),
        ):  # fmt: skip
            B, L = 2, 5
            S.block_run(torch.zeros(B, L, V, dtype=dt), torch.ones(B, L, dtype=torch.bool),
                        torch.zeros(B, L, dtype=torch.int64) if ids else None, torch.ones(B, 2),
                        torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.int64), confidence=conf,
                        topp_first=topp_first, post_temp=post_temp, want_kept=kept)  # fmt: skip

    # beam_candidates (beam search / beam sampling): row kernel + per-prompt merge
    if hasattr(S, "beam_run"):
        beam_block = S._beam_block
        S._beam_block = lambda V, device: beam_block(V, torch.device("cuda"))
        for dt, B, N, V, counts, top_k, top_p, sample in (
            (F32, 1, 3, 8194, torch.int64, 30, 0.8, True), (BF16, 2, 5, 50257, None, 0, 1.0, False),
            (F16, 4, 2, 32000, torch.int32, 0, 0.9, True), (BF16, 1, 1, 128256, None, 50, 1.0, False),
        ):  # fmt: skip
            R = B * N
            S.beam_run(torch.zeros(R, V, dtype=dt), torch.zeros(R), torch.zeros(R, V, dtype=counts) if counts else None,
                       torch.zeros(B, dtype=torch.int64), 1, num_beams=N, num_candidates=2 * N, temperature=0.8,
                       top_k=top_k, top_p=top_p, repetition_penalty=10.0 if counts else 1.0, min_tokens_to_keep=2,
                       do_sample=sample)  # fmt: skip
    return expected


def launch_attention() -> set[str]:
    """Prefill forward and backward for each head-dim class of ``attention_config`` (<= 64, <= 128, 256) in
    fp16/bf16 and fp32, causal and not, GQA, a kv-start offset; split-K decode for each head-dim class, dtype,
    packed-row tile (GQA group x query length) and split count."""
    import decodekit.ops.attention.triton as A

    expected = record(A)
    A._multiprocessor_count = lambda device_index: SMS
    config = A.attention_config
    A.attention_config = lambda op, head_dim, dtype, device, **kw: config(op, head_dim, dtype, torch.device("cuda"),
                                                                          **kw)

    def qkv(dt, B, H, H_kv, S_q, S_k, D):  # noqa: ANN001
        q = torch.empty(B, H, S_q, D, dtype=dt, device=META)
        k = torch.empty(B, H_kv, S_k, D, dtype=dt, device=META)
        v = torch.empty(B, H_kv, S_k, D, dtype=dt, device=META)
        return q, k, v

    for dt in (BF16, F16, F32):
        for D, causal, gqa, kv_start in ((64, True, 4, False), (128, False, 1, True), (256, True, 8, False),
                                         (80, True, 1, False)):  # fmt: skip
            q, k, v = qkv(dt, 2, 8, 8 // gqa, 333, 333, D)
            ks = torch.zeros(2, dtype=torch.int32, device=META) if kv_start else None
            out, lse = A._attention_fwd(q, k, v, causal, D**-0.5, 0, ks, store_lse=True)
            A._attention_fwd(q, k, v, causal, D**-0.5, 0, ks, store_lse=False)
            A._attention_bwd(torch.empty_like(out), q, k, v, out, lse, causal, D**-0.5, 0, ks)
        for D, H, H_kv, S_q, S_max, B in ((128, 32, 8, 1, 4096, 1), (64, 8, 8, 1, 32768, 16), (256, 16, 2, 1, 777, 2),
                                          (128, 32, 8, 4, 4096, 3), (96, 64, 2, 1, 8192, 1)):  # fmt: skip
            q, kc, vc = qkv(dt, B, H, H_kv, S_q, S_max, D)
            lens = torch.zeros(B, dtype=torch.int32, device=META)
            A.decode(q, kc, vc, lens, D**-0.5, lens if D == 96 else None, None)
    return expected


FAMILIES = {"norm_linear": launch_norm_linear, "sampling": launch_sampling, "attention": launch_attention}


def main(argv: list[str]) -> int:
    family, arch, out = argv[0], int(argv[1]), Path(argv[2])
    t0 = time.time()
    expected = FAMILIES[family]()
    rows = compile_all(expected, arch)
    meta = dict(family=family, arch=arch, triton=triton.__version__, torch=torch.__version__)
    out.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"compiled {len(rows)} specializations of {sorted(expected)} for sm_{arch} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
