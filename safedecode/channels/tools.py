"""Capability-limited tool calls: declared tools only, schema-valid JSON, trusted argument values.

A tool is a pydantic model: the class name is the tool's name, the docstring its description, the
fields its arguments. Under a guard with tools, a tool call (the chat format's tags around
``{"name": ..., "arguments": {...}}``) is a *block rule* whose body is the JSON-schema regex of
"one of the declared tools with valid arguments" (outlines-core builds it), so the model cannot
name another tool or write an argument the schema refuses.

Capability fields:
  * ``Literal[...]`` and enum fields are allow-lists (the schema's ``enum``);
  * ``FromTrusted(pattern)`` on a ``str`` — at any depth: ``Optional[Annotated[str, FromTrusted(p)]]``,
    ``Annotated[str, ...] | None``, ``list[...]``, ``dict[str, ...]`` values, fields of nested models —
    may only take a value that ``pattern`` matched in the trusted segments (system and user text):
    an address that appears only in untrusted content is impossible. The marker travels in the
    JSON schema (``"x-safedecode-from-trusted"``); every marked string schema becomes the ``enum``
    of the trusted matches. With no match the position is impossible: a required field makes its
    object impossible (a required field of the arguments: the tool cannot be called), an optional
    one may only be left out, a union keeps its other branches (``None``), a list may only be
    empty, a dict only ``{}``. A marker the guard cannot honour (on a non-``str`` type, on a union as
    a whole, under ``not``/``if``/``patternProperties``...) is refused with :class:`ToolError` naming
    the tool and the JSON path — never ignored. :func:`parse_tool_calls` checks the same markers
    again on the parsed call (validation context), at any depth.

Tool arguments, as the tool sees them (DESIGN §6): rules apply to the *decoded* value of every
JSON string. The escapes a call may use are only ``\\"`` and ``\\\\`` (no ``\\u``, ``\\/``, ``\\n``,
``\\t``...; a value cannot hold a control character): this holds for plain strings, for ``pattern``
and ``format`` strings (their regex is rewritten over the JSON spelling: :func:`json_spelling`)
and for ``enum``/``const`` values (one holding a control character is refused). Both escapes start
and end with a non-word character, like the character they stand for, so a value's text and its
spelling agree on ``\\b``; the guard adds, for each policy rule that can match ``"`` or ``\\``, a
companion rule over the escaped spelling (:func:`escaped_spelling_rules`). Over-blocking, by
design: a companion rule applies to the whole output, so with tools declared, text *outside* a
call that spells a forbidden phrase with ``\\"`` or ``\\\\`` (as CommonMark renders them: ``\\"``
reads ``"``) is refused too; a rule anchored at the start or end (``^``, ``\\A``, ``$``, ``\\Z``)
also matches after / before any ``"`` (the quotes that delimit a value).
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Iterable, Optional

import regex
from pydantic import BaseModel, ValidationError
from pydantic_core import core_schema

from ..errors import PatternError, PolicyError, SafeDecodeError

# outlines-core's escape alternative inside JSON strings, and the narrower one we allow.
_OUTLINES_ESCAPES = r'\\["\\/bfnrt]'
_ALLOWED_ESCAPES = r'\\["\\]'
#: JSON-schema keyword that carries a FromTrusted marker (also the server's OpenAI extension).
TRUSTED_KEY = "x-safedecode-from-trusted"
_TRUSTED_CASE_KEY = "x-safedecode-from-trusted-ignore-case"
#: The validation-context key under which :func:`parse_tool_calls` passes the trusted text.
TRUSTED_CONTEXT = "safedecode_trusted_text"
_QUOTE, _BACKSLASH = 0x22, 0x5C
_CONTROL = (0x00, 0x1F)  # JSON requires these to be escaped; calls may not escape them


class ToolError(PolicyError):
    """A tool declaration the guard cannot use (not a pydantic model, duplicate name, bad schema)."""


class FromTrusted:
    """Field marker: the value must be one of ``pattern``'s matches in the trusted segments.

    Put it on a ``str`` (``Annotated[str, FromTrusted(p)]``), at any depth. Under a guard the
    field's JSON schema becomes the enum of trusted matches; pydantic validation with the context
    ``{TRUSTED_CONTEXT: trusted_text}`` (as :func:`parse_tool_calls` does when given the trusted
    text) checks the value too; without that context pydantic does not check it.
    """

    def __init__(self, pattern: str, ignore_case: bool = False):
        try:
            self.regex = regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
        except regex.error as exc:
            raise PolicyError(f"FromTrusted({pattern!r}): invalid regex: {exc}") from None
        self.pattern = pattern
        self.ignore_case = ignore_case

    def values(self, trusted_text: str) -> list[str]:
        """The distinct matches in ``trusted_text``, in order of appearance."""
        return list(dict.fromkeys(m.group() for m in self.regex.finditer(trusted_text)))

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler):
        json_schema = dict(handler(schema))
        json_schema[TRUSTED_KEY] = self.pattern
        if self.ignore_case:
            json_schema[_TRUSTED_CASE_KEY] = True
        return json_schema

    def _check(self, value, info):
        context = info.context
        if isinstance(context, dict) and TRUSTED_CONTEXT in context:
            if not isinstance(value, str) or value not in self.values(context[TRUSTED_CONTEXT]):
                raise ValueError(f"{value!r} is not a value of {self!r} in the trusted text")
        return value

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
    """The top-level fields of ``tool`` annotated directly with :class:`FromTrusted` (markers at
    other depths are found in the JSON schema: :func:`arguments_schema`)."""
    return {name: marker for name, field in tool.model_fields.items()
            for marker in field.metadata if isinstance(marker, FromTrusted)}


# ---------------------------------------------------------------------------------------------
# Regexes over the JSON spelling of a string
# ---------------------------------------------------------------------------------------------
class _Unspellable(Exception):
    """A pattern part that no JSON string a call may write can match."""


def _contains(ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _subtract(ranges, cuts) -> tuple:
    out = []
    for lo, hi in ranges:
        for clo, chi in sorted(cuts):
            if chi < lo or clo > hi:
                continue
            if clo > lo:
                out.append((lo, clo - 1))
            lo = chi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return tuple(out)


def _spell(node, mode: str) -> str:
    """Regex source for the JSON spellings of the strings ``node`` matches.

    ``mode="string"``: inside a JSON string of a call (a ``pattern`` or ``format``): ``"`` and ``\\``
    may only be written ``\\"`` and ``\\\\``, a control character not at all. ``mode="rule"``: the
    companion of a forbidden rule over the raw output: every character keeps its own spelling and
    ``"``/``\\`` gain their escaped one; start/end anchors also match at a value's quotes.
    """
    from ..automata import charsets
    from ..automata.syntax import Alt, Assert, Chars, Repeat, Seq
    from ..policy.variants import ranges_class

    if isinstance(node, Chars):
        ranges = charsets.resolve(node.spec)
        if mode == "string":
            kept = _subtract(ranges, [_CONTROL, (_QUOTE, _QUOTE), (_BACKSLASH, _BACKSLASH)])
        else:
            kept = ranges
        parts = [ranges_class(kept)] if kept else []
        if _contains(ranges, _QUOTE):
            parts.append(r'\\"')
        if _contains(ranges, _BACKSLASH):
            parts.append(r"\\\\")
        if not parts:
            raise _Unspellable
        return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
    if isinstance(node, Assert):
        if mode == "string":
            raise ToolError(f"anchors and word boundaries are only supported at the ends of a string pattern "
                            f"(found {node.kind})")
        return {"start": r'(?:\A|")', "end": r'(?:\Z|")', "dollar": r'(?:$|")', "word_boundary": r"\b",
                "not_word_boundary": r"\B"}[node.kind]
    if isinstance(node, Seq):
        return "".join(_spell(item, mode) for item in node.items) if node.items else "(?:)"
    if isinstance(node, Alt):
        branches = []
        for item in node.items:
            try:
                branches.append(_spell(item, mode))
            except _Unspellable:
                pass
        if not branches:
            raise _Unspellable
        return "(?:" + "|".join(branches) + ")"
    if isinstance(node, Repeat):
        try:
            item = _spell(node.item, mode)
        except _Unspellable:
            if node.min == 0:
                return "(?:)"
            raise
        return f"(?:{item}){{{node.min},{'' if node.max is None else node.max}}}"
    raise TypeError(node)


def _strip_edge_anchors(node):
    """``node`` without the ``^``/``\\A`` it starts with and the ``$``/``\\Z`` it ends with (a string
    pattern in a call matches the whole value)."""
    from ..automata.syntax import Alt, Assert, Seq

    if isinstance(node, Alt):
        return Alt(tuple(_strip_edge_anchors(item) for item in node.items))
    if isinstance(node, Assert) and node.kind in ("start", "end", "dollar"):
        return Seq(())
    if isinstance(node, Seq):
        items = list(node.items)
        while items and isinstance(items[0], Assert) and items[0].kind == "start":
            items.pop(0)
        while items and isinstance(items[-1], Assert) and items[-1].kind in ("end", "dollar"):
            items.pop()
        return Seq(tuple(_strip_edge_anchors(item) if isinstance(item, Alt) else item for item in items))
    return node


def json_spelling(pattern: str, ignore_case: bool = False) -> str:
    """The regex of the JSON-string *contents* (between the quotes) whose decoded value fully
    matches ``pattern``, with only the escapes a call may use (``\\"``, ``\\\\``). Raises
    :class:`ToolError` if no such content exists or the pattern uses a construct the automaton
    cannot express."""
    from ..automata.syntax import (
        parse_allowing_empty,  # a string pattern may match the empty string
    )

    try:
        regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
        node = _strip_edge_anchors(parse_allowing_empty(pattern, ignore_case))
    except PatternError as exc:
        raise ToolError(f"string pattern {pattern!r}: {exc}") from None
    except regex.error as exc:
        raise ToolError(f"string pattern {pattern!r}: invalid regex: {exc}") from None
    try:
        return _spell(node, "string")
    except _Unspellable:
        raise ToolError(f"string pattern {pattern!r} matches no value a tool call may write "
                        f"(control characters cannot be written)") from None
    except ToolError as exc:
        raise ToolError(f"string pattern {pattern!r}: {exc}") from None


def _needs_companion(node) -> bool:
    from ..automata import charsets
    from ..automata.syntax import Alt, Assert, Chars, Repeat, Seq

    if isinstance(node, Chars):
        ranges = charsets.resolve(node.spec)
        return _contains(ranges, _QUOTE) or _contains(ranges, _BACKSLASH)
    if isinstance(node, Assert):
        return node.kind in ("start", "end", "dollar")
    if isinstance(node, (Seq, Alt)):
        return any(_needs_companion(item) for item in node.items)
    if isinstance(node, Repeat):
        return _needs_companion(node.item)
    return False


def escaped_spelling_rules(policy) -> list[dict]:
    """Companion rules that make each literal/regex rule of ``policy`` apply to the *decoded* value
    of every JSON string in a tool call: for a rule that can match ``"`` or ``\\`` (or is anchored),
    a regex rule ``<id>:json-escaped`` matching every spelling of its matches with ``\\"``/``\\\\``
    (and anchors also at a ``"``). Rules matching neither need none: their matches are spelled as
    they are. Exact for values (calls may use no other escape); over-blocks outside values (see
    the module docstring)."""
    from ..automata.syntax import parse
    from ..policy.rules import BlockRule, DocumentRule

    if policy is None:
        return []
    companions = []
    for rule_id, rule in zip(policy.rule_ids(), policy.forbid):
        if isinstance(rule, (BlockRule, DocumentRule)):  # positive grammars: spelled as they are
            continue
        node = parse(rule.pattern, rule.ignore_case, rule_id)
        if _needs_companion(node):
            companions.append({"id": f"{rule_id}:json-escaped", "regex": _spell(node, "rule")})
    return companions


# ---------------------------------------------------------------------------------------------
# Schemas: FromTrusted at any depth, strings as the guard lets a call spell them
# ---------------------------------------------------------------------------------------------
_IMPOSSIBLE = object()  # a schema no value can satisfy (a FromTrusted position without trusted values)
_ANNOTATION_KEYS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly"}
_STRING_KEYS = {"type", "minLength", "maxLength", "pattern", "format"}
_UNHONOURED = ("not", "if", "then", "else", "patternProperties", "dependentSchemas", "dependencies", "contains",
               "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_GENERIC_STRING = None


def _has_control(text: str) -> bool:
    return any(ord(c) <= _CONTROL[1] for c in text)


def _strings_in(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings_in(v)


class _Narrower:
    """One walk over a tool's JSON schema (``$defs``/``$ref``, ``anyOf``/``oneOf``/``allOf``,
    ``properties``, ``items``/``prefixItems``, ``additionalProperties``): every FromTrusted string
    becomes the enum of its trusted values or, without one, impossible (propagated as the module
    docstring says); with ``spell`` (the grammar side) ``pattern``/``format`` strings are rewritten
    over the JSON spelling. A marker left anywhere afterwards is an error, never ignored."""

    def __init__(self, tool: str, schema: dict, trusted_text: str, spell: bool, what: Optional[str] = None):
        self.tool = tool
        # How errors name the schema and its root.
        self.what, self.root = (what, "(the top-level value)") if what else (f"tool {tool!r}, argument",
                                                                              "(the arguments object)")
        self.defs = schema.get("$defs", {})
        self.trusted_text = trusted_text
        self.spell = spell
        self.done: dict[str, Any] = {}
        self.busy: set[str] = set()
        self.assumed: set[str] = set()

    def error(self, path: str, message: str) -> ToolError:
        return ToolError(f"{self.what} {path or self.root}: {message}")

    def run(self, schema: dict):
        body = {k: v for k, v in schema.items() if k != "$defs"}
        result = self.walk(body, "")
        if self.assumed & {name for name, r in self.done.items() if r is _IMPOSSIBLE}:
            raise self.error("", "a recursive model refers to itself where a FromTrusted field has no trusted "
                                 "value; the guard cannot express that")
        if result is _IMPOSSIBLE:
            return None
        defs = {name: r for name, r in self.done.items() if r is not _IMPOSSIBLE}
        if defs:
            result["$defs"] = defs
        if self.marked(result, defs=defs):
            raise self.error("", f"a {TRUSTED_KEY} marker was left in the schema (the guard cannot honour it)")
        return result

    def marked(self, value, seen=None, defs=None) -> bool:
        """Whether ``value`` holds a FromTrusted marker, following ``$ref`` into ``defs`` (default:
        the original ones)."""
        seen = set() if seen is None else seen
        defs = self.defs if defs is None else defs
        if isinstance(value, dict):
            if TRUSTED_KEY in value or _TRUSTED_CASE_KEY in value:
                return True
            ref = value.get("$ref")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                if self.marked(defs.get(ref.removeprefix("#/$defs/")), seen, defs):
                    return True
            return any(self.marked(v, seen, defs) for v in value.values())
        if isinstance(value, list):
            return any(self.marked(v, seen, defs) for v in value)
        return False

    def ref(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#/$defs/") or ref.removeprefix("#/$defs/") not in self.defs:
            raise self.error(path, f"unsupported $ref {ref!r}")
        name = ref.removeprefix("#/$defs/")
        if name in self.busy:  # recursion: checked after the walk (run)
            self.assumed.add(name)
            return None
        if name not in self.done:
            self.busy.add(name)
            self.done[name] = self.walk(self.defs[name], path)
            self.busy.discard(name)
        return self.done[name]

    def walk(self, schema, path: str):
        if not isinstance(schema, dict):
            return schema
        s = dict(schema)
        if TRUSTED_KEY in s or _TRUSTED_CASE_KEY in s:
            return self.trusted(s, path)
        for key in ("enum", "const"):
            if key in s and any(_has_control(t) for t in _strings_in(s[key])):
                raise self.error(path, f"{key} holds a string with a control character, which a call cannot "
                                       f"spell (only the escapes \\\" and \\\\ are allowed)")
        for key in _UNHONOURED:
            if key in s and self.marked(s[key]):
                raise self.error(path, f"FromTrusted under {key!r} cannot be honoured")
        if "$ref" in s and self.ref(s["$ref"], path) is _IMPOSSIBLE:
            return _IMPOSSIBLE
        for key in ("anyOf", "oneOf"):
            if key in s:
                kept = [b for b in (self.walk(b, path) for b in s[key]) if b is not _IMPOSSIBLE]
                if not kept:
                    return _IMPOSSIBLE
                s[key] = kept
        if "allOf" in s:
            parts = [self.walk(b, path) for b in s["allOf"]]
            if any(p is _IMPOSSIBLE for p in parts):
                return _IMPOSSIBLE
            s["allOf"] = parts
        if isinstance(s.get("properties"), dict):
            required = set(s.get("required", ()))
            properties = {}
            for key, sub in s["properties"].items():
                narrowed = self.walk(sub, f"{path}.{key}" if path else key)
                if narrowed is _IMPOSSIBLE:
                    if key in required:
                        return _IMPOSSIBLE
                    continue  # may only be left out
                properties[key] = narrowed
            s["properties"] = properties
        if isinstance(s.get("items"), dict):
            narrowed = self.walk(s["items"], f"{path}[]")
            if narrowed is _IMPOSSIBLE:
                if s.get("minItems", 0) > 0:
                    return _IMPOSSIBLE
                del s["items"]
                s["maxItems"] = 0  # only the empty list
            else:
                s["items"] = narrowed
        if isinstance(s.get("prefixItems"), list):
            parts = [self.walk(b, f"{path}[{i}]") for i, b in enumerate(s["prefixItems"])]
            if any(p is _IMPOSSIBLE for p in parts):
                return _IMPOSSIBLE
            s["prefixItems"] = parts
        if isinstance(s.get("additionalProperties"), dict):
            narrowed = self.walk(s["additionalProperties"], f"{path}{{}}")
            if narrowed is _IMPOSSIBLE:
                if s.get("minProperties", 0) > 0 or s.get("required") or s.get("properties"):
                    return _IMPOSSIBLE  # fail closed: could be exact, but no such tool is known
                return {k: v for k, v in s.items() if k in _ANNOTATION_KEYS} | {"enum": [{}]}
            s["additionalProperties"] = narrowed
        if self.spell and ("pattern" in s or "format" in s):
            self.spell_string(s, path)
        return s

    def trusted(self, s: dict, path: str):
        pattern = s.pop(TRUSTED_KEY, None)
        ignore_case = s.pop(_TRUSTED_CASE_KEY, False)
        constraints = {k: v for k, v in s.items() if k not in _ANNOTATION_KEYS}
        if not isinstance(pattern, str) or constraints.get("type") != "string" or set(constraints) - _STRING_KEYS:
            raise self.error(path, f"FromTrusted applies to a str only (Annotated[str, FromTrusted(...)], "
                                   f"inside Optional/list/dict/models as needed); here it marks "
                                   f"{json.dumps(constraints)[:120]}")
        import jsonschema

        values = []
        for value in FromTrusted(pattern, bool(ignore_case)).values(self.trusted_text):
            if _has_control(value) or not jsonschema.Draft202012Validator(constraints).is_valid(value):
                continue  # a value the call could not spell, or one the field refuses
            values.append(value)
        if not values:
            return _IMPOSSIBLE
        return {k: v for k, v in s.items() if k in _ANNOTATION_KEYS - {"default"}} | {"enum": values}

    def spell_string(self, s: dict, path: str) -> None:
        """Rewrite ``pattern``/``format`` as a regex over the JSON spelling (outlines-core puts the
        pattern between the quotes as it is, which would admit raw quotes and any escape)."""
        from outlines_core.json_schema import build_regex_from_schema

        global _GENERIC_STRING
        if _GENERIC_STRING is None:
            _GENERIC_STRING = build_regex_from_schema(json.dumps({"type": "string"}))
        if s.get("type") != "string":
            raise self.error(path, f"'pattern'/'format' are supported on strings only (type {s.get('type')!r})")
        if "format" in s:
            if "pattern" in s:
                raise self.error(path, "a string with both 'pattern' and 'format' is not supported")
            fmt = s.pop("format")
            try:
                grammar = build_regex_from_schema(json.dumps({"type": "string", "format": fmt}))
            except Exception as exc:
                raise self.error(path, f"format {fmt!r}: {exc}") from None
            if grammar == _GENERIC_STRING:
                return  # a format outlines-core does not constrain: any string (pydantic checks it)
            if not (grammar.startswith('"') and grammar.endswith('"')):
                raise self.error(path, f"format {fmt!r}: unexpected grammar {grammar[:60]!r}")
            source = grammar[1:-1]
        else:
            source = s["pattern"]
        try:
            s["pattern"] = json_spelling(source)
        except ToolError as exc:
            raise self.error(path, str(exc)) from None


def _narrowed(tool: type[BaseModel], trusted_text: str, spell: bool) -> Optional[dict]:
    try:
        schema = tool.model_json_schema()
    except Exception as exc:  # pydantic cannot describe a type
        raise ToolError(f"tool {tool.__name__!r}: no JSON schema: {exc}") from None
    return _Narrower(tool.__name__, schema, trusted_text, spell).run(schema)


def arguments_schema(tool: type[BaseModel], trusted_text: str) -> Optional[dict]:
    """The JSON schema of ``tool``'s arguments with every FromTrusted string (at any depth) narrowed
    to the enum of its trusted values; None if the arguments have no possible value (a required
    field with no trusted value: the tool cannot be called)."""
    return _narrowed(tool, trusted_text, spell=False)


def tool_call_regex(tools: dict[str, type[BaseModel]], trusted_text: str, arguments_key: str = "arguments") -> Optional[str]:
    """The regex of one call ``{"name": <declared tool>, "<arguments_key>": <valid arguments>}``,
    or None when no tool can be called (a required FromTrusted field has no trusted value).
    Strings may use only the escapes ``\\"`` and ``\\\\`` (see the module docstring)."""
    alternatives = []
    for name, tool in tools.items():
        args = _narrowed(tool, trusted_text, spell=True)
        if args is None:
            continue
        definitions = args.pop("$defs", {})
        call = {"type": "object", "properties": {"name": {"const": name}, arguments_key: args},
                "required": ["name", arguments_key], "$defs": definitions}
        alternatives.append(_grammar(call, f"tool {name!r}"))
    return "|".join(f"(?:{a})" for a in alternatives) if alternatives else None


def json_schema_regex(schema: dict, trusted_text: str = "", what: str = "output_type") -> Optional[str]:
    """The regex of one JSON document valid under ``schema`` (a JSON schema), spelled as the guard
    lets a tool call spell its arguments: FromTrusted strings narrowed to their trusted values,
    ``pattern``/``format`` over the JSON spelling, only the escapes ``\\"`` and ``\\\\``. None if no
    value is possible. Errors start with ``what`` and name the JSON path."""
    narrowed = _Narrower(what, schema, trusted_text, spell=True, what=f"{what}: at").run(schema)
    return None if narrowed is None else _grammar(narrowed, what)


def _grammar(schema: dict, what: str) -> str:
    """outlines-core's regex of ``schema`` with the narrower string escapes."""
    from outlines_core.json_schema import build_regex_from_schema

    try:
        pattern = build_regex_from_schema(json.dumps(schema))
    except Exception as exc:  # outlines-core raises its own error types
        raise ToolError(f"{what}: its schema cannot be turned into a grammar: {exc}") from None
    return pattern.replace(_OUTLINES_ESCAPES, _ALLOWED_ESCAPES)


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
                     arguments_key: str = "arguments", trusted_text: Optional[str] = None) -> list[BaseModel]:
    """The completed calls in ``text`` as validated model instances; an unfinished last call is
    ignored (it was cut by the token limit). A call that does not validate raises ToolCallError.

    With ``trusted_text`` (the conversation's system and user text), every FromTrusted value, at
    any depth, must also be one of its pattern's matches there (defense in depth: the guard
    already makes other values impossible)."""
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
        calls.append(_validate_call(payload, tools, arguments_key, start, trusted_text))
    return calls


def _validate_call(payload, tools, arguments_key: str, at: int, trusted_text: Optional[str] = None) -> BaseModel:
    if not isinstance(payload, dict) or payload.get("name") not in tools:
        name = payload.get("name") if isinstance(payload, dict) else None
        raise ToolCallError(f"tool call at {at}: {name!r} is not a declared tool ({sorted(tools)})")
    try:
        context = None if trusted_text is None else {TRUSTED_CONTEXT: trusted_text}
        return tools[payload["name"]].model_validate(payload.get(arguments_key, {}), context=context)
    except ValidationError as exc:
        raise ToolCallError(f"tool call at {at} to {payload['name']!r}: {exc.errors()[0]['msg']}") from None
