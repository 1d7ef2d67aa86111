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
* ``spacing`` — any run of separators between consecutive characters. A separator is every
  character that is not a letter or digit (:func:`separator`): whitespace, punctuation, symbols,
  emoji, combining marks, zero-width and other invisible characters, controls, private-use
  characters, U+FFFD — what an invalid byte decodes to — and the letters of scripts other than the
  phrase's (``b.o.m.b``, ``b o m b``, ``b\\u200bomb``, ``b̶o̶m̶b̶``, ``b★o★m★b``, ``b😀o😀m😀b``,
  ``b\\ufffdomb``, ``bжoжmжb``). *Letters* (:func:`letters`): ASCII digits, the whole Latin script
  (so ``é``, ``ß``, fullwidth ``ｂ`` are letters, never filler), every character that stands for an
  ASCII letter or digit or for a letter of the phrase under the rule's other variants (both cases,
  leet ``@ $ ! | +``, look-alikes ``ⓑ а 𝐛 ²``), and, for a phrase in another script, the letters
  of that script (Cyrillic for ``бомба``; Han, kana and Hangul together). The separator is one
  negated class, ``[^…]``, the same for every rule of an ASCII word list. The run is unbounded: a
  separator loop adds no DFA states, a bounded one (``{0,3}``) would count. It can be narrowed
  (the ``separators`` argument of :func:`literal_pattern` / :func:`regex_pattern`, one character
  class, :func:`validate_separators`; letters are still removed); policies do not pass one yet.
  With ``whole_word`` a spaced phrase is delimited by *non-letters* instead of ``\\b``:
  ``(?:\\A|N)`` before and ``(?:N|\\Z)`` after, ``N`` (:func:`nonword`) being the separators plus the
  stand-ins that are not ``\\w`` (``damn!`` is a word with leet, ``d!amn`` is ``diamn``). The
  difference with ``\\b``: ``_`` and other scripts' letters end a word (``my_damn_var``, ``жdamn``),
  as they separate letters. ``\\b`` there would make each DFA state waiting in a separator run
  remember whether the separator was a ``\\w`` character (the other scripts' letters are), which
  multiplied the profanity list's byte automaton by 8 (73,000 states, 42 MB, 3 components). The
  reversed and URL-encoded forms of a spaced rule use the same boundaries.
* ``encodings`` (literals only) — forms of the *base* phrase: its UTF-8 bytes in base64 at the
  three alignments (:func:`base64_forms`; standard and URL-safe alphabets), in hex
  (:func:`hex_form`), URL-encoded (``%XX`` per byte, mixed with literal characters), and the phrase
  reversed. The reversed and URL-encoded forms follow ``case``/``ignore_case`` but not the other
  variants (with confusables, three copies of the look-alike classes tripled the DFA); base64 and
  hex are matched as written (hex digits in either case) whatever the flags say.

Per character, ``case``/``confusables``/``leet`` compose: the class is the character, its case
variants (with ``case`` or ``ignore_case``), and the look-alikes and leet substitutes of each of
those. ``spacing`` puts the separator between every two consecutive characters; ``encodings`` adds
alternatives. ``whole_word`` keeps ``\\b`` around the phrase and its reversal (the non-letter
boundaries above with ``spacing``); the encoded forms are not words and carry no ``\\b`` (a
URL-encoded form needs it only on a literal character at its ends).

On a regex rule, ``case`` makes the whole regex case-insensitive; ``confusables``, ``leet`` and
``spacing`` apply to its *literal characters*: character sets (``[a-z]``, ``\\w``, ``.``) are left as
written, and separators go between consecutive items (also between repetitions), never next to an
assertion.

Invariants:
  * every generated pattern parses with :func:`safedecode.automata.syntax.parse` and is ASCII-only (other
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

import regex

from ..automata import charsets
from ..automata.syntax import Alt, Assert, Chars, CharSpec, Node, Repeat, Seq, parse
from ..errors import PatternError

VARIANTS = ("case", "confusables", "spacing", "leet", "encodings")
LITERAL_ONLY = frozenset({"encodings"})

#: Leet substitutions, keyed by lower-case letter (applied to either case).
LEET = {"a": "4@", "b": "8", "e": "3", "g": "69", "i": "1!|", "l": "1|", "o": "0", "s": "5$",
        "t": "7+", "z": "2"}

#: What is always a letter or digit for ``spacing`` (never a separator): the ASCII digits and every
#: code point of the Latin script (``A-Z a-z``, ``ª º``, ``À-ɏ``, IPA, ``Ḁ-ỿ``, fullwidth Latin...). To
#: it :func:`letters` adds, per rule, the characters that stand for a letter or digit under the
#: rule's other variants and the letters of the scripts of the phrase's own letters.
LETTERS = r"[0-9\p{Script=Latin}]"

#: The ``spacing`` separator before a rule's variants are taken into account: every character that
#: is not a letter or digit in the sense of :data:`LETTERS` — whitespace, punctuation, symbols,
#: emoji, combining marks, invisible and control characters, private-use characters, U+FFFD (what
#: an invalid byte decodes to), and the letters of other scripts (``dжaжmжn``).
SEPARATOR = r"[^0-9\p{Script=Latin}]"

#: Scripts whose letters count together: a phrase written in one of them keeps all of them letters.
_SCRIPT_GROUPS = (("Greek",), ("Cyrillic",), ("Armenian",), ("Hebrew",), ("Arabic",), ("Syriac",),
                  ("Thaana",), ("Devanagari",), ("Bengali",), ("Gurmukhi",), ("Gujarati",), ("Oriya",),
                  ("Tamil",), ("Telugu",), ("Kannada",), ("Malayalam",), ("Sinhala",), ("Thai",), ("Lao",),
                  ("Tibetan",), ("Myanmar",), ("Georgian",), ("Ethiopic",), ("Cherokee",), ("Khmer",),
                  ("Mongolian",), ("Han", "Hiragana", "Katakana", "Hangul", "Bopomofo"))

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
    from ..extras import require

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


@functools.lru_cache(maxsize=1024)
def letters(variants: tuple[str, ...], phrase: str = "", word_only: bool = False) -> charsets.Ranges:
    """What ``spacing`` never treats as a separator, for a rule with ``variants`` and literal
    characters ``phrase``: :data:`LETTERS`; every character that stands for an ASCII letter or digit
    or for a letter or digit of ``phrase`` under the variants, whatever the case (leet ``@ $ ! | +``,
    look-alikes such as ``ª ² ⓑ``, ``K`` KELVIN SIGN and ``ſ``); and, for each letter or digit of
    ``phrase`` outside the Latin script, every character of its script (:data:`_SCRIPT_GROUPS`; the
    character itself if its script is not listed).

    ``word_only``: only those that are ``\\w`` characters — what continues a word for
    ``whole_word`` (``damn!`` is a whole word with leet, as with ``\\b``, although ``!`` is ``i``);
    so whatever ends a word for ``\\b`` (``\\W``) also ends it here.

    A character that both stands for a letter and is a separator would let every candidate match
    both advance and wait: with confusables + spacing + leet, the profanity list needed 3,900
    character-level DFA states with the look-alikes kept out of the separators and 739,000 without.
    """
    latin = charsets.scan(LETTERS, False)
    ranges = list(latin)
    own = [c for c in phrase if c.isalnum()]
    for c in sorted(set(string.ascii_lowercase + string.digits + "".join(own))):
        ranges.extend((ord(x), ord(x)) for x in alternatives(c, variants, True)
                      if not word_only or x == c or regex.match(r"\w", x))
    for c in sorted(set(own)):
        if _inside(ord(c), latin):
            continue
        group = next((g for g in _SCRIPT_GROUPS if any(regex.match(rf"\p{{Script={name}}}", c) for name in g)), None)
        for name in group or ():
            ranges.extend(charsets.scan(rf"\p{{Script={name}}}", False))
    ranges = charsets.normalize(ranges)
    return _intersect(ranges, charsets.scan(r"\w", False)) if word_only else ranges


def _intersect(a: charsets.Ranges, b: charsets.Ranges) -> charsets.Ranges:
    out, j = [], 0
    for lo, hi in a:
        while j < len(b) and b[j][1] < lo:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            out.append((max(lo, b[k][0]), min(hi, b[k][1])))
            k += 1
    return charsets.normalize(out)


@functools.lru_cache(maxsize=1024)
def nonword(variants: tuple[str, ...], phrase: str = "") -> str:
    """What ends a word for a spaced ``whole_word`` phrase: the class of everything not in
    ``letters(variants, phrase, word_only=True)`` — the separators, and the stand-ins that are not
    ``\\w`` (leet ``! $ @ | +``)."""
    return "[^" + ranges_class(letters(variants, phrase, True))[1:]


def _inside(cp: int, ranges: charsets.Ranges) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _complement(ranges: charsets.Ranges) -> charsets.Ranges:
    out, next_cp = [], 0
    for lo, hi in ranges:
        if lo > next_cp:
            out.append((next_cp, lo - 1))
        next_cp = hi + 1
    if next_cp <= charsets.MAX_CODE_POINT:
        out.append((next_cp, charsets.MAX_CODE_POINT))
    return charsets.normalize(out)


@functools.lru_cache(maxsize=1024)
def separator_ranges(variants: tuple[str, ...], phrase: str = "", narrow: str | None = None) -> charsets.Ranges:
    """The code points of :func:`separator` (``narrow``: see :func:`validate_separators`)."""
    allowed = _complement(letters(variants, phrase))
    return allowed if narrow is None else _intersect(charsets.scan(narrow, False), allowed)


@functools.lru_cache(maxsize=1024)
def separator(variants: tuple[str, ...], phrase: str = "", narrow: str | None = None) -> str:
    """The ``spacing`` class of a rule with ``variants`` and literal characters ``phrase``: every
    character that is not in :func:`letters` (one negated class, ``[^…]``), or, with ``narrow`` (a
    one-character class such as ``"[\\s.\\-]"``), the characters of ``narrow`` that are not in it."""
    if narrow is not None:
        return ranges_class(separator_ranges(variants, phrase, narrow))
    return "[^" + ranges_class(letters(variants, phrase))[1:]


def validate_separators(value: Any) -> str:
    """A rule's ``separators`` (narrowing ``spacing``): one regex character class in the supported
    syntax that matches at least one character; ValueError saying why not."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a regex character class such as '[\\s.\\-_]', got {value!r}")
    try:
        node = parse(value, False)
    except PatternError as exc:
        raise ValueError(f"invalid separators {value!r}: {exc}") from None
    if not isinstance(node, Chars) or node.spec.kind == "any":
        raise ValueError(f"separators must be one character class (like '[\\s.\\-_]'), got {value!r}")
    if not separator_ranges((), "", value):
        raise ValueError(f"separators {value!r} match no character that is not a letter or digit")
    return value


def _phrase_chars(node: Node) -> str:
    """The literal characters of a parsed regex (what ``spacing`` must not treat as separators)."""
    if isinstance(node, Chars):
        return chr(node.spec.value) if node.spec.kind == "char" else ""
    if isinstance(node, (Alt, Seq)):
        return "".join(_phrase_chars(item) for item in node.items)
    if isinstance(node, Repeat):
        return _phrase_chars(node.item)
    return ""


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

    def __init__(self, variants: tuple[str, ...], ignore_case: bool, phrase: str = "",
                 separators: str | None = None):
        self.variants = variants
        self.global_case = ignore_case  # the rule's own flag, in force around the whole pattern
        self.phrase_chars = "".join(sorted(set(phrase)))
        spacing = "spacing" in variants
        if spacing and separators is not None and not separator_ranges(variants, self.phrase_chars, separators):
            spacing = False  # everything the rule narrowed the separators to stands for a letter
        self.separator_class = separator(variants, self.phrase_chars, separators) if spacing else ""
        self.separator = self.separator_class + "*" if spacing else ""

    def boundaries(self, phrase: str) -> tuple[str, str]:
        """``whole_word`` around a spaced phrase: ``(?:\\A|N)`` before and ``(?:N|\\Z)`` after, N
        the class of what ends a word (:func:`nonword`), where the phrase starts / ends with a
        letter; ``\\b`` otherwise. (``\\b`` would make every DFA state that waits in a separator
        run remember whether the separator was a ``\\w`` character — the Unicode letters of other
        scripts are separators — and multiply the byte-level automaton ~8x.)"""
        other = nonword(self.variants, self.phrase_chars)
        word = letters(self.variants, self.phrase_chars, True)
        before = rf"(?:\A|{other})" if phrase and _inside(ord(phrase[0]), word) else r"\b"
        after = rf"(?:{other}|\Z)" if phrase and _inside(ord(phrase[-1]), word) else r"\b"
        return before, after

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
def literal_pattern(literal: str, whole_word: bool, ignore_case: bool, variants: tuple[str, ...],
                    separators: str | None = None) -> str:
    """The pattern of a literal rule with ``variants`` (see the module docstring); ``separators``
    narrows what ``spacing`` lets through (:func:`validate_separators`)."""
    case = ignore_case or "case" in variants
    bound = r"\b" if whole_word else ""
    emit = _Emitter(variants, ignore_case, literal, separators)
    before, after = emit.boundaries(literal) if whole_word and "spacing" in variants else (bound, bound)
    forms = [before + emit.phrase(literal, case) + after]
    if "encodings" in variants:
        plain = _Emitter(("case",) if "case" in variants else (), ignore_case)  # the base phrase's classes
        # with spacing, every form's whole_word boundary is the spaced form's (one notion of a word
        # per rule: \b next to a separator-delimited form makes the DFA track \w after separators)
        spaced_word = whole_word and "spacing" in variants
        rev_before, rev_after = emit.boundaries(literal[::-1]) if spaced_word else (bound, bound)
        if literal[::-1] != literal:
            forms.append(rev_before + plain.phrase(literal[::-1], case) + rev_after)
        last = len(literal) - 1  # a literal character at an end of the URL form keeps whole_word's boundary
        forms.append("".join(f"(?:{before if i == 0 else ''}{plain.char(c, case)}{after if i == last else ''}"
                             f"|{_percent(c)})" for i, c in enumerate(literal)))
    pattern = emit.scoped("|".join(forms), case)
    if "encodings" in variants:  # base64 and hex are case-sensitive as written, whatever the flags
        data = literal.encode("utf-8")
        pattern += "|" + emit.scoped("(?:" + "|".join(base64_forms(data) + [hex_form(data)]) + ")", False)
    return pattern


@functools.lru_cache(maxsize=4096)
def regex_pattern(pattern: str, ignore_case: bool, variants: tuple[str, ...], separators: str | None = None) -> str:
    """The pattern of a regex rule with ``variants``: literal characters expanded (see above).

    A pattern that does not parse is returned unchanged, so that the policy's own parser reports
    the error with the rule's name and the position in what the user wrote.
    """
    try:
        node = parse(pattern, ignore_case)
    except PatternError:
        return pattern
    return _Emitter(variants, ignore_case, _phrase_chars(node), separators).node(node)
