"""Regexes for "anything but these strings": the first character where a text leaves a finite set.

Forbidding "a URL to a host that is not allowed" or "an output that does not start with X" needs a
complement, and the supported regex subset has no lookahead. For a *finite* set of allowed strings
the complement's boundary is still a plain regex: build the trie of the allowed strings; at each
node ``p`` the forbidden continuations are the characters that extend no allowed string from ``p``.
Then ``departure_regex(S)`` matches exactly the strings ``p·c`` where ``p`` is a prefix of some
string in ``S`` and ``p·c`` is not — the first step outside ``S``'s prefixes. Put after a context
(``https://``), it forbids every continuation that is not a prefix of an allowed one, so at every
point of a generation the text after the context is still on its way to an allowed string
(prefix-safe by construction, and exact: a text is refused iff it leaves the set).

Each allowed string may end with a *terminator* set: after the full string, the next character
must be one of them (an allowed host must be followed by ``/``, a space, …, never by more host
characters); after the terminator everything is allowed. Strings are compared case-insensitively
when the caller compiles the result with ``ignore_case`` (give them lowercased).
"""
from __future__ import annotations

from typing import Iterable, Optional


def _char(c: str) -> str:
    """One character, escaped for use inside or outside a character class."""
    if c.isalnum() and c.isascii():
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def _class(excluded: Iterable[str]) -> str:
    chars = sorted(set(excluded))
    return "[^" + "".join(_char(c) for c in chars) + "]" if chars else "[\\s\\S]"


def departure_regex(allowed: Iterable[tuple[str, Optional[str]]], skip_first: str = "") -> str:
    """The regex of the first departures from ``allowed``: pairs of (string, terminators or None).

    ``None`` terminators mean "after the full string anything goes". ``skip_first`` lists
    characters that are never a departure at the very start (the context absorbs a run of them,
    as ``https:[/\\]*`` absorbs slashes). The regex is a nested trie, linear in the total length
    of the strings. An empty ``allowed`` gives a regex matching any one character but those.
    """
    trie: dict = {}
    for text, terminators in allowed:
        node = trie
        for c in text:
            node = node.setdefault(c, {})
        if node.get("", "unset") is not None:  # a None terminator (anything goes) wins over a set
            node[""] = None if terminators is None else node.get("", "") + terminators
    return _node_regex(trie, skip_first)


def _node_regex(node: dict, skip: str = "") -> str:
    children = {c: child for c, child in node.items() if c != ""}
    if "" in node and node[""] is None:
        return ""  # complete, anything may follow: no departure below this node
    excluded = set(children) | set(node.get("", "")) | set(skip)
    branches = [_class(excluded)]
    for c, child in sorted(children.items()):
        below = _node_regex(child)
        if below:
            branches.append(_char(c) + below)
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
