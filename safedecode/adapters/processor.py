"""The transformers adapter: :class:`SafeLogitsProcessor`.

``model.generate`` calls a logits processor with the whole ``input_ids`` (prompt included) and the
next-token scores at every step. The processor keeps, per row, the automaton state of the text
generated so far and a copy of the ids it last saw; the numba kernel recognises each new row as a
one-token extension of some previous row (beam search reorders rows), advances its state, and
writes -inf into the forbidden ids — in one call, with no copy of the logits on CPU.

**Reuse needs** :meth:`reset`. From ``(input_ids, scores)`` alone a new ``generate`` call cannot
always be told from a continuation: a new prompt that happens to be a one-token extension of the
previous call's rows (the previous call generated one token, say) would count its last token as
output. So reusing a processor object for another ``model.generate`` call requires ``reset()``
first; :func:`safedecode.generate`, the server and the vLLM plugin build or reset theirs. The
processor still restarts on its own when the rows cannot be a continuation (another batch size or
first column, a row that is not a one-token extension), but that is a safety net, not a contract.

A processor holds per-generation state: use one per concurrent generation (the compiled policy it
wraps is immutable and shared).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from transformers import LogitsProcessor

from ..engine import kernels
from ..engine.compiled import CompiledPolicy, compile_policy
from ..policy.rules import Policy

_NEG_INF32 = np.float32("-inf")
_INT_VIEW = {torch.float32: (torch.int32, "float32"), torch.float16: (torch.int16, "float16"),
             torch.bfloat16: (torch.int16, "bfloat16"), torch.float64: (torch.int64, "float64")}


class SafeLogitsProcessor(LogitsProcessor):
    """Masks every token that would make the generated text contain a match of ``policy``.

    Guarantees (DESIGN §1): after every step the generated text contains no match (prefix-safe);
    a token is masked iff appending it creates a match (exact); EOS is never masked by the policy,
    and if another processor masked EOS and nothing else is left, EOS is restored so the sequence
    ends. Only ever writes -inf, except that one EOS restoration.
    """

    def __init__(self, policy: Union[Policy, CompiledPolicy], tokenizer=None, *, telemetry: bool = False,
                 stop_threshold: Optional[float] = None, stop_after: int = 3, audit_log=None, **compile_options):
        """``telemetry`` (or ``stop_threshold`` / ``audit_log``) turns on blocked-mass telemetry
        (:mod:`safedecode.adapters.telemetry`): ``self.telemetry.report(row)`` after generation."""
        if isinstance(policy, CompiledPolicy):
            self.compiled = policy
        else:
            if tokenizer is None:
                raise TypeError("SafeLogitsProcessor(policy, tokenizer): a tokenizer is required to compile a policy")
            self.compiled = compile_policy(policy, tokenizer, **compile_options)
        self._blob = self.compiled.blob
        self.telemetry = None
        if telemetry or stop_threshold is not None or audit_log is not None:
            from .telemetry import Telemetry

            self.telemetry = Telemetry(self.compiled, stop_threshold=stop_threshold, stop_after=stop_after,
                                       audit_log=audit_log)
        self.reset()

    def reset(self) -> None:
        """Forget all rows: the next call starts a new generation."""
        if self.telemetry is not None:
            self.telemetry.reset()
        self._history = np.zeros((1, 64), dtype=np.int64)
        # Row 0: rows, length and prompt length of the previous call; row 1 + i: row i's states.
        self._tracker = np.zeros((2, max(3, self.compiled.n_components)), dtype=np.int32)

    @property
    def states(self) -> list[tuple]:
        """Automaton state of each row after the last call (a -1 inside: a forbidden token got through)."""
        rows = self._tracker[0, 0]
        return [tuple(int(s) for s in row[: self.compiled.n_components]) for row in self._tracker[1:1 + rows]]

    @property
    def prompt_length(self) -> int:
        return int(self._tracker[0, 2])

    def _reserve(self, rows: int, length: int) -> None:
        have_rows, have_cols = self._history.shape
        history = np.zeros((max(rows, have_rows), max(length, 2 * have_cols)), dtype=np.int64)
        history[:have_rows, :have_cols] = self._history
        self._history = history
        tracker = np.zeros((1 + history.shape[0], self._tracker.shape[1]), dtype=np.int32)
        tracker[: len(self._tracker)] = self._tracker
        self._tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.telemetry is None:
            return self._mask(input_ids, scores)[0]
        self.telemetry.before(scores)
        scores, new_generation = self._mask(input_ids, scores)
        self.telemetry.after(input_ids, scores, self.states, self.prompt_length, new_generation)
        return scores

    def _mask(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> tuple[torch.FloatTensor, bool]:
        """Advance the rows and mask ``scores``; also says whether a new generation started."""
        try:  # the common case, kept lean: CPU int64 ids and CPU float32 logits, written in place
            ids = input_ids.numpy()
            logits = scores.numpy() if scores.dtype == torch.float32 else None
        except (RuntimeError, TypeError):  # on an accelerator, or requires grad
            ids = input_ids.detach().cpu().numpy()
            logits = None
        if ids.ndim != 2 or scores.dim() != 2 or scores.shape[0] != ids.shape[0]:
            raise ValueError(f"SafeLogitsProcessor: expected input_ids of shape (batch, length) and scores of "
                             f"shape (batch, vocab), got {tuple(input_ids.shape)} and {tuple(scores.shape)}")
        if ids.dtype != np.int64:
            if not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"SafeLogitsProcessor: input_ids must hold integers, got {ids.dtype}")
            ids = ids.astype(np.int64)
        rows, length = ids.shape
        if rows > self._history.shape[0] or length > self._history.shape[1]:
            self._reserve(rows, length)
        if logits is not None:
            return scores, kernels.guard_step(self._blob, ids, self._history, self._tracker, logits, _NEG_INF32)
        view = _int_view(scores)
        if view is not None:  # float16 / bfloat16 / float64 on CPU: write the -inf bit pattern
            return scores, kernels.guard_step(self._blob, ids, self._history, self._tracker, *view)
        # Other devices: compute the mask on the host, apply it on the scores' device.
        mask = np.zeros((rows, scores.shape[-1]), dtype=np.int32)
        new_generation = kernels.guard_step(self._blob, ids, self._history, self._tracker, mask, np.int32(-1))
        scores = scores.masked_fill(torch.from_numpy(mask == -1).to(scores.device), float("-inf"))
        return _restore_eos_where_stuck(scores, self.compiled.eos_ids), new_generation


def _int_view(scores: torch.Tensor):
    """A numpy integer view sharing the memory of CPU logits, and the bit pattern of -inf."""
    if (scores.device.type != "cpu" or not scores.is_contiguous() or scores.dtype not in _INT_VIEW
            or scores.requires_grad):
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
