"""One API style: GenerationConfig declares every generation parameter once; everything else is derived from it.

Error rules: ``TypeError`` for a wrong type, ``UsageError`` (a ``ValueError``) for a bad value, both naming the
argument. Decoders serialize concurrent ``generate`` calls.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import decodekit
import decodekit.ops.sampling
import decodekit.runtime.loop
from decodekit.errors import UsageError
from decodekit.runtime import (
    MAX_BATCH,
    EagerDecoder,
    GenerationConfig,
    OnnxDecoder,
    generate,
    load_backend,
    resolve_config,
)
from decodekit.runtime import cli as runtime_cli
from decodekit.runtime import config as config_module
from decodekit.runtime.onnx import _spin_entries

FIELDS = [f.name for f in dataclasses.fields(GenerationConfig)]
RUNTIME = Path(decodekit.__file__).parent / "runtime"


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


# ---------------------------------------------------------------------------------------------- the one dataclass


def test_every_field_is_typed_defaulted_and_documented():
    types = config_module.field_types()
    for f in dataclasses.fields(GenerationConfig):
        assert f.name in types
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f"GenerationConfig.{f.name} has no help text"
    GenerationConfig()  # the defaults are valid


def test_sampler_fields_are_sample_parameters():
    """Every ``sampler=True`` field is a keyword of decodekit.sample, and every sample parameter the loop does not
    set itself (logits, token_counts, seed, ...) is a GenerationConfig field."""
    sample_params = set(inspect.signature(decodekit.sample).parameters)
    sampler_fields = set(GenerationConfig().sampler_kwargs())
    assert sampler_fields <= sample_params
    owned_by_loop = {"logits", "token_counts", "seed", "return_logprobs", "check", "backend"}
    assert sample_params - owned_by_loop <= sampler_fields
    assert {"min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"} <= sampler_fields


def test_parameters_are_declared_only_in_the_dataclass():
    """No other runtime function or dataclass declares a GenerationConfig field as its own parameter."""
    allowed = {"DemoArgs"}  # the demo's own knobs (tokens per timed run, the story's seed), not generate()'s
    found = []
    for path in RUNTIME.glob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                found += [f"{path.name}:{node.name}({n})" for n in names if n in FIELDS]
            elif isinstance(node, ast.ClassDef) and node.name not in allowed:
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        if item.target.id in FIELDS:
                            found.append(f"{path.name}:{node.name}.{item.target.id}")
    assert not found, f"generation parameters declared outside GenerationConfig: {found}"


@pytest.mark.parametrize("func", [generate, OnnxDecoder.generate, EagerDecoder.generate],
                         ids=["decodekit.generate", "OnnxDecoder.generate", "EagerDecoder.generate"])
def test_generate_signatures_and_docs_come_from_the_dataclass(func):
    sig = inspect.signature(func)
    for f in dataclasses.fields(GenerationConfig):
        p = sig.parameters.get(f.name)
        assert p is not None, f"{func.__qualname__} lacks {f.name}"
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == f.default
        assert f"{f.name} :" in func.__doc__
    assert "config" in sig.parameters
    assert decodekit.generate is generate


@pytest.mark.parametrize(
    "name, value, exc",
    [
        ("max_new_tokens", 0, UsageError),
        ("max_new_tokens", True, TypeError),
        ("max_new_tokens", 4.0, TypeError),
        ("temperature", -1.0, UsageError),
        ("temperature", "0.8", TypeError),
        ("temperature", math.nan, UsageError),
        ("top_k", -2, UsageError),
        ("top_k", 1.5, TypeError),
        ("top_p", None, TypeError),
        ("top_p", 0.0, UsageError),
        ("top_p", 1.5, UsageError),
        ("min_p", 2.0, UsageError),
        ("repetition_penalty", 0.0, UsageError),
        ("presence_penalty", math.inf, UsageError),
        ("presence_penalty", "1", TypeError),
        ("frequency_penalty", math.nan, UsageError),
        ("frequency_penalty", None, TypeError),
        ("seed", 1.0, TypeError),
        ("seed", -1, UsageError),
        ("seed", 2**63, UsageError),
        ("seed", False, TypeError),
        ("stop_ids", "ab", TypeError),
        ("stop_ids", b"ab", TypeError),
        ("stop_ids", [1.5], TypeError),
        ("stop_ids", [True], TypeError),
        ("stop_ids", 2.0, TypeError),
        ("stop_ids", [-1], UsageError),
        ("stop_ids", -3, UsageError),
        ("num_beams", 0, UsageError),
        ("num_beams", 2.0, TypeError),
        ("do_sample", 1, TypeError),
        ("length_penalty", math.nan, UsageError),
        ("length_penalty", "1", TypeError),
        ("early_stopping", "sometimes", UsageError),
        ("early_stopping", 1, TypeError),
        ("num_return_sequences", 0, UsageError),
        ("num_return_sequences", 2, UsageError),  # more than num_beams=1
    ],
)
def test_config_rejects(name, value, exc):
    with pytest.raises(exc, match=name) as info:
        GenerationConfig(**{name: value})
    assert exc is TypeError or isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_every_field_has_a_rejection_case():
    cases = {row[0] for row in test_config_rejects.pytestmark[0].args[1]}
    assert cases == set(FIELDS)


@pytest.mark.parametrize("value, want", [(5, (5,)), ([5, 7], (5, 7)), ((), ()), (range(2, 4), (2, 3)),
                                         (np.int64(4), (4,)), ([np.int32(3)], (3,)), (None, None)])
def test_stop_ids_accept_an_int_or_an_iterable_of_ints(value, want):
    assert GenerationConfig(stop_ids=value).stop_ids == want


def test_config_normalizes_and_revalidates():
    c = GenerationConfig(temperature=1, top_p=np.float32(0.5), seed=np.int64(3))
    assert type(c.temperature) is float and type(c.top_p) is float and type(c.seed) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_p = 0.3  # type: ignore[misc]
    with pytest.raises(UsageError, match="top_p"):
        dataclasses.replace(c, top_p=0.0)
    assert resolve_config(c, top_k=3) == dataclasses.replace(c, top_k=3)
    assert resolve_config(None) == GenerationConfig()
    with pytest.raises(TypeError, match="top_q"):
        resolve_config(top_q=0.5)
    with pytest.raises(TypeError, match="config"):
        resolve_config({"top_p": 0.5})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- bad input, decoders


@pytest.mark.parametrize(
    "prompts, exc, needle",
    [
        (None, TypeError, "prompts"),
        (["hi", [1, 2]], TypeError, "mixes text"),
        ([[1, 2], "hi"], TypeError, "mixes text"),
        ([[1.0, 2.0]], TypeError, r"prompts\[0\]\[0\]"),
        ([[1, 2.7]], TypeError, r"prompts\[0\]\[1\]"),
        ([1, 2.7], TypeError, r"prompts\[1\]"),
        ([[True, 5]], TypeError, r"prompts\[0\]\[0\]"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "int tensor"),
        ([torch.tensor([1.0])], TypeError, r"prompts\[0\]"),
        (torch.zeros(1, 1, 2, dtype=torch.int64), UsageError, "prompts"),
        ([], UsageError, "empty"),
        ([[]], UsageError, "no tokens"),
        (7, TypeError, "prompts"),
        (b"bytes", TypeError, "prompts"),
        ({"a": 1}, TypeError, "prompts"),
        ([[1, 99999]], UsageError, "outside"),
    ],
)
def test_bad_prompts(onnx4, prompts, exc, needle):
    with pytest.raises(exc, match=needle):
        onnx4.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize(
    "params, exc, needle",
    [
        (dict(top_p=None), TypeError, "top_p"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(stop_ids="ab"), TypeError, "stop_ids"),
        (dict(stop_ids=[512]), UsageError, "stop_ids"),  # outside the 512-token vocabulary
        (dict(presence_penalty=math.nan), UsageError, "presence_penalty"),
        (dict(top_q=0.5), TypeError, "top_q"),
        (dict(config="greedy"), TypeError, "config"),
    ],
)
@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_bad_parameters_on_both_decoders(onnx4, eager, backend, params, exc, needle):
    dec = onnx4 if backend == "onnx" else eager
    with pytest.raises(exc, match=needle):
        dec.generate([[1]], max_new_tokens=2, **params)


def test_generate_checks_everything_before_loading_a_model(ckpt, monkeypatch):
    def no_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded for a call that cannot work")

    monkeypatch.setattr(decodekit.runtime, "load_backend", no_load)
    for prompts, params, exc in [
        (None, {}, TypeError),
        (["hi", [1, 2]], {}, TypeError),
        ([[1.5]], {}, TypeError),
        ("hi", {"top_p": None}, TypeError),
        ("hi", {"top_p": 2.0}, UsageError),
        ("hi", {"stop_ids": "ab"}, TypeError),
    ]:
        with pytest.raises(exc):
            generate(ckpt, prompts, **params)


def test_stop_ids_int_equals_a_list_of_one(onnx4):
    ref = onnx4.generate([[1]], max_new_tokens=20, temperature=0.0, stop_ids=[])
    stop = ref.tokens[0][6]
    a = onnx4.generate([[1]], max_new_tokens=20, temperature=0.0, stop_ids=stop)
    b = onnx4.generate([[1]], max_new_tokens=20, temperature=0.0, stop_ids=[stop])
    assert a.tokens == b.tokens and a.finish_reasons == ["stop"]


def test_config_argument_and_keywords_agree(onnx4):
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=40, seed=5, stop_ids=())
    a = onnx4.generate(["Tom"], cfg)
    b = onnx4.generate(["Tom"], config=cfg)
    c = onnx4.generate(["Tom"], max_new_tokens=12, temperature=0.9, top_k=40, seed=5, stop_ids=())
    d = onnx4.generate(["Tom"], dataclasses.replace(cfg, seed=1), seed=5)  # keywords override the config
    assert a.tokens == b.tokens == c.tokens == d.tokens


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        (dict(max_batch=True), TypeError, "max_batch"),
        (dict(max_batch=2.0), TypeError, "max_batch"),
        (dict(max_batch=0), UsageError, "max_batch"),
        (dict(max_batch=10**7), UsageError, "max_batch"),
        (dict(max_seq_len=1.5), TypeError, "max_seq_len"),
        (dict(max_seq_len=1), UsageError, "max_seq_len"),
        (dict(max_seq_len=10**6), UsageError, "max_seq_len"),
        (dict(device=1), TypeError, "device"),
        (dict(device="tpu"), UsageError, "device"),
        (dict(io_binding="yes"), TypeError, "io_binding"),
        (dict(intra_op_threads=0), UsageError, "intra_op_threads"),
        (dict(intra_op_threads="2"), TypeError, "intra_op_threads"),
        (dict(intra_op_threads=2**40), UsageError, "intra_op_threads"),  # ORT's binding takes a C int
        (dict(intra_op_threads=4097), UsageError, "intra_op_threads"),
        (dict(spin_wait=1), TypeError, "spin_wait"),  # a bare number: "on" or one microsecond?
        (dict(spin_wait=5.0), TypeError, "spin_wait"),
        (dict(spin_wait="yes"), UsageError, "spin_wait"),
        (dict(spin_wait="5"), UsageError, "spin_wait"),
        (dict(spin_wait="-1us"), UsageError, "spin_wait"),
        (dict(spin_wait="100001us"), UsageError, "spin_wait"),
        (dict(spin_wait="9" * 5000 + "us"), UsageError, "spin_wait"),  # no bare int() error on a huge number
    ],
)
def test_onnx_decoder_bad_arguments(export_dir, kwargs, exc, needle, no_allocation):
    with pytest.raises(exc, match=needle):
        OnnxDecoder(export_dir, **kwargs)


def test_spin_wait_policies_reach_the_session_and_keep_the_tokens(export_dir, monkeypatch, spin_config, bounded):
    """Each ``spin_wait`` policy sets ONNX Runtime's worker config as documented (default: spin 5 us then block),
    and none changes the tokens."""
    monkeypatch.delenv("DECODEKIT_ORT_SPIN", raising=False)  # the default, whatever the caller's shell exports
    prompt = [[1, 403, 407, 261]]
    kw = dict(max_new_tokens=12, temperature=0.0, stop_ids=[])
    want = [  # (argument, policy, config)
        (None, *bounded("5us")),
        (True, True, ("1", "", "1")),
        (False, False, ("0", "", "")),
        ("0us", False, ("0", "", "")),
        ("1us", *bounded("1us")),
        (" 40us ", *bounded("40us")),
    ]
    tokens = []
    for arg, policy, config in want:
        dec = OnnxDecoder(export_dir, intra_op_threads=2) if arg is None else \
            OnnxDecoder(export_dir, intra_op_threads=2, spin_wait=arg)
        assert dec.spin_wait == policy and type(dec.spin_wait) is type(policy), arg
        assert spin_config(dec.session) == config, arg
        tokens.append(dec.generate(prompt, **kw).tokens)
    assert all(t == tokens[0] for t in tokens)


@pytest.mark.parametrize("value, policy", [("1", True), ("0", False), (" 7us ", "7us"), ("1us", "1us"),
                                           ("0us", False), ("", "5us"), ("yes", None), ("5", None), ("us", None),
                                           ("-3us", None), ("100001us", None), ("5 us", None), ("\u0665us", None),
                                           ("9" * 5000 + "us", None)])
def test_spin_wait_variable(export_dir, monkeypatch, bounded, value, policy):
    """``$DECODEKIT_ORT_SPIN`` sets the default (0, 1 or <n>us); anything else is refused naming it; an argument
    wins over it, a refused value included."""
    monkeypatch.setenv("DECODEKIT_ORT_SPIN", value)
    if policy is None:
        with pytest.raises(UsageError, match="DECODEKIT_ORT_SPIN"):
            OnnxDecoder(export_dir)
    else:
        if isinstance(policy, str):
            policy = bounded(policy)[0]
        got = OnnxDecoder(export_dir).spin_wait
        assert got == policy and type(got) is type(policy)
    assert OnnxDecoder(export_dir, spin_wait=True).spin_wait is True  # the argument wins


@pytest.mark.parametrize("version, bounded", [("1.31.1", True), ("1.26.0", True), ("1.26.0.dev20260401", True),
                                              ("2.0.0", True), ("1.25.1", False), ("1.9.0", False), ("1", False),
                                              ("garbage", False)])
def test_spin_wait_microseconds_fall_back_to_blocking_on_old_onnxruntime(version, bounded):
    """An ONNX Runtime that does not read ``spin_duration_us`` would spin about a million pauses per wait, through
    the step: there a microsecond policy blocks at once instead; True and False mean the same on every version."""
    policy, entries = _spin_entries(5, version)
    if bounded:
        assert policy == 5 and entries["session.intra_op.spin_duration_us"] == "5"
        assert entries["session.intra_op.allow_spinning"] == "1"
    else:
        assert policy is False and entries == {"session.intra_op.allow_spinning": "0"}
    assert _spin_entries(True, version) == (True, {"session.intra_op.allow_spinning": "1",
                                                   "session.force_spinning_stop": "1"})
    assert _spin_entries(False, version) == (False, {"session.intra_op.allow_spinning": "0"})


@pytest.mark.parametrize("value, threads", [("3", 3), (" 2 ", 2), ("", None), ("two", UsageError), ("-1", UsageError),
                                            ("0", UsageError), ("4097", UsageError), ("99999999999", UsageError),
                                            ("9" * 5000, UsageError), ("\u0663", UsageError)])
def test_ort_threads_variable(export_dir, monkeypatch, value, threads):
    """``$DECODEKIT_ORT_THREADS`` sets the default thread count (blank: ONNX Runtime's choice); anything but a
    positive int is refused, naming the variable or the argument it stands for."""
    monkeypatch.setenv("DECODEKIT_ORT_THREADS", value)
    seen = []
    real = decodekit.runtime.onnx._default_cpu_threads
    monkeypatch.setattr(decodekit.runtime.onnx, "_default_cpu_threads", lambda f: seen.append(f) or real(f))
    if threads is UsageError:
        with pytest.raises(UsageError, match="DECODEKIT_ORT_THREADS|intra_op_threads"):
            OnnxDecoder(export_dir)
        return
    dec = OnnxDecoder(export_dir)
    assert bool(seen) == (threads is None)  # unset: the decoder's own default for this model
    if threads is not None:
        assert dec.session.get_session_options().intra_op_num_threads == threads
    assert OnnxDecoder(export_dir, intra_op_threads=1).session.get_session_options().intra_op_num_threads == 1


def test_onnx_decoder_refuses_buffers_larger_than_memory(export_dir, monkeypatch, no_allocation):
    monkeypatch.setattr(decodekit.runtime.onnx, "_available_memory", lambda device: 1 << 20)
    with pytest.raises(UsageError, match="max_batch=64 and max_seq_len=512 .* more than the 1 MiB available"):
        OnnxDecoder(export_dir, max_batch=64)


def test_available_memory_is_known_here():
    avail = decodekit.runtime.onnx._available_memory(torch.device("cpu"))
    assert avail is None or avail > 0


def test_eager_decoder_bad_arguments(eager):
    with pytest.raises(TypeError, match="max_batch"):
        EagerDecoder(eager.model, max_batch=True)
    with pytest.raises(UsageError, match="max_batch"):
        EagerDecoder(eager.model, max_batch=MAX_BATCH + 1)
    with pytest.raises(TypeError, match="max_seq_len"):
        EagerDecoder(eager.model, max_seq_len=8.0)
    with pytest.raises(TypeError, match="model"):
        EagerDecoder("stories260K.bin")  # type: ignore[arg-type]


def test_load_backend_checks_arguments_before_loading(ckpt):
    with pytest.raises(UsageError, match="max_batch"):
        load_backend(ckpt, "eager", max_batch=10**7)
    with pytest.raises(TypeError, match="max_batch"):
        load_backend(ckpt, "eager", max_batch=True)
    with pytest.raises(TypeError, match="backend"):
        load_backend(ckpt, None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="backend"):
        load_backend(ckpt, "tensorrt")


@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_reset_messages(onnx4, eager, backend):
    dec = onnx4 if backend == "onnx" else eager
    with pytest.raises(UsageError, match="batch_size must be >= 1, got 0") as info:
        dec.reset(0)
    assert "exceeds" not in str(info.value)
    with pytest.raises(UsageError, match="batch_size 5 exceeds max_batch=4"):
        dec.reset(5)
    with pytest.raises(TypeError, match="batch_size"):
        dec.reset(1.0)


# ---------------------------------------------------------------------------------------------- penalties


def test_presence_and_frequency_penalties_reach_the_sampler_with_counts(onnx4, monkeypatch):
    seen = []
    real = decodekit.ops.sampling.sample

    def spy(logits, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        return real(logits, **kw)

    monkeypatch.setattr(decodekit.ops.sampling, "sample", spy)
    onnx4.generate([[1, 5, 5]], max_new_tokens=3, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25,
                   stop_ids=())
    assert [s["presence_penalty"] for s in seen] == [0.5] * 3 and seen[0]["frequency_penalty"] == 0.25
    counts = seen[0]["token_counts"]
    assert counts is not None and counts[0, 5] == 2 and counts[0, 1] == 1 and int(counts.sum()) == 3
    assert int(seen[2]["token_counts"].sum()) == 5  # the prompt and the two tokens drawn before the third step
    seen.clear()
    onnx4.generate([[1]], max_new_tokens=2, temperature=0.7, seed=0)  # (greedy with no penalty skips the sampler)
    assert seen[0]["token_counts"] is None  # no penalty: no counts


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty", "repetition_penalty"])
def test_penalties_change_greedy_text_and_agree_across_backends(onnx4, eager, penalty):
    value = 1.5 if penalty == "repetition_penalty" else 2.0
    plain = onnx4.generate([[1]], max_new_tokens=40, temperature=0.0, stop_ids=())
    a = onnx4.generate([[1]], max_new_tokens=40, temperature=0.0, stop_ids=(), **{penalty: value})
    b = eager.generate([[1]], max_new_tokens=40, temperature=0.0, stop_ids=(), **{penalty: value})
    assert a.tokens != plain.tokens
    assert a.tokens == b.tokens


# ---------------------------------------------------------------------------------------------- threads


def _jobs() -> list[tuple[object, dict]]:
    return [
        (["Once upon a time", "The cat"], dict(temperature=0.9, top_p=0.95, seed=11)),
        (["Tom and"], dict(temperature=1.0, top_k=20, repetition_penalty=1.2, seed=21)),
        ([[1, 403]], dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.1, seed=31)),
        (["Lily", "A dog"], dict(temperature=0.0)),
    ]


@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_two_threads_on_one_decoder_get_their_own_tokens(export_dir, ckpt, backend, monkeypatch):
    dec = OnnxDecoder(export_dir, max_batch=2) if backend == "onnx" else load_backend(ckpt, "eager", max_batch=2)
    n_tokens = 20 if backend == "onnx" else 12
    jobs = _jobs()
    ref = [dec.generate(p, max_new_tokens=n_tokens, stop_ids=(), **kw).tokens for p, kw in jobs]

    # record which thread ran every reset/step: with the lock, one generation's steps are never interleaved
    trace: list[tuple[str, int]] = []
    # every ONNX step runs through _run_bound (step() and the loop's decode_stepper); spying step() itself would
    # also switch the stepper off (a decoder whose step is replaced keeps it)
    stepped = "_run_bound" if backend == "onnx" else "step"
    real_reset, real_step = dec.reset, getattr(dec, stepped)

    def reset(b):  # noqa: ANN001, ANN202
        trace.append(("reset", threading.get_ident()))
        return real_reset(b)

    def step(*a):  # noqa: ANN002, ANN202
        trace.append(("step", threading.get_ident()))
        return real_step(*a)

    monkeypatch.setattr(dec, "reset", reset)
    monkeypatch.setattr(dec, stepped, step)

    rounds = 2
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(t: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                for j in range(t, len(jobs), 2):  # thread 0: jobs 0, 2; thread 1: jobs 1, 3
                    p, kw = jobs[j]
                    results[t].append((j, dec.generate(p, max_new_tokens=n_tokens, stop_ids=(), **kw).tokens))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    for t in (0, 1):
        assert len(results[t]) == rounds * 2
        for j, tokens in results[t]:
            assert tokens == ref[j], f"thread {t}, job {j}: tokens differ from the same call alone"
    # between two resets, every step came from the thread that reset
    owner = None
    for kind, ident in trace:
        if kind == "reset":
            owner = ident
        else:
            assert ident == owner, "steps of two generations were interleaved"
    assert {ident for _, ident in trace} == {th.ident for th in threads}


def test_generate_from_its_own_stream_callback_raises(onnx4):
    def again(row: int, tok: int) -> None:
        onnx4.generate([[1]], max_new_tokens=1)

    with pytest.raises(RuntimeError, match="inside a generate"):
        onnx4.generate([[1]], max_new_tokens=2, stream=again)
    assert onnx4.generate([[1]], max_new_tokens=2, temperature=0.0).tokens  # the lock was released


# ---------------------------------------------------------------------------------------------- CLI flags


def _generate_parser():  # noqa: ANN202
    from decodekit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["generate"]


def test_every_field_has_a_cli_flag():
    parser = _generate_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(GenerationConfig):
        action = by_dest.get(f.name)
        assert action is not None, f"decodekit generate has no flag for GenerationConfig.{f.name}"
        # a bool field that defaults to True is switched off by --no-name (the CLI's documented rule)
        flag = "--no-" + f.name.replace("_", "-") if f.default is True else runtime_cli.flag_name(f.name)
        assert flag in action.option_strings
        assert action.default == f.default and f.metadata["help"] in action.help
    ns = parser.parse_args(["model"])
    assert runtime_cli.config_from_namespace(ns) == GenerationConfig()


# a non-default value for every field (the test below fails when a new field is not added here)
CLI_VALUES = {
    "max_new_tokens": (["4"], 4),
    "temperature": (["0.7"], 0.7),
    "top_k": (["30"], 30),
    "top_p": (["0.9"], 0.9),
    "min_p": (["0.02"], 0.02),
    "repetition_penalty": (["1.3"], 1.3),
    "presence_penalty": (["0.4"], 0.4),
    "frequency_penalty": (["0.2"], 0.2),
    "seed": (["77"], 77),
    "stop_ids": (["7", "9"], (7, 9)),
    # beam search (min_p and the presence / frequency penalties above are refused with num_beams > 1, and no
    # sample() call would be made): its flags run in tests/runtime/test_beam.py; here they keep their defaults
    "num_beams": (["1"], 1),
    "do_sample": (None, True),  # the --no-do-sample switch (None: no flag)
    "length_penalty": (["0.5"], 0.5),
    "early_stopping": (["never"], "never"),
    "num_return_sequences": (["1"], 1),
}


def test_every_cli_flag_reaches_the_config_and_the_sampler(export_dir, monkeypatch, capsys):
    from decodekit.cli import main

    assert set(CLI_VALUES) == set(FIELDS), "give every GenerationConfig field a test value in CLI_VALUES"
    configs, calls, results = [], [], []
    real_run, real_sample = decodekit.runtime.loop.run_generation, decodekit.ops.sampling.sample

    def run_spy(model, ids, config, **kw):  # noqa: ANN001, ANN003, ANN202
        configs.append(config)
        results.append(real_run(model, ids, config, **kw))
        return results[-1]

    def sample_spy(logits, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(kw)
        return real_sample(logits, **kw)

    monkeypatch.setattr(decodekit.runtime.loop, "run_generation", run_spy)
    monkeypatch.setattr(decodekit.ops.sampling, "sample", sample_spy)
    argv = ["generate", str(export_dir), "--prompt", "Tom"]
    for name, (args, _) in CLI_VALUES.items():
        argv += [runtime_cli.flag_name(name), *args] if args is not None else []
    assert main(argv) == 0, capsys.readouterr().err
    want = GenerationConfig(**{name: value for name, (_, value) in CLI_VALUES.items()})
    assert configs == [want]
    assert 1 <= len(calls) <= want.max_new_tokens
    for name, value in want.sampler_kwargs().items():
        assert calls[0][name] == value, f"--{name} did not reach decodekit.sample"
    assert calls[0]["token_counts"] is not None  # the penalties are on
    # the loop's own fields (the seed, the stop ids, the length) act as they do through the Python API
    monkeypatch.undo()
    assert OnnxDecoder(export_dir).generate("Tom", want).tokens == results[0].tokens
    assert capsys.readouterr().out.startswith("Tom")


def test_cli_stop_ids_flag_forms():
    parser = _generate_parser()
    cfg = runtime_cli.config_from_namespace
    assert cfg(parser.parse_args(["m", "--stop-ids"])).stop_ids == ()
    assert cfg(parser.parse_args(["m", "--stop-ids", "3"])).stop_ids == (3,)
    assert cfg(parser.parse_args(["m"])).stop_ids is None


def test_a_new_field_becomes_a_flag(monkeypatch):
    @dataclass(frozen=True)
    class Extended(GenerationConfig):
        typical_p: float = field(default=1.0, metadata={"help": "locally typical sampling", "sampler": False})
        no_repeat: bool = field(default=False, metadata={"help": "a switch, off by default"})
        dedupe: bool = field(default=True, metadata={"help": "a switch, on by default"})

    monkeypatch.setattr(config_module, "GenerationConfig", Extended)
    monkeypatch.setattr(runtime_cli, "GenerationConfig", Extended)
    import argparse

    parser = argparse.ArgumentParser()
    runtime_cli.add_generation_flags(parser)
    cfg = runtime_cli.config_from_namespace(parser.parse_args(["--typical-p", "0.5", "--no-repeat", "--top-k", "3"]))
    assert isinstance(cfg, Extended) and cfg.typical_p == 0.5 and cfg.top_k == 3
    assert cfg.no_repeat is True and cfg.dedupe is True
    assert runtime_cli.config_from_namespace(parser.parse_args(["--no-dedupe"])).dedupe is False


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--presence-penalty", "nan"], "presence_penalty"),
        (["--frequency-penalty", "inf"], "frequency_penalty"),
        (["--seed", "-4"], "seed"),
        (["--stop-ids", "-1"], "stop_ids"),
        (["--min-p", "1.5"], "min_p"),
    ],
)
def test_cli_bad_generation_values_exit_2_with_one_line(export_dir, args, needle, capsys):
    from decodekit.cli import main

    assert main(["generate", str(export_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_flag_of_the_wrong_type_is_an_argparse_error(export_dir, capsys):
    from decodekit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", str(export_dir), "--stop-ids", "1.5"])
    assert info.value.code == 2 and "--stop-ids" in capsys.readouterr().err
