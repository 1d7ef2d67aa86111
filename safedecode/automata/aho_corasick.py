"""A fast path for plain phrase lists: the Aho–Corasick automaton as the character DFA.

For rules that are plain literals (no ``ignore_case``, no ``whole_word``: no assertions and one
character per position), the DFA for Σ*(P1|…|Pn) is the Aho–Corasick automaton of the phrases:
states are trie nodes, and a missing edge follows the failure link. Building it is a breadth-first
pass with one row copy per node — much faster than the general subset construction
(:mod:`safedecode.automata.dfa`), which it must equal in meaning (tests compare both on random texts).

The result has the same shape as :class:`safedecode.automata.dfa.CharDFA`: state 0 is MATCH, the root is
state 1, and a node where some phrase ends (itself or through its failure chain) has
``end_accept`` set and every transition to MATCH.
"""
from __future__ import annotations

import itertools

import numba
import numpy as np

from ..errors import AutomatonTooLargeError
from .dfa import MATCH_STATE, START_STATE, CharDFA
from .syntax import Budget, Chars, Node, Seq, budget_or_unlimited


def plain_phrase(node: Node):
    """The code points of a plain literal pattern, or None if ``node`` is anything else."""
    items = node.items if isinstance(node, Seq) else (node,)
    code_points = []
    for item in items:  # one pass (10,000 phrases call this for every character)
        if not isinstance(item, Chars):
            return None
        spec = item.spec
        if spec.kind != "char" or spec.ignore_case:
            return None
        code_points.append(spec.value)
    return code_points or None


def set_sequence(node: Node):
    """The character specs of a pattern that is a plain sequence of single characters (literal
    characters, with or without IGNORECASE, classes, ``.``) — no assertions, repeats or
    alternations — or None."""
    items = node.items if isinstance(node, Seq) else (node,)
    if not items or not all(isinstance(i, Chars) for i in items):
        return None
    return [i.spec for i in items]


@numba.njit(cache=True)
def _phrase_trie(classes, lengths):
    """The trie of the phrases (``classes``: their character classes laid end to end), numbered as
    inserted: node 0 stands for MATCH, node 1 is the root. Children are kept in insertion order
    (``first_child``/``next_sibling``); ``ends`` marks the nodes where a phrase ends."""
    n_max = len(classes) + 2
    child_cls = np.empty(n_max, np.int64)
    first_child = np.full(n_max, -1, np.int64)
    last_child = np.full(n_max, -1, np.int64)
    next_sibling = np.full(n_max, -1, np.int64)
    ends = np.zeros(n_max, np.bool_)
    index = dict()
    index[np.int64(-1)] = np.int64(-1)  # fixes the key and value types
    n = 2
    k = 0
    for length in lengths:
        node = 1
        for _ in range(length):
            cls = classes[k]
            k += 1
            key = node * (n_max + 1) + cls
            if key in index:
                nxt = index[key]
            else:
                nxt = n
                n += 1
                index[key] = nxt
                child_cls[nxt] = cls
                if last_child[node] < 0:
                    first_child[node] = nxt
                else:
                    next_sibling[last_child[node]] = nxt
                last_child[node] = nxt
            node = nxt
        ends[node] = True
    return n, child_cls, first_child, next_sibling, ends


@numba.njit(cache=True)
def _phrase_rows(n, n_classes, child_cls, first_child, next_sibling, ends):
    """The breadth-first pass of Aho–Corasick over the trie: a missing edge follows the failure link;
    a node where a phrase ends (itself or through its failure chain) goes to MATCH on everything."""
    trans = np.zeros((n, n_classes), np.int32)
    accept = np.zeros(n, np.bool_)
    accept[MATCH_STATE] = True
    trans[START_STATE, :] = START_STATE
    queue_node = np.empty(n, np.int64)
    queue_fail = np.empty(n, np.int64)
    head = tail = 0
    c = first_child[START_STATE]
    while c >= 0:
        trans[START_STATE, child_cls[c]] = c
        queue_node[tail] = c
        queue_fail[tail] = START_STATE
        tail += 1
        c = next_sibling[c]
    accept[START_STATE] = ends[START_STATE]
    while head < tail:
        node = queue_node[head]
        fail = queue_fail[head]
        head += 1
        accept[node] = ends[node] or accept[fail]
        if accept[node]:
            trans[node, :] = MATCH_STATE  # a phrase ended: every continuation contains a match
            continue
        trans[node, :] = trans[fail, :]
        c = first_child[node]
        while c >= 0:
            trans[node, child_cls[c]] = c
            queue_node[tail] = c
            queue_fail[tail] = trans[fail, child_cls[c]]
            tail += 1
            c = next_sibling[c]
    return trans, accept


