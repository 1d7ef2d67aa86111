"""The guard of one request as plain data: :class:`GuardSpec`.

The channels layer flows one way::

    Conversation (input: trusted and untrusted text)
        → GuardSpec (data: format, nonce, system and trusted text, tools, hosts, policies)
        → compile_guard(spec, tokenizer) → CompiledPolicy (safedecode.channels.guard)
        → an adapter (SafeLogitsProcessor, the vLLM plugin)

A spec holds no tokenizer and no compiled table, so it is cheap, comparable and can be built by
whoever knows the request (a :class:`~safedecode.channels.conversation.Conversation`, a server);
:mod:`.guard` compiles it and never looks back at the conversation.

Invariants: every field is validated on construction (one :class:`~safedecode.errors.PolicyError`
naming the field); ``tools`` is a name → pydantic model mapping (:func:`~.tools.declare_tools`);
``policies`` are the user's policies, each compiled as its own part (a shipped policy stays cached
when a request adds inline rules). Compile limits (states, work budgets) are the compiler's
arguments, not part of the spec.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import PolicyError
from ..policy.rules import Policy
from .chat_format import ChatFormat, detect_chat_format, load_chat_format
from .tool_schemas import tool_models
from .tools import ToolError, declare_tools

DEFAULT_LEAK_WINDOW = 24
TOOL_CHOICES = ("auto", "required", "none")

__all__ = ["GuardSpec", "DEFAULT_LEAK_WINDOW", "TOOL_CHOICES"]


@dataclass(frozen=True)
class GuardSpec:
    """Everything a request's output guard depends on (see the module docstring)."""

    format: ChatFormat
    nonce: str
    system_text: str = ""
    trusted_text: str = ""
    tools: dict = field(default_factory=dict)
    allow_hosts: tuple = ()
    leak_window: int = DEFAULT_LEAK_WINDOW
    tool_choice: str = "auto"
    policies: tuple = ()

    def __post_init__(self) -> None:
        if not isinstance(self.format, ChatFormat):
            raise PolicyError(f"format: expected a ChatFormat, got {type(self.format).__name__}")
        if not isinstance(self.nonce, str) or not self.nonce:
            raise PolicyError("nonce: expected a non-empty string")
        leak = self.leak_window
        if not isinstance(leak, int) or isinstance(leak, bool) or leak < 4:
            raise PolicyError(f"leak_window={leak!r}: expected an int of at least 4 characters")
        if self.tool_choice not in TOOL_CHOICES:
            raise PolicyError(f"tool_choice={self.tool_choice!r}: expected one of {TOOL_CHOICES}")
        if isinstance(self.allow_hosts, str):
            raise PolicyError("allow_hosts: expected a sequence of host names, got one string")
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        object.__setattr__(self, "tools", declare_tools(self.tools.values() if isinstance(self.tools, dict)
                                                        else self.tools))
        object.__setattr__(self, "policies", _policies(self.policies))

    def to_wire(self, tool_definitions: Optional[list] = None) -> dict:
        """This spec as per-request options of the wire format (``{"guard": {...}, "allow_hosts":
        [...], "leak_window": n}``; add ``"policy"`` for the policies). Tools travel as the OpenAI
        function definitions they were built from (``tool_definitions``): a spec with tools and
        without their definitions cannot be sent."""
        if self.tools and not tool_definitions:
            raise ToolError("a guard spec with tools goes on the wire with their OpenAI function definitions "
                            "(tool_definitions=...)")
        guard = {"nonce": self.nonce, "chat_format": self.format.name, "system_text": self.system_text,
                 "trusted_text": self.trusted_text, "tools": list(tool_definitions or []),
                 "tool_choice": self.tool_choice}
        return {"guard": guard, "allow_hosts": list(self.allow_hosts), "leak_window": self.leak_window}

    @classmethod
    def from_wire(cls, guard: Mapping[str, Any], tokenizer, *, allow_hosts=(), leak_window: Optional[int] = None,
                  policies=()) -> "GuardSpec":
        """The spec a wire-format ``guard`` object describes (validated by
        :class:`safedecode.integrations.wire.GuardOptions`): its chat format by name (detected from
        ``tokenizer`` when none is named), its tools built from their OpenAI definitions."""
        name = guard.get("chat_format")
        chat_format = load_chat_format(name) if name else detect_chat_format(tokenizer)
        return cls(format=chat_format, nonce=guard["nonce"], system_text=guard.get("system_text", ""),
                   trusted_text=guard.get("trusted_text", ""), tools=tool_models(guard.get("tools") or []),
                   allow_hosts=tuple(allow_hosts), tool_choice=guard.get("tool_choice", "auto"),
                   leak_window=DEFAULT_LEAK_WINDOW if leak_window is None else leak_window, policies=policies)


def _policies(value: Any) -> tuple:
    """``None``, a :class:`Policy` or a sequence of them, as a tuple (one clear error otherwise)."""
    items: Optional[list] = [] if value is None else [value] if isinstance(value, Policy) else None
    if items is None:
        try:
            items = list(value)
        except TypeError:
            items = [value]
    for item in items:
        if not isinstance(item, Policy):
            raise PolicyError(f"policy must be a safedecode.Policy, a sequence of them, or None; got "
                              f"{type(item).__name__}")
    return tuple(items)
