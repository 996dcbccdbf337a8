"""The generation loop shared by every backend (ONNX Runtime with or without IO binding, eager PyTorch).

A backend is a :class:`StepModel`: it owns its KV cache and exposes one method, ``step``, that runs ``S``
new tokens after the ``P`` cached ones and returns the last position's logits as a ``[B, V]`` torch tensor.
:func:`run_generation` does everything else, identically for all backends, so that two backends given the
same model and seed produce the same tokens:

* left padding of a batch of prompts of different lengths (``attention_mask`` 0 on the padding,
  ``position_ids`` counting real tokens only), one prefill step, then one-token decode steps;
* sampling with :func:`decodekit.sample` straight from the step's logits tensor (for the IO-binding
  backend that tensor is the buffer ONNX Runtime wrote: no copy, no numpy), per-row seeds advanced
  on the device each step, penalties from an in-place ``token_counts`` tensor;
* stopping per row on stop ids or length; streaming callbacks; timings (time to first token, decode
  tokens/s).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from decodekit.errors import UsageError

# Per-row, per-step seeds: base + row * _ROW_STRIDE + step * _STEP_STRIDE, kept in [0, 2**62) (odd constants,
# so rows and steps never share a seed within a generation).
_SEED_MASK = (1 << 62) - 1
_STEP_STRIDE = 0x2545F4914F6CDD1D & _SEED_MASK
_ROW_STRIDE = 0x1E3779B97F4A7C15 & _SEED_MASK


class StepModel(Protocol):
    """What :func:`run_generation` needs from a backend."""

    vocab_size: int
    max_batch: int
    max_seq_len: int
    device: torch.device

    def reset(self, batch_size: int) -> None:
        """Forget the cache; the next ``step`` is a prefill (``P = 0``) for ``batch_size`` rows."""

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids [B, S]`` after the cache; return logits ``[B, V]`` of the last position."""


@dataclass
class GenerationConfig:
    """Sampling and stopping parameters of :func:`run_generation` (the CLI flags map onto these).

    ``temperature == 0`` is greedy decoding. ``seed=None`` draws one from torch's default generator.
    ``stop_ids=None`` uses the model's own stop ids (EOS; BOS too for llama2.c checkpoints).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] | None = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise UsageError(f"seed must be an int or None, got {self.seed!r}")


@dataclass
class GenerationResult:
    """What :func:`run_generation` returns.

    ``tokens[b]`` holds row ``b``'s generated ids (the stop token included when one ended the row),
    ``text[b]`` their decoded text when a tokenizer was given. Timings are wall-clock seconds; on CUDA
    each step ends with a host sync (the stop check), so they are true device times.
    """

    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    text: list[str] | None
    finish_reasons: list[str]
    time_to_first_token_s: float
    decode_time_s: float
    total_time_s: float
    decode_steps: int
    decode_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode steps (all active rows) per second of decoding."""
        return self.decode_tokens / self.decode_time_s if self.decode_time_s > 0 else float("nan")


