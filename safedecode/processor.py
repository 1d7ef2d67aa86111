"""The transformers adapter: :class:`SafeLogitsProcessor`.

``model.generate`` calls a logits processor with the whole ``input_ids`` (prompt included) and the
next-token scores at every step. The processor keeps, per row, the automaton state of the text
generated so far and a copy of the ids it last saw; the numba kernel recognises each new row as a
one-token extension of some previous row (beam search reorders rows), advances its state, and
writes -inf into the forbidden ids — in one call, with no copy of the logits on CPU.

A call whose rows are not one-token extensions of the previous call's rows starts a new generation
(the automata restart at the first generated token), so one processor object can be reused for
several ``generate`` calls. Call :meth:`reset` to force a restart.

A processor holds per-generation state: use one per concurrent generation (the compiled policy it
wraps is immutable and shared).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from transformers import LogitsProcessor

from . import kernels
from .compiled import CompiledPolicy, compile_policy
from .policy import Policy

_INT_VIEW = {torch.float32: (torch.int32, "float32"), torch.float16: (torch.int16, "float16"),
             torch.bfloat16: (torch.int16, "bfloat16"), torch.float64: (torch.int64, "float64")}


class SafeLogitsProcessor(LogitsProcessor):
    """Masks every token that would make the generated text contain a match of ``policy``.

    Guarantees (DESIGN §1): after every step the generated text contains no match (prefix-safe);
    a token is masked iff appending it creates a match (exact); EOS is never masked by the policy,
    and if another processor masked EOS and nothing else is left, EOS is restored so the sequence
    ends. Only ever writes -inf, except that one EOS restoration.
    """

    def __init__(self, policy: Union[Policy, CompiledPolicy], tokenizer=None, **compile_options):
        if isinstance(policy, CompiledPolicy):
            self.compiled = policy
        else:
            if tokenizer is None:
                raise TypeError("SafeLogitsProcessor(policy, tokenizer): a tokenizer is required to compile a policy")
            self.compiled = compile_policy(policy, tokenizer, **compile_options)
        self.reset()

    def reset(self) -> None:
        """Forget all rows: the next call starts a new generation."""
        self._history = np.zeros((1, 64), dtype=np.int64)
        self._meta = np.zeros(3, dtype=np.int64)  # rows, length, prompt length of the previous call
        self._states = np.zeros((1, self.compiled.n_components), dtype=np.int32)

    @property
    def states(self) -> list[tuple]:
        """Automaton state of each row after the last call (a -1 inside: a forbidden token got through)."""
        return [tuple(int(s) for s in row) for row in self._states[: self._meta[0]]]

    @property
    def prompt_length(self) -> int:
        return int(self._meta[2])

    def _reserve(self, rows: int, length: int) -> None:
        have_rows, have_cols = self._history.shape
        if rows <= have_rows and length <= have_cols:
            return
        history = np.zeros((max(rows, have_rows), max(length, 2 * have_cols)), dtype=np.int64)
        history[:have_rows, :have_cols] = self._history
        self._history = history
        states = np.zeros((history.shape[0], self.compiled.n_components), dtype=np.int32)
        states[: len(self._states)] = self._states
        self._states = states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = input_ids.detach()
        if ids.device.type != "cpu":
            ids = ids.cpu()
        ids = ids.numpy()
        if ids.dtype != np.int64:
            ids = ids.astype(np.int64)
        rows, length = ids.shape
        self._reserve(rows, length)
        c = self.compiled
        view = _int_view(scores)
        if view is not None:
            bits, ninf = view
            kernels.guard_step(c.blob, c.headers, c.token_bytes, ids, self._history, self._meta, self._states, bits, ninf)
            return scores
        # Other devices/dtypes: compute the mask on the host, apply it on the scores' device.
        mask = np.zeros((rows, scores.shape[-1]), dtype=np.int32)
        kernels.guard_step(c.blob, c.headers, c.token_bytes, ids, self._history, self._meta, self._states, mask, np.int32(-1))
        scores = scores.masked_fill(torch.from_numpy(mask == -1).to(scores.device), float("-inf"))
        return _restore_eos_where_stuck(scores, c.eos_ids)


def _int_view(scores: torch.Tensor):
    """A numpy integer view sharing the memory of CPU logits, and the bit pattern of -inf."""
    if scores.device.type != "cpu" or not scores.is_contiguous() or scores.dtype not in _INT_VIEW:
        return None
    int_dtype, name = _INT_VIEW[scores.dtype]
    return scores.view(int_dtype).numpy(), kernels.NEG_INF_BITS[name]


def _restore_eos_where_stuck(scores: torch.Tensor, eos_ids) -> torch.Tensor:
    if not eos_ids:
        return scores
    stuck = torch.isneginf(scores).all(dim=-1)
    if bool(stuck.any()):
        scores[stuck, eos_ids[0]] = 0.0
    return scores
