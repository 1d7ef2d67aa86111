"""Variants of a rule: the look-alike spellings an attacker uses to get around a literal ban.

A rule's ``variants`` (any subset of :data:`VARIANTS`) do not change how rules are checked: they
change the rule's *pattern*. The library generates one ordinary regex, inside the supported
syntax, that also matches the variant spellings; ``find_violations`` (the ``regex`` package, the
oracle) and the compiled automaton both use that regex, so the compiled policy stays exact with
respect to it. ``policy.rule.pattern`` shows the generated regex.

* ``case`` — case-insensitive with Unicode case folding, exactly as ``ignore_case`` (the phrase is
  wrapped in ``(?i:…)``).
* ``confusables`` — each character may be replaced by a look-alike: the characters Unicode's
  confusables data (UTS #39 ``confusables.txt``, as shipped by the ``confusable-homoglyphs``
  package) puts in the same class, and every code point whose NFKC form is that character
  (fullwidth ``ｂ``, mathematical ``𝐛``, circled ``ⓑ``, superscript ``ᵇ``...; computed by scanning
  Unicode once per process). Only single-code-point look-alikes: ``rn`` for ``m`` is not included.
* ``leet`` — the common digit/symbol substitutions of :data:`LEET` (a convention, not Unicode data),
  whatever the case of the letter.
* ``spacing`` — any run of :data:`SEPARATOR` characters (whitespace, punctuation, combining marks,
  zero-width and other invisible characters: ``b.o.m.b``, ``b o m b``, ``b\\u200bomb``,
  ``b\\u00adomb``, ``b̶o̶m̶b̶``) between consecutive characters. The run is unbounded: a separator loop
  adds no DFA states, a bounded one (``{0,3}``) would count.
* ``encodings`` (literals only) — forms of the *base* phrase: its UTF-8 bytes in base64 at the
  three alignments (:func:`base64_forms`; standard and URL-safe alphabets), in hex
  (:func:`hex_form`), URL-encoded (``%XX`` per byte, mixed with literal characters), and the phrase
  reversed. The reversed and URL-encoded forms follow ``case``/``ignore_case`` but not the other
  variants (with confusables, three copies of the look-alike classes tripled the DFA); base64 and
  hex are matched as written (hex digits in either case) whatever the flags say.

Per character, ``case``/``confusables``/``leet`` compose: the class is the character, its case
variants (with ``case`` or ``ignore_case``), and the look-alikes and leet substitutes of each of
those. ``spacing`` puts the separator between every two consecutive characters; ``encodings`` adds
alternatives. ``whole_word`` keeps ``\\b`` around the phrase and its reversal; the encoded forms are
not words and carry no ``\\b`` (a URL-encoded form needs it only on a literal character at its ends).

On a regex rule, ``case`` makes the whole regex case-insensitive; ``confusables``, ``leet`` and
``spacing`` apply to its *literal characters*: character sets (``[a-z]``, ``\\w``, ``.``) are left as
written, and separators go between consecutive items (also between repetitions), never next to an
assertion.

Invariants:
  * every generated pattern parses with :func:`safedecode.syntax.parse` and is ASCII-only (other
    characters are written ``\\uXXXX``/``\\UXXXXXXXX``);
  * without variants, a rule's pattern is unchanged;
  * the generated pattern matches everything the rule matched without variants (each variant only
    adds alternatives);
  * generation is deterministic (sorted classes, canonical variant order) for a given
    ``confusable-homoglyphs`` data file and Unicode version (Python's ``unicodedata``, the
    ``regex`` package's case folding).
"""
from __future__ import annotations

import base64
import functools
import string
import unicodedata
from collections.abc import Iterable
from typing import Any

from . import charsets
from .errors import PatternError
from .syntax import Alt, Assert, Chars, CharSpec, Node, Repeat, Seq, parse

VARIANTS = ("case", "confusables", "spacing", "leet", "encodings")
LITERAL_ONLY = frozenset({"encodings"})

#: Leet substitutions, keyed by lower-case letter (applied to either case).
LEET = {"a": "4@", "b": "8", "e": "3", "g": "69", "i": "1!|", "l": "1|", "o": "0", "s": "5$",
        "t": "7+", "z": "2"}

