"""The token automaton's original driver (a Python loop over states), kept as a test oracle.

:func:`safedecode.tokens.token_automaton.build_token_automaton` runs the same exploration inside one
numba loop; tests/test_compile_speed_equivalence.py checks that both build identical tables. This
is the code of ``safedecode/tokens/token_automaton.py`` before that change (commit a781579), calling
the same numba walks.
"""
from __future__ import annotations

import numpy as np

from safedecode.automata.utf8 import ByteDFA
from safedecode.tokens.token_automaton import _append_range, _csr, _explore, _walk_from_start  # shared walks
from safedecode.tokens.trie import TokenTrie


MAX_REFERENCES = 64


class _Reference:
    """A dense row: the walk of every trie node and every token from one DFA state."""

    def __init__(self, state: int, dfa: ByteDFA, trie_args: tuple, n_ranks: int):
        self.state = state
        self.node_state, self.default_dest, self.forbidden = _walk_from_start(
            dfa.trans, dfa.end_accept, state, *trie_args, n_ranks)


def build_token_automaton(dfa: ByteDFA, trie: TokenTrie, progress=None, threshold=None) -> dict[str, np.ndarray]:
    """Explore every DFA state reachable by whole tokens; return the tables described above.

    ``progress``, if given, is called as ``progress(done, total_so_far)`` while exploring.
    """
    trans, end_accept = dfa.trans, dfa.end_accept
    n_ranks = len(trie.rank_to_id)
    t = (trie.byte, trie.depth, trie.tok_lo, trie.tok_hi, trie.sub_hi, trie.skip, trie.max_depth)
    # A state becomes a reference when measuring it against the existing ones costs more than this.
    threshold = max(2048, n_ranks // 16) if threshold is None else threshold

    seen = np.zeros(dfa.n_states, np.uint8)
    order: list[int] = []
    hint: list[int] = []  # per token state: the reference its discoverer used

    def discover(states, via_ref: int) -> None:
        for s in states:
            order.append(int(s))
            hint.append(via_ref)

    def new_reference(state: int) -> int:
        references.append(_Reference(state, dfa, t, n_ranks))
        dests = np.unique(references[-1].default_dest)
        dests = dests[dests >= 0]
        fresh = dests[seen[dests] == 0]
        seen[fresh] = 1
        discover(fresh, len(references) - 1)
        return len(references) - 1

    references: list[_Reference] = []
    seen[dfa.start] = 1
    discover([dfa.start], 0)
    new_reference(dfa.start)
    out_forb = np.empty((n_ranks + 1, 2), np.int32)
    out_override = np.empty(n_ranks, np.int32)
    out_new = np.empty(dfa.n_states, np.int32)
    forb_parts, override_parts, state_ref = [], [], []
    empty = np.empty(0, np.int32)
    i = 0
    while i < len(order):
        q = order[i]
        best = None
        for ref_index in dict.fromkeys((hint[i], 0)):
            if best is not None and best[0] <= threshold:
                break  # the inherited reference is good enough: skip measuring against the start
            ref = references[ref_index]
            if ref.state == q:
                best = (0, ref_index, np.empty((0, 2), np.int32), empty)
                break
            nf, no, nn, differing = _explore(q, trans, end_accept, *t, ref.node_state, ref.default_dest, seen,
                                             out_forb, out_override, out_new)
            discover(out_new[:nn], ref_index)
            if best is None or differing < best[0]:
                best = (differing, ref_index, out_forb[:nf].copy(), out_override[:no].copy())
        if best[0] > threshold and len(references) < MAX_REFERENCES:
            best = (0, new_reference(q), np.empty((0, 2), np.int32), empty)
        _, ref_index, forb, override = best
        forb_parts.append(forb)
        override_parts.append(override)
        state_ref.append(ref_index)
        i += 1
        if progress is not None and (i % 256 == 0 or i == len(order)):
            progress(i, len(order))

    forb_ptr, forb = _csr(forb_parts, 2)
    override_ptr = np.zeros(len(override_parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in override_parts], out=override_ptr[1:])
    ref_forb_ptr, ref_forb = _csr([ref.forbidden for ref in references], 2)
    compact = np.full(dfa.n_states, -1, np.int32)
    compact[np.array(order, dtype=np.int64)] = np.arange(len(order), dtype=np.int32)
    return {
        "rank_to_id": trie.rank_to_id,
        "state_ref": np.array(state_ref, dtype=np.int32),
        "ref_forb_ptr": ref_forb_ptr,
        "ref_forb_lo": ref_forb[:, 0].copy(),
        "ref_forb_hi": ref_forb[:, 1].copy(),
        "forb_ptr": forb_ptr,
        "forb_lo": forb[:, 0].copy(),
        "forb_hi": forb[:, 1].copy(),
        "override_ptr": override_ptr,
        "override": np.concatenate(override_parts) if override_parts else empty,
        "byte_state": np.array(order, dtype=np.int32),
        "compact": compact,
        "n_references": np.array([len(references)], dtype=np.int32),
    }
