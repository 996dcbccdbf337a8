"""The generation loop shared by every backend (ONNX Runtime with or without IO binding, eager PyTorch).

A backend is a :class:`StepModel`: it owns its KV cache and exposes one method, ``step``, that runs ``S``
new tokens after the ``P`` cached ones and returns the last position's logits as a ``[B, V]`` torch tensor.
:func:`run_generation` does everything else, identically for all backends, so that two backends given the
same model and seed produce the same tokens:

* left padding of a batch of prompts of different lengths (``attention_mask`` 0 on the padding,
  ``position_ids`` counting real tokens only), one prefill step, then one-token decode steps;
* sampling with :func:`decodekit.sample` straight from the step's logits tensor (for the IO-binding
  backend that tensor is the buffer ONNX Runtime wrote: no copy, no numpy), per-row seeds advanced
  on the device each step; the repetition, presence and frequency penalties read an int32 ``token_counts``
  ``[B, V]`` tensor (the prompt's tokens, then each sampled token added in place);
* stopping per row on stop ids or length; streaming callbacks; timings (time to first token, decode
  tokens/s).

:func:`generate_on` (and ``generate`` on the decoders, through :class:`GenerateMixin`) adds prompt encoding,
:class:`~decodekit.runtime.config.GenerationConfig` building from keyword arguments, and the decoder's lock, so
that threads sharing one decoder take turns.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from decodekit.errors import UsageError
from decodekit.ops._threads import torch_threads
from decodekit.runtime.config import GenerationConfig, check_int, generation_params, resolve_config

#: The largest ``max_batch`` a decoder accepts (a typo such as ``10**7`` fails with a clear error instead of a
#: huge allocation; the ONNX decoder also checks its buffers against the memory available).
MAX_BATCH = 1 << 16

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Per-row, per-step seeds: base + row * _ROW_STRIDE + step * _STEP_STRIDE, kept in [0, 2**62) (odd constants,
# so rows and steps never share a seed within a generation).
_SEED_MASK = (1 << 62) - 1
_STEP_STRIDE = 0x2545F4914F6CDD1D & _SEED_MASK
_ROW_STRIDE = 0x1E3779B97F4A7C15 & _SEED_MASK


def check_reset_batch(batch_size: object, max_batch: int) -> int:
    """``reset``'s argument: an int in ``[1, max_batch]`` (``TypeError`` / ``UsageError`` naming ``batch_size``)."""
    batch_size = check_int("batch_size", batch_size, lo=1)
    if batch_size > max_batch:
        raise UsageError(f"batch_size {batch_size} exceeds max_batch={max_batch}")
    return batch_size


