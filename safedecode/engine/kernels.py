"""The hot loop: numba kernels that advance row states and mask forbidden token ids.

All tables of a compiled policy (one set per component automaton, plus the vocabulary's token
bytes) are packed into one read-only, self-describing int32 ``blob``: ``blob[0]`` is the number of
components, ``blob[1]`` the header width, then one header row per component holding the
[start, end) bounds of its segments. A kernel call therefore passes a handful of arguments
(numba's dispatch costs ~0.3 µs per argument, a large share of a 5 µs budget). Logits are written through an integer view of the tensor's memory
(``ninf`` is the bit pattern of -inf for its dtype), so float32, float16 and bfloat16 share one
kernel and nothing is copied.

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
 EOS_BLOCKED) = range(22)  # per token state: 1 inside an unfinished block (EOS masked)
SEGMENTS = ("id_to_rank", "rank_to_id", "token_offsets", "token_bytes", "eos_ids",
            "byte_class", "trans", "end_accept", "compact", "byte_state", "state_ref", "ref_forb_ptr",
            "ref_forb_lo", "ref_forb_hi", "forb_ptr", "forb_lo", "forb_hi", "override_ptr", "override", "n_classes",
            "static_forbidden", "eos_blocked")
SHARED_SEGMENTS = frozenset(SEGMENTS[:5] + ("static_forbidden",))
FORBIDDEN_SPECIAL = -2  # id_to_rank of a special id that is forbidden in every state
HEADER_START = 2

VIOLATED = -1

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
    header = _header(blob, component)
    id_to_rank = _seg(blob, header, ID_TO_RANK)
    if state < 0 or token < 0 or token >= len(id_to_rank):
        return state
    if id_to_rank[token] < 0:
        return VIOLATED if id_to_rank[token] == FORBIDDEN_SPECIAL else state
    offsets = _seg(blob, header, TOKEN_OFFSETS)
    token_bytes = _seg(blob, header, TOKEN_BYTES)
    byte_class = _seg(blob, header, BYTE_CLASS)
    trans = _seg(blob, header, TRANS)
    n_classes = _seg(blob, header, N_CLASSES)[0]
    s = _seg(blob, header, BYTE_STATE)[state]
    for j in range(offsets[token], offsets[token + 1]):
        s = trans[s * n_classes + byte_class[token_bytes[j]]]
        if s == 0:
            return VIOLATED
    if _seg(blob, header, END_ACCEPT)[s] != 0:
        return VIOLATED
    t = _seg(blob, header, COMPACT)[s]
    return t if t >= 0 else VIOLATED


@numba.njit(cache=True)
def mask_row(blob, component, state, row, ninf):
    """Write ``ninf`` into every id ``component`` forbids from ``state`` (all non-EOS ids if VIOLATED).

    That is: the tokens whose bytes create a match, the special ids forbidden everywhere, and EOS
    when ``state`` is inside an unfinished block.
    """
    header = _header(blob, component)
    rank_to_id = _seg(blob, header, RANK_TO_ID)
    vocab = len(row)
    if state < 0:
        eos = _seg(blob, header, EOS_IDS)
        saved = np.empty(len(eos), row.dtype)
        for k in range(len(eos)):
            saved[k] = row[eos[k]] if eos[k] < vocab else ninf
        row[:] = ninf
        for k in range(len(eos)):
            if eos[k] < vocab:
                row[eos[k]] = saved[k]
        return
    override_ptr = _seg(blob, header, OVERRIDE_PTR)
    override = _seg(blob, header, OVERRIDE)
    o_lo, o_hi = override_ptr[state], override_ptr[state + 1]
    ref = _seg(blob, header, STATE_REF)[state]
    ref_ptr = _seg(blob, header, REF_FORB_PTR)
    lo_s = _seg(blob, header, REF_FORB_LO)
    hi_s = _seg(blob, header, REF_FORB_HI)
    for k in range(ref_ptr[ref], ref_ptr[ref + 1]):
        for r in range(lo_s[k], hi_s[k]):
            if o_hi > o_lo and _find(override, o_lo, o_hi, r) >= 0:
                continue  # the reference forbids r, this state allows it
            token = rank_to_id[r]
            if token < vocab:
                row[token] = ninf
    forb_ptr = _seg(blob, header, FORB_PTR)
    forb_lo = _seg(blob, header, FORB_LO)
    forb_hi = _seg(blob, header, FORB_HI)
    for k in range(forb_ptr[state], forb_ptr[state + 1]):
        for r in range(forb_lo[k], forb_hi[k]):
            token = rank_to_id[r]
            if token < vocab:
                row[token] = ninf
    for token in _seg(blob, header, STATIC_FORBIDDEN):
        if token < vocab:
            row[token] = ninf
    if _seg(blob, header, EOS_BLOCKED)[state] != 0:
        for token in _seg(blob, header, EOS_IDS):
            if token < vocab:
                row[token] = ninf


@numba.njit(cache=True)
def restore_eos_if_stuck(blob, row, ninf):
    """The one EOS rule (DESIGN §1 "never stuck"): if EOS is masked (by anyone) and nothing else is
    left, unmask the first EOS so the sequence ends. :class:`~.device_mask.DeviceMasks` applies the
    same rule with tensor operations on accelerators."""
    eos = _seg(blob, _header(blob, 0), EOS_IDS)
    vocab = len(row)
    first = -1
    for k in range(len(eos)):
        if eos[k] < vocab:
            if row[eos[k]] != ninf:
                return
            if first < 0:
                first = eos[k]
    if first < 0:
        return
    for v in range(vocab):
        if row[v] != ninf:
            return
    row[first] = 0  # the bit pattern of 0.0 in every float format


@numba.njit(cache=True)
def _same_prefix(a, b, n):
    for j in range(n):
        if a[j] != b[j]:
            return False
    return True


@numba.njit(cache=True)
def guard_step(blob, input_ids, history, tracker, logits, ninf, apply_mask):
    """One decoding step for a batch: recognise the rows, advance their states and, with
    ``apply_mask``, mask their logits (otherwise ``logits`` is not touched).

    ``tracker[0] = [rows, length, prompt_length]`` of the previous call and ``tracker[1 + i, k]``
    is row ``i``'s state in component ``k`` (the policy's automaton is the product of its
    components); ``history[:rows, :length]`` holds the ids seen at the previous call. A call whose
    rows each extend some previous row by exactly one token continues those rows (beam search may
    permute them); anything else starts a new generation whose prompt is the current
    ``input_ids``. Both arrays are updated in place. Returns True on a new generation.
    """
    batch, length = input_ids.shape
    n_comp = blob[0]
    prev_rows, prev_len = tracker[0, 0], tracker[0, 1]
    parents = np.empty(batch, np.int64)
    continuing = prev_rows == batch and length == prev_len + 1 and prev_len > 0
    if continuing:
        for i in range(batch):
            parents[i] = -1
            if _same_prefix(input_ids[i], history[i], prev_len):
                parents[i] = i
            else:
                for j in range(prev_rows):
                    if _same_prefix(input_ids[i], history[j], prev_len):
                        parents[i] = j
                        break
            if parents[i] < 0:
                continuing = False
                break
    if continuing:
        new_states = np.empty((batch, n_comp), np.int32)
        for i in range(batch):
            token = input_ids[i, length - 1]
            for k in range(n_comp):
                new_states[i, k] = next_state(blob, k, tracker[1 + parents[i], k], token)
        for i in range(batch):
            tracker[1 + i, :n_comp] = new_states[i]
            if parents[i] == i:
                history[i, length - 1] = input_ids[i, length - 1]
            else:
                history[i, :length] = input_ids[i]
    else:
        for i in range(batch):
            tracker[1 + i, :n_comp] = 0
            history[i, :length] = input_ids[i]
        tracker[0, 2] = length
    tracker[0, 0] = batch
    tracker[0, 1] = length
    if not apply_mask:
        return not continuing
    for i in range(batch):
        for k in range(n_comp):
            mask_row(blob, k, tracker[1 + i, k], logits[i], ninf)
        restore_eos_if_stuck(blob, logits[i], ninf)
    return not continuing
