"""The wire format of per-request options, shared by ``safedecode serve`` and the vLLM plugin.

The schema is documented once, in the README ("Per-request options: the wire format"); this module
is its only implementation. A request carries its options in any of these forms (they add up):

* **the object** ``"safedecode": {...}`` — in ``safedecode serve`` a top-level field of the body
  (``extra_body={"safedecode": {...}}`` with the openai client); in vLLM
  ``SamplingParams(extra_args={"safedecode": {...}})``;
* **vllm_xargs** ``{"safedecode": NAME | JSON text}`` — vLLM's ``vllm_xargs`` carries only strings
  and numbers: a string is a policy name, or (starting with ``{``) the JSON text of the object;
* **flat keys** ``safedecode_<field>`` in ``vllm_xargs`` / ``extra_args`` (``safedecode_policy``,
  ``safedecode_allow_hosts``, ...): JSON text, or for the two lists also a comma-separated string.

The object's fields (:class:`SafedecodeOptions`): ``policy`` (a name, an inline policy
``{"forbid": [...]}``, its JSON text, or a list of these), ``allow_hosts``, ``untrusted``,
``leak_window``, ``report``, ``stop_threshold``, ``response_format`` (OpenAI's shape: ``{"type":
"text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}``; the server's
top-level ``response_format`` is the same field).

:func:`policy_parts` is the one place a request's options become the policy parts to compile —
the server's embedded engine, the gateway's own guard copy and the vLLM plugin all call it, so a
``response_format`` becomes the same document rule (:mod:`safedecode.channels.output_types`) and
the same parts everywhere.

Fail closed: any key under ``safedecode``, or any key starting with ``safedecode``, that is not
understood raises :class:`~safedecode.errors.PolicyError` naming it (HTTP 400, ``ValueError`` in
vLLM); a request never runs with fewer rules than it asked for. Policies from requests are held to
:class:`Limits` (bytes, rules, regex rules here; DFA states during the one compilation, by passing
``limits.max_states`` to :func:`safedecode.compile_policy`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import PolicyError
from ..policy.automaton import SERVER_WORK_BUDGET
from ..policy.rules import LiteralRule, Policy, named_policy, policy_from_mapping
from ..resources import parse_json, suggest

#: The key of the options object, and the prefix of the flat keys.
KEY = "safedecode"


@dataclass(frozen=True)
class Limits:
    """What one request may make a server compile. Over a limit: :class:`PolicyTooLargeError` (HTTP 413)."""

    max_policy_bytes: int = 64 << 10   # an inline policy's canonical JSON
    max_rules: int = 1000              # rules of all the request's policies together
    max_regexes: int = 64              # regex and block rules among them
    max_states: int = 10_000           # DFA states per rule and per component (checked while compiling)
    work_budget: int = SERVER_WORK_BUDGET  # determinization work for the inline rules, ~1 µs a unit (idem);
                                       # the server default and named policies are trusted data


#: The limits ``safedecode serve`` and the vLLM plugin apply to every request.
REQUEST_LIMITS = Limits()


class PolicyTooLargeError(PolicyError):
    """A request's policy is over one of the :class:`Limits` (HTTP 413)."""


