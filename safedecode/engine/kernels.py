"""The hot loop: numba kernels that advance row states and mask forbidden token ids.

All tables of a compiled policy (one set per component automaton, plus the vocabulary's token
bytes) are packed into one read-only, self-describing int32 ``blob``: ``blob[0]`` is the number of
components, ``blob[1]`` the header width, then one header row per component holding the
[start, end) bounds of its segments. A kernel call therefore passes a handful of arguments
(numba's dispatch costs ~0.3 µs per argument, a large share of a 5 µs budget). Logits are written through an integer view of the tensor's memory
(``ninf`` is the bit pattern of -inf for its dtype), so float32, float16 and bfloat16 share one
kernel and nothing is copied.

A state's forbidden ids are stored in one of three layouts (``state_ref``; see
tokens/token_automaton.choose_layouts): against a reference state (its forbidden rank ranges plus
this state's differences), by its own forbidden rank ranges (``NO_REFERENCE``), or — for a state
that forbids more than half of the ranks, as a structured output's do — by the rank ranges it
*allows* (``COMPLEMENT``): the kernel saves the values of the ids that stay (allowed ranks, ids
without rank, padding beyond the vocabulary), fills the whole row with ``ninf`` and puts them back,
so what another component masked before stays masked and the mask is the same in every layout.

``id_to_rank`` is -1 for ids without text (EOS, allowed special tokens: the state is unchanged) and
-2 for special ids the policy forbids everywhere.

Token states: ``0`` is the start; ``-1`` means "a forbidden token was sampled anyway" (another
processor re-enabled it, or the caller bypassed the mask): such a row fails closed — everything but
EOS is masked so the sequence ends.
"""
from __future__ import annotations

import numba
import numpy as np

# Segment numbers inside the blob (see pack_tables).
(ID_TO_RANK, RANK_TO_ID, TOKEN_OFFSETS, TOKEN_BYTES, EOS_IDS,  # shared by all components
 BYTE_CLASS, TRANS, END_ACCEPT, COMPACT, BYTE_STATE, STATE_REF, REF_FORB_PTR, REF_FORB_LO, REF_FORB_HI,
 FORB_PTR, FORB_LO, FORB_HI, OVERRIDE_PTR, OVERRIDE, N_CLASSES,
 STATIC_FORBIDDEN,  # shared: special ids forbidden in every state (policy.special_tokens = "forbid")
 EOS_BLOCKED,  # per token state: 1 inside an unfinished block (EOS masked)
 UNRANKED) = range(23)  # shared: the ids below the vocabulary size that have no rank (no text)
SEGMENTS = ("id_to_rank", "rank_to_id", "token_offsets", "token_bytes", "eos_ids",
            "byte_class", "trans", "end_accept", "compact", "byte_state", "state_ref", "ref_forb_ptr",
            "ref_forb_lo", "ref_forb_hi", "forb_ptr", "forb_lo", "forb_hi", "override_ptr", "override", "n_classes",
            "static_forbidden", "eos_blocked", "unranked")
SHARED_SEGMENTS = frozenset(SEGMENTS[:5] + ("static_forbidden", "unranked"))
FORBIDDEN_SPECIAL = -2  # id_to_rank of a special id that is forbidden in every state
HEADER_START = 2

VIOLATED = -1

# ``state_ref`` of a state not stored against a reference (see tokens/token_automaton.choose_layouts):
NO_REFERENCE = -1  # its forb ranges are all it forbids
COMPLEMENT = -2  # its forb ranges are the ranks it *allows*: everything else is forbidden

# Bit patterns of -inf, per logits dtype, read through a same-width integer view.
NEG_INF_BITS = {"float32": np.int32(-8388608), "float16": np.int16(-1024), "bfloat16": np.int16(-128),
                "float64": np.int64(-4503599627370496)}


