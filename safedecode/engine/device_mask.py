"""Masks on the logits' own device, with no host synchronisation per step.

The numba kernels write -inf through a numpy view of CPU logits. On an accelerator that view does
not exist, and copying logits to the host and back (or reading a device value with ``.item()``,
``bool(t)``, ``.cpu()``) stalls the device queue every step. :class:`DeviceMasks` instead keeps, per
(compiled policy, state, row width), the sorted forbidden ids as an index tensor on the device —
computed once by the same kernel (``CompiledPolicy.forbidden_ids``) and copied
host → device only (from pinned memory, ``non_blocking``, when pinning is on). A step then is:

1. concatenate the cached id tensors of every guarded row (device op);
2. one small host → device copy of the row numbers, id counts and EOS columns;
3. ``repeat_interleave`` (with ``output_size`` known on the host: no sync) gives the row index of
   every id, and one ``index_put_`` writes -inf;
4. DESIGN §1 "never stuck" (the device form of :func:`~.kernels.restore_eos_if_stuck`): a guarded
   row whose entries are now all -inf gets its first EOS set to 0 — ``torch.where`` on the device,
   nothing read back.

Invariants: only ever writes -inf, except that EOS restoration (the mask equals the CPU kernel's,
including for state -1: every id but EOS); rows not passed are untouched; the result does not
depend on the device (tested on CPU tensors against the numba kernels).

:func:`mask_rows` is the one entry point adapters use: the numba kernel in place on CPU logits it
can view, :class:`DeviceMasks` otherwise.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from itertools import count
from typing import Optional, Sequence

import numpy as np
import torch

from . import kernels
from .compiled import CompiledPolicy

_INT_VIEW = {torch.float16: (torch.int16, "float16"), torch.bfloat16: (torch.int16, "bfloat16"),
             torch.float64: (torch.int64, "float64")}
_NEG_INF32 = np.float32("-inf")

DEFAULT_BUDGET_BYTES = 256 << 20  # cached id tensors per device; least recently used go first


class DeviceMasks:
    """Forbidden-id index tensors cached on one device; :meth:`apply` masks rows without a sync.

    Thread-safe. Cache entries are keyed by the compiled policy's identity (policies are
    immutable), the state tuple and the row width; at most ``budget_bytes`` of them are kept.
    """

    def __init__(self, device, pin_memory: Optional[bool] = None, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device = torch.device(device)
        if pin_memory is None:
            pin_memory = self.device.type == "cuda" and torch.cuda.is_available()
        self.pin_memory = bool(pin_memory) and self.device.type != "cpu"
        self.budget_bytes = budget_bytes
        self._ids: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._policy_keys: weakref.WeakKeyDictionary[CompiledPolicy, int] = weakref.WeakKeyDictionary()
        self._next_key = count()
        self._neg_inf: dict[torch.dtype, torch.Tensor] = {}
        self._lock = threading.Lock()

    def apply(self, logits: torch.Tensor, rows: Sequence[int], policies: Sequence[CompiledPolicy],
              states: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mask ``logits[rows[i]]`` for ``states[i]`` of ``policies[i]``, in place; returns ``logits``.

        ``logits`` is (batch, width) on ``self.device``; a state is one int per component of its
        policy (-1: a forbidden token got through, every id but EOS is masked).
        """
        width = logits.shape[-1]
        rows, cols, counts, restore_rows, restore_cols = list(rows), [], [], [], []
        eos_of: dict[int, int] = {}
        for row, policy, state in zip(rows, policies, states):
            ids = self.forbidden(policy, state, width)
            if ids.numel():
                cols.append(ids)
            counts.append(ids.numel())
            eos = eos_of.get(id(policy))
            if eos is None:
                eos = eos_of[id(policy)] = next((e for e in policy.eos_ids if e < width), -1)
            if eos >= 0:
                restore_rows.append(row)
                restore_cols.append(eos)
        n, m = len(rows), len(restore_rows)
        meta = self._to_device(rows + counts + restore_rows + restore_cols)  # one small copy
        if cols:
            row_index = torch.repeat_interleave(meta[:n], meta[n:2 * n], output_size=sum(counts))
            logits.index_put_((row_index, torch.cat(cols)), self._minus_inf(logits.dtype))
        if m:
            restore_rows, restore_cols = meta[2 * n:2 * n + m], meta[2 * n + m:]
            stuck = logits.amax(dim=-1).index_select(0, restore_rows) == float("-inf")
            current = logits[restore_rows, restore_cols]
            logits.index_put_((restore_rows, restore_cols), torch.where(stuck, torch.zeros_like(current), current))
        return logits

    def forbidden(self, policy: CompiledPolicy, state: Sequence[int], width: int) -> torch.Tensor:
        """``policy.forbidden_ids(state, width)`` as an int32 tensor on the device, cached."""
        state = tuple(int(s) for s in state)
        with self._lock:
            key = self._policy_keys.get(policy)
            if key is None:
                key = self._policy_keys[policy] = next(self._next_key)
            key = (key, state, width)
            ids = self._ids.get(key)
            if ids is not None:
                self._ids.move_to_end(key)
                return ids
        ids = self._to_device(policy.forbidden_ids(state, width))
        with self._lock:
            if key not in self._ids:
                self._ids[key] = ids
                self._bytes += ids.numel() * ids.element_size()
                while self._bytes > self.budget_bytes and len(self._ids) > 1:
                    _, old = self._ids.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return ids

    def _to_device(self, values) -> torch.Tensor:
        """Ints as an int32 tensor on the device: a host → device copy only, pinned and asynchronous
        when pinning is on."""
        host = torch.from_numpy(np.asarray(values, dtype=np.int32))
        if self.pin_memory:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=self.pin_memory)

    def _minus_inf(self, dtype: torch.dtype) -> torch.Tensor:
        value = self._neg_inf.get(dtype)
        if value is None:  # a fill on the device, not a copy
            value = self._neg_inf[dtype] = torch.full((), float("-inf"), dtype=dtype, device=self.device)
        return value


