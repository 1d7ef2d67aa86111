"""Per-request policy resolution: ``safedecode`` options and ``vllm_xargs`` → :class:`RequestOptions`.

A request names policies from ``grammars/`` (``"secrets"``) or gives them inline
(``{"forbid": [...]}``); both are validated by :func:`safedecode.policy.policy_from_mapping`, so a
bad policy raises one :class:`~safedecode.PolicyError`/:class:`~safedecode.PatternError` naming the
rule, field and position (HTTP 400). An inline policy is also held to the size limits of
:mod:`.schemas` (HTTP 413), its automaton's size included: determinizing it under
``MAX_POLICY_STATES`` is the only compilation done here. Verdicts on inline policies (the policy or
its error) are memoized by canonical JSON (an LRU), so a refused policy sent again costs a lookup;
compiled policies are cached by :func:`safedecode.compile_policy` (by policy hash).

Invariant: the server's default policy (``--policy``) is always part of the result — a request
can add rules, never remove them.

``vllm_xargs`` is vLLM's flat per-request dict: ``safedecode_policy`` (a name, or JSON of an inline
policy or list), ``safedecode_allow_hosts`` and ``safedecode_untrusted`` (JSON lists or
comma-separated), ``safedecode_leak_window``; other keys belong to other plugins and are ignored.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import regex

from ..errors import AutomatonTooLargeError, PolicyError, SafeDecodeError
from ..policy import LiteralRule, Policy, load_policy, policy_from_mapping
from .schemas import MAX_POLICY_BYTES, MAX_POLICY_REGEXES, MAX_POLICY_RULES, MAX_POLICY_STATES, SafedecodeOptions

GRAMMARS = Path(__file__).resolve().parent.parent.parent / "grammars"
_NAME = regex.compile(r"[A-Za-z0-9_-]{1,64}")
_XARGS = {"safedecode_policy": "policy", "safedecode_allow_hosts": "allow_hosts",
          "safedecode_untrusted": "untrusted", "safedecode_leak_window": "leak_window"}


class PolicyTooLarge(PolicyError):
    """A request policy over a limit of :mod:`.schemas`: bytes, rules, regex rules, DFA states (HTTP 413)."""


@dataclass(frozen=True)
class RequestOptions:
    """What a request asks of the guard, validated: the merged policy (None: no rules at all)."""

    policy: Optional[Policy] = None
    allow_hosts: tuple[str, ...] = ()
    untrusted: frozenset[int] = field(default_factory=frozenset)
    leak_window: Optional[int] = None
    report: bool = False
    stop_threshold: Optional[float] = None

    def telemetry_options(self) -> dict:
        """Keyword arguments for the guard's processor (empty: no telemetry)."""
        if not (self.report or self.stop_threshold is not None):
            return {}
        return {"telemetry": True, "stop_threshold": self.stop_threshold}


def available_policies() -> list[str]:
    return sorted(p.stem for p in GRAMMARS.glob("*.toml"))


@functools.lru_cache(maxsize=64)
def named_policy(name: str) -> Policy:
    """The policy ``grammars/<name>.toml`` (``.toml`` optional)."""
    stem = name.removesuffix(".toml")
    if not _NAME.fullmatch(stem) or not (GRAMMARS / f"{stem}.toml").is_file():
        raise PolicyError(f"policy {name!r}: no such policy; available: {', '.join(available_policies())} "
                          f"(or give an inline policy object)")
    return load_policy(GRAMMARS / f"{stem}.toml")


@functools.lru_cache(maxsize=256)
def _inline_verdict(canonical: str) -> tuple[Optional[Policy], Optional[SafeDecodeError]]:
    """(policy, None) for an acceptable inline policy, (None, the error) otherwise."""
    from ..compiler import compile_components

    try:
        policy = policy_from_mapping(json.loads(canonical), source="safedecode.policy")
        regexes = sum(not isinstance(rule, LiteralRule) for rule in policy.forbid)
        if regexes > MAX_POLICY_REGEXES:
            raise PolicyTooLarge(f"safedecode.policy: {regexes} regex/block rules; the limit is {MAX_POLICY_REGEXES}")
        try:
            compile_components(policy, max_states=MAX_POLICY_STATES)
        except AutomatonTooLargeError as exc:
            raise PolicyTooLarge(f"safedecode.policy: {exc}") from None
        return policy, None
    except SafeDecodeError as exc:
        return None, exc.with_traceback(None)


