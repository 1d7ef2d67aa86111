"""Stage 6 — integrations: safedecode as other people's software expects it.

Owns guarded generation in one call (:mod:`.generation`: :func:`safedecode.generate`), the one
per-request wire format shared by the servers (:mod:`.wire`, and :mod:`.options` for vLLM's
``extra_args``) and the vLLM V1 logits-processor plugin (:mod:`.vllm`, the ``vllm.logits_processors``
entry point ``safedecode``).

May import: the public nouns of every stage below (``Policy``, ``CompiledPolicy``, ``Guide``,
``SafeLogitsProcessor``, ``Conversation``, ``GuardSpec``). Never private names or kernels; the
server imports this package, never the reverse.
"""
