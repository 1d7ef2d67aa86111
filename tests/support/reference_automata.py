"""The automata stages' original pure-Python constructions, kept as test oracles.

tests/test_compile_speed_equivalence.py checks that the compiled (numba) versions in
:mod:`safedecode.automata` build identical automata. This is the code before that change (commit
a781579).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from safedecode.automata.dfa import MATCH_STATE, START_STATE, CharDFA
from safedecode.automata.syntax import Budget, budget_or_unlimited


def phrase_dfa(phrases: list[list[int]], alphabet, word_classes: np.ndarray,
               budget: Budget = None) -> CharDFA:
    """The character DFA of "contains one of ``phrases``" over ``alphabet``'s classes."""
    budget = budget_or_unlimited(budget)
    budget.spend(sum(map(len, phrases)) * (2 + alphabet.n_classes // 256))
    children: list[dict[int, int]] = [{}, {}]  # node 0 stands for MATCH, node 1 is the root
    ends = [False, False]
    for phrase in phrases:
        node = START_STATE
        for code_point in phrase:
            cls = alphabet.class_of(code_point)
            nxt = children[node].get(cls)
            if nxt is None:
                nxt = len(children)
                children[node][cls] = nxt
                children.append({})
                ends.append(False)
            node = nxt
        ends[node] = True
    n = len(children)
    trans = np.zeros((n, alphabet.n_classes), dtype=np.int32)
    accept = np.zeros(n, dtype=bool)
    accept[MATCH_STATE] = True
    trans[START_STATE, :] = START_STATE
    queue = deque()
    for cls, child in children[START_STATE].items():
        trans[START_STATE, cls] = child
        queue.append((child, START_STATE))  # (node, its failure link)
    accept[START_STATE] = ends[START_STATE]
    while queue:
        node, fail = queue.popleft()
        accept[node] = ends[node] or accept[fail]
        if accept[node]:
            trans[node, :] = MATCH_STATE  # a phrase ended: every continuation contains a match
            continue
        trans[node] = trans[fail]
        for cls, child in children[node].items():
            trans[node, cls] = child
            queue.append((child, int(trans[fail, cls])))
    return CharDFA(trans, accept, word_classes, alphabet)
