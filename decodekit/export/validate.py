"""Check an exported ``model.onnx`` against the eager PyTorch model it came from.

The check is the situation the runtime meets: a batch of 2 prompts of DIFFERENT lengths, left-padded, run
as one prefill with an empty cache (``P = 0``), then 4 decode steps that feed each side its own presents
back as the past (``P = S0, S0 + 1, ...``). The next tokens are the eager model's greedy picks, fed to
both. For every graph output the largest absolute difference over all steps is reported.

An output passes when every element satisfies ``|ort - eager| <= atol + rtol * |eager|`` (numpy's
``allclose`` rule). The export uses ``rtol = 0`` for fp32, i.e. a pure absolute tolerance, and
``rtol = 4e-3`` (about 4 fp16 ulps) for fp16: values of magnitude 16 and above are 1 fp16 ulp = 0.0156
apart, so an absolute 1e-2 alone would fail on rounding. Eager and ONNX Runtime run in the same dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodekit.errors import ValidationError
from decodekit.models.decoder import Decoder

DECODE_STEPS = 4


@dataclass
class ValidationReport:
    """Largest ``|ORT - eager|`` per output name, over the prefill and every decode step."""

    max_abs_diff: dict[str, float]
    atol: float
    provider: str
    steps: int
    lengths: list[int] = field(default_factory=list)
    rtol: float = 0.0
    failed: list[str] = field(default_factory=list)  # outputs with an element beyond atol + rtol * |eager|

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.max_abs_diff, key=lambda k: self.max_abs_diff[k])
        return name, self.max_abs_diff[name]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol, "provider": self.provider,
                "steps": self.steps, "prompt_lengths": self.lengths}


def ort_providers() -> list[str]:
    """CUDA first when both ONNX Runtime and torch see a GPU, then CPU."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def compare_with_eager(
    model: Decoder,
    onnx_path: str | Path,
    meta: dict[str, Any],
    *,
    atol: float,
    rtol: float = 0.0,
    lengths: tuple[int, int] | None = None,
    decode_steps: int = DECODE_STEPS,
    seed: int = 0,
    providers: list[str] | None = None,
) -> ValidationReport:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` eagerly on the same inputs; return the differences.

    ``meta`` is the ``decodekit.json`` dictionary (names and dtypes). ``lengths`` are the two prompt lengths
    (default: up to 7 and 3 tokens fewer, within ``max_seq_len``). Does not raise on a mismatch: see
    :func:`validate_export`.
    """
    import onnxruntime as ort

    cfg = model.config
    max_len = max(2, min(7, meta["max_seq_len"] - decode_steps))
    lengths = lengths or (max_len, max(1, max_len - 3))
    sess_opts = ort.SessionOptions()
    sess_opts.log_severity_level = 3
    # graph="gqa": past and present share one buffer, bound below on the CPU (a CUDA run would copy it apart)
    shared = bool(meta["kv_cache"].get("shared_buffer"))
    if shared:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), sess_opts, providers=providers or ort_providers())
    provider = session.get_providers()[0]
    names = meta["inputs"]
    past_names = [n for pair in meta["kv_cache"]["past_names"] for n in pair]
    out_names = meta["outputs"]
    kv_dtype = np.dtype(meta["kv_cache"]["dtype"])
    all_positions = meta["logits"]["all_positions"]

    gen = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    mask = torch.zeros(b, s, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, s - n :] = 1  # left padding
    ids = ids * mask  # padded slots hold token 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    # graph="gqa" rotating inside GroupQueryAttention turns keys by cache slot: a left-padded row's keys by its
    # padding more than eager's (same attention, see decodekit.export.gqa); eager's keys get that turn to compare
    rotated_by = meta["kv_cache"].get("key_positions", "positions")
    if rotated_by not in ("positions", "cache_slots"):
        raise ValidationError(f"decodekit.json: kv_cache.key_positions must be 'positions' or 'cache_slots', got "
                              f"{rotated_by!r}")
    slot_keys = rotated_by == "cache_slots"
    if slot_keys:
        from decodekit.models.layers import apply_rotary, rotary_cos_sin, rotary_inv_freq

        inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rope_theta)
        padding = torch.tensor([s - n for n in lengths])  # [B] slots ahead of positions

    diffs = dict.fromkeys(out_names, 0.0)
    failed: list[str] = []
    eager_past = model.empty_cache(b)
    ort_past = [np.zeros((b, cfg.n_kv_heads, 0, cfg.head_dim), kv_dtype) for _ in past_names]
    if shared:  # one buffer of capacity s + decode_steps per cache tensor, bound once as both past and present
        ort_past = [np.zeros((b, cfg.n_kv_heads, s + decode_steps, cfg.head_dim), kv_dtype) for _ in past_names]
        binding = session.io_binding()
        for name, a in zip(past_names, ort_past):
            binding.bind_input(name, "cpu", 0, kv_dtype, list(a.shape), a.ctypes.data)
            binding.bind_output(name.replace("past_key_values.", "present.", 1), "cpu", 0, kv_dtype, list(a.shape),
                                a.ctypes.data)
    for _ in range(1 + decode_steps):
        logits, presents = model(ids, pos, mask, eager_past, all_logits=all_positions)
        feeds = {names[0]: _np(ids), names[1]: _np(pos), names[2]: _np(mask)}
        if shared:
            feeds = {n: np.ascontiguousarray(a) for n, a in feeds.items()}  # alive through the run
            for n, a in feeds.items():
                binding.bind_input(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            ort_logits = np.zeros((b, cfg.vocab_size), kv_dtype)
            binding.bind_output(out_names[0], "cpu", 0, kv_dtype, list(ort_logits.shape), ort_logits.ctypes.data)
            session.run_with_iobinding(binding)
            t = mask.shape[1]
            outs = [ort_logits] + [a[:, :, :t] for a in ort_past]
        else:
            feeds.update(zip(past_names, ort_past))
            outs = session.run(out_names, feeds)
        eager = [logits] + [t for kv in presents for t in kv]
        if slot_keys:
            cos, sin = rotary_cos_sin(padding[:, None].expand(b, mask.shape[1]), inv_freq, cfg.rope_layout)
            eager = [logits] + [t for k, v in presents for t in (apply_rotary(k, cos, sin, cfg.rope_layout), v)]
        for name, o, e in zip(out_names, outs, eager):
            if o.shape != tuple(e.shape):
                raise ValidationError(f"output {name}: ONNX Runtime shape {o.shape} != eager shape {tuple(e.shape)}")
            ref = _np(e).astype(np.float64)
            diff = np.abs(o.astype(np.float64) - ref)
            if shared and name != out_names[0]:
                # keys/values at padded slots are never read (see decodekit.export.gqa): real tokens only
                diff = diff * _np(mask)[:, None, :, None]
            worst = float(diff.max()) if diff.size else 0.0
            if not np.isfinite(worst):
                worst = float("inf")
            diffs[name] = max(diffs[name], worst)
            if not (diff <= atol + rtol * np.abs(ref)).all() and name not in failed:
                failed.append(name)  # NaN differences fail too
        # next step: the eager model's greedy token for both sides, each side keeps its own cache
        last = logits[:, -1] if all_positions else logits
        ids = last.float().argmax(-1, keepdim=True)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        eager_past = presents
        if not shared:
            ort_past = outs[1:]
    return ValidationReport(max_abs_diff=diffs, atol=atol, rtol=rtol, provider=provider, steps=1 + decode_steps,
                            lengths=list(lengths), failed=failed)


def validate_export(
    model: Decoder, out_dir: str | Path, *, atol: float, rtol: float = 0.0, report_line=print, **kwargs: Any
) -> ValidationReport:
    """:func:`compare_with_eager` on ``out_dir``; print one line per output; raise ValidationError on a mismatch."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "decodekit.json").read_text())
    report = compare_with_eager(model, out_dir / meta["model_file"], meta, atol=atol, rtol=rtol, **kwargs)
    width = max(len(n) for n in report.max_abs_diff)
    for name, diff in report.max_abs_diff.items():
        flag = "ABOVE TOLERANCE" if name in report.failed else "ok"
        report_line(f"  {name:<{width}}  max |ORT - eager| = {diff:.3e}  {flag}")
    if not report.ok:
        name = max(report.failed, key=lambda n: report.max_abs_diff[n])
        tol = f"atol {atol:g}" + (f" + rtol {rtol:g} * |eager|" if rtol else "")
        raise ValidationError(
            f"exported model disagrees with PyTorch: max |ORT - eager| = {report.max_abs_diff[name]:.3e} in {name} "
            f"({len(report.failed)} output(s) above {tol}, {report.provider})"
        )
    return report
