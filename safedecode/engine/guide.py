"""The per-row state noun every adapter holds: :class:`Guide`, and its batched forms.

A :class:`~.compiled.CompiledPolicy` is immutable and shared; what changes while a sequence is
generated is *where* that sequence stands in the policy's automaton. A :class:`Guide` is that
position for one row (outlines-core's noun): :meth:`Guide.advance` by a token, :meth:`Guide.forbidden`
ids, :attr:`Guide.is_stopped`. The batched forms drive the numba kernels for many rows at once:

* :func:`mask_guides` — write each guide's mask into rows of a logits tensor, on any device;
* :class:`GuideArray` — the rows of one policy an engine keeps from step to step, their states in
  one array: advanced and masked in one numba call on CPU logits (the vLLM V1 step);
* :class:`GuideBatch` — the rows of one transformers ``generate`` call, which passes the whole
  ``input_ids`` every step: each call's rows are recognised as one-token extensions of the
  previous rows (beam search permutes them), advanced and masked in one kernel call.

Invariants (of every form):
  * a state is a tuple with one int per component; the start state (all zeros) is the empty output;
  * a component below zero means a forbidden token was appended anyway (another processor re-enabled
    it, or the caller bypassed the mask): the guide is *stopped* and stays stopped — everything but
    EOS is masked, so the sequence ends (fail closed);
  * a mask only ever writes -inf, except the one EOS rule (DESIGN §1 "never stuck",
    :func:`~.kernels.restore_eos_if_stuck`): a row left with nothing gets its first EOS back.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numba
import numpy as np
import torch

from . import kernels
from .compiled import CompiledPolicy
from .device_mask import DeviceMasks, int_view, mask_rows

__all__ = ["Guide", "GuideArray", "GuideBatch", "mask_guides"]


class Guide:
    """Where one row's output stands in ``compiled``: the automaton state of its text so far."""

    __slots__ = ("compiled", "state")

    def __init__(self, compiled: CompiledPolicy, state: Optional[tuple] = None):
        self.compiled = compiled
        self.state = compiled.start_state if state is None else tuple(int(s) for s in state)

    def advance(self, token_id: int) -> tuple:
        """Append one token; returns the new state."""
        self.state = self.compiled.next_state(self.state, int(token_id))
        return self.state

    def advance_all(self, token_ids) -> tuple:
        """Append several tokens; returns the new state."""
        self.state = self.compiled.walk(token_ids, self.state)
        return self.state

    @property
    def is_stopped(self) -> bool:
        """True once a forbidden token got through (or :meth:`stop` was called): only EOS is left."""
        return any(s < 0 for s in self.state)

    def stop(self) -> None:
        """Fail closed from now on: everything but EOS is masked (telemetry's early stop)."""
        self.state = (kernels.VIOLATED,) * len(self.state)

    def forbidden(self, width: Optional[int] = None) -> np.ndarray:
        """Sorted ids masked in this state (``width``: the logits' row width, default the vocabulary)."""
        return self.compiled.forbidden_ids(self.state, width)

    def violating_components(self, token_id: int) -> list[int]:
        """The components whose automaton ``token_id`` would drive into a match from here."""
        return [k for k, s in enumerate(self.state)
                if s >= 0 and kernels.next_state(self.compiled.blob, k, s, int(token_id)) < 0]

    def copy(self) -> "Guide":
        return Guide(self.compiled, self.state)

    def __repr__(self) -> str:
        return f"Guide(state={self.state}{', stopped' if self.is_stopped else ''})"


