"""The token automaton as tensors: advance and mask guarded rows on the logits' device, no host sync.

:mod:`.device_mask` masks on the device but needs each row's state on the host. In vLLM's Model
Runner V2 the sampled tokens live on the device, so reading them back to advance host-side
:class:`~.guide.Guide`\\ s stalls the device queue every step. :class:`DeviceAutomaton` keeps the
whole automaton of a :class:`~.compiled.CompiledPolicy` on the device instead:

* **next state** — the kernels walk a token's bytes through the byte DFA
  (:func:`~.kernels.next_state`); here every (state, token) destination is precomputed, with the
  same kernel, and stored sparsely (regex-automata's "default + exceptions"): a few dense *base*
  rows ``base_rows[b, token]`` (the destinations from a base state), ``base_of[state]`` (the base
  closest to a state), and the exceptions of every state to its base as one sorted key array
  ``exc_keys = state * vocab + token`` with ``exc_dst``, looked up with ``torch.searchsorted``. A
  state becomes a base when it differs from every existing base on more than ``max(2048, vocab /
  16)`` tokens (at most 64 bases per component). Tokens without text (EOS, allowed special ids)
  are stored as ``STAY``: the state is unchanged.
* **mask** — per state, the forbidden ids (:func:`~.kernels.mask_row` of that state, so the static
  special ids and EOS inside an unfinished block are included): a dense bool row ``[vocab]`` when
  all tables fit ``budget_bytes``; else the smaller of the same rows packed 8 ids a byte (unpacked
  by shifts) and the ids padded to the longest set with ``vocab`` (a discarded column) and
  scattered. Over the budget even so, construction raises :class:`DeviceAutomatonTooLargeError`
  (the caller keeps its host path).

Global state numbers: component ``k``'s state ``s`` is row ``state_offset[k] + s`` of every table,
so one gather serves all components of a policy. :func:`device_automaton` caches one instance per
(compiled policy, device); the host-side tables are cached per component content, so a policy
:func:`~.compiled.combine`\\ d per request from cached parts is assembled, not rebuilt.

Invariants (tested on CPU tensors against the numba kernels, step by step and bit for bit):

* ``advance(states, tokens)[i, k] == kernels.next_state(blob, k, states[i, k], tokens[i])`` for
  every valid state and *every* int64 token: a token < 0 or >= the vocabulary leaves the state
  unchanged, exactly as the kernel does (callers that use negative ids as "not known yet"
  placeholders must fail closed themselves, as the vLLM plugin does); a component at
  ``VIOLATED`` (-1) stays there (absorbing);
* ``mask`` writes exactly what ``device_mask.mask_rows`` writes with the numba kernels for the
  same rows, states and row width (a width above the vocabulary: padded logits, whose extra
  columns are masked only in a violated row): -inf on each forbidden id, every id but EOS when any
  component is violated, and the one EOS rule (:func:`~.kernels.restore_eos_if_stuck`: a guarded
  row left all -inf gets its first EOS set to 0);
* the step is pure tensor code with shapes fixed by its inputs: no ``.item()``, ``.tolist()``,
  ``bool(tensor)``, ``.cpu()`` or data-dependent shape, so it runs on the ``meta`` device and
  can be captured in a CUDA graph (tested on ``meta`` and under ``torch.compile(fullgraph=True)``);
* states passed in must be states of this automaton (or negative): an out-of-range state is a
  caller error (an index error on CPU, a device assert on CUDA), never a silent mask.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import numba
import numpy as np
import torch

from ..errors import SafeDecodeError
from . import kernels
from .compiled import CompiledPolicy

__all__ = ["DeviceAutomaton", "DeviceAutomatonTooLargeError", "device_automaton", "STAY",
           "DEFAULT_BUDGET_BYTES"]

MASK_LAYOUTS = ("dense", "bits", "ids")
STAY = -2  # destination of a token without text: the state does not change
MAX_BASES = 64  # per component
BASE_DIVISOR = 16  # a state differing from every base on more than vocab / 16 tokens becomes a base
DEFAULT_BUDGET_BYTES = 512 << 20  # all tables of one policy on the device


class DeviceAutomatonTooLargeError(SafeDecodeError):
    """The policy's tables do not fit the device budget (use the host path for it)."""


