"""Stage 4 — adapters: a compiled policy inside a transformers decoding loop.

Owns the transformers ``LogitsProcessor`` (:mod:`.processor`: :class:`SafeLogitsProcessor`, which
holds a :class:`~safedecode.engine.guide.GuideBatch`) and opt-in blocked-mass telemetry
(:mod:`.telemetry`).

May import: the public nouns of the engine (``CompiledPolicy``, ``Guide``, ``GuideBatch``,
``mask_guides``), policies and tokens. Never channels, integrations or the server, and never a
private name or a kernel.
"""
