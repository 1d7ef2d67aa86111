"""Token automaton: for each reachable DFA state, where each token leads and which tokens it forbids.

Layer 6 of the compiler (DESIGN §2). For a "does not contain" DFA almost every token leads to the
same place whatever state it starts from, so we store per token its *default* destination (its
walk from the start state) and per state only the *exceptions*. They are found by walking the token
trie from state ``q`` and from the start state in lock-step, pruning a subtree as soon as both walks
reach the same DFA state (everything below behaves identically) or ``q``'s walk reaches MATCH
(everything below is forbidden: one rank range).

A token is *forbidden* from ``q`` iff its byte walk from ``q`` reaches MATCH or ends in a state
whose ``end_accept`` is set (DESIGN §1: prefix-safe and exact).

Tables (token states are numbered 0..S-1, start = 0; ranks index the trie's sorted tokens):
  * ``default_dest[r]``: state after rank ``r`` from the start, or -1 if forbidden from the start;
  * ``start_forbidden``: rank ranges forbidden from the start state;
  * per state ``q`` (CSR): ``exc_rank/exc_dest`` — allowed tokens whose destination differs from
    ``default_dest`` (sorted by rank; includes start-forbidden tokens that ``q`` allows, in which
    case ``has_override[q]``), and ``forb_lo/forb_hi`` — the forbidden rank ranges *within the
    region where q's walk differs from the start's*. Outside that region q forbids exactly what
    the start forbids. So: forbidden(q) = forb(q) ∪ (start_forbidden − allowed exceptions of q).
"""
from __future__ import annotations

import numba
import numpy as np

from .trie import TokenTrie
from .utf8 import ByteDFA

MATCH = 0


@numba.njit(cache=True)
def _walk_from_start(trans, end_accept, start, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi, skip, max_depth,
                     n_ranks):
    """The start state's walk: state per node, default destination per rank, forbidden ranges."""
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
            lo, hi = tok_lo[n], sub_hi[n]
            if nf > 0 and forb[nf - 1, 1] == lo:
                forb[nf - 1, 1] = hi
            else:
                forb[nf, 0] = lo
                forb[nf, 1] = hi
                nf += 1
            # every node below also reads MATCH
            for m in range(n + 1, skip[n]):
                node_state[m] = 0
            n = skip[n]
            continue
        if tok_hi[n] > tok_lo[n]:
            if end_accept[s]:
                lo, hi = tok_lo[n], tok_hi[n]
                if nf > 0 and forb[nf - 1, 1] == lo:
                    forb[nf - 1, 1] = hi
                else:
                    forb[nf, 0] = lo
                    forb[nf, 1] = hi
                    nf += 1
            else:
                for r in range(tok_lo[n], tok_hi[n]):
                    default_dest[r] = s
        stack[d] = s
        n += 1
    return node_state, default_dest, forb[:nf].copy()


@numba.njit(cache=True)
def _explore(q, trans, end_accept, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi, skip, max_depth, node_state,
             default_dest, out_exc, out_forb):
    """Lock-step walk from ``q`` against the start's walk; returns (n_exceptions, n_forbidden, override)."""
    n_nodes = len(trie_byte)
    stack = np.empty(max_depth + 1, np.int32)
    stack[0] = q
    ne = 0
    nf = 0
    override = False
    n = 1
    while n < n_nodes:
        d = trie_depth[n]
        s = trans[stack[d - 1], trie_byte[n]]
        if s == node_state[n]:
            n = skip[n]
            continue
        if s == 0:
            lo, hi = tok_lo[n], sub_hi[n]
            if nf > 0 and out_forb[nf - 1, 1] == lo:
                out_forb[nf - 1, 1] = hi
            else:
                out_forb[nf, 0] = lo
                out_forb[nf, 1] = hi
                nf += 1
            n = skip[n]
            continue
        if tok_hi[n] > tok_lo[n]:
            if end_accept[s]:
                lo, hi = tok_lo[n], tok_hi[n]
                if nf > 0 and out_forb[nf - 1, 1] == lo:
                    out_forb[nf - 1, 1] = hi
                else:
                    out_forb[nf, 0] = lo
                    out_forb[nf, 1] = hi
                    nf += 1
            else:
                for r in range(tok_lo[n], tok_hi[n]):
                    if default_dest[r] != s:
                        if default_dest[r] < 0:
                            override = True
                        out_exc[ne, 0] = r
                        out_exc[ne, 1] = s
                        ne += 1
        stack[d] = s
        n += 1
    return ne, nf, override


def _csr(parts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=ptr[1:])
    data = np.concatenate(parts) if parts else np.zeros((0, width), np.int32)
    return ptr, data.reshape(-1, width).astype(np.int32)


def build_token_automaton(dfa: ByteDFA, trie: TokenTrie, progress=None) -> dict[str, np.ndarray]:
    """Explore every DFA state reachable by whole tokens; return the tables described above.

    ``progress``, if given, is called as ``progress(done, total_so_far)`` while exploring.
    """
    trans, end_accept = dfa.trans, dfa.end_accept
    n_ranks = len(trie.rank_to_id)
    t = (trie.byte, trie.depth, trie.tok_lo, trie.tok_hi, trie.sub_hi, trie.skip, trie.max_depth)
    node_state, default_dest, start_forb = _walk_from_start(trans, end_accept, dfa.start, *t, n_ranks)

    compact = np.full(dfa.n_states, -1, np.int64)  # byte-DFA state -> token state
    order = [dfa.start]
    compact[dfa.start] = 0
    for s in np.unique(default_dest[default_dest >= 0]):
        if compact[s] < 0:
            compact[s] = len(order)
            order.append(int(s))
    out_exc = np.empty((n_ranks, 2), np.int32)
    out_forb = np.empty((n_ranks + 1, 2), np.int32)
    exc_parts, forb_parts, overrides = [], [], []
    i = 0
    while i < len(order):
        q = order[i]
        if q == dfa.start:
            ne, nf, override = 0, 0, False
        else:
            ne, nf, override = _explore(q, trans, end_accept, *t, node_state, default_dest, out_exc, out_forb)
        exc = out_exc[:ne].copy()
        for s in np.unique(exc[:, 1]):
            if compact[s] < 0:
                compact[s] = len(order)
                order.append(int(s))
        exc_parts.append(exc)
        forb_parts.append(out_forb[:nf].copy())
        overrides.append(override)
        i += 1
        if progress is not None and (i % 256 == 0 or i == len(order)):
            progress(i, len(order))

    exc_ptr, exc = _csr(exc_parts, 2)
    forb_ptr, forb = _csr(forb_parts, 2)
    return {
        "rank_to_id": trie.rank_to_id,
        "default_dest": np.where(default_dest >= 0, compact[np.maximum(default_dest, 0)], -1).astype(np.int32),
        "start_forbidden": start_forb.astype(np.int32),
        "exc_ptr": exc_ptr,
        "exc_rank": exc[:, 0].copy(),
        "exc_dest": compact[exc[:, 1]].astype(np.int32),
        "forb_ptr": forb_ptr,
        "forb_lo": forb[:, 0].copy(),
        "forb_hi": forb[:, 1].copy(),
        "has_override": np.array(overrides, dtype=np.bool_),
        "byte_state": np.array(order, dtype=np.int32),
    }
