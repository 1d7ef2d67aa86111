"""safedecode as a vLLM V1 logits processor (``vllm serve --logits-processors`` or the
``vllm.logits_processors`` entry point).

vLLM keeps a *persistent batch*: each request owns a row index until it finishes, and every step the
engine calls :meth:`SafeDecodeLogitsProcessor.update_state` with the changes (``removed`` indices,
then ``added`` ``(index, params, prompt_ids, output_ids)`` — ``output_ids`` is the request's live
list, which the engine appends to — then ``moved`` ``(a, b, UNIDIRECTIONAL | SWAP)``, in that
order), then :meth:`~SafeDecodeLogitsProcessor.apply` on the ``(rows, vocab)`` logits.

A request opts in with ``SamplingParams(extra_args={"safedecode": ...})`` (online:
``"vllm_xargs": {"safedecode": ...}``); see :mod:`safedecode.adapters.wire` for the accepted forms.
A request without that key is never touched.

Invariants, per guarded row:

* its state is the automaton state of *its own* output so far — advanced incrementally in
  :meth:`apply` from the tokens appended since the previous step, re-derived from scratch whenever
  the row is (re)added, so moves, swaps, replacements and preemption never mix rows;
* its mask is exactly ``CompiledPolicy.forbidden_ids(state)`` (DESIGN §1: exact, EOS never masked
  by the policy, EOS restored if another processor left the row with nothing);
* fail closed: a forbidden token that got through anyway (state -1), an output id not known yet
  (an async-scheduling placeholder < 0) or a policy that could not be compiled mask every id but
  EOS, so the request ends rather than leak.

On CUDA the masks come from per-state id tensors cached on the device
(:mod:`safedecode.engine.device_mask`): host → device copies only, no host sync per step. CPU logits take
the numba kernels in place.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..engine.compiled import compile_parts, compile_policy
from ..engine.device_mask import device_masks
from ..engine.guide import Guide, advance_guides, mask_guides
from ..policy.rules import Policy
from .options import request_options, request_policy
from .wire import REQUEST_LIMITS

_log = logging.getLogger(__name__)

try:  # subclass vLLM's interface when it is installed (vLLM checks issubclass for --logits-processors)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base
except ImportError:  # not installed: the same interface, so this module imports and can be tested
    class _Base:
        """Stand-in for ``vllm.v1.sample.logits_processor.LogitsProcessor`` (same methods)."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            return None

# A policy that compiles fast; a row that fails closed uses it in state -1 ("every id but EOS").
_FAIL_CLOSED = Policy(forbid=[{"literal": "\x00", "id": "safedecode-fail-closed"}])


class _Row:
    """One guarded request: its :class:`Guide`, its live output list, and how many of its ids the
    guide has read (``consumed``)."""

    __slots__ = ("guide", "output", "consumed")

    def __init__(self, guide: Guide, output: list):
        self.guide, self.output, self.consumed = guide, output, 0


def _advance(rows: list[_Row]) -> list[Guide]:
    """Each row's guide after the ids appended to its output since the last call (one numba call
    per policy). A negative id is a placeholder for a token not known yet (vLLM async scheduling):
    it is not consumed, and the row fails closed this step (a stopped copy of its guide is returned)."""
    for row in rows:
        if len(row.output) < row.consumed:  # the engine rewrote the list: start over
            row.consumed, row.guide = 0, Guide(row.guide.compiled)
    new = [row.output[row.consumed:] for row in rows]
    read = advance_guides([row.guide for row in rows], new)
    guides = []
    for row, ids, n in zip(rows, new, read):
        row.consumed += n
        guide = row.guide
        if n < len(ids):
            guide = guide.copy()
            guide.stop()
        guides.append(guide)
    return guides


class SafeDecodeLogitsProcessor(_Base):
    """vLLM V1 logits processor enforcing each request's safedecode policy (see the module docs).

    ``tokenizer`` overrides the tokenizer that is otherwise loaded, on the first guarded request,
    from ``vllm_config.model_config.tokenizer`` (a name or path; its revision and
    ``trust_remote_code`` are honoured).
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Raise ``ValueError`` naming the problem if the request's safedecode config is invalid."""
        request_policy(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool, *, tokenizer=None):
        self._vllm_config = vllm_config
        self._tokenizer = tokenizer
        self._masks = device_masks(device, is_pin_memory)  # used when the kernels cannot view the logits
        self._rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        """False: masking can remove the most likely token."""
        return False

    def needs_output_token_ids(self) -> bool:
        """Ask vLLM's async scheduler for real output ids (not placeholders) while a row is guarded."""
        return bool(self._rows)

    def update_state(self, batch_update) -> None:
        """Apply the batch changes in vLLM's order: removed, then added (replacing), then moved."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            row = self._new_row(params, output)
            if row is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if row_b is not None and getattr(direction, "name", direction) == "SWAP":
                self._rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask every guarded row in place for its current state; other rows are untouched."""
        if not self._rows:
            return logits
        return mask_guides(logits, list(self._rows), _advance(list(self._rows.values())), self._masks)

    @property
    def tokenizer(self):
        """The tokenizer policies are compiled against (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            config = self._vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer, revision=getattr(config, "tokenizer_revision", None),
                trust_remote_code=bool(getattr(config, "trust_remote_code", False)))
        return self._tokenizer

    def _new_row(self, params, output: list) -> Optional[_Row]:
        """The row state of a newly added request, or None when it has no safedecode config."""
        try:
            options = request_options(getattr(params, "extra_args", None))
            compiled = compile_parts(list(options.parts), self.tokenizer, budgets=options.budgets,
                                     max_states=REQUEST_LIMITS.max_states)
            return None if compiled is None else _Row(Guide(compiled), output)
        except ValueError as exc:  # validate_params refuses these; a request that skipped it fails closed
            _log.error("safedecode: request fails closed (it can only end): %s", exc)
            guide = Guide(compile_policy(_FAIL_CLOSED, self.tokenizer))
            guide.stop()
            return _Row(guide, output)