@numba.njit(cache=True)
def _destinations(blob, component, state, id_to_rank, out):
    """``out[t]``: the state of ``component`` after token ``t`` from ``state`` (STAY: unchanged)."""
    for t in range(len(id_to_rank)):
        if id_to_rank[t] == -1:
            out[t] = STAY
        else:
            out[t] = kernels.next_state(blob, component, state, t)


def _component_tables(blob: np.ndarray, component: int, id_to_rank: np.ndarray, n_states: int) -> dict:
    """Host-side tables of one component (states numbered locally)."""
    vocab = len(id_to_rank)
    threshold = max(2048, vocab // BASE_DIVISOR)
    bases: list[np.ndarray] = []
    base_of = np.empty(n_states, np.int32)
    exc_tok, exc_dst, exc_count = [], [], np.zeros(n_states, np.int64)
    row = np.empty(vocab, np.int32)
    forbidden = []
    mask = np.empty(vocab, np.int32)
    for q in range(n_states):
        _destinations(blob, component, q, id_to_rank, row)
        best, best_diff = -1, None
        for b in [0, *range(len(bases) - 1, 0, -1)] if bases else []:  # the start first, then the newest
            diff = np.flatnonzero(bases[b] != row)
            if best_diff is None or len(diff) < len(best_diff):
                best, best_diff = b, diff
            if len(best_diff) <= threshold:
                break
        if best < 0 or (len(best_diff) > threshold and len(bases) < MAX_BASES):
            bases.append(row.copy())
            best, best_diff = len(bases) - 1, np.zeros(0, np.int64)
        base_of[q] = best
        exc_tok.append(best_diff.astype(np.int64))
        exc_dst.append(row[best_diff].copy())
        exc_count[q] = len(best_diff)
        mask[:] = 0
        kernels.mask_row(blob, component, q, mask, np.int32(-1))
        forbidden.append(np.flatnonzero(mask == -1).astype(np.int32))
    return {"bases": np.stack(bases), "base_of": base_of, "exc_tok": exc_tok, "exc_dst": exc_dst,
            "forbidden": forbidden}


_host_tables: "OrderedDict[str, dict]" = OrderedDict()
_host_lock = threading.Lock()
_HOST_CACHE_SIZE = 64


def _tables_of(blob: np.ndarray, component: int) -> dict:
    """:func:`_component_tables`, cached by the content of the component's segments."""
    header = kernels.unpack_tables(blob)[component]
    h = hashlib.sha256()
    for name in kernels.SEGMENTS:
        h.update(name.encode() + np.ascontiguousarray(header[name]).tobytes())
    key = h.hexdigest()
    with _host_lock:
        hit = _host_tables.get(key)
        if hit is not None:
            _host_tables.move_to_end(key)
            return hit
    tables = _component_tables(blob, component, header["id_to_rank"], len(header["byte_state"]))
    with _host_lock:
        _host_tables[key] = tables
        while len(_host_tables) > _HOST_CACHE_SIZE:
            _host_tables.popitem(last=False)
    return tables


class DeviceAutomaton:
    """A compiled policy's token automaton as tensors on ``device`` (see the module docs).

    ``mask_layout``: ``"dense"`` (a bool row per state), ``"bits"`` (the same, 8 ids a byte),
    ``"ids"`` (the forbidden ids per state, padded) or None (dense when everything fits
    ``budget_bytes``, else the smaller of bits and ids). ``budget_bytes`` bounds all tables together.
    """

    def __init__(self, compiled: CompiledPolicy, device, *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 mask_layout: Optional[str] = None):
        if mask_layout not in (None, *MASK_LAYOUTS):
            raise ValueError(f"mask_layout must be one of {MASK_LAYOUTS} or None, not {mask_layout!r}")
        self.device = torch.device(device)
        self.vocab_size = vocab = int(compiled.vocab_size)
        self.n_components = compiled.n_components
        self.eos_ids = tuple(int(e) for e in compiled.eos_ids)
        parts = [_tables_of(compiled.blob, k) for k in range(self.n_components)]
        sizes = [len(p["base_of"]) for p in parts]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        base_offsets = np.concatenate([[0], np.cumsum([len(p["bases"]) for p in parts])]).astype(np.int64)
        n_states = int(offsets[-1])
        keys, dsts = [], []
        for k, p in enumerate(parts):
            for q in range(sizes[k]):
                keys.append((offsets[k] + q) * vocab + p["exc_tok"][q])
                dsts.append(p["exc_dst"][q])
        keys.append(np.array([n_states * vocab], np.int64))  # a sentinel above every key: lookups land in range
        dsts.append(np.array([STAY], np.int32))
        forbidden = [ids for p in parts for ids in p["forbidden"]]
        longest = max((len(ids) for ids in forbidden), default=0)
        mask_bytes = {"dense": n_states * vocab, "bits": n_states * -(-vocab // 8),
                      "ids": n_states * max(longest, 1) * 4}
        narrow = np.int16 if n_states < 2**15 else np.int32  # destinations are -2 .. n_states - 1
        key_type = np.int32 if (n_states + 1) * vocab < 2**31 else np.int64
        host = {
            "state_offset": offsets[:-1],
            "base_rows": np.concatenate([p["bases"] for p in parts]).astype(narrow),
            "base_of": np.concatenate([p["base_of"].astype(np.int64) + base_offsets[k] for k, p in enumerate(parts)]),
            "exc_keys": np.concatenate(keys).astype(key_type),
            "exc_dst": np.concatenate(dsts).astype(narrow),
        }
        transitions = sum(a.nbytes for a in host.values())
        if mask_layout is None:  # dense when it fits, else the smaller compact form
            fits = transitions + mask_bytes["dense"] <= budget_bytes
            mask_layout = "dense" if fits else min(("bits", "ids"), key=mask_bytes.get)
        self.mask_layout = mask_layout
        nbytes = transitions + mask_bytes[mask_layout]
        if nbytes > budget_bytes:
            raise DeviceAutomatonTooLargeError(
                f"the device tables of this policy need {nbytes / 2**20:.1f} MiB ({n_states} states, vocabulary "
                f"{vocab}), over the budget of {budget_bytes / 2**20:.1f} MiB")
        if mask_layout in ("dense", "bits"):
            table = np.zeros((n_states, vocab), np.bool_)
            for g, ids in enumerate(forbidden):
                table[g, ids] = True
            if mask_layout == "bits":  # bit j of byte i: id 8 * i + j
                table = np.packbits(table, axis=1, bitorder="little")
        else:
            table = np.full((n_states, max(longest, 1)), vocab, np.int32)  # column ``vocab`` is discarded
            for g, ids in enumerate(forbidden):
                table[g, :len(ids)] = ids
        host["forbidden_table"] = table
        self.n_states = n_states
        self.nbytes = int(nbytes)
        for name, array in host.items():
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(array)).to(self.device))
        self._not_eos: dict[int, torch.Tensor] = {}
        self._shifts = torch.arange(8, dtype=torch.uint8, device=self.device)

    # -- the step: tensor ops only ------------------------------------------------------------------
    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The states ``[B, K]`` after appending ``tokens[i]`` to row ``i`` (int64, on the device)."""
        vocab = self.vocab_size
        token = tokens.to(torch.int64).unsqueeze(-1)  # [B, 1]
        inside = (token >= 0) & (token < vocab)
        token = token.clamp(0, vocab - 1).expand_as(states)
        g = self.state_offset + states.clamp(min=0)  # [B, K] global state numbers
        dest = self.base_rows[self.base_of[g], token].to(torch.int64)
        key = (g * vocab + token).to(self.exc_keys.dtype)
        at = torch.searchsorted(self.exc_keys, key).clamp(max=self.exc_keys.shape[0] - 1)
        dest = torch.where(self.exc_keys[at] == key, self.exc_dst[at], dest).to(torch.int64)
        dest = torch.where(dest == STAY, states, dest)
        return torch.where((states < 0) | ~inside, states, dest)

    def forbidden(self, states: torch.Tensor, width: int) -> torch.Tensor:
        """``[R, width]`` bool: the ids masked in each row's state (``states``: ``[R, K]``)."""
        vocab = self.vocab_size
        g = self.state_offset + states.clamp(min=0)
        if self.mask_layout == "dense":
            forbidden = self.forbidden_table[g[:, 0]]
            for k in range(1, self.n_components):
                forbidden = forbidden | self.forbidden_table[g[:, k]]
        elif self.mask_layout == "bits":
            packed = self.forbidden_table[g[:, 0]]
            for k in range(1, self.n_components):
                packed = packed | self.forbidden_table[g[:, k]]
            bits = (packed.unsqueeze(-1) >> self._shifts) & 1  # [R, bytes, 8]
            forbidden = bits.reshape(g.shape[0], -1)[:, :vocab].to(torch.bool)
        else:
            ids = self.forbidden_table[g].reshape(g.shape[0], -1).to(torch.int64)  # [R, K * longest]
            forbidden = torch.zeros(g.shape[0], vocab + 1, dtype=torch.bool, device=g.device)
            forbidden = forbidden.scatter(1, ids, True)[:, :vocab]
        if width < vocab:
            forbidden = forbidden[:, :width]
        elif width > vocab:  # padded logits: the extra columns are forbidden only when violated
            forbidden = torch.cat([forbidden, forbidden.new_zeros(forbidden.shape[0], width - vocab)], dim=1)
        violated = (states < 0).any(dim=1, keepdim=True)
        return forbidden | (violated & self.not_eos(width))

    def mask(self, logits: torch.Tensor, rows: torch.Tensor, states: torch.Tensor,
             active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mask ``logits[rows[i]]`` for ``states[i]`` in place; returns ``logits``.

        ``rows`` (int64 ``[R]``, distinct) and ``states`` (``[R, K]``) live on the logits' device;
        ``active`` (bool ``[R]``), if given, leaves the rows where it is False untouched — so a
        caller can pass a fixed set of rows and select the guarded ones on the device.
        """
        width = logits.shape[-1]
        forbidden = self.forbidden(states, width)
        if active is not None:
            forbidden = forbidden & active.unsqueeze(-1)
        masked = logits.index_select(0, rows).masked_fill(forbidden, float("-inf"))
        logits.index_copy_(0, rows, masked)
        eos = next((e for e in self.eos_ids if e < width), -1)  # restore_eos_if_stuck: the first EOS
        if eos >= 0:
            stuck = (masked == float("-inf")).all(dim=-1)
            if active is not None:
                stuck = stuck & active
            column = masked[:, eos]
            logits[:, eos].index_copy_(0, rows, torch.where(stuck, torch.zeros_like(column), column))
        return logits

    def not_eos(self, width: int) -> torch.Tensor:
        """``[width]`` bool: every column but the EOS ids (what a violated row masks)."""
        mask = self._not_eos.get(width)
        if mask is None:
            host = np.ones(width, np.bool_)
            host[[e for e in self.eos_ids if e < width]] = False
            mask = self._not_eos[width] = torch.from_numpy(host).to(self.device)
        return mask

    def start_states(self, batch: int) -> torch.Tensor:
        """``[batch, K]`` int64 zeros on the device: the empty output."""
        return torch.zeros(batch, self.n_components, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return (f"DeviceAutomaton({self.n_components} component(s), {self.n_states} states, "
                f"{len(self.base_rows)} base rows, {len(self.exc_keys) - 1} exceptions, mask {self.mask_layout}, "
                f"{self.nbytes / 2**20:.1f} MiB on {self.device})")


_shared: "weakref.WeakKeyDictionary[CompiledPolicy, dict]" = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def device_automaton(compiled: CompiledPolicy, device, **options) -> DeviceAutomaton:
    """The :class:`DeviceAutomaton` of ``compiled`` on ``device``, built once (``options`` as for
    the class; they only apply to the first build)."""
    device = torch.device(device)
    with _shared_lock:
        per_device = _shared.setdefault(compiled, {})
        hit = per_device.get(device)
    if hit is not None:
        return hit
    built = DeviceAutomaton(compiled, device, **options)
    with _shared_lock:
        return _shared[compiled].setdefault(device, built)