class GuardOptions(BaseModel):
    """The ``guard`` object: a conversation's channel guard as data (a
    :class:`~safedecode.channels.spec.GuardSpec` on the wire, see
    :meth:`GuardSpec.to_wire <safedecode.channels.spec.GuardSpec.to_wire>`), for engines that
    receive token ids built elsewhere (the vLLM plugin behind a gateway). ``allow_hosts``,
    ``leak_window`` and ``policy`` stay the top-level options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nonce: str = Field(min_length=8, max_length=128)
    chat_format: Optional[str] = Field(default=None, max_length=128)  # a channels/ name; None: detected
    system_text: str = Field(default="", max_length=64 << 10)
    trusted_text: str = Field(default="", max_length=256 << 10)
    tools: list[dict] = Field(default_factory=list, max_length=128)  # OpenAI function definitions
    tool_choice: Literal["auto", "required", "none"] = "auto"


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's shape. ``strict`` is accepted either way: the schema
    is always enforced exactly, and a keyword the grammar cannot enforce is refused (never ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(default="output", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (no shape), ``json_object`` (any JSON object) or
    ``json_schema`` (a document of that schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema', and only then")
        return self

    def wire(self) -> dict:
        """As JSON data (what travels to an upstream engine)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SafedecodeOptions(BaseModel):
    """The ``safedecode`` object: the one schema of per-request options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Union[str, dict, list[Union[str, dict]], None] = None
    guard: Optional[GuardOptions] = None
    allow_hosts: list[str] = Field(default_factory=list, max_length=256)
    untrusted: list[int] = Field(default_factory=list)
    leak_window: Optional[int] = None
    report: bool = False
    stop_threshold: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    response_format: Optional[ResponseFormat] = None


FIELDS = tuple(SafedecodeOptions.model_fields)
#: Flat keys (``safedecode_policy``...) → fields.
FLAT = {f"{KEY}_{name}": name for name in FIELDS}


@dataclass(frozen=True)
class RequestOptions:
    """What a request asks of the guard, validated: the merged policy (None: no rules at all), and
    the same rules as ``parts`` to compile separately (the server default and each named policy:
    shipped data, cached after their first use; all inline rules of the request together)."""

    policy: Optional[Policy] = None
    parts: tuple[Policy, ...] = ()
    budgets: tuple[Optional[int], ...] = ()  # per part: None (trusted data) or the request's work budget
    allow_hosts: tuple[str, ...] = ()
    untrusted: frozenset[int] = field(default_factory=frozenset)
    leak_window: Optional[int] = None
    report: bool = False
    stop_threshold: Optional[float] = None
    guard: Optional[GuardOptions] = None
    response_format: Optional[ResponseFormat] = None  # None or type "text": no output type

    @property
    def channel_options(self) -> list[str]:
        """The options given that need a chat conversation (the channel guard)."""
        return [name for name, value in (("allow_hosts", self.allow_hosts), ("untrusted", self.untrusted),
                                         ("leak_window", self.leak_window)) if value]

    def telemetry_options(self) -> dict:
        """Keyword arguments for the guard's processor (empty: no telemetry)."""
        if not (self.report or self.stop_threshold is not None):
            return {}
        return {"telemetry": True, "stop_threshold": self.stop_threshold}