def phrase_dfa(phrases: list[list[int]], alphabet, word_classes: np.ndarray,
               budget: Budget = None) -> CharDFA:
    """The character DFA of "contains one of ``phrases``" over ``alphabet``'s classes.

    States are trie nodes numbered as the phrases insert them (MATCH 0, root 1); the trie and the
    breadth-first failure pass run in numba (:func:`_phrase_trie`, :func:`_phrase_rows`).
    """
    budget = budget_or_unlimited(budget)
    budget.spend(sum(map(len, phrases)) * (2 + alphabet.n_classes // 256))
    lengths = np.fromiter(map(len, phrases), dtype=np.int64, count=len(phrases))
    code_points = np.fromiter(itertools.chain.from_iterable(phrases), dtype=np.int64, count=int(lengths.sum()))
    classes = alphabet.interval_class[np.searchsorted(alphabet.starts, code_points, side="right") - 1].astype(np.int64)
    n, child_cls, first_child, next_sibling, ends = _phrase_trie(classes, lengths)
    trans, accept = _phrase_rows(n, alphabet.n_classes, child_cls, first_child, next_sibling, ends)
    return CharDFA(trans, accept, word_classes, alphabet)


def sequence_dfa(sequences: list[list[frozenset]], alphabet, word_classes: np.ndarray, max_states: int,
                 budget: Budget = None) -> CharDFA:
    """The character DFA of "contains a match of one of ``sequences``", each a list of class sets
    (one per character: a literal character's case variants under IGNORECASE, a class...).

    This is the subset construction specialised to sequences, done with bit-parallel arithmetic
    (Shift-And): a state is the bit set of sequence positions that end a partial match of the text
    so far, all sequences laid end to end in one integer. On a character of class ``c`` the next set
    is ``((B << 1) | STARTS) & M[c]``, where ``M[c]`` has the positions whose set contains ``c``; a
    set reaching the last position of a sequence is a match (the absorbing MATCH state). Each step
    costs a few machine words per 64 positions, so a 10,000-character case-insensitive literal
    compiles in near-linear time, where the generic construction walks every live thread.
    """
    budget = budget_or_unlimited(budget)
    n_classes = alphabet.n_classes
    starts = finals = 0
    masks = [0] * n_classes
    offset = 0
    for sequence in sequences:
        starts |= 1 << offset
        for k, classes in enumerate(sequence):
            bit = 1 << (offset + k)
            for cls in classes:
                masks[cls] |= bit
        offset += len(sequence)
        finals |= 1 << (offset - 1)
    relevant = [c for c in range(n_classes) if masks[c]]
    # The classes that can continue a partial match ending at each position (to visit only those).
    continuing: list[tuple] = []
    for sequence in sequences:
        continuing.extend(tuple(sorted(classes)) for classes in sequence[1:])
        continuing.append(())
    words = 1 + offset // 64
    budget.spend(offset + n_classes + sum(map(len, continuing)))
    ids = {0: START_STATE}
    order = [0]
    rows = [np.full(n_classes, MATCH_STATE, np.int32), None]
    default_row = None
    index = 0
    while index < len(order):
        bits = order[index]
        index += 1
        if bits and bits.bit_count() < len(relevant):  # only classes that continue one of the bits
            visit: set = set()
            rest = bits
            while rest:
                low = rest & -rest
                visit.update(continuing[low.bit_length() - 1])
                rest ^= low
            row = default_row.copy()
        else:  # the start state, or more partial matches than classes: visit every class
            visit = relevant
            row = np.full(n_classes, START_STATE, np.int32)
        budget.spend(2 + n_classes // 64 + len(visit) * (1 + words // 16))
        shifted = (bits << 1) | starts
        for cls in visit:
            nxt = shifted & masks[cls]
            if nxt & finals:
                row[cls] = MATCH_STATE
                continue
            state = ids.get(nxt)
            if state is None:
                state = ids[nxt] = len(rows)
                if state > max_states:
                    raise AutomatonTooLargeError(f"more than {max_states} DFA states")
                order.append(nxt)
                rows.append(None)
            row[cls] = state
        rows[ids[bits]] = row
        if not bits:
            default_row = row  # a class no partial match continues goes where it goes from the start
    trans = np.vstack(rows).astype(np.int32)
    accept = np.zeros(len(rows), dtype=bool)
    accept[MATCH_STATE] = True
    return CharDFA(trans, accept, word_classes, alphabet)