class StepModel(Protocol):
    """What :func:`run_generation` needs from a backend."""

    vocab_size: int
    max_batch: int
    max_seq_len: int
    device: torch.device

    def reset(self, batch_size: int) -> None:
        """Forget the cache; the next ``step`` is a prefill (``P = 0``) for ``batch_size`` rows."""

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids [B, S]`` after the cache; return logits ``[B, V]`` of the last position.

        A backend may also offer ``decode_stepper(next_ids, positions, mask)``: a cheaper one-token step over the
        loop's fixed buffers (see :func:`decode_stepper`), or None where it cannot."""

    @property
    def default_stop_ids(self) -> list[int]:
        """The stop ids used when the config's ``stop_ids`` is None."""


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
    #: beam search (``num_beams > 1``): each returned sequence's score (Hugging Face's ``sequences_scores``)
    scores: list[float] | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode steps (all active rows) per second of decoding."""
        return self.decode_tokens / self.decode_time_s if self.decode_time_s > 0 else float("nan")


Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor

_PROMPTS_WANT = "a str, a list of str, a list of token ids, a list of token-id lists or an int tensor [B, S]"


def _id_row(name: str, row: object) -> list[int]:
    """One prompt of token ids (a sequence of ints or a 1-D int tensor) as a list; ``TypeError`` naming the
    offending element otherwise (a float id is never truncated)."""
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must be a 1-D int tensor, got {tuple(row.shape)} {row.dtype}")
        return row.tolist()
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise TypeError(f"{name} must be a list of int token ids, got {type(row).__name__} {row!r:.40}")
    out = []
    for j, t in enumerate(row):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name}[{j}] must be an int token id, got {type(t).__name__} {t!r}")
        out.append(int(t))
    return out


def split_prompts(prompts: object) -> tuple[list[str] | None, list[list[int]] | None]:
    """Check the structure of ``prompts`` without a tokenizer: ``(texts, None)`` or ``(None, token_id_rows)``.

    ``TypeError`` (naming ``prompts``) for anything that is not one of: a str, a non-empty list of str, a list
    of ints (one prompt), a list of token-id lists / 1-D int tensors, an int tensor ``[S]`` or ``[B, S]``;
    text and token ids may not be mixed. ``UsageError`` for an empty batch.
    """
    if isinstance(prompts, str):
        return [prompts], None
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype not in _INT_DTYPES:
            raise TypeError(f"prompts must be an int tensor, got {prompts.dtype}")
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise UsageError(f"prompts must be an int tensor [B, S], got shape {tuple(prompts.shape)}")
        if prompts.shape[0] == 0:
            raise UsageError("prompts is empty: give at least one prompt")
        return None, prompts.tolist()
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be {_PROMPTS_WANT}, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise UsageError("prompts is empty: give at least one prompt")
    is_text = [isinstance(p, str) for p in prompts]
    if all(is_text):
        return list(prompts), None
    if any(is_text):
        raise TypeError(
            f"prompts mixes text (prompts[{is_text.index(True)}]) and token ids (prompts[{is_text.index(False)}]): "
            "give all rows as str or all as token ids"
        )
    if isinstance(prompts[0], numbers.Number):
        return None, [_id_row("prompts", prompts)]  # a flat list of ids is one prompt, like a 1-D tensor
    return None, [_id_row(f"prompts[{i}]", p) for i, p in enumerate(prompts)]


def _takes_max_tokens(tok: object) -> bool:
    """Whether ``tok.encode`` accepts ``max_tokens=`` (decodekit's llama2.c tokenizer does, ``HFTokenizer`` not)."""
    try:
        params = inspect.signature(tok.encode).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False
    return "max_tokens" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _too_long(which: str, n: str, limit: int, max_seq_len: int) -> UsageError:
    return UsageError(
        f"{which} is {n} tokens long: it does not fit max_seq_len={max_seq_len}, which leaves room for at most "
        f"{limit} prompt tokens (one slot is kept for a generated token)"
    )


def _encode_text(tok: Any, text: str, which: str, max_seq_len: int | None) -> list[int]:
    """``tok.encode(text, bos=True)``, refused with a ``UsageError`` naming ``max_seq_len`` when the prompt cannot
    fit: from its byte length alone, before any encoding, when the tokenizer can bound it (``max_tokens=`` and
    ``min_tokens``), else after encoding."""
    if max_seq_len is None:
        return tok.encode(text, bos=True)
    limit = max_seq_len - 1
    if not _takes_max_tokens(tok):
        ids = tok.encode(text, bos=True)
        if len(ids) > limit:
            raise _too_long(which, str(len(ids)), limit, max_seq_len)
        return ids
    min_tokens = getattr(tok, "min_tokens", None)
    if min_tokens is not None:
        least = min_tokens(text, bos=True)  # a lone surrogate: the tokenizer's own UsageError
        if least > limit:
            raise _too_long(which, f"at least {least}", limit, max_seq_len)
    try:
        return tok.encode(text, bos=True, max_tokens=limit)
    except UsageError:
        n = len(tok.encode(text, bos=True))  # short enough to encode twice: it got past the byte-length bound
        if n <= limit:
            raise  # not about the length
        raise _too_long(which, str(n), limit, max_seq_len) from None


def encode_prompts(model: StepModel, prompts: Prompts) -> list[list[int]]:
    """Token-id rows of ``prompts`` (see :func:`split_prompts`); text is encoded with ``model.tokenizer``, an
    empty string as BOS alone (as llama2.c's ``run.c`` starts without a prompt).

    A text prompt longer than ``model.max_seq_len - 1`` tokens (one slot is kept for a generated token) raises
    ``UsageError`` naming ``max_seq_len``; with decodekit's llama2.c tokenizer an over-long text is refused from its
    byte length before it is encoded, so a huge prompt fails at once."""
    texts, rows = split_prompts(prompts)
    if texts is not None:
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise UsageError("text prompts need a tokenizer and this model has none: pass token ids instead of text")
        max_seq_len = getattr(model, "max_seq_len", None)
        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool):
            max_seq_len = None
        rows = [
            _encode_text(tok, p, "the prompt" if len(texts) == 1 else f"prompt {i}", max_seq_len)
            for i, p in enumerate(texts)
        ]
    return rows


