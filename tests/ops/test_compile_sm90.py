"""Ahead-of-time compilation of the norm + linear and sampler kernels to sm_90 machine code, without a GPU.

The rest of the suite runs these kernels in Triton's interpreter, which neither type-checks loop-carried
values nor lowers ``tl.dot`` layouts and misses many errors that only the compiler raises. Here each kernel
is compiled for an H100 (``GPUTarget("cuda", 90, 32)``, ptxas ships with Triton) with exactly the arguments
its launcher passes on CUDA: the real launcher runs against recording stand-ins of the kernels, and every
recorded launch is specialized the way Triton's JIT specializes it (integer ``1`` -> constexpr, multiples of
16 and tensor pointers -> 16-divisible), then compiled. Each family compiles in a subprocess with the
interpreter off. Under ``make gpu-check`` the kernels compile for real in the other tests, so these skip.
"""

from __future__ import annotations

# Shared by both scripts: record the launcher's kernel calls, specialize them like the JIT, compile them.
_PRELUDE = r"""
import time
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
       torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8"}
LAUNCHES = []


class Recorder:
    # stands in for a @triton.jit kernel: records each launch's bound arguments instead of running it
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            bound = dict(zip(self.fn.arg_names, args), **kwargs)
            LAUNCHES.append((self.fn, bound, num_warps, num_stages))
            # "write" the float buffers (zeros): the sampler's CPU-only early exit reads its state buffer and
            # must not stop on uninitialized memory, so every search pass is recorded as on CUDA
            for v in bound.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta":
                    v.zero_()
        return launch


def record(module):
    # replace every @triton.jit *_kernel of module by a Recorder; return their names
    names = [n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")]
    for n in names:
        setattr(module, n, Recorder(getattr(module, n)))
    return set(names)


def specialize(fn, bound):
    # (signature, constexprs, attrs) as Triton's JIT builds them on CUDA for these argument values
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


def compile_all(expected):
    seen, done, t0 = set(), set(), time.time()
    for fn, bound, warps, stages in LAUNCHES:
        sig, consts, attrs = specialize(fn, bound)
        key = (fn.__name__, repr(sig), repr(sorted(consts.items())), repr(sorted(attrs)), warps, stages)
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(fn, sig, consts, attrs)
        opts = {"num_warps": warps, "num_stages": stages}
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception:
            print("FAILED", fn.__name__, sig, consts, opts, file=sys.stderr)
            raise
        assert k.asm.get("cubin"), f"no cubin for {fn.__name__}"
        done.add(fn.__name__)
    assert done == expected, f"kernels never launched by the launcher here: {sorted(expected - done)}"
    print(f"compiled {len(seen)} specializations of {sorted(done)} in {time.time() - t0:.1f} s")
"""

_NORM_LINEAR_SCRIPT = (
    "import sys\n"
    + _PRELUDE
    + r"""
import decodekit.ops.norm_linear.triton as NL

expected = record(NL)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
N = K = 4096
DEC = NL.block_configs(1, N, K, interpreter=False)  # decode configs (BLOCK_M follows M below)
PRE = NL.block_configs(NL.DECODE_MAX_M + 1, N, K, interpreter=False)  # prefill configs
assert len(DEC) == 7 and len(PRE) == 6, "config lists changed: update the combos so each is compiled once"
# (dtype, M, config index, norm, pro_act, epi_act, norm_weight dtype, norm_bias, bias, training, W transposed)
# Every config of the block-size helper once; every norm / activation / flag value at least once per phase.
LN, RMS, NONE = NL._NORM_LAYER, NL._NORM_RMS, NL._NORM_NONE
COMBOS = [
    (BF16, 1, 0, LN, 0, 1, F32, True, True, True, False),  # HF LayerNorm kept in fp32, GELU MLP, training
    (BF16, 1, 1, RMS, 0, 3, BF16, False, False, False, False),  # LLaMA decode: RMSNorm + SiLU, no bias
    (BF16, 7, 2, NONE, 1, 0, None, False, True, False, True),  # GELU + Linear on a Conv1D (transposed) weight
    (F16, 1, 3, LN, 0, 2, None, False, True, True, False),  # LayerNorm without affine, tanh GELU
    (F16, 33, 4, NONE, 2, 0, None, False, False, False, False),  # tanh GELU + Linear
    (F16, 64, 5, RMS, 0, 3, F32, False, False, True, False),
    (F32, 5, 6, LN, 0, 0, F32, True, True, True, False),  # fp32: "ieee" dot (no TF32)
    (BF16, 512, 0, LN, 0, 2, BF16, True, True, True, False),
    (BF16, 300, 1, RMS, 0, 3, BF16, False, False, False, False),
    (F16, 1000, 2, NONE, 1, 0, None, False, True, False, True),
    (F16, 512, 3, LN, 0, 1, None, False, True, False, False),
    (BF16, 4096, 4, NONE, 2, 0, None, False, False, False, False),
    (F32, 300, 5, RMS, 0, 1, F32, False, True, True, False),
]
for dt, m, ci, norm, pro, epi, nw_dt, has_nb, has_b, train, transposed in COMBOS:
    cfg = NL.block_configs(m, N, K, interpreter=False)[ci]  # what the launcher's autotuner picks from
    meta = dict(device="meta")
    x = torch.empty(m, K, dtype=dt, **meta)
    w = torch.empty(K, N, dtype=dt, **meta).t() if transposed else torch.empty(N, K, dtype=dt, **meta)
    nw = torch.empty(K, dtype=nw_dt, **meta) if nw_dt is not None else None
    nb = torch.empty(K, dtype=nw_dt or dt, **meta) if has_nb else None
    b = torch.empty(N, dtype=dt, **meta) if has_b else None
    NL.norm_linear_fwd(x, nw, nb, w, b, eps=1e-5, norm=norm, pro_act=pro, epi_act=epi,
                       store_preact=train and epi != 0, store_stats=train, config=cfg)
assert all(not bound["INTERP_BF16"] for _, bound, _, _ in LAUNCHES), "interpreter-only path taken"
compile_all(expected)
"""
)

