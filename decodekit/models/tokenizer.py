"""Tokenizers: llama2.c's ``tok*.bin`` (encoded and decoded exactly as ``run.c`` does) and ``tokenizer.json``
(also the one built from a GGUF file's vocabulary and merges, see :mod:`decodekit.models.gguf`), with chat templates.

Both classes offer the same small interface used by the runtime:

* ``encode(text, bos=True, eos=False) -> list[int]``
* ``decode(ids) -> str`` (special tokens dropped)
* ``decode_piece(prev_id, id) -> bytes`` for streaming (llama2.c only; ``tokenizer.json`` streams by
  decoding the growing id list)
* ``vocab_size``, ``bos_id``, ``eos_id``
"""

from __future__ import annotations

import heapq
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from decodekit.errors import UsageError

_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            f"text has no UTF-8 encoding: {text[e.start]!r} at position {e.start} is a lone surrogate"
        ) from None


class Llama2cTokenizer:
    """The llama2.c tokenizer (sentencepiece-style BPE with byte fallback), bit-for-bit as ``run.c``.

    File format: int32 ``max_token_length``, then per token: fp32 merge score, int32 byte length, bytes.
    Token 0 is ``<unk>``, 1 BOS, 2 EOS; ``<0xNN>`` tokens (3..258 in llama2.c vocabularies) stand for raw bytes.

    Encoding (``run.c``'s ``encode``): optional BOS, then the token ``" "`` (the dummy prefix) when the text is
    not empty, then each UTF-8 character as a token (or its bytes + 3 when the character is not in the
    vocabulary), then repeatedly merge the adjacent pair whose concatenated text is the token with the
    highest score (first pair wins ties) until no pair merges.

    Example
    -------
    >>> tok = Llama2cTokenizer("../shared/models/stories260K/tok512.bin")  # doctest: +SKIP
    >>> tok.decode(tok.encode("Once upon a time"))  # doctest: +SKIP
    'Once upon a time'
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None) -> None:
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read tokenizer {self.path}: {e.strerror}") from None
        pieces: list[bytes] = []
        scores: list[float] = []
        if len(raw) < 4:
            raise UsageError(f"tokenizer {self.path} is not a llama2.c tokenizer file ({len(raw)} bytes)")
        (self.max_token_length,) = struct.unpack_from("<i", raw, 0)
        offset = 4
        while offset < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
            if offset + 8 > len(raw):
                raise UsageError(f"tokenizer {self.path} is not a llama2.c tokenizer file (token {len(pieces)} is cut "
                                 f"off at byte {offset} of {len(raw)})")
            score, n = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if n < 0 or offset + n > len(raw):
                raise UsageError(f"tokenizer {self.path} is not a llama2.c tokenizer file (token {len(pieces)} claims "
                                 f"{n} bytes at byte {offset} of {len(raw)})")
            pieces.append(raw[offset : offset + n])
            scores.append(score)
            offset += n
        if len(pieces) < 3 or (vocab_size is not None and len(pieces) != vocab_size):
            raise UsageError(f"tokenizer {self.path} holds {len(pieces)} tokens, expected {vocab_size or '>= 3'}")
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._lookup.setdefault(p, i)
        # mergeable pieces -> (-score, id): the first id of a piece, as the lookup; run.c starts its best score
        # at -1e10 and compares with >, so a score <= -1e10 (or NaN) never merges
        self._merges: dict[bytes, tuple[float, int]] = {
            p: (-scores[i], i) for p, i in self._lookup.items() if scores[i] > -1e10
        }
        # what each token prints as: raw bytes for <0xNN>, the piece itself otherwise
        self._bytes = [bytes([int(m.group(1), 16)]) if (m := _BYTE_PIECE.match(p)) else p for p in pieces]
        #: the most bytes of text one token can cover (a merged piece, or 1 for a byte-fallback token)
        self.max_piece_bytes = max(1, max(len(p) for p in pieces))

    def min_tokens(self, text: str, bos: bool = True, eos: bool = False) -> int:
        """A lower bound on ``len(self.encode(text, bos, eos))`` from the byte length alone (no encoding).

        Every token covers at most :attr:`max_piece_bytes` bytes of the text plus the dummy-prefix space.
        """
        n = len(_utf8(text))
        return int(bos) + int(eos) + (-(-(n + 1) // self.max_piece_bytes) if n else 0)

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text`` exactly as llama2.c's ``encode(text, bos, eos)``.

        The merge loop is ``O(n log n)``: a heap of candidate pairs (score, then position: the highest score
        wins, the leftmost pair on ties, as ``run.c``'s scan) over a doubly linked list of symbols; a popped
        pair whose symbols changed since it was pushed is stale and skipped.

        ``max_tokens``: raise :class:`UsageError` before any work when the byte length alone proves that the
        encoding is longer (see :meth:`min_tokens`), and after encoding when it is.
        """
        if max_tokens is not None:
            least = self.min_tokens(text, bos, eos)
            if least > max_tokens:
                raise UsageError(
                    f"the prompt ({len(text)} characters) needs at least {least} tokens, more than {max_tokens}"
                )
        data = _utf8(text)
        tokens: list[int] = [self.bos_id] if bos else []  # BOS takes part in the merges, as in run.c
        if data:
            if b" " not in self._lookup:
                raise UsageError(f"tokenizer {self.path} has no ' ' token for the dummy prefix")
            tokens.append(self._lookup[b" "])
        lookup = self._lookup
        i, n = 0, len(data)
        while i < n:
            # one UTF-8 character: a lead byte and at most 3 continuation bytes (run.c's buffer limit)
            j = i + 1
            while j < n and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            tid = lookup.get(data[i:j])
            if tid is not None:
                tokens.append(tid)
            else:
                tokens.extend(b + 3 for b in data[i:j])  # byte fallback: the 3 special tokens come first
            i = j
        tokens = self._merge(tokens)
        if eos:
            tokens.append(self.eos_id)
        if max_tokens is not None and len(tokens) > max_tokens:
            raise UsageError(f"the prompt is {len(tokens)} tokens long, more than {max_tokens}")
        return tokens

    def _merge(self, tokens: list[int]) -> list[int]:
        """``run.c``'s merge loop (best-scoring adjacent pair first, leftmost on ties) in ``O(n log n)``."""
        n = len(tokens)
        if n < 2:
            return tokens
        pieces, merges = self.pieces, self._merges
        nxt = list(range(1, n + 1))  # nxt[n - 1] == n: the end
        prv = list(range(-1, n - 1))
        tok = list(tokens)
        # heap entries (-score, left position, left token, right token); positions keep their order
        heap = []
        for k in range(n - 1):
            m = merges.get(pieces[tok[k]] + pieces[tok[k + 1]])
            if m is not None:
                heap.append((m[0], k, tok[k], tok[k + 1]))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, k, a, b = pop(heap)
            r = nxt[k]
            if tok[k] != a or r >= n or tok[r] != b:
                continue  # stale: one of the two symbols was merged since this pair was pushed
            tok[k] = new = merges[pieces[a] + pieces[b]][1]
            tok[r] = -1
            rr = nxt[r]
            nxt[k] = rr
            if rr < n:
                prv[rr] = k
                m = merges.get(pieces[new] + pieces[tok[rr]])
                if m is not None:
                    push(heap, (m[0], k, new, tok[rr]))
            left = prv[k]
            if left >= 0:
                m = merges.get(pieces[tok[left]] + pieces[new])
                if m is not None:
                    push(heap, (m[0], left, tok[left], new))
        out = []
        k = 0
        while k < n:
            out.append(tok[k])
            k = nxt[k]
        return out

    def decode_piece(self, prev_id: int, token_id: int) -> bytes:
        """The bytes ``run.c`` prints for ``token_id`` after ``prev_id`` (leading space dropped after BOS)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id} is out of range for a vocabulary of {self.vocab_size}")
        piece = self.pieces[token_id]
        if prev_id == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: the concatenation of :meth:`decode_piece` (BOS/EOS print nothing), UTF-8 decoded.

        Invalid UTF-8 (e.g. a character cut in half) is replaced by U+FFFD.
        """
        out = bytearray()
        prev = -1
        for tid in ids:
            tid = int(tid)
            if tid not in (self.bos_id, self.eos_id):
                out += self.decode_piece(prev, tid)
            prev = tid
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package (no network, no ``transformers``).

    ``bos_id`` / ``eos_id`` come from the arguments, else from a ``tokenizer_config.json`` or ``config.json``
    beside the file. ``encode(..., bos=True)`` prepends BOS only when ``add_bos`` (default True; GGUF files say
    whether their model wants it) and the tokenizer's own post-processor does not.

    ``chat_template`` (a jinja template, as in ``tokenizer_config.json`` or a GGUF file) enables
    :meth:`apply_chat_template`; without an argument it is read from ``tokenizer_config.json`` beside the file.
    """

    def __init__(self, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None, *,
                 add_bos: bool = True, chat_template: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - optional dependency
            raise UsageError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from e
        self.path = Path(path)
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as e:
            raise UsageError(f"cannot read tokenizer {self.path}: {e}") from None
        beside = _special_ids_beside(self.path)
        if chat_template is None:
            chat_template = beside.pop("chat_template", None)
        self._setup(tok, bos_id if bos_id is not None else beside.get("bos"),
                    eos_id if eos_id is not None else beside.get("eos"), add_bos, chat_template)

    @classmethod
    def from_str(cls, text: str, *, bos_id: int | None, eos_id: int | None, add_bos: bool = True,
                 chat_template: str | None = None, source: Path | None = None) -> HFTokenizer:
        """A tokenizer from ``tokenizer.json`` text (e.g. one built from a GGUF file); ``source`` names it."""
        from tokenizers import Tokenizer

        self = cls.__new__(cls)
        self.path = source or Path("<tokenizer.json>")
        self._setup(Tokenizer.from_str(text), bos_id, eos_id, add_bos, chat_template)
        return self

    def _setup(self, tok, bos_id: int | None, eos_id: int | None, add_bos: bool,  # noqa: ANN001
               chat_template: str | None) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos)
        if chat_template is not None and not isinstance(chat_template, str):
            raise UsageError(f"the chat template of tokenizer {self.path} must be a string")
        self.chat_template = chat_template

    def to_str(self) -> str:
        """The ``tokenizer.json`` text of this tokenizer."""
        return self._tok.to_str()

    def token(self, token_id: int | None) -> str | None:
        """The text of a (special) token id, or None."""
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    def token_id(self, token: str) -> int | None:
        """The id of a token written as in the vocabulary (``"<|im_end|>"``), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are matched whole.

        ``bos=True`` prepends BOS when the tokenizer adds one (``add_bos``), and always to an empty text, so that a
        generation has a first token."""
        _utf8(text)  # a lone surrogate: UsageError, as the llama2.c tokenizer
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if bos and self.bos_id is not None and (self.add_bos or not ids):
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text of a conversation, rendered with the tokenizer's jinja chat template.

        Rendered as transformers renders it (a sandboxed jinja environment with ``trim_blocks`` and
        ``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter), with ``messages``,
        ``add_generation_prompt``, ``bos_token`` / ``eos_token`` and ``extra`` as variables. Encode the result
        with ``encode(text, bos=False)``: the template writes every special token itself.

        Raises :class:`UsageError` when the tokenizer has no chat template or the template rejects the messages,
        ``TypeError`` when ``messages`` is not a list of ``{"role": str, "content": str}``.
        """
        if self.chat_template is None:
            raise UsageError(f"tokenizer {self.path} has no chat template")
        check_messages(messages)
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.token(self.bos_id) or "", eos_token=self.token(self.eos_id) or "",
                                    **extra)