class _HeldLock:
    """The decoder's generation lock, held for one ``generate`` (and refusing re-entry from the same thread, e.g.
    from a ``stream`` callback, which would otherwise deadlock)."""

    def __init__(self, model: object) -> None:
        self.lock: threading.Lock | None = getattr(model, "_generate_lock", None)
        self.owner: list[int | None] | None = getattr(model, "_generate_owner", None)

    def __enter__(self) -> None:
        if self.lock is None:
            return
        me = threading.get_ident()
        if self.owner is not None and self.owner[0] == me:
            raise RuntimeError("generate() was called again from inside a generate() on the same decoder "
                               "(e.g. from its stream callback); use a second decoder")
        self.lock.acquire()
        if self.owner is not None:
            self.owner[0] = me

    def __exit__(self, *exc: object) -> None:
        if self.lock is None:
            return
        if self.owner is not None:
            self.owner[0] = None
        self.lock.release()


def generate_on(
    model: StepModel,
    prompts: Prompts,
    config: GenerationConfig | None = None,
    *,
    stream: Callable[[int, int], None] | None = None,
    **params: Any,
) -> GenerationResult:
    """Encode ``prompts`` and run :func:`run_generation` on an opened step model, holding its generation lock.

    ``params`` are :class:`GenerationConfig` fields, applied on top of ``config``.
    """
    config = resolve_config(config, **params)  # validated before anything else happens
    with _HeldLock(model):
        rows = encode_prompts(model, prompts)
        return run_generation(
            model,
            rows,
            config,
            default_stop_ids=model.default_stop_ids,
            tokenizer=getattr(model, "tokenizer", None),
            stream=stream,
        )