_SAMPLING_SCRIPT = (
    "import sys\n"
    + _PRELUDE
    + r"""
import decodekit.ops.sampling.triton as S

expected = record(S)


class _H100:
    multi_processor_count = 132


# the launcher sizes its grid from the CUDA device: let it see an H100 while the tensors stay on the CPU
torch.cuda.get_device_properties = lambda device=None: _H100()
_launch_config = S._launch_config
S._launch_config = lambda B, V, device: _launch_config(B, V, torch.device("cuda"))


def launch(dt, B, V, counts, mode, *, tts=False, npass=16, mult=1):
    logits = torch.zeros(B, V, dtype=dt)
    params = torch.zeros(B, 8)
    seeds = torch.zeros(B, dtype=torch.int64)
    cnt = torch.zeros(B, V, dtype=counts) if counts is not None else None
    S.run(logits, params, seeds, mult, cnt, tts=tts, greedy_top1=not tts, npass=npass, mode=mode)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# B=1 -> 64 programs per row (B and the search pass 1 become constants); B=600 -> one program per row (C=1)
launch(F32, 1, 128256, None, "sample")  # sample(): HF order, two search phases
launch(BF16, 8, 50257, torch.int64, "sample", mult=0)  # per-row seed tensor, penalties
launch(F16, 600, 1000, torch.int32, "probs", npass=8)  # sampling_probs()
launch(BF16, 3, 5, torch.uint8, "probs", npass=8)  # tiny vocabulary (8-wide tiles)
launch(BF16, 4, 32000, None, "sample", tts=True, npass=8)  # sample_logits()
launch(F32, 2, 32000, None, "simple", tts=True, npass=0)  # sampler_simple_batch()
# beam_candidates(): the IndexTTS2 beam-sampling step (penalty, top-k then top-p, Gumbel-top-k, merge)
S.beam_run(torch.zeros(3, 8194), torch.zeros(3), torch.zeros(3, 8194, dtype=torch.int32),
           torch.zeros(1, dtype=torch.int64), 1, num_beams=3, num_candidates=6, temperature=0.8, top_k=30,
           top_p=0.8, repetition_penalty=10.0, min_tokens_to_keep=2, do_sample=True)
compile_all(expected)
"""
)


def test_norm_linear_kernels_compile_for_sm90(compile_offline):
    """The fused norm + linear kernel in bf16/fp16/fp32: each decode and prefill tile config of ``block_configs``
    once, every norm mode, prologue/epilogue activation and optional input/output, as ``norm_linear_fwd`` launches
    it (M = 1 and a unit weight stride become constants there, as on CUDA)."""
    compile_offline(_NORM_LINEAR_SCRIPT)


def test_sampling_kernels_compile_for_sm90(compile_offline):
    """Every sampler kernel for fp32/fp16/bf16 logits, with and without token counts, in each launcher mode
    (sample, probs, simple, TTS order) and grid regime (one row split over 64 programs; one program per row)."""
    compile_offline(_SAMPLING_SCRIPT)