def inline_policy(mapping: dict) -> Policy:
    """An inline policy, size-checked then validated (memoized by its canonical JSON)."""
    canonical = json.dumps(mapping, sort_keys=True, ensure_ascii=False)
    if len(canonical.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyTooLarge(f"safedecode.policy: {len(canonical)} characters; the limit is {MAX_POLICY_BYTES} bytes")
    rules = mapping.get("forbid")
    if isinstance(rules, list) and len(rules) > MAX_POLICY_RULES:
        raise PolicyTooLarge(f"safedecode.policy: {len(rules)} rules; the limit is {MAX_POLICY_RULES}")
    policy, error = _inline_verdict(canonical)
    if error is not None:
        raise error.with_traceback(None)
    return policy


def merge(policies: list[Optional[Policy]]) -> Optional[Policy]:
    """One policy forbidding everything each of ``policies`` forbids (None if there are none)."""
    policies = [p for p in policies if p is not None]
    if len(policies) <= 1:
        return policies[0] if policies else None
    special = "forbid" if any(p.special_tokens == "forbid" for p in policies) else "allow"
    return Policy(forbid=[rule for p in policies for rule in p.forbid], special_tokens=special)


def _policy_of(spec: Any) -> list[Policy]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [named_policy(spec)]
    if isinstance(spec, dict):
        return [inline_policy(spec)]
    return [p for item in spec for p in _policy_of(item)]


def _from_xargs(xargs: Optional[dict]) -> dict:
    """The safedecode keys of ``vllm_xargs`` as ``SafedecodeOptions`` fields (JSON strings decoded)."""
    options = {}
    for key, value in (xargs or {}).items():
        if not key.startswith("safedecode_"):
            continue
        if key not in _XARGS:
            raise PolicyError(f"vllm_xargs: unknown key {key!r}; expected one of {sorted(_XARGS)}")
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise PolicyError(f"vllm_xargs.{key}: not valid JSON: {exc}") from None
        elif isinstance(value, str) and key in ("safedecode_allow_hosts", "safedecode_untrusted"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        options[_XARGS[key]] = value
    return options


def resolve(options: Optional[SafedecodeOptions], xargs: Optional[dict], default: Optional[Policy]) -> RequestOptions:
    """Merge the server default, the ``safedecode`` object and ``vllm_xargs`` (both may be given;
    their policies and lists add up, a ``leak_window`` must not conflict)."""
    extra = _from_xargs(xargs)
    try:
        from_xargs = SafedecodeOptions(**extra)
    except ValueError as exc:
        raise PolicyError(f"vllm_xargs: {exc}") from None
    parts = [o for o in (options, from_xargs) if o is not None]
    windows = {o.leak_window for o in parts if o.leak_window is not None}
    if len(windows) > 1:
        raise PolicyError(f"leak_window given twice with different values: {sorted(windows)}")
    requested = [p for o in parts for p in _policy_of(o.policy)]
    if sum(len(p.forbid) for p in requested) > MAX_POLICY_RULES:
        raise PolicyTooLarge(f"the request's policies have {sum(len(p.forbid) for p in requested)} rules; "
                             f"the limit is {MAX_POLICY_RULES}")
    policy = merge([default] + requested)
    return RequestOptions(policy=policy,
                          allow_hosts=tuple(dict.fromkeys(h for o in parts for h in o.allow_hosts)),
                          untrusted=frozenset(i for o in parts for i in o.untrusted),
                          leak_window=windows.pop() if windows else None,
                          report=any(o.report for o in parts),
                          stop_threshold=min((o.stop_threshold for o in parts if o.stop_threshold is not None),
                                             default=None))


__all__ = ["RequestOptions", "PolicyTooLarge", "resolve", "named_policy", "inline_policy", "merge",
           "available_policies", "GRAMMARS"]
