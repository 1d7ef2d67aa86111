"""Chat formats as data: how a model's conversation turns are delimited (``channels/*.toml``).

A :class:`ChatFormat` says which control tokens a model's chat template uses, how a turn of each
of our roles (``system``, ``user``, ``assistant``, ``tool``) starts and ends, how the assistant's
turn is opened for generation, and how tool calls and tool results are wrapped. The prompt
builder uses it to keep instructions (system/user turns) and untrusted content (tool results,
documents) in separate channels.

Invariants:
  * a :class:`ChatFormat` is immutable (frozen models, tuples), so it can be hashed and shared;
  * ``end_of_turn`` and a non-empty ``bos`` are among ``control_tokens``;
  * ``roles.system`` is given exactly when ``system_role_supported``; without a system role the
    system text opens the first user turn, followed by a blank line (:meth:`ChatFormat.render`);
  * bad input raises exactly one :class:`ChatFormatError` (never a raw pydantic error) naming the
    file (when loading) and the field, e.g. ``chatml.toml: field 'roles.user.turn_start': ...``.

The shipped formats live in ``channels/`` at the repository root and ship in the wheel
(:mod:`safedecode.resources`); ``$SAFEDECODE_CHANNELS_DIR`` adds directories.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ChatFormatError
from ..resources import CHANNELS_ENV, catalogue, find, from_mapping, read_toml  # noqa: F401  (CHANNELS_ENV: re-exported)

#: Our role names, in the order of :meth:`ChatFormat.role_headers`.
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

#: Other names accepted by :func:`load_chat_format` (compared lower-case).
ALIASES = {"hermes": "chatml", "qwen": "chatml", "smollm": "chatml", "smollm2": "chatml",
           "llama-3": "llama3"}


_Text = Annotated[str, Field(min_length=1)]
# TOML arrays arrive as lists: the tuple fields accept them (strict=False), their items stay strict.
_Markers = Annotated[tuple[_Text, ...], Field(min_length=1, strict=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RoleSpec(_Frozen):
    """One of our roles in a format: the format's role name (substituted for ``{role}``) and,
    optionally, its own turn delimiters overriding the format's ``turn_start``/``turn_end``.
    In TOML a bare string is shorthand for ``{ name = "..." }``."""

    name: _Text
    turn_start: Optional[str] = None
    turn_end: Optional[str] = None


class Roles(_Frozen):
    """Our role names → the format's. ``system`` is absent exactly when the format has no system
    role (then the system text opens the first user turn)."""

    system: Optional[RoleSpec] = None
    user: RoleSpec
    assistant: RoleSpec
    tool: RoleSpec

    @field_validator("system", "user", "assistant", "tool", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ChatFormat(_Frozen):
    """An immutable chat format (one ``channels/*.toml`` file); see the module docstring for the
    invariants. Construction validates everything; bad input raises one :class:`ChatFormatError`
    naming the field."""

    name: _Text
    description: _Text
    bos: str
    control_tokens: _Markers
    end_of_turn: _Text
    turn_start: str
    turn_end: str
    roles: Roles
    system_role_supported: bool
    generation_prompt: str
    tool_call_open: str
    tool_call_close: str
    tool_call_arguments_key: _Text
    tool_result_open: str
    tool_result_close: str
    detect: _Markers

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ChatFormatError(_describe(exc.errors()[0])) from None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatFormat":
        if self.end_of_turn not in self.control_tokens:
            raise ValueError(f"field 'end_of_turn': {self.end_of_turn!r} is not one of control_tokens")
        if self.bos and self.bos not in self.control_tokens:
            raise ValueError(f"field 'bos': {self.bos!r} is not one of control_tokens")
        if self.system_role_supported and self.roles.system is None:
            raise ValueError("field 'roles.system': missing, but system_role_supported = true")
        if not self.system_role_supported and self.roles.system is not None:
            raise ValueError("field 'roles.system': must be absent when system_role_supported = false "
                             "(the system text then opens the first user turn)")
        return self

    def _spec(self, role: str) -> RoleSpec:
        if role not in ROLES:
            raise ChatFormatError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        spec = getattr(self.roles, role)
        if spec is None:
            raise ChatFormatError(f"chat format {self.name!r} has no system role: the system text "
                                  f"opens the first user turn (see ChatFormat.render)")
        return spec

    def turn_start_for(self, role: str) -> str:
        """The text opening a turn of ``role`` (one of :data:`ROLES`): the role's own
        ``turn_start`` or the format's, with ``{role}`` replaced by the format's role name."""
        spec = self._spec(role)
        template = self.turn_start if spec.turn_start is None else spec.turn_start
        return template.replace("{role}", spec.name)

    def turn_end_for(self, role: str) -> str:
        """The text closing a turn of ``role``: the role's own ``turn_end`` or the format's."""
        spec = self._spec(role)
        template = self.turn_end if spec.turn_end is None else spec.turn_end
        return template.replace("{role}", spec.name)

    def role_headers(self) -> tuple[str, ...]:
        """Every distinct turn start of this format that contains a control token, in role order:
        the headers an imitation inside untrusted content could forge."""
        headers = (self.turn_start_for(r) for r in ROLES if getattr(self.roles, r) is not None)
        real = (h for h in headers if any(t in h for t in self.control_tokens))
        return tuple(dict.fromkeys(real))

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The prompt text of ``messages`` (mappings with ``role`` in :data:`ROLES` and ``content``),
        as the format's chat template writes it: ``bos``, then one turn per message, then
        ``generation_prompt`` if asked. A tool message's content is wrapped in ``tool_result_open``
        / ``tool_result_close`` inside a tool turn. Without a system role, a system message must
        come first and its text opens the first user turn, followed by a blank line.

        Contents are inserted verbatim (not trimmed, not escaped). ``bos`` is part of the text:
        tokenize it with ``add_special_tokens=False``."""
        parts = [self.bos]
        pending_system = None
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system" and not self.system_role_supported:
                if i != 0:
                    raise ChatFormatError(f"message {i}: chat format {self.name!r} has no system role; "
                                          "a system message must come first")
                pending_system = content
                continue
            if role == "user" and pending_system is not None:
                content, pending_system = f"{pending_system}\n\n{content}", None
            elif role == "tool":
                content = self.tool_result_open + content + self.tool_result_close
            parts += [self.turn_start_for(role), content, self.turn_end_for(role)]
        if pending_system is not None:
            raise ChatFormatError(f"chat format {self.name!r} has no system role and no user message "
                                  "follows the system message")
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


_KEYS = {
    "format": ", ".join(ChatFormat.model_fields),
    "roles": ", ".join(Roles.model_fields),
    "role": ", ".join(RoleSpec.model_fields),
}


def _describe(err: dict) -> str:
    """One pydantic error as ``field 'a.b': what is wrong``."""
    inner = err.get("ctx", {}).get("error")
    if isinstance(inner, ValueError):  # our own cross-field checks already name their field
        return str(inner)
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "format"
    kind = err["type"]
    if kind == "extra_forbidden":
        which = "format" if len(loc) == 1 else "roles" if len(loc) == 2 else "role"
        what = f"unknown key (allowed: {_KEYS[which]})"
    elif kind == "missing":
        what = "missing (required)"
    elif kind in ("string_too_short", "too_short"):
        what = "must not be empty"
    else:
        what = f"{err['msg']} (got {err.get('input')!r})"
    return f"field '{field}': {what}"


def available_chat_formats() -> list[str]:
    """The names of the chat formats: the shipped ones and those of ``$SAFEDECODE_CHANNELS_DIR``
    (:mod:`safedecode.resources`), sorted."""
    return list(catalogue("chat-format", ChatFormatError))


def load_chat_format(name_or_path: str | os.PathLike) -> ChatFormat:
    """A chat format by name (case-insensitive; see :data:`ALIASES`) or from a ``.toml`` path.
    Errors name the file and the field."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or os.sep in text or "/" in text:
        entry = Path(text)
    else:
        key = ALIASES.get(text.lower(), text.lower())
        try:
            entry = find("chat-format", key, ChatFormatError)
        except ChatFormatError as exc:
            raise ChatFormatError(f"{exc} (aliases: {', '.join(sorted(ALIASES))}), or a path to a .toml file") from None
    return chat_format_from_mapping(read_toml(entry, ChatFormatError, "chat-format"), source=str(entry))


def chat_format_from_mapping(data: Any, source: str = "<chat format>") -> ChatFormat:
    """Validate a plain mapping (parsed TOML/JSON) into a :class:`ChatFormat`; errors start with
    ``source``."""
    return from_mapping(ChatFormat, data, ChatFormatError, source, "a chat format")


def _template_text(tokenizer: Any) -> Optional[str]:
    """The tokenizer's chat template, or None. A dict of named templates (HF) gives its
    ``default`` entry, else all of them joined in name order."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default") or "\n".join(str(template[k]) for k in sorted(template))
    return template if isinstance(template, str) and template else None


def detect_chat_format(tokenizer: Any) -> ChatFormat:
    """The shipped format whose ``detect`` markers all occur in ``tokenizer.chat_template`` or,
    when it has no template, are all tokens of ``tokenizer.get_vocab()``. Of several matches,
    the one with the most markers wins (ties: first name). No match: a :class:`ChatFormatError`
    listing, for each format, the markers not found."""
    template = _template_text(tokenizer)
    if template is not None:
        haystack, where = template, "has a chat_template"
    elif callable(getattr(tokenizer, "get_vocab", None)):
        haystack, where = tokenizer.get_vocab(), "has no chat_template; looked in its vocabulary"
    else:
        haystack, where = {}, "has neither a chat_template nor get_vocab()"
    formats = [load_chat_format(name) for name in available_chat_formats()]
    missing = {f.name: [m for m in f.detect if m not in haystack] for f in formats}
    matches = [f for f in formats if not missing[f.name]]
    if matches:
        return min(matches, key=lambda f: (-len(f.detect), f.name))
    label = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    details = "; ".join(f"{name}: {', '.join(map(repr, miss))} not found" for name, miss in missing.items())
    raise ChatFormatError(f"cannot detect the chat format of tokenizer {label!r} ({where}): {details}. "
                          f"Pass chat_format= explicitly (one of {', '.join(missing)}, or a path to a .toml file)")
