"""Stage 0 — automata: regular expressions to deterministic automata over characters and bytes.

Owns the regex parser (:mod:`.syntax`, the ``regex`` package's dialect, with a work budget),
character classes (:mod:`.charsets`), Thompson NFAs (:mod:`.nfa`), subset construction and
minimisation (:mod:`.dfa`), phrase automata (:mod:`.aho_corasick`), block composition
(:mod:`.blocks`), the "departs from an allow-list" construction (:mod:`.negation`) and the
character-to-UTF-8-byte lowering (:mod:`.utf8`). Knows nothing of policies, tokens or models.

May import: only :mod:`safedecode.errors` (and the standard library, ``regex``).
"""
