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
