"""Block-diffusion generation for masked-diffusion language models (LLaDA, Dream, Fast-dLLM, SDAR).

The sequence starts as the prompt followed by ``gen_length`` mask tokens. Blocks of ``block_length`` positions are
denoised left to right; each step runs the bidirectional model on the whole sequence (all-position logits), samples
every masked position of the current block with :func:`decodekit.sample_block` (token + confidence), and commits
the positions :func:`decodekit.select_positions` picks: LLaDA's schedule (``k_i`` of :func:`transfer_schedule`,
``steps / num_blocks`` steps per block), Fast-dLLM's confidence threshold or SDAR's entropy bound (a step commits
at least one position; the block ends when none is masked).

Backends. :class:`OnnxDiffusionModel` runs an export with all-position logits (``export_decoder(...,
all_logits=True)`` of a decoder with ``config.causal = False``) on ONNX Runtime: one session, and every input and
output bound once to preallocated torch buffers through IO binding; steps of one generation have the same shapes,
so a step re-binds nothing and only the token buffer changes. The logits come back as a view of the bound output
buffer and go into ``sample_block`` in place (the current block is a strided slice of it). :class:`EagerDiffusionModel`
runs the same :class:`~decodekit.models.Decoder` in eager PyTorch. Both use the same sampler with the same seeds, so
they give the same tokens (up to logits that differ in the last bits deciding a draw or a tie).

Phase 1 (the default): every step recomputes the whole sequence (the attention is bidirectional, so finished
blocks' keys and values change with the rest). Phase 2 (``kv_cache=True``): block-causal decoding; the prompt and
each finished block are run once and keep their keys and values in the cache (two ping-pong storages on ORT), and a
step runs only the current block's positions after it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import UsageError
from decodekit.runtime.config import DiffusionSampling, check_int, resolve_diffusion_sampling
from decodekit.runtime.onnx import (
    _NP_DTYPES,
    _ORT_TYPES,
    METADATA_FILE,
    _Binder,
    cpu_threads_arg,
    open_session,
    read_metadata,
    spin_wait_arg,
)

__all__ = ["DiffusionResult", "EagerDiffusionModel", "OnnxDiffusionModel", "diffusion_generate"]

_STEP_MIX = -0x3A4E1B2F6C5D7E09  # odd int64: each step's seeds differ from the previous step's


class OnnxDiffusionModel:
    """A bidirectional decoder exported with all-position logits, on ONNX Runtime with IO binding.

    Parameters
    ----------
    model_dir : path-like
        ``export_decoder(model, out, all_logits=True)`` of a decoder with ``config.causal = False``.
    device : {"cpu", "cuda"}
        Where the session runs and the buffers live (``"cuda"``: onnxruntime-gpu's CUDA execution provider; the
        logits then stay on the GPU and ``sample_block`` runs its Triton kernel on them).
    max_batch, max_seq_len : int
        Buffer sizes (``max_seq_len`` defaults to the export's).
    intra_op_threads : int, optional
        ONNX Runtime's intra-op thread count, 1 to 4096 (default: ``$DECODEKIT_ORT_THREADS`` if set, else ORT's
        choice, one per core: unlike a one-token decode step, a diffusion step runs many positions, enough to split).
    spin_wait : bool or str, optional
        CPU only: how ORT's idle workers wait for the next parallel op of a step, as in
        :class:`~decodekit.runtime.OnnxDecoder` (``"<n>us"``, True, False; default ``$DECODEKIT_ORT_SPIN``, else
        5 us); never between steps, where ``sample_block`` needs the cores. The attribute ``spin_wait`` holds the
        policy in force (None on CUDA). No setting changes the tokens.

    :meth:`logits` returns a ``[B, T, V]`` view of the bound output buffer, overwritten by the next call.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", *, max_batch: int = 1,
                 max_seq_len: int | None = None, intra_op_threads: int | None = None,
                 spin_wait: bool | str | None = None) -> None:
        from decodekit.models.config import DecoderConfig

        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a path, got {type(model_dir).__name__}")
        if not isinstance(device, str):
            raise TypeError(f"device must be a str, 'cpu' or 'cuda', got {type(device).__name__} {device!r}")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"device must be 'cpu' or 'cuda', got {device!r}")
        max_batch = check_int("max_batch", max_batch, lo=1, hi=4096)
        intra_op_threads = cpu_threads_arg(intra_op_threads)
        spin_policy = spin_wait_arg(spin_wait)
        self.model_dir = Path(model_dir)
        meta = read_metadata(self.model_dir)
        logits_entry = meta.get("logits")
        if not (isinstance(logits_entry, dict) and logits_entry.get("all_positions")):
            raise UsageError(f"{self.model_dir} has last-position logits; diffusion needs an export with "
                             "all_logits=True")
        try:
            self.config = DecoderConfig.from_dict(meta["config"])
        except (UsageError, KeyError, TypeError) as e:
            raise UsageError(f"{self.model_dir / METADATA_FILE} has a bad 'config' entry: {e}") from None
        if self.config.causal:
            raise UsageError(f"{self.model_dir} is a causal decoder; diffusion needs config.causal = False")
        export_max = int(meta.get("max_seq_len", self.config.max_seq_len))
        max_seq_len = export_max if max_seq_len is None else check_int("max_seq_len", max_seq_len, lo=1,
                                                                         hi=export_max)
        model_file = self.model_dir / meta.get("model_file", "model.onnx")
        if not model_file.is_file():
            raise UsageError(f"{model_file} is missing from the export directory")
        # ORT's thread count stays its own by default (one per core), whatever the model's size: a step runs every
        # position of the sequence (or of the block), enough work to split even for a small model
        self.session, self.spin_wait = open_session(model_file, device, intra_op_threads, spin_policy)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        types = {a.name: a.type for a in list(self.session.get_inputs()) + list(self.session.get_outputs())}
        cfg = self.config
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.kv_dtype = _ORT_TYPES[types["past_key_values.0.key"]]
        self.logits_dtype = _ORT_TYPES[types["logits"]]
        self._int = {n: _ORT_TYPES[types[n]] for n in ("input_ids", "position_ids", "attention_mask")}
        # ---- buffers, allocated once: ORT reads and writes them in place
        flat = max_batch * max_seq_len
        dev = self.device
        self._ids = torch.zeros(flat, dtype=self._int["input_ids"], device=dev)
        self._pos = torch.zeros(flat, dtype=self._int["position_ids"], device=dev)
        self._mask = torch.ones(flat, dtype=self._int["attention_mask"], device=dev)
        self._logits = torch.zeros(flat * cfg.vocab_size, dtype=self.logits_dtype, device=dev)
        region = max_batch * cfg.n_kv_heads * max_seq_len * cfg.head_dim
        # KV storages: 0 and 1 hold the prefix cache (ping-pong on appends), 2 takes the presents of a step that
        # must not grow the cache (its contents are never read)
        self._kv = torch.zeros(3, cfg.n_layers, 2, region, dtype=self.kv_dtype, device=dev)
        self._binder = _Binder(self.session, self.device)
        self._cur = 0  # the storage holding the prefix cache
        self._cache_len = 0
        self._batch = 0
        self.calls = 0

    def _kv_ptr(self, storage: int, layer: int, which: int) -> int:
        return self._kv[storage, layer, which].data_ptr()

    def _run(self, x: torch.Tensor, past_len: int, past_storage: int, present_storage: int) -> torch.Tensor:
        """Run ``x [B, S]`` after ``past_len`` cached positions; bind what changed (the binder memoizes by shape and
        address, so the steps of one block re-bind nothing) and return the ``[B, S, V]`` logits view."""
        cfg = self.config
        b, t = x.shape
        total = past_len + t
        if not 1 <= b <= self.max_batch or total > self.max_seq_len:
            raise UsageError(f"a [{b}, {total}] sequence does not fit max_batch={self.max_batch}, "
                             f"max_seq_len={self.max_seq_len}")
        ids = self._ids[: b * t].view(b, t)
        ids.copy_(x)
        pos = self._pos[: b * t].view(b, t)
        pos.copy_(torch.arange(past_len, total, dtype=pos.dtype, device=pos.device).expand(b, t))
        bind = self._binder
        bind.input("input_ids", ids)
        bind.input("position_ids", pos)
        bind.input("attention_mask", self._mask[: b * total].view(b, total))
        np_kv = _NP_DTYPES[self.kv_dtype]
        for i in range(cfg.n_layers):
            for w, which in enumerate(("key", "value")):
                bind.raw(f"past_key_values.{i}.{which}", np_kv, (b, cfg.n_kv_heads, past_len, cfg.head_dim),
                         self._kv_ptr(past_storage, i, w), output=False)
                bind.raw(f"present.{i}.{which}", np_kv, (b, cfg.n_kv_heads, total, cfg.head_dim),
                         self._kv_ptr(present_storage, i, w), output=True)
        logits = self._logits[: b * t * cfg.vocab_size].view(b, t, cfg.vocab_size)
        bind.output("logits", logits)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the input copies above must land before ORT reads them
        bind.run()
        self.calls += 1
        return logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """All-position logits of the int64 sequence ``x [B, T]`` (no cache): a ``[B, T, V]`` view of the bound
        output buffer, overwritten by the next call."""
        return self._run(x, 0, 2, 2)

    # ---- the prefix cache (phase 2): finished blocks keep their keys and values
    def reset(self, batch_size: int) -> None:
        """Empty the prefix cache for ``batch_size`` rows."""
        self._batch = check_int("batch_size", batch_size, lo=1, hi=self.max_batch)
        self._cache_len, self._cur = 0, 0

    def append(self, x: torch.Tensor) -> None:
        """Run ``x [B, S]`` after the cache and keep its keys and values (a prompt, or a finished block)."""
        self._run(x, self._cache_len, self._cur, 1 - self._cur)
        self._cur, self._cache_len = 1 - self._cur, self._cache_len + x.shape[1]

    def block_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` of the block ``x [B, S]`` after the cache, which stays as it is."""
        return self._run(x, self._cache_len, self._cur, 2)


class EagerDiffusionModel:
    """A bidirectional :class:`~decodekit.models.Decoder` in eager PyTorch, with :meth:`logits` like
    :class:`OnnxDiffusionModel`'s."""

    def __init__(self, model: Any) -> None:
        from decodekit.models import Decoder

        if not isinstance(model, Decoder):
            raise TypeError(f"model must be a decodekit Decoder, got {type(model).__name__}")
        if model.config.causal:
            raise UsageError("model is a causal decoder; diffusion needs config.causal = False")
        self.model = model.eval()
        self.config = model.config
        self.device = model.tok_embeddings.weight.device
        self.max_seq_len = model.config.max_seq_len
        self.max_batch = 4096
        self.calls = 0
        self._past: list | None = None
        self._cache_len = 0

    @torch.no_grad()  # not inference_mode: the loop writes into the logits (the mask token's column)
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        if t > self.max_seq_len:
            raise UsageError(f"a sequence of {t} tokens exceeds max_seq_len={self.max_seq_len}")
        pos = torch.arange(t, device=self.device).expand(b, t)
        out, _ = self.model(x.to(self.device), pos, torch.ones(b, t, dtype=torch.long, device=self.device), None,
                            all_logits=True)
        self.calls += 1
        return out

    def reset(self, batch_size: int) -> None:
        self._past, self._cache_len = None, 0

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        b, t = x.shape
        total = self._cache_len + t
        if total > self.max_seq_len:
            raise UsageError(f"a sequence of {total} tokens exceeds max_seq_len={self.max_seq_len}")
        pos = torch.arange(self._cache_len, total, device=self.device).expand(b, t)
        mask = torch.ones(b, total, dtype=torch.long, device=self.device)
        self.calls += 1
        return self.model(x.to(self.device), pos, mask, self._past, all_logits=True)

    @torch.no_grad()
    def append(self, x: torch.Tensor) -> None:
        _, self._past = self._run(x)
        self._cache_len += x.shape[1]

    @torch.no_grad()
    def block_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]


@dataclass
class DiffusionResult:
    """``tokens`` int64 ``[B, P + gen_length]`` (prompt included), ``steps`` model calls, ``seconds`` wall time,
    ``gen_length`` the generated positions."""

    tokens: torch.Tensor
    steps: int
    seconds: float
    gen_length: int = 0

    @property
    def generated(self) -> torch.Tensor:
        """The ``[B, gen_length]`` generated part."""
        return self.tokens[:, self.tokens.shape[1] - self.gen_length:]


def _as_model(model: Any, max_batch: int) -> OnnxDiffusionModel | EagerDiffusionModel:
    if isinstance(model, (OnnxDiffusionModel, EagerDiffusionModel)):
        return model
    if isinstance(model, (str, os.PathLike)):
        return OnnxDiffusionModel(model, max_batch=max_batch)
    from decodekit.models import Decoder

    if isinstance(model, Decoder):
        return EagerDiffusionModel(model)
    raise TypeError("model must be an export directory, an OnnxDiffusionModel, an EagerDiffusionModel or a "
                    f"decodekit Decoder, got {type(model).__name__}")


def _prompt_tensor(prompt: Any) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype not in (torch.int64, torch.int32) or prompt.dim() not in (1, 2):
            raise TypeError(f"prompt must be int token ids [P] or [B, P], got {prompt.dtype} {tuple(prompt.shape)}")
        p = prompt.to(torch.int64).cpu()
        return p[None] if p.dim() == 1 else p
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
        return torch.tensor([list(prompt)], dtype=torch.int64)
    if (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(r, (list, tuple)) for r in prompt)
            and all(isinstance(t, int) and not isinstance(t, bool) for r in prompt for t in r)):
        if len({len(r) for r in prompt}) != 1:
            raise UsageError("prompt rows must have the same length (no padding in diffusion generation)")
        return torch.tensor([list(r) for r in prompt], dtype=torch.int64)
    raise TypeError(f"prompt must be token ids (a list, a list of equal-length lists, or an int tensor), got "
                    f"{type(prompt).__name__}")


def diffusion_generate(
    model: Any,
    prompt: Any,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    sampling: DiffusionSampling | None = None,
    *,
    mask_id: int | None = None,
    kv_cache: bool = False,
    **params: Any,
) -> DiffusionResult:
    """Generate ``gen_length`` tokens after ``prompt`` by block diffusion (LLaDA's ``generate`` and its variants).

    Parameters
    ----------
    model : export directory, :class:`OnnxDiffusionModel`, :class:`EagerDiffusionModel` or a bidirectional
        :class:`~decodekit.models.Decoder` (eager). An export directory opens a new ONNX Runtime session; pass an
        :class:`OnnxDiffusionModel` to reuse one across calls.
    prompt : token ids: a list, equal-length lists, or an int ``[P]`` / ``[B, P]`` tensor.
    gen_length, block_length, steps : int
        ``gen_length`` a multiple of ``block_length``; with the schedule (no ``threshold`` / ``entropy_bound``)
        ``steps`` a multiple of the block count, ``steps / blocks`` steps per block each committing ``k_i`` of
        :func:`decodekit.transfer_schedule` positions.
    sampling : DiffusionSampling, optional
        The sampling and commit parameters below as one frozen dataclass (declared once in
        ``decodekit/runtime/config.py``); keyword arguments override its fields.
    mask_id : the mask token (default ``config.mask_id``).
    temperature, top_k, top_p, order, confidence : :func:`decodekit.sample_block`'s (LLaDA: ``temperature 0``,
        ``confidence="raw_prob"``; Dream: ``order="top_p_first"``, ``"neg_entropy"``).
    threshold : Fast-dLLM: commit every masked position of the block with confidence ``>= threshold`` (at least
        one per step) until the block is done.
    entropy_bound : SDAR: commit the lowest-entropy prefix with cumulative entropy ``<= entropy_bound`` (at least
        one per step); use with ``confidence="neg_entropy"``.
    seed : int, the seed of every draw (step ``s`` of row ``b`` draws from a stream keyed by both).
    kv_cache : bool
        Phase 2, block-causal decoding: the prompt and every finished block are run once and keep their keys and
        values; a step runs only the current block after that cache (exact for block-causal models such as SDAR;
        for a fully bidirectional model such as LLaDA it is Fast-dLLM's prefix-cache approximation: the prefix no
        longer sees the blocks after it). Default: every step recomputes the whole sequence (phase 1).

    Returns
    -------
    DiffusionResult

    Example
    -------
    >>> from decodekit.models import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(arch="llama", vocab_size=64, dim=32, n_layers=1, n_heads=2, causal=False, mask_id=63)
    >>> res = diffusion_generate(Decoder(cfg), [1, 5, 9], gen_length=8, block_length=4, steps=4)
    >>> res.tokens.shape
    torch.Size([1, 11])
    """
    from decodekit.ops.sampling import BLOCK_CONFIDENCES, sample_block, select_positions, transfer_schedule

    sp = resolve_diffusion_sampling(sampling, **params)
    temperature, top_k, top_p, order, confidence = sp.temperature, sp.top_k, sp.top_p, sp.order, sp.confidence
    threshold, entropy_bound, seed = sp.threshold, sp.entropy_bound, sp.seed
    x0 = _prompt_tensor(prompt)
    B, P = x0.shape
    m = _as_model(model, B)
    cfg = m.config
    gen_length = check_int("gen_length", gen_length, lo=0)
    block_length = check_int("block_length", block_length, lo=1)
    steps = check_int("steps", steps, lo=1)
    if gen_length % block_length:
        raise UsageError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    n_blocks = gen_length // block_length
    rule = [n for n, v in (("threshold", threshold), ("entropy_bound", entropy_bound)) if v is not None]
    if len(rule) > 1:
        raise UsageError("give at most one of threshold, entropy_bound")
    if not rule and n_blocks and steps % n_blocks:
        raise UsageError(f"steps ({steps}) must be a multiple of the number of blocks ({n_blocks})")
    if confidence not in BLOCK_CONFIDENCES:
        raise UsageError(f"confidence must be one of {BLOCK_CONFIDENCES}, got {confidence!r}")
    mask_id = cfg.mask_id if mask_id is None else check_int("mask_id", mask_id, lo=0, hi=cfg.vocab_size - 1)
    if mask_id < 0:
        raise UsageError("the model has no mask token (config.mask_id is -1): pass mask_id")
    if B > m.max_batch or P + gen_length > m.max_seq_len:
        raise UsageError(f"{B} x {P + gen_length} tokens exceed the model's max_batch={m.max_batch} / "
                         f"max_seq_len={m.max_seq_len}")
    if bool((x0 < 0).any()) or bool((x0 >= cfg.vocab_size).any()):
        raise UsageError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    dev = m.device
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.int64, device=dev)
    x[:, :P] = x0.to(dev)
    per_block = steps // n_blocks if n_blocks and not rule else block_length
    base = torch.full((B,), seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=dev)
    base = base + torch.arange(B, device=dev) * -0x61C8864680B583EB  # per-row streams
    mix = torch.tensor(_STEP_MIX, dtype=torch.int64, device=dev)  # int64 products wrap (no Python overflow)
    t0 = time.perf_counter()
    n_steps = 0
    if not isinstance(kv_cache, bool):
        raise TypeError(f"kv_cache must be a bool, got {type(kv_cache).__name__}")
    if kv_cache:
        m.reset(B)
        if P:
            m.append(x[:, :P])
    for blk in range(n_blocks):
        s, e = P + blk * block_length, P + (blk + 1) * block_length
        if kv_cache and blk:
            m.append(x[:, s - block_length : s])  # the finished block joins the cache
        masked = x[:, s:e] == mask_id
        schedule = transfer_schedule(masked, per_block) if not rule else None
        for i in range(per_block):
            masked = x[:, s:e] == mask_id
            if not bool(masked.any()):
                break
            # the bound output buffer (ORT), sampled in place: [B, T, V], or [B, block, V] after the cache
            logits = m.block_logits(x[:, s:e]) if kv_cache else m.logits(x)[:, s:e]
            # the mask token is never drawn (committing it would leave the position masked for good); the buffer
            # is ours and rewritten by the next step
            logits[..., mask_id] = float("-inf")
            tok, conf = sample_block(logits, masked, input_ids=x[:, s:e], temperature=temperature,
                                     top_k=top_k, top_p=top_p, order=order, confidence=confidence,
                                     seed=base + mix * n_steps)
            n_steps += 1
            if rule == ["threshold"]:
                commit = select_positions(conf, masked, threshold=threshold)
            elif rule == ["entropy_bound"]:
                commit = select_positions(conf, masked, entropy_bound=entropy_bound)
            else:
                commit = select_positions(conf, masked, k=schedule[:, i])
            x[:, s:e] = torch.where(commit, tok, x[:, s:e])
        if bool((x[:, s:e] == mask_id).any()):
            raise UsageError(f"block {blk} still holds mask tokens after {per_block} steps: the model's logits "
                             "hold NaN / inf at some positions")
    return DiffusionResult(tokens=x, steps=n_steps, seconds=time.perf_counter() - t0, gen_length=gen_length)
