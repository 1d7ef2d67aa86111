"""The transformers adapter: :class:`SafeLogitsProcessor`.

``model.generate`` calls a logits processor with the whole ``input_ids`` (prompt included) and the
next-token scores at every step. The processor holds a :class:`~safedecode.engine.guide.GuideBatch`:
per row, the automaton state of the text generated so far and a few of its ids (the first, the last
ones, those before the prompt boundary), and per pair of rows where they first differ; one kernel
call recognises each new row as a one-token extension of some previous row (beam search reorders
rows) by reading it at O(batch) positions, whatever the context length, advances its state, and
writes -inf into the forbidden ids, with no copy of the logits on CPU (on an accelerator the mask is
written on the device, with no host sync).

**Reuse needs** :meth:`reset`. From ``(input_ids, scores)`` alone a new ``generate`` call cannot
always be told from a continuation: a new prompt that happens to be a one-token extension of the
previous call's rows (the previous call generated one token, say) would count its last token as
output. So reusing a processor object for another ``model.generate`` call requires ``reset()``
first; :func:`safedecode.generate`, the server and the vLLM plugin build or reset theirs. The
processor still restarts on its own when the rows cannot be a continuation (another batch size, not
exactly one more column, a row whose first id, last ids, ids before the prompt boundary or ids where
previous rows differ match no previous row), but that is a safety net, not a contract: ids it does
not read are not compared (see :func:`safedecode.engine.kernels._find_parents`).

A processor holds per-generation state: use one per concurrent generation (the compiled policy it
wraps is immutable and shared).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from transformers import LogitsProcessor

from ..engine.compiled import CompiledPolicy, compile_policy
from ..engine.guide import Guide, GuideBatch
from ..policy.rules import Policy


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
        self.batch = GuideBatch(self.compiled)
        self.telemetry = None
        if telemetry or stop_threshold is not None or audit_log is not None:
            from .telemetry import Telemetry

            self.telemetry = Telemetry(self.compiled, stop_threshold=stop_threshold, stop_after=stop_after,
                                       audit_log=audit_log)

    def reset(self) -> None:
        """Forget all rows: the next call starts a new generation."""
        if self.telemetry is not None:
            self.telemetry.reset()
        self.batch.reset()

    @property
    def guides(self) -> list[Guide]:
        """Each row's :class:`~safedecode.engine.guide.Guide` after the last call."""
        return self.batch.guides

    @property
    def states(self) -> list[tuple]:
        """Automaton state of each row after the last call (a -1 inside: the row is stopped)."""
        return self.batch.states

    @property
    def prompt_length(self) -> int:
        return self.batch.prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self._ids(input_ids, scores)
        if self.telemetry is None:
            self.batch.step(ids, scores)
            return scores
        self.telemetry.before(scores)
        new_generation = self.batch.step(ids, scores)
        self.telemetry.after(input_ids, scores, self.batch, new_generation)
        return scores

    @staticmethod
    def _ids(input_ids: torch.LongTensor, scores: torch.FloatTensor) -> np.ndarray:
        """``input_ids`` as a host int64 array, after checking the shapes (one clear error)."""
        try:  # the common case, kept lean: CPU int64 ids
            ids = input_ids.numpy()
        except (RuntimeError, TypeError):  # on an accelerator, or requires grad
            ids = input_ids.detach().cpu().numpy()
        if ids.ndim != 2 or scores.dim() != 2 or scores.shape[0] != ids.shape[0]:
            raise ValueError(f"SafeLogitsProcessor: expected input_ids of shape (batch, length) and scores of "
                             f"shape (batch, vocab), got {tuple(input_ids.shape)} and {tuple(scores.shape)}")
        if ids.dtype != np.int64:
            if not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"SafeLogitsProcessor: input_ids must hold integers, got {ids.dtype}")
            ids = ids.astype(np.int64)
        return ids
