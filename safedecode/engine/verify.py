"""Exhaustive verification certificates for a compiled policy.

``verify(policy, tokenizer)`` checks the artifact the processor actually uses (the compiled policy,
from the caches if present) against the byte-level DFAs rebuilt from the policy, *without* the code
that builds the masks (the trie, the lock-step walks, the reference/override tables):

  for every token state reachable from the empty output through allowed tokens, and for every
  token id, the mask forbids the token **iff** walking its bytes through the byte DFA from the
  corresponding DFA state reaches MATCH or ends where the text matches (DESIGN §1: no leak, no
  over-blocking), and the state the kernel moves to is the one the DFA walk reaches. Special ids
  are masked iff the policy forbids special tokens, EOS iff the DFA state is inside an unfinished
  block.

What the certificate proves: the masks and transitions of this compiled policy are exactly those
of the policy's byte DFAs, for this vocabulary, in every reachable state.
What it does not prove: that the byte DFAs mean what ``regex.search`` means (the property tests
check that on random patterns and texts), that the vocabulary's token bytes match the tokenizer's
``decode`` (tested per family), or that the processor tracks rows correctly (tested in ``generate``).
"""
from __future__ import annotations

import time
from typing import Optional

import numba
import numpy as np

from ..errors import SafeDecodeError
from ..policy.automaton import DEFAULT_MAX_STATES, compile_components
from ..policy.rules import Policy
from ..version import __version__
from . import kernels
from .compiled import (
    CompiledPolicy,
    compile_policy,
    flat_token_bytes,
    forbidden_special_ids,
    vocabulary_of,
)


class VerificationError(SafeDecodeError):
    """A counterexample: ``component``, token ``state``, ``token`` id and the ``text`` it yields."""

    def __init__(self, message: str, counterexample: dict):
        super().__init__(message)
        self.counterexample = counterexample


@numba.njit(cache=True)
def _walk_every_token(trans, end_accept, state, flat, offsets, forbidden, dest):
    """For each token id: does its byte walk from DFA ``state`` create a match, and where does it end."""
    for token in range(len(offsets) - 1):
        s = state
        hit = False
        for j in range(offsets[token], offsets[token + 1]):
            s = trans[s, flat[j]]
            if s == 0:
                hit = True
                break
        forbidden[token] = hit or end_accept[s]
        dest[token] = s


@numba.njit(cache=True)
def _kernel_next_states(blob, component, state, out):
    for token in range(len(out)):
        out[token] = kernels.next_state(blob, component, state, token)


def verify(policy: Policy, tokenizer, *, compiled: Optional[CompiledPolicy] = None,
           max_states: int = DEFAULT_MAX_STATES, progress: bool = False) -> dict:
    """Check every reachable state; return a certificate dict or raise :class:`VerificationError`."""
    start = time.perf_counter()
    vocabulary = vocabulary_of(tokenizer)
    compiled = compiled or compile_policy(policy, vocabulary, max_states=max_states)
    components = compile_components(policy, max_states=max_states)
    if len(components) != compiled.n_components:
        raise VerificationError(f"the compiled policy has {compiled.n_components} components, the policy "
                                 f"compiles to {len(components)}", {"components": len(components)})
    flat, offsets = flat_token_bytes(vocabulary)
    size = vocabulary.size
    static = forbidden_special_ids(policy, vocabulary)
    eos = np.array(sorted(vocabulary.eos_ids), dtype=np.int64)
    forbidden = np.zeros(size, dtype=np.bool_)
    dest = np.zeros(size, dtype=np.int32)
    kernel_next = np.zeros(size, dtype=np.int32)
    row = np.zeros(size, dtype=np.int32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="state", desc="verify", leave=False)
    states_checked = 0
    for k, (dfa, members) in enumerate(components):
        eos_blocked = dfa.eos_blocked_or_none()
        byte_state_of = {0: dfa.start}  # token state -> DFA state
        witness = {0: None}  # token state -> (previous state, token): a shortest-ish path to it
        queue = [0]
        while queue:
            state = queue.pop(0)
            dfa_state = byte_state_of[state]
            _walk_every_token(dfa.trans, dfa.end_accept, dfa_state, flat, offsets, forbidden, dest)
            forbidden[static] = True  # special ids the policy forbids everywhere
            forbidden[eos] = eos_blocked[dfa_state]  # EOS only inside an unfinished block
            row[:] = 0
            kernels.mask_row(compiled.blob, k, state, row, np.int32(-1))
            masked = row == -1
            if not np.array_equal(masked, forbidden):
                token = int(np.flatnonzero(masked != forbidden)[0])
                kind = "masked but harmless (over-blocking)" if masked[token] else "allowed but creates a match (leak)"
                raise VerificationError(
                    f"component {k}, state {state}: token {token} is {kind}",
                    _counterexample(k, state, token, kind, vocabulary, members, witness))
            _kernel_next_states(compiled.blob, k, state, kernel_next)
            allowed = np.flatnonzero(~forbidden)
            pairs = (kernel_next[allowed].astype(np.int64) << 32) | dest[allowed].astype(np.int64)
            _, first = np.unique(pairs, return_index=True)  # each distinct (successor, DFA state) once
            for token in allowed[first]:
                successor = int(kernel_next[token])
                known = byte_state_of.get(successor)
                if known is None:
                    byte_state_of[successor] = int(dest[token])
                    witness[successor] = (state, int(token))
                    queue.append(successor)
                elif known != dest[token]:
                    raise VerificationError(
                        f"component {k}, state {state}: token {int(token)} moves to state {successor}, which "
                        f"stands for DFA state {known}, but its bytes lead to DFA state {int(dest[token])}",
                        _counterexample(k, state, int(token), "wrong transition", vocabulary, members, witness))
            states_checked += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "verified": True,
        "policy_hash": policy.digest(),
        "vocabulary_hash": vocabulary.digest(),
        "vocabulary_size": size,
        "library_version": __version__,
        "components": len(components),
        "states_checked": states_checked,
        "tokens_checked": states_checked * size,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _counterexample(component, state, token, kind, vocabulary, members, witness) -> dict:
    path = []
    at = state
    while witness.get(at) is not None:
        at, previous_token = witness[at]
        path.append(previous_token)
    path.reverse()
    return {"component": component, "rules": members, "state": state, "token": token, "kind": kind,
            "tokens_before": path, "text_before": vocabulary.text(path, final=True),
            "resulting_text": vocabulary.text(path + [token], final=True)}
