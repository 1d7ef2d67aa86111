"""safedecode: make forbidden outputs of a language model impossible by construction.

Public API (kept small and stable):

* :class:`Policy`, :func:`load_policy` — what may never appear in the output (pydantic / TOML);
* :func:`find_violations` — the reference check, by the ``regex`` package;
* :func:`compile_policy` → :class:`CompiledPolicy` — a policy compiled against a tokenizer;
* :class:`SafeLogitsProcessor` — the transformers ``LogitsProcessor`` enforcing it;
* :func:`generate` → :class:`GenerationResult` — guarded generation in one call.
"""
from .compiled import CompiledPolicy, __version__, compile_policy
from .errors import AutomatonTooLargeError, PatternError, PolicyError, SafeDecodeError, VocabularyError
from .generation import GenerationResult, generate
from .policy import Policy, Violation, find_violations, load_policy
from .processor import SafeLogitsProcessor

__all__ = [
    "Policy", "load_policy", "find_violations", "Violation",
    "compile_policy", "CompiledPolicy",
    "SafeLogitsProcessor", "generate", "GenerationResult",
    "SafeDecodeError", "PolicyError", "PatternError", "AutomatonTooLargeError", "VocabularyError",
    "__version__",
]
