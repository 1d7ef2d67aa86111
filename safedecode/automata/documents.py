"""Document rules as automata: "the whole text is one word of a language", as a forbidden automaton.

A document rule (:class:`safedecode.policy.rules.DocumentRule`, an output type) says: every prefix
of the text is a prefix of some word of ``L``, and the text may end only on a word of ``L``. Written
as a "does not contain" automaton (so the token layer, kernels and verification treat it like any
other component), from the search DFA of ``\\A(?:L)\\Z``:

  * ``\\A`` kills the search's restart after the first character, so the DFA is the anchored
    automaton of ``L``; ``\\Z`` makes a match possible only at the end of the text, so the DFA's
    ``end_accept`` states are exactly "the text so far is a complete word" and its MATCH state is
    never entered;
  * a state from which no complete word can be reached (the text left the language) becomes the
    composite's MATCH — the violation;
  * every other state that is not complete is ``eos_blocked``: the text may not end there.

Invariants of the result: state 0 is MATCH (absorbing, ``end_accept``), state 1 is the start, no
other state has ``end_accept``, and a state is ``eos_blocked`` iff it is live and incomplete.
"""
from __future__ import annotations

import numpy as np

from .blocks import co_reachable
from .dfa import MATCH_STATE, CharDFA


def can_complete(language: CharDFA) -> np.ndarray:
    """Which states of ``language`` can still reach a complete word (an ``end_accept`` state)."""
    n = language.n_states
    complete = language.end_accept.copy()
    complete[MATCH_STATE] = False  # never entered: a ``\\Z`` match exists only at the end
    # One extra column: complete states step to a virtual target n; co-reachability to it is the answer.
    column = np.where(complete, n, np.arange(n)).astype(np.int32)[:, None]
    extended = np.vstack([np.hstack([language.trans, column]), np.full((1, language.trans.shape[1] + 1), n, np.int32)])
    return co_reachable(extended, target=n)[:n]


def compose_document(language: CharDFA) -> CharDFA:
    """The composite character DFA of a document rule, from the search DFA of ``\\A(?:L)\\Z``."""
    live = can_complete(language)
    live[MATCH_STATE] = False
    trans = np.where(live[language.trans], language.trans, MATCH_STATE).astype(np.int32)
    trans[MATCH_STATE] = MATCH_STATE
    end_accept = np.zeros(language.n_states, dtype=bool)
    end_accept[MATCH_STATE] = True
    eos_blocked = live & ~language.end_accept
    return CharDFA(trans, end_accept, language.word_class, language.alphabet, eos_blocked)
