"""Block rules as automata: a detector for ``open`` composed with the anchored body language.

A block rule (:class:`safedecode.policy.BlockRule`) says: once ``open`` appears, the text must
follow ``(?:body)close`` until it is complete. Written as a "does not contain" automaton (so the
token layer, kernels and verification treat it like any other component):

  * the *detector* is the Aho–Corasick DFA of ``open`` (free text);
  * the *language* is the DFA of ``\\A(?:body)close``: the Σ* restart dies after the first
    character because of ``\\A``, so it is the anchored automaton, and entering one of its
    accepting states means "the block is complete" (the shortest completion ends the block, as in
    the oracle);
  * entering the detector's accepting node moves to the language's start; the language's MATCH
    moves back to the detector's root; a language state that can no longer reach its MATCH (the
    text left the grammar) becomes the composite's MATCH — the violation.

Invariants of the result: state 0 is MATCH (absorbing, ``end_accept``), the detector's root is
state 1, every language state is ``eos_blocked`` (an unfinished block may not end the text), and
no other state has ``end_accept``.
"""
from __future__ import annotations

import numpy as np

from .dfa import MATCH_STATE, START_STATE, CharDFA


def co_reachable(trans: np.ndarray, target: int = MATCH_STATE) -> np.ndarray:
    """Which states can reach ``target`` (a backward breadth-first search over the transitions)."""
    n = trans.shape[0]
    sources = np.repeat(np.arange(n), trans.shape[1])
    order = np.argsort(trans.ravel(), kind="stable")
    targets_sorted = trans.ravel()[order]
    bounds = np.searchsorted(targets_sorted, np.arange(n + 1))
    live = np.zeros(n, dtype=bool)
    live[target] = True
    frontier = [target]
    while frontier:
        state = frontier.pop()
        for source in sources[order[bounds[state]:bounds[state + 1]]]:
            if not live[source]:
                live[source] = True
                frontier.append(int(source))
    return live


def compose_block(detector: CharDFA, language: CharDFA) -> CharDFA:
    """The composite character DFA (see the module docstring); both share one alphabet."""
    n_detect, n_lang = detector.n_states, language.n_states
    complete = language.end_accept  # without assertions in the body, "accepting" means "complete"
    if (language.trans[complete] != MATCH_STATE).any():
        raise ValueError("a block language must not depend on what follows its end")
    live = co_reachable(language.trans)
    # Language state l >= 1 becomes composite state l + offset; a dead one becomes MATCH.
    offset = n_detect - 1
    lang_map = np.where(live, np.arange(n_lang) + offset, MATCH_STATE).astype(np.int32)
    lang_map[complete] = START_STATE  # complete: back to free text
    trans = np.zeros((n_detect + n_lang - 1, detector.trans.shape[1]), dtype=np.int32)
    opened = detector.end_accept[detector.trans[1:]]  # entering an accepting node: ``open`` is complete
    trans[1:n_detect] = np.where(opened, lang_map[START_STATE], detector.trans[1:])
    trans[n_detect:] = lang_map[language.trans[1:]]
    end_accept = np.zeros(len(trans), dtype=bool)
    end_accept[MATCH_STATE] = True
    eos_blocked = np.zeros(len(trans), dtype=bool)
    eos_blocked[n_detect:] = True
    return CharDFA(trans, end_accept, detector.word_class, detector.alphabet, eos_blocked)
