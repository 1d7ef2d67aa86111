"""Character sets decided by the oracle, and the alphabet partition built from them.

Layer 2 of the compiler. A :class:`~safedecode.automata.syntax.CharSpec` (``[^a-z]``, ``\\w``, ``\\p{Lu}``,
a literal under IGNORECASE...) is turned into a set of code points by asking the ``regex`` package
which characters it matches — a linear scan over every Unicode scalar value, done once per
distinct spec and cached. Nothing is re-implemented, so Unicode versions and case folding agree
with the oracle by construction.

The :class:`Alphabet` then partitions all code points into classes such that every set used by a
policy is a union of classes (like regex-automata's byte classes, but over code points).

Invariants:
  * a set is a sorted tuple of disjoint, non-adjacent inclusive ``(lo, hi)`` code point ranges;
  * surrogates (U+D800–U+DFFF) never occur in decoded text and are never members of any set;
  * every class is homogeneous: all its code points are in exactly the same sets.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import regex

from .syntax import Budget, CharSpec

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
REPLACEMENT_CHARACTER = 0xFFFD

Ranges = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=1)
def _all_scalars() -> str:
    """Every Unicode scalar value in order: the text the oracle scans."""
    return "".join(map(chr, range(SURROGATES[0]))) + "".join(map(chr, range(SURROGATES[1] + 1, MAX_CODE_POINT + 1)))


def _position_to_code_point(position: int) -> int:
    return position if position < SURROGATES[0] else position + (SURROGATES[1] - SURROGATES[0] + 1)


def normalize(ranges) -> Ranges:
    """Sort, clip surrogates out, and merge overlapping or adjacent ranges."""
    pieces = []
    for lo, hi in ranges:
        if lo <= SURROGATES[1] and hi >= SURROGATES[0]:
            if lo < SURROGATES[0]:
                pieces.append((lo, SURROGATES[0] - 1))
            if hi > SURROGATES[1]:
                pieces.append((SURROGATES[1] + 1, hi))
        elif lo <= hi:
            pieces.append((lo, hi))
    pieces.sort()
    merged: list[list[int]] = []
    for lo, hi in pieces:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


SCAN_COST = 15_000  # work units of one oracle scan over every scalar value (1–12 ms measured)
_scanned: dict[tuple[str, bool], Ranges] = {}


def scan(source: str, ignore_case: bool, budget: Optional[Budget] = None) -> Ranges:
    """The code points matched by a one-character regex ``source``, according to ``regex``.

    Cached per ``(source, ignore_case)``; only a scan actually run is charged to ``budget``.
    """
    key = (source, bool(ignore_case))
    found = _scanned.get(key)
    if found is None:
        if budget is not None:
            budget.spend(SCAN_COST)
        flags = regex.IGNORECASE if ignore_case else 0
        pieces = []
        for match in regex.finditer(f"(?:{source})+", _all_scalars(), flags):
            pieces.append((_position_to_code_point(match.start()), _position_to_code_point(match.end() - 1)))
        found = normalize(pieces)
        if len(_scanned) >= 4096:
            _scanned.clear()
        _scanned[key] = found
    return found


_case_variants: dict[int, Ranges] = {}


def _case_candidates(todo: list[int]):
    """For each code point, characters that may match it under IGNORECASE: the oracle's own case
    table (``regex``'s ``get_all_cases``, what its matcher compares against), or — if that is not
    available — every character one scan of a class holding all of them finds."""
    try:
        from regex import _regex
        flags = regex.IGNORECASE | regex.UNICODE
        return {cp: "".join(map(chr, _regex.get_all_cases(flags, cp))) + chr(cp) for cp in todo}
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - older or newer regex
        found = "".join(chr(c) for lo, hi in scan("[" + "".join(regex.escape(chr(cp)) for cp in todo) + "]", True)
                        for c in range(lo, hi + 1))
        return {cp: found for cp in todo}


def prefetch_case_variants(code_points, budget: Optional[Budget] = None) -> None:
    """Resolve many literal characters under IGNORECASE.

    Candidates come from the oracle's case table; each is confirmed by the oracle itself (one
    case-insensitive ``finditer`` of the character over its candidates) — the oracle decides
    membership, in time linear in the number of characters.
    """
    todo = sorted({cp for cp in code_points if cp not in _case_variants})
    if not todo:
        return
    if budget is not None:
        budget.spend(30 * len(todo))
    candidates = _case_candidates(todo)
    for cp in todo:
        pattern = regex.compile(regex.escape(chr(cp)), regex.IGNORECASE)
        _case_variants[cp] = normalize((ord(m.group()), ord(m.group())) for m in pattern.finditer(candidates[cp]))


def resolve(spec: CharSpec, budget: Optional[Budget] = None) -> Ranges:
    """The set of code points one :class:`CharSpec` matches, exactly as the oracle decides."""
    if spec.kind == "char":
        if spec.ignore_case:
            prefetch_case_variants([spec.value], budget)
            return _case_variants[spec.value]
        return normalize([(spec.value, spec.value)])
    if spec.kind == "any":
        everything = [(0, MAX_CODE_POINT)]
        return normalize(everything if spec.value else [(0, 9), (11, MAX_CODE_POINT)])
    return scan(spec.value, spec.ignore_case, budget)


WORD_CHARS = CharSpec("set", r"\w", False)
NEWLINE = CharSpec("char", ord("\n"), False)


@dataclass(frozen=True)
class Alphabet:
    """A partition of all code points into classes.

    ``starts[k]`` is the first code point of elementary interval ``k`` (intervals are contiguous and
    cover 0..U+10FFFF); ``interval_class[k]`` its class. ``set_classes[i]`` lists the classes whose
    union is set ``i`` (in the order the sets were given).
    """

    starts: np.ndarray
    interval_class: np.ndarray
    n_classes: int
    set_classes: tuple[np.ndarray, ...]

    def class_of(self, code_point: int) -> int:
        return int(self.interval_class[bisect.bisect_right(self.starts, code_point) - 1])

    def classes_in(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(lo, hi, class)`` pieces covering code points ``lo..hi`` in order."""
        first = bisect.bisect_right(self.starts, lo) - 1
        last = bisect.bisect_right(self.starts, hi) - 1
        pieces = []
        for k in range(first, last + 1):
            start = max(int(self.starts[k]), lo)
            end = hi if k == len(self.starts) - 1 else min(int(self.starts[k + 1]) - 1, hi)
            pieces.append((start, end, int(self.interval_class[k])))
        return pieces

    def representative(self, cls: int) -> int:
        """Some code point of class ``cls`` (the first one)."""
        k = int(np.flatnonzero(self.interval_class == cls)[0])
        return int(self.starts[k])


