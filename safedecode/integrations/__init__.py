"""Adapters for serving engines, and the per-request policy spec they share.

A request names its policy under the key ``"safedecode"`` (:data:`CONFIG_KEY`) of its extra
arguments (vLLM: ``SamplingParams.extra_args``, or ``vllm_xargs`` in an OpenAI-style request):

* a **string**: a policy name (a file of the policy directory, ``"secrets"`` or ``"secrets.toml"``),
  or the JSON text of the mapping below (``vllm_xargs`` only carries strings and numbers);
* a **mapping** ``{"policy": P}`` where ``P`` is a policy name, an inline policy mapping
  (``{"forbid": [{"literal": "hunter2"}]}``, see :func:`safedecode.policy.policy_from_mapping`) or
  the JSON text of one.

Fail closed: anything else — an unknown key, an unknown name, invalid JSON, an invalid rule — raises
a ``ValueError`` naming the problem, never "no policy". A request without the key has no policy.

The policy directory is ``$SAFEDECODE_POLICY_DIR`` if set, else the repository's ``grammars/``.
Names are plain file names (no path separators): a request can never read another file.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from ..policy import Policy, load_policy, policy_from_mapping

CONFIG_KEY = "safedecode"
MAX_JSON_CHARS = 1 << 20  # an inline policy in JSON text longer than this is refused
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def policy_dir() -> Path:
    """Where policy names are looked up: ``$SAFEDECODE_POLICY_DIR``, else the repository's ``grammars/``."""
    configured = os.environ.get("SAFEDECODE_POLICY_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "grammars"


def policy_names() -> list[str]:
    """The names a request may use (the ``*.toml`` files of :func:`policy_dir`)."""
    return sorted(p.stem for p in policy_dir().glob("*.toml"))


def resolve_policy(spec: Any) -> Policy:
    """A :class:`Policy` from a name, an inline mapping, its JSON text, or a Policy (returned as is).

    Raises ``ValueError`` (a :class:`~safedecode.errors.PolicyError` for policy content) naming the
    problem. Named and JSON policies are parsed once per process (LRU caches).
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        try:
            text = json.dumps(dict(spec), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"an inline policy must be plain JSON data: {exc}") from None
        return _policy_from_json(text)
    if isinstance(spec, str):
        return _policy_from_json(spec) if spec.lstrip().startswith("{") else _named_policy(spec.strip())
    raise ValueError(f"a policy must be a name, a mapping or JSON text, got {type(spec).__name__}")


def request_policy(extra_args: Optional[Mapping[str, Any]]) -> Optional[Policy]:
    """The policy a request's extra arguments ask for under :data:`CONFIG_KEY`, or None without it.

    Raises ``ValueError`` starting with ``extra_args['safedecode']:`` on any invalid configuration.
    """
    if not extra_args or CONFIG_KEY not in extra_args:
        return None
    try:
        return _policy_of_config(extra_args[CONFIG_KEY])
    except ValueError as exc:
        raise ValueError(f"extra_args[{CONFIG_KEY!r}]: {exc}") from None


def _policy_of_config(config: Any) -> Policy:
    if isinstance(config, str) and config.lstrip().startswith("{"):
        config = _loads(config)
        if not isinstance(config, dict):
            raise ValueError(f"the JSON text must be an object, got {type(config).__name__}")
    if isinstance(config, str):
        return resolve_policy(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a policy name or a mapping {{'policy': ...}}, got {type(config).__name__}")
    unknown = sorted(set(config) - {"policy"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; the only key is 'policy' "
                         f"(a name, an inline policy or its JSON text)")
    if "policy" not in config:
        raise ValueError("missing key 'policy'")
    return resolve_policy(config["policy"])


def _loads(text: str) -> Any:
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"JSON text of {len(text)} characters exceeds the limit of {MAX_JSON_CHARS}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None


@functools.lru_cache(maxsize=256)
def _policy_from_json(text: str) -> Policy:
    return policy_from_mapping(_loads(text), source="inline policy")


@functools.lru_cache(maxsize=64)
def _named_policy(name: str) -> Policy:
    stem = name.removesuffix(".toml")
    path = policy_dir() / f"{stem}.toml"
    if not _NAME.fullmatch(stem) or not path.is_file():
        raise ValueError(f"unknown policy name {name!r}; known names: {', '.join(policy_names()) or '(none)'} "
                         f"(in {policy_dir()})")
    return load_policy(path)