def check_messages(messages: object) -> list[dict[str, str]]:
    """A chat: a non-empty list of ``{"role": str, "content": str}`` (``TypeError`` / ``UsageError`` naming it)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    if not messages:
        raise UsageError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TypeError(f"messages[{i}][{key!r}] must be a str, got {type(m.get(key)).__name__}")
    return list(messages)


def render_chat_template(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render a Hugging Face chat template (jinja) the way transformers does; ``UsageError`` on a template error."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"the chat template failed: {e}") from None


def _special_ids_beside(path: Path) -> dict[str, Any]:
    """BOS/EOS ids from ``config.json`` next to a ``tokenizer.json`` (first id of a list), and the chat template
    of a ``tokenizer_config.json`` there (key ``chat_template``, a string)."""
    found: dict[str, Any] = {}
    tok_cfg = path.parent / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            template = json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
        if isinstance(template, str):
            found["chat_template"] = template
    cfg = path.parent / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            data = {}
        for key in ("bos", "eos"):
            value = data.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                found[key] = value
    return found


Tokenizer = Llama2cTokenizer | HFTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open a tokenizer: a llama2.c ``*.bin`` file, a ``tokenizer.json`` file, a GGUF model file (its tokenizer),
    or a directory holding one.

    A directory may be an export directory (``decodekit.json`` names the tokenizer file), a Hugging Face
    model directory (``tokenizer.json``), or a llama2.c directory with exactly one ``tok*.bin``.
    """
    path = Path(path)
    if path.is_dir():
        meta = path / "decodekit.json"
        if meta.is_file():
            return _tokenizer_of_export(meta)
        found = find_tokenizer_file(path)
        if found is None:
            raise UsageError(f"no tokenizer (tokenizer.json or tok*.bin) in directory {path}")
        path = found
    if not path.is_file():
        raise UsageError(f"tokenizer {path} does not exist")
    from decodekit.models.gguf import is_gguf

    if is_gguf(path):
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Llama2cTokenizer(path)


def gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer a GGUF file describes (vocabulary, merges, special tokens, chat template), see
    :func:`decodekit.models.gguf.gguf_tokenizer_json`."""
    from decodekit.models.gguf import gguf_tokenizer_json

    text, info = gguf_tokenizer_json(path)
    return HFTokenizer.from_str(text, bos_id=info["bos_id"], eos_id=info["eos_id"], add_bos=info["add_bos"],
                                chat_template=info["chat_template"], source=Path(path))


def _tokenizer_of_export(meta_path: Path) -> Tokenizer:
    """The tokenizer an export's ``decodekit.json`` names (a file beside it), with a clear error for nonsense."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"cannot read {meta_path}: {e}") from None
    info = meta.get("tokenizer") if isinstance(meta, dict) else None
    if not info:
        raise UsageError(f"{meta_path} records no tokenizer")
    name = info.get("file") if isinstance(info, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise UsageError(f"{meta_path}: tokenizer.file must be a file name beside it, got {name!r}")
    kind = info.get("type")
    if kind not in ("llama2c", "hf"):
        raise UsageError(f"{meta_path}: tokenizer.type must be 'llama2c' or 'hf', got {kind!r}")
    if kind == "llama2c":
        return Llama2cTokenizer(meta_path.parent / name)
    ids = {k: info.get(k) for k in ("bos_id", "eos_id")}
    for k, v in ids.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UsageError(f"{meta_path}: tokenizer.{k} must be a token id, got {v!r}")
    add_bos, template = info.get("add_bos", True), info.get("chat_template")
    if not isinstance(add_bos, bool):
        raise UsageError(f"{meta_path}: tokenizer.add_bos must be true or false, got {add_bos!r}")
    if template is not None and not isinstance(template, str):
        raise UsageError(f"{meta_path}: tokenizer.chat_template must be a string or null, got {template!r:.40}")
    return HFTokenizer(meta_path.parent / name, **ids, add_bos=add_bos, chat_template=template)


def find_tokenizer_file(directory: Path, vocab_size: int | None = None) -> Path | None:
    """``tokenizer.json``, else ``tok{vocab_size}.bin``, else ``tokenizer.bin``, else the only ``tok*.bin``."""
    directory = Path(directory)
    candidates = [directory / "tokenizer.json"]
    if vocab_size is not None:
        candidates.append(directory / f"tok{vocab_size}.bin")
    candidates.append(directory / "tokenizer.bin")
    for c in candidates:
        if c.is_file():
            return c
    bins = sorted(directory.glob("tok*.bin"))
    return bins[0] if len(bins) == 1 else None