def build_alphabet(sets: list[Ranges]) -> Alphabet:
    """Partition code points so that each of ``sets`` is a union of classes."""
    cuts = {0, MAX_CODE_POINT + 1}
    for ranges in sets:
        for lo, hi in ranges:
            cuts.add(lo)
            cuts.add(hi + 1)
    bounds = np.array(sorted(cuts), dtype=np.int64)
    starts = bounds[:-1]
    if len(sets) * len(starts) > 4_000_000:  # many distinct sets (a long literal of many scripts)
        return _build_alphabet_sweep(sets, starts)
    membership = np.zeros((len(sets), len(starts)), dtype=bool)
    for i, ranges in enumerate(sets):
        if ranges:
            los = np.array([lo for lo, _ in ranges])
            his = np.array([hi for _, hi in ranges])
            first = np.searchsorted(starts, los)
            last = np.searchsorted(starts, his + 1)
            for a, b in zip(first, last):
                membership[i, a:b] = True
    signatures = np.packbits(membership, axis=0).T if len(sets) else np.zeros((len(starts), 1), np.uint8)
    _, interval_class = np.unique(signatures, axis=0, return_inverse=True)
    interval_class = interval_class.reshape(-1).astype(np.int32)
    n_classes = int(interval_class.max()) + 1
    set_classes = tuple(np.unique(interval_class[membership[i]]) for i in range(len(sets)))
    return Alphabet(starts, interval_class, n_classes, set_classes)


def _build_alphabet_sweep(sets: list[Ranges], starts: np.ndarray) -> Alphabet:
    """:func:`build_alphabet` for many sets, in time linear in their ranges and overlaps rather
    than sets × intervals: sweep the elementary intervals keeping the sets that cover each one."""
    opening: dict[int, list[int]] = {}
    closing: dict[int, list[int]] = {}
    for i, ranges in enumerate(sets):
        for lo, hi in ranges:
            opening.setdefault(lo, []).append(i)
            closing.setdefault(hi + 1, []).append(i)
    active: set[int] = set()
    class_of_signature: dict[frozenset, int] = {}
    interval_class = np.empty(len(starts), dtype=np.int32)
    members: list[set[int]] = [set() for _ in sets]
    for k, start in enumerate(starts.tolist()):
        for i in closing.get(start, ()):
            active.discard(i)
        active.update(opening.get(start, ()))
        signature = frozenset(active)
        cls = class_of_signature.setdefault(signature, len(class_of_signature))
        interval_class[k] = cls
        for i in active:
            members[i].add(cls)
    set_classes = tuple(np.array(sorted(m), dtype=np.int64) for m in members)
    return Alphabet(starts, interval_class, len(class_of_signature), set_classes)
