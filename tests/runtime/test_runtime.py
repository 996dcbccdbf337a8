"""ONNX Runtime decoder with IO binding, the shared generation loop, and `decodekit generate` / `demo`."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from decodekit.errors import UsageError
from decodekit.runtime import OnnxDecoder, generate

ROOT = Path(__file__).resolve().parents[2]


def test_greedy_onnx_equals_eager_for_200_tokens(export_dir, eager):
    onnx = OnnxDecoder(export_dir, "cpu", max_batch=1)
    a = onnx.generate([[1]], max_new_tokens=200, temperature=0.0, stop_ids=[])
    b = eager.generate([[1]], max_new_tokens=200, temperature=0.0, stop_ids=[])
    assert len(a.tokens[0]) == 200
    assert a.tokens == b.tokens
    assert a.text[0].startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20, min_p=0.05)])
def test_same_seed_same_tokens_on_both_backends(onnx4, eager, params):
    prompts = ["Once upon a time", "The cat"]
    a = onnx4.generate(prompts, max_new_tokens=48, seed=1234, stop_ids=[], **params)
    b = eager.generate(prompts, max_new_tokens=48, seed=1234, stop_ids=[], **params)
    assert a.tokens == b.tokens
    c = onnx4.generate(prompts, max_new_tokens=48, seed=1235, stop_ids=[], **params)
    assert c.tokens != a.tokens, "a different seed must change the draw"


def test_left_padded_batch_matches_rows_alone(onnx4):
    prompts = ["Once upon a time there was a dog", "Tom", "The sun was hot and the"]
    batch = onnx4.generate(prompts, max_new_tokens=24, temperature=0.0, stop_ids=[])
    for i, p in enumerate(prompts):
        alone = onnx4.generate([p], max_new_tokens=24, temperature=0.0, stop_ids=[])
        assert alone.tokens[0] == batch.tokens[i], f"row {i} changed when batched with left padding"


def test_stops_per_row_on_stop_ids(onnx4):
    # greedy from BOS: find a token the story emits, then make it a stop id for row 0 only by choosing
    # prompts whose continuations differ
    ref = onnx4.generate(["", "Lily"], max_new_tokens=30, temperature=0.0, stop_ids=[])
    stop = ref.tokens[0][5]
    res = onnx4.generate(["", "Lily"], max_new_tokens=30, temperature=0.0, stop_ids=[stop])
    first = ref.tokens[0].index(stop)
    assert res.tokens[0] == ref.tokens[0][: first + 1]
    assert res.finish_reasons[0] == "stop"
    if stop in ref.tokens[1]:
        assert res.tokens[1] == ref.tokens[1][: ref.tokens[1].index(stop) + 1]
    else:
        assert res.tokens[1] == ref.tokens[1] and res.finish_reasons[1] == "length"


def _forbid_on(fn, bound: set[int]):  # noqa: ANN001, ANN202
    def wrapped(obj, *a, **k):  # noqa: ANN001, ANN202
        if isinstance(obj, torch.Tensor) and obj.untyped_storage().data_ptr() in bound:
            raise AssertionError(f"{fn.__name__} of a bound buffer on the IO-binding hot path")
        return fn(obj, *a, **k)

    return wrapped


def test_zero_copy_buffers_keep_their_addresses(export_dir, monkeypatch):
    dec = OnnxDecoder(export_dir, "cpu", max_batch=2)
    kv_ptr, logits_ptr = dec._kv.data_ptr(), dec._logits.data_ptr()
    seen = []
    real_run = dec._run_bound  # every step runs through it (step() and the loop's decode_stepper)

    def spy(b, p, s):
        out = real_run(b, p, s)
        seen.append((out.data_ptr(), dec._kv.data_ptr(), dec._logits.data_ptr()))
        return out

    monkeypatch.setattr(dec, "_run_bound", spy)

    bound = {dec._kv.untyped_storage().data_ptr(), dec._logits.untyped_storage().data_ptr()}
    real_numpy = torch.Tensor.numpy
    views = []

    def guarded_numpy(self, *a, **k):
        # the sampler's small-call path reads the logits through a NumPy *view* (no copy): allowed for the logits,
        # checked to share their memory; the KV cache must never go through NumPy on the hot path
        out = real_numpy(self, *a, **k)
        if self.untyped_storage().data_ptr() == dec._kv.untyped_storage().data_ptr():
            raise AssertionError("numpy conversion of the bound KV cache on the IO-binding hot path")
        if self.untyped_storage().data_ptr() in bound:
            views.append(out.__array_interface__["data"][0] == self.data_ptr())
        return out

    def no_run(*a, **k):
        raise AssertionError("plain session.run on the IO-binding hot path")

    monkeypatch.setattr(torch.Tensor, "numpy", guarded_numpy)
    monkeypatch.setattr(type(dec.session), "run", no_run)
    monkeypatch.setattr(np, "asarray", _forbid_on(np.asarray, bound))
    monkeypatch.setattr(np, "array", _forbid_on(np.array, bound))
    res = dec.generate([[1], [1, 403]], max_new_tokens=16, temperature=0.7, seed=3, stop_ids=[])
    monkeypatch.undo()
    assert len(seen) == 16 and len(res.tokens[0]) == 16
    assert {s[0] for s in seen} == {logits_ptr}, "logits must be the bound buffer, not a copy"
    assert {s[1] for s in seen} == {kv_ptr} and {s[2] for s in seen} == {logits_ptr}
    assert all(views), "a NumPy conversion of the bound logits made a copy"


def test_results_survive_aggressive_garbage_collection(export_dir):
    ref = OnnxDecoder(export_dir, "cpu", max_batch=1).generate([[1]], max_new_tokens=40, temperature=0.0)
    old = gc.get_threshold()
    gc.set_threshold(10, 1, 1)  # collect all generations very often ...
    try:
        dec = OnnxDecoder(export_dir, "cpu", max_batch=1)
        # ... and fully every few steps: nothing the binding points at may be freed
        steps = []

        def collect(row: int, tok: int) -> None:
            steps.append(tok)
            if len(steps) % 5 == 0:
                gc.collect()

        res = dec.generate([[1]], max_new_tokens=40, temperature=0.0, stream=collect)
    finally:
        gc.set_threshold(*old)
    assert res.tokens == ref.tokens


def test_plain_run_path_matches_io_binding(export_dir):
    a = OnnxDecoder(export_dir, "cpu", max_batch=2).generate(["Tom had", "A"], max_new_tokens=20, temperature=0.0)
    b = OnnxDecoder(export_dir, "cpu", max_batch=2, io_binding=False).generate(
        ["Tom had", "A"], max_new_tokens=20, temperature=0.0
    )
    assert a.tokens == b.tokens


def test_step_logits_match_eager_logits(export_dir, eager):
    dec = OnnxDecoder(export_dir, "cpu", max_batch=2)
    ids = torch.tensor([[0, 1, 403, 261], [1, 365, 300, 290]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    dec.reset(2)
    eager.reset(2)
    got = dec.step(ids, pos, mask).clone()
    want = eager.step(ids, pos, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    nxt = torch.tensor([[300], [301]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    got = dec.step(nxt, pos[:, -1:] + 1, mask2)
    want = eager.step(nxt, pos[:, -1:] + 1, mask2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_timings_are_reported(onnx4):
    res = onnx4.generate(["Once"], max_new_tokens=10, temperature=0.0, stop_ids=[])
    assert res.time_to_first_token_s > 0 and res.decode_steps == 9 and res.decode_tokens == 9
    assert res.decode_tokens_per_s > 0


# ---------------------------------------------------------------------------------------------- bad input


def test_prompt_longer_than_max_seq_len(export_dir):
    dec = OnnxDecoder(export_dir, "cpu", max_batch=1, max_seq_len=16)
    with pytest.raises(UsageError, match="max_seq_len"):
        dec.generate([[1] * 16], max_new_tokens=4)


def test_batch_larger_than_max_batch(export_dir):
    dec = OnnxDecoder(export_dir, "cpu", max_batch=2)
    with pytest.raises(UsageError, match="max_batch"):
        dec.generate(["a", "b", "c"], max_new_tokens=4)


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_invalid_sampling_parameters(onnx4, params, name):
    with pytest.raises(UsageError, match=name):
        onnx4.generate(["a"], **params)


def test_token_ids_out_of_range(onnx4):
    with pytest.raises(UsageError, match="outside"):
        onnx4.generate([[1, 99999]], max_new_tokens=2)


def test_cuda_requested_without_cuda(export_dir):
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA and onnxruntime-gpu are both here: device='cuda' works, the error cannot be provoked")
    with pytest.raises(UsageError, match="cuda"):
        OnnxDecoder(export_dir, "cuda")


def test_export_dir_without_metadata(broken_copy):
    bad = broken_copy(lambda d: (d / "decodekit.json").unlink())
    with pytest.raises(UsageError, match="decodekit.json"):
        OnnxDecoder(bad)


def test_export_without_tokenizer_generates_from_token_ids(export_dir, broken_copy, edit_metadata):
    def edit(d: Path) -> None:
        edit_metadata(d, lambda meta: meta.update(tokenizer=None))
        (d / "tok512.bin").unlink()

    dec = OnnxDecoder(broken_copy(edit), max_batch=1)
    ref = OnnxDecoder(export_dir, max_batch=1).generate([[1]], max_new_tokens=8, temperature=0.0)
    res = dec.generate([[1]], max_new_tokens=8, temperature=0.0)
    assert res.tokens == ref.tokens and res.text is None
    with pytest.raises(UsageError, match="token ids"):
        dec.generate("Once upon a time", max_new_tokens=4)


def test_export_dir_with_garbage_metadata(broken_copy):
    bad = broken_copy(lambda d: (d / "decodekit.json").write_text("{not json"))
    with pytest.raises(UsageError, match="JSON"):
        OnnxDecoder(bad)


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "decodekit", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_generate_streams_the_greedy_story(export_dir):
    out = _cli("generate", str(export_dir), "--temperature", "0", "--max-new-tokens", "40")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time, there was a little girl named Lily.")


def test_cli_generate_eager_from_checkpoint_with_prompt(ckpt):
    out = _cli("generate", str(ckpt), "--backend", "eager", "--prompt", "Lily and Tom", "--temperature", "0",
               "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Lily and Tom")
    assert len(out.stdout) > len("Lily and Tom") + 10


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top-p", "0"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_cli_bad_sampling_arguments_exit_2(export_dir, args, needle):
    out = _cli("generate", str(export_dir), *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_cli_missing_model_exit_2(tmp_path):
    out = _cli("generate", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "does not exist" in out.stderr


def test_cli_too_long_prompt_exit_2(export_dir):
    out = _cli("generate", str(export_dir), "--prompt", "word " * 600, "--max-new-tokens", "4")
    assert out.returncode == 2 and "max_seq_len" in out.stderr, out.stderr


def test_generate_function_exports_a_checkpoint_on_the_fly(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "cache"))
    res = generate(ckpt, "", max_new_tokens=12, temperature=0.0, backend="onnx")
    assert res.text[0].startswith("Once upon a time")
    cached = list((tmp_path / "cache" / "exports").iterdir())
    assert len(cached) == 1 and (cached[0] / "decodekit.json").is_file()
    assert np.isfinite(res.time_to_first_token_s)


def test_cli_demo_on_a_folder_without_a_checkpoint_exit_2(tmp_path):
    out = _cli("demo", "--model", str(tmp_path))
    assert out.returncode == 2 and "0 llama2.c checkpoints" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_demo_tells_a_story_and_prints_the_table(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "cache"))  # _cli passes os.environ on
    out = _cli("demo", "--model", str(stories_dir), "--max-new-tokens", "16", "--repeats", "1", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Once upon a time" in out.stdout
    rows = [line for line in out.stdout.splitlines() if "tokens/s" not in line and line.endswith("x")]
    assert len(rows) == 3 and rows[0].split()[-1] == "1.00x", out.stdout
    assert (tmp_path / "cache" / "exports").is_dir()


def test_export_cache_key_follows_checkpoint_dtype_and_graph_revision(ckpt, tmp_path, monkeypatch):
    """A cached export is reused only for the same checkpoint file state, dtype and exporter graph revision."""
    import os

    import decodekit.export
    from decodekit.runtime import _cache_key

    src = tmp_path / "model.bin"
    src.write_bytes(ckpt.read_bytes())
    base = _cache_key(src, "fp32")
    assert _cache_key(src, "fp32") == base
    assert _cache_key(src, "fp16") != base
    monkeypatch.setattr(decodekit.export, "GRAPH_REVISION", decodekit.export.GRAPH_REVISION + 1)
    assert _cache_key(src, "fp32") != base
    monkeypatch.undo()
    # the fused graph's form depends on the installed ONNX Runtime (probed at export): its version is in the key
    import onnxruntime

    fused = _cache_key(src, "fp32", "gqa")
    assert fused != base
    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post1")
    assert _cache_key(src, "fp32", "gqa") != fused and _cache_key(src, "fp32") == base
    monkeypatch.undo()
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # "edited"
    assert _cache_key(src, "fp32") != base


# --------------------------------------------------------------------------- prompts too long for max_seq_len


class _Model:
    """The parts of a step model that encode_prompts reads."""

    def __init__(self, tokenizer, max_seq_len: int) -> None:  # noqa: ANN001
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len


def test_over_long_prompt_is_refused_from_its_byte_length(onnx4, monkeypatch):
    from decodekit.runtime.loop import encode_prompts

    tok = onnx4.tokenizer
    merge = tok._merge

    def guarded(tokens: list[int]) -> list[int]:
        assert len(tokens) < 1000, "a prompt that cannot fit was encoded"
        return merge(tokens)

    monkeypatch.setattr(tok, "_merge", guarded)
    with pytest.raises(UsageError, match=r"the prompt is at least \d+ tokens long: .*max_seq_len=512"):
        encode_prompts(onnx4, ["x" * 1_000_000])
    with pytest.raises(UsageError, match=r"prompt 1 is at least"):
        encode_prompts(onnx4, ["Once", "x" * 1_000_000])


def test_prompt_just_over_the_limit_after_encoding(onnx4):
    from decodekit.runtime.loop import encode_prompts

    tok = onnx4.tokenizer
    text = "Once upon a time " * 40
    n = len(tok.encode(text))
    assert encode_prompts(_Model(tok, n + 1), [text]) == [tok.encode(text)]  # n prompt tokens + 1 new token fit
    with pytest.raises(UsageError, match=rf"the prompt is {n} tokens long: it does not fit max_seq_len={n}"):
        encode_prompts(_Model(tok, n), [text])
    with pytest.raises(UsageError, match="lone surrogate"):  # other tokenizer errors are not length errors
        encode_prompts(_Model(tok, 4), ["\ud800"])


def test_tokenizer_without_max_tokens_checked_after_encoding():
    from decodekit.runtime.loop import encode_prompts

    class HFLike:  # HFTokenizer.encode has no max_tokens
        def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
            return [1] + [5] * len(text)

    assert encode_prompts(_Model(HFLike(), 8), ["abcdef"]) == [[1, 5, 5, 5, 5, 5, 5]]
    with pytest.raises(UsageError, match=r"the prompt is 8 tokens long: it does not fit max_seq_len=8"):
        encode_prompts(_Model(HFLike(), 8), ["abcdefg"])


# --------------------------------------------------------------------------- a bad checkpoint: one line, no progress


@pytest.mark.parametrize("make, needle", [
    (lambda p, ck: p.write_bytes(ck.read_bytes()[:1000]), "truncated"),
    (lambda p, ck: p.write_bytes(b""), "truncated"),
    (lambda p, ck: p.write_bytes(b"\x01" * 4096), "not a llama2.c checkpoint"),
    (lambda p, ck: os.mkfifo(p), "not a regular file"),
])
def test_resolve_export_dir_checks_the_checkpoint_before_any_progress(ckpt, tmp_path, make, needle):
    from decodekit.runtime import resolve_export_dir

    src = tmp_path / "m.bin"
    make(src, ckpt)
    said = []
    with pytest.raises(UsageError, match=needle):
        resolve_export_dir(src, cache_dir=tmp_path / "cache", progress=said.append)
    assert said == [] and not (tmp_path / "cache").exists()


def test_resolve_export_dir_unreadable_checkpoint(ckpt, tmp_path, monkeypatch):
    import decodekit.runtime
    from decodekit.runtime import resolve_export_dir

    src = tmp_path / "m.bin"
    src.write_bytes(ckpt.read_bytes())

    def denied(path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - root reads a chmod 0 file: deny it here
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decodekit.runtime, "open", denied, raising=False)
    said = []
    with pytest.raises(UsageError, match="cannot read model .*m.bin: Permission denied"):
        resolve_export_dir(src, cache_dir=tmp_path / "cache", progress=said.append)
    assert said == [] and not (tmp_path / "cache").exists()


def test_cli_generate_bad_checkpoint_prints_only_the_error(tmp_path, ckpt, capsys, monkeypatch):
    from decodekit.cli import main

    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.bin").write_bytes(ckpt.read_bytes()[:-4])
    assert main(["generate", str(tmp_path / "m.bin"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decodekit generate: error: checkpoint"), err
