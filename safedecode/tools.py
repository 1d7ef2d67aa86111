"""Capability-limited tool calls: declared tools only, schema-valid JSON, trusted argument values.

A tool is a pydantic model: the class name is the tool's name, the docstring its description, the
fields its arguments. Under a guard with tools, a tool call (the chat format's tags around
``{"name": ..., "arguments": {...}}``) is a *block rule* whose body is the JSON-schema regex of
"one of the declared tools with valid arguments" (outlines-core builds it), so the model cannot
name another tool or write an argument the schema refuses.

Capability fields:
  * ``Literal[...]`` and enum fields are allow-lists (the schema's ``enum``);
  * ``Annotated[str, FromTrusted(pattern)]`` may only take a value that ``pattern`` matched in the
    trusted segments (system and user text) — an address that appears only in untrusted content
    is impossible. With no match, a required field makes its tool impossible to call.

Strings inside a call may use only the escapes ``\\"`` and ``\\\\`` (no ``\\u``, ``\\/``, ``\\n``): the
output rules (links, leaks, policy phrases) read the raw text, so a JSON escape must not be able to
spell what they forbid.
"""
from __future__ import annotations

import inspect
import json
from typing import Iterable, Optional

import regex
from pydantic import BaseModel, ValidationError

from .errors import PolicyError, SafeDecodeError

# outlines-core's escape alternative inside JSON strings, and the narrower one we allow.
_OUTLINES_ESCAPES = r'\\["\\/bfnrt]'
_ALLOWED_ESCAPES = r'\\["\\]'


class ToolError(PolicyError):
    """A tool declaration the guard cannot use (not a pydantic model, duplicate name, bad schema)."""


class FromTrusted:
    """Field marker: the value must be one of ``pattern``'s matches in the trusted segments."""

    def __init__(self, pattern: str, ignore_case: bool = False):
        try:
            self.regex = regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
        except regex.error as exc:
            raise PolicyError(f"FromTrusted({pattern!r}): invalid regex: {exc}") from None
        self.pattern = pattern

    def values(self, trusted_text: str) -> list[str]:
        """The distinct matches in ``trusted_text``, in order of appearance."""
        return list(dict.fromkeys(m.group() for m in self.regex.finditer(trusted_text)))

    def __repr__(self) -> str:
        return f"FromTrusted({self.pattern!r})"


def declare_tools(tools: Optional[Iterable[type[BaseModel]]]) -> dict[str, type[BaseModel]]:
    """Tool name → model, refusing anything that is not a uniquely named pydantic model class."""
    declared: dict[str, type[BaseModel]] = {}
    for i, tool in enumerate(tools or ()):
        if not (isinstance(tool, type) and issubclass(tool, BaseModel)):
            raise ToolError(f"tools[{i}]: {tool!r} is not a pydantic model class (a tool is a BaseModel subclass)")
        if tool.__name__ in declared:
            raise ToolError(f"tools[{i}]: two tools are named {tool.__name__!r}")
        declared[tool.__name__] = tool
    return declared


def trusted_fields(tool: type[BaseModel]) -> dict[str, FromTrusted]:
    """The top-level fields of ``tool`` annotated with :class:`FromTrusted`."""
    return {name: marker for name, field in tool.model_fields.items()
            for marker in field.metadata if isinstance(marker, FromTrusted)}


def arguments_schema(tool: type[BaseModel], trusted_text: str) -> Optional[dict]:
    """The JSON schema of ``tool``'s arguments with FromTrusted fields narrowed to their trusted
    values; None if a required field has no possible value (the tool cannot be called)."""
    schema = tool.model_json_schema()
    properties = schema.get("properties", {})
    for name, marker in trusted_fields(tool).items():
        key = tool.model_fields[name].alias or name
        values = marker.values(trusted_text)
        if values:
            properties[key] = {"enum": values}
        elif key in schema.get("required", ()):
            return None
        else:
            properties.pop(key, None)
    return schema


def tool_call_regex(tools: dict[str, type[BaseModel]], trusted_text: str, arguments_key: str = "arguments") -> Optional[str]:
    """The regex of one call ``{"name": <declared tool>, "<arguments_key>": <valid arguments>}``,
    or None when no tool can be called (a required FromTrusted field has no trusted value)."""
    from outlines_core.json_schema import build_regex_from_schema

    alternatives = []
    for name, tool in tools.items():
        args = arguments_schema(tool, trusted_text)
        if args is None:
            continue
        definitions = args.pop("$defs", {})
        call = {"type": "object", "properties": {"name": {"const": name}, arguments_key: args},
                "required": ["name", arguments_key], "$defs": definitions}
        try:
            pattern = build_regex_from_schema(json.dumps(call))
        except Exception as exc:  # outlines-core raises its own error types
            raise ToolError(f"tool {name!r}: its schema cannot be turned into a grammar: {exc}") from None
        alternatives.append(pattern.replace(_OUTLINES_ESCAPES, _ALLOWED_ESCAPES))
    return "|".join(f"(?:{a})" for a in alternatives) if alternatives else None


def describe_tools(tools: dict[str, type[BaseModel]], trusted_text: str, open_tag: str, close_tag: str,
                   arguments_key: str = "arguments") -> str:
    """The system-prompt text that tells the model which tools exist and how to call them."""
    lines = ["You can call these tools:", "<tools>"]
    for name, tool in tools.items():
        args = arguments_schema(tool, trusted_text)
        if args is None:
            continue
        lines.append(json.dumps({"name": name, "description": inspect.getdoc(tool) or "", "parameters": args}))
    lines.append("</tools>")
    lines.append(f'To call a tool, write {open_tag}{{"name": <tool name>, "{arguments_key}": <arguments object>}}'
                 f'{close_tag} and nothing else.')
    return "\n".join(lines)


class ToolCallError(SafeDecodeError):
    """A tool call in the output that does not parse or validate (impossible under the guard)."""


def parse_tool_calls(text: str, tools: dict[str, type[BaseModel]], open_tag: str, close_tag: str,
                     arguments_key: str = "arguments") -> list[BaseModel]:
    """The completed calls in ``text`` as validated model instances; an unfinished last call is
    ignored (it was cut by the token limit). A call that does not validate raises ToolCallError."""
    calls = []
    position = 0
    open_tag, close_tag = open_tag.strip(), close_tag.strip()
    decoder = json.JSONDecoder()
    while (start := text.find(open_tag, position)) >= 0:
        body_start = start + len(open_tag)
        end = text.find(close_tag, body_start) if close_tag else -1
        try:
            if close_tag:
                if end < 0:
                    break
                payload = json.loads(text[body_start:end])
                position = end + len(close_tag)
            else:
                stripped = len(text[body_start:]) - len(text[body_start:].lstrip())
                payload, used = decoder.raw_decode(text[body_start + stripped:])
                position = body_start + stripped + used
        except json.JSONDecodeError as exc:
            if not close_tag:
                break
            raise ToolCallError(f"tool call at {start}: not JSON: {exc}") from None
        calls.append(_validate_call(payload, tools, arguments_key, start))
    return calls


def _validate_call(payload, tools, arguments_key: str, at: int) -> BaseModel:
    if not isinstance(payload, dict) or payload.get("name") not in tools:
        name = payload.get("name") if isinstance(payload, dict) else None
        raise ToolCallError(f"tool call at {at}: {name!r} is not a declared tool ({sorted(tools)})")
    try:
        return tools[payload["name"]].model_validate(payload.get(arguments_key, {}))
    except ValidationError as exc:
        raise ToolCallError(f"tool call at {at} to {payload['name']!r}: {exc.errors()[0]['msg']}") from None
