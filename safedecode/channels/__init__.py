"""Stage 5 — channels: trusted and untrusted text in, a guard specification out.

Owns chat formats as data (:mod:`.chat_format`), prompt building with the untrusted channel
(:mod:`.conversation`: :class:`Conversation`), tool declarations and the FromTrusted capability
(:mod:`.tools`), link (exfiltration) rules (:mod:`.exfil`) and the construction of a conversation's
output guard (:mod:`.guard`). Data flows one way: ``Conversation`` → ``GuardSpec`` (plain data,
:mod:`.spec`) → a compiled guard (:func:`.guard.compile_guard`) → an adapter.

May import: :mod:`safedecode.adapters` (``Conversation.guard`` returns a ``SafeLogitsProcessor``),
:mod:`safedecode.engine`, :mod:`safedecode.policy`, :mod:`safedecode.tokens`,
:mod:`safedecode.automata`, the top-level utilities. Never integrations or the server.
"""
