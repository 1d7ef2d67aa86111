"""safedecode as a vLLM logits processor (``vllm serve --logits-processors`` or the
``vllm.logits_processors`` entry point), for both of vLLM's model runners.

vLLM loads every installed entry point of that group, whichever runner it uses, and each runner
insists on its own base class. :class:`SafeDecodeLogitsProcessor` therefore subclasses both
interfaces that the installed vLLM has, and tells them apart by how vLLM constructs it:

* **V1 runner** — ``(vllm_config, device, is_pin_memory)``, then ``update_state`` / ``apply(logits)``
  (below);
* **Model Runner V2** — ``(vllm_config, LogitsProcRequestState)``, then ``add_request(slot, params)``
  and ``apply(logits, LogitsContext)``: rows are request *slots* (``ctx.expanded_idx_mapping``),
  committed tokens live in ``req_states.all_token_ids`` up to ``total_len``, and a row's visible
  sequence is its first ``ctx.pos + 1`` tokens — speculative drafts and a token not yet committed
  are read from ``ctx.input_ids`` of the request's rows. Each slot's guide advances over its
  committed output; a row's drafts advance a copy.

  Off the CPU (or with ``SAFEDECODE_DEVICE_AUTOMATON=1``; ``=0`` forces the host path, and so does
  the constructor's ``device_automaton=``) the automaton runs on the device
  (:mod:`safedecode.engine.device_automaton`): per slot, its state and the number of committed
  output tokens it has walked are device tensors; each step, fixed-shape tensor ops advance every
  scheduled slot over at most ``DEVICE_LOOKAHEAD`` (or the draft count + 2) newly committed tokens
  from ``all_token_ids`` / ``total_len``, walk each row's tokens beyond the committed ones from a
  per-slot window scattered from ``ctx.input_ids`` / ``ctx.pos``, and mask — nothing is read back,
  so a step costs no host sync. Past that bound, or with a token the step does not show, the row
  fails closed (never skips). The one host read left is on admission of a *resumed* request
  (``prefill_len > prompt_len``): its output so far is walked once on the host in
  :meth:`~SafeDecodeLogitsProcessor.apply_staged_writes`. One tensor group per compiled policy in
  the batch; a policy whose tables exceed the device budget keeps the host path for its slots. On
  the CPU the host path (below) is the default: it reads the tensors directly (no sync there).

Installing safedecode never stops vLLM from starting: with a vLLM that has neither interface the
class still imports, and with one that lacks V2 it is a V1 processor only.

V1 runner: vLLM keeps a *persistent batch*: each request owns a row index until it finishes, and every step the
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
the numba kernels in place: the rows' states live in one array per policy
(:class:`~safedecode.engine.guide.GuideArray`, a slot per row), so a step is one pass over the rows
to collect their new ids and one kernel call per policy that advances and masks them all, reading the
mask tables once per distinct state (rows that share a state share the work).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Optional

import torch

from ..channels.chat_format import load_chat_format
from ..channels.guard import compile_guard
from ..channels.spec import GuardSpec
from ..channels.tool_schemas import tool_models
from ..engine import kernels
from ..engine.compiled import compile_parts, compile_policy
from ..engine.device_automaton import DeviceAutomatonTooLargeError, device_automaton
from ..engine.device_mask import device_masks
from ..engine.guide import Guide, GuideArray, mask_guides
from ..policy.rules import Policy, load_policy
from .options import request_options
from .wire import KEY as WIRE_KEY, REQUEST_LIMITS, output_type_of, policy_parts

_log = logging.getLogger(__name__)

#: Policies to compile when the engine starts (comma-separated names, e.g. ``secrets,exfil``), so that
#: the first request naming one does not stall an engine step compiling it (nor, on the device path,
#: building its device tables).
PRECOMPILE_ENV = "SAFEDECODE_VLLM_PRECOMPILE"
#: ``0`` turns off the warm-up: by default the plugin loads the model's tokenizer, its vocabulary and
#: token trie and the kernels in the background when the engine starts, so that the first guarded
#: request does not stall an engine step for them (~1 s on 2 CPU cores for a 49k vocabulary).
WARMUP_ENV = "SAFEDECODE_VLLM_WARMUP"
#: Model Runner V2: ``1`` keeps every guarded slot's automaton on the device (the default off the
#: CPU), ``0`` reads the tokens on the host (the default on the CPU).
DEVICE_AUTOMATON_ENV = "SAFEDECODE_DEVICE_AUTOMATON"
#: Model Runner V2, device path: at least this many newly committed tokens, and tokens beyond the
#: committed ones, walked per slot and step (more with speculative decoding: its draft count + 2).
DEVICE_LOOKAHEAD = 4

try:  # subclass vLLM's interfaces when it is installed (vLLM checks issubclass for every plugin)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
except ImportError:  # not installed (or a vLLM without it): the class still imports and can be tested
    _V1Base = None
try:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsProcessor as _V2Base,
    )
except ImportError:
    _V2Base = None


class _NoVLLM:
    """Base when vLLM is not installed: the methods both interfaces share."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        return None


