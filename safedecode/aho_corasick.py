"""A fast path for plain phrase lists: the Aho–Corasick automaton as the character DFA.

For rules that are plain literals (no ``ignore_case``, no ``whole_word``: no assertions and one
character per position), the DFA for Σ*(P1|…|Pn) is the Aho–Corasick automaton of the phrases:
states are trie nodes, and a missing edge follows the failure link. Building it is a breadth-first
pass with one row copy per node — much faster than the general subset construction
(:mod:`safedecode.dfa`), which it must equal in meaning (tests compare both on random texts).

The result has the same shape as :class:`safedecode.dfa.CharDFA`: state 0 is MATCH, the root is
state 1, and a node where some phrase ends (itself or through its failure chain) has
``end_accept`` set and every transition to MATCH.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .dfa import MATCH_STATE, START_STATE, CharDFA
from .syntax import Chars, Node, Seq


def plain_phrase(node: Node):
    """The code points of a plain literal pattern, or None if ``node`` is anything else."""
    items = node.items if isinstance(node, Seq) else (node,)
    if not items or not all(isinstance(i, Chars) and i.spec.kind == "char" and not i.spec.ignore_case
                            for i in items):
        return None
    return [i.spec.value for i in items]


def phrase_dfa(phrases: list[list[int]], alphabet, word_classes: np.ndarray) -> CharDFA:
    """The character DFA of "contains one of ``phrases``" over ``alphabet``'s classes."""
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
