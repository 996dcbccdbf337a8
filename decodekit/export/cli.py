"""``decodekit export MODEL -o OUT_DIR``: the command-line face of :func:`decodekit.export.export_decoder`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``decodekit``'s argparse subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a llama2.c checkpoint, GGUF file or Hugging Face directory to ONNX (KV cache), then validate it",
        description=(
            "Export a decoder to OUT_DIR/model.onnx + OUT_DIR/decodekit.json (+ the tokenizer), with explicit "
            "KV-cache inputs/outputs and dynamic batch/sequence/past lengths, then check ONNX Runtime against "
            "eager PyTorch. OUT_DIR may not hold the source; --force replaces only a previous export (never other "
            "files, never through a symbolic link); concurrent exports to one OUT_DIR wait for each other. "
            "Exit codes: 0 ok, 1 validation failed, 2 any other error (one line on stderr), 130 interrupted."
        ),
    )
    p.add_argument("model", help="llama2.c checkpoint (.bin), GGUF file (.gguf) or Hugging Face model directory")
    p.add_argument("-o", "--out", dest="out_dir", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights/KV/logits dtype (fp32)")
    p.add_argument("--weights", choices=("fp32", "int4"), default="fp32",
                   help="int4: keep a GGUF file's Q4_0/Q4_1 matrices as 4-bit MatMulNBits blocks (ONNX Runtime), "
                        "validated against the dequantized fp32 model (default: fp32, every weight dequantized)")
    p.add_argument("--graph", choices=("plain", "gqa"), default="plain",
                   help="gqa: ONNX Runtime's fused ops with the KV cache appended in place (GroupQueryAttention on "
                        "one shared past/present buffer, packed q/k/v, residual add inside the norms); falls back to "
                        "the plain graph with a note when the model cannot use it (default: plain, standard ops only)")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset, 18 up to what onnx and ONNX Runtime know (default: the exporter's)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="override the context length")
    p.add_argument("--atol", type=float, default=None, metavar="X", help="validation tolerance (1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--rtol", type=float, default=None, metavar="X", help="relative tolerance (0 fp32, 4e-3 fp16)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the ONNX Runtime check")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR when it holds a previous decodekit export (and nothing else)")
    p.add_argument("--all-logits", action="store_true", help="output logits for every position, not only the last")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer file to copy (default: found)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from decodekit.export import export_decoder

    result = export_decoder(
        args.model, args.out_dir, dtype=args.dtype, opset=args.opset, max_seq_len=args.max_seq_len,
        atol=args.atol, rtol=args.rtol,
        validate=args.validate, force=args.force, all_logits=args.all_logits, tokenizer=args.tokenizer,
        progress=not args.quiet, weights=args.weights, graph=args.graph,
    )
    line = f"exported {args.model} -> {result.out_dir}"
    if result.validation is not None:
        name, diff = result.validation.worst
        line += f" (validated: max |ORT - eager| {diff:.2e} in {name})"
    print(line, file=sys.stdout)
    return 0

