"""The llama2.c tokenizer against run.c's rules (read from the file by the test itself) and tokenizer.json loading."""

from __future__ import annotations

import struct

import pytest

from decodekit.errors import UsageError
from decodekit.models import HFTokenizer, Llama2cTokenizer, load_tokenizer


def read_vocab(path):
    """(pieces, scores) straight from the tok*.bin file: int32 max len, then (f32 score, i32 len, bytes) each."""
    raw = path.read_bytes()
    off, pieces, scores = 4, [], []
    while off < len(raw):
        score, n = struct.unpack_from("<fi", raw, off)
        pieces.append(raw[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


def runc_encode(pieces, scores, text):
    """A second, plain transcription of run.c's encode(text, bos=1, eos=0) for comparison."""
    index = {p: i for i, p in reversed(list(enumerate(pieces)))}
    toks = [1]
    if text:
        toks.append(index[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        toks.extend([index[b]] if b in index else [x + 3 for x in b])
    while True:
        best = None
        for i in range(len(toks) - 1):
            j = index.get(pieces[toks[i]] + pieces[toks[i + 1]])
            if j is not None and (best is None or scores[j] > scores[best[1]]):
                best = (i, j)
        if best is None:
            return toks
        toks[best[0] : best[0] + 2] = [best[1]]


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir / "tok512.bin")


@pytest.fixture(scope="module")
def vocab(stories_dir):
    return read_vocab(stories_dir / "tok512.bin")


STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.\n"
    'Lily\'s mom said, "Lily, let\'s go!" Über-café ☃ 𝄞 — 42% done.'
)


def test_vocabulary(tok, vocab):
    pieces, _ = vocab
    assert isinstance(tok, Llama2cTokenizer)
    assert tok.vocab_size == len(pieces) == 512 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pieces == pieces


@pytest.mark.parametrize("text", ["", "a", "the", "Once upon a time", "  two  spaces ", "☃", STORY])
def test_encode_as_runc(tok, vocab, text):
    assert tok.encode(text) == runc_encode(*vocab, text)


def test_encode_known_answers(tok, vocab):
    pieces, _ = vocab
    idx = {p: i for i, p in enumerate(pieces)}
    assert tok.encode("") == [1]  # no dummy prefix for empty text
    assert tok.encode("", bos=False) == []
    assert tok.encode("a") == [1, idx[b" a"]]  # " " + "a" merge into the vocabulary piece " a"
    assert tok.encode("a", bos=False, eos=True) == [idx[b" a"], 2]
    # U+2603 is not in the vocabulary: its three UTF-8 bytes fall back to byte tokens (byte + 3)
    assert tok.encode("☃") == [1, idx[b" "], 0xE2 + 3, 0x98 + 3, 0x83 + 3]


def test_decode_as_runc(tok, vocab):
    pieces, _ = vocab
    idx = {p: i for i, p in enumerate(pieces)}
    assert tok.decode_piece(1, idx[b" a"]) == b"a"  # leading space dropped after BOS
    assert tok.decode_piece(idx[b" a"], idx[b" a"]) == b" a"
    assert tok.decode_piece(7, 0x41 + 3) == b"A"  # <0x41> is the raw byte 'A'
    assert tok.decode_piece(7, 0x0A + 3) == b"\n"
    assert tok.decode([1, 0xE2 + 3, 0x98 + 3, 0x83 + 3, 2]) == "☃"  # BOS/EOS print nothing
    with pytest.raises(ValueError, match="token_id"):
        tok.decode_piece(1, 512)


def test_round_trip(tok):
    ids = tok.encode(STORY)
    assert ids[0] == 1 and len(ids) < len(STORY.encode())  # merges happened
    assert tok.decode(ids) == STORY


def test_bad_tokenizer_files(tmp_path, stories_dir):
    bad = tmp_path / "tok.bin"
    bad.write_bytes((stories_dir / "tok512.bin").read_bytes()[:1000])
    with pytest.raises(UsageError, match="not a llama2.c tokenizer"):
        Llama2cTokenizer(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no tokenizer"):
        load_tokenizer(empty)


def test_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "</s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"bos_token_id": 0, "eos_token_id": [1, 4]}')
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 5)
    assert tok.encode("hello world planet") == [0, 3, 4, 2]
    assert tok.encode("hello", bos=False, eos=True) == [3, 1]
    assert tok.decode([0, 3, 4, 1]) == "hello world"


# --- issue 10: O(n log n) merging, the same ids as the quadratic algorithm it replaced --------------------------


def old_encode(tok, text, bos=True, eos=False):
    """The quadratic encoder decodekit shipped before issue 10, verbatim: the reference for the heap version."""
    data = text.encode("utf-8")
    tokens = [tok.bos_id] if bos else []
    if data:
        tokens.append(tok._lookup[b" "])
    i = 0
    while i < len(data):
        j = i + 1
        while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        char = data[i:j]
        tid = tok._lookup.get(char)
        if tid is not None:
            tokens.append(tid)
        else:
            tokens.extend(b + 3 for b in char)
        i = j
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for k in range(len(tokens) - 1):
            tid = tok._lookup.get(tok.pieces[tokens[k]] + tok.pieces[tokens[k + 1]])
            if tid is not None and tok.scores[tid] > best_score:
                best_score, best_id, best_idx = tok.scores[tid], tid, k
        if best_idx == -1:
            break
        tokens[best_idx : best_idx + 2] = [best_id]
    if eos:
        tokens.append(tok.eos_id)
    return tokens


def write_vocab(path, pieces, scores, max_len=None):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max_len or max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
    return path


def _random_text(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_heap_merge_equals_the_old_algorithm_on_random_and_real_text(tok):
    import random

    rng = random.Random(10)
    words = STORY.split() + ["the", "and", "was", "ing", "Tim", "  ", "\n", "\t", "é", "☃", "𝄞", "中文", "<0x41>"]
    letters = list("abcdefghijklmnopqrstuvwxyz ABCXYZ.,!?'\"\n") + ["é", "ü", "☃", "𝄞", "\x00", "\ufffd"]
    texts = [STORY, STORY * 3, " " * 50, "a" * 200, "ab" * 150, "\n" * 40]
    for _ in range(60):
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 120))))
        texts.append(_random_text(rng, letters, rng.randrange(0, 300)))
    for text in texts:
        for bos, eos in ((True, False), (False, True)):
            assert tok.encode(text, bos=bos, eos=eos) == old_encode(tok, text, bos, eos), text


