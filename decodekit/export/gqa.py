"""The fused-op graph (``export_decoder(..., graph="gqa")``): in-place KV cache and ONNX Runtime's contrib ops.

Why a second graph
------------------
The default graph (``graph="plain"``) uses standard ONNX ops only, so any ONNX runtime runs it, but every step
copies the whole KV cache (``present = Concat(past, new)``) and ONNX Runtime runs a few hundred small nodes per
step, whose fixed cost dominates on small models. This graph is written node by node from the decoder's weights
(no tracing) with ONNX Runtime's fused ops:

* ``com.microsoft::GroupQueryAttention`` with ``past_key`` / ``present_key`` bound to ONE buffer of fixed capacity
  (``past_present_share_buffer``): the op appends the new keys/values in place, nothing is copied per step;
* packed projections: q/k/v in one MatMul per layer, and (Llama) gate/up in another, each then split (unless 4-bit
  weights need each matrix apart; q/k/v's Split goes too when the rotary runs inside GroupQueryAttention or on
  the packed span, below);
* rotary positions inside GroupQueryAttention (``do_rotary``, by cache slot: see "Padding" below) when the
  installed ONNX Runtime computes it right for the model's sizes (probed; its CPU kernel refuses head sizes that
  are not a multiple of 16): no rotary node and no Split of the packed q/k/v row. Otherwise in
  ``com.microsoft::RotaryEmbedding`` nodes fed by ``position_ids``: with adjacent pairs (llama2.c's layout) and
  packed q/k/v, ONE node per layer turns the q|k span of the packed row and GroupQueryAttention reads that row as
  it is (no Split); the halves layout (Hugging Face's) turns q and k in two nodes after a Split;
* the residual add fused into the next norm: ``SkipSimplifiedLayerNormalization`` (Llama) and
  ``SkipLayerNormalization`` (GPT-2, which also absorbs the projection bias), ``FastGelu`` with its bias;
* the classifier on the last position only, as one MatMul against the pre-transposed matrix.

A stories260K step runs 73 nodes instead of 228 (counted after ONNX Runtime's own graph optimizations).

Interface (what differs from the plain graph)
---------------------------------------------
``past_key_values.{i}.key`` / ``.value`` and ``present.{i}.key`` / ``.value`` are all ``[B, H_kv, C, D]``
with ``C`` the capacity the runtime chose (any ``C >= P + S``, ``<= max_seq_len``); the runtime binds past and
present of a layer to the same memory. Tokens ``[0, P)`` of each row are the cache, the step writes ``[P, P+S)``
in place. ``attention_mask`` ``[B, P+S]`` is the same left-padding mask as the plain graph's; ``P`` is read from
its width (``P + S - 1`` is GroupQueryAttention's ``seqlens_k`` for every row).

Padding
-------
Left padding keeps the plain graph's results: the mask becomes an additive ``attention_bias`` (``-1e30`` on
padded keys; GroupQueryAttention adds the causal mask). Rotating inside GroupQueryAttention, the op turns q and k
by cache slot (it reads only the first position of a prompt: it assumes positions are slots). A row left-padded
by ``n`` slots then has every query and key turned by ``n`` positions more than eager PyTorch's; rotary angles
enter an attention score only as the difference of the query's and the key's, so the scores, the outputs and the
tokens are eager's (up to float rounding), while that row's cached keys are eager's turned by ``n`` more
(``decodekit.json``: ``kv_cache.key_positions = "cache_slots"``; the validation turns eager's keys by each row's
padding before comparing). With RotaryEmbedding nodes the angles come from ``position_ids`` (``cumsum(mask) - 1``)
and the cached keys are eager's (``"positions"``). With ``"cache_slots"`` the graph reads no ``position_ids``
(the input stays, for one interface): the mask must be plain left padding, as the runtime's loops make it. Keys
at padded slots differ from eager PyTorch's (from the first layer on with ``"cache_slots"``, else after it: an
all-padding query averages other keys in each implementation), but no real token ever reads them;
:mod:`decodekit.export.validate` compares the cache on real tokens only for this graph.

Limits
------
ONNX Runtime's CPU GroupQueryAttention needs ``head_dim % 16 == 0`` (:func:`gqa_unsupported` says why a model
cannot use it; the exporter then writes the plain graph with a one-line note). A step with ``S > 1`` after a
non-empty cache needs ``B == 1`` (the op's rule; the runtime's loop only does that for ``B == 1``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodekit.models.decoder import Decoder
from decodekit.models.layers import apply_rotary, rotary_cos_sin, rotary_inv_freq

MS = "com.microsoft"
#: the widest packed q|k|v row one RotaryEmbedding node turns (ONNX Runtime's CUDA kernel: one thread per value)
_SPAN_MAX = 1024
GRAPHS = ("plain", "gqa")
#: the first ONNX Runtime whose GroupQueryAttention takes ``attention_bias`` (the padding mask; older ones refuse
#: the node's 11 inputs)
ORT_GQA_BIAS = (1, 22)
#: additive bias on padded keys (finite: an all-padding query gets a uniform average, never NaN)
_PAD_BIAS = {torch.float32: -1e30, torch.float16: -30000.0}


def ort_version_at_least(version: str, want: tuple[int, int]) -> bool:
    """``version`` ("1.31.1", "1.26.0.dev2026...") is at least ``want`` (major, minor); unparsable is False."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= want


