"""Token automaton: for each reachable DFA state, where each token leads and which tokens it forbids.

Layer 6 of the compiler (DESIGN §2). For a "does not contain" DFA almost every token behaves the
same whatever state it starts from, so each state's forbidden set is stored relative to a
*reference* state: only the differences are kept. They are found by walking the token trie from
state ``q`` and from its reference in lock-step, pruning a subtree as soon as both walks reach the
same DFA state (everything below behaves identically) or ``q``'s walk reaches MATCH (everything
below is forbidden: one rank range, since the trie is in sorted-bytes order).

The start state is always a reference. Rules with gaps (``curl … | sh``) or counters
(``sk-[A-Za-z0-9]{20,}``) have states that persist across arbitrary text: measured against the
start, almost every token would differ. Such a state becomes a reference of its own when it
differs from the best existing reference on more than a threshold of tokens, and the states
discovered from it inherit it as their first candidate — so a family of such states shares one
reference and keeps small deltas. The same walks discover every state reachable by whole tokens.

A token is *forbidden* from ``q`` iff its byte walk from ``q`` reaches MATCH or ends in a state
whose ``end_accept`` is set (DESIGN §1: prefix-safe and exact).

Destinations are *not* stored: at run time the sampled token's bytes are walked through the byte
DFA (a few table lookups). What is stored is what the mask needs — forbidden sets:

  * ``state_ref[q]``: the reference of ``q``; ``ref_forb_*``: each reference's forbidden rank
    ranges (CSR by reference);
  * per state ``q`` (CSR): ``forb_lo/forb_hi`` — forbidden rank ranges *within the region where
    q's walk differs from its reference's*, and ``override`` — ranks the reference forbids but
    ``q`` allows (rare: only look-behind such as ``\\b`` or ``^`` makes a state more permissive).
    So: forbidden(q) = forb(q) ∪ (forbidden(ref(q)) − override(q));
  * ``byte_state[q]`` / ``compact[s]``: token state ↔ byte-DFA state.
"""
from __future__ import annotations

import numba
import numpy as np

from ..automata.utf8 import ByteDFA
from .trie import TokenTrie

MATCH = 0


@numba.njit(inline="always")
def _append_range(ranges, n, lo, hi):
    """Append [lo, hi) to the first ``n`` sorted ranges, merging with the last if adjacent."""
    if n > 0 and ranges[n - 1, 1] == lo:
        ranges[n - 1, 1] = hi
        return n
    ranges[n, 0] = lo
    ranges[n, 1] = hi
    return n + 1


@numba.njit(cache=True)
def _walk_from_start(trans, end_accept, start, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi, skip, max_depth,
                     n_ranks):
    """The walk from ``start`` (any DFA state): state per node, destination per rank, forbidden ranges."""
    n_nodes = len(trie_byte)
    node_state = np.zeros(n_nodes, np.int32)
    default_dest = np.full(n_ranks, -1, np.int32)
    forb = np.empty((n_ranks + 1, 2), np.int32)
    nf = 0
    stack = np.empty(max_depth + 1, np.int32)
    stack[0] = start
    node_state[0] = start
    n = 1
    while n < n_nodes:
        d = trie_depth[n]
        s = trans[stack[d - 1], trie_byte[n]]
        node_state[n] = s
        if s == 0:
            nf = _append_range(forb, nf, tok_lo[n], sub_hi[n])
            # every node below also reads MATCH
            for m in range(n + 1, skip[n]):
                node_state[m] = 0
            n = skip[n]
            continue
        if tok_hi[n] > tok_lo[n]:
            if end_accept[s]:
                nf = _append_range(forb, nf, tok_lo[n], tok_hi[n])
            else:
                for r in range(tok_lo[n], tok_hi[n]):
                    default_dest[r] = s
        stack[d] = s
        n += 1
    return node_state, default_dest, forb[:nf].copy()


@numba.njit(cache=True)
def _explore(q, trans, end_accept, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi, skip, max_depth, node_state,
             default_dest, seen, out_forb, out_override, out_new):
    """Lock-step walk from ``q`` against a reference's walk.

    Writes q's forbidden ranges inside the explored region, the ranks the reference forbids but q
    allows, and newly seen destination states (marking ``seen``). Returns
    ``(n_forbidden, n_override, n_new, n_differing)``; ``n_differing`` counts allowed tokens whose
    destination differs from the reference's (how costly this reference is for q).
    """
    n_nodes = len(trie_byte)
    stack = np.empty(max_depth + 1, np.int32)
    stack[0] = q
    nf = 0
    no = 0
    nn = 0
    differing = 0
    n = 1
    while n < n_nodes:
        d = trie_depth[n]
        s = trans[stack[d - 1], trie_byte[n]]
        if s == node_state[n]:
            n = skip[n]
            continue
        if s == 0:
            nf = _append_range(out_forb, nf, tok_lo[n], sub_hi[n])
            n = skip[n]
            continue
        if tok_hi[n] > tok_lo[n]:
            if end_accept[s]:
                nf = _append_range(out_forb, nf, tok_lo[n], tok_hi[n])
            else:
                if seen[s] == 0:
                    seen[s] = 1
                    out_new[nn] = s
                    nn += 1
                for r in range(tok_lo[n], tok_hi[n]):
                    if default_dest[r] != s:
                        differing += 1
                        if default_dest[r] < 0:
                            out_override[no] = r
                            no += 1
        stack[d] = s
        n += 1
    return nf, no, nn, differing


def _csr(parts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=ptr[1:])
    data = np.concatenate(parts) if parts else np.zeros((0, width), np.int32)
    return ptr, data.reshape(-1, width).astype(np.int32)


MAX_REFERENCES = 64


class _Reference:
    """A dense row: the walk of every trie node and every token from one DFA state."""

    def __init__(self, state: int, dfa: ByteDFA, trie_args: tuple, n_ranks: int):
        self.state = state
        self.node_state, self.default_dest, self.forbidden = _walk_from_start(
            dfa.trans, dfa.end_accept, state, *trie_args, n_ranks)


def build_token_automaton(dfa: ByteDFA, trie: TokenTrie, progress=None) -> dict[str, np.ndarray]:
    """Explore every DFA state reachable by whole tokens; return the tables described above.

    ``progress``, if given, is called as ``progress(done, total_so_far)`` while exploring.
    """
    trans, end_accept = dfa.trans, dfa.end_accept
    n_ranks = len(trie.rank_to_id)
    t = (trie.byte, trie.depth, trie.tok_lo, trie.tok_hi, trie.sub_hi, trie.skip, trie.max_depth)
    # A state becomes a reference when measuring it against the existing ones costs more than this.
    threshold = max(2048, n_ranks // 16)

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
