"""Block rules as automata: a detector for ``open`` composed with the anchored body language.

A block rule (:class:`safedecode.policy.rules.BlockRule`) says: once ``open`` appears, the text must
follow ``(?:body)close`` until it is complete. Written as a "does not contain" automaton (so the
token layer, kernels and verification treat it like any other component):

  * the *detector* is the Aho–Corasick DFA of ``open`` (free text);
  * the *language* is the DFA of ``\\A(?:body)close``: the Σ* restart dies after the first
    character because of ``\\A``, so it is the anchored automaton, and entering one of its
    accepting states means "the block is complete" (the shortest completion ends the block, as in
    the oracle);
  * entering the detector's accepting node moves to the language's start; completing the language
    moves back to the detector's root; a language state that can no longer complete (the text left
    the grammar) becomes the composite's MATCH — the violation;
  * with ``at_start`` the text must open with a block: the composite starts in the DFA of
    ``\\A open (?:body) close`` (the *opening*) instead of the detector.

Invariants of the result: state 0 is MATCH (absorbing, ``end_accept``), state 1 is the start,
every language/opening state is ``eos_blocked`` (an unfinished block may not end the text), and no
other state has ``end_accept``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .dfa import MATCH_STATE, START_STATE, CharDFA


def co_reachable(trans: np.ndarray, target: int = MATCH_STATE) -> np.ndarray:
    """Which states can reach ``target`` (a backward breadth-first search over the transitions)."""
    n = trans.shape[0]
    sources = np.repeat(np.arange(n), trans.shape[1])
    order = np.argsort(trans.ravel(), kind="stable")
    bounds = np.searchsorted(trans.ravel()[order], np.arange(n + 1))
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


def compose_block(detector: CharDFA, language: CharDFA, opening: Optional[CharDFA] = None) -> CharDFA:
    """The composite character DFA (see the module docstring); all parts share one alphabet.

    Layout: MATCH, then the opening's states (if any, so its start is state 1), the detector's,
    the language's — each part's state ``s >= 1`` at ``base + s``.
    """
    parts = ([opening] if opening is not None else []) + [detector, language]
    bases = np.cumsum([0] + [p.n_states - 1 for p in parts])
    detector_base, language_base = int(bases[-3]), int(bases[-2])
    detector_root = detector_base + START_STATE
    trans = np.zeros((int(bases[-1]) + 1, detector.trans.shape[1]), dtype=np.int32)
    eos_blocked = np.zeros(len(trans), dtype=bool)
    language_map = _grammar_map(language, language_base, detector_root)
    opened = detector.end_accept[detector.trans[1:]]  # entering an accepting node: ``open`` is complete
    trans[detector_base + 1:language_base + 1] = np.where(opened, language_map[START_STATE], detector.trans[1:] + detector_base)
    trans[language_base + 1:] = language_map[language.trans[1:]]
    eos_blocked[language_map[language_map > detector_root]] = True  # the states a grammar keeps
    if opening is not None:
        opening_map = _grammar_map(opening, 0, detector_root)
        trans[1:detector_base + 1] = opening_map[opening.trans[1:]]
        eos_blocked[opening_map[(opening_map > 0) & (opening_map != detector_root)]] = True
    end_accept = np.zeros(len(trans), dtype=bool)
    end_accept[MATCH_STATE] = True
    return CharDFA(trans, end_accept, detector.word_class, detector.alphabet, eos_blocked)


def _grammar_map(grammar: CharDFA, base: int, detector_root: int) -> np.ndarray:
    """Where each state of an anchored grammar DFA goes in the composite: complete → the
    detector's root, unable to complete → MATCH, otherwise ``base + state``."""
    complete = grammar.end_accept  # without assertions in the body, "accepting" means "complete"
    if (grammar.trans[complete] != MATCH_STATE).any():
        raise ValueError("a block language must not depend on what follows its end")
    live = co_reachable(grammar.trans)
    mapping = np.where(live, np.arange(grammar.n_states) + base, MATCH_STATE).astype(np.int32)
    mapping[complete] = detector_root
    return mapping
