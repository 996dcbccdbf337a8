"""stories260K in eager PyTorch against an independent, deliberately plain NumPy port of llama2.c's run.c.

The NumPy code below reads the checkpoint itself and follows run.c's ``forward()`` line by line (one token at a
time, loops where run.c loops); it shares no code with ``decodekit.models``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decodekit.errors import UsageError
from decodekit.models import load_model, load_tokenizer
from decodekit.models.llama2c import read_llama2c_config

# ----------------------------------------------------------------------------------------------------------------
# run.c, in NumPy


class RunC:
    """Weights + KV cache + run.c's forward(token, pos), all float32."""

    def __init__(self, path):
        raw = np.fromfile(path, dtype="<i4", count=7)
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(x) for x in raw)
        shared = vocab > 0
        vocab = abs(vocab)
        f = np.fromfile(path, dtype="<f4", offset=28)
        hs = dim // n_heads
        kv_dim = dim * n_kv_heads // n_heads
        pos = 0

        def nxt(*shape):
            nonlocal pos
            n = int(np.prod(shape))
            a = f[pos : pos + n].reshape(shape)
            pos += n
            return a

        self.token_embedding_table = nxt(vocab, dim)
        self.rms_att_weight = nxt(n_layers, dim)
        self.wq = nxt(n_layers, dim, n_heads * hs)
        self.wk = nxt(n_layers, kv_dim, dim)
        self.wv = nxt(n_layers, kv_dim, dim)
        self.wo = nxt(n_layers, dim, n_heads * hs)
        self.rms_ffn_weight = nxt(n_layers, dim)
        self.w1 = nxt(n_layers, hidden, dim)
        self.w2 = nxt(n_layers, dim, hidden)
        self.w3 = nxt(n_layers, hidden, dim)
        self.rms_final_weight = nxt(dim)
        pos += seq_len * hs  # freq_cis_real + freq_cis_imag
        self.wcls = self.token_embedding_table if shared else nxt(vocab, dim)
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv_heads = dim, hidden, n_layers, n_heads, n_kv_heads
        self.vocab, self.seq_len, self.hs, self.kv_dim = vocab, seq_len, hs, kv_dim
        self.key_cache = np.zeros((n_layers, seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros((n_layers, seq_len, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x, w):
        ss = np.float32(np.sum(x * x, dtype=np.float32) / np.float32(x.size)) + np.float32(1e-5)
        ss = np.float32(1.0) / np.sqrt(ss, dtype=np.float32)
        return (w * (ss * x)).astype(np.float32)

    @staticmethod
    def softmax(x):
        e = np.exp(x - x.max(), dtype=np.float32)
        return (e / e.sum(dtype=np.float32)).astype(np.float32)

    def forward(self, token, pos):
        hs, kv_mul = self.hs, self.n_heads // self.n_kv_heads
        x = self.token_embedding_table[token].copy()
        for l in range(self.n_layers):
            xb = self.rmsnorm(x, self.rms_att_weight[l])
            q = self.wq[l] @ xb
            k = self.wk[l] @ xb
            v = self.wv[l] @ xb
            # RoPE: rotate adjacent pairs of q (and of k where i < kv_dim)
            for i in range(0, self.dim, 2):
                head_dim = i % hs
                freq = np.float32(1.0) / np.power(np.float32(10000.0), np.float32(head_dim) / np.float32(hs))
                val = np.float32(pos) * freq
                fcr, fci = np.cos(val, dtype=np.float32), np.sin(val, dtype=np.float32)
                for vec in (q, k) if i < self.kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i] = v0 * fcr - v1 * fci
                    vec[i + 1] = v0 * fci + v1 * fcr
            self.key_cache[l, pos] = k
            self.value_cache[l, pos] = v
            out = np.zeros(self.n_heads * hs, np.float32)
            for h in range(self.n_heads):
                qh = q[h * hs : (h + 1) * hs]
                kvh = h // kv_mul
                att = np.zeros(pos + 1, np.float32)
                for t in range(pos + 1):
                    kt = self.key_cache[l, t, kvh * hs : (kvh + 1) * hs]
                    att[t] = np.dot(qh, kt) / np.float32(math.sqrt(hs))
                att = self.softmax(att)
                for t in range(pos + 1):
                    out[h * hs : (h + 1) * hs] += att[t] * self.value_cache[l, t, kvh * hs : (kvh + 1) * hs]
            x = x + self.wo[l] @ out
            xb = self.rmsnorm(x, self.rms_ffn_weight[l])
            hb = self.w1[l] @ xb
            hb2 = self.w3[l] @ xb
            hb = hb * (np.float32(1.0) / (np.float32(1.0) + np.exp(-hb, dtype=np.float32))) * hb2
            x = x + self.w2[l] @ hb
        x = self.rmsnorm(x, self.rms_final_weight)
        return (self.wcls @ x).astype(np.float32)


GREEDY_STEPS = 200
LOGIT_STEPS = 64


@pytest.fixture(scope="module")
def runc_greedy(stories_dir):
    """run.c's greedy decode from BOS: (tokens incl. the leading BOS, logits of the first LOGIT_STEPS steps)."""
    rc = RunC(stories_dir / "stories260K.bin")
    tokens, logits = [1], []
    for pos in range(GREEDY_STEPS):
        lg = rc.forward(tokens[-1], pos)
        if pos < LOGIT_STEPS:
            logits.append(lg)
        tokens.append(int(np.argmax(lg)))
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def stories_model(stories_dir):
    return load_model(stories_dir / "stories260K.bin")


@torch.no_grad()
def test_config_from_header(stories_model):
    c = stories_model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512,
    )
    assert c.rope_layout == "adjacent" and c.tie_embeddings
    assert stories_model.lm_head.weight is stories_model.tok_embeddings.weight


@torch.no_grad()
def test_eager_decode_matches_runc(stories_model, runc_greedy):
    """Token-by-token with the KV cache: logits within 1e-4 for 64 steps, identical greedy tokens for 200."""
    ref_tokens, ref_logits = runc_greedy
    tokens, past = [1], None
    for pos in range(GREEDY_STEPS):
        logits, past = stories_model(
            torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), torch.ones(1, pos + 1, dtype=torch.long), past
        )
        if pos < LOGIT_STEPS:
            err = (logits[0] - torch.from_numpy(ref_logits[pos])).abs().max().item()
            assert err <= 1e-4, f"step {pos}: max |logits - run.c| = {err}"
        tokens.append(int(logits.argmax(-1)))
    assert past[0][0].shape == (1, 4, GREEDY_STEPS, 8)
    assert tokens == ref_tokens


