"""Stage 2 — tokens: what a tokenizer's ids mean as bytes, and byte automata lifted to tokens.

Owns :class:`~.vocabulary.Vocabulary` (token bytes, special and EOS ids, the one text-of-ids rule
:func:`~.vocabulary.text_of`; :func:`~.vocabulary.vocabulary_of` for any supported tokenizer), the
token trie (:mod:`.trie`) and the token automaton (:mod:`.token_automaton`: a byte DFA walked over
the trie, giving per state the next state of every token).

May import: :mod:`safedecode.errors`, :mod:`safedecode.extras`. Never policies or the engine.
"""
