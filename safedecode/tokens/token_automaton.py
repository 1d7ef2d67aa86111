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
def _byte_class_map(trans):
    """``class_of[byte]``: bytes whose columns of ``trans`` are identical share a class (a column hash
    proposes the classes; a second pass verifies every column against its class's first, and a
    byte that differs gets a class of its own — exact, never merging distinct columns)."""
    n_states = trans.shape[0]
    h = np.zeros(256, np.uint64)
    for s in range(n_states):
        for b in range(256):
            h[b] = h[b] * np.uint64(1000003) + np.uint64(trans[s, b] + 1)
    class_of = np.empty(256, np.int32)
    first = np.empty(256, np.int32)  # first byte of each class
    n_classes = 0
    for b in range(256):
        c = -1
        for k in range(n_classes):
            if h[first[k]] == h[b]:
                c = k
                break
        if c < 0:
            c = n_classes
            first[c] = b
            n_classes += 1
        class_of[b] = c
    differs = np.zeros(256, np.bool_)
    for s in range(n_states):
        for b in range(256):
            if trans[s, b] != trans[s, first[class_of[b]]]:
                differs[b] = True
    for b in range(256):
        if differs[b]:
            first[n_classes] = b
            class_of[b] = n_classes
            n_classes += 1
    return class_of, first[:n_classes].copy()