@torch.no_grad()
def test_prefill_and_left_padding_match_runc(stories_model, runc_greedy):
    """One prefill of 48 tokens (all logits) and the same prompt left-padded in a batch of 2."""
    ref_tokens, ref_logits = runc_greedy
    n = 48
    ids = torch.tensor([ref_tokens[:n]])
    logits, _ = stories_model(ids, torch.arange(n)[None], torch.ones(1, n, dtype=torch.long), all_logits=True)
    assert (logits[0] - torch.from_numpy(ref_logits[:n])).abs().max().item() <= 1e-4
    # row 0: the prompt's first 40 tokens after 8 pads; row 1: all 48 tokens
    pad = 8
    batch = torch.tensor([[0] * pad + ref_tokens[: n - pad], ref_tokens[:n]])
    mask = torch.ones(2, n, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, presents = stories_model(batch, pos, mask, all_logits=True)
    assert torch.isfinite(logits).all() and all(torch.isfinite(k).all() for k, _ in presents)
    assert (logits[0, pad:] - torch.from_numpy(ref_logits[: n - pad])).abs().max().item() <= 1e-4
    assert (logits[1] - torch.from_numpy(ref_logits[:n])).abs().max().item() <= 1e-4
    # then one decode step on the padded batch continues both rows correctly
    nxt = torch.tensor([[ref_tokens[n - pad]], [ref_tokens[n]]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step, _ = stories_model(nxt, pos[:, -1:] + 1, mask2, presents)
    assert (step[0] - torch.from_numpy(ref_logits[n - pad])).abs().max().item() <= 1e-4
    assert (step[1] - torch.from_numpy(ref_logits[n])).abs().max().item() <= 1e-4


def test_greedy_story_text(stories_dir, runc_greedy):
    tok = load_tokenizer(stories_dir / "tok512.bin")
    text = tok.decode(runc_greedy[0])
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.parametrize("cut", [1, 27, 4096])
def test_truncated_checkpoint_is_a_usage_error(stories_dir, tmp_path, cut):
    data = (stories_dir / "stories260K.bin").read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-cut] if cut < len(data) else data[:cut])
    with pytest.raises(UsageError, match="truncated"):
        load_model(bad)


def test_bad_headers(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.array([64, 172, 5, 7, 4, 512, 512], "<i4").tobytes() + b"\0" * 64)
    with pytest.raises(UsageError, match="not a llama2.c checkpoint"):
        read_llama2c_config(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "missing.bin")