def pack_tables(components: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Concatenate each component's named int tables into one self-describing int32 blob."""
    width = 2 * len(SEGMENTS)
    headers = np.zeros((len(components), width), dtype=np.int64)
    parts = []
    offset = HEADER_START + headers.size
    for k, tables in enumerate(components):
        for j, name in enumerate(SEGMENTS):
            if k > 0 and name in SHARED_SEGMENTS:  # same trie and vocabulary: store once
                headers[k, 2 * j:2 * j + 2] = headers[0, 2 * j:2 * j + 2]
                continue
            part = np.asarray(tables[name]).astype(np.int32).ravel()
            headers[k, 2 * j] = offset
            offset += len(part)
            headers[k, 2 * j + 1] = offset
            parts.append(part)
    if offset >= 2**31:
        raise OverflowError("compiled policy tables exceed 2**31 entries")
    blob = np.concatenate([np.array([len(components), width], np.int32), headers.ravel().astype(np.int32)] + parts)
    blob.flags.writeable = False
    return blob


def unpack_tables(blob: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`pack_tables`: each component's named tables (views into ``blob``)."""
    width = int(blob[1])
    tables = []
    for k in range(int(blob[0])):
        header = blob[HEADER_START + k * width:HEADER_START + (k + 1) * width]
        tables.append({name: blob[header[2 * j]:header[2 * j + 1]] for j, name in enumerate(SEGMENTS)})
    return tables


def n_components(blob: np.ndarray) -> int:
    return int(blob[0])


@numba.njit(inline="always")
def _header(blob, k):
    width = blob[1]
    start = HEADER_START + k * width
    return blob[start:start + width]


@numba.njit(inline="always")
def _seg(blob, header, k):
    return blob[header[2 * k]:header[2 * k + 1]]


# The per-token kernels below read the blob through scalar offsets (``_at``/``_end``), never
# through slices: a slice of an array argument is a new array whose reference count numba updates
# atomically, ~10 ns per slice and ~10 slices per call, which made an empty mask cost ~160 ns.
@numba.njit(inline="always")
def _at(blob, k, segment):
    """Where ``segment`` of component ``k`` starts in ``blob``."""
    return blob[HEADER_START + k * blob[1] + 2 * segment]


@numba.njit(inline="always")
def _end(blob, k, segment):
    """Where ``segment`` of component ``k`` ends in ``blob``."""
    return blob[HEADER_START + k * blob[1] + 2 * segment + 1]


@numba.njit(cache=True)
def _find(sorted_values, lo, hi, value):
    """Index of ``value`` in ``sorted_values[lo:hi]``, or -1."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = sorted_values[mid]
        if v < value:
            lo = mid + 1
        elif v > value:
            hi = mid
        else:
            return mid
    return -1


@numba.njit(cache=True)
def next_state(blob, component, state, token):
    """The state of ``component`` after ``token``: its bytes walked through the byte DFA.

    Tokens without text leave the state unchanged; a token that reaches MATCH or ends where the
    text matches gives VIOLATED, which is absorbing.
    """
    id_to_rank = _at(blob, component, ID_TO_RANK)
    if state < 0 or token < 0 or token >= _end(blob, component, ID_TO_RANK) - id_to_rank:
        return state
    rank = blob[id_to_rank + token]
    if rank < 0:
        return VIOLATED if rank == FORBIDDEN_SPECIAL else state
    offsets = _at(blob, component, TOKEN_OFFSETS)
    token_bytes = _at(blob, component, TOKEN_BYTES)
    byte_class = _at(blob, component, BYTE_CLASS)
    trans = _at(blob, component, TRANS)
    n_classes = blob[_at(blob, component, N_CLASSES)]
    s = blob[_at(blob, component, BYTE_STATE) + state]
    for j in range(blob[offsets + token], blob[offsets + token + 1]):
        s = blob[trans + s * n_classes + blob[byte_class + blob[token_bytes + j]]]
        if s == 0:
            return VIOLATED
    if blob[_at(blob, component, END_ACCEPT) + s] != 0:
        return VIOLATED
    t = blob[_at(blob, component, COMPACT) + s]
    return t if t >= 0 else VIOLATED


@numba.njit(cache=True)
def _keep_allowed(row, ninf, rank_to_id, allowed_lo, allowed_hi, a, b, unranked, n_ids):
    """Mask every ranked id but those of the allowed rank ranges ``[a, b)``: save the values of the
    ids that stay (the allowed ones, the ids without rank, the padding ids >= ``n_ids``), write
    ``ninf`` over the whole row, put the saved values back. What another component masked before
    is saved as ``ninf`` and stays masked; the static and EOS rules are applied after, as for any
    state."""
    vocab = len(row)
    n = 0
    for k in range(a, b):
        n += allowed_hi[k] - allowed_lo[k]
    pad = vocab - n_ids if vocab > n_ids else 0
    saved = np.empty(n + len(unranked) + pad, row.dtype)
    m = 0
    for k in range(a, b):
        for r in range(allowed_lo[k], allowed_hi[k]):
            token = rank_to_id[r]
            if token < vocab:
                saved[m] = row[token]
                m += 1
    for token in unranked:
        if token < vocab:
            saved[m] = row[token]
            m += 1
    for j in range(pad):
        saved[m + j] = row[n_ids + j]
    row[:] = ninf
    m = 0
    for k in range(a, b):
        for r in range(allowed_lo[k], allowed_hi[k]):
            token = rank_to_id[r]
            if token < vocab:
                row[token] = saved[m]
                m += 1
    for token in unranked:
        if token < vocab:
            row[token] = saved[m]
            m += 1
    for j in range(pad):
        row[n_ids + j] = saved[m + j]


@numba.njit(cache=True)
def mask_row(blob, component, state, row, ninf):
    """Write ``ninf`` into every id ``component`` forbids from ``state`` (all non-EOS ids if VIOLATED).

    That is: the tokens whose bytes create a match, the special ids forbidden everywhere, and EOS
    when ``state`` is inside an unfinished block.
    """
    _mask_row(blob, component, state, row, ninf, None, 0)


@numba.njit(cache=True)
def _forbid(row, ninf, out, n, token):
    """Forbid ``token``: write ``ninf`` into ``row`` (``out`` is None: numba prunes the other
    branch), or append it to ``out[:n]`` and return the new count (-1 once ``out`` is full)."""
    if out is None:
        row[token] = ninf
        return n
    if n < 0 or n >= len(out):
        return -1
    out[n] = token
    return n + 1


@numba.njit(cache=True)
def _mask_row(blob, k, state, row, ninf, out, n):
    """:func:`mask_row`, or with an ``out`` array the ids it would write, appended to ``out[:n]``
    (returns the new count; -1 for a state that masks by filling the row — VIOLATED or
    COMPLEMENT — or when ``out`` is full). ``row`` gives the width (ids beyond it are skipped)."""
    rank_to_id = _at(blob, k, RANK_TO_ID)
    vocab = len(row)
    if n < 0:
        return n
    if state < 0:
        if out is not None:
            return -1
        eos = _seg(blob, _header(blob, k), EOS_IDS)
        saved = np.empty(len(eos), row.dtype)
        for j in range(len(eos)):
            saved[j] = row[eos[j]] if eos[j] < vocab else ninf
        row[:] = ninf
        for j in range(len(eos)):
            if eos[j] < vocab:
                row[eos[j]] = saved[j]
        return n
    forb_ptr = _at(blob, k, FORB_PTR)
    ref = blob[_at(blob, k, STATE_REF) + state]
    if ref == COMPLEMENT:
        if out is not None:
            return -1
        header = _header(blob, k)
        _keep_allowed(row, ninf, _seg(blob, header, RANK_TO_ID), _seg(blob, header, FORB_LO),
                      _seg(blob, header, FORB_HI), blob[forb_ptr + state], blob[forb_ptr + state + 1],
                      _seg(blob, header, UNRANKED), _end(blob, k, ID_TO_RANK) - _at(blob, k, ID_TO_RANK))
    else:
        if ref >= 0:
            override = _at(blob, k, OVERRIDE)
            o_lo = override + blob[_at(blob, k, OVERRIDE_PTR) + state]
            o_hi = override + blob[_at(blob, k, OVERRIDE_PTR) + state + 1]
            ref_ptr = _at(blob, k, REF_FORB_PTR)
            lo_s, hi_s = _at(blob, k, REF_FORB_LO), _at(blob, k, REF_FORB_HI)
            for j in range(blob[ref_ptr + ref], blob[ref_ptr + ref + 1]):
                for r in range(blob[lo_s + j], blob[hi_s + j]):
                    if o_hi > o_lo and _find(blob, o_lo, o_hi, r) >= 0:
                        continue  # the reference forbids r, this state allows it
                    token = blob[rank_to_id + r]
                    if token < vocab:
                        n = _forbid(row, ninf, out, n, token)
        lo_s, hi_s = _at(blob, k, FORB_LO), _at(blob, k, FORB_HI)
        for j in range(blob[forb_ptr + state], blob[forb_ptr + state + 1]):
            for r in range(blob[lo_s + j], blob[hi_s + j]):
                token = blob[rank_to_id + r]
                if token < vocab:
                    n = _forbid(row, ninf, out, n, token)
    for j in range(_at(blob, k, STATIC_FORBIDDEN), _end(blob, k, STATIC_FORBIDDEN)):
        if blob[j] < vocab:
            n = _forbid(row, ninf, out, n, blob[j])
    if blob[_at(blob, k, EOS_BLOCKED) + state] != 0:
        for j in range(_at(blob, k, EOS_IDS), _end(blob, k, EOS_IDS)):
            if blob[j] < vocab:
                n = _forbid(row, ninf, out, n, blob[j])
    return n


@numba.njit(cache=True)
def restore_eos_if_stuck(blob, row, ninf):
    """The one EOS rule (DESIGN §1 "never stuck"): if EOS is masked (by anyone) and nothing else is
    left, unmask the first EOS so the sequence ends. :class:`~.device_mask.DeviceMasks` applies the
    same rule with tensor operations on accelerators."""
    vocab = len(row)
    first = -1
    for j in range(_at(blob, 0, EOS_IDS), _end(blob, 0, EOS_IDS)):
        token = blob[j]
        if token < vocab:
            if row[token] != ninf:
                return
            if first < 0:
                first = token
    if first < 0:
        return
    for v in range(vocab):
        if row[v] != ninf:
            return
    row[first] = 0  # the bit pattern of 0.0 in every float format


@numba.njit(cache=True)
def mask_state(blob, state, row, ninf):
    """Mask ``row`` for the product ``state`` (one int per component): every component's
    :func:`mask_row`, then the one EOS rule (:func:`restore_eos_if_stuck`)."""
    for k in range(len(state)):
        mask_row(blob, k, state[k], row, ninf)
    restore_eos_if_stuck(blob, row, ninf)


SHARED_IDS = 4096  # ids a shared state's mask may list (more: each row is masked by the tables)


@numba.njit(cache=True)
def mask_states(blob, states, rows, logits, ninf):
    """:func:`mask_state` of ``logits[rows[i]]`` for ``states[i]``, for every i — the tables read
    once per *distinct* state: rows that share a state (``n > 1`` samples, beams, rows that have
    not left the start state) get the ids it lists, each written in place, so a step costs one
    traversal per distinct state plus the writes. The same ids as :func:`mask_state` per row (a
    state that masks by filling the row, or lists more than ``SHARED_IDS`` ids, takes it)."""
    n = len(rows)
    if n == 1:
        mask_state(blob, states[0], logits[rows[0]], ninf)
        return
    keys = np.empty(n, np.int64)
    for i in range(n):
        h = np.int64(1469598103934665603)
        for k in range(states.shape[1]):
            h = (h ^ np.int64(states[i, k])) * np.int64(1099511628211)
        keys[i] = h
    order = np.argsort(keys)
    ids = np.empty(0, np.int32)
    i = 0
    while i < n:
        a = order[i]
        j = i + 1
        while j < n and keys[order[j]] == keys[a] and _equal_rows(states, a, order[j]):
            j += 1
        m = -1
        if j - i > 1:
            if len(ids) == 0:
                ids = np.empty(SHARED_IDS, np.int32)
            m = 0
            for k in range(states.shape[1]):
                m = _mask_row(blob, k, states[a, k], logits[rows[a]], ninf, ids, m)
        for q in range(i, j):
            row = logits[rows[order[q]]]
            if m < 0:
                mask_state(blob, states[order[q]], row, ninf)
            else:
                for t in range(m):
                    row[ids[t]] = ninf
                restore_eos_if_stuck(blob, row, ninf)
        i = j


@numba.njit(inline="always")
def _equal_rows(states, a, b):
    for k in range(states.shape[1]):
        if states[a, k] != states[b, k]:
            return False
    return True


# ------------------------------------------------------------------------------ row recognition
# GuideBatch's row recognition keeps, per row of the previous call, O(1) ids (the ``rows`` table) and,
# per pair of rows, where the two first differ (the ``pairs`` table); never a copy of the rows.
#
# What is compared, per row i of a call with the previous call's B rows and one more column:
#   * with each previous row k: input_ids[i, 0] and input_ids[i, L-2] against k's first and last ids;
#   * with the rows k left (candidates): input_ids[i, d] at d = the first position where candidates
#     differ (a tournament, then a check of the winner against every other candidate);
#   * with the winner: the WINDOW ids before the prompt boundary and the WINDOW ids before L-1.
# That is O(B) reads and O(B) integer comparisons per row, O(B²) per step, whatever L.
# Why it is sound: under precondition P (each row's first L-1 ids are some previous row, which is how
# generate builds input_ids), a previous row that differs from the true parent differs from the new
# row at the first position where it differs from the parent, which is read: so the parent found is
# the true parent or a row equal to it id for id (see _find_parents), and each state is that of the
# row's own ids. No hashing is involved, so there is no collision to assume. Residual assumption:
# P itself — a call that breaks it but agrees with a previous row at every position read (a new
# generation built to look like a continuation) is taken as one; reset() between generate calls.
# Reading fewer positions cannot be exact: a previous row can differ from the parent at a single
# position, a different one for each of the B - 1 others, and a hash of the new row's prefix would
# have to read it whole (O(L)).
WINDOW = 8  # ids of each window kept per row
ROW_FIRST = 0  # rows[i, 0]: the row's first id
ROW_BOUNDARY = 1  # rows[i, 1:1 + WINDOW]: ids prompt_length - WINDOW ... prompt_length - 1
ROW_TAIL = 1 + WINDOW  # rows[i, 1 + WINDOW:]: ids length - WINDOW ... length - 1 (the last id at the end)
ROW_WIDTH = 1 + 2 * WINDOW


@numba.njit(inline="always")
def _is_candidate(first, last, info):
    """Cheap exclusions: a previous row whose first or last id differs from the row's (``first`` =
    its id 0, ``last`` = its id prev_len - 1) is not its parent."""
    return info[ROW_FIRST] == first and info[ROW_WIDTH - 1] == last


@numba.njit(cache=True)
def _windows_agree(row, info, prev_len, prompt_len):
    """``row`` holds the previous row's boundary and tail windows at their positions."""
    for j in range(WINDOW):
        pos = prompt_len - WINDOW + j
        if pos >= 0 and row[pos] != info[ROW_BOUNDARY + j]:
            return False
        pos = prev_len - WINDOW + j
        if pos >= 0 and row[pos] != info[ROW_TAIL + j]:
            return False
    return True


@numba.njit(cache=True)
def _find_parents(input_ids, rows, pairs, prev_rows, prev_len, prompt_len, parents):
    """Each row's parent: the previous row it extends by one id. False if some row has none.

    Precondition P (what ``generate`` guarantees in greedy, sampling and beam search, with or without
    left padding): ``input_ids[i, :prev_len]`` equals some previous row, for every ``i``.

    Under P the parent found is exact — a row whose ids equal the true parent's — with O(prev_rows)
    integer comparisons and reads of ``input_ids[i]`` at no more than 2 * prev_rows + 2 * WINDOW
    positions, whatever ``prev_len``: ``pairs[0, c, k]`` is the first position where previous rows
    ``c`` and ``k`` differ (-1: equal rows) and ``pairs[1, c, k]`` row ``c``'s id there, so one read
    of ``input_ids[i]`` at that position rules out ``c`` or ``k``. A tournament keeps the row not
    ruled out (``i`` itself first, the common case); the true parent can never be ruled out, since
    the row agrees with it at every position below ``prev_len``. The champion is then checked against
    every other candidate once more, and against its first id and its two windows (the ids before
    the prompt boundary and the last ids): any disagreement proves P false, and the call is not a
    continuation. What is not read is not checked: a call that breaks P (a new generation whose rows
    happen to agree with some previous row at every position read) is taken as a continuation —
    hence ``GuideBatch.reset()`` between ``generate`` calls.
    """
    batch = input_ids.shape[0]
    for i in range(batch):
        row = input_ids[i]
        first, last = row[0], row[prev_len - 1]
        c = -1
        if i < prev_rows and _is_candidate(first, last, rows[i]):
            c = i
        for k in range(prev_rows):
            if k == c or not _is_candidate(first, last, rows[k]):
                continue
            if c < 0:
                c = k
                continue
            d = pairs[0, c, k]
            if d >= 0 and row[d] != pairs[1, c, k]:
                c = k  # the row is not c's extension (k may not be either: checked below)
        if c < 0:
            return False
        for k in range(prev_rows):
            if k != c and _is_candidate(first, last, rows[k]):
                d = pairs[0, c, k]
                if d >= 0 and row[d] != pairs[1, c, k]:
                    return False
        if not _windows_agree(row, rows[c], prev_len, prompt_len):
            return False
        parents[i] = c
    return True


@numba.njit(cache=True)
def _shares_prompt(input_ids, rows, prev_len, prompt_len):
    """Whether every row has the first id and the ids before the prompt boundary of some previous
    row (the same prompts; the previous call's rows are ``rows[:len(input_ids)]``) and, when it is
    longer than the previous rows, also their last ids at their length (it extends one)."""
    batch, length = input_ids.shape
    for i in range(batch):
        found = False
        for q in range(batch):
            if _same_prompt(input_ids[i], rows[q], prompt_len) and (
                    length <= prev_len or _windows_agree(input_ids[i], rows[q], prev_len, prompt_len)):
                found = True
                break
        if not found:
            return False
    return True


@numba.njit(inline="always")
def _same_prompt(row, info, prompt_len):
    if prompt_len > 0 and row[0] != info[ROW_FIRST]:
        return False
    for j in range(WINDOW):
        pos = prompt_len - WINDOW + j
        if pos >= 0 and row[pos] != info[ROW_BOUNDARY + j]:
            return False
    return True


@numba.njit(cache=True)
def _resync_rows(blob, input_ids, tracker, rows, prompt_len):
    """Each row's state recomputed from its ids after the prompt boundary (O(output length)); a row
    sharing its prompt with a stopped previous row stays stopped (fail closed: which previous row it
    continues is not known)."""
    batch, length = input_ids.shape
    n_comp = blob[0]
    states = np.zeros((batch, n_comp), np.int32)
    for i in range(batch):
        stopped = False
        for q in range(batch):
            if _same_prompt(input_ids[i], rows[q], prompt_len):
                for k in range(n_comp):
                    if tracker[1 + q, k] < 0:
                        stopped = True
        for k in range(n_comp):
            state = 0
            for pos in range(prompt_len, length):
                state = next_state(blob, k, state, input_ids[i, pos])
            states[i, k] = VIOLATED if stopped else state
    for i in range(batch):
        tracker[1 + i, :n_comp] = states[i]


@numba.njit(cache=True)
def _start_rows(input_ids, rows, pairs, prompt_len):
    """Each row's first id and windows (the boundary window ends at ``prompt_len``), and ``pairs``
    for every pair of rows.

    ``pairs`` is built by splitting the rows into groups that agree on a growing prefix (a trie
    walk): each group is scanned from where its rows are known to agree to the first position where
    one differs, so every id is read O(1) times — O(batch × length) once per generation, and
    O(batch²) to fill the table.
    """
    batch, length = input_ids.shape
    for i in range(batch):
        rows[i, ROW_FIRST] = input_ids[i, 0] if length > 0 else 0
        for j in range(WINDOW):
            pos = prompt_len - WINDOW + j
            rows[i, ROW_BOUNDARY + j] = input_ids[i, pos] if pos >= 0 else 0
            pos = length - WINDOW + j
            rows[i, ROW_TAIL + j] = input_ids[i, pos] if pos >= 0 else 0
        for k in range(batch):
            pairs[0, i, k] = -1
            pairs[1, i, k] = 0
    order = np.arange(batch)
    seg_lo = np.empty(2 * batch + 1, np.int64)
    seg_hi = np.empty(2 * batch + 1, np.int64)
    seg_start = np.empty(2 * batch + 1, np.int64)
    top = 0
    seg_lo[0], seg_hi[0], seg_start[0] = 0, batch, 0
    top = 1
    while top > 0:
        top -= 1
        lo, hi, start = seg_lo[top], seg_hi[top], seg_start[top]
        if hi - lo < 2:
            continue
        ref = input_ids[order[lo]]
        j = length  # the first position >= start where some row of the group differs from ref
        for m in range(lo + 1, hi):
            other = input_ids[order[m]]
            q = start
            while q < j and other[q] == ref[q]:
                q += 1
            j = q
        if j >= length:
            continue  # equal rows: their pairs stay -1
        for m in range(lo + 1, hi):  # insertion sort of the group by its id at j
            x = order[m]
            v = input_ids[x, j]
            n = m
            while n > lo and input_ids[order[n - 1], j] > v:
                order[n] = order[n - 1]
                n -= 1
            order[n] = x
        run = lo
        while run < hi:
            end = run + 1
            v = input_ids[order[run], j]
            while end < hi and input_ids[order[end], j] == v:
                end += 1
            for a in range(run, end):
                for b in range(lo, hi):
                    if b < run or b >= end:
                        pairs[0, order[a], order[b]] = j
                        pairs[1, order[a], order[b]] = v
            seg_lo[top], seg_hi[top], seg_start[top] = run, end, j + 1
            top += 1
            run = end


@numba.njit(cache=True)
def _continue_rows(blob, input_ids, tracker, rows, pairs, parents):
    """Advance each row from its parent's state by its last id; carry the parent's first id and
    windows, and derive ``pairs`` from the parents' (O(batch²) integer copies, no id read twice):
    two rows first differ where their parents do, or — same or equal parents — at the new last
    position if their last ids differ. A row whose parent equals (id for id) a stopped row is
    stopped too (fail closed whichever equal row the tournament kept)."""
    batch, length = input_ids.shape
    n_comp = blob[0]
    identity = True
    for i in range(batch):
        if parents[i] != i:
            identity = False
    last = input_ids[:, length - 1].copy()
    stopped = np.zeros(batch, np.bool_)  # previous rows with a component below zero
    for q in range(batch):
        for k in range(n_comp):
            if tracker[1 + q, k] < 0:
                stopped[q] = True
    new_states = np.empty((batch, n_comp), np.int32)
    for i in range(batch):
        p = parents[i]
        for k in range(n_comp):
            new_states[i, k] = tracker[1 + p, k]
        for q in range(batch):
            if stopped[q] and q != p and pairs[0, p, q] < 0:  # q equals p id for id, and is stopped
                for k in range(n_comp):
                    if tracker[1 + q, k] < 0:
                        new_states[i, k] = VIOLATED
        for k in range(n_comp):
            new_states[i, k] = next_state(blob, k, new_states[i, k], last[i])
    for i in range(batch):
        tracker[1 + i, :n_comp] = new_states[i]
    if identity:  # greedy and sampling: rows keep their place, update in place
        for i in range(batch):
            for j in range(WINDOW - 1):
                rows[i, ROW_TAIL + j] = rows[i, ROW_TAIL + j + 1]
            rows[i, ROW_WIDTH - 1] = last[i]
            for q in range(batch):
                if pairs[0, i, q] < 0 and last[i] != last[q]:
                    pairs[0, i, q] = length - 1
                    pairs[1, i, q] = last[i]
        return
    new_rows = np.empty((batch, ROW_WIDTH), np.int64)
    new_pairs = np.empty((2, batch, batch), np.int64)
    for i in range(batch):
        p = parents[i]
        for j in range(ROW_TAIL):
            new_rows[i, j] = rows[p, j]
        for j in range(WINDOW - 1):
            new_rows[i, ROW_TAIL + j] = rows[p, ROW_TAIL + j + 1]
        new_rows[i, ROW_WIDTH - 1] = last[i]
        for q in range(batch):
            d = pairs[0, p, parents[q]]
            if d >= 0:
                new_pairs[0, i, q] = d
                new_pairs[1, i, q] = pairs[1, p, parents[q]]
            elif last[i] != last[q]:
                new_pairs[0, i, q] = length - 1
                new_pairs[1, i, q] = last[i]
            else:
                new_pairs[0, i, q] = -1
                new_pairs[1, i, q] = 0
    rows[:batch] = new_rows
    pairs[:, :batch, :batch] = new_pairs


@numba.njit(cache=True)
def guard_step(blob, input_ids, tracker, rows, pairs, logits, ninf, apply_mask):
    """One decoding step for a batch: recognise the rows, advance their states and, with
    ``apply_mask``, mask their logits (otherwise ``logits`` is not touched). Returns True on a new
    generation.

    ``tracker[0] = [rows, length, prompt_length]`` of the previous call and ``tracker[1 + i, k]`` is
    row ``i``'s state in component ``k`` (the policy's automaton is the product of its components);
    ``rows[i]`` holds row ``i``'s first id, the WINDOW ids before the prompt boundary and its last
    WINDOW ids; ``pairs[0, i, k]`` is the first position where rows ``i`` and ``k`` differ (-1:
    equal) and ``pairs[1, i, k]`` row ``i``'s id there. All are updated in place; the caller sizes
    them for the batch (``GuideBatch``).

    A call with the previous call's number of rows and one more column continues the previous rows
    if every row is recognised as a one-token extension of one of them (beam search reorders and
    duplicates rows): :func:`_find_parents`, exact under its precondition P, with O(batch) work per
    row whatever the length. A call with the same rows and prompts at another length (assisted and
    prompt-lookup decoding go back to the accepted tokens; a longer call must extend the previous
    rows' last ids) keeps the prompt boundary and recomputes each state from it (O(output length),
    :func:`_resync_rows`). Anything else — another batch size, another prompt, a row that disagrees
    with every previous row at a position read — starts a new generation whose prompt is the
    current ``input_ids`` (O(batch × length) once, :func:`_start_rows`). Invariants
    kept between calls: ``rows`` and ``pairs`` describe the previous call's rows exactly (they are
    derived from ids read, never guessed), and each state is the state of the row's ids after the
    prompt, if P held at every step.
    """
    batch, length = input_ids.shape
    n_comp = blob[0]
    prev_rows, prev_len, prompt_len = tracker[0, 0], tracker[0, 1], tracker[0, 2]
    parents = np.empty(batch, np.int64)
    continuing = prev_rows == batch and length == prev_len + 1 and prev_len > 0
    if continuing:
        continuing = _find_parents(input_ids, rows, pairs, prev_rows, prev_len, prompt_len, parents)
    if continuing:
        _continue_rows(blob, input_ids, tracker, rows, pairs, parents)
    elif prev_rows == batch and prev_len > 0 and length >= prompt_len and \
            _shares_prompt(input_ids, rows, prev_len, prompt_len):
        # Not one more column, but the same prompts: assisted or prompt-lookup decoding (the length
        # goes back to the accepted tokens, or stays), or a jump forward that extends the previous
        # rows. The output still starts at the prompt boundary: each state is recomputed from it
        # (treating generated ids as prompt would let a forbidden text straddle the jump: fail open).
        _resync_rows(blob, input_ids, tracker, rows, prompt_len)
        _start_rows(input_ids, rows, pairs, prompt_len)
    else:
        for i in range(batch):
            tracker[1 + i, :n_comp] = 0
        _start_rows(input_ids, rows, pairs, length)
        tracker[0, 2] = length
    tracker[0, 0] = batch
    tracker[0, 1] = length
    if not apply_mask:
        return not continuing
    mask_states(blob, tracker[1:1 + batch, :n_comp], np.arange(batch), logits, ninf)
    return not continuing
