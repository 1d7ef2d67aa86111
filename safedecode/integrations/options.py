"""Adapters for serving engines.

A request's options follow the one wire format of :mod:`safedecode.adapters.wire`, shared with
``safedecode serve``: ``extra_args={"safedecode": {...}}`` (``SamplingParams``), or online
``vllm_xargs={"safedecode": NAME | JSON text}`` and the flat ``safedecode_*`` keys. Fail closed:
anything not understood, and any option an adapter cannot honour, raises ``ValueError`` naming it,
never "no policy". A request without any ``safedecode`` key has no policy.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..policy.rules import Policy
from .wire import REQUEST_LIMITS, RequestOptions, parse

#: Options of the wire format the engine-level plugins cannot honour yet: they need the chat
#: conversation (channels) or a response field. Asked for, they are refused, never dropped.
UNSUPPORTED_IN_PLUGINS = ("allow_hosts", "untrusted", "leak_window", "report", "stop_threshold")


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
        raise ValueError(f"extra_args: {', '.join(asked)}: not supported by the vLLM plugin (it enforces "
                         f"policies only; use safedecode serve for the channel guard)")
    return options
