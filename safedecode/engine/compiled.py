"""Compiled policies: the small immutable object adapters use, and its caches.

``compile_policy(policy, tokenizer)`` runs the whole pipeline (pattern compiler → token trie →
token automaton → packed kernel tables) once per (policy, vocabulary, library version): results are
kept in an in-process cache and on disk (``$SAFEDECODE_CACHE_DIR``, default
``~/.cache/safedecode``; set it to an empty string to disable the disk cache).

A :class:`CompiledPolicy` is immutable (its arrays are read-only), so one instance is shared by
every thread, request and processor. Adapters only use its small interface: ``start_state``,
``next_state``, ``forbidden_ids`` and the packed ``blob`` for the numba kernels.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from ..policy.automaton import (
    DEFAULT_MAX_STATES,
    DEFAULT_WORK_BUDGET,
    compile_components,
)
from ..policy.rules import Policy
from ..tokens.token_automaton import build_token_automaton, byte_classes, choose_layouts
from ..tokens.trie import build_trie
from ..tokens.vocabulary import Vocabulary, vocabulary_of
from ..version import __version__
from . import kernels

TABLE_FORMAT = 7  # bump when the packed layout changes: old cache files are then ignored


class CompiledPolicy:
    """A policy compiled against one vocabulary. Immutable and thread-safe.

    The policy's automaton is the product of ``n_components`` component automata (most policies
    have one). A state is a tuple with one int per component: ``start_state`` is all zeros (empty
    output); a component at ``-1`` saw a forbidden token appended anyway (fail closed).
    """

    def __init__(self, policy: Policy, vocabulary: Vocabulary, blob: np.ndarray, stats: dict):
        self.policy = policy
        self.vocabulary = vocabulary
        self.blob = blob
        self.stats = dict(stats)
        self.vocab_size = vocabulary.size
        self.eos_ids = tuple(sorted(vocabulary.eos_ids))
        self.n_components = kernels.n_components(blob)
        self.start_state = (0,) * self.n_components

    @property
    def component_rules(self) -> Optional[list]:
        """For each component automaton, the indices (into ``policy.forbid``) of the rules it
        enforces; None when not known (a combined policy)."""
        members = self.stats.get("component_rules")
        return members if members and len(members) == self.n_components else None

    def next_state(self, state: tuple, token_id: int) -> tuple:
        return tuple(int(kernels.next_state(self.blob, k, s, token_id)) for k, s in enumerate(state))

    def walk(self, token_ids, state: Optional[tuple] = None) -> tuple:
        """State after appending ``token_ids`` to ``state`` (default: the empty output)."""
        state = self.start_state if state is None else state
        for token_id in token_ids:
            state = self.next_state(state, int(token_id))
        return state

    def forbidden_ids(self, state: tuple, vocab_size: Optional[int] = None) -> np.ndarray:
        """Sorted ids the mask forbids in ``state`` (the same kernel the processor runs)."""
        row = np.zeros(vocab_size or self.vocab_size, dtype=np.int32)
        for k, s in enumerate(state):
            kernels.mask_row(self.blob, k, s, row, np.int32(-1))
        return np.flatnonzero(row == -1)

    def __repr__(self) -> str:
        s = self.stats
        return (f"CompiledPolicy({len(self.policy.forbid)} rules, {self.n_components} component(s), "
                f"{s.get('token_states')} states, {s.get('forbidden_ranges')} forbidden ranges, "
                f"{s.get('table_bytes', 0) / 1e6:.2f} MB)")


_memory_cache: "OrderedDict[str, CompiledPolicy]" = OrderedDict()
_memory_lock = threading.Lock()
_MEMORY_CACHE_SIZE = 32


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """Hash of the library's own sources: a changed compiler never reuses an old cache entry."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent  # the safedecode package: every sub-package
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(policy: Policy, vocabulary: Vocabulary, max_states: int) -> str:
    """Disk/memory cache key: (policy hash, vocabulary hash, library version and code, limits)."""
    text = f"{policy.digest()}|{vocabulary.digest()}|{__version__}|{_code_fingerprint()}|{TABLE_FORMAT}|{max_states}"
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_dir() -> Optional[Path]:
    configured = os.environ.get("SAFEDECODE_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    return Path.home() / ".cache" / "safedecode"


def compile_policy(policy: Policy, tokenizer, *, max_states: int = DEFAULT_MAX_STATES,
                   cache_dir: Optional[Path] | bool = True, progress: bool = False,
                   budget: Optional[int] = DEFAULT_WORK_BUDGET) -> CompiledPolicy:
    """Compile ``policy`` against ``tokenizer`` (HF tokenizer, tiktoken Encoding or Vocabulary).

    Cached in memory, then on disk: compiling the same policy for the same vocabulary twice costs a
    dictionary lookup, and a new process pays only the file load. ``progress=True`` draws a progress
    bar on stderr (tqdm) for a compile that takes more than about a second. ``max_states`` bounds
    the DFA of every rule and component; over it, :class:`~safedecode.errors.AutomatonTooLargeError`.
    ``budget`` bounds the work of determinization (units of roughly a microsecond; None: unbounded);
    over it, :class:`~safedecode.policy.automaton.BudgetExceededError` (an ``AutomatonTooLargeError``), raised
    as soon as the budget is spent. A cached policy costs no budget.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"expected a safedecode.Policy, got {type(policy).__name__}")
    vocabulary = vocabulary_of(tokenizer)
    key = cache_key(policy, vocabulary, max_states)
    with _memory_lock:
        hit = _memory_cache.get(key)
        if hit is not None:
            _memory_cache.move_to_end(key)
            return hit
    directory = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    compiled = _load(directory, key, policy, vocabulary) if directory else None
    if compiled is None:
        compiled = _compile(policy, vocabulary, max_states, progress, budget)
        if directory:
            _store(directory, key, compiled)
    with _memory_lock:
        _memory_cache[key] = compiled
        while len(_memory_cache) > _MEMORY_CACHE_SIZE:
            _memory_cache.popitem(last=False)
    return compiled


def _compile(policy: Policy, vocabulary: Vocabulary, max_states: int, progress: bool,
             budget: Optional[int] = DEFAULT_WORK_BUDGET) -> CompiledPolicy:
    t0 = time.perf_counter()
    with _progress_bar(progress, "rules", "rule") as report:
        components = compile_components(policy, max_states=max_states, progress=report, budget=budget)
    t1 = time.perf_counter()
    trie, (token_bytes, token_offsets) = _trie_and_bytes(vocabulary)
    id_to_rank = np.full(vocabulary.size, -1, dtype=np.int32)
    id_to_rank[trie.rank_to_id] = np.arange(len(trie.rank_to_id), dtype=np.int32)
    for eos in vocabulary.eos_ids:  # EOS contributes no text and is masked only inside a block
        id_to_rank[eos] = -1
    static = forbidden_special_ids(policy, vocabulary)
    id_to_rank[static] = kernels.FORBIDDEN_SPECIAL
    unranked = np.ones(vocabulary.size, dtype=bool)
    unranked[trie.rank_to_id] = False  # ids without text: special ids, EOS (restored by the complement layout)
    shared = dict(id_to_rank=id_to_rank, token_offsets=token_offsets, token_bytes=token_bytes,
                  eos_ids=np.array(sorted(vocabulary.eos_ids), dtype=np.int32), static_forbidden=static,
                  unranked=np.flatnonzero(unranked).astype(np.int32))
    all_tables = []
    with _progress_bar(progress, "token automaton", "state") as report:
        for dfa, _ in components:
            tables = choose_layouts(build_token_automaton(dfa, trie, progress=report), len(trie.rank_to_id))
            columns, byte_class = byte_classes(dfa.trans)
            tables.update(shared, byte_class=byte_class, trans=columns, n_classes=[columns.shape[1]],
                          end_accept=dfa.end_accept, eos_blocked=dfa.eos_blocked_or_none()[tables["byte_state"]])
            all_tables.append(tables)
    blob = kernels.pack_tables(all_tables)
    t2 = time.perf_counter()
    stats = {
        "rules": len(policy.forbid),
        "components": len(components),
        "component_rules": [members for _, members in components],
        "dfa_states": int(sum(dfa.n_states for dfa, _ in components)),
        "token_states": int(sum(len(t["byte_state"]) for t in all_tables)),
        "overrides": int(sum(len(t["override"]) for t in all_tables)),
        "forbidden_ranges": int(sum(len(t["forb_lo"]) + len(t["ref_forb_lo"]) for t in all_tables)),
        "references": int(sum(int(t["n_references"][0]) for t in all_tables)),
        "complement_states": int(sum(int(t["n_complement"][0]) for t in all_tables)),
        "vocab_size": int(vocabulary.size),
        "table_bytes": int(blob.nbytes),
        "dfa_seconds": round(t1 - t0, 4),
        "token_seconds": round(t2 - t1, 4),
        "compile_seconds": round(t2 - t0, 4),
    }
    return CompiledPolicy(policy, vocabulary, blob, stats)


_tries: "OrderedDict[str, tuple]" = OrderedDict()


@contextlib.contextmanager
def _progress_bar(enabled: bool, what: str, unit: str):
    """A ``report(done, total)`` callback drawing a tqdm bar on stderr once the work has taken more
    than a second (nothing for fast compiles), or None when ``enabled`` is false."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=0, desc=f"safedecode: {what}", unit=unit, delay=1.0, leave=False, file=sys.stderr) as bar:
        def report(done, total):
            bar.total, bar.n = total, done
            bar.update(0)  # redraws at most every mininterval
        yield report


def _trie_and_bytes(vocabulary: Vocabulary):
    """The token trie and flat token bytes of a vocabulary, memoized by its digest (they cost
    ~0.25 s for 49k tokens and a per-request policy would otherwise rebuild them every time)."""
    key = vocabulary.digest()
    with _memory_lock:
        hit = _tries.get(key)
        if hit is not None:
            _tries.move_to_end(key)
            return hit
    built = (build_trie(vocabulary.token_bytes), flat_token_bytes(vocabulary))
    with _memory_lock:
        _tries[key] = built
        while len(_tries) > 4:
            _tries.popitem(last=False)
    return built


def combine(parts: list[CompiledPolicy]) -> CompiledPolicy:
    """One compiled policy running ``parts`` side by side (the product of all their components).

    Lets a request mix a cached part (the same for many requests) with a small per-request part
    without recompiling either. All parts must share the vocabulary; the special-token setting
    comes from the first part, and the others must not forbid special tokens themselves.
    """
    first = parts[0]
    for part in parts[1:]:
        if part.vocabulary.digest() != first.vocabulary.digest():
            raise ValueError("combine: the parts were compiled for different vocabularies")
        if part.policy.special_tokens == "forbid" and first.policy.special_tokens != "forbid":
            raise ValueError("combine: only the first part may forbid special tokens")
    tables = [t for part in parts for t in kernels.unpack_tables(part.blob)]
    policy = Policy(forbid=[rule for part in parts for rule in part.policy.forbid],
                    special_tokens=first.policy.special_tokens)
    component_rules, offset = [], 0
    for part in parts:
        component_rules += [[i + offset for i in members] for members in part.stats.get("component_rules", [])]
        offset += len(part.policy.forbid)
    stats = {"parts": [part.stats for part in parts], "components": len(tables), "component_rules": component_rules,
             "compile_seconds": round(sum(part.stats.get("compile_seconds", 0) for part in parts), 4)}
    return CompiledPolicy(policy, first.vocabulary, kernels.pack_tables(tables), stats)


def compile_parts(policies: list[Policy], tokenizer, *, budgets=None, **options) -> Optional[CompiledPolicy]:
    """Each policy compiled as its own part (``options`` as for :func:`compile_policy`; ``budgets``
    one work budget per policy, None: unbounded) and run side by side (:func:`combine`); None for
    no policies. Special tokens are forbidden if any policy forbids them."""
    if not policies:
        return None
    budgets = list(budgets) if budgets is not None else [options.pop("budget", DEFAULT_WORK_BUDGET)] * len(policies)
    pairs = sorted(zip(policies, budgets), key=lambda pair: pair[0].special_tokens != "forbid")  # forbidding first
    parts = [compile_policy(p if i == 0 or p.special_tokens != "forbid" else Policy(forbid=p.forbid), tokenizer,
                            budget=budget, **options) for i, (p, budget) in enumerate(pairs)]
    return parts[0] if len(parts) == 1 else combine(parts)


def forbidden_special_ids(policy: Policy, vocabulary: Vocabulary) -> np.ndarray:
    """The special ids ``policy.special_tokens = "forbid"`` masks in every state: all but EOS."""
    if policy.special_tokens != "forbid":
        return np.zeros(0, dtype=np.int32)
    return np.array(sorted(vocabulary.special_ids - vocabulary.eos_ids), dtype=np.int32)


def flat_token_bytes(vocabulary: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """All token bytes concatenated in id order, and ``offsets`` with token ``i`` at ``[o[i], o[i+1])``."""
    offsets = np.zeros(vocabulary.size + 1, dtype=np.int64)
    np.cumsum([len(b or b"") for b in vocabulary.token_bytes], out=offsets[1:])
    return np.frombuffer(b"".join(b or b"" for b in vocabulary.token_bytes), dtype=np.uint8), offsets


def _load(directory: Path, key: str, policy: Policy, vocabulary: Vocabulary) -> Optional[CompiledPolicy]:
    path = directory / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            blob = data["blob"]
            stats = json.loads(str(data["stats"]))
    except Exception as exc:  # a corrupt cache file is recompiled, never trusted
        warnings.warn(f"ignoring unreadable safedecode cache file {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    blob.flags.writeable = False
    stats["loaded_from_cache"] = True
    return CompiledPolicy(policy, vocabulary, blob, stats)


def _store(directory: Path, key: str, compiled: CompiledPolicy) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
            np.savez(handle, blob=compiled.blob, stats=np.array(json.dumps(compiled.stats)))
        os.replace(handle.name, directory / f"{key}.npz")
    except OSError as exc:  # a read-only home must not break generation
        warnings.warn(f"could not write the safedecode cache in {directory}: {exc}", RuntimeWarning, stacklevel=3)