class GenerateMixin:
    """``generate(prompts, **params)`` for step models (text prompts need ``self.tokenizer``)."""

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        stream: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate from text prompts or token ids; parameters as in :func:`decodekit.runtime.loop`."""
        from decodekit.runtime import _generate_on

        return _generate_on(
            self,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_ids=stop_ids,
            stream=stream,
        )


def _normalize_prompts(input_ids: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise UsageError(f"input_ids must be an int tensor [B, S], got {tuple(input_ids.shape)} {input_ids.dtype}")
        rows = input_ids.tolist()
    else:
        rows = [list(map(int, r)) for r in input_ids]
    if not rows:
        raise UsageError("input_ids is empty: give at least one prompt")
    for b, r in enumerate(rows):
        if not r:
            raise UsageError(f"prompt {b} has no tokens (start it with BOS)")
        bad = [t for t in r if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {b} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return rows


class _Buffers:
    """Per-generation host-side tensors, allocated once before the loop (nothing is allocated per step)."""

    def __init__(self, rows: list[list[int]], max_total: int, vocab_size: int, device: torch.device) -> None:
        b = len(rows)
        lengths = torch.tensor([len(r) for r in rows])
        self.s0 = int(lengths.max())
        self.pad = (self.s0 - lengths).to(device)  # [B] left padding of each row
        ids = torch.zeros(b, self.s0, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, self.s0 - len(r) :] = torch.tensor(r, dtype=torch.int64)
        self.prompt_ids = ids.to(device)  # [B, S0]
        cols = torch.arange(max_total, device=device)
        # mask / positions of every slot the generation can reach: [B, max_total]
        self.mask = (cols[None, :] >= self.pad[:, None]).to(torch.int64)
        self.positions = (cols[None, :] - self.pad[:, None]).clamp_min(0)
        self.next_ids = torch.zeros(b, 1, dtype=torch.int64, device=device)  # [B, 1] token fed to the next step


def run_generation(
    model: StepModel,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig,
    *,
    default_stop_ids: Sequence[int] = (),
    tokenizer=None,  # noqa: ANN001 - any decodekit tokenizer (encode/decode)
    stream: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Prefill a batch of prompts and decode until every row stops; see the module docstring.

    ``stream(row, token_id)`` is called for every generated token of every still-running row, in order.
    """
    from decodekit.ops.sampling import sample  # lazy: keeps `import decodekit.runtime` light

    config.validate()
    rows = _normalize_prompts(input_ids, model.vocab_size)
    b = len(rows)
    if b > model.max_batch:
        raise UsageError(f"batch of {b} prompts exceeds max_batch={model.max_batch}")
    longest = max(len(r) for r in rows)
    if longest >= model.max_seq_len:
        raise UsageError(f"prompt of {longest} tokens does not fit max_seq_len={model.max_seq_len} (needs one slot)")
    new_tokens = min(config.max_new_tokens, model.max_seq_len - longest)
    stop_ids = set(default_stop_ids if config.stop_ids is None else config.stop_ids)
    device = model.device
    buf = _Buffers(rows, longest + new_tokens, model.vocab_size, device)

    seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    # per-row seeds; step t uses base + t * stride (wrapping in int64 arithmetic is fine: only bits matter)
    row_seeds = torch.tensor([(seed + i * _ROW_STRIDE) & _SEED_MASK for i in range(b)], dtype=torch.int64)
    row_seeds = row_seeds.to(device)
    seeds = torch.empty_like(row_seeds)
    counts = None
    if config.repetition_penalty != 1.0:
        counts = torch.zeros(b, model.vocab_size, dtype=torch.int32, device=device)
        for i, r in enumerate(rows):
            ids = torch.tensor(r, device=device)
            counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    ones = torch.ones(b, 1, dtype=torch.int32, device=device)
    sample_kwargs = dict(
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
        token_counts=counts,
    )

    out_tokens: list[list[int]] = [[] for _ in range(b)]
    finish = ["length"] * b
    active = [True] * b
    model.reset(b)
    t0 = time.perf_counter()
    ttft = decode_start = 0.0
    decode_tokens = 0
    steps = 0
    for step in range(new_tokens):
        total = buf.s0 + step  # tokens in the cache after this step
        if step == 0:
            logits = model.step(buf.prompt_ids, buf.positions[:, : buf.s0], buf.mask[:, : buf.s0])
        else:
            logits = model.step(buf.next_ids, buf.positions[:, total - 1 : total], buf.mask[:, :total])
        torch.add(row_seeds, (step * _STEP_STRIDE) & _SEED_MASK, out=seeds)
        seeds.bitwise_and_(_SEED_MASK)
        nxt = sample(logits, seed=seeds, **sample_kwargs)  # [B] int64, drawn from the bound logits in place
        buf.next_ids[:, 0] = nxt
        if counts is not None:
            counts.scatter_add_(1, buf.next_ids, ones)
        host = nxt.tolist()  # the one host sync of a step: stop checks and streaming need the ids
        if step == 0:
            ttft = time.perf_counter() - t0
            decode_start = time.perf_counter()
        for i, tok in enumerate(host):
            if not active[i]:
                continue
            out_tokens[i].append(tok)
            if step > 0:
                decode_tokens += 1
            if stream is not None:
                stream(i, tok)
            if tok in stop_ids:
                active[i] = False
                finish[i] = "stop"
        steps = step
        if not any(active):
            break
    end = time.perf_counter()
    text = None
    if tokenizer is not None:
        text = []
        for prompt, toks in zip(rows, out_tokens):
            # decode after the prompt so that piece rules that look back (llama2.c drops the space after BOS) hold
            head = tokenizer.decode(prompt)
            text.append(tokenizer.decode(prompt + [t for t in toks if t not in stop_ids])[len(head) :])
    return GenerationResult(
        tokens=out_tokens,
        prompt_tokens=rows,
        text=text,
        finish_reasons=finish,
        time_to_first_token_s=ttft,
        decode_time_s=end - decode_start if steps > 0 else 0.0,
        total_time_s=end - t0,
        decode_steps=steps,
        decode_tokens=decode_tokens,
    )
