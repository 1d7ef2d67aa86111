"""OpenAI function definitions (JSON schema) → pydantic tool models for the guard, and back.

Used by ``safedecode serve`` (request ``tools``) and by guard specs on the wire (the vLLM plugin).

The guard takes tools as pydantic classes (:mod:`safedecode.channels.tools`); this module builds them with
``pydantic.create_model`` from the common JSON-schema subset: an ``object`` with ``properties`` of
type ``string`` (``minLength``, ``maxLength``, ``pattern``), ``integer``/``number`` (``minimum``,
``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``), ``boolean``, ``enum`` (primitive
values), ``array`` of those (``minItems``, ``maxItems``) and nested ``object`` s; ``required``;
``additionalProperties: false`` (always implied). The safedecode extension
``"x-safedecode-from-trusted": "<regex>"`` on a string makes it a :class:`~safedecode.FromTrusted`
field (only values the user or system typed).

Invariant (fail closed): a keyword that would constrain values but is not in the subset (``anyOf``,
``$ref``, ``format``, ``const``...) is refused with a :class:`~safedecode.channels.tools.ToolError` naming
the tool and the JSON path — never ignored, since ignoring it would let the guard accept arguments
the schema refuses. Property names keep their spelling (pydantic aliases), so any JSON key works.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from .tools import FromTrusted, ToolError

_PRIMITIVES = {"string": str, "integer": int, "number": float, "boolean": bool}
_NUMERIC = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt"}
_BY_TYPE = {"string": {"minLength": "min_length", "maxLength": "max_length", "pattern": "pattern"},
            "integer": _NUMERIC, "number": _NUMERIC, "boolean": {},
            "array": {"minItems": "min_length", "maxItems": "max_length"}}
_CONSTRAINTS = {key for keywords in _BY_TYPE.values() for key in keywords}
_ANNOTATIONS = {"description", "title", "default", "examples"}
_TRUSTED = "x-safedecode-from-trusted"
_KEYWORDS = {"type", "enum", "items", "properties", "required", "additionalProperties", _TRUSTED} \
    | set(_CONSTRAINTS) | _ANNOTATIONS


def tool_models(tools: Optional[list]) -> list[type[BaseModel]]:
    """One pydantic model per OpenAI tool (``{"type": "function", "function": {"name", "description",
    "parameters"}}``, as a mapping or a validated request model), named after the function."""
    models = []
    for i, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else getattr(tool, "function", None)
        if isinstance(function, BaseModel):
            function = function.model_dump()
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                            f"'parameters': ...}}}}")
        name = function["name"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        try:
            models.append(_object_model(name, parameters, function.get("description"), name))
        except ToolError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # pydantic refusing a constraint on a type
            raise ToolError(f"tool {name}: invalid parameters schema: {exc}") from None
    return models


def _object_model(name: str, schema: dict, description: Optional[str], path: str) -> type[BaseModel]:
    _check_keywords(schema, path)
    if schema.get("type", "object") != "object":
        raise ToolError(f"tool {path}: parameters must be a JSON schema of type 'object'")
    if schema.get("additionalProperties", False) is not False:
        raise ToolError(f"tool {path}: additionalProperties other than false is not supported")
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise ToolError(f"tool {path}: 'properties' must be an object and 'required' a list")
    missing = [key for key in required if key not in properties]
    if missing:
        raise ToolError(f"tool {path}: 'required' names {missing} that are not properties")
    fields = {}
    for i, (key, prop) in enumerate(properties.items()):
        annotation = _annotation(prop, f"{path}.{key}")
        default = ... if key in required else None  # optional: may be left out (never written as null)
        fields[f"field_{i}"] = (annotation, Field(default, alias=key, description=prop.get("description")))
    return create_model(name, __config__=ConfigDict(extra="forbid"),
                        __doc__=description or "", **fields)


def _annotation(prop: Any, path: str):
    if not isinstance(prop, dict):
        raise ToolError(f"tool {path}: a property schema must be an object, got {json.dumps(prop)[:80]}")
    _check_keywords(prop, path)
    kind = prop.get("type")
    if "enum" in prop:
        values = prop["enum"]
        if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ToolError(f"tool {path}: enum must list strings, numbers or booleans")
        return Literal[tuple(values)]
    if kind == "object":
        return _object_model(path.replace(".", "_"), prop, prop.get("description"), path)
    if kind == "array":
        items = prop.get("items")
        if not isinstance(items, dict) or items.get("type") in ("array", "object"):
            raise ToolError(f"tool {path}: arrays need 'items' of a primitive type or enum")
        return Annotated[list[_annotation(items, f"{path}[]")], Field(**_constraints(prop, kind, path))]
    if kind not in _PRIMITIVES:
        raise ToolError(f"tool {path}: unsupported type {kind!r}; supported: string, integer, number, "
                        f"boolean, enum, array, object")
    markers = [FromTrusted(prop[_TRUSTED])] if _TRUSTED in prop else []
    if markers and kind != "string":
        raise ToolError(f"tool {path}: {_TRUSTED} applies to strings only")
    return Annotated[(_PRIMITIVES[kind], Field(**_constraints(prop, kind, path)), *markers)]


def _constraints(prop: dict, kind: str, path: str) -> dict:
    """pydantic ``Field`` constraints of ``prop``; a keyword for another type is refused."""
    allowed = _BY_TYPE[kind]
    misplaced = sorted(key for key in prop if key in _CONSTRAINTS and key not in allowed)
    if misplaced:
        raise ToolError(f"tool {path}: keyword(s) {misplaced} do not apply to type {kind!r}")
    return {allowed[key]: value for key, value in prop.items() if key in allowed}


def _check_keywords(schema: dict, path: str) -> None:
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise ToolError(f"tool {path}: unsupported JSON-schema keyword(s) {unknown} (refused, not ignored)")


def call_json(call: BaseModel) -> dict:
    """An OpenAI ``tool_calls`` entry's ``function`` for a validated call (arguments as written)."""
    arguments = call.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return {"name": type(call).__name__, "arguments": json.dumps(arguments, ensure_ascii=False)}


__all__ = ["tool_models", "call_json"]