def _run_probe(model: Any, steps: list[dict[str, np.ndarray]], caches: tuple[np.ndarray, np.ndarray],
               out_width: int) -> list[np.ndarray]:
    """Run the one-node GroupQueryAttention ``model`` (inputs ``pk`` / ``pv`` bound with outputs ``kp`` / ``vp`` to
    the ``caches`` arrays, which it fills) on ONNX Runtime's CPU provider, one run per feed dict of ``steps``;
    returns each run's output ``o``. ORT's own logging is muted: its refusals are the probes' answers."""
    import onnxruntime as ort

    npt = caches[0].dtype
    # the executor logs through the default logger whatever the session says; its default (2) is restored after
    ort.set_default_logger_severity(4)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        io = sess.io_binding()
        run_opts = ort.RunOptions()
        run_opts.log_severity_level = 4
        for name, a in zip(("pk", "pv"), caches):
            io.bind_input(name, "cpu", 0, npt, list(a.shape), a.ctypes.data)
            io.bind_output(name.replace("p", "", 1) + "p", "cpu", 0, npt, list(a.shape), a.ctypes.data)
        got = []
        for feeds in steps:
            seq = next(a.shape[1] for n, a in feeds.items() if a.ndim == 3)
            o = np.zeros((1, seq, out_width), npt)
            feeds = {n: np.ascontiguousarray(a) for n, a in feeds.items()}  # alive through the run
            for name, a in feeds.items():
                io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            io.bind_output("o", "cpu", 0, npt, list(o.shape), o.ctypes.data)
            sess.run_with_iobinding(io, run_opts)
            got.append(o)
        return got
    finally:
        ort.set_default_logger_severity(2)


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Softmax attention in float64, causal: ``q [1, S, H, D]``, ``k`` / ``v [1, S, Hkv, D]`` -> ``[1, S, H, D]``."""
    h, hk, d, s = q.shape[2], k.shape[2], q.shape[3], q.shape[1]
    k, v = np.repeat(k, h // hk, axis=2), np.repeat(v, h // hk, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v)


@functools.lru_cache(maxsize=32)
def _probe_gqa(n_heads: int, n_kv_heads: int, head_dim: int, fp16: bool) -> str | None:
    """Run one GroupQueryAttention node of these sizes on the installed ONNX Runtime's CPU provider, sharing the
    past/present buffer, over a 3-token prompt and a 1-token step; compare with softmax attention in numpy. Returns
    why it failed (one line) or None. Head sizes the CPU kernel rejects (older releases: not a multiple of 16) or
    computes wrongly are found here, whatever the ORT version."""
    from onnx import TensorProto, helper

    elem, npt = (TensorProto.FLOAT16, np.float16) if fp16 else (TensorProto.FLOAT, np.float32)
    h, hk, d, cap = n_heads, n_kv_heads, head_dim, 4
    names = ["q", "k", "v", "pk", "pv", "seqlens_k", "total"]
    node = helper.make_node("GroupQueryAttention", names, ["o", "kp", "vp"], domain=MS, num_heads=h,
                            kv_num_heads=hk)
    shapes = [["b", "s", h * d], ["b", "s", hk * d], ["b", "s", hk * d], ["b", hk, "c", d], ["b", hk, "c", d]]
    ins = [helper.make_tensor_value_info(n, elem, sh) for n, sh in zip(names, shapes)]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info("o", elem, ["b", "s", h * d])] + [
        helper.make_tensor_value_info(n, elem, ["b", hk, "c", d]) for n in ("kp", "vp")]
    model = helper.make_model(helper.make_graph([node], "probe", ins, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)], ir_version=10)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, h * d)).astype(npt)
    k = rng.standard_normal((1, 4, hk * d)).astype(npt)
    v = rng.standard_normal((1, 4, hk * d)).astype(npt)
    steps = [{"q": q[:, lo:hi], "k": k[:, lo:hi], "v": v[:, lo:hi], "seqlens_k": np.array([hi - 1], np.int32),
              "total": np.array(hi, np.int32)} for lo, hi in ((0, 3), (3, 4))]
    try:
        got = _run_probe(model, steps, (np.zeros((1, hk, cap, d), npt), np.zeros((1, hk, cap, d), npt)), h * d)
    except Exception as e:  # noqa: BLE001 - ORT reports "not supported" as its own exception types
        text = (str(e).strip().splitlines() or [type(e).__name__])[0].split("Status Message:")[-1].strip()
        return f"ONNX Runtime's CPU GroupQueryAttention rejects head size {d} ({text[:100]})"
    out = np.concatenate(got, axis=1).astype(np.float64).reshape(1, 4, h, d)
    ref = _causal_attention(*(a.astype(np.float64).reshape(1, 4, -1, d) for a in (q, k, v)))
    if not np.allclose(out, ref, atol=2e-2 if fp16 else 1e-4):
        return f"ONNX Runtime's CPU GroupQueryAttention computes head size {d} wrongly (max error " \
            f"{float(np.abs(out - ref).max()):.2g})"
    return None


@functools.lru_cache(maxsize=32)
def _probe_rotary(n_heads: int, n_kv_heads: int, head_dim: int, fp16: bool, interleaved: int, packed: bool) -> bool:
    """Whether the installed ONNX Runtime's CPU GroupQueryAttention rotates q and k inside (``do_rotary``) for these
    sizes, layout and input form (``packed``: one q|k|v row), by cache slot, as numpy does: a 3-token prompt then a
    1-token step on a shared past/present buffer, checking the output and the cached keys and values (a rotation by
    a wrong but constant offset leaves the output right and the keys wrong). Releases differ (some CPU kernels need
    a head size that is a multiple of 16); a refusal or a wrong answer keeps the rotation in RotaryEmbedding nodes.
    Left padding is not probed: the export's validation (a left-padded batch) is the check of that."""
    from onnx import TensorProto, helper

    elem, npt = (TensorProto.FLOAT16, np.float16) if fp16 else (TensorProto.FLOAT, np.float32)
    h, hk, d, cap, half = n_heads, n_kv_heads, head_dim, 4, head_dim // 2
    width = (h + 2 * hk) * d
    qkv_names = ["qkv", "", ""] if packed else ["q", "k", "v"]
    node = helper.make_node("GroupQueryAttention", [*qkv_names, "pk", "pv", "seqlens_k", "total", "cos", "sin"],
                            ["o", "kp", "vp"], domain=MS, num_heads=h, kv_num_heads=hk, do_rotary=1,
                            rotary_interleaved=interleaved)
    widths = {"qkv": width, "q": h * d, "k": hk * d, "v": hk * d}
    ins = [helper.make_tensor_value_info(n, elem, ["b", "s", widths[n]]) for n in qkv_names if n]
    ins += [helper.make_tensor_value_info(n, elem, ["b", hk, "c", d]) for n in ("pk", "pv")]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info("o", elem, ["b", "s", h * d])] + [
        helper.make_tensor_value_info(n, elem, ["b", hk, "c", d]) for n in ("kp", "vp")]
    angles = np.arange(cap, dtype=np.float64)[:, None] * rotary_inv_freq(d, 10000.0).double().numpy()  # [cap, D/2]
    inits = [helper.make_tensor("cos", elem, [cap, half], np.cos(angles).astype(npt).ravel().tolist()),
             helper.make_tensor("sin", elem, [cap, half], np.sin(angles).astype(npt).ravel().tolist())]
    model = helper.make_model(helper.make_graph([node], "probe", ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)], ir_version=10)
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, cap, width)).astype(npt)  # [1, 4, q | k | v]
    parts = {"qkv": row, "q": row[..., : h * d], "k": row[..., h * d: (h + hk) * d], "v": row[..., (h + hk) * d:]}
    steps = [{n: parts[n][:, lo:hi] for n in qkv_names if n}
             | {"seqlens_k": np.array([hi - 1], np.int32), "total": np.array(hi, np.int32)}
             for lo, hi in ((0, 3), (3, 4))]
    kc, vc = np.zeros((1, hk, cap, d), npt), np.zeros((1, hk, cap, d), npt)
    try:
        got = _run_probe(model, steps, (kc, vc), h * d)
    except Exception:  # noqa: BLE001 - ORT reports "not supported" as its own exception types
        return False

    layout = "adjacent" if interleaved else "halves"
    cos_, sin_ = rotary_cos_sin(torch.arange(cap)[None], rotary_inv_freq(d, 10000.0), layout)  # [1, 1, cap, D]

    def turn(x: np.ndarray) -> np.ndarray:  # [1, 4, heads, D] rotated by slot 0..3, as the eager model rotates
        t = torch.from_numpy(x).transpose(1, 2)  # [1, heads, 4, D]
        return apply_rotary(t, cos_, sin_, layout).transpose(1, 2).double().numpy()

    f = row.astype(np.float64)
    q, k = turn(f[..., : h * d].reshape(1, cap, h, d)), turn(f[..., h * d: (h + hk) * d].reshape(1, cap, hk, d))
    v = f[..., (h + hk) * d:].reshape(1, cap, hk, d)
    out = np.concatenate(got, axis=1).astype(np.float64).reshape(1, cap, h, d)
    tol = 2e-2 if fp16 else 1e-4
    pairs = ((out, _causal_attention(q, k, v)), (kc, k.transpose(0, 2, 1, 3)), (vc, v.transpose(0, 2, 1, 3)))
    return all(np.allclose(a.astype(np.float64), b, atol=tol) for a, b in pairs)


