"""From characters to bytes: the byte-level DFA, including how invalid UTF-8 decodes.

Layer 5 of the compiler. Tokens are byte strings, and a token may end in the middle of a
character, so the automaton the tokens walk must read bytes. This module composes the character
DFA with a UTF-8 decoder that behaves exactly like ``bytes.decode("utf-8", "replace")``:

  * a valid sequence decodes to its code point;
  * a byte that cannot start a sequence (80–BF, C0, C1, F5–FF) decodes to U+FFFD;
  * a started sequence interrupted by a byte that cannot continue it decodes to one U+FFFD
    (the "maximal subpart" rule), and the interrupting byte is then decoded afresh;
  * an incomplete sequence at the very end of the text is not yet a character.

Byte states are the character states (same ids, so MATCH is 0 and start is 1) plus
*intermediate* states "inside a character". An intermediate state is identified by what it can
still do — the character state to fall back to on an invalid byte (via U+FFFD), whether the text
so far matches at its end, the legal next-byte range, and the map from remaining code points to
target states — so the many byte prefixes that behave alike share one state.

Invariants: ``trans`` is total over 256 bytes; ``end_accept`` of an intermediate state equals
that of the character state it started from (an incomplete character adds no text).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import AutomatonTooLargeError
from .charsets import REPLACEMENT_CHARACTER
from .dfa import MATCH_STATE, CharDFA
from .syntax import Budget, budget_or_unlimited


@dataclass(frozen=True)
class ByteDFA:
    trans: np.ndarray       # int32 [n_states, 256]
    end_accept: np.ndarray  # bool [n_states]
    start: int = 1
    char_states: int = 0    # states of the character-level DFA it was built from
    eos_blocked: Optional[np.ndarray] = None  # bool [n_states]: ending the text here is refused

    def eos_blocked_or_none(self) -> np.ndarray:
        """``eos_blocked``, or all False."""
        return self.eos_blocked if self.eos_blocked is not None else np.zeros(self.n_states, dtype=bool)

    @property
    def n_states(self) -> int:
        return self.trans.shape[0]

    def walk(self, state: int, data: bytes) -> int:
        """Follow ``data`` from ``state`` (pure Python; for tests and verification)."""
        for byte in data:
            state = int(self.trans[state, byte])
        return state


def _lead_info(byte: int):
    """For a UTF-8 lead byte: (continuation count, code point base, next-byte range) or None."""
    if 0xC2 <= byte <= 0xDF:
        return 1, (byte & 0x1F) << 6, (0x80, 0xBF)
    if 0xE0 <= byte <= 0xEF:
        valid = (0xA0, 0xBF) if byte == 0xE0 else (0x80, 0x9F) if byte == 0xED else (0x80, 0xBF)
        return 2, (byte & 0x0F) << 12, valid
    if 0xF0 <= byte <= 0xF4:
        valid = (0x90, 0xBF) if byte == 0xF0 else (0x80, 0x8F) if byte == 0xF4 else (0x80, 0xBF)
        return 3, (byte & 0x07) << 18, valid
    return None


class _ByteBuilder:
    def __init__(self, dfa: CharDFA, max_states: int, budget: Optional[Budget] = None):
        self.budget = budget_or_unlimited(budget)
        self.dfa = dfa
        self.alphabet = dfa.alphabet
        self.max_states = max_states
        n = dfa.n_states
        self.fffd_class = self.alphabet.class_of(REPLACEMENT_CHARACTER)
        self.ascii_classes = np.array([self.alphabet.class_of(b) for b in range(128)])
        self.n_char = n
        self.rows: list = [None] * n
        self.end_accept: list[bool] = list(dfa.end_accept)
        self.intermediates: dict[tuple, int] = {}
        self.pending: list[tuple[int, tuple]] = []
        self.lead_cache: dict[int, tuple] = {}
        self.lead_states: dict[tuple, int] = {}
        # Classes holding a non-ASCII code point (U+FFFD among them): they decide a row's upper half.
        self.upper_classes = np.unique(self.alphabet.interval_class[np.searchsorted(self.alphabet.starts, 128, "right") - 1:])

    def new_intermediate(self, key: tuple) -> int:
        state = self.intermediates.get(key)
        if state is None:
            self.budget.spend(4 + len(key[4]) // 8)  # a key to hash
            state = self.n_char + len(self.intermediates)
            if len(self.intermediates) > self.max_states:
                raise AutomatonTooLargeError(f"more than {self.max_states} UTF-8 intermediate states")
            self.intermediates[key] = state
            self.rows.append(None)
            self.end_accept.append(key[1])
            self.pending.append((state, key))
        return state

    def lead_pieces(self, byte: int):
        """(offset_lo, offset_hi, class) pieces of the code points a lead byte can start, and their classes."""
        cached = self.lead_cache.get(byte)
        if cached is None:
            count, base, (valid_lo, valid_hi) = _lead_info(byte)
            shift = 6 * (count - 1)  # only code points the legal second bytes can reach (no overlongs)
            lo = base + ((valid_lo & 0x3F) << shift)
            hi = base + ((valid_hi & 0x3F) << shift) + (1 << shift) - 1
            pieces = self.alphabet.classes_in(lo, hi)
            offsets = np.array([(a - base, b - base) for a, b, _ in pieces], dtype=np.int64)
            classes = np.array([c for _, _, c in pieces], dtype=np.int64)
            cached = self.lead_cache[byte] = (offsets, classes)
        return cached

    def code_point_map(self, char_state: int, byte: int) -> tuple:
        """Targets from ``char_state`` for the code points lead ``byte`` starts, as merged
        ``(offset_lo, offset_hi, target)`` pieces (offsets relative to the first such code point)."""
        offsets, classes = self.lead_pieces(byte)
        targets = self.dfa.trans[char_state, classes]
        keep = np.ones(len(targets), dtype=bool)
        keep[1:] = targets[1:] != targets[:-1]
        firsts = np.flatnonzero(keep)
        lasts = np.append(firsts[1:] - 1, len(targets) - 1)
        return tuple(zip(offsets[firsts, 0].tolist(), offsets[lasts, 1].tolist(), targets[firsts].tolist()))

    def upper_half(self, s: int) -> np.ndarray:
        """Entries 128–255 of character state ``s``'s row: lead bytes open intermediate states."""
        fffd_target = int(self.dfa.trans[s, self.fffd_class])
        accept = bool(self.dfa.end_accept[s])
        upper = np.full(128, fffd_target, np.int32)  # bytes that cannot start a character decode to U+FFFD
        for byte in range(0xC2, 0xF5):
            _, classes = self.lead_pieces(byte)
            key = (byte, self.dfa.trans[s, classes].tobytes(), fffd_target, accept)
            state = self.lead_states.get(key)
            if state is None:
                self.budget.spend(40 + len(classes) // 2)  # code_point_map: numpy work per piece
                count, _, valid = _lead_info(byte)
                cmap = self.code_point_map(s, byte)
                state = self.lead_states[key] = self.new_intermediate((fffd_target, accept, count, valid, cmap))
            upper[byte - 128] = state
        return upper

    def base_rows(self) -> np.ndarray:
        """The rows of all character states at once: ASCII bytes by one gather; the upper half once
        per distinct (non-ASCII targets, end_accept) signature — phrase lists have a handful."""
        trans = self.dfa.trans
        self.budget.spend(self.n_char * (1 + len(self.upper_classes) // 64))
        rows = np.empty((self.n_char, 256), np.int32)
        rows[:, :128] = trans[:, self.ascii_classes]
        signature = np.ascontiguousarray(np.concatenate(
            [trans[:, self.upper_classes], self.dfa.end_accept[:, None].astype(trans.dtype)], axis=1))
        keys = signature.view(np.dtype((np.void, signature.dtype.itemsize * signature.shape[1]))).ravel()
        _, first, inverse = np.unique(keys[1:], return_index=True, return_inverse=True)  # state 0 is MATCH
        uppers = np.stack([self.upper_half(int(state) + 1) for state in first])
        rows[1:, 128:] = uppers[inverse.reshape(-1)]
        rows[MATCH_STATE] = MATCH_STATE
        return rows

    def intermediate_row(self, key: tuple) -> np.ndarray:
        fffd_target, accept, remaining, (valid_lo, valid_hi), cmap = key
        self.budget.spend(20 + 2 * (valid_hi - valid_lo + 1) + len(cmap))  # per byte: a window of cmap
        if fffd_target == MATCH_STATE:
            row = np.full(256, MATCH_STATE, np.int32)
        else:
            row = self.base[fffd_target].copy()  # invalid next byte: U+FFFD, then decode it afresh
        shift = 6 * (remaining - 1)
        piece_starts = [a for a, _, _ in cmap]
        for byte in range(valid_lo, valid_hi + 1):
            lo = (byte & 0x3F) << shift
            hi = lo + (1 << shift) - 1
            first = bisect.bisect_right(piece_starts, lo) - 1
            if remaining == 1:
                row[byte] = cmap[first][2]
                continue
            last = bisect.bisect_right(piece_starts, hi) - 1
            window = tuple((max(a, lo) - lo, min(b, hi) - lo, t) for a, b, t in cmap[first:last + 1])
            row[byte] = self.new_intermediate((fffd_target, accept, remaining - 1, (0x80, 0xBF), window))
        return row

    def run(self) -> ByteDFA:
        self.base = self.base_rows()
        while self.pending:
            state, key = self.pending.pop()
            self.rows[state] = self.intermediate_row(key)
        trans = np.vstack([self.base] + self.rows[self.n_char:]) if len(self.rows) > self.n_char else self.base
        trans = trans.astype(np.int32)
        if self.dfa.eos_blocked is not None:
            self._doom_dead_ends(trans)
        return ByteDFA(trans, np.array(self.end_accept, dtype=bool), char_states=self.n_char,
                       eos_blocked=self._eos_blocked(trans))

    def _doom_dead_ends(self, trans: np.ndarray) -> None:
        """Grammar components only: a state inside a UTF-8 sequence whose every completion reaches
        MATCH is MATCH already (in place).

        In a "does not contain" automaton the text can always stop, so an incomplete character is
        harmless. Inside a block (a positive grammar, EOS masked) it is a dead end: after ``<t``
        where only ``o`` may follow, a lead byte of a multi-byte character can never be completed.
        Up to three passes: the longest sequence has three continuation bytes.
        """
        for _ in range(3):
            inner = trans[self.n_char:]
            doomed = np.flatnonzero((inner == MATCH_STATE).all(axis=1)) + self.n_char
            if not len(doomed):
                return
            trans[np.isin(trans, doomed)] = MATCH_STATE

    def _eos_blocked(self, trans: np.ndarray) -> Optional[np.ndarray]:
        """Char states keep their flag; a state inside a UTF-8 sequence inherits its origins' flags
        (an OR over the up to three bytes that lead to it: fail closed)."""
        if self.dfa.eos_blocked is None:
            return None
        blocked = np.zeros(trans.shape[0], dtype=bool)
        blocked[:self.n_char] = self.dfa.eos_blocked
        for _ in range(3):
            targets = trans[np.flatnonzero(blocked)].ravel()
            blocked[targets[targets >= self.n_char]] = True
        return blocked


def to_bytes(dfa: CharDFA, max_states: int = 1_000_000, budget: Optional[Budget] = None) -> ByteDFA:
    """Compose the character DFA with a UTF-8 decoder (errors="replace" semantics); ``budget`` is
    charged per row built."""
    return _ByteBuilder(dfa, max_states, budget).run()