_shared: dict[tuple, DeviceMasks] = {}
_shared_lock = threading.Lock()


def device_masks(device, pin_memory: Optional[bool] = None) -> DeviceMasks:
    """The process-wide :class:`DeviceMasks` of ``device`` (one cache per device and pinning choice)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _shared_lock:
        key = (device, pin_memory)
        if key not in _shared:
            _shared[key] = DeviceMasks(device, pin_memory)
        return _shared[key]


def int_view(scores: torch.Tensor):
    """``(array, ninf)``: a numpy array sharing the memory of CPU logits the kernels can write, and
    the value of -inf in it (float32 as is; float16, bfloat16 and float64 through a same-width
    integer view and the bit pattern of -inf) — or None (another device, a non-contiguous tensor
    or one that requires grad: :class:`DeviceMasks` masks those)."""
    if not scores.is_cpu or scores.requires_grad or not scores.is_contiguous():
        return None
    if scores.dtype == torch.float32:
        return scores.numpy(), _NEG_INF32
    if scores.dtype not in _INT_VIEW:
        return None
    int_dtype, name = _INT_VIEW[scores.dtype]
    return scores.view(int_dtype).numpy(), kernels.NEG_INF_BITS[name]


def mask_rows(logits: torch.Tensor, rows: Sequence[int], policies: Sequence[CompiledPolicy],
              states: Sequence[Sequence[int]], masks: Optional[DeviceMasks] = None) -> torch.Tensor:
    """Mask the given rows of ``logits`` in place (see :meth:`DeviceMasks.apply`); returns ``logits``.

    Contiguous CPU logits (float32/16, bfloat16, float64) take the numba kernels through an integer
    view of their memory, one call per policy; anything else takes ``masks`` if it is on the
    logits' device, else :func:`device_masks` of that device. Both give the same mask.
    """
    view = int_view(logits)
    if view is None:
        if masks is None or masks.device != logits.device:
            masks = device_masks(logits.device)
        return masks.apply(logits, rows, policies, states)
    groups: dict[int, tuple[CompiledPolicy, list, list]] = {}
    for row, policy, state in zip(rows, policies, states):
        group = groups.setdefault(id(policy), (policy, [], []))
        group[1].append(row)
        group[2].append(state)
    for policy, group_rows, group_states in groups.values():
        kernels.mask_states(policy.blob, np.asarray(group_states, np.int32), np.asarray(group_rows, np.int64),
                            *view)
    return logits
