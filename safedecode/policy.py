"""Policies: what may never appear in the output, as data (pydantic models, TOML files).

A policy is a list of forbidden rules. Each rule is either a literal phrase or a regex; its meaning
is *exactly* ``regex.search(rule.pattern, text, rule.flags)`` (DESIGN §1) — :func:`find_violations`
is that reference check, and the compiled automaton must agree with it on every text.

Invariants:
  * a :class:`Policy` is immutable (frozen models, tuples), so it can be hashed and shared;
  * every rule in a constructed :class:`Policy` has passed the pattern parser, so unsupported
    constructs and empty-matching patterns are refused at load time, naming rule and position.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PatternError, PolicyError


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Optional[str] = Field(default=None, min_length=1)
    ignore_case: bool = False

    @property
    def flags(self) -> int:
        """Flags for the ``regex`` package (the oracle)."""
        return regex.IGNORECASE if self.ignore_case else 0

    @model_validator(mode="after")
    def _pattern_is_supported(self):
        from .syntax import parse  # local import: syntax imports nothing from here

        parse(self.pattern, ignore_case=self.ignore_case, rule=self.id)
        return self


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


def _rule_from_mapping(value: Any) -> Any:
    """Pick the rule type from its keys, refusing both/neither of ``literal`` and ``regex``."""
    if isinstance(value, (LiteralRule, RegexRule)) or not isinstance(value, dict):
        return value
    has_literal, has_regex = "literal" in value, "regex" in value
    if has_literal and has_regex:
        raise ValueError("a rule has both 'literal' and 'regex'; give exactly one")
    if not has_literal and not has_regex:
        raise ValueError("a rule needs exactly one of 'literal' or 'regex'")
    return LiteralRule(**value) if has_literal else RegexRule(**value)


class Policy(BaseModel):
    """An immutable set of forbidden rules. ``Policy(forbid=[{"literal": "..."}, {"regex": "..."}])``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    forbid: tuple[Rule, ...] = ()

    @field_validator("forbid", mode="before")
    @classmethod
    def _coerce_rules(cls, rules: Any) -> Any:
        if not isinstance(rules, (list, tuple)):
            raise ValueError("'forbid' must be a list of rules")
        return tuple(_rule_from_mapping(rule) for rule in rules)

    def rule_ids(self) -> list[str]:
        """The id of each rule as used in reports: its ``id`` or ``forbid[i]``."""
        return [rule.id or f"forbid[{i}]" for i, rule in enumerate(self.forbid)]

    def digest(self) -> str:
        """A stable hash of the policy's meaning (used as a cache key)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __hash__(self) -> int:  # frozen pydantic models with tuples hash fine; make it explicit
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
    """Validate a plain mapping (parsed TOML/JSON) into a :class:`Policy`, with precise errors."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a table/object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(Policy.model_fields))
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key(s) {unknown}; expected 'forbid'")
    rules = data.get("forbid", [])
    if not isinstance(rules, list):
        raise PolicyError(f"{source}: 'forbid' must be an array of tables ([[forbid]])")
    for index, raw in enumerate(rules):
        _validate_one_rule(raw, index, source)
    return Policy(forbid=rules)


def _validate_one_rule(raw: Any, index: int, source: str) -> None:
    label = f"forbid[{index}]"
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        label += f" (id {raw['id']!r})"
    try:
        _rule_from_mapping(raw)
    except PatternError as exc:
        raise PolicyError(f"{source}: {label}: field '{'regex' if 'regex' in raw else 'literal'}': {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "rule"
        raise PolicyError(f"{source}: {label}: field '{field}': {_describe(err)}") from None
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{source}: {label}: {exc}") from None


def _describe(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (allowed: literal | regex, ignore_case, whole_word (literal only), id)"
    if err["type"] == "string_too_short":
        return "must not be empty"
    if "ctx" in err and isinstance(err["ctx"].get("error"), PatternError):
        return str(err["ctx"]["error"])
    return f"{err['msg']} (got {err.get('input')!r})"


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
