"""The one place generation parameters are declared: :class:`GenerationConfig`.

Everything else is derived from its fields: the keyword arguments of :func:`decodekit.generate`,
``OnnxDecoder.generate`` and ``EagerDecoder.generate`` (their signatures and docstrings are built by
:func:`generation_params`), the flags of ``decodekit generate`` (one ``--field-name`` per field, built by
iterating :func:`dataclasses.fields`), and the keyword arguments the generation loop passes to
:func:`decodekit.sample` (the fields whose metadata says ``sampler=True``). A new field is a new keyword
argument, a new CLI flag and, if it is a sampler field, a new sampler argument, without further edits.

Error rules (the whole runtime follows them): a value of the wrong type raises ``TypeError``, a value of the
right type that is out of range raises :class:`~decodekit.errors.UsageError` (a ``ValueError``); both name the
argument. The CLI turns either into one line on stderr and exit code 2.

This module imports nothing from the rest of the runtime, so every runtime module may import it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from decodekit.errors import UsageError

C = TypeVar("C")  # a config dataclass (see _resolve)

__all__ = ["GenerationConfig", "check_bool", "check_int", "generation_params", "resolve_config"]

_SEED_LIMIT = 1 << 63


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python int: ``TypeError`` unless it is an integer (bool is not), ``UsageError`` outside
    ``[lo, hi]``; both messages name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise UsageError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{name} must be <= {hi}, got {value}")
    return value


def check_float(
    name: str, value: object, *, lo: float | None = None, lo_open: bool = False, hi: float | None = None
) -> float:
    """``value`` as a finite Python float: ``TypeError`` unless it is a real number (bool is not), ``UsageError``
    when it is NaN/inf or outside the range (``lo`` excluded when ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {_type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UsageError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{name} must be <= {hi}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` itself when it is a bool, else ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
    return value


def _check_token_ids(name: str, value: object) -> tuple[int, ...] | None:
    """None, one int, or an iterable of ints (not a string) -> a tuple of ints >= 0."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (check_int(name, value, lo=0),)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an int or an iterable of ints, got {_type_name(value)} {value!r}")
    return tuple(check_int(f"{name}[{i}]", t, lo=0) for i, t in enumerate(value))


_EARLY_STOPPING = ("true", "false", "never")


def _check_early_stopping(value: object) -> str:
    """Hugging Face's ``early_stopping`` (True, False or "never") as one of the strings "true", "false", "never"
    (the CLI passes strings; case is ignored)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        raise TypeError(f"early_stopping must be a bool or one of {_EARLY_STOPPING}, got {_type_name(value)} "
                        f"{value!r}")
    if value.lower() not in _EARLY_STOPPING:
        raise UsageError(f"early_stopping must be one of {_EARLY_STOPPING} (or a bool), got {value!r}")
    return value.lower()


def _help(text: str, *, sampler: bool = False) -> dict[str, Any]:
    return {"help": text, "sampler": sampler}


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation parameter, declared once (see the module docstring for what is derived from it).

    Built from keyword arguments and validated on construction (``__post_init__``): ``TypeError`` for a wrong
    type, :class:`~decodekit.errors.UsageError` (a ``ValueError``) for a bad value, both naming the field. Ints
    are accepted where floats are expected. Frozen: use :func:`dataclasses.replace` for a variant (it validates
    again). Sampler fields have the meaning of :func:`decodekit.sample`'s arguments of the same name.
    """

    max_new_tokens: int = field(
        default=128,
        metadata=_help("most tokens to generate per row (fewer when the prompt nears max_seq_len)"),
    )
    temperature: float = field(
        default=1.0, metadata=_help("divides the logits; 0 = greedy decoding", sampler=True)
    )
    top_k: int = field(
        default=0, metadata=_help("keep the k most likely tokens (ties at the k-th kept); 0 = off", sampler=True)
    )
    top_p: float = field(
        default=1.0,
        metadata=_help("nucleus sampling: the smallest top set reaching this probability mass, in (0, 1]; 1 = off",
                       sampler=True),
    )
    min_p: float = field(
        default=0.0,
        metadata=_help("drop tokens whose probability is below min_p x the top probability, in [0, 1]; 0 = off",
                       sampler=True),
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=_help("the logit of a token already in the prompt or output is divided by this when positive, "
                       "multiplied when negative; > 0, 1 = off", sampler=True),
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=_help("subtracted once from the logit of every token already in the prompt or output; 0 = off",
                       sampler=True),
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=_help("subtracted from a token's logit once per earlier occurrence in the prompt or output; "
                       "0 = off", sampler=True),
    )
    seed: int | None = field(
        default=None,
        metadata=_help("random seed in [0, 2**63): the same seed gives the same tokens on every backend; "
                       "None = drawn from torch's default generator"),
    )
    stop_ids: tuple[int, ...] | None = field(
        default=None,
        metadata=_help("token ids that end a row (an int or a list of ints; empty = never stop early); "
                       "None = the model's own (EOS; BOS too for llama2.c checkpoints)"),
    )
    # ---- beam search (issue 13): Hugging Face's beam search / beam sampling semantics
    num_beams: int = field(
        default=1,
        metadata=_help("beams per prompt: > 1 runs Hugging Face beam search (do_sample false) or beam sampling "
                       "(do_sample true); 1 = off"),
    )
    do_sample: bool = field(
        default=True,
        metadata=_help("false: deterministic decoding, greedy or (num_beams > 1) beam search, with temperature, "
                       "top_k, top_p and min_p not applied (as in Hugging Face); true: sampling"),
    )
    length_penalty: float = field(
        default=1.0,
        metadata=_help("beam search: a finished beam scores sum(logprobs) / generated_length ** length_penalty"),
    )
    early_stopping: str = field(
        default="false",
        metadata=_help("beam search, Hugging Face's early_stopping: 'true' stops once num_beams hypotheses are "
                       "finished, 'false' when the running beams can no longer beat them (a heuristic), 'never' "
                       "runs the canonical search; a bool is accepted too"),
    )
    num_return_sequences: int = field(
        default=1,
        metadata=_help("sequences returned per prompt: the best finished beams, at most num_beams"),
    )

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalized values are set this way
        set_("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, lo=1))
        set_("temperature", check_float("temperature", self.temperature, lo=0.0))
        set_("top_k", check_int("top_k", self.top_k, lo=0))
        set_("top_p", check_float("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0))
        set_("min_p", check_float("min_p", self.min_p, lo=0.0, hi=1.0))
        set_("repetition_penalty", check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True))
        set_("presence_penalty", check_float("presence_penalty", self.presence_penalty))
        set_("frequency_penalty", check_float("frequency_penalty", self.frequency_penalty))
        if self.seed is not None:
            set_("seed", check_int("seed", self.seed, lo=0, hi=_SEED_LIMIT - 1))
        set_("stop_ids", _check_token_ids("stop_ids", self.stop_ids))
        set_("num_beams", check_int("num_beams", self.num_beams, lo=1))
        set_("do_sample", check_bool("do_sample", self.do_sample))
        set_("length_penalty", check_float("length_penalty", self.length_penalty))
        set_("early_stopping", _check_early_stopping(self.early_stopping))
        set_("num_return_sequences", check_int("num_return_sequences", self.num_return_sequences, lo=1))
        if self.num_return_sequences > self.num_beams:
            raise UsageError(f"num_return_sequences must be <= num_beams={self.num_beams}, "
                             f"got {self.num_return_sequences}")
        if self.num_beams > 1:
            off = [n for n, v in (("min_p", self.min_p), ("presence_penalty", self.presence_penalty),
                                  ("frequency_penalty", self.frequency_penalty)) if v != 0.0]
            if off:
                raise UsageError(f"{off[0]} is not supported with num_beams > 1 (beam search applies the repetition "
                                 f"penalty, temperature, top_k and top_p), got {off[0]}={getattr(self, off[0])}")

    # ---------------------------------------------------------------- derived views
    def sampler_kwargs(self) -> dict[str, Any]:
        """The fields passed to :func:`decodekit.sample` under their own names (metadata ``sampler=True``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("sampler")}

    @property
    def uses_token_counts(self) -> bool:
        """Whether a penalty is on, so the sampler needs per-row token counts."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class DiffusionSampling:
    """The sampling and commit parameters of :func:`decodekit.diffusion_generate`, declared once (the defaults are
    LLaDA's: greedy steps ranked by the raw probability). See :func:`decodekit.sample_block` and
    :func:`decodekit.select_positions` for their meaning."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    order: str = "top_k_first"  # or "top_p_first" (Dream)
    confidence: str = "raw_prob"  # prob | raw_prob | margin | neg_entropy | random
    threshold: float | None = None  # Fast-dLLM: commit every position at least this confident
    entropy_bound: float | None = None  # SDAR: commit the lowest-entropy prefix within this bound
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("temperature", check_float("temperature", self.temperature, lo=0.0))
        set_("top_k", check_int("top_k", self.top_k, lo=0))
        set_("top_p", check_float("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0))
        if self.order not in ("top_k_first", "top_p_first"):
            raise UsageError(f"order must be 'top_k_first' or 'top_p_first', got {self.order!r}")
        if not isinstance(self.confidence, str):
            raise TypeError(f"confidence must be a str, got {_type_name(self.confidence)}")
        for name in ("threshold", "entropy_bound"):
            if getattr(self, name) is not None:
                set_(name, check_float(name, getattr(self, name)))
        set_("seed", check_int("seed", self.seed, lo=0, hi=2**63 - 1))


def resolve_diffusion_sampling(sampling: DiffusionSampling | None = None, /, **params: Any) -> DiffusionSampling:
    """``sampling`` (default: LLaDA's) with ``params`` applied on top, validated; an unknown keyword is a
    ``TypeError`` naming it."""
    return _resolve(DiffusionSampling, sampling, "sampling", "diffusion", params)


def _resolve(cls: type[C], base: C | None, arg: str, what: str, params: dict[str, Any]) -> C:
    """``base`` (default: ``cls()``) with ``params`` applied on top and validated by the dataclass itself: the one
    resolver of every config dataclass. ``TypeError`` for a ``base`` of another type (naming ``arg``) and for an
    unknown keyword (naming it, as Python does for a function's keyword arguments)."""
    if base is not None and not isinstance(base, cls):
        raise TypeError(f"{arg} must be a {cls.__name__}, got {_type_name(base)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} ({what} parameters: {', '.join(sorted(known))})")
    if base is None:
        return cls(**params)
    return dataclasses.replace(base, **params) if params else base


def field_types() -> dict[str, Any]:
    """Each field's annotation as a type (the module uses postponed annotations, so ``Field.type`` is a string)."""
    return typing.get_type_hints(GenerationConfig)


def resolve_config(config: GenerationConfig | None = None, /, **params: Any) -> GenerationConfig:
    """``config`` (default: all defaults) with ``params`` applied on top, validated.

    An unknown keyword raises ``TypeError`` naming it, as Python does for a function's keyword arguments.
    """
    return _resolve(GenerationConfig, config, "config", "generation", params)


def _params_doc(indent: str) -> str:
    types = field_types()
    lines = []
    for f in dataclasses.fields(GenerationConfig):
        kind = getattr(types[f.name], "__name__", None) or str(types[f.name]).replace("typing.", "")
        lines.append(f"{indent}{f.name} : {kind}, default {f.default!r}")
        lines.append(f"{indent}    {f.metadata['help']}")
    return "\n".join(lines)


F = TypeVar("F", bound=Callable[..., Any])


def generation_params(func: F) -> F:
    """Give ``func(..., config=None, **params)`` the fields of :class:`GenerationConfig` as keyword-only parameters
    in its signature (what ``help()``, IDEs and ``inspect.signature`` show) and in its docstring (replacing the
    line ``{generation_params}``). ``func`` itself passes ``config`` and ``params`` to :func:`resolve_config`."""
    sig = inspect.signature(func)
    kept = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    types = field_types()
    extra = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=types[f.name])
        for f in dataclasses.fields(GenerationConfig)
    ]
    func.__signature__ = sig.replace(parameters=kept + extra)  # type: ignore[attr-defined]
    if func.__doc__ and "{generation_params}" in func.__doc__:
        head, _, tail = func.__doc__.partition("{generation_params}")
        indent = head[head.rfind("\n") + 1 :]
        func.__doc__ = head[: len(head) - len(indent)] + _params_doc(indent) + tail
    return func
