"""Determinization: the character-level DFA for "the text so far contains a match" (Σ*(P1|…|Pn)).

Layer 4 of the compiler. Subset construction over alphabet classes, with the zero-width
assertions resolved the way regex-automata resolves its "look" assertions:

  * look-behind (``\\A``/``^``, and the left side of ``\\b``/``\\B``) is part of the DFA state as
    ``prev`` — START, a WORD character or a NONWORD character;
  * look-ahead (the right side of ``\\b``/``\\B``) is resolved when the next character's class is
    known (or at the end of the text), so an epsilon closure is computed per look-ahead kind;
  * end assertions become *obligations* carried by a thread: ``\\Z`` means "the rest of the text is
    empty", ``$`` means "the rest is empty or exactly one newline" (Python/``regex`` semantics
    without MULTILINE). A thread whose obligation cannot hold dies.

A state's ``end_accept`` flag says "the text as it stands now contains a match" (anchors see the end
here); the absorbing state ``MATCH`` (id 0) says "a match was completed that no continuation can
undo". Prefix-safety needs both: a token is forbidden iff its walk reaches MATCH or ends in a state
with ``end_accept``.

Invariants:
  * state 0 is MATCH (absorbing); the start state is 1;
  * ``trans[s, c]`` is total over classes; ``end_accept[0]`` is True;
  * more than ``max_states`` states raises :class:`AutomatonTooLargeError` — never a partial DFA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import AutomatonTooLargeError
from .nfa import CHAR, EPS, MATCH, NFA, SPLIT
from .syntax import Budget, budget_or_unlimited

MATCH_STATE = 0
START_STATE = 1

# Look-behind kinds (``prev``) and look-ahead kinds.
START, WORD, NONWORD = 0, 1, 2
LA_END, LA_NEWLINE, LA_WORD, LA_NONWORD = 0, 1, 2, 3

# Obligations carried by a thread: none, "text ends now", "rest of text is exactly '\n'".
FREE, END_NOW, NEWLINE_THEN_END = 0, 1, 2


def _combine(held: int, required: int) -> int:
    """Conjunction of two obligations, or -1 if they contradict."""
    if held == FREE or held == required:
        return required
    return -1


@dataclass(frozen=True)
class CharDFA:
    trans: np.ndarray        # int32 [n_states, n_classes]
    end_accept: np.ndarray   # bool [n_states]
    word_class: np.ndarray   # bool [n_classes]: class consists of \w characters
    alphabet: object
    eos_blocked: Optional[np.ndarray] = None  # bool [n_states]: the text may not end here (block rules)

    @property
    def n_states(self) -> int:
        return self.trans.shape[0]


class _Determinizer:
    def __init__(self, nfa: NFA, alphabet, word_classes: np.ndarray, newline_class: int,
                 distinguish_words: bool, distinguish_newline: bool, max_states: int,
                 budget: Optional[Budget] = None):
        self.budget = budget_or_unlimited(budget)
        self.nfa = nfa
        self.alphabet = alphabet
        self.n_classes = alphabet.n_classes
        self.max_states = max_states
        self.word_class = word_classes
        # The look-behind kind after consuming each class, and the look-ahead kind of each class.
        if distinguish_words:
            self.prev_after = np.where(word_classes, WORD, NONWORD).astype(np.int8)
            la = np.where(word_classes, LA_WORD, LA_NONWORD)
        else:
            self.prev_after = np.full(self.n_classes, NONWORD, np.int8)
            la = np.full(self.n_classes, LA_NONWORD)
        if distinguish_newline:
            la[newline_class] = LA_NEWLINE
        self.la_of_class = la
        self.newline_class = newline_class
        self.classes_by_la = {k: np.flatnonzero(la == k) for k in (LA_NEWLINE, LA_WORD, LA_NONWORD)}
        self.la_kinds = [k for k, v in self.classes_by_la.items() if len(v)]
        self.states: dict[tuple, int] = {}
        self.keys: list[tuple] = []
        self.rows: list[np.ndarray] = []
        self.node_classes: dict[tuple, tuple] = {}
        self.seed_closures: dict[tuple, tuple] = {}
        self.seed_moves: dict[tuple, tuple] = {}
        self.base_moves: dict[tuple, tuple] = {}
        self.bases: list[frozenset] = [frozenset()]  # per state, its restart part (state 0: MATCH)
        self.tails = self._tail_chains()
        self.tail_threads = frozenset(node * 3 + FREE for node in self.tails)

    # -- epsilon closure under a known look-behind and look-ahead ------------------------------
    def closure(self, seeds, prev: int, la: int):
        """Threads at CHAR nodes reachable from ``seeds``, and whether MATCH is reached.

        Returns ``(char_threads, matched, pending_newline)``: ``matched`` means a match ends here
        given the look-ahead; ``pending_newline`` means one will if the rest is exactly "\\n".
        The closure of a set is the union of its seeds' closures, each computed once.
        """
        cache = self.seed_closures
        threads: set = set()
        matched = pending_newline = False
        for seed in seeds:
            key = (seed, prev, la)
            one = cache.get(key)
            if one is None:
                one = cache[key] = self.closure_of_seed(seed, prev, la)
            threads.update(one[0])
            matched |= one[1]
            pending_newline |= one[2]
        return threads, matched, pending_newline

    def moves(self, seeds, prev: int, la: int):
        """``closure`` then ``step_all``, memoized per seed: (class → moved seeds, matched, pending)."""
        cache = self.seed_moves
        self.budget.spend(2 + len(seeds))
        moved: dict[int, list[int]] = {}
        matched = pending_newline = False
        for seed in seeds:
            key = (seed, prev, la)
            one = cache.get(key)
            if one is None:
                threads, m, p = self.closure([seed], prev, la)
                one = cache[key] = (tuple(self.step_all(threads, la).items()), m, p)
            for cls, targets in one[0]:
                if cls in moved:
                    moved[cls].extend(targets)
                else:
                    moved[cls] = list(targets)
            matched |= one[1]
            pending_newline |= one[2]
        return moved, matched, pending_newline

    def closure_of_seed(self, seed: int, prev: int, la: int):
        nfa = self.nfa
        kind, out1, out2, arg = nfa.kind, nfa.out1, nfa.out2, nfa.arg
        prev_word = prev == WORD
        next_word = la == LA_WORD
        seen = set()
        stack = [seed]
        char_threads = []
        matched = pending_newline = False
        while stack:
            thread = stack.pop()
            if thread in seen:
                continue
            seen.add(thread)
            node, ob = divmod(thread, 3)
            if ob == END_NOW and la != LA_END or ob == NEWLINE_THEN_END and la != LA_NEWLINE:
                continue
            k = kind[node]
            if k == CHAR:
                char_threads.append(thread)
            elif k == MATCH:
                if ob == FREE or ob == END_NOW:
                    matched = True
                else:
                    pending_newline = True
            elif k == EPS:
                stack.append(out1[node] * 3 + ob)
            elif k == SPLIT:
                stack.append(out1[node] * 3 + ob)
                stack.append(out2[node] * 3 + ob)
            else:  # ASSERT
                a = arg[node]
                nxt = out1[node]
                if a == "start":
                    if prev == START:
                        stack.append(nxt * 3 + ob)
                elif a == "word_boundary":
                    if prev_word != next_word:
                        stack.append(nxt * 3 + ob)
                elif a == "not_word_boundary":
                    if prev_word == next_word:
                        stack.append(nxt * 3 + ob)
                elif a == "end":
                    ob2 = _combine(ob, END_NOW)
                    if ob2 >= 0:
                        stack.append(nxt * 3 + ob2)
                elif a == "dollar":
                    for required in (END_NOW, NEWLINE_THEN_END):
                        ob2 = _combine(ob, required)
                        if ob2 >= 0:
                            stack.append(nxt * 3 + ob2)
                else:  # pragma: no cover - the parser only produces the kinds above
                    raise AssertionError(a)
        self.budget.spend(5 + len(seen))
        return tuple(char_threads), matched, pending_newline

    def step_all(self, char_threads, la: int) -> dict[int, list[int]]:
        """Consume one character of each class of look-ahead kind ``la``: class → moved seeds."""
        nfa = self.nfa
        moved: dict[int, list[int]] = {}
        for thread in char_threads:
            node, ob = divmod(thread, 3)
            if ob == NEWLINE_THEN_END:
                ob = END_NOW  # closure only keeps this thread when the character is "\n"
            seed = nfa.out1[node] * 3 + ob
            for cls in self.classes_of_node(node, la):
                moved.setdefault(cls, []).append(seed)
        return moved

    def classes_of_node(self, node: int, la: int) -> tuple:
        key = (node, la)
        classes = self.node_classes.get(key)
        if classes is None:
            classes = self.node_classes[key] = tuple(c for c in self.nfa.arg[node] if self.la_of_class[c] == la)
        return classes

    # -- states ---------------------------------------------------------------------------------
    def _tail_chains(self) -> dict[int, tuple[int, int]]:
        """For CHAR nodes followed only by CHAR nodes of the same class set up to MATCH (``x{35}``,
        the end of ``sk-[A-Za-z0-9]{20,}``): node → (chain id, characters still needed)."""
        nfa = self.nfa
        tails: dict[int, tuple[int, int]] = {}
        chain_ids: dict[frozenset, int] = {}
        for node, kind in enumerate(nfa.kind):
            if kind != CHAR:
                continue
            classes, needed, cur = nfa.arg[node], 0, node
            while nfa.kind[cur] == CHAR and nfa.arg[cur] == classes:
                needed += 1
                cur = nfa.out1[cur]
            while nfa.kind[cur] == EPS:
                cur = nfa.out1[cur]
            reaches_match = nfa.kind[cur] == MATCH or (
                nfa.kind[cur] == SPLIT and MATCH in (nfa.kind[nfa.out1[cur]], nfa.kind[nfa.out2[cur]]))
            if reaches_match and needed >= 2:  # a chain of one can never hold two threads
                tails[node] = (chain_ids.setdefault(classes, len(chain_ids)), needed)
        return tails

    def prune(self, seeds: frozenset) -> frozenset:
        """Drop threads another thread dominates, so counted runs don't blow up exponentially.

        Two free threads that both need only ``k`` and ``j ≤ k`` more characters of the same class
        set before MATCH: whenever the first reaches MATCH the second has already, so the first
        changes neither whether nor when a match happens. (``Σ*AIza[0-9A-Za-z_-]{35}`` otherwise
        tracks every overlapping start: 2^35 subsets.)
        """
        if self.tail_threads.isdisjoint(seeds):
            return seeds
        best: dict[int, int] = {}
        for thread in seeds:
            node, ob = divmod(thread, 3)
            tail = self.tails.get(node) if ob == FREE else None
            if tail is not None and (tail[0] not in best or tail[1] < self.tails[best[tail[0]] // 3][1]):
                best[tail[0]] = thread
        if not best:
            return seeds
        keep = set(best.values())
        return frozenset(t for t in seeds if t in keep or (t % 3) != FREE or t // 3 not in self.tails)

    def intern(self, seeds: frozenset, prev: int, base: frozenset = frozenset()) -> int:
        """The state for ``seeds`` after a character of look-behind kind ``prev``.

        ``base`` is the part of ``seeds`` that came from the Σ* restart: it is shared by many
        states, so its moves are computed once (see ``state_moves``).
        """
        seeds = self.prune(seeds)
        key = (seeds, prev)
        state = self.states.get(key)
        if state is None:
            state = len(self.keys)
            if state > self.max_states:
                raise AutomatonTooLargeError(f"more than {self.max_states} DFA states")
            self.states[key] = state
            self.keys.append(key)
            self.bases.append(base if base and base <= seeds else frozenset())
        return state

    def state_moves(self, state: int, la: int):
        """``moves`` of a state's seeds: the shared restart part memoized, the rest computed."""
        seeds, prev = self.keys[state]
        base = self.bases[state]
        if not base:
            return self.moves(seeds, prev, la)
        key = (base, prev, la)
        shared = self.base_moves.get(key)
        if shared is None:
            moved, matched, pending = self.moves(base, prev, la)
            shared = self.base_moves[key] = ({cls: tuple(t) for cls, t in moved.items()}, matched, pending)
        rest, matched, pending = self.moves(seeds - base, prev, la)
        moved = dict(shared[0])
        for cls, targets in rest.items():
            moved[cls] = moved[cls] + tuple(targets) if cls in moved else targets
        return moved, matched or shared[1], pending or shared[2]

    def run(self) -> CharDFA:
        self.keys.append(None)  # state 0: MATCH
        start_seed = self.nfa.start * 3 + FREE
        # The implicit Σ* restart: the start seed's contribution depends only on (prev, class).
        restart = {}
        for prev in (START, WORD, NONWORD):
            for la in self.la_kinds:
                threads, matched, _ = self.closure([start_seed], prev, la)
                assert not matched, "nullable patterns are refused by the parser"
                moved = self.step_all(threads, la)
                for cls in self.classes_by_la[la]:
                    restart[prev, int(cls)] = frozenset(moved.get(int(cls), ()))
        default_row = {}
        first = self.intern(frozenset(), START)
        assert first == START_STATE
        end_accept = [True]
        self.rows.append(np.zeros(self.n_classes, np.int32))
        queue_index = START_STATE
        while queue_index < len(self.keys):
            seeds, prev = self.keys[queue_index]
            queue_index += 1
            # The work of one state: its seeds' moves are merged per look-ahead kind, and each moved
            # class interns a subset (hashing it); the row itself is a copy of n_classes entries.
            self.budget.spend(10 + len(seeds) // 2 + self.n_classes // 32)
            if prev not in default_row:
                default_row[prev] = np.array(
                    [self.intern(restart[prev, c], int(self.prev_after[c]), restart[prev, c])
                     for c in range(self.n_classes)], dtype=np.int32)
            row = default_row[prev].copy()
            if seeds:
                for la in self.la_kinds:
                    moved_by_class, matched, pending_newline = self.state_moves(queue_index - 1, la)
                    if matched:
                        row[self.classes_by_la[la]] = MATCH_STATE
                        continue
                    if pending_newline:  # a match that holds if the rest of the text is exactly "\n"
                        moved_by_class[self.newline_class] = tuple(moved_by_class.get(self.newline_class, ())) + (
                            self.nfa.match * 3 + END_NOW,)
                    self.budget.spend(2 * len(moved_by_class) + sum(map(len, moved_by_class.values())) // 4)
                    for cls, moved in moved_by_class.items():
                        base = restart[prev, cls]
                        row[cls] = self.intern(base.union(moved), int(self.prev_after[cls]), base)
                _, at_end, _ = self.state_moves(queue_index - 1, LA_END)
            else:
                at_end = False
            end_accept.append(at_end)
            self.rows.append(row)
        trans = np.vstack(self.rows).astype(np.int32)
        return CharDFA(trans, np.array(end_accept, dtype=bool), self.word_class, self.alphabet)


def determinize(nfa: NFA, alphabet, word_classes: np.ndarray, newline_class: int, *,
                distinguish_words: bool, distinguish_newline: bool, max_states: int,
                budget: Optional[Budget] = None) -> CharDFA:
    """Subset construction of Σ*·NFA with assertions; see the module docstring.

    ``budget`` is charged as the construction goes (threads visited, subsets interned), so a
    construction over budget stops after about the budget's work, not after the whole DFA.
    """
    return _Determinizer(nfa, alphabet, word_classes, newline_class, distinguish_words,
                         distinguish_newline, max_states, budget).run()
