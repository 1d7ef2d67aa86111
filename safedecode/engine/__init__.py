"""Stage 3 — engine: a policy compiled against a vocabulary, and the per-row state that runs it.

Owns :class:`~.compiled.CompiledPolicy` (token tables, the disk cache, combining parts), the
numba kernels (:mod:`.kernels`: one step, one mask, the one EOS rule), the per-row state noun
:class:`~.guide.Guide` / :class:`~.guide.GuideArray` / :class:`~.guide.GuideBatch` that every adapter holds, device-side masks
(:mod:`.device_mask`) and the independent table verifier (:mod:`.verify`).

May import: :mod:`safedecode.policy`, :mod:`safedecode.tokens`, :mod:`safedecode.automata` and the
top-level utilities. Never channels, adapters or the server.
"""
