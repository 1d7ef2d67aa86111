"""Output types: the shape the whole answer must have, as one more rule of the same automaton.

An output type is, as in outlines: a pydantic model class, a JSON schema (a dict), a regex (a
``str`` or a compiled pattern), or choices (``typing.Literal[...]`` or an ``Enum`` class).
:func:`output_type` turns it into an :class:`OutputType`, whose :meth:`~OutputType.rule` is a
*document rule* (:class:`safedecode.policy.rules.DocumentRule`): the whole text must be one word of
the type's regex, and may end only when it is one. The rule joins the request's policy and guard and
is compiled with them into one product automaton, so "valid JSON of this schema" and "no secret, no
link to another host, no system-prompt span anywhere in it" hold together, exactly, in one pass.

JSON documents are spelled as tool-call arguments are (:mod:`safedecode.channels.tools`): outlines-core
builds the grammar; strings may use only the escapes ``\\"`` and ``\\\\`` (no ``\\u``, ``\\/``...), so
a rule that holds on the text holds on every *decoded* string value, with the companion rules of
:func:`~safedecode.channels.tools.escaped_spelling_rules` for rules that can match ``"`` or ``\\``.

A JSON-schema keyword the grammar cannot enforce is refused with :class:`OutputTypeError` naming the
keyword and its JSON path — never ignored (see :data:`ENFORCED_KEYWORDS`). Verified against
outlines-core 0.2: numeric bounds (``minimum``, ``multipleOf``...), ``uniqueItems``,
``maxProperties``, ``contains``, ``patternProperties``, ``propertyNames`` and formats it does not
constrain are ignored by the builder, and ``allOf`` with several branches is concatenated, so all of
them are refused; ``oneOf`` is enforced as "one of" only where its branches cannot overlap (a
discriminated union, or branches of different JSON types).
"""
from __future__ import annotations

import enum
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import regex
from pydantic import BaseModel, ValidationError

from ..errors import SafeDecodeError
from ..policy.rules import Policy
from .tools import escaped_spelling_rules, json_schema_regex

#: Schema keywords the grammar enforces (or that do not constrain the value: annotations).
ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const", "$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf",
    "properties", "required", "additionalProperties", "minProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format", "minDigits", "maxDigits",
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "$schema", "$id", "$comment", "discriminator",
})
#: String formats outlines-core constrains (any other is refused).
ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid", "email", "uri"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


class OutputTypeError(SafeDecodeError):
    """An output type the guard cannot enforce exactly, or an answer that does not parse as it."""


@dataclass(frozen=True)
class OutputType:
    """An output type made enforceable: ``document`` is the regex of every allowed answer."""

    kind: str                       # "json", "regex" or "choice"
    document: str                   # the regex of a whole answer
    schema: Optional[dict]          # the JSON schema (kind "json")
    parser: Callable[[str], Any]    # text → the validated value

    def rule(self) -> dict:
        """The document rule (a rule mapping for :class:`~safedecode.Policy`); a JSON document's
        says that the text holds JSON strings (the guard then adds the escaped-spelling companions)."""
        return {"id": f"output:{self.kind}", "document": self.document, "json_strings": self.kind == "json"}

    def policy(self, policy: Optional[Policy] = None) -> Policy:
        """One policy for a plain prompt (no guard): ``policy``'s rules — with their JSON-escaped
        companions for a JSON document, so they hold on every decoded string value — this type's
        document rule, and every special token but EOS forbidden."""
        rules = list(policy.forbid) if policy is not None else []
        if policy is not None and self.kind == "json":
            rules += escaped_spelling_rules(policy)
        # A document holds no control tokens (they have no text: they would let a row that cannot
        # complete its document wander instead of ending).
        return Policy(forbid=rules + [self.rule()], special_tokens="forbid")

    def parse(self, text: str) -> Any:
        """The validated value of a complete answer; :class:`OutputTypeError` if it is not one."""
        if not regex.fullmatch(self.document, text):
            raise OutputTypeError(f"the answer is not a complete {self.kind} value of the output type "
                                  f"(it was cut short: max_new_tokens, or the guard ended it)")
        try:
            return self.parser(text)
        except (ValueError, ValidationError) as exc:
            raise OutputTypeError(f"the answer does not validate against the output type: {exc}") from None


def output_type(spec: Any, trusted_text: str = "") -> OutputType:
    """The :class:`OutputType` of ``spec`` (see the module docs). ``trusted_text``: FromTrusted
    fields of a pydantic model take only values found there, as in tool arguments."""
    if isinstance(spec, OutputType):
        return spec
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        schema = spec.model_json_schema()
        return _json(schema, trusted_text, spec.model_validate_json)
    if isinstance(spec, dict):
        return _json(spec, trusted_text, lambda text: _validated(spec, json.loads(text)))
    if isinstance(spec, (str, re.Pattern, regex.Pattern)):
        pattern = spec if isinstance(spec, str) else spec.pattern
        try:
            Policy(forbid=[{"id": "output:regex", "document": pattern}])
        except SafeDecodeError as exc:
            raise OutputTypeError(f"output_type regex {pattern!r}: {exc}") from None
        return OutputType("regex", pattern, None, lambda text: text)
    if isinstance(spec, type) and issubclass(spec, enum.Enum):
        values = {_choice_text(member.value, spec): member for member in spec}
        return _choices(values)
    if typing.get_origin(spec) is typing.Literal:
        return _choices({_choice_text(value, spec): value for value in typing.get_args(spec)})
    raise OutputTypeError(f"output_type: {spec!r} is not a pydantic model class, a JSON schema (dict), a regex "
                          f"(str) or choices (typing.Literal / an Enum class)")