def gqa_unsupported(decoder: Decoder, *, all_logits: bool) -> str | None:
    """Why ``decoder`` cannot be exported with ``graph="gqa"`` (a one-line reason), or None when it can.

    The head size is probed on the installed ONNX Runtime (:func:`_probe_gqa`): releases differ in what their CPU
    kernel accepts (some need a multiple of 16); releases before 1.22 lack the ``attention_bias`` input."""
    import onnxruntime as ort

    if not ort_version_at_least(ort.__version__, ORT_GQA_BIAS):
        return (f"ONNX Runtime {ort.__version__} is older than {'.'.join(map(str, ORT_GQA_BIAS))}, the first whose "
                "GroupQueryAttention takes the attention_bias input this graph uses")
    cfg = decoder.config
    fp16 = decoder.tok_embeddings.weight.dtype == torch.float16
    reason = _probe_gqa(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, fp16)
    if reason is not None:
        return reason
    if not cfg.causal:
        return "the model is bidirectional (config.causal=False); GroupQueryAttention here is causal"
    if all_logits:
        return "all_logits=True (diffusion-style steps) needs the plain graph"
    return None


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: torch.dtype) -> None:
        from onnx import TensorProto

        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.dtype = dtype
        self.np_dtype = np.float32 if dtype == torch.float32 else np.float16
        self.elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d
        return name

    def weight(self, name: str, t: torch.Tensor, transpose: bool = False) -> str:
        a = t.detach().to(self.dtype).cpu()
        if transpose:
            a = a.t()
        return self.init(name, a.contiguous().numpy())

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str | None = None,
             outputs: list[str] | None = None, unused: tuple[int, ...] = (), **attrs: Any) -> list[str]:
        """Add a node; its output names (``unused``: output positions left unnamed, so the op skips them)."""
        from onnx import helper

        self._n += 1
        stem = name or f"{op}_{self._n}"
        outs = outputs or ["" if j in unused else f"{stem}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=stem, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **kw: Any) -> str:
        return self.node(op, inputs, **kw)[0]

    def skip_norm(self, op: str, inputs: list[str], **kw: Any) -> tuple[str, str]:
        """A ``Skip(Simplified)LayerNormalization``: ``(normalized, input + skip (+ bias))``. Its mean /
        inverse-std outputs stay unnamed, so the op skips them (nothing reads them: SmolLM2's 60 skip norms went
        487-559 -> 313-350 us per step in ORT's profiler, one thread)."""
        h, _, _, s = self.node(op, inputs, 4, unused=(1, 2), domain=MS, **kw)
        return h, s


def _packed(g: _Builder, x: str, lins: list[torch.nn.Linear], name: str, split: str | None = None, *,
            bias: bool = True) -> list[str]:
    """``x @ [W_1; W_2; ...]^T (+ b)`` in one MatMul against the pre-transposed matrix (what ONNX Runtime's MatMul
    prepacks), then (``split``) one Split back into the parts. ``bias=False`` leaves the biases out."""
    w = torch.cat([lin.weight for lin in lins], 0)
    y = g.one("MatMul", [x, g.weight(f"{name}.weight_t", w, transpose=True)], name=f"{name}/MatMul")
    if bias and lins[0].bias is not None:
        y = g.one("Add", [y, g.weight(f"{name}.bias", torch.cat([lin.bias for lin in lins], 0))], name=f"{name}/Add")
    if split is None:
        return [y]
    sizes = g.init(f"{name}.split", np.array([lin.weight.shape[0] for lin in lins], np.int64))
    return g.node("Split", [y, sizes], len(lins), axis=-1, name=split)


def _linear(g: _Builder, x: str, lin: torch.nn.Linear, name: str, *, bias: bool = True) -> str:
    """``x @ W^T (+ b)``: one matrix of :func:`_packed`."""
    return _packed(g, x, [lin], name, bias=bias)[0]


def build_gqa_graph(decoder: Decoder, *, opset: int, separate_matrices: bool = False) -> Any:
    """The fused-op ONNX model (an ``onnx.ModelProto``) of ``decoder`` (see the module docstring).

    ``separate_matrices``: one MatMul per checkpoint matrix (q, k, v, gate, up apart) instead of the packed q/k/v and
    gate/up projections (4-bit weights keep each matrix's own blocks).
    """
    from onnx import TensorProto, helper

    cfg = decoder.config
    dtype = decoder.tok_embeddings.weight.dtype
    g = _Builder(dtype)
    H, Hkv, D, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    i64 = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", g.elem, ["batch", cfg.vocab_size])]
    for i in range(L):
        for w in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{w}", g.elem,
                                                        ["batch", Hkv, "capacity", D]))
    for i in range(L):
        for w in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{w}", g.elem, ["batch", Hkv, "capacity", D]))

    # ---- per-step scalars shared by the layers: seqlens_k, total length, the padding bias
    one64 = g.init("const.one_i64", np.array([1], np.int64))
    total = g.one("Shape", ["attention_mask"], start=1, end=2, name="total/Shape")  # [1] = P + S
    batch = g.one("Shape", ["input_ids"], start=0, end=1, name="batch/Shape")  # [1] = B
    seq = g.one("Shape", ["input_ids"], start=1, end=2, name="seq/Shape")  # [1] = S
    last = g.one("Sub", [total, one64], name="seqlens/Sub")
    seqlens_k = g.one("Cast", [g.one("Expand", [last, batch], name="seqlens/Expand")], to=TensorProto.INT32,
                      name="seqlens_k")  # [B] int32: P + S - 1 for every row
    total_len = g.one("Cast", [g.one("Squeeze", [total], name="total/Squeeze")], to=TensorProto.INT32,
                      name="total_sequence_length")  # [] int32
    mask_f = g.one("Cast", ["attention_mask"], to=g.elem, name="bias/Cast")
    bias2d = g.one("Mul", [g.one("Sub", [mask_f, g.init("const.one_f", np.array(1, g.np_dtype))], name="bias/Sub"),
                           g.init("const.pad_bias", np.array(-_PAD_BIAS[dtype], g.np_dtype))], name="bias/Mul")
    bias4d = g.one("Unsqueeze", [bias2d, g.init("const.axes12", np.array([1, 2], np.int64))], name="bias/Unsqueeze")
    shape = g.one("Concat", [g.init("const.ones2", np.array([1, 1], np.int64)), seq, one64], axis=0,
                  name="bias/Shape")
    attention_bias = g.one("Expand", [bias4d, shape], name="attention_bias")  # [B, 1, S, P+S]

    x = g.one("Gather", [g.weight("tok_embeddings.weight", decoder.tok_embeddings.weight), "input_ids"],
              name="embed/Gather")
    gqa_attrs = {"num_heads": H, "kv_num_heads": Hkv, "scale": 1.0 / float(np.sqrt(D))}
    if cfg.arch == "llama":
        inv = rotary_inv_freq(D, cfg.rope_theta)  # fp32, as the eager model
        angles = torch.arange(cfg.max_seq_len, dtype=torch.float32)[:, None] * inv  # [max_seq_len, D/2]
        interleaved = 1 if cfg.rope_layout == "adjacent" else 0
        # adjacent pairs with packed q/k/v: ONE RotaryEmbedding turns the whole q|k span of the packed row, as a
        # single "head" of (H + 2 Hkv) D values whose first (H + Hkv) D are rotated (v, the tail, is not); its
        # cache repeats each head's angles, so every pair turns exactly as in its own head. GroupQueryAttention
        # then takes the packed row: no Split, one rotary node instead of two per layer (the halves layout pairs
        # i with i + D/2 inside a head, which a span-wide rotation cannot express). The span is one "head" of
        # (H + 2 Hkv) D values: ONNX Runtime's CUDA kernel runs a head per thread block (at most _SPAN_MAX
        # threads), and the cos/sin cache grows (H + Hkv)-fold, so larger models keep the per-tensor nodes (their
        # per-node cost matters less next to their matrix multiplies)
        # best of all: GroupQueryAttention rotates q and k itself (no rotary node, no Split), by cache slot. A
        # left-padded row's slots run ahead of its positions by its padding, the same shift for its every query
        # and key, so its attention scores are unchanged (rotary angles enter them only as differences); its
        # cached keys are turned by that much more than eager PyTorch's ("key_positions": "cache_slots", which
        # the validation accounts for). Taken when the installed ORT computes it right for these sizes (probed)
        fp16 = dtype == torch.float16
        inside = _probe_rotary(H, Hkv, D, fp16, interleaved, not separate_matrices)
        span = not inside and bool(interleaved) and not separate_matrices and (H + 2 * Hkv) * D <= _SPAN_MAX
        if span:
            angles = angles.repeat(1, H + Hkv)  # [max_seq_len, (H + Hkv) D / 2]
        cos = g.weight("rotary.cos_cache", torch.cos(angles))
        sin = g.weight("rotary.sin_cache", torch.sin(angles))
        if inside:
            gqa_attrs |= {"do_rotary": 1, "rotary_interleaved": interleaved}
        rot_cache = [cos, sin] if inside else ["", ""]  # GroupQueryAttention's cos_cache / sin_cache inputs
        pending: str | None = None  # the previous block's MLP output, added to x by the next norm
        for i, layer in enumerate(decoder.layers):
            p = f"layers.{i}"
            at = layer.attn
            if pending is None:
                w_norm = g.weight(f"{p}.attn_norm.weight", layer.attn_norm.weight)
                h = g.one("SimplifiedLayerNormalization", [x, w_norm], axis=-1, epsilon=float(cfg.norm_eps),
                          stash_type=1, name=f"{p}/attn_norm")
            else:
                h, x = g.skip_norm("SkipSimplifiedLayerNormalization",
                                   [pending, x, g.weight(f"{p}.attn_norm.weight", layer.attn_norm.weight)],
                                   epsilon=float(cfg.norm_eps), name=f"{p}/attn_norm")
            if separate_matrices:
                q = _linear(g, h, at.wq, f"{p}.attn.wq")
                k = _linear(g, h, at.wk, f"{p}.attn.wk")
                v = _linear(g, h, at.wv, f"{p}.attn.wv")
            elif span or inside:
                qkv = _packed(g, h, [at.wq, at.wk, at.wv], f"{p}.attn.wqkv")[0]
            else:
                q, k, v = _packed(g, h, [at.wq, at.wk, at.wv], f"{p}.attn.wqkv", f"{p}/qkv/Split")
            if inside:  # GroupQueryAttention turns q and k itself
                qkv_in = [q, k, v] if separate_matrices else [qkv, "", ""]
            elif span:  # [B, S, (H + 2 Hkv) D]: q|k turned in place, GroupQueryAttention reads the packed row
                qkv_in = [g.one("RotaryEmbedding", [qkv, "position_ids", cos, sin], domain=MS, interleaved=1,
                                num_heads=1, rotary_embedding_dim=(H + Hkv) * D, name=f"{p}/qk/rotary"), "", ""]
            else:
                qkv_in = [g.one("RotaryEmbedding", [t, "position_ids", cos, sin], domain=MS, interleaved=interleaved,
                                name=f"{p}/{n}/rotary") for t, n in ((q, "q"), (k, "k"))] + [v]
            a = g.node("GroupQueryAttention",
                       [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                        *rot_cache, "", attention_bias], domain=MS, name=f"{p}/attn/GroupQueryAttention",
                       outputs=[f"{p}/attn/out", f"present.{i}.key", f"present.{i}.value"], **gqa_attrs)[0]
            o = _linear(g, a, at.wo, f"{p}.attn.wo")
            h, x = g.skip_norm("SkipSimplifiedLayerNormalization",
                               [o, x, g.weight(f"{p}.ffn_norm.weight", layer.ffn_norm.weight)],
                               epsilon=float(cfg.norm_eps), name=f"{p}/ffn_norm")
            if separate_matrices:
                gate, up = _linear(g, h, layer.mlp.w1, f"{p}.mlp.w1"), _linear(g, h, layer.mlp.w3, f"{p}.mlp.w3")
            else:  # gate and up in one MatMul: one matrix-vector pass (and one wake of ORT's workers) fewer
                gate, up = _packed(g, h, [layer.mlp.w1, layer.mlp.w3], f"{p}.mlp.w13", f"{p}/mlp/Split")
            gate = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/silu")
            pending = _linear(g, g.one("Mul", [gate, up], name=f"{p}/mlp/Mul"), layer.mlp.w2, f"{p}.mlp.w2")
        norm_w = g.weight("norm.weight", decoder.norm.weight)
        if pending is None:  # pragma: no cover - n_layers >= 1
            raise RuntimeError("a decoder without layers")
        h = g.node("SkipSimplifiedLayerNormalization", [pending, x, norm_w], 1, domain=MS,
                   epsilon=float(cfg.norm_eps), name="norm")[0]
    else:  # gpt2: learned positions, LayerNorm, packed qkv, GELU (tanh)
        x = g.one("Add", [x, g.one("Gather", [g.weight("pos_embeddings.weight", decoder.pos_embeddings.weight),
                                              "position_ids"], name="pos/Gather")], name="embed/Add")
        pending = None
        pending_bias: str | None = None
        for i, layer in enumerate(decoder.layers):
            p = f"layers.{i}"
            ln1 = [g.weight(f"{p}.ln_1.weight", layer.ln_1.weight), g.weight(f"{p}.ln_1.bias", layer.ln_1.bias)]
            if pending is None:
                h = g.one("LayerNormalization", [x, *ln1], axis=-1, epsilon=float(cfg.norm_eps), name=f"{p}/ln_1")
            else:
                h, x = g.skip_norm("SkipLayerNormalization", [pending, x, *ln1, pending_bias],
                                   epsilon=float(cfg.norm_eps), name=f"{p}/ln_1")
            qkv = _linear(g, h, layer.attn.c_attn, f"{p}.attn.c_attn")
            if separate_matrices:
                q, k, v = g.node("Split", [qkv, g.init(f"{p}.attn.split", np.array([H * D] * 3, np.int64))], 3,
                                 axis=-1, name=f"{p}/qkv/Split")
                qkv_in = [q, k, v]
            else:
                qkv_in = [qkv, "", ""]
            a = g.node("GroupQueryAttention",
                       [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                        "", "", "", attention_bias], domain=MS, name=f"{p}/attn/GroupQueryAttention",
                       outputs=[f"{p}/attn/out", f"present.{i}.key", f"present.{i}.value"], **gqa_attrs)[0]
            o = _linear(g, a, layer.attn.c_proj, f"{p}.attn.c_proj", bias=False)
            ln2 = [g.weight(f"{p}.ln_2.weight", layer.ln_2.weight), g.weight(f"{p}.ln_2.bias", layer.ln_2.bias)]
            h, x = g.skip_norm("SkipLayerNormalization",
                               [o, x, *ln2, g.weight(f"{p}.attn.c_proj.bias", layer.attn.c_proj.bias)],
                               epsilon=float(cfg.norm_eps), name=f"{p}/ln_2")
            f = _linear(g, h, layer.mlp.c_fc, f"{p}.mlp.c_fc", bias=False)
            f = g.one("FastGelu", [f, g.weight(f"{p}.mlp.c_fc.bias", layer.mlp.c_fc.bias)], domain=MS,
                      name=f"{p}/mlp/FastGelu")
            pending = _linear(g, f, layer.mlp.c_proj, f"{p}.mlp.c_proj", bias=False)
            pending_bias = g.weight(f"{p}.mlp.c_proj.bias", layer.mlp.c_proj.bias)
        norm = [g.weight("norm.weight", decoder.norm.weight), g.weight("norm.bias", decoder.norm.bias)]
        h = g.node("SkipLayerNormalization", [pending, x, *norm, pending_bias], 1, domain=MS,
                   epsilon=float(cfg.norm_eps), name="norm")[0]
    h_last = g.one("Gather", [h, g.init("const.last", np.array(-1, np.int64))], axis=1, name="last/Gather")  # [B, dim]
    g.node("MatMul", [h_last, g.weight("lm_head.weight_t", decoder.lm_head.weight, transpose=True)],
           name="lm_head/MatMul", outputs=["logits"])
    graph = helper.make_graph(g.nodes, "decodekit_gqa", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="decodekit", ir_version=10)
    return model