class GuideArray:
    """The rows of one compiled policy that an engine keeps from step to step (vLLM's persistent
    batch): each row owns a *slot*, and the slots' states live in one int32 array (slot ×
    component) that the kernel advances and masks in place — no tuple per row and step.

    Invariants: a slot is free or owned by exactly one row (:meth:`acquire` / :meth:`release`);
    an acquired slot starts at the start state; a state below zero in any component is stopped
    (everything but EOS masked), as for :class:`Guide`.
    """

    def __init__(self, compiled: CompiledPolicy, capacity: int = 8):
        self.compiled = compiled
        self.states = np.zeros((max(1, capacity), compiled.n_components), np.int32)
        self._free = list(range(len(self.states) - 1, -1, -1))

    def __len__(self) -> int:
        """Slots in use."""
        return len(self.states) - len(self._free)

    def acquire(self) -> int:
        """A free slot, at the start state."""
        if not self._free:
            have = len(self.states)
            self.states = np.concatenate([self.states, np.zeros_like(self.states)])
            self._free = list(range(2 * have - 1, have - 1, -1))
        slot = self._free.pop()
        self.states[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def state(self, slot: int) -> tuple:
        return tuple(self.states[slot].tolist())

    def reset(self, slot: int, stopped: bool = False) -> None:
        """Back to the start state (the row's output starts over), or stopped."""
        self.states[slot] = kernels.VIOLATED if stopped else 0

    def guide(self, slot: int) -> Guide:
        """A :class:`Guide` at the slot's state (a copy: advancing it leaves the slot as it is)."""
        return Guide(self.compiled, self.states[slot])

    def advance_all(self, slot: int, token_ids) -> tuple:
        """Append ``token_ids`` to the slot's row; returns its new state."""
        state = self.compiled.walk(token_ids, self.state(slot))
        self.states[slot] = state
        return state

    def step(self, logits: torch.Tensor, rows: Sequence[int], slots: Sequence[int], tokens: Sequence[int],
             starts: Sequence[int], masks: Optional[DeviceMasks] = None) -> Optional[np.ndarray]:
        """Advance slot ``slots[i]`` over ``tokens[starts[i]:starts[i + 1]]`` and mask
        ``logits[rows[i]]`` for it, in place — one numba call on CPU logits; on another device the
        states advance on the host and the masks are written on the device (:func:`mask_rows`).

        Stops before the first negative id (a placeholder for a token not known yet): that row is
        masked as stopped this step (everything but EOS) while its slot keeps the state before the
        placeholder. Returns None when every id was read, else how many ids of each row were.
        """
        view = int_view(logits)
        rows, slots = np.asarray(rows, np.int64), np.asarray(slots, np.int64)
        read = np.zeros(len(slots), np.int64)
        args = (self.compiled.blob, self.states, slots, np.asarray(tokens, np.int64), np.asarray(starts, np.int64),
                rows, read)
        if view is not None:
            pending = _step_slots(*args, *view, True)
        else:
            pending = _step_slots(*args, _NO_LOGITS, np.int32(-1), False)
            states = [tuple(s) for s in self.states[slots].tolist()]
            if pending:
                counts = np.diff(np.asarray(starts, np.int64))
                states = [s if read[i] == counts[i] else (kernels.VIOLATED,) * len(s) for i, s in enumerate(states)]
            mask_rows(logits, rows.tolist(), [self.compiled] * len(states), states, masks)
        return read if pending else None


_NO_LOGITS = np.zeros((0, 0), np.int32)


@numba.njit(cache=True)
def _step_slots(blob, states, slots, tokens, starts, rows, read, logits, ninf, apply_mask):
    """Advance each slot over its tokens (stopping before a placeholder), then mask its row
    (:func:`~.kernels.mask_states`: once per distinct state); returns how many rows met a
    placeholder (masked as stopped)."""
    pending_rows = 0
    shown = np.empty((len(slots), states.shape[1]), np.int32)
    for i in range(len(slots)):
        state = states[slots[i]]
        pending = False
        for j in range(starts[i], starts[i + 1]):
            if tokens[j] < 0:
                pending = True
                break
            for k in range(len(state)):
                state[k] = kernels.next_state(blob, k, state[k], tokens[j])
            read[i] += 1
        pending_rows += pending
        for k in range(len(state)):
            shown[i, k] = kernels.VIOLATED if pending else state[k]
    if apply_mask:
        kernels.mask_states(blob, shown, rows, logits, ninf)
    return pending_rows


def mask_guides(logits: torch.Tensor, rows: Sequence[int], guides: Sequence[Guide],
                masks: Optional[DeviceMasks] = None) -> torch.Tensor:
    """Mask ``logits[rows[i]]`` for ``guides[i]`` in place, on the logits' device; returns ``logits``."""
    return mask_rows(logits, rows, [g.compiled for g in guides], [g.state for g in guides], masks)


class GuideBatch:
    """The rows of one transformers ``generate`` call over one compiled policy.

    ``step(input_ids, scores)`` recognises each row as a one-token extension of some row of the
    previous call (beam search may permute and duplicate rows), advances its state and masks its
    scores, in one kernel call for CPU logits. A call of the same rows and prompts at another length
    (assisted and prompt-lookup decoding) keeps the prompt boundary and recomputes the states from
    it; anything that cannot be a continuation starts a new generation whose prompt is the current
    ``input_ids``. Reusing a batch for another ``generate``
    call requires :meth:`reset` (a new prompt can look like a continuation).

    Cost per step: O(batch²) integer operations for the rows, whatever the context length (no row
    is compared or copied whole; see :func:`~.kernels.guard_step`), plus the masks; the first call
    of a generation reads the prompt once, O(batch × length).

    Exactness: the ids of every row are read at O(batch) positions per step, never all of them.
    Under the precondition that each row of a continuing call extends some row of the previous call
    by one id — what ``generate`` does in greedy, sampling and beam search, with left padding or
    not — each row's parent is exact (a row equal to it id for id), so each state is the state of
    the row's own generated ids; see :func:`~.kernels._find_parents` for the argument and for what a
    call that breaks the precondition can get past (the reason for :meth:`reset`).
    """

    def __init__(self, compiled: CompiledPolicy):
        self.compiled = compiled
        self.reset()

    def reset(self) -> None:
        """Forget all rows: the next step starts a new generation."""
        # Row 0: rows, length and prompt length of the previous call; row 1 + i: row i's states.
        self._tracker = np.zeros((2, max(3, self.compiled.n_components)), dtype=np.int32)
        # Per row: its first id, the ids before the prompt boundary, its last ids (kernels.ROW_*).
        self._rows = np.zeros((1, kernels.ROW_WIDTH), dtype=np.int64)
        # Per pair of rows: where they first differ (-1: equal rows), and the first row's id there.
        self._pairs = np.full((2, 1, 1), -1, dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self._tracker[0, 0])

    @property
    def prompt_length(self) -> int:
        return int(self._tracker[0, 2])

    @property
    def states(self) -> list[tuple]:
        """Each row's state after the last step."""
        n = self.compiled.n_components
        return [tuple(int(s) for s in row[:n]) for row in self._tracker[1:1 + self.rows]]

    @property
    def guides(self) -> list[Guide]:
        """Each row's :class:`Guide` (a copy of its state)."""
        return [Guide(self.compiled, state) for state in self.states]

    def stop(self, row: int) -> None:
        """Fail closed for ``row`` from now on (the next steps mask everything but EOS)."""
        self._tracker[1 + row, :self.compiled.n_components] = kernels.VIOLATED

    def step(self, ids: np.ndarray, scores: torch.Tensor) -> bool:
        """Advance the rows to ``ids`` (int64, (batch, length)) and mask ``scores`` (batch, width) in
        place; returns True when a new generation started."""
        rows = ids.shape[0]
        if rows > self._rows.shape[0]:
            self._reserve(rows)
        view = int_view(scores)
        if view is not None:  # CPU logits: advance and mask in one kernel call, nothing copied
            return kernels.guard_step(self.compiled.blob, ids, self._tracker, self._rows, self._pairs, *view, True)
        # On an accelerator: advance on the host, mask on the logits' device (no host sync).
        new = kernels.guard_step(self.compiled.blob, ids, self._tracker, self._rows, self._pairs,
                                 np.zeros((rows, 0), np.int32), np.int32(-1), False)
        mask_guides(scores, range(rows), self.guides)
        return new

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows (more rows than the previous call: a new generation follows)."""
        have = self._rows.shape[0]
        tracker = np.zeros((1 + rows, self._tracker.shape[1]), dtype=np.int32)
        tracker[: len(self._tracker)] = self._tracker
        self._tracker = tracker
        table = np.zeros((rows, kernels.ROW_WIDTH), dtype=np.int64)
        table[:have] = self._rows
        self._rows = table
        pairs = np.full((2, rows, rows), -1, dtype=np.int64)
        pairs[:, :have, :have] = self._pairs
        self._pairs = pairs
