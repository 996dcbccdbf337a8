"""4-bit weight-only exports: GGUF Q4_0 / Q4_1 blocks kept as ONNX Runtime's ``com.microsoft::MatMulNBits``.

How it works
------------
The decoder is exported as usual with every weight dequantized to float32 (so the graph, its names and its KV
cache are exactly the fp32 export's), then each projection whose GGUF tensor was Q4_0 or Q4_1 is swapped in the
saved graph: the ``MatMul(x, W^T)`` that reads the dequantized matrix becomes ::

    MatMulNBits(x, B, scales[, zero_points])   K = in features, N = out features, bits = 4, block_size = 32

which ONNX Runtime computes as ``x @ dequant(B)^T`` with ``dequant(B)[n, k] = (code - zero_point) * scale`` per
block of 32 codes along ``K`` (codes packed two to a byte, low nibble first). The GGUF blocks map exactly:

* Q4_0 (``w = (code - 8) * d``): ``scales = d`` and no zero point (the operator's default is 8);
* Q4_1 (``w = code * d + m``): ``scales = d``, zero points 0, and the minimums added apart:
  ``x @ w^T = MatMulNBits(x) + (x @ S) @ M`` with ``S`` ``[K, K/32]`` summing each block of inputs and ``M``
  ``[K/32, N]`` the blocks' ``m``. ONNX Runtime's fast 4-bit kernel takes uint8 zero points only; with the float
  zero point ``-m / d`` it falls back to a generic path 25x slower (one 576 x 1536 matrix: 1.1 ms against 43 us,
  measured); the two small MatMuls cost ``K/32 * (K + N)`` multiply-adds, 4 % of the matrix's.

Only the nibble order is rearranged (GGUF keeps codes ``j`` and ``j + 16`` in one byte, MatMulNBits ``2j`` and
``2j + 1``) and, for q/k, the rows are un-permuted as the fp32 loader does (see :mod:`decodekit.models.gguf`).

The fused graph (``graph="gqa"``) packs each Llama layer's q/k/v, and its gate/up, into one MatMul; when every
matrix of such a group is 4-bit of one GGUF type (:func:`packed_groups`), their blocks are laid side by side along
``N`` into one MatMulNBits (rows are independent, so this is exact), and the Q4_1 block sums ``x @ S`` are computed
once per input, not once per matrix: SmolLM2-135M's step went from 1068 to 768 nodes after ONNX Runtime's
optimizations. A group that mixes types (or float matrices) keeps every matrix of the model apart.
Other tensors (norms, the Q8_0 embedding that is also the tied classifier) stay dequantized float32.

Each MatMul is found by the content of its weight initializer: the bytes of ``W^T`` of the dequantized parameter
(the exporter folds the transpose into the initializer exactly). Every 4-bit matrix must be found, else the export
fails loudly (nothing is written).

Accuracy
--------
The int4 graph computes the same function as the dequantized fp32 model: the only differences are the float
rounding of ``code * d`` plus the separately summed minimums against ``code * d + m`` and ONNX Runtime's summation
order, so the export is
validated against the dequantized fp32 model with :data:`INT4_ATOL` / :data:`INT4_RTOL` (it is NOT compared with
an unquantized model: the GGUF file holds none). ``accuracy_level`` is left at 0 (activations stay float32).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from decodekit.errors import UsageError
from decodekit.models.decoder import Decoder

MS_DOMAIN = "com.microsoft"
#: validation tolerance of an int4 export against the dequantized fp32 model: |ort - eager| <= atol + rtol*|eager|
INT4_ATOL = 1e-3
INT4_RTOL = 0.0
WEIGHTS = ("fp32", "int4")


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def packed_groups(decoder: Decoder, blocks: dict[str, Any]) -> list[tuple[str, ...]] | None:
    """The matrices the fused graph packs into one MatMul (each Llama layer's q/k/v, and its gate/up), when all of
    them are 4-bit blocks of one GGUF type (their blocks then concatenate along ``N`` into one MatMulNBits); None
    when some group mixes types or float matrices (the graph then keeps every matrix apart)."""
    if decoder.config.arch != "llama":
        return None
    groups = []
    for i in range(decoder.config.n_layers):
        for names in (("attn.wq", "attn.wk", "attn.wv"), ("mlp.w1", "mlp.w3")):
            group = tuple(f"layers.{i}.{n}.weight" for n in names)
            if any(n not in blocks for n in group) or len({blocks[n].gguf_type for n in group}) != 1:
                return None
            groups.append(group)
    return groups


def _concat_blocks(parts: list[Any]) -> Any:
    """One :class:`~decodekit.models.gguf.Int4Blocks` of the rows of ``parts`` in order (one GGUF type, one K)."""
    from decodekit.models.gguf import Int4Blocks

    if len(parts) == 1:
        return parts[0]
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=0)  # noqa: E731
    return Int4Blocks(parts[0].gguf_type, cat([b.packed for b in parts]), cat([b.scales for b in parts]),
                      cat([b.zero_points for b in parts]), cat([b.mins for b in parts]))


def pack_matmul_nbits(onnx_path: str | os.PathLike, decoder: Decoder, blocks: dict[str, Any],
                      *, groups: list[tuple[str, ...]] | None = None,
                      external_data: str | None = None) -> dict[str, Any]:
    """Replace, in the saved graph ``onnx_path``, the MatMul of every matrix in ``blocks`` by MatMulNBits.

    Parameters
    ----------
    onnx_path : path
        A graph written by :func:`decodekit.export._export_onnx` from ``decoder`` (rewritten in place).
    decoder : Decoder
        The dequantized float32 model that was exported (its parameters identify the initializers).
    blocks : dict of str -> :class:`decodekit.models.gguf.Int4Blocks`
        Decoder parameter name -> the matrix's 4-bit blocks.
    groups : list of tuples of str, optional
        Matrices the graph packs into one MatMul (its initializer is their ``W^T`` side by side, as
        :func:`packed_groups` says): their blocks become one MatMulNBits of ``N = sum N_i``.
    external_data : str, optional
        Save the weights into this file beside the graph (large models).

    Returns
    -------
    dict
        ``{"format": "int4", "op": "com.microsoft::MatMulNBits", "bits": 4, "block_size": 32, "matrices": n,
        "gguf_types": {type: count}, "float_matrices": [names kept dequantized]}``, for ``decodekit.json``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from decodekit.models.gguf import INT4_BLOCK

    path = Path(onnx_path)
    model = onnx.load(str(path))
    graph = model.graph
    params = dict(decoder.named_parameters(remove_duplicate=False))
    grouped = {n for g in groups or () for n in g}
    units = [tuple(g) for g in groups or ()] + [(n,) for n in blocks if n not in grouped]
    wanted: dict[tuple[int, int, bytes], list[tuple[str, ...]]] = {}
    for unit in units:  # W^T [K, sum N] of each unit, as the exporter wrote its initializer
        wt = np.concatenate([params[n].detach().float().cpu().numpy().T for n in unit], axis=1)
        wanted.setdefault((wt.shape[0], wt.shape[1], _digest(wt)), []).append(unit)
    shapes = {(k, n) for k, n, _ in wanted}
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for x in node.input:
            uses[x] = uses.get(x, 0) + 1

    found: dict[tuple[str, ...], int] = {}  # unit -> index of its MatMul in graph.node
    for idx, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        init = inits.get(node.input[1])
        if init is None or init.data_type != TensorProto.FLOAT or tuple(init.dims) not in shapes:
            continue
        key = (int(init.dims[0]), int(init.dims[1]), _digest(numpy_helper.to_array(init)))
        candidates = wanted.get(key)
        if candidates:
            found[candidates.pop(0)] = idx  # identical matrices (rare) are interchangeable: their blocks are too
    missing = sorted(n for unit in units if unit not in found for n in unit)
    if missing:
        raise RuntimeError(f"int4 export: the MatMul of {len(missing)} matrices was not found in the exported graph "
                           f"(e.g. {missing[0]}); the exporter's graph changed")

    new_inits, dropped = [], set()
    replaced: dict[int, list[Any]] = {}  # node index -> the nodes that take its place (in order)
    block_sums: dict[tuple[str, int], str] = {}  # (input, K) -> its per-block sums, computed once per input
    sum_matrices: set[int] = set()  # the K of each block_sum.{K} initializer written
    # in graph order: an input's block sums are computed at the first MatMul reading it, before any later use
    for unit, idx in sorted(found.items(), key=lambda item: item[1]):
        node, b = graph.node[idx], _concat_blocks([blocks[n] for n in unit])
        n, k = b.shape
        nb = k // INT4_BLOCK
        stem = unit[0].removesuffix(".weight") + ("" if len(unit) == 1 else f"+{len(unit) - 1}")
        inputs = [node.input[0], f"{stem}.qweight", f"{stem}.scales"]
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(b.packed, dtype=np.uint8), inputs[1]),
                      numpy_helper.from_array(b.scales.astype(np.float32).reshape(-1), inputs[2])]
        out = list(node.output)
        nodes = []
        if b.zero_points is not None:  # Q4_1: w = code * d + m, as code * d (zero point 0) plus the block minimums
            inputs.append(f"{stem}.zero_points")  # uint8, two 4-bit zeros a byte: ONNX Runtime's fast kernel
            new_inits.append(numpy_helper.from_array(np.zeros(n * ((nb + 1) // 2), dtype=np.uint8), inputs[3]))
            mins = b.mins.astype(np.float32).reshape(n, nb)  # Q4_1 blocks always carry theirs (models/gguf.py)
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(mins.T), f"{stem}.mins"))
            xsum = block_sums.get((node.input[0], k))
            if xsum is None:  # [..., nb] the input summed per block: q/k/v (gate/up) of a layer share it
                xsum = block_sums[(node.input[0], k)] = f"{stem}.xsum"
                if k not in sum_matrices:
                    sum_matrices.add(k)
                    new_inits.append(numpy_helper.from_array(_block_sum_matrix(k), f"block_sum.{k}"))
                nodes.append(helper.make_node("MatMul", [node.input[0], f"block_sum.{k}"], [xsum],
                                              name=f"{stem}.BlockSum"))
            out = [f"{stem}.codes_out"]
            nodes += [helper.make_node("MatMul", [xsum, f"{stem}.mins"], [f"{stem}.min_out"],
                                       name=f"{stem}.Mins"),  # [..., N] sum over blocks of m * block sum
                      helper.make_node("Add", [out[0], f"{stem}.min_out"], list(node.output), name=f"{stem}.Add")]
        nbits = helper.make_node("MatMulNBits", inputs, out, name=f"{stem}.MatMulNBits",
                                 domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=INT4_BLOCK)
        replaced[idx] = [nbits, *nodes]
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            dropped.add(node.input[1])
    rebuilt = [m for i, node in enumerate(graph.node) for m in replaced.get(i, [node])]  # order stays topological
    del graph.node[:]
    graph.node.extend(rebuilt)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    tmp = path.with_name(path.name + ".int4")
    if external_data:
        data = path.with_name(external_data)
        data.unlink(missing_ok=True)  # onnx.load read it into memory; a save would append to it
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=1024)
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    types: dict[str, int] = {}
    for b in blocks.values():
        types[b.gguf_type] = types.get(b.gguf_type, 0) + 1
    return {"format": "int4", "op": f"{MS_DOMAIN}::MatMulNBits", "bits": 4, "block_size": INT4_BLOCK,
            "matrices": sum(len(u) for u in found), "gguf_types": types,
            "float_matrices": sorted(n for n, p in params.items() if p.dim() == 2 and n not in blocks)}


def _block_sum_matrix(k: int) -> np.ndarray:
    """fp32 ``[K, K / 32]``: ``x @ S`` sums ``x`` over each block of 32 inputs (exact: ones and zeros)."""
    from decodekit.models.gguf import INT4_BLOCK

    return np.kron(np.eye(k // INT4_BLOCK, dtype=np.float32), np.ones((INT4_BLOCK, 1), dtype=np.float32))


def int4_blocks_for(model_path: Path | None, fmt: str, decoder: Decoder | None) -> dict[str, Any]:
    """The 4-bit blocks of a GGUF source (``UsageError`` for another source or a file without Q4_0/Q4_1)."""
    if model_path is None or fmt != "gguf":
        raise UsageError("weights='int4' keeps a GGUF file's Q4_0/Q4_1 blocks: the model must be a GGUF file "
                         f"(got {'an in-memory Decoder' if model_path is None else f'a {fmt} checkpoint'})")
    from decodekit.models.gguf import read_int4_blocks

    blocks = read_int4_blocks(model_path, None if decoder is None else decoder.config)
    if not blocks:
        raise UsageError(f"weights='int4': {model_path} has no Q4_0/Q4_1 projection matrices to keep as 4-bit blocks")
    return blocks