def rotary_key_positions(model: Any) -> str:
    """``"cache_slots"`` when the graph's GroupQueryAttention rotates keys by cache slot itself (``do_rotary``),
    else ``"positions"`` (RotaryEmbedding nodes fed by ``position_ids``, or no rotary at all)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("do_rotary", 0):
                return "cache_slots"
    return "positions"


def save_gqa_graph(decoder: Decoder, path: Any, *, opset: int, separate_matrices: bool,
                   external_bytes: int) -> tuple[int, str]:
    """Build the graph and write it to ``path`` (weights above ``external_bytes`` into ``path.name + ".data"``
    beside it); returns the opset written and :func:`rotary_key_positions`."""
    import onnx

    model = build_gqa_graph(decoder, opset=opset, separate_matrices=separate_matrices)
    n_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in decoder.parameters()}.values())
    if n_bytes > external_bytes:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return opset, rotary_key_positions(model)


def gqa_metadata(meta: dict[str, Any], key_positions: str) -> None:
    """Rewrite the plain graph's ``decodekit.json`` entries for this graph: ``"graph": "gqa"``, every cache tensor
    ``[batch, H_kv, capacity, D]``, ``kv_cache.shared_buffer`` (bind past and present to one buffer) and
    ``kv_cache.key_positions`` (what the cached keys are rotated by: ``"positions"`` as eager PyTorch, or
    ``"cache_slots"``: a left-padded row's keys turned further by its padding, see the module docstring)."""
    kv = meta["kv_cache"]
    shape = ["batch", kv["num_kv_heads"], "capacity", kv["head_dim"]]
    kv["shape"] = shape
    kv["shared_buffer"] = True
    kv["key_positions"] = key_positions
    for pair in kv["past_names"] + kv["present_names"]:
        for name in pair:
            meta["io"][name]["shape"] = list(shape)
    meta["graph"] = "gqa"