_BASES = tuple(base for base in (_V1Base, _V2Base) if base is not None) or (_NoVLLM,)

#: vLLM's own structured-output fields of ``SamplingParams`` (0.32: ``structured_outputs``; earlier
#: releases: ``guided_decoding``). A request may not combine them with a safedecode config.
_VLLM_STRUCTURED = ("structured_outputs", "guided_decoding")

# A policy that compiles fast; a row that fails closed uses it in state -1 ("every id but EOS").
_FAIL_CLOSED = Policy(forbid=[{"literal": "\x00", "id": "safedecode-fail-closed"}])


class _Row:
    """One guarded request: its slot in its policy's :class:`GuideArray` (where its automaton state
    lives), its live output list (V1), and how many of its ids the state has read (``consumed``).
    A row whose config could not be compiled is ``failed``: it stays stopped whatever happens to its
    output (fail closed)."""

    __slots__ = ("table", "slot", "output", "consumed", "failed")

    def __init__(self, table: GuideArray, output: Optional[list], failed: bool = False):
        self.table, self.slot, self.output, self.consumed, self.failed = table, table.acquire(), output, 0, failed
        if failed:
            table.reset(self.slot, stopped=True)

    @property
    def compiled(self):
        return self.table.compiled

    @property
    def state(self) -> tuple:
        return self.table.state(self.slot)

    def guide(self) -> Guide:
        """A copy of the row's state as a :class:`Guide` (to walk drafts on)."""
        return self.table.guide(self.slot)

    def advance_all(self, token_ids) -> None:
        self.table.advance_all(self.slot, token_ids)

    def start_over(self) -> None:
        """The engine rewrote the output: read it again from the start."""
        self.consumed = 0
        self.table.reset(self.slot, stopped=self.failed)


class _SlotGroup:
    """Model Runner V2, device path: the slots guarded by one compiled policy — its
    :class:`~safedecode.engine.device_automaton.DeviceAutomaton` and each slot's state on the
    device (``states[slot]``: one int per component)."""

    __slots__ = ("index", "compiled", "automaton", "states")

    def __init__(self, index: int, compiled, automaton, max_slots: int):
        self.index, self.compiled, self.automaton = index, compiled, automaton
        self.states = automaton.start_states(max_slots)


