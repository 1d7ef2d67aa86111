"""Policies: what may never appear in the output, as data (pydantic models, TOML files).

A policy is a list of forbidden rules. Each rule is either a literal phrase or a regex; its meaning
is *exactly* ``regex.search(rule.pattern, text, rule.flags)`` (DESIGN §1) — :func:`find_violations`
is that reference check, and the compiled automaton must agree with it on every text.

Invariants:
  * a :class:`Policy` is immutable (frozen models, tuples), so it can be hashed and shared;
  * every rule in a constructed :class:`Policy` has passed the pattern parser, so unsupported
    constructs and empty-matching patterns are refused at construction, naming rule and position;
  * bad input raises exactly one :class:`PolicyError` or :class:`PatternError` (never a raw
    pydantic error) that names the file (when loading), the rule's index and id, and the field.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PolicyError, SafeDecodeError
from .syntax import parse


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Optional[str] = Field(default=None, min_length=1)
    ignore_case: bool = False

    @property
    def flags(self) -> int:
        """Flags for the ``regex`` package (the oracle)."""
        return regex.IGNORECASE if self.ignore_case else 0


class LiteralRule(_RuleBase):
    """Forbid a literal phrase; ``whole_word`` wraps it in ``\\b…\\b``."""

    literal: str = Field(min_length=1)
    whole_word: bool = False

    @property
    def pattern(self) -> str:
        escaped = regex.escape(self.literal)
        return rf"\b{escaped}\b" if self.whole_word else escaped


class RegexRule(_RuleBase):
    """Forbid any match of a regex (the supported subset of the ``regex`` package's syntax)."""

    regex: str = Field(min_length=1)

    @property
    def pattern(self) -> str:
        return self.regex


Rule = Union[LiteralRule, RegexRule]


_RULE_KEYS = "literal | regex, ignore_case, whole_word (literal only), id"


def _rule_label(index: int, raw: Any) -> str:
    label = f"forbid[{index}]"
    rule_id = raw.get("id") if isinstance(raw, dict) else getattr(raw, "id", None)
    return label + (f" (id {rule_id!r})" if isinstance(rule_id, str) else "")


def _build_rule(index: int, raw: Any) -> Rule:
    """One rule from a mapping, or a PolicyError naming the rule and the field."""
    if isinstance(raw, (LiteralRule, RegexRule)):
        return raw
    label = _rule_label(index, raw)
    if not isinstance(raw, dict):
        raise PolicyError(f"{label}: a rule must be a table/object, got {type(raw).__name__}")
    has_literal, has_regex = "literal" in raw, "regex" in raw
    if has_literal == has_regex:
        which = "both 'literal' and 'regex'; give exactly one" if has_literal else \
            "neither; a rule needs exactly one of 'literal' or 'regex'"
        raise PolicyError(f"{label}: {which}")
    try:
        return LiteralRule(**raw) if has_literal else RegexRule(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "rule"
        raise PolicyError(f"{label}: field '{field}': {_describe(err)}") from None


def _describe(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key (allowed: {_RULE_KEYS})"
    if err["type"] == "string_too_short":
        return "must not be empty"
    return f"{err['msg']} (got {err.get('input')!r})"


class Policy(BaseModel):
    """An immutable set of forbidden rules. ``Policy(forbid=[{"literal": "..."}, {"regex": "..."}])``.

    Construction validates every rule and parses every pattern, so a bad rule raises one
    :class:`PolicyError` / :class:`PatternError` naming the rule (index and id), the field and,
    for patterns, the position.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    forbid: tuple[Rule, ...] = ()

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            inner = err.get("ctx", {}).get("error")
            if isinstance(inner, SafeDecodeError):
                raise inner from None
            if err["type"] == "extra_forbidden":
                raise PolicyError(f"unknown top-level key {err['loc'][0]!r}; expected 'forbid'") from None
            raise PolicyError(f"invalid policy: {err['msg']}") from None

    @field_validator("forbid", mode="before")
    @classmethod
    def _coerce_rules(cls, rules: Any) -> Any:
        if not isinstance(rules, (list, tuple)):
            raise PolicyError("'forbid' must be an array of tables ([[forbid]])")
        built = tuple(_build_rule(i, raw) for i, raw in enumerate(rules))
        for i, rule in enumerate(built):  # refuse unsupported constructs now, naming rule and position
            parse(rule.pattern, ignore_case=rule.ignore_case, rule=_rule_label(i, rule))
        return built

    def rule_ids(self) -> list[str]:
        """The id of each rule as used in reports: its ``id`` or ``forbid[i]``."""
        return [rule.id or f"forbid[{i}]" for i, rule in enumerate(self.forbid)]

    def digest(self) -> str:
        """A stable hash of the policy's meaning (used as a cache key)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __hash__(self) -> int:
        return hash(self.digest())


def load_policy(path: str | Path) -> Policy:
    """Read a policy from TOML (``[[forbid]]`` tables). Errors name the file, the rule and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    return policy_from_mapping(data, source=str(path))


def policy_from_mapping(data: Any, source: str = "<policy>") -> Policy:
    """Validate a plain mapping (parsed TOML/JSON) into a :class:`Policy`; errors start with ``source``."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a table/object, got {type(data).__name__}")
    try:
        return Policy(**data)
    except SafeDecodeError as exc:
        raise PolicyError(f"{source}: {exc}") from None


class Violation(NamedTuple):
    """One match of a forbidden rule in a text, found by the ``regex`` package."""

    rule_id: str
    start: int
    end: int
    text: str


def find_violations(policy: Policy, text: str) -> list[Violation]:
    """Every non-overlapping match of every rule in ``text``, by the ``regex`` package (the oracle)."""
    found = []
    for rule_id, rule in zip(policy.rule_ids(), policy.forbid):
        for match in regex.finditer(rule.pattern, text, rule.flags):
            found.append(Violation(rule_id, match.start(), match.end(), match.group()))
    found.sort(key=lambda v: (v.start, v.end, v.rule_id))
    return found
