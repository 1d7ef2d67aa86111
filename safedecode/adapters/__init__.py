"""Stage 5 — adapters: the guard inside other people's decoding loops.

Owns the transformers ``LogitsProcessor`` (:mod:`.processor`), guarded generation in one call
(:mod:`.generation`), per-step telemetry (:mod:`.telemetry`), the one per-request wire format
shared by the servers (:mod:`.wire`, :mod:`.options`) and the vLLM V1 logits-processor plugin
(:mod:`.vllm`).

May import: the public nouns of every stage below (``CompiledPolicy``, ``Guide``, ``Vocabulary``,
``Policy``, ``Conversation``). Never private names, never the server.
"""