class SafeDecodeLogitsProcessor(*_BASES):
    """vLLM logits processor enforcing each request's safedecode policy, on the V1 runner and on
    Model Runner V2 (see the module docs).

    ``tokenizer`` overrides the tokenizer that is otherwise loaded, on the first guarded request,
    from ``vllm_config.model_config.tokenizer`` (a name or path; its revision and
    ``trust_remote_code`` are honoured).
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Raise ``ValueError`` naming the problem if the request's safedecode config is invalid
        (including a guard's chat format and tool definitions)."""
        extra = getattr(sampling_params, "extra_args", None)
        options = request_options(extra)
        if any(isinstance(key, str) and key.startswith(WIRE_KEY) for key in (extra or {})):
            theirs = [name for name in _VLLM_STRUCTURED if getattr(sampling_params, name, None) is not None]
            if theirs:
                raise ValueError(
                    f"extra_args: safedecode with vLLM's own {theirs[0]} (response_format, guided decoding): "
                    f"refused, vLLM's grammar admits JSON escapes (a forbidden text spelled \\u0041...) that "
                    f"rules on the raw text cannot see, and the two masks can leave a row nothing but EOS; "
                    f"send the schema as safedecode's response_format instead (extra_args "
                    f"{{'safedecode': {{'response_format': ...}}}}), which enforces it and every rule in one automaton")
        if options.guard is not None:
            try:
                if options.guard.chat_format:
                    load_chat_format(options.guard.chat_format)
                tool_models(options.guard.tools)
            except ValueError as exc:
                raise type(exc)(f"extra_args: guard: {exc}") from None
        if options.response_format is not None:  # the schema compiles to a document rule, or is refused
            try:
                output_type_of(options, options.guard.trusted_text if options.guard is not None else "")
            except ValueError as exc:
                raise type(exc)(f"extra_args: {exc}") from None
            if options.guard is not None and options.guard.tools:
                raise ValueError("extra_args: response_format with tools: the answer is either one document or "
                                 "tool calls")

    def __init__(self, vllm_config: Any, device_or_states: Any, is_pin_memory: bool = False, *, tokenizer=None,
                 device_automaton: Optional[bool] = None):
        self._vllm_config = vllm_config
        self._tokenizer = tokenizer
        # Model Runner V2 passes its request state (device, all_token_ids, prompt_len, total_len).
        self._req_states = device_or_states if hasattr(device_or_states, "all_token_ids") else None
        device = self._req_states.device if self._req_states is not None else device_or_states
        self._masks = device_masks(device, is_pin_memory)  # used when the kernels cannot view the logits
        self._rows: dict[int, _Row] = {}  # V1: batch index -> row; V2: request slot -> row
        self._tables: dict[int, GuideArray] = {}  # id(compiled) -> the rows' states, while a row uses it
        if device_automaton is None and os.environ.get(DEVICE_AUTOMATON_ENV, "") in ("0", "1"):
            device_automaton = os.environ[DEVICE_AUTOMATON_ENV] == "1"
        if device_automaton is None:
            device_automaton = torch.device(device).type != "cpu"
        #: Model Runner V2 with the automaton on the device (see :meth:`_apply_v2_device`).
        self.device_automaton = bool(device_automaton) and self._req_states is not None
        if self.device_automaton:
            self._init_device_path(torch.device(device), vllm_config)
        self._tokenizer_lock = threading.Lock()
        #: Policies compiled at start ($SAFEDECODE_VLLM_PRECOMPILE), by name; requests reuse them.
        self.precompiled: dict[str, Any] = {}
        names = [n.strip() for n in os.environ.get(PRECOMPILE_ENV, "").split(",") if n.strip()]
        warm = os.environ.get(WARMUP_ENV, "1").strip() != "0"
        self._warmup = threading.Thread(target=self._precompile, args=(names, warm), daemon=True,
                                        name="safedecode-warmup") if names or warm else None
        if self._warmup is not None:
            self._warmup.start()

    def _precompile(self, names: list, warm: bool = True) -> None:
        """Load the tokenizer (its vocabulary, trie and the kernels, by compiling the fail-closed
        policy) and compile ``names`` in the background (the engine keeps starting). Anything that
        fails is logged, never fatal: vLLM must start; a request naming a bad policy is refused."""
        if warm:
            try:
                start = time.perf_counter()
                compile_policy(_FAIL_CLOSED, self.tokenizer)
                _log.info("safedecode: tokenizer and kernels ready in %.1f s", time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - the first guarded request tries again and reports
                _log.warning("safedecode: warm-up failed (the first guarded request will load the tokenizer): %s",
                             exc)
        for name in names:
            try:
                start = time.perf_counter()
                self.precompiled[name] = compiled = compile_policy(load_policy(name), self.tokenizer,
                                                                   max_states=REQUEST_LIMITS.max_states)
                if self.device_automaton:  # its device tables too: a request only looks them up
                    try:
                        device_automaton(compiled, self._device)
                    except DeviceAutomatonTooLargeError as exc:
                        _log.warning("safedecode: policy %r: %s; its tokens are read on the host", name, exc)
                _log.info("safedecode: policy %r ready in %.1f s", name, time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - logged with its reason; requests still validate
                _log.error("safedecode: %s=%r: cannot precompile %r: %s", PRECOMPILE_ENV,
                           os.environ.get(PRECOMPILE_ENV), name, exc)

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
            self._put(index, None)
        for index, params, _prompt, output in batch_update.added:
            self._put(index, self._new_row(params, output))
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_b is not None and getattr(direction, "name", direction) == "SWAP":
                self._rows[a] = row_b
            elif row_b is not None:  # overwritten
                self._release(row_b)
            if row_a is not None:
                self._rows[b] = row_a

    def _put(self, index: int, row: Optional[_Row]) -> None:
        """``row`` (or nothing) at ``index``; a row it replaces gives its slot back."""
        old = self._rows.pop(index, None)
        if old is not None:
            self._release(old)
        if row is not None:
            self._rows[index] = row

    def _release(self, row: _Row) -> None:
        row.table.release(row.slot)
        if not len(row.table):  # nobody uses the policy any more
            self._tables.pop(id(row.table.compiled), None)

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """Mask every guarded row in place for its current state; other rows are untouched.
        ``ctx`` (a ``LogitsContext``) is Model Runner V2's call."""
        if not self._rows:
            return logits
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        # Per policy: the rows, their slots, and the ids appended since the last step. A negative id
        # is a placeholder for a token not known yet (async scheduling): not consumed, and that row
        # fails closed this step.
        steps: dict[GuideArray, tuple[list, list, list, list, list]] = {}
        for index, row in self._rows.items():
            output, consumed = row.output, row.consumed
            n = len(output)
            if n < consumed:  # the engine rewrote the list: start over
                row.start_over()
                consumed = 0
            step = steps.get(row.table)
            if step is None:
                step = steps[row.table] = ([], [], [], [0], [])
            step[0].append(index)
            step[1].append(row.slot)
            if n == consumed + 1:
                step[2].append(output[consumed])
            elif n > consumed:
                step[2].extend(output[consumed:])
            step[3].append(len(step[2]))
            step[4].append(row)
            row.consumed = n
        for table, (indices, slots, tokens, starts, rows) in steps.items():
            read = table.step(logits, indices, slots, tokens, starts, self._masks)
            if read is not None:  # a placeholder stopped some row: it reads from there next step
                for i, (row, n) in enumerate(zip(rows, read.tolist())):
                    row.consumed -= starts[i + 1] - starts[i] - n
        return logits

    # -- Model Runner V2 ---------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """A request enters slot ``req_idx`` (new, or resumed after preemption): its guide starts
        over from its prompt. Returns whether the request is guarded."""
        row = self._new_row(sampling_params, None)
        self._put(req_idx, row)
        if self.device_automaton:
            self._stage_slot(req_idx, row)
        return row is not None

    def apply_staged_writes(self) -> None:
        """Device path: write the slots added since the last step into the device tables (and walk,
        on the host, the output a resumed request already has). Host path: nothing to flush."""
        if not self.device_automaton or not self._staged:
            return
        staged, self._staged = self._staged, {}
        req = self._req_states
        for slot, row in staged.items():
            group = self._slot_group_of.get(slot)
            self._slot_group[slot] = -1 if group is None else group.index
            if group is None:
                continue
            prompt = int(req.prompt_len.np[slot])
            resumed = max(0, int(req.prefill_len.np[slot]) - prompt)
            if resumed:  # preemption: the output so far, walked once on the host (one read per resume)
                row.advance_all(req.all_token_ids.gpu[slot, prompt:prompt + resumed].tolist())
            self._start[slot] = prompt
            self._consumed[slot] = resumed
            self._restart[slot] = kernels.VIOLATED if row.failed else 0
            group.states[slot] = torch.tensor(row.state, dtype=torch.int64)

    def _apply_v2(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        if self.device_automaton:
            self.apply_staged_writes()  # in case the runner did not call it since add_request
            self._apply_v2_device(logits, ctx)
            host = {slot: self._rows[slot] for slot in self._host_slots if slot in self._rows}
            return self._apply_v2_host(logits, ctx, host) if host else logits
        return self._apply_v2_host(logits, ctx, self._rows)

    def _apply_v2_host(self, logits: torch.Tensor, ctx: Any, rows: dict) -> torch.Tensor:
        """The host path: read the committed tokens and this step's rows, advance host guides."""
        slots = ctx.expanded_idx_mapping.tolist()
        guarded = [i for i, slot in enumerate(slots) if slot in rows]
        if not guarded:
            return logits
        pos = ctx.pos.tolist()
        fed = ctx.input_ids.tolist()
        states = self._req_states
        # Tokens this step can see beyond the committed ones, per slot: position -> id.
        seen: dict[int, dict[int, int]] = {}
        for i in guarded:
            seen.setdefault(slots[i], {})[pos[i]] = fed[i]
        for slot in seen:  # each guided slot reads its newly committed output once
            row = rows[slot]
            start = int(states.prompt_len.np[slot])
            end = int(states.total_len.gpu[slot])
            if end < start + row.consumed:  # fewer committed tokens than read: start over
                row.start_over()
            if end > start + row.consumed:
                new = states.all_token_ids.gpu[slot, start + row.consumed:end].tolist()
                row.advance_all(new)
                row.consumed = end - start
        guides = []
        for i in guarded:
            row, visible = rows[slots[i]], pos[i] + 1
            committed = int(states.prompt_len.np[slots[i]]) + row.consumed
            guide = row.guide()  # a copy: drafts, or a token not yet committed, are walked on it
            if visible != committed:
                ahead = [seen[slots[i]].get(p) for p in range(committed, visible)]
                if visible < committed or None in ahead:  # not derivable from this step: fail closed
                    guide.stop()
                else:
                    guide.advance_all(ahead)
            guides.append(guide)
        return mask_guides(logits, guarded, guides, self._masks)

    # -- Model Runner V2, automaton on the device --------------------------------------------------
    def _init_device_path(self, device: torch.device, vllm_config: Any) -> None:
        n = int(self._req_states.max_num_reqs)
        drafts = int(getattr(getattr(vllm_config, "speculative_config", None), "num_speculative_tokens", 0) or 0)
        self._lookahead = max(DEVICE_LOOKAHEAD, drafts + 2)
        self._device = device
        self._slot_group = torch.full((n,), -1, dtype=torch.int64, device=device)  # group index, -1: none
        self._start = torch.zeros(n, dtype=torch.int64, device=device)  # prompt length
        self._consumed = torch.zeros(n, dtype=torch.int64, device=device)  # output tokens walked
        self._restart = torch.zeros(n, dtype=torch.int64, device=device)  # state on a rewrite (-1: failed)
        self._groups: dict[int, _SlotGroup] = {}  # id(compiled) -> group
        self._slot_group_of: dict[int, _SlotGroup] = {}  # slot -> its group (host copy)
        self._host_slots: set[int] = set()  # slots whose policy is too large for the device: host path
        self._staged: dict[int, Optional[_Row]] = {}
        self._next_group = 0

    def _stage_slot(self, slot: int, row: Optional[_Row]) -> None:
        """Assign ``slot`` to its policy's group (built on first use); written on the device by
        :meth:`apply_staged_writes`."""
        self._slot_group_of.pop(slot, None)
        self._host_slots.discard(slot)
        if row is not None:
            compiled = row.compiled
            group = self._groups.get(id(compiled))
            if group is None:
                try:
                    automaton = device_automaton(compiled, self._device)
                except DeviceAutomatonTooLargeError as exc:
                    _log.warning("safedecode: slot %d: %s; its tokens are read on the host", slot, exc)
                    self._host_slots.add(slot)
                    row = None
                else:
                    group = self._groups[id(compiled)] = _SlotGroup(self._next_group, compiled, automaton,
                                                                    int(self._req_states.max_num_reqs))
                    self._next_group += 1
            if group is not None:
                self._slot_group_of[slot] = group
        live = {id(g) for g in self._slot_group_of.values()}
        for key in [k for k, g in self._groups.items() if id(g) not in live]:  # nobody uses it any more
            del self._groups[key]
        self._staged[slot] = row if slot in self._slot_group_of else None

    def _apply_v2_device(self, logits: torch.Tensor, ctx: Any) -> None:
        """Advance every scheduled slot over its newly committed tokens, walk each row's drafts on a
        copy and mask — fixed-shape tensor ops only, nothing read back to the host.

        Per slot, at most ``self._lookahead`` newly committed tokens are walked per step and at most
        as many tokens beyond the committed ones per row: anything past that bound, a visible length
        below the committed one, or a token this step does not show fails closed (state -1).
        """
        groups = {self._slot_group_of[s].index: self._slot_group_of[s] for s in ctx.idx_mapping_np.tolist()
                  if s in self._slot_group_of}
        if not groups:
            return
        req = self._req_states
        bound, device = self._lookahead, logits.device
        tokens = req.all_token_ids.gpu
        total = req.total_len.gpu.to(torch.int64)
        # 1. Each scheduled slot reads its newly committed output (a rewrite starts over).
        slots = ctx.idx_mapping.to(device=device, dtype=torch.int64)
        start, consumed, end = self._start[slots], self._consumed[slots], total[slots]
        rewritten = end < start + consumed
        consumed = torch.where(rewritten, torch.zeros_like(consumed), consumed)
        overflow = (end - start - consumed > bound).unsqueeze(-1)
        member = self._slot_group[slots]
        for group in groups.values():
            old = group.states[slots]
            state = torch.where(rewritten.unsqueeze(-1), self._restart[slots].unsqueeze(-1).expand_as(old), old)
            for j in range(bound):
                at = start + consumed + j
                token = tokens[slots, at.clamp(max=tokens.shape[1] - 1)]
                state = torch.where((at < end).unsqueeze(-1), group.automaton.advance(state, token), state)
            state = state.masked_fill(overflow, kernels.VIOLATED)
            group.states[slots] = torch.where((member == group.index).unsqueeze(-1), state, old)
        self._consumed[slots] = torch.where(member >= 0, (end - start).clamp(min=0), self._consumed[slots])
        # 2. Tokens beyond the committed ones, per slot: window[slot * bound + offset] (-1: not shown).
        row_slots = ctx.expanded_idx_mapping.to(device=device, dtype=torch.int64)
        pos, fed = ctx.pos.to(device=device, dtype=torch.int64), ctx.input_ids.to(device=device, dtype=torch.int64)
        committed = total[row_slots]
        offset = pos - committed
        shown = (offset >= 0) & (offset < bound)
        n_slots = self._slot_group.shape[0]
        window = torch.full((n_slots * bound + 1,), -1, dtype=torch.int64, device=device)
        window.scatter_(0, torch.where(shown, row_slots * bound + offset.clamp(0, bound - 1),
                                       torch.full_like(offset, n_slots * bound)), fed)
        ahead = pos + 1 - committed  # tokens this row sees beyond the committed ones
        rows = torch.arange(logits.shape[0], device=device)
        row_member = self._slot_group[row_slots]
        for group in groups.values():
            state = group.states[row_slots]
            unknown = (ahead < 0) | (ahead > bound)
            for d in range(bound):
                token = window[row_slots * bound + d]
                needed = d < ahead
                unknown = unknown | (needed & (token < 0))
                state = torch.where(needed.unsqueeze(-1), group.automaton.advance(state, token), state)
            state = state.masked_fill(unknown.unsqueeze(-1), kernels.VIOLATED)
            group.automaton.mask(logits, rows, state, row_member == group.index)

    @property
    def tokenizer(self):
        """The tokenizer policies are compiled against (loaded on first use, once)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                config = self._vllm_config.model_config
                self._tokenizer = AutoTokenizer.from_pretrained(
                    config.tokenizer, revision=getattr(config, "tokenizer_revision", None),
                    trust_remote_code=bool(getattr(config, "trust_remote_code", False)))
            return self._tokenizer

    def _new_row(self, params, output: list) -> Optional[_Row]:
        """The row state of a newly added request, or None when it has no safedecode config."""
        if self._warmup is not None:  # a request during the warm-up waits for it rather than compile twice
            self._warmup.join()
            self._warmup = None
        try:
            options = request_options(getattr(params, "extra_args", None))
            if options.guard is not None:  # the conversation's channel guard, as Conversation.guard builds it
                parts, budgets = policy_parts(options, guard=True, trusted_text=options.guard.trusted_text)
                spec = GuardSpec.from_wire(options.guard.model_dump(), self.tokenizer, allow_hosts=options.allow_hosts,
                                           leak_window=options.leak_window, policies=parts)
                compiled = compile_guard(spec, self.tokenizer, max_states=REQUEST_LIMITS.max_states,
                                         budget=list(budgets))
            else:  # a raw prompt: the parts (with an output type's document rule)
                parts, budgets = policy_parts(options, guard=False)
                compiled = compile_parts(list(parts), self.tokenizer, budgets=budgets,
                                         max_states=REQUEST_LIMITS.max_states)
            return None if compiled is None else _Row(self._table(compiled), output)
        except ValueError as exc:  # validate_params refuses these; a request that skipped it fails closed
            _log.error("safedecode: request fails closed (it can only end): %s", exc)
            return _Row(self._table(compile_policy(_FAIL_CLOSED, self.tokenizer)), output, failed=True)

    def _table(self, compiled) -> GuideArray:
        """The states of the rows guarded by ``compiled`` (one array per policy in use)."""
        table = self._tables.get(id(compiled))
        if table is None:
            table = self._tables[id(compiled)] = GuideArray(compiled)
        return table
