"""Policies: what may never appear in the output, as data (pydantic models, TOML files).

A policy is a list of forbidden rules. A literal phrase or a regex means *exactly*
``regex.search(rule.pattern, text, rule.flags)`` (DESIGN §1). A *block* rule (``open``, ``body``,
``close``) is a positive constraint written as a forbidden one: once ``open`` appears, the text that
follows must stay a prefix of ``body`` + ``close`` until that is complete (tool calls: only declared
tools, schema-valid JSON); leaving that language is the violation, decided by the ``regex`` package's
partial matching. A *document* rule (an output type: :mod:`safedecode.channels.output_types`) says the
whole text is one word of a language: leaving it is the violation, and EOS waits for a complete word.
:func:`find_violations` is the reference check, and the compiled automaton must agree with it on
every text.

``special_tokens = "forbid"`` additionally forbids every special/control token id of the vocabulary
except EOS (the chat-format guard passes end-of-turn as an EOS id).

Invariants:
  * a :class:`Policy` is immutable (frozen models, tuples), so it can be hashed and shared;
  * every rule in a constructed :class:`Policy` has passed the pattern parser, so unsupported
    constructs and empty-matching patterns are refused at construction, naming rule and position;
  * bad input raises exactly one :class:`PolicyError` or :class:`PatternError` (never a raw
    pydantic error) that names the file (when loading), the rule's index and id, and the field.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Optional, Union

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ..automata.syntax import parse, uses_assertion
from ..errors import PolicyError, SafeDecodeError
from ..resources import POLICY_ENV, catalogue, find, from_mapping, read_toml, suggest
from .variants import literal_pattern, regex_pattern, validate_separators
from .variants import validate as validate_variants

ANCHORS = {"start", "end", "dollar", "word_boundary", "not_word_boundary"}


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Optional[str] = Field(default=None, min_length=1)
    ignore_case: bool = False

    @property
    def flags(self) -> int:
        """Flags for the ``regex`` package (the oracle)."""
        return regex.IGNORECASE if self.ignore_case else 0


class _VariantRule(_RuleBase):
    """A rule that ``variants`` can widen (:mod:`safedecode.policy.variants`); ``separators`` narrows
    the ``spacing`` variant to one character class."""

    variants: tuple[str, ...] = ()
    separators: Optional[str] = None
    _literal: ClassVar[bool] = True  # which variants apply: a literal's, or a regex's

    @field_validator("variants", mode="before")
    @classmethod
    def _check_variants(cls, value: Any) -> tuple[str, ...]:
        return validate_variants(value, literal=cls._literal)

    @field_validator("separators")
    @classmethod
    def _check_separators(cls, value: Any, info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        if "spacing" not in info.data.get("variants", ()):
            raise ValueError("separators narrow the 'spacing' variant; add variants = [\"spacing\", ...]")
        return validate_separators(value)


class LiteralRule(_VariantRule):
    """Forbid a literal phrase; ``whole_word`` wraps it in ``\\b…\\b``; ``variants`` (see
    :mod:`safedecode.policy.variants`) make ``pattern`` a generated regex that also matches look-alike,
    spaced-out, leet and encoded spellings."""

    literal: str = Field(min_length=1)
    whole_word: bool = False

    @property
    def pattern(self) -> str:
        if self.variants:
            return literal_pattern(self.literal, self.whole_word, self.ignore_case, self.variants, self.separators)
        escaped = regex.escape(self.literal)
        return rf"\b{escaped}\b" if self.whole_word else escaped


class RegexRule(_VariantRule):
    """Forbid any match of a regex (the supported subset of the ``regex`` package's syntax);
    ``variants`` other than ``encodings`` expand its literal characters."""

    regex: str = Field(min_length=1)
    _literal: ClassVar[bool] = False

    @property
    def pattern(self) -> str:
        return (regex_pattern(self.regex, self.ignore_case, self.variants, self.separators) if self.variants
                else self.regex)


class BlockRule(_RuleBase):
    """After ``open``, the text must follow ``body`` (a regex) and then ``close`` (a literal).

    The block ends at the first point where the text since ``open`` fully matches
    ``(?:body)close``; the text is free again after it. A violation is the first character that
    makes the text since ``open`` no longer a prefix of that language. An unfinished block also
    makes EOS forbidden (the compiled automaton masks it unless nothing else is left), so a block
    is either completed or cut by ``max_new_tokens``.
    """

    open: str = Field(min_length=1)
    body: str = Field(min_length=1)
    close: str = ""
    at_start: bool = False  # the text must begin with a block (e.g. tool_choice="required")

    @field_validator("ignore_case")
    @classmethod
    def _no_ignore_case(cls, value: bool) -> bool:
        if value:
            raise ValueError("ignore_case is not supported on block rules; write the case variants into body")
        return value

    @property
    def pattern(self) -> str:
        """The language the text after ``open`` must follow, anchored (``\\A``)."""
        return rf"\A(?:{self.body}){regex.escape(self.close)}"

    @property
    def opening_pattern(self) -> str:
        """With ``at_start``: the language the whole text must begin with."""
        return rf"\A{regex.escape(self.open)}(?:{self.body}){regex.escape(self.close)}"


class DocumentRule(_RuleBase):
    """The whole text must be one word of ``document`` (a regex): an output type (a JSON schema's
    grammar, a regex, a choice). A violation is the first character that makes the text no longer a
    prefix of a word of that language (``regex``'s partial ``fullmatch`` decides it); until the text
    is a complete word, EOS is forbidden (the compiled automaton masks it unless nothing else is
    left). Unlike a block, a complete document may go on while it stays in the language (``\\d+``
    accepts ``1`` and then ``12``)."""

    document: str = Field(min_length=1)
    #: The document holds JSON strings (a JSON output type): rules must hold on their decoded values,
    #: so a guard adds the JSON-escaped companions of its rules (see safedecode.channels.tools).
    json_strings: bool = False

    @field_validator("ignore_case")
    @classmethod
    def _no_ignore_case(cls, value: bool) -> bool:
        if value:
            raise ValueError("ignore_case is not supported on document rules; write the case variants into document")
        return value

    @property
    def pattern(self) -> str:
        """The language of the whole text, anchored at both ends."""
        return rf"\A(?:{self.document})\Z"


Rule = Union[LiteralRule, RegexRule, BlockRule, DocumentRule]


_RULE_KEYS = ("literal | regex | open+body+close | document, ignore_case, whole_word (literal only), variants, "
              "separators, id")
_ALL_RULE_KEYS = ("literal", "regex", "open", "body", "close", "at_start", "document", "json_strings", "ignore_case", "whole_word",
                  "variants", "separators", "id")
_TOP_KEYS = ("forbid", "special_tokens", "description")


def _rule_label(index: int, raw: Any) -> str:
    label = f"forbid[{index}]"
    rule_id = raw.get("id") if isinstance(raw, dict) else getattr(raw, "id", None)
    return label + (f" (id {rule_id!r})" if isinstance(rule_id, str) else "")


def _build_rule(index: int, raw: Any) -> Rule:
    """One rule from a mapping, or a PolicyError naming the rule and the field."""
    if isinstance(raw, (LiteralRule, RegexRule, BlockRule, DocumentRule)):
        return raw
    label = _rule_label(index, raw)
    if not isinstance(raw, dict):
        raise PolicyError(f"{label}: a rule must be a table/object, got {type(raw).__name__}")
    for key in raw:
        if key not in _ALL_RULE_KEYS:
            raise PolicyError(f"{label}: unknown key {key!r}{suggest(str(key), _ALL_RULE_KEYS)} "
                              f"(allowed: {_RULE_KEYS})")
    kinds = [key for key in ("literal", "regex", "body", "document") if key in raw]
    if len(kinds) != 1:
        which = f"both {' and '.join(repr(k) for k in kinds)}; give exactly one" if kinds else \
            "none of them; a rule needs exactly one of 'literal', 'regex', 'body' (a block rule) or 'document'"
        raise PolicyError(f"{label}: {which}")
    model = {"literal": LiteralRule, "regex": RegexRule, "body": BlockRule, "document": DocumentRule}[kinds[0]]
    try:
        return model(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "rule"
        raise PolicyError(f"{label}: field '{field}': {_describe(err)}") from None


def _describe(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key (allowed: {_RULE_KEYS})"
    if err["type"] == "string_too_short":
        return "must not be empty"
    if err["type"] == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return f"{err['msg']} (got {err.get('input')!r})"


class Policy(BaseModel):
    """An immutable set of forbidden rules. ``Policy(forbid=[{"literal": "..."}, {"regex": "..."}])``.

    Construction validates every rule and parses every pattern, so a bad rule raises one
    :class:`PolicyError` / :class:`PatternError` naming the rule (index and id), the field and,
    for patterns, the position.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    forbid: tuple[Rule, ...] = ()
    special_tokens: Literal["allow", "forbid"] = "allow"
    #: What the policy is for (shown by ``safedecode policies``); not part of its meaning or digest.
    description: str = ""

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            inner = err.get("ctx", {}).get("error")
            if isinstance(inner, SafeDecodeError):
                raise inner from None
            if err["type"] == "extra_forbidden":
                key = str(err["loc"][0])
                raise PolicyError(f"unknown top-level key {key!r}{suggest(key, _TOP_KEYS)}; expected one of "
                                  f"{', '.join(map(repr, _TOP_KEYS))}") from None
            if err["loc"] and err["loc"][0] == "special_tokens":
                raise PolicyError(f"special_tokens: must be 'allow' or 'forbid', got {err.get('input')!r}") from None
            raise PolicyError(f"invalid policy: {err['msg']}") from None

    @field_validator("forbid", mode="before")
    @classmethod
    def _coerce_rules(cls, rules: Any) -> Any:
        if not isinstance(rules, (list, tuple)):
            raise PolicyError("'forbid' must be an array of tables ([[forbid]])")
        built = tuple(_build_rule(i, raw) for i, raw in enumerate(rules))
        for i, rule in enumerate(built):  # refuse unsupported constructs now, naming rule and position
            parse(rule.pattern, ignore_case=rule.ignore_case, rule=_rule_label(i, rule))
            grammar = {BlockRule: "body", DocumentRule: "document"}.get(type(rule))
            if grammar and uses_assertion(parse(getattr(rule, grammar), rule=_rule_label(i, rule)), ANCHORS):
                raise PolicyError(f"{_rule_label(i, rule)}: field '{grammar}': a {type(rule).__name__[:-4].lower()} "
                                  f"{grammar} may not use anchors or word boundaries (^ $ \\A \\Z \\b \\B)")
        return built

    def rule_ids(self) -> list[str]:
        """The id of each rule as used in reports: its ``id`` or ``forbid[i]``."""
        return [rule.id or f"forbid[{i}]" for i, rule in enumerate(self.forbid)]

    def digest(self) -> str:
        """A stable hash of the policy's meaning (used as a cache key)."""
        data = self.model_dump(mode="json", exclude={"description"})
        # Variant rules: hash the generated pattern too (it depends on Unicode data packages).
        data["generated"] = [rule.pattern for rule in self.forbid if getattr(rule, "variants", ())]
        payload = json.dumps(data, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def __hash__(self) -> int:
        return hash(self.digest())


def load_policy(spec: "str | os.PathLike | Policy") -> Policy:
    """A policy from a shipped or configured **name** (``"secrets"``, ``"secrets.toml"``: the
    ``grammars/`` folder of the package, plus ``$SAFEDECODE_POLICY_DIR``), a **path** to a TOML file
    (``[[forbid]]`` tables), or a :class:`Policy` (returned as is).

    A string is a path when it names an existing file or holds a path separator; otherwise it is
    a name. Errors name the file, the rule and the field; an unknown name lists the known ones.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise PolicyError(f"a policy is a name, a path or a safedecode.Policy, got {type(spec).__name__}")
    text = os.fspath(spec)
    if isinstance(spec, os.PathLike) or os.path.isfile(text) or "/" in text or os.sep in text:
        path = Path(text)
        if path.is_dir():
            raise PolicyError(f"{path}: is a directory, not a policy file")
        if not path.is_file():
            names = ", ".join(available_policies()) or "(none)"
            raise PolicyError(f"{path}: no such policy file (policy names: {names})")
        return policy_from_mapping(read_toml(path, PolicyError, "policy"), source=str(path))
    try:
        return named_policy(text)
    except PolicyError as exc:
        if text.endswith(".toml"):  # meant as a file name, most likely
            raise PolicyError(f"{text}: no such policy file, nor a policy name: {exc}") from None
        raise


def named_policy(name: str) -> Policy:
    """The shipped or configured policy ``name`` (never a path: safe for names sent in requests)."""
    return _named_policy(name, os.environ.get(POLICY_ENV, ""))


@functools.lru_cache(maxsize=64)
def _named_policy(name: str, _configured: str) -> Policy:  # keyed by $SAFEDECODE_POLICY_DIR too
    entry = find("policy", name, PolicyError)
    return policy_from_mapping(read_toml(entry, PolicyError, "policy"), source=str(entry))


def available_policies() -> dict[str, str]:
    """``{name: description}`` of every shipped and configured policy, sorted by name."""
    found = {}
    for name, entry in catalogue("policy", PolicyError).items():
        data = read_toml(entry, PolicyError, "policy")
        found[name] = data.get("description", "") if isinstance(data.get("description"), str) else ""
    return found


def policy_from_mapping(data: Any, source: str = "<policy>") -> Policy:
    """Validate a plain mapping (parsed TOML/JSON) into a :class:`Policy`; errors start with ``source``."""
    return from_mapping(Policy, data, PolicyError, source, "a policy")


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
        if isinstance(rule, (BlockRule, DocumentRule)):
            found.extend(_grammar_violations(rule_id, rule, text))
            continue
        for match in regex.finditer(rule.pattern, text, rule.flags):
            found.append(Violation(rule_id, match.start(), match.end(), match.group()))
    found.sort(key=lambda v: (v.start, v.end, v.rule_id))
    return found


def rule_violated(rule: Rule, text: str) -> bool:
    """Whether ``text`` violates one rule, by the ``regex`` package (the oracle)."""
    if isinstance(rule, (BlockRule, DocumentRule)):
        return _grammar_scan(rule, text)[0] == "violated"
    return regex.search(rule.pattern, text, rule.flags) is not None


def _grammar_scan(rule: "BlockRule | DocumentRule", text: str) -> tuple[str, int, int]:
    """Scan ``text`` against a positive rule: ``("violated", start, end)``, ``("open", start, len)`` or
    ``("ok", -1, -1)``, deciding its language with the ``regex`` package (the oracle)."""
    if isinstance(rule, DocumentRule):
        document = regex.compile(rf"(?:{rule.document})")
        if document.fullmatch(text):
            return "ok", -1, -1
        if document.fullmatch(text, partial=True):
            return "open", 0, len(text)
        end = next(end for end in range(len(text) + 1) if not document.fullmatch(text, 0, end, partial=True))
        return "violated", 0, end
    language = regex.compile(f"(?:{rule.body}){regex.escape(rule.close)}")
    position = 0
    if rule.at_start:
        prefix = text[:len(rule.open)]
        if not rule.open.startswith(prefix):
            end = next(i for i, (a, b) in enumerate(zip(prefix, rule.open)) if a != b) + 1
            return "violated", 0, end
        if len(prefix) < len(rule.open):
            return "open", 0, len(text)
    while (opened := 0 if rule.at_start and position == 0 else text.find(rule.open, position)) >= 0:
        start = opened + len(rule.open)
        for end in range(start, len(text) + 1):
            if not language.fullmatch(text, start, end, partial=True):
                return "violated", opened, end
            if language.fullmatch(text, start, end):  # the shortest completion ends the block
                position = end
                break
        else:
            return "open", opened, len(text)
    return "ok", -1, -1


def _grammar_violations(rule_id: str, rule: "BlockRule | DocumentRule", text: str) -> list[Violation]:
    status, start, end = _grammar_scan(rule, text)
    return [Violation(rule_id, start, end, text[start:end])] if status == "violated" else []


def open_block(policy: Policy, text: str) -> Optional[str]:
    """The id of a block rule left unfinished at the end of ``text``, or of a document rule that
    ``text`` does not complete (EOS is forbidden there)."""
    for rule_id, rule in zip(policy.rule_ids(), policy.forbid):
        if isinstance(rule, (BlockRule, DocumentRule)) and _grammar_scan(rule, text)[0] == "open":
            return rule_id
    return None