#: What ``spacing`` allows between two characters, any number of times: every whitespace and
#: default-ignorable code point (``\s``, ``\p{DI}``: zero-width space and joiners, soft hyphen, word
#: joiner, BOM, bidi controls, Hangul fillers, variation selectors, tag characters), ASCII and
#: Latin-1 punctuation and symbols (U+0000–U+002F, U+003A–U+0040, U+005B–U+0060, U+007B–U+00BF),
#: combining diacritical marks (U+0300–U+036F, strike-through and zalgo), General Punctuation
#: (U+2000–U+206F), combining marks for symbols (U+20D0–U+20FF), Supplemental Punctuation
#: (U+2E00–U+2E7F), CJK punctuation (U+3000–U+3003) and fullwidth punctuation. Whole blocks on
#: purpose: the class is ~40 code point ranges. ``[\s\p{P}\p{S}\p{M}\p{Cf}]`` (thousands of ranges)
#: made the byte-level DFA of the 31-word profanity list 10x larger (101,000 vs 9,800 states).
SEPARATOR = (r"[\s\p{DI}\x00-\x2F\x3A-\x40\x5B-\x60\x7B-\xBF\u0300-\u036F\u2000-\u206F\u20D0-\u20FF"
             r"\u2E00-\u2E7F\u3000-\u3003\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")

_URL_SAFE = {"+": "-", "/": "_"}  # base64url writes these two instead
_BIDI_MARKS = "\u200e\u200f"  # the packaged data wraps right-to-left characters in these