def test_heap_merge_with_tied_scores_and_odd_vocabularies(tmp_path):
    """Equal scores everywhere (the leftmost pair wins), pieces that appear twice (the first id counts),
    NaN and <= -1e10 scores (never merged, as run.c's `> best` starting from -1e10)."""
    import random

    rng = random.Random(3)
    base = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    pieces = base + [b" ", b"a", b"b", b"c", b" a", b"ab", b"ba", b"aa", b"bb", b"abc", b"ca", b"ab", b"aab",
                     b"bab", b"cc", b"ccc", b" ab", b"aaaa", b"<s> "]
    for trial in range(12):
        if trial % 3 == 0:
            scores = [0.0] * len(pieces)  # every merge tied
        elif trial % 3 == 1:
            scores = [float(rng.choice([-1.0, -2.0, -3.0])) for _ in pieces]  # many ties
        else:
            scores = [rng.uniform(-5, 5) for _ in pieces]
        if trial >= 6:
            for k in rng.sample(range(259, len(pieces)), 4):
                scores[k] = rng.choice([float("nan"), -1e10, -2e10, float("inf"), float("-inf")])
        t = Llama2cTokenizer(write_vocab(tmp_path / f"v{trial}.bin", pieces, scores))
        for _ in range(40):
            text = _random_text(rng, ["a", "b", "c", " ", "ab", "é"], rng.randrange(0, 80))
            assert t.encode(text) == old_encode(t, text), (trial, text)
            assert t.encode(text, bos=False) == old_encode(t, text, bos=False), (trial, text)


def test_long_prompt_encodes_fast(tok):
    import time

    text = (STORY * (30_000 // len(STORY) + 1))[:30_000]
    t0 = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert tok.decode(ids) == text
    assert elapsed < 1.0, f"30,000 characters took {elapsed:.2f} s"  # the quadratic loop: ~40 s here


def test_length_limit_is_checked_before_encoding(tok):
    import time

    assert tok.max_piece_bytes == max(len(p) for p in tok.pieces)
    for text in ["", "a", "Once upon a time", STORY, "☃☃", "x" * 999]:
        ids = tok.encode(text)
        assert tok.min_tokens(text) <= len(ids)
        assert tok.encode(text, max_tokens=len(ids)) == ids
        if text:
            with pytest.raises(UsageError, match="more than"):
                tok.encode(text, max_tokens=len(ids) - 1)
    huge = "a" * 20_000_000  # would take seconds to encode: refused from its byte length alone
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="at least"):
        tok.encode(huge, max_tokens=512)
    assert time.perf_counter() - t0 < 0.5
