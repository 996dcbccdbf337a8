"""Test-suite set-up.

The suite executes the real Triton kernels on this GPU-less machine: Triton's interpreter is
switched on here, before anything imports ``triton`` (``triton.jit`` reads the variable when a
kernel is decorated). ``make gpu-check`` sets ``TRITON_INTERPRET=0`` and ``DECODEKIT_DEVICE=cuda``
so that the same tests run compiled on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("DECODEKIT_SHARED_MODELS", ROOT.parent / "shared" / "models"))
STORIES_DIR = SHARED_MODELS / "stories260K"

# The suite runs on two xdist workers over two cores: one thread each for torch and ONNX Runtime, or their
# spinning thread pools fight over the cores (measured: eager decoding 6x slower with 2 threads per worker).
torch.set_num_threads(1)
os.environ.setdefault("DECODEKIT_ORT_THREADS", "1")


def test_device() -> torch.device:
    """The device the kernel tests run on: CPU under the interpreter, CUDA for make gpu-check."""
    return torch.device(os.environ.get("DECODEKIT_DEVICE", "cpu"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a GPU run (``DECODEKIT_DEVICE=cuda``, the GPU check's tests stage) keep only the tests written for the test
    device (those that take the ``device`` fixture): every other test builds CPU tensors, which the CPU suite
    already runs under the interpreter, and would only meet "backend='triton' needs CUDA tensors" there."""
    if test_device().type != "cuda":
        return
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture
def device() -> torch.device:
    dev = test_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("DECODEKIT_DEVICE=cuda but torch sees no CUDA device")
    return dev


def require_file(path: Path) -> Path:
    """Return ``path``; skip when it is missing, except in CI (``CI=true``) where that fails."""
    if not path.exists():
        msg = f"missing shared file {path} (the project reads it from ../shared, never from the repo)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    require_file(STORIES_DIR / "stories260K.bin")
    require_file(STORIES_DIR / "tok512.bin")
    return STORIES_DIR


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


# --- appended by the models/export work (issue 3): exports shared by several test files ---------------------


@pytest.fixture(scope="session")
def stories_export_dir(stories_dir, tmp_path_factory) -> Path:
    """stories260K exported ONCE per session (per xdist worker): fp32, validated, via ``export_decoder``.

    Read-only for the tests: ``model.onnx``, ``decodekit.json`` (format_version 1) and ``tok512.bin``.
    """
    from decodekit.export import export_decoder

    out = tmp_path_factory.mktemp("stories_export") / "stories260K"
    export_decoder(stories_dir / "stories260K.bin", out, progress=False)
    return out


@pytest.fixture
def compile_offline(tmp_path):
    """``run(script, timeout)``: run a script that compiles kernels ahead of time for sm_90 (interpreter off, a fresh
    Triton cache) and prints "compiled"; returns its stdout. Skipped only where the case cannot run: where triton has
    no NVIDIA backend or no ptxas (every release in pyproject.toml's range ships both on Linux x86-64). It needs no
    GPU (a GPU run leaves these tests out: they do not take the ``device`` fixture)."""
    import platform
    import subprocess
    import sys

    import triton
    import triton.backends

    # Triton's Linux x86-64 wheels ship the NVIDIA backend and its ptxas: there a missing one is a broken install,
    # a failure; elsewhere (other platforms' wheels) the case cannot run, and is skipped
    shipped = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
    give_up = pytest.fail if shipped else pytest.skip
    if "nvidia" not in triton.backends.backends:
        give_up(f"triton {triton.__version__} has no NVIDIA backend in this installation")
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018 (raises where no ptxas is found)
    except (ImportError, AttributeError, RuntimeError) as exc:
        give_up(f"triton {triton.__version__} has no ptxas for the sm_90 compile: {exc!r}")

    def run(script: str, timeout: int = 300) -> str:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
        return proc.stdout

    return run


# --- appended by the GGUF work (issue 12): SmolLM2-135M, exported once per test run ------------------------------

SMOLLM_GGUF = SHARED_MODELS / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    return require_file(SMOLLM_GGUF)


def _run_shared_dir(tmp_path_factory) -> Path:
    """A folder shared by all xdist workers of ONE test run (``pytest-N``), not by later runs."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_export(tmp_path_factory, name: str, source: Path, **kwargs) -> Path:
    """Export ``source`` once per test run into ``pytest-N/name``, shared across the xdist workers.

    The first worker to ask exports under an ``fcntl`` lock; the others wait on the lock and find the finished
    export (``export_decoder`` renames it into place complete, so ``decodekit.json`` means done).
    """
    import fcntl

    from decodekit.export import export_decoder

    root = _run_shared_dir(tmp_path_factory)
    out = root / name
    with open(root / f".{name}.test-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "decodekit.json").is_file():
                export_decoder(source, out, progress=False, **kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_gguf):  # noqa: ANN201
    """transformers' tokenizer of the SmolLM2 GGUF (AutoTokenizer, gguf_file=...): the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf):  # noqa: ANN201
    """transformers' LlamaForCausalLM from the SmolLM2 GGUF, dequantized to fp32: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_export_fp32(smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (GGUF, dequantized) exported fp32 and validated, once per test run. Read-only."""
    return shared_export(tmp_path_factory, "smollm2-fp32", smollm_gguf)