def validate(value: Any, *, literal: bool) -> tuple[str, ...]:
    """The canonical tuple of variant names (in :data:`VARIANTS` order), or ValueError saying why."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):  # ValueError: pydantic reports it
        raise ValueError(f"must be a list of variant names ({', '.join(VARIANTS)}), got {value!r}")  # noqa: TRY004
    for name in value:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if name in LITERAL_ONLY and not literal:
            raise ValueError(f"variant {name!r} applies to literal rules only")
    return tuple(name for name in VARIANTS if name in value)


# ---------------------------------------------------------------------------------------------
# Character data
# ---------------------------------------------------------------------------------------------
@functools.cache
def confusables() -> dict[str, frozenset[str]]:
    """Character → its single-code-point look-alikes, from Unicode's confusables data.

    ``confusable-homoglyphs`` ships it as JSON: each character with the others that share its
    UTS #39 skeleton (a symmetric relation). Multi-character entries are dropped.
    """
    from .extras import require

    require("confusable_homoglyphs", "variants", "variants = ['confusables']")
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[str, set[str]] = {}
    for key, entries in confusables_data.items():
        if len(key) != 1:
            continue
        for entry in entries:
            glyph = entry["c"].strip(_BIDI_MARKS) if len(entry["c"]) > 1 else entry["c"]
            if len(glyph) == 1 and glyph != key:
                table.setdefault(key, set()).add(glyph)
    return {key: frozenset(glyphs) for key, glyphs in table.items()}


@functools.cache
def nfkc_preimages() -> dict[str, frozenset[str]]:
    """Character → every other code point whose NFKC normalization is exactly that character."""
    table: dict[str, set[str]] = {}
    for cp in range(charsets.MAX_CODE_POINT + 1):
        c = chr(cp)
        if charsets.SURROGATES[0] <= cp <= charsets.SURROGATES[1] or unicodedata.is_normalized("NFKC", c):
            continue
        image = unicodedata.normalize("NFKC", c)
        if len(image) == 1:
            table.setdefault(image, set()).add(c)
    return {key: frozenset(chars) for key, chars in table.items()}


def case_variants(c: str) -> set[str]:
    """The characters IGNORECASE matches for ``c``, as the oracle decides."""
    ranges = charsets.resolve(CharSpec("char", ord(c), True))
    return {chr(cp) for lo, hi in ranges for cp in range(lo, hi + 1)}


def alternatives(c: str, variants: Iterable[str], ignore_case: bool = False) -> frozenset[str]:
    """The characters that may stand for ``c``: ``c``, its case variants when case-insensitive, and
    the look-alikes / leet substitutes of each of those. (The emitted class is additionally under
    IGNORECASE when case-insensitive.)"""
    variants = set(variants)
    base = case_variants(c) if ignore_case or "case" in variants else {c}
    members = set(base)
    for x in base:
        if "confusables" in variants:
            members |= confusables().get(x, frozenset()) | nfkc_preimages().get(x, frozenset())
        if "leet" in variants:
            members |= set(LEET.get(x.lower(), ""))
    return frozenset(members)


# ---------------------------------------------------------------------------------------------
# Regex text
# ---------------------------------------------------------------------------------------------
def escape_char(c: str) -> str:
    """``c`` as regex source that means exactly ``c`` inside or outside a class; ASCII only."""
    if c.isascii() and c.isalnum():
        return c
    if c.isascii() and c.isprintable():
        return "\\" + c
    cp = ord(c)
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def char_class(members: Iterable[str]) -> str:
    """Regex source matching exactly one of ``members``; runs of 3+ code points become ranges."""
    points = sorted(set(map(ord, members)))
    if len(points) == 1:
        return escape_char(chr(points[0]))
    return ranges_class(charsets.normalize((p, p) for p in points))


def ranges_class(ranges: charsets.Ranges) -> str:
    """Regex source for a set of normalized code point ranges (``[...]``)."""
    parts = []
    for lo, hi in ranges:
        if hi - lo >= 2:
            parts.append(f"{escape_char(chr(lo))}-{escape_char(chr(hi))}")
        else:
            parts.extend(escape_char(chr(p)) for p in range(lo, hi + 1))
    return "[" + "".join(parts) + "]"


@functools.cache
def separator(variants: tuple[str, ...]) -> str:
    """The ``spacing`` class for a set of variants: :data:`SEPARATOR` less every character that can
    stand for an ASCII letter or digit under those variants (leet ``@ $ ! | +``, look-alikes such as
    ``ª º ¹``). A character that is both a separator and a letter would let every candidate match
    both advance and wait: with confusables + spacing + leet, the profanity list needs 3,900
    character-level DFA states with this subtraction and 739,000 without."""
    stand_ins = sorted({ord(x) for c in string.ascii_lowercase + string.digits
                        for x in alternatives(c, variants, True) if not (x.isascii() and x.isalnum())})
    allowed, written = [], charsets.scan(SEPARATOR, False)
    for lo, hi in written:
        for cp in stand_ins:
            if lo <= cp <= hi:
                allowed.append((lo, cp - 1))
                lo = cp + 1
        allowed.append((lo, hi))
    allowed = charsets.normalize(allowed)
    return SEPARATOR if allowed == written else ranges_class(allowed)


def _hex_digits(data: bytes) -> list[str]:
    """One atom per hex digit of ``data``, letters in either case (``6[fF]``)."""
    return [d if d.isdigit() else f"[{d}{d.upper()}]" for d in data.hex()]


def _percent(c: str) -> str:
    """``c`` URL-encoded: ``%XX`` per UTF-8 byte, hex digits in either case."""
    digits = _hex_digits(c.encode("utf-8"))
    return "".join("%" + a + b for a, b in zip(digits[::2], digits[1::2]))


def hex_form(data: bytes) -> str:
    """``data`` as hex digits (either case), the bytes optionally separated by ``\\x``, a space or ':'."""
    digits = _hex_digits(data)
    pairs = [a + b for a, b in zip(digits[::2], digits[1::2])]
    return r"(?:\\x|[ :])?".join(pairs)


def base64_forms(data: bytes) -> list[str]:
    """What every base64 encoding of a byte string containing ``data`` must contain, per alignment.

    Base64 writes each 6 bits of the input as one character, starting at a multiple of 3 bytes.
    Put ``k`` = 0, 1 or 2 unknown bytes before ``data`` (its offset modulo 3) and unknown bytes
    after it: characters whose 6 bits lie inside ``data`` are fully determined; the character
    straddling the first byte of ``data`` (k > 0) and the one straddling its last byte (unless the
    end falls on a character boundary) are determined up to the unknown bits, i.e. a class of
    4 or 16 characters. Any text that contains the base64 (or base64url) encoding of something
    containing ``data`` contains one of the three forms; the converse only holds at the right
    offset, so a form can also match inside unrelated base64 — more likely the shorter ``data`` is.
    """
    forms = []
    for k in range(3):
        start, end = 8 * k, 8 * (k + len(data))  # bit span of `data` within the encoded stream
        first, last = -(-start // 6), end // 6  # the fully determined characters: [first, last)
        atoms = [_base64_char(k, data, j, 0, 0) for j in range(first, last)]
        if start % 6:
            atoms.insert(0, "".join(sorted({_base64_char(k, data, first - 1, b, 0) for b in range(256)})))
        if end % 6:
            atoms.append("".join(sorted({_base64_char(k, data, last, 0, b) for b in range(256)})))
        forms.append("".join(char_class(a + "".join(_URL_SAFE.get(c, "") for c in a)) for a in atoms))
    return forms


def _base64_char(k: int, data: bytes, position: int, before: int, after: int) -> str:
    """Character ``position`` of the base64 of ``k`` bytes ``before``, ``data``, bytes ``after``."""
    return base64.b64encode(bytes([before]) * k + data + bytes([after]) * 3).decode("ascii")[position]


class _Emitter:
    """Writes variant-expanded regex source for phrases and parsed regexes (one set of variants)."""

    def __init__(self, variants: tuple[str, ...], ignore_case: bool):
        self.variants = variants
        self.global_case = ignore_case  # the rule's own flag, in force around the whole pattern
        self.separator = separator(variants) + "*" if "spacing" in variants else ""

    def char(self, c: str, ignore_case: bool) -> str:
        return char_class(alternatives(c, self.variants, ignore_case))

    def phrase(self, chars: str, ignore_case: bool) -> str:
        return self.separator.join(self.char(c, ignore_case) for c in chars)

    def scoped(self, source: str, ignore_case: bool) -> str:
        """``source`` under ``ignore_case``, whatever flag is in force around it."""
        if ignore_case == self.global_case:
            return source
        return f"(?{'i' if ignore_case else '-i'}:{source})"

    def node(self, node: Node) -> str:
        """Regex source for a parsed pattern: literal characters expanded, separators between items."""
        if isinstance(node, Chars):
            spec = node.spec
            case = spec.ignore_case or "case" in self.variants
            if spec.kind == "char":
                return self.scoped(self.char(chr(spec.value), case), case)
            if spec.kind == "any":
                return "(?s:.)" if spec.value else "(?-s:.)"
            return self.scoped(spec.value, case)
        if isinstance(node, Assert):
            return {"start": r"\A", "end": r"\Z", "dollar": "$", "word_boundary": r"\b",
                    "not_word_boundary": r"\B"}[node.kind]
        if isinstance(node, Alt):
            return "(?:" + "|".join(self.node(item) for item in node.items) + ")"
        if isinstance(node, Seq):
            out = ""  # concatenation needs no group: only an Alt does, and it brings its own
            for before, item in zip((None,) + node.items, node.items):
                glue = before is not None and not isinstance(before, Assert) and not isinstance(item, Assert)
                out += (self.separator if glue else "") + self.node(item)
            return out
        if isinstance(node, Repeat):
            item = f"(?:{self.node(node.item)})"
            high = "" if node.max is None else node.max
            if not self.separator or node.max == 0:
                return f"{item}{{{node.min},{high}}}"
            # spacing: X (SEP X){m-1,n-1} — separators between repetitions, none before or after
            more = "" if node.max is None else node.max - 1
            body = item + ("" if node.max == 1 else f"(?:{self.separator}{item}){{{max(node.min - 1, 0)},{more}}}")
            return body if node.min > 0 else f"(?:{body})?"
        raise TypeError(node)


@functools.lru_cache(maxsize=4096)
def literal_pattern(literal: str, whole_word: bool, ignore_case: bool, variants: tuple[str, ...]) -> str:
    """The pattern of a literal rule with ``variants`` (see the module docstring)."""
    case = ignore_case or "case" in variants
    bound = r"\b" if whole_word else ""
    emit = _Emitter(variants, ignore_case)
    forms = [bound + emit.phrase(literal, case) + bound]
    if "encodings" in variants:
        plain = _Emitter(("case",) if "case" in variants else (), ignore_case)  # the base phrase's classes
        if literal[::-1] != literal:
            forms.append(bound + plain.phrase(literal[::-1], case) + bound)
        last = len(literal) - 1  # a literal character at an end of the URL form keeps whole_word's \b
        forms.append("".join(f"(?:{bound if i == 0 else ''}{plain.char(c, case)}{bound if i == last else ''}"
                             f"|{_percent(c)})" for i, c in enumerate(literal)))
    pattern = emit.scoped("|".join(forms), case)
    if "encodings" in variants:  # base64 and hex are case-sensitive as written, whatever the flags
        data = literal.encode("utf-8")
        pattern += "|" + emit.scoped("(?:" + "|".join(base64_forms(data) + [hex_form(data)]) + ")", False)
    return pattern


@functools.lru_cache(maxsize=4096)
def regex_pattern(pattern: str, ignore_case: bool, variants: tuple[str, ...]) -> str:
    """The pattern of a regex rule with ``variants``: literal characters expanded (see above).

    A pattern that does not parse is returned unchanged, so that the policy's own parser reports
    the error with the rule's name and the position in what the user wrote.
    """
    try:
        node = parse(pattern, ignore_case)
    except PatternError:
        return pattern
    return _Emitter(variants, ignore_case).node(node)
