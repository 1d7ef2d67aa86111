"""safedecode: make forbidden outputs of a language model impossible by construction.

Public API (kept small and stable):

* :class:`Policy`, :func:`load_policy` (a shipped name, a path or a Policy),
  :func:`available_policies` — what may never appear in the output (pydantic / TOML);
* :func:`find_violations` — the reference check, by the ``regex`` package;
* :func:`compile_policy` → :class:`CompiledPolicy` — a policy compiled against a tokenizer;
* :class:`SafeLogitsProcessor` — the transformers ``LogitsProcessor`` enforcing it;
* :func:`generate` → :class:`GenerationResult` — guarded generation in one call;
* :class:`Conversation` — trusted/untrusted prompt building and its output guard
  (``Conversation.guard``), :class:`FromTrusted` — tool arguments limited to trusted values;
  :func:`load_chat_format` / :func:`detect_chat_format` — chat formats as data (``channels/``).
"""
from .errors import (
    AutomatonTooLargeError,
    ChatFormatError,
    PatternError,
    PolicyError,
    SafeDecodeError,
    VocabularyError,
)
from .policy.rules import (
    Policy,
    Violation,
    available_policies,
    find_violations,
    load_policy,
)
from .version import __version__

# The engine pulls in numba, and the adapters torch and transformers: import them on first use so
# that policy tools (`safedecode check`, loading and validating policies) start in a blink.
_LAZY = {
    "CompiledPolicy": "engine.compiled", "compile_policy": "engine.compiled",
    "SafeLogitsProcessor": "adapters.processor",
    "generate": "integrations.generation", "GenerationResult": "integrations.generation",
    "Conversation": "channels.conversation", "Encoded": "channels.conversation",
    "ContentRejectedError": "channels.conversation", "ContentRejected": "channels.conversation",
    "FromTrusted": "channels.tools", "ToolCallError": "channels.tools",
    "ChatFormat": "channels.chat_format", "load_chat_format": "channels.chat_format",
    "detect_chat_format": "channels.chat_format",
    "OutputTypeError": "channels.output_types",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safedecode' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "Policy", "load_policy", "available_policies", "find_violations", "Violation",
    "compile_policy", "CompiledPolicy",
    "SafeLogitsProcessor", "generate", "GenerationResult",
    "Conversation", "Encoded", "ContentRejectedError", "FromTrusted", "ToolCallError", "OutputTypeError",
    "ChatFormat", "load_chat_format", "detect_chat_format", "ChatFormatError",
    "SafeDecodeError", "PolicyError", "PatternError", "AutomatonTooLargeError", "VocabularyError",
    "__version__",
]
