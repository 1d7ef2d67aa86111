"""Document rules as automata: "the whole text is one word of a language", as a forbidden automaton.

A document rule (:class:`safedecode.policy.rules.DocumentRule`, an output type) says: every prefix
of the text is a prefix of some word of ``L``, and the text may end only on a word of ``L``. Written
as a "does not contain" automaton (so the token layer, kernels and verification treat it like any
other component), from the search DFA of ``\\A(?:L)\\Z``:

  * ``\\A`` kills the search's restart after the first character, so the DFA is the anchored
    automaton of ``L``; ``\\Z`` makes a match possible only at the end of the text, so the DFA's
    ``end_accept`` states are exactly "the text so far is a complete word" and its MATCH state is
    never entered;
  * a state from which no complete word can be reached (the text left the language) becomes the
    composite's MATCH — the violation;
  * every other state that is not complete is ``eos_blocked``: the text may not end there.

Invariants of the result: state 0 is MATCH (absorbing, ``end_accept``), state 1 is the start, no
other state has ``end_accept``, and a state is ``eos_blocked`` iff it is live and incomplete.
"""
from __future__ import annotations

import numpy as np

from .blocks import co_reachable
from .dfa import MATCH_STATE, CharDFA


def can_complete(language: CharDFA) -> np.ndarray:
    """Which states of ``language`` can still reach a complete word (an ``end_accept`` state)."""
    n = language.n_states
    complete = language.end_accept.copy()
    complete[MATCH_STATE] = False  # never entered: a ``\\Z`` match exists only at the end
    # One extra column: complete states step to a virtual target n; co-reachability to it is the answer.
    column = np.where(complete, n, np.arange(n)).astype(np.int32)[:, None]
    extended = np.vstack([np.hstack([language.trans, column]), np.full((1, language.trans.shape[1] + 1), n, np.int32)])
    return co_reachable(extended, target=n)[:n]


def compose_document(language: CharDFA) -> CharDFA:
    """The composite character DFA of a document rule, from the search DFA of ``\\A(?:L)\\Z``."""
    live = can_complete(language)
    live[MATCH_STATE] = False
    trans = np.where(live[language.trans], language.trans, MATCH_STATE).astype(np.int32)
    trans[MATCH_STATE] = MATCH_STATE
    end_accept = np.zeros(language.n_states, dtype=bool)
    end_accept[MATCH_STATE] = True
    eos_blocked = live & ~language.end_accept
    return CharDFA(trans, end_accept, language.word_class, language.alphabet, eos_blocked)


def shortest_completion(document, others=(), limit: int = 20_000):
    """A byte string that completes ``document`` (a document rule's byte DFA) while no DFA of
    ``others`` (forbidden rules' byte DFAs) accepts any prefix of it: ``(True, witness)``;
    ``(False, longest_prefix)`` when none exists (the rules leave no way to finish a valid document;
    ``longest_prefix`` is where the search got closest); ``(None, b"")`` when ``limit`` product
    states were searched without deciding.

    A best-first search over the product automaton, ordered by the document's byte distance to
    completion (so a completable product is usually decided in about as many steps as the witness
    is long). An exhaustive search of the reachable product decides emptiness exactly."""
    import heapq

    distance = _distance_to_complete(document)
    eos_blocked = document.eos_blocked_or_none()
    dfas = [document] + list(others)
    start = tuple(d.start for d in dfas)
    frontier = [(int(distance[document.start]), 0, start)]
    parent: dict[tuple, tuple] = {start: (None, -1)}
    closest, order = (int(distance[document.start]), start), 1
    while frontier:
        if len(parent) > limit:
            return None, b""
        _, _, state = heapq.heappop(frontier)
        if not eos_blocked[state[0]]:
            return True, _path(parent, state)
        successors = np.stack([d.trans[s] for d, s in zip(dfas, state)])  # [n_dfas, 256]
        matched = np.stack([d.end_accept[row] for d, row in zip(dfas, successors)])
        for byte in np.flatnonzero(~matched.any(axis=0)):  # a text in an accepting state is a violation
            child = tuple(int(s) for s in successors[:, byte])
            if child not in parent:
                parent[child] = (state, int(byte))
                closest = min(closest, (int(distance[child[0]]), child))
                heapq.heappush(frontier, (int(distance[child[0]]), order, child))
                order += 1
    return False, _path(parent, closest[1])


def _distance_to_complete(document) -> np.ndarray:
    """For each state of a document byte DFA, the fewest bytes to a complete (not eos-blocked)
    state (a breadth-first search backwards over the transitions)."""
    n = document.n_states
    complete = ~document.eos_blocked_or_none()
    complete[MATCH_STATE] = False
    sources = np.repeat(np.arange(n), document.trans.shape[1])
    order = np.argsort(document.trans.ravel(), kind="stable")
    bounds = np.searchsorted(document.trans.ravel()[order], np.arange(n + 1))
    distance = np.full(n, np.iinfo(np.int32).max, np.int64)
    frontier = np.flatnonzero(complete)
    distance[frontier] = 0
    step = 0
    while len(frontier):
        step += 1
        before = np.concatenate([sources[order[bounds[t]:bounds[t + 1]]] for t in frontier])
        before = np.unique(before[(distance[before] > step) & (before != MATCH_STATE)])
        distance[before] = step
        frontier = before
    return distance


def _path(parent: dict, state: tuple) -> bytes:
    out = []
    while parent[state][0] is not None:
        state, byte = parent[state]
        out.append(byte)
    return bytes(reversed(out))
