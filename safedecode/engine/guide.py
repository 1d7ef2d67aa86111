"""The per-row state noun every adapter holds: :class:`Guide`, and its batched forms.

A :class:`~.compiled.CompiledPolicy` is immutable and shared; what changes while a sequence is
generated is *where* that sequence stands in the policy's automaton. A :class:`Guide` is that
position for one row (outlines-core's noun): :meth:`Guide.advance` by a token, :meth:`Guide.forbidden`
ids, :attr:`Guide.is_stopped`. The batched forms drive the numba kernels for many rows at once:

* :func:`advance_guides` — each guide over its own new ids (vLLM: rows of different policies);
* :func:`mask_guides` — write each guide's mask into rows of a logits tensor, on any device;
* :func:`step_guides` — both at once, one numba call per policy on CPU logits (the vLLM V1 step);
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

__all__ = ["Guide", "GuideBatch", "advance_guides", "mask_guides", "step_guides"]


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


def advance_guides(guides: Sequence[Guide], token_ids: Sequence[Sequence[int]]) -> list[int]:
    """Advance ``guides[i]`` over ``token_ids[i]`` (one numba call per compiled policy), stopping
    before the first negative id (a placeholder for a token not known yet); returns how many ids of
    each were read."""
    read = [0] * len(guides)
    groups: dict[int, tuple[CompiledPolicy, list[int]]] = {}
    for i, guide in enumerate(guides):
        if len(token_ids[i]):
            groups.setdefault(id(guide.compiled), (guide.compiled, []))[1].append(i)
    for compiled, members in groups.values():
        starts = np.zeros(len(members) + 1, np.int64)
        np.cumsum([len(token_ids[i]) for i in members], out=starts[1:])
        tokens = np.fromiter((t for i in members for t in token_ids[i]), np.int64, int(starts[-1]))
        states = np.array([guides[i].state for i in members], dtype=np.int32)
        counts = _walk_rows(compiled.blob, states, tokens, starts)
        for i, state, n in zip(members, states, counts):
            guides[i].state, read[i] = tuple(state.tolist()), int(n)
    return read


@numba.njit(cache=True)
def _walk_rows(blob, states, tokens, starts):
    read = np.zeros(len(states), np.int64)
    for i in range(len(states)):
        for j in range(starts[i], starts[i + 1]):
            if tokens[j] < 0:
                break
            for k in range(states.shape[1]):
                states[i, k] = kernels.next_state(blob, k, states[i, k], tokens[j])
            read[i] += 1
    return read


def step_guides(logits: torch.Tensor, rows: Sequence[int], guides: Sequence[Guide],
                token_ids: Sequence[Sequence[int]], masks: Optional[DeviceMasks] = None) -> list[int]:
    """Advance ``guides[i]`` over ``token_ids[i]`` and mask ``logits[rows[i]]`` for it, in place —
    one numba call per compiled policy on CPU logits. Stops before the first negative id (a
    placeholder for a token not known yet): such a row is masked as stopped this step (everything
    but EOS) while its guide keeps the state before the placeholder. Returns how many ids of each
    were read."""
    view = int_view(logits)
    if view is None:  # another device: advance on the host, mask on the device
        read = advance_guides(guides, token_ids)
        shown = [g if n == len(ids) else _stopped(g) for g, ids, n in zip(guides, token_ids, read)]
        mask_guides(logits, rows, shown, masks)
        return read
    read = [0] * len(guides)
    first = guides[0].compiled if guides else None
    if all(g.compiled is first for g in guides):  # the common case: one policy for every row
        groups = [(first, range(len(guides)))] if guides else []
    else:
        by_policy: dict[int, tuple[CompiledPolicy, list[int]]] = {}
        for i, guide in enumerate(guides):
            by_policy.setdefault(id(guide.compiled), (guide.compiled, []))[1].append(i)
        groups = list(by_policy.values())
    for compiled, members in groups:
        starts, tokens = [0], []
        for i in members:
            tokens += token_ids[i]
            starts.append(len(tokens))
        states = np.array([guides[i].state for i in members], dtype=np.int32)
        counts = np.zeros(len(members), np.int64)
        _step_rows(compiled.blob, states, np.array(tokens, np.int64), np.array(starts, np.int64),
                   np.array([rows[i] for i in members], np.int64), *view, counts)
        for i, state, n in zip(members, states.tolist(), counts.tolist()):
            guides[i].state, read[i] = tuple(state), n
    return read


def _stopped(guide: Guide) -> Guide:
    stopped = guide.copy()
    stopped.stop()
    return stopped


@numba.njit(cache=True)
def _step_rows(blob, states, tokens, starts, rows, logits, ninf, read):
    for i in range(len(states)):
        pending = False
        for j in range(starts[i], starts[i + 1]):
            if tokens[j] < 0:
                pending = True
                break
            for k in range(states.shape[1]):
                states[i, k] = kernels.next_state(blob, k, states[i, k], tokens[j])
            read[i] += 1
        for k in range(states.shape[1]):
            kernels.mask_row(blob, k, kernels.VIOLATED if pending else states[i, k], logits[rows[i]], ninf)
        kernels.restore_eos_if_stuck(blob, logits[rows[i]], ninf)


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