@pytest.fixture(scope="session")
def smollm_export_int4(smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported with its Q4_1 matrices as MatMulNBits, once per test run. Read-only."""
    return shared_export(tmp_path_factory, "smollm2-int4", smollm_gguf, weights="int4")


TINY_GGUF = dict(dim=64, n_heads=4, n_kv_heads=2, hidden=128, n_layers=2, ctx=64, theta=10000.0, eps=1e-5)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable-character map, for bytes 32..126 (space is 'Ġ')."""
    return [chr(b) if b != 32 else "\u0120" for b in range(32, 127)]


def llama_cpp_permute(w, n_heads: int):  # noqa: ANN001, ANN201 - numpy in, numpy out
    """llama.cpp's converter: HF's q/k rows (i, i + D/2 rotate together) -> adjacent pairs (2i, 2i+1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, weight_type: str = "Q4_1", arch: str = "llama", seed: int = 0,
                    untied_output: str | None = None, pre: str = "default", truncate: int | None = None) -> dict:
    """A 2-layer Llama GGUF written with the ``gguf`` package (its writer and quantizers), as llama.cpp lays it out
    (q/k rows permuted). Returns the expected decoder parameters in Hugging Face's layout (numpy float32): each is
    ``dequantize(quantize(W))`` of the HF-layout matrix (quantization is per row, so it commutes with the row
    permutation), computed without decodekit.

    Vocabulary: 3 control tokens (<|endoftext|>, <|im_start|>, <|im_end|>), bytes 32..126, and the merges "Ġ t" and
    "h e": 100 tokens.
    """
    import gguf
    import numpy as np

    c = TINY_GGUF
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars(), "\u0120t", "he"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab, dim, hd = len(tokens), c["dim"], c["dim"] // c["n_heads"]
    q = getattr(gguf.GGMLQuantizationType, weight_type)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(dim)
    w.add_feed_forward_length(c["hidden"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(c["theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["\u0120 t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)
    expected: dict[str, np.ndarray] = {}

    def put(gguf_name: str, ours: str, value: np.ndarray, kind, heads: int | None = None) -> None:  # noqa: ANN001
        value = value.astype(np.float32)
        stored = llama_cpp_permute(value, heads) if heads else value
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = stored.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
            w.add_tensor(gguf_name, data)
            expected[ours] = value.astype(data.dtype).astype(np.float32)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
            expected[ours] = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)

    f32 = gguf.GGMLQuantizationType.F32
    put("token_embd.weight", "tok_embeddings.weight", rng.standard_normal((vocab, dim)) * 0.5,
        gguf.GGMLQuantizationType.Q8_0)
    for i in range(c["n_layers"]):
        kv = c["n_kv_heads"] * hd
        put(f"blk.{i}.attn_norm.weight", f"layers.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(dim), f32)
        put(f"blk.{i}.ffn_norm.weight", f"layers.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(dim), f32)
        put(f"blk.{i}.attn_q.weight", f"layers.{i}.attn.wq.weight", rng.standard_normal((dim, dim)) * 0.2, q,
            heads=c["n_heads"])
        put(f"blk.{i}.attn_k.weight", f"layers.{i}.attn.wk.weight", rng.standard_normal((kv, dim)) * 0.2, q,
            heads=c["n_kv_heads"])
        put(f"blk.{i}.attn_v.weight", f"layers.{i}.attn.wv.weight", rng.standard_normal((kv, dim)) * 0.2, q)
        put(f"blk.{i}.attn_output.weight", f"layers.{i}.attn.wo.weight", rng.standard_normal((dim, dim)) * 0.2, q)
        put(f"blk.{i}.ffn_gate.weight", f"layers.{i}.mlp.w1.weight", rng.standard_normal((c["hidden"], dim)) * 0.2, q)
        put(f"blk.{i}.ffn_up.weight", f"layers.{i}.mlp.w3.weight", rng.standard_normal((c["hidden"], dim)) * 0.2, q)
        put(f"blk.{i}.ffn_down.weight", f"layers.{i}.mlp.w2.weight", rng.standard_normal((dim, c["hidden"])) * 0.2, q)
    put("output_norm.weight", "norm.weight", 1 + 0.1 * rng.standard_normal(dim), f32)
    if untied_output is not None:
        put("output.weight", "lm_head.weight", rng.standard_normal((vocab, dim)) * 0.5,
            getattr(gguf.GGMLQuantizationType, untied_output))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate)
    return expected


@pytest.fixture
def tiny_gguf_config() -> dict:
    """The tiny GGUF file's sizes (:data:`TINY_GGUF`) and chat template (``"chat_template"``)."""
    return {**TINY_GGUF, "chat_template": TINY_CHAT_TEMPLATE}


@pytest.fixture
def tiny_gguf(tmp_path):  # noqa: ANN201
    """``tiny_gguf(**kwargs) -> (path, expected HF-layout parameters)``; see :func:`write_tiny_gguf`."""
    count = [0]

    def make(**kwargs):  # noqa: ANN003, ANN202
        count[0] += 1
        path = tmp_path / f"tiny{count[0]}.gguf"
        return path, write_tiny_gguf(path, **kwargs)

    return make


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (the thread-count tests), the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
