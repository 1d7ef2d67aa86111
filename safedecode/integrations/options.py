"""Adapters for serving engines.

A request's options follow the one wire format of :mod:`safedecode.integrations.wire`, shared with
``safedecode serve``: ``extra_args={"safedecode": {...}}`` (``SamplingParams``), or online
``vllm_xargs={"safedecode": NAME | JSON text}`` and the flat ``safedecode_*`` keys. Fail closed:
anything not understood, and any option an adapter cannot honour, raises ``ValueError`` naming it,
never "no policy". A request without any ``safedecode`` key has no policy.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..policy.rules import Policy
from .wire import REQUEST_LIMITS, RequestOptions, parse

#: Options of the wire format the engine-level plugins cannot honour: a response field, or message
#: indices (the plugin sees token ids). Asked for, they are refused, never dropped. ``allow_hosts``
#: and ``leak_window`` belong to a ``guard`` (the conversation's channel guard as data).
UNSUPPORTED_IN_PLUGINS = ("untrusted", "report", "stop_threshold")
NEED_A_GUARD = ("allow_hosts", "leak_window")


def request_policy(extra_args: Optional[Mapping[str, Any]]) -> Optional[Policy]:
    """The policy a request's extra arguments ask for (None without any ``safedecode`` key).

    Raises ``ValueError`` (a :class:`~safedecode.errors.PolicyError`) starting with ``extra_args:``
    on any invalid configuration, or on an option this adapter cannot honour.
    """
    return request_options(extra_args).policy


def request_options(extra_args: Optional[Mapping[str, Any]]) -> RequestOptions:
    """The validated options of a request (see :func:`request_policy` for the errors)."""
    try:
        options = parse(None, extra_args or {}, limits=REQUEST_LIMITS)
    except ValueError as exc:
        raise type(exc)(f"extra_args: {exc}") from None
    asked = [name for name in UNSUPPORTED_IN_PLUGINS
             if getattr(options, name) not in (None, False, (), frozenset())]
    if asked:
        raise ValueError(f"extra_args: {', '.join(asked)}: not supported by the vLLM plugin (it sees token "
                         f"ids, not messages or responses; use safedecode serve as the gateway)")
    loose = [name for name in NEED_A_GUARD if getattr(options, name) not in (None, ())]
    if loose and options.guard is None:
        raise ValueError(f"extra_args: {', '.join(loose)}: part of the channel guard; send them with a "
                         f"'guard' object (GuardSpec.to_wire())")
    return options