def byte_classes(trans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge the bytes no state of ``trans`` (states × 256) tells apart (regex-automata's byte
    classes): returns ``(columns, class_of)``, the distinct columns of ``trans`` (states × classes,
    contiguous, in order of each class's first byte) and, per byte, its class. Exact: two bytes share
    a class iff their columns are identical."""
    class_of, firsts = _byte_class_map(trans)
    return np.ascontiguousarray(trans[:, firsts]), class_of


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
CHUNK = 1024  # states explored per call of the numba loop (between progress reports)

# What ``_drive`` stopped for.
_DONE, _NEW_REFERENCE, _GROW = 0, 1, 2


@numba.njit(cache=True)
def _fresh_destinations(default_dest, seen):
    """The states ``default_dest`` reaches that are not ``seen`` yet, ascending; marks them seen."""
    mark = np.zeros(len(seen), np.uint8)
    n = 0
    for r in range(len(default_dest)):
        d = default_dest[r]
        if d >= 0 and seen[d] == 0 and mark[d] == 0:
            mark[d] = 1
            n += 1
    out = np.empty(n, np.int32)
    k = 0
    for s in range(len(seen)):
        if mark[s]:
            out[k] = s
            seen[s] = 1
            k += 1
    return out


@numba.njit(cache=True)
def _drive(i, stop, n_order, order, hint, seen, state_ref, trans, end_accept, trie_byte, trie_depth, tok_lo,
           tok_hi, sub_hi, skip, max_depth, ref_state, ref_node_state, ref_default_dest, n_refs, max_refs,
           threshold, forb_count, forb_data, n_forb, override_count, override_data, n_override, forb_a, override_a,
           forb_b, override_b, out_new):
    """Explore token states ``order[i:]`` until ``stop`` (the loop ``build_token_automaton`` describes).

    For each state: measure it against the reference its discoverer used (``hint``), then against
    the start's if that costs more than ``threshold``; keep the cheaper (the first on a tie). States
    discovered on the way are appended to ``order`` with the reference they were found through.
    Returns ``(i, n_order, n_forb, n_override, why)``; ``why`` is ``_NEW_REFERENCE`` when state
    ``order[i]`` must become a reference (done by the caller, which then records state ``i``),
    ``_GROW`` when the output arrays may not hold one more state, ``_DONE`` otherwise.
    """
    n_ranks = len(ref_default_dest[0])
    while i < n_order and i < stop:
        if len(forb_data) - n_forb < n_ranks + 1 or len(override_data) - n_override < n_ranks:
            return i, n_order, n_forb, n_override, _GROW
        q = order[i]
        best_diff = -1
        best_ref = -1
        best_nf = 0
        best_no = 0
        best_in_a = True
        first = hint[i]
        for attempt in range(2):
            ref = first if attempt == 0 else 0
            if attempt == 1 and (first == 0 or best_diff <= threshold):
                break
            if ref_state[ref] == q:
                best_diff, best_ref, best_nf, best_no = 0, ref, 0, 0
                break
            into_a = attempt == 0 or not best_in_a
            if into_a:
                nf, no, nn, differing = _explore(q, trans, end_accept, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi,
                                                 skip, max_depth, ref_node_state[ref], ref_default_dest[ref], seen,
                                                 forb_a, override_a, out_new)
            else:
                nf, no, nn, differing = _explore(q, trans, end_accept, trie_byte, trie_depth, tok_lo, tok_hi, sub_hi,
                                                 skip, max_depth, ref_node_state[ref], ref_default_dest[ref], seen,
                                                 forb_b, override_b, out_new)
            for k in range(nn):
                order[n_order] = out_new[k]
                hint[n_order] = ref
                n_order += 1
            if best_ref < 0 or differing < best_diff:
                best_diff, best_ref, best_nf, best_no, best_in_a = differing, ref, nf, no, into_a
        if best_diff > threshold and n_refs < max_refs:
            return i, n_order, n_forb, n_override, _NEW_REFERENCE
        state_ref[i] = best_ref
        forb_count[i] = best_nf
        override_count[i] = best_no
        if best_in_a:
            forb_data[n_forb:n_forb + best_nf] = forb_a[:best_nf]
            override_data[n_override:n_override + best_no] = override_a[:best_no]
        else:
            forb_data[n_forb:n_forb + best_nf] = forb_b[:best_nf]
            override_data[n_override:n_override + best_no] = override_b[:best_no]
        n_forb += best_nf
        n_override += best_no
        i += 1
    return i, n_order, n_forb, n_override, _DONE


def _grown(array: np.ndarray, length: int) -> np.ndarray:
    out = np.empty((length,) + array.shape[1:], array.dtype)
    out[:len(array)] = array
    return out


def build_token_automaton(dfa: ByteDFA, trie: TokenTrie, progress=None, threshold=None) -> dict[str, np.ndarray]:
    """Explore every DFA state reachable by whole tokens; return the tables described above.

    The exploration runs in one numba loop (:func:`_drive`), left only to make a new reference, to
    grow the output arrays, and every :data:`CHUNK` states to call ``progress(done, total_so_far)``
    if given. States are explored in discovery order; each is measured against the reference its
    discoverer used and, if that costs more than the threshold, against the start's; a state that
    differs from both on more than the threshold becomes a reference (up to :data:`MAX_REFERENCES`).
    ``threshold`` (tokens; default ``max(2048, ranks // 16)``) is for tests.
    """
    end_accept = dfa.end_accept
    n_states = dfa.n_states
    n_ranks = len(trie.rank_to_id)
    # The walks read the DFA through its byte classes: rows of a few dozen columns instead of 256
    # (a tenth of the memory for phrase lists), and each trie node's byte as its class.
    columns, class_of = byte_classes(dfa.trans)
    t = (class_of.astype(np.uint8)[trie.byte], trie.depth, trie.tok_lo, trie.tok_hi, trie.sub_hi, trie.skip,
         trie.max_depth)
    # A state becomes a reference when measuring it against the existing ones costs more than this.
    threshold = max(2048, n_ranks // 16) if threshold is None else threshold

    seen = np.zeros(n_states, np.uint8)
    order = np.empty(n_states, np.int32)  # token states in discovery order (each state at most once)
    hint = np.empty(n_states, np.int32)  # per token state: the reference its discoverer used
    state_ref = np.empty(n_states, np.int32)
    forb_count = np.zeros(n_states, np.int64)
    override_count = np.zeros(n_states, np.int64)
    forb_data = np.empty((4 * (n_ranks + 1), 2), np.int32)
    override_data = np.empty(4 * (n_ranks + 1), np.int32)
    n_forb = n_override = 0
    capacity = 4
    ref_state = np.full(MAX_REFERENCES, -1, np.int32)
    ref_node_state = np.empty((capacity, trie.n_nodes), np.int32)
    ref_default_dest = np.empty((capacity, n_ranks), np.int32)
    ref_forbidden: list[np.ndarray] = []

    def new_reference(state: int, n_order: int) -> int:
        nonlocal capacity, ref_node_state, ref_default_dest
        k = len(ref_forbidden)
        if k == capacity:
            capacity = min(2 * capacity, MAX_REFERENCES)
            ref_node_state = _grown(ref_node_state, capacity)
            ref_default_dest = _grown(ref_default_dest, capacity)
        node_state, default_dest, forbidden = _walk_from_start(columns, end_accept, state, *t, n_ranks)
        ref_state[k], ref_node_state[k], ref_default_dest[k] = state, node_state, default_dest
        ref_forbidden.append(forbidden)
        fresh = _fresh_destinations(default_dest, seen)
        order[n_order:n_order + len(fresh)] = fresh
        hint[n_order:n_order + len(fresh)] = k
        return n_order + len(fresh)

    seen[dfa.start] = 1
    order[0], hint[0] = dfa.start, 0
    n_order = new_reference(dfa.start, 1)
    out_forb = np.empty((n_ranks + 1, 2), np.int32)
    out_override = np.empty(n_ranks, np.int32)
    out_forb_b = np.empty((n_ranks + 1, 2), np.int32)
    out_override_b = np.empty(n_ranks, np.int32)
    out_new = np.empty(n_states, np.int32)
    i = 0
    reported = 0
    while i < n_order:
        i, n_order, n_forb, n_override, why = _drive(
            i, i + CHUNK, n_order, order, hint, seen, state_ref, columns, end_accept, *t, ref_state, ref_node_state,
            ref_default_dest, len(ref_forbidden), MAX_REFERENCES, threshold, forb_count, forb_data, n_forb,
            override_count, override_data, n_override, out_forb, out_override, out_forb_b, out_override_b, out_new)
        if why == _NEW_REFERENCE:
            state_ref[i] = len(ref_forbidden)
            n_order = new_reference(int(order[i]), n_order)
            i += 1
        elif why == _GROW:
            forb_data = _grown(forb_data, 2 * len(forb_data))
            override_data = _grown(override_data, 2 * len(override_data))
        if progress is not None and (i - reported >= 256 or i == n_order):
            reported = i
            progress(i, n_order)

    forb_ptr = np.zeros(n_order + 1, dtype=np.int64)
    np.cumsum(forb_count[:n_order], out=forb_ptr[1:])
    override_ptr = np.zeros(n_order + 1, dtype=np.int64)
    np.cumsum(override_count[:n_order], out=override_ptr[1:])
    ref_forb_ptr, ref_forb = _csr(ref_forbidden, 2)
    byte_state = order[:n_order].copy()
    compact = np.full(n_states, -1, np.int32)
    compact[byte_state] = np.arange(n_order, dtype=np.int32)
    return {
        "rank_to_id": trie.rank_to_id,
        "state_ref": state_ref[:n_order].copy(),
        "ref_forb_ptr": ref_forb_ptr,
        "ref_forb_lo": ref_forb[:, 0].copy(),
        "ref_forb_hi": ref_forb[:, 1].copy(),
        "forb_ptr": forb_ptr,
        "forb_lo": forb_data[:n_forb, 0].copy(),
        "forb_hi": forb_data[:n_forb, 1].copy(),
        "override_ptr": override_ptr,
        "override": override_data[:n_override].copy(),
        "byte_state": byte_state,
        "compact": compact,
        "n_references": np.array([len(ref_forbidden)], dtype=np.int32),
    }


# ------------------------------------------------------------------------------- mask layouts
# ``build_token_automaton`` stores every state relative to a reference. That is compact for "does
# not contain" rules, whose states forbid a few tokens; a structured-output rule (a whole JSON
# document) has states that forbid almost every token, and states that allow almost every token
# measured against a reference that forbids almost every one (tens of thousands of overrides per
# state). ``choose_layouts`` rewrites each state in the cheapest of three layouts, written in its
# ``state_ref``:
#   * ``>= 0`` (a reference, as built): forbidden = forb ∪ (forbidden(ref) − override);
#   * ``NO_REFERENCE``: forbidden = its own forb ranges (when no larger than its delta);
#   * ``COMPLEMENT``: the forb ranges are the ranks it *allows* (when it forbids at least
#     ``complement_min`` ranks): the kernel fills the row with -inf and puts the allowed ids back.
# References no delta state uses any more are dropped. The forbidden set of every state is
# unchanged (tests/test_mask_layout.py checks the masks against the walk of every token).
NO_REFERENCE = -1
COMPLEMENT = -2


@numba.njit(cache=True)
def _forbidden_ranks(q, state_ref, ref_ptr, ref_lo, ref_hi, forb_ptr, forb_lo, forb_hi, override_ptr, override,
                     out):
    """``out[r] = 1`` iff rank ``r`` is forbidden from ``q`` (the reference layout)."""
    out[:] = 0
    ref = state_ref[q]
    for k in range(ref_ptr[ref], ref_ptr[ref + 1]):
        out[ref_lo[k]:ref_hi[k]] = 1
    for j in range(override_ptr[q], override_ptr[q + 1]):
        out[override[j]] = 0
    for k in range(forb_ptr[q], forb_ptr[q + 1]):
        out[forb_lo[k]:forb_hi[k]] = 1


@numba.njit(cache=True)
def _runs(bits, value, lo_out, hi_out, n):
    """Append the runs of ``value`` in ``bits`` as [lo, hi) at ``n``; returns the new count."""
    r = 0
    n_ranks = len(bits)
    while r < n_ranks:
        if bits[r] != value:
            r += 1
            continue
        start = r
        while r < n_ranks and bits[r] == value:
            r += 1
        lo_out[n] = start
        hi_out[n] = r
        n += 1
    return n


@numba.njit(cache=True)
def _layouts(n_ranks, state_ref, ref_ptr, ref_lo, ref_hi, forb_ptr, forb_lo, forb_hi, override_ptr, override,
             complement_min):
    """Per state: its layout (a reference, NO_REFERENCE or COMPLEMENT) and how many ranges it stores."""
    n = len(state_ref)
    bits = np.empty(n_ranks, np.uint8)
    kind = np.empty(n, np.int32)
    count = np.zeros(n, np.int64)
    ref_count = np.zeros(len(ref_ptr) - 1, np.int64)  # ranks each reference forbids
    for ref in range(len(ref_count)):
        for k in range(ref_ptr[ref], ref_ptr[ref + 1]):
            ref_count[ref] += ref_hi[k] - ref_lo[k]
    for q in range(n):
        at_most = ref_count[state_ref[q]]
        for k in range(forb_ptr[q], forb_ptr[q + 1]):
            at_most += forb_hi[k] - forb_lo[k]
        if override_ptr[q + 1] == override_ptr[q] and at_most < complement_min:
            # No override and too few forbidden ranks for the complement: kept as built, decided
            # without an O(ranks) pass (the states of phrase lists and most secret rules).
            kind[q] = state_ref[q]
            count[q] = forb_ptr[q + 1] - forb_ptr[q]
            continue
        _forbidden_ranks(q, state_ref, ref_ptr, ref_lo, ref_hi, forb_ptr, forb_lo, forb_hi, override_ptr,
                         override, bits)
        n_forbidden = 0
        runs_forbidden = 0
        runs_allowed = 0
        prev = 2
        for r in range(n_ranks):
            b = bits[r]
            n_forbidden += b
            if b != prev:
                if b:
                    runs_forbidden += 1
                else:
                    runs_allowed += 1
                prev = b
        delta = 2 * (forb_ptr[q + 1] - forb_ptr[q]) + (override_ptr[q + 1] - override_ptr[q])
        if n_forbidden >= complement_min:
            kind[q] = COMPLEMENT
            count[q] = runs_allowed
        elif 2 * runs_forbidden <= delta:
            kind[q] = NO_REFERENCE
            count[q] = runs_forbidden
        else:
            kind[q] = state_ref[q]
            count[q] = forb_ptr[q + 1] - forb_ptr[q]
    return kind, count


@numba.njit(cache=True)
def _write_layouts(n_ranks, state_ref, ref_ptr, ref_lo, ref_hi, forb_ptr, forb_lo, forb_hi, override_ptr, override,
                   kind, new_ptr, new_lo, new_hi, new_override_ptr, new_override):
    bits = np.empty(n_ranks, np.uint8)
    n_override = 0
    for q in range(len(state_ref)):
        n = new_ptr[q]
        new_override_ptr[q] = n_override
        if kind[q] >= 0:  # as built
            for k in range(forb_ptr[q], forb_ptr[q + 1]):
                new_lo[n] = forb_lo[k]
                new_hi[n] = forb_hi[k]
                n += 1
            for j in range(override_ptr[q], override_ptr[q + 1]):
                new_override[n_override] = override[j]
                n_override += 1
            continue
        _forbidden_ranks(q, state_ref, ref_ptr, ref_lo, ref_hi, forb_ptr, forb_lo, forb_hi, override_ptr,
                         override, bits)
        _runs(bits, 0 if kind[q] == COMPLEMENT else 1, new_lo, new_hi, n)
    new_override_ptr[len(state_ref)] = n_override
    return n_override


def choose_layouts(tables: dict[str, np.ndarray], n_ranks: int, complement_min: int | None = None) -> dict:
    """``tables`` (from :func:`build_token_automaton`) with each state in its cheapest layout (see
    above); ``complement_min`` (default: more than half of the ranks) is the number of forbidden
    ranks from which a state is stored by its allowed ranks. Adds ``n_complement`` (states so stored)."""
    complement_min = n_ranks // 2 + 1 if complement_min is None else complement_min
    args = (np.int64(n_ranks), tables["state_ref"].astype(np.int32), tables["ref_forb_ptr"].astype(np.int64),
            tables["ref_forb_lo"].astype(np.int32), tables["ref_forb_hi"].astype(np.int32),
            tables["forb_ptr"].astype(np.int64), tables["forb_lo"].astype(np.int32),
            tables["forb_hi"].astype(np.int32), tables["override_ptr"].astype(np.int64),
            tables["override"].astype(np.int32))
    kind, count = _layouts(*args, np.int64(complement_min))
    n_states = len(kind)
    new_ptr = np.zeros(n_states + 1, np.int64)
    np.cumsum(count, out=new_ptr[1:])
    new_lo = np.empty(new_ptr[-1], np.int32)
    new_hi = np.empty(new_ptr[-1], np.int32)
    delta = kind >= 0
    new_override_ptr = np.zeros(n_states + 1, np.int64)
    new_override = np.empty(int(np.diff(tables["override_ptr"])[delta].sum()), np.int32)
    _write_layouts(*args, kind, new_ptr, new_lo, new_hi, new_override_ptr, new_override)
    # Keep only the references some delta state still uses, renumbered in order.
    used = np.unique(kind[delta])
    renumber = np.full(len(tables["ref_forb_ptr"]), -1, np.int32)
    renumber[used] = np.arange(len(used), dtype=np.int32)
    state_ref = np.where(delta, renumber[np.maximum(kind, 0)], kind).astype(np.int32)
    ref_ptr = tables["ref_forb_ptr"]
    parts = [np.stack([tables["ref_forb_lo"][ref_ptr[r]:ref_ptr[r + 1]], tables["ref_forb_hi"][ref_ptr[r]:ref_ptr[r + 1]]],
                      axis=1) for r in used]
    ref_forb_ptr, ref_forb = _csr(parts, 2)
    out = dict(tables)
    out.update(state_ref=state_ref, ref_forb_ptr=ref_forb_ptr, ref_forb_lo=ref_forb[:, 0].copy(),
               ref_forb_hi=ref_forb[:, 1].copy(), forb_ptr=new_ptr, forb_lo=new_lo, forb_hi=new_hi,
               override_ptr=new_override_ptr, override=new_override,
               n_references=np.array([len(used)], dtype=np.int32),
               n_complement=np.array([int((kind == COMPLEMENT).sum())], dtype=np.int32))
    return out