class GenerateMixin:
    """``generate(prompts, config=None, *, stream=None, **params)`` for step models.

    A class using it calls :meth:`_init_generate_lock` in ``__init__``: concurrent ``generate`` calls on one
    object then run one after the other, each with the results it would get alone.
    """

    def _init_generate_lock(self) -> None:
        self._generate_lock = threading.Lock()
        self._generate_owner: list[int | None] = [None]

    @generation_params
    def generate(
        self,
        prompts: Prompts,
        config: GenerationConfig | None = None,
        *,
        stream: Callable[[int, int], None] | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Generate from text prompts or token ids (left-padded into one batch of at most ``max_batch`` rows).

        Parameters
        ----------
        prompts : str, list of str, list of token ids, list of token-id lists, or int tensor [B, S]
            Text needs the model's tokenizer (an empty string is BOS alone). Text and ids may not be mixed.
        config : GenerationConfig, optional
            Parameters to start from; keyword arguments below override its fields.
        stream : callable(row, token_id), optional
            Called for each generated token as soon as it is sampled.
        {generation_params}

        Raises ``TypeError`` for an argument of the wrong type and ``UsageError`` (a ``ValueError``) for a bad value,
        naming it. Thread-safe: concurrent calls on one decoder are serialized.
        """
        return generate_on(self, prompts, config, stream=stream, **params)


def _check_rows(input_ids: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> list[list[int]]:
    """Token-id rows (see :func:`split_prompts`; text is refused here), each non-empty and inside the vocabulary."""
    _, rows = split_prompts(input_ids)
    if rows is None:
        raise TypeError("input_ids must be token ids, not text (encode it first, or use generate())")
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


def decode_stepper(model: StepModel, next_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
                   ) -> Callable[[int], torch.Tensor]:
    """``f(total)``: the one-token decode step after ``total - 1`` cached tokens, reading the loop's fixed buffers
    (``next_ids [B, 1]``, every slot's ``positions`` and ``mask`` ``[B, N]``). A backend that can bind them once
    offers ``decode_stepper`` (OnnxDecoder on the CPU: a step binds two pointers and runs); any other gets
    ``model.step`` on the slices."""
    make = getattr(model, "decode_stepper", None)
    fast = make(next_ids, positions, mask) if make is not None else None
    if fast is not None:
        return fast
    return lambda total: model.step(next_ids, positions[:, total - 1 : total], mask[:, :total])


def _texts(
    tokenizer, prompts: list[list[int]], outputs: list[list[int]], stops: set[int]  # noqa: ANN001
) -> list[str] | None:
    """Each output's text (the stop ids ``stops`` left out), or None without a tokenizer."""
    if tokenizer is None:
        return None
    text = []
    for prompt, toks in zip(prompts, outputs):
        # decode after the prompt so that piece rules that look back (llama2.c drops the space after BOS) hold
        head = tokenizer.decode(prompt)
        text.append(tokenizer.decode(prompt + [t for t in toks if t not in stops])[len(head) :])
    return text


@contextlib.contextmanager
def _torch_on_one_thread(model: object) -> Iterator[None]:
    """While a backend whose own workers do the heavy CPU work (ONNX Runtime on CPU: ``model.owns_cpu_threads``)
    generates, torch's ops in the loop (sampler, beam bookkeeping, cache reorder) run on this thread alone.

    Why: torch's OpenMP workers spin-wait after each parallel op, on the cores ONNX Runtime's workers need for the
    next step. Measured on this 2-core machine (GPT-2-small shape, V 8194, 128 tokens, beam-sampling settings):
    3 beams 2.25 -> 2.0 s (1 beam unchanged, 1.4 s: its sampler runs in NumPy). The per-step torch work is small,
    so one thread loses little.
    ``torch.set_num_threads`` sets the OpenMP thread count of the calling thread; it is restored on exit.
    """
    if not getattr(model, "owns_cpu_threads", False):
        yield
        return
    with torch_threads(1):
        yield


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

    ``stream(row, token_id)`` is called for every generated token of every still-running row, in order. On a
    backend that owns the CPU cores (ONNX Runtime on CPU), torch's own ops run on one thread meanwhile
    (:func:`_torch_on_one_thread`).
    """
    with _torch_on_one_thread(model):
        return _run_generation(model, input_ids, config, default_stop_ids=default_stop_ids, tokenizer=tokenizer,
                               stream=stream)


def _run_generation(
    model: StepModel,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig,
    *,
    default_stop_ids: Sequence[int],
    tokenizer,  # noqa: ANN001
    stream: Callable[[int, int], None] | None,
) -> GenerationResult:
    from decodekit.ops.sampling import sample  # lazy: keeps `import decodekit.runtime` light

    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    rows = _check_rows(input_ids, model.vocab_size)
    b = len(rows)
    if b > model.max_batch:
        raise UsageError(f"batch of {b} prompts exceeds max_batch={model.max_batch}")
    longest = max(len(r) for r in rows)
    if longest >= model.max_seq_len:
        raise UsageError(f"prompt of {longest} tokens does not fit max_seq_len={model.max_seq_len} (needs one slot)")
    new_tokens = min(config.max_new_tokens, model.max_seq_len - longest)
    if config.stop_ids is not None and any(t >= model.vocab_size for t in config.stop_ids):
        raise UsageError(f"stop_ids must be token ids in [0, {model.vocab_size}), got {list(config.stop_ids)}")
    stop_ids = set(default_stop_ids if config.stop_ids is None else config.stop_ids)
    device = model.device
    buf = _Buffers(rows, longest + new_tokens, model.vocab_size, device)

    seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    # per-row seeds; step t uses base + t * stride (wrapping in int64 arithmetic is fine: only bits matter)
    row_seeds = torch.tensor([(seed + i * _ROW_STRIDE) & _SEED_MASK for i in range(b)], dtype=torch.int64)
    row_seeds = row_seeds.to(device)
    seeds = torch.empty_like(row_seeds)

    def step_seeds(step: int) -> torch.Tensor:
        """The rows' (prompts') int64 [B] seeds of step ``step``, in place in one device buffer."""
        torch.add(row_seeds, (step * _STEP_STRIDE) & _SEED_MASK, out=seeds)
        return seeds.bitwise_and_(_SEED_MASK)

    if config.num_beams > 1:  # beam search / beam sampling (runtime/beam.py)
        from decodekit.runtime.beam import run_beam_search

        out = run_beam_search(model, rows, config, buf, new_tokens=new_tokens, stops=stop_ids, step_seeds=step_seeds,
                              decode_stepper=decode_stepper)
        if stream is not None:  # beams change until the search ends: the returned sequences are streamed then
            for i, toks in enumerate(out.tokens):
                for tok in toks:
                    stream(i, tok)
        return GenerationResult(
            tokens=out.tokens, prompt_tokens=out.prompts, text=_texts(tokenizer, out.prompts, out.tokens, stop_ids),
            finish_reasons=["stop" if s and s[-1] in stop_ids else "length" for s in out.tokens],
            time_to_first_token_s=out.ttft, decode_time_s=out.decode_time, total_time_s=out.total_time,
            decode_steps=out.steps, decode_tokens=sum(max(len(s) - 1, 0) for s in out.tokens), scores=out.scores,
        )
    counts = None
    if config.uses_token_counts:  # the penalties read how often each token occurred (prompt + output) per row
        counts = torch.zeros(b, model.vocab_size, dtype=torch.int32, device=device)
        for i, r in enumerate(rows):
            ids = torch.tensor(r, device=device)
            counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    ones = torch.ones(b, 1, dtype=torch.int32, device=device)
    sample_kwargs = config.sampler_kwargs()  # every sampler field of the config, under its own name
    if not config.do_sample:  # deterministic decoding: greedy
        sample_kwargs["temperature"] = 0.0
    sample_kwargs["token_counts"] = counts
    # greedy with no penalty: the sampler's answer is the row's argmax (lowest index on ties) or -1 for a row whose
    # maximum is not finite (NaN, +inf, all -inf); one argmax over the bound logits gives exactly that, without the
    # sampler's dispatch and seed bookkeeping (most of a small model's per-step host time). On the CPU it is NumPy's
    # single-threaded argmax on a view of the logits: torch's reduction fans out to its thread pool, which costs
    # milliseconds per step when the cores are busy (measured at B = 8 on 2 busy cores: 2 ms against 10 us).
    greedy = counts is None and isinstance(sample_kwargs["temperature"], float) and sample_kwargs["temperature"] == 0.0
    next_col = buf.next_ids[:, 0]  # [B] contiguous view: the greedy tokens are written here
    next_np = next_col.numpy() if device.type == "cpu" else None
    row_index = np.arange(b)
    best_buf = None  # [B] the rows' maxima (torch path: CUDA, bfloat16)
    last_logits = view = last_ptr = None  # the logits tensor of the last step, its address, its NumPy view
    decode_step = decode_stepper(model, buf.next_ids, buf.positions, buf.mask)

    out_tokens: list[list[int]] = [[] for _ in range(b)]
    finish = ["length"] * b
    active = [True] * b
    model.reset(b)
    t0 = time.perf_counter()
    ttft = decode_start = 0.0
    decode_tokens = 0
    steps = 0
    s0 = buf.s0
    for step in range(new_tokens):
        if step == 0:
            logits = model.step(buf.prompt_ids, buf.positions[:, :s0], buf.mask[:, :s0])
        else:
            logits = decode_step(s0 + step)  # s0 + step tokens in the cache after it
        if greedy:  # the argmax straight into the next step's input; the rare non-finite row fixed on the host
            if logits is not last_logits or logits.data_ptr() != last_ptr:  # a backend's bound buffer: the same
                last_logits, last_ptr = logits, logits.data_ptr()  # tensor step after step, checked once
                numpy_ok = next_np is not None and logits.dtype in (torch.float32, torch.float16) and (
                    logits.device == device)
                view = logits.detach().numpy() if numpy_ok else None  # no copy
            if view is not None:
                view.argmax(axis=-1, out=next_np)  # NaN counts as the maximum: that row becomes -1 below
                if not all(map(math.isfinite, view[row_index, next_np].tolist())):
                    next_np[~np.isfinite(view[row_index, next_np])] = -1
                host = next_np.tolist()
            else:
                if best_buf is None or best_buf.dtype != logits.dtype:
                    best_buf = torch.empty(b, dtype=logits.dtype, device=device)
                torch.max(logits, -1, out=(best_buf, next_col))
                next_col.masked_fill_(~torch.isfinite(best_buf), -1)
                host = next_col.tolist()
        else:
            nxt = sample(logits, seed=step_seeds(step), **sample_kwargs)  # [B] int64, from the bound logits in place
            buf.next_ids[:, 0] = nxt
            host = nxt.tolist()  # the one host sync of a step: stop checks and streaming need the ids
            if counts is not None:
                if min(host) >= 0:
                    counts.scatter_add_(1, buf.next_ids, ones)
                else:  # a bad row (-1: NaN / +inf / all -inf logits) counts nothing
                    ids = buf.next_ids.clamp(min=0)
                    counts.scatter_add_(1, ids, (buf.next_ids >= 0).to(counts.dtype))
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
    return GenerationResult(
        tokens=out_tokens,
        prompt_tokens=rows,
        text=_texts(tokenizer, rows, out_tokens, stop_ids),
        finish_reasons=finish,
        time_to_first_token_s=ttft,
        decode_time_s=end - decode_start if steps > 0 else 0.0,
        total_time_s=end - t0,
        decode_steps=steps,
        decode_tokens=decode_tokens,
    )