def parse(options: Any = None, extra: Optional[Mapping[str, Any]] = None, *, default: Optional[Policy] = None,
          limits: Limits = REQUEST_LIMITS, response_format: Any = None) -> RequestOptions:
    """The options of one request: ``options`` is the ``safedecode`` object (or None), ``extra`` a flat
    mapping that may hold ``"safedecode"`` and ``safedecode_*`` keys (``vllm_xargs``, vLLM's
    ``extra_args``); other keys of ``extra`` belong to other plugins. ``default`` (a server's
    ``--policy``) is always part of the result: a request adds rules, never removes them.
    ``response_format``: a server request's top-level field (the same as the object's)."""
    parts = [_object(options, KEY)] if options is not None else []
    if response_format is not None:
        parts.append(_object({"response_format": response_format}, "response_format"))
    flat = {}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key.startswith(KEY):
            continue
        if key == KEY:
            parts.append(_object(_decode(value, key, name_is_policy=True), key))
        elif key in FLAT:
            flat[FLAT[key]] = _decode(value, key, name_is_policy=FLAT[key] == "policy",
                                      comma_list=FLAT[key] in ("allow_hosts", "untrusted"))
        else:
            raise PolicyError(f"unknown key {key!r}{suggest(key, [KEY, *FLAT])}; understood: "
                              f"{', '.join(map(repr, [KEY, *FLAT]))}")
    if flat:
        parts.append(_object(flat, "safedecode_*"))
    guards = [o.guard for o in parts if o.guard is not None]
    if len(guards) > 1:
        raise PolicyError("guard given twice: a request has one conversation")
    windows = {o.leak_window for o in parts if o.leak_window is not None}
    if len(windows) > 1:
        raise PolicyError(f"leak_window given twice with different values: {sorted(windows)}")
    formats = {json.dumps(o.response_format.wire(), sort_keys=True): o.response_format
               for o in parts if o.response_format is not None}
    if len(formats) > 1:
        raise PolicyError("response_format given twice with different values (a request has one output shape)")
    response = next(iter(formats.values()), None)
    if response is not None and response.json_schema is not None:
        size = len(json.dumps(response.json_schema.schema_, ensure_ascii=False).encode("utf-8"))
        if size > limits.max_policy_bytes:
            raise PolicyTooLargeError(f"response_format: a schema of {size} bytes; the limit is "
                                      f"{limits.max_policy_bytes}")
    found = [item for o in parts for item in _policies(o.policy, limits)]
    requested = [p for p, _ in found]
    rules = sum(len(p.forbid) for p in requested)
    if rules > limits.max_rules:
        raise PolicyTooLargeError(f"the request's policies have {rules} rules; the limit is {limits.max_rules}")
    regexes = sum(not isinstance(rule, LiteralRule) for p in requested for rule in p.forbid)
    if regexes > limits.max_regexes:
        raise PolicyTooLargeError(f"the request's policies have {regexes} regex/block rules; the limit is "
                             f"{limits.max_regexes}")
    named = list(dict.fromkeys(p for p, inline in found if not inline))
    inline = merge([p for p, is_inline in found if is_inline])
    kept = [(p, budget) for p, budget in [(default, None), *((p, None) for p in named), (inline, limits.work_budget)]
            if p is not None and (p.forbid or p.special_tokens == "forbid")]
    return RequestOptions(policy=merge([default, *requested]),
                          parts=tuple(p for p, _ in kept), budgets=tuple(b for _, b in kept),
                          allow_hosts=tuple(dict.fromkeys(h for o in parts for h in o.allow_hosts)),
                          untrusted=frozenset(i for o in parts for i in o.untrusted),
                          leak_window=windows.pop() if windows else None,
                          report=any(o.report for o in parts),
                          stop_threshold=min((o.stop_threshold for o in parts if o.stop_threshold is not None),
                                             default=None),
                          guard=guards[0] if guards else None,
                          response_format=response if response is not None and response.type != "text" else None)


def output_type_of(options: RequestOptions, trusted_text: str = ""):
    """The request's :class:`~safedecode.channels.output_types.OutputType` (None without a
    ``response_format``, or with type ``text``); ``json_object`` is any JSON object. A schema the
    grammar cannot enforce exactly raises :class:`~safedecode.errors.PolicyError` naming the keyword
    and where it is (``strict`` or not: never silently weaker than asked). ``trusted_text``: the
    conversation's (FromTrusted fields, as in tool arguments)."""
    response = options.response_format
    if response is None:
        return None
    schema = {"type": "object"} if response.type == "json_object" else response.json_schema.schema_
    return _output_type(json.dumps(schema, sort_keys=True, ensure_ascii=False), trusted_text)


@functools.lru_cache(maxsize=64)
def _output_type(canonical: str, trusted_text: str):
    from ..channels.output_types import OutputTypeError, output_type

    try:
        return output_type(json.loads(canonical), trusted_text)
    except OutputTypeError as exc:
        raise PolicyError("response_format: " + str(exc).removeprefix("output_type: ")) from None


def policy_parts(options: RequestOptions, *, guard: bool, trusted_text: str = "",
                 limits: Limits = REQUEST_LIMITS) -> tuple[tuple[Policy, ...], tuple[Optional[int], ...]]:
    """The policy parts to compile for a request, and their work budgets (the one place options
    become parts: the server, the gateway's guard copy and the vLLM plugin call it).

    Without a ``response_format``: ``options.parts``. With one, its document rule is one more part
    (compiled under the request's work budget and ``limits.max_states``: a client's schema is
    untrusted input). Under a conversation guard (``guard=True``) that is all — the guard adds the
    JSON-escaped companions of every rule and masks control tokens itself; for a raw prompt
    (``guard=False``) each part gets its companions here and the document part forbids every special
    token but EOS (as :meth:`OutputType.policy <safedecode.channels.output_types.OutputType.policy>`)."""
    shape = output_type_of(options, trusted_text)
    if shape is None:
        return options.parts, options.budgets
    parts = list(options.parts)
    if not guard and shape.kind == "json":
        from ..channels.tools import escaped_spelling_rules

        parts = [Policy(forbid=list(p.forbid) + escaped_spelling_rules(p), special_tokens=p.special_tokens)
                 if p.forbid else p for p in parts]
    document = Policy(forbid=[shape.rule()], special_tokens="allow" if guard else "forbid")
    return tuple(parts) + (document,), tuple(options.budgets) + (limits.work_budget,)