def _choice_text(value: Any, owner: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise OutputTypeError(f"output_type {owner!r}: choice {value!r} is not a str or an int")
    return str(value)


def _choices(values: dict) -> OutputType:
    if not values or any(not text for text in values):
        raise OutputTypeError("output_type: choices must be non-empty strings (or ints)")
    document = "|".join(regex.escape(text) for text in sorted(values, key=lambda t: (-len(t), t)))
    return OutputType("choice", document, None, lambda text: values[text])


def _validated(schema: dict, value: Any) -> Any:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise ValueError(exc.message) from None
    return value


def _json(schema: dict, trusted_text: str, parser: Callable[[str], Any]) -> OutputType:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top level)"
        raise OutputTypeError(f"output_type: not a valid JSON schema at {where}: {exc.message}") from None
    schema = _enforceable(schema, schema, "")
    try:
        document = json_schema_regex(schema, trusted_text, "output_type")
    except SafeDecodeError as exc:
        raise OutputTypeError(str(exc)) from None
    if document is None:
        raise OutputTypeError("output_type: no value is possible (a required FromTrusted field has no value "
                              "in the trusted text)")
    return OutputType("json", document, schema, parser)


def _enforceable(node: Any, root: dict, path: str) -> Any:
    """``node`` with every keyword checked (see the module docs), ``additionalProperties: false``
    made explicit as the builder needs it; :class:`OutputTypeError` names the first keyword the
    grammar cannot enforce and where it is."""
    if isinstance(node, bool):
        if node:
            return {}
        raise OutputTypeError(f"output_type: at {path or '(top level)'}: the schema `false` admits no value")
    if not isinstance(node, dict):
        return node
    where = path or "(top level)"
    for key in node:
        if key not in ENFORCED_KEYWORDS and not str(key).startswith("x-safedecode-"):
            raise OutputTypeError(f"output_type: at {where}: keyword {key!r} cannot be enforced by the grammar "
                                  f"(it would be ignored); remove it or express it with enum/pattern/anyOf")
    if "format" in node and node["format"] not in ENFORCED_FORMATS:
        raise OutputTypeError(f"output_type: at {where}: format {node['format']!r} cannot be enforced by the "
                              f"grammar (enforced: {', '.join(sorted(ENFORCED_FORMATS))})")
    if len(node.get("allOf", ())) > 1:
        raise OutputTypeError(f"output_type: at {where}: allOf with several schemas cannot be enforced by the "
                              f"grammar (merge them into one schema)")
    if "oneOf" in node and not _disjoint(node["oneOf"], root):
        raise OutputTypeError(f"output_type: at {where}: oneOf branches may overlap, and the grammar enforces "
                              f"'one of' only for a discriminated union or branches of different types; use anyOf")
    out = dict(node)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _enforceable(sub, root, (f"{path}.{name}" if path else name)
                                      if key == "properties" else f"#/{key}/{name}")
                        for name, sub in node[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_enforceable(sub, root, f"{path}[{key} {i}]") for i, sub in enumerate(node[key])]
    for key in _SUBSCHEMAS:
        if key in node and node[key] is not False:
            out[key] = _enforceable(node[key], root, f"{path}[]" if key == "items" else f"{path}{{}}")
    if node.get("additionalProperties") is False:  # the builder's objects are closed already
        del out["additionalProperties"]
        if not node.get("properties"):  # only the empty object
            out = {k: v for k, v in out.items() if k in ("title", "description")} | {"enum": [{}]}
    return out


def _resolve(node: Any, root: dict) -> Any:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        node = target
    return node


def _disjoint(branches: list, root: dict) -> bool:
    """Whether no value can match two of ``branches``: different single JSON types, or objects that
    all require one property with distinct ``const`` (or one-value ``enum``) values."""
    resolved = [_resolve(b, root) for b in branches]
    if not all(isinstance(b, dict) for b in resolved):
        return False
    types = [b.get("type") for b in resolved]
    if all(isinstance(t, str) for t in types) and len(set(types)) == len(types) \
            and not {"integer", "number"} <= set(types):
        return True
    if not all(t == "object" for t in types):
        return False
    common = set.intersection(*(set(b.get("required", ())) for b in resolved))
    for key in sorted(common):
        tags = []
        for b in resolved:
            prop = _resolve(b.get("properties", {}).get(key), root)
            tag = prop.get("const", (prop.get("enum") or [None, None])[0] if len(prop.get("enum", ())) == 1
                           else None) if isinstance(prop, dict) else None
            tags.append(json.dumps(tag))
        if "null" not in tags and len(set(tags)) == len(tags):
            return True
    return False