def merge(policies: list[Optional[Policy]]) -> Optional[Policy]:
    """One policy forbidding everything each of ``policies`` forbids (None if there are none)."""
    policies = [p for p in policies if p is not None]
    if len(policies) <= 1:
        return policies[0] if policies else None
    special = "forbid" if any(p.special_tokens == "forbid" for p in policies) else "allow"
    return Policy(forbid=[rule for p in policies for rule in p.forbid], special_tokens=special)


def _decode(value: Any, key: str, *, name_is_policy: bool, comma_list: bool = False) -> Any:
    """A ``vllm_xargs`` value: JSON text decoded; a plain string is a name (``safedecode``,
    ``safedecode_policy``) or a comma-separated list (``allow_hosts``, ``untrusted``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text[:1] in ("{", "["):
        return _loads(text, key)
    if key == KEY:
        return {"policy": text}
    if comma_list:
        return [part.strip() for part in text.split(",") if part.strip()]
    if not name_is_policy and text:
        return _loads(text, key)
    return text


def _loads(text: str, key: str) -> Any:
    if len(text) > REQUEST_LIMITS.max_policy_bytes * 4:
        raise PolicyTooLargeError(f"{key}: {len(text)} characters of JSON text; the limit is "
                             f"{REQUEST_LIMITS.max_policy_bytes * 4}")
    return parse_json(text, PolicyError, key)


def _object(value: Any, where: str) -> SafedecodeOptions:
    if isinstance(value, SafedecodeOptions):
        return value
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: expected an object with keys {', '.join(FIELDS)}, got {type(value).__name__}")
    for key in value:
        if key not in FIELDS:
            hint = " (an inline policy goes under 'policy': {\"policy\": {\"forbid\": [...]}})" if key == "forbid" \
                else suggest(str(key), FIELDS)
            raise PolicyError(f"{where}: unknown key {key!r}{hint}; understood: {', '.join(FIELDS)}")
    try:
        return SafedecodeOptions(**value)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise PolicyError(f"{where}.{loc}: {err['msg']} (got {err.get('input')!r})") from None


def _policies(spec: Any, limits: Limits) -> list[tuple[Policy, bool]]:
    """A request's ``policy`` value — names (never paths), inline mappings, their JSON text, lists —
    as ``(policy, inline)`` pairs."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return [p for item in spec for p in _policies(item, limits)]
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        spec = _loads(spec, "policy")
    if isinstance(spec, str):
        return [(named_policy(spec.strip()), False)]
    if isinstance(spec, Mapping):
        try:
            canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise PolicyError(f"policy: an inline policy must be plain JSON data, not too deeply nested "
                              f"({type(exc).__name__})") from None
        if len(canonical.encode("utf-8")) > limits.max_policy_bytes:
            raise PolicyTooLargeError(f"policy: {len(canonical.encode('utf-8'))} bytes of inline policy; the limit "
                                 f"is {limits.max_policy_bytes}")
        rules = spec.get("forbid")
        if isinstance(rules, list) and len(rules) > limits.max_rules:
            raise PolicyTooLargeError(f"policy: {len(rules)} rules; the limit is {limits.max_rules}")
        return [(_inline(canonical), True)]
    raise PolicyError(f"policy: expected a name, an inline policy object, its JSON text or a list, "
                      f"got {type(spec).__name__}")


@functools.lru_cache(maxsize=256)
def _inline(canonical: str) -> Policy:
    return policy_from_mapping(json.loads(canonical), source="policy")


__all__ = ["KEY", "FIELDS", "FLAT", "Limits", "REQUEST_LIMITS", "PolicyTooLargeError", "SafedecodeOptions",
           "ResponseFormat", "RequestOptions", "parse", "merge", "output_type_of", "policy_parts"]
