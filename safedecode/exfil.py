"""Output rules against exfiltration through links: URLs may only point at allow-listed hosts.

An injected instruction can make a model leak data by writing it into a URL that the client then
fetches (a markdown image renders without a click) or that the user clicks. These rules make every
URL in the output point at an allowed host — by construction, at every step: after a URL start, the
text must stay on its way to ``host + terminator`` for some allowed host
(:func:`safedecode.negation.departure_regex`). So a disallowed host can never even begin, and data
can only travel in the path or query of an allowed host.

URL starts covered (case-insensitive):
  * a scheme ``http: https: ftp: ftps: ws: wss:`` that starts a word (not glued to a letter,
    digit, ``+``, ``.`` or ``-``: "news:" is a word), followed by any run of ``/`` or ``\\``
    (browsers read ``https:\\\\evil`` and ``https:evil`` as ``https://evil``);
  * a protocol-relative ``//`` in a markdown link/image target ``](//``, a reference definition
    ``]: //``, an HTML attribute ``=//`` / ``="//`` and an autolink ``<//``;
  * a ``www.`` autolink (GitHub-flavoured markdown), matched against the allowed hosts that start
    with ``www.``;
  * ``javascript:`` and ``vbscript:`` are forbidden outright.
Markdown images are links too: an image whose URL has a disallowed host is refused by the same
rules (relative image paths have no host and stay allowed).

After a full allowed host the next character must end the host: ``/ ? # ) ] > " ' , ; * ` `` or
whitespace, or a ``.`` followed by whitespace (a sentence end). ``:`` (a port, or a userinfo trick
such as ``allowed.com:x@evil.com``) and ``@`` are refused there;
hosts with ports are not supported.
"""
from __future__ import annotations

from typing import Iterable

import regex

from .errors import PolicyError
from .negation import departure_regex

HOST_END = "/?#)]>\"',;*` \t\r\n"
WHITESPACE = " \t\r\n"
# The scheme must not be glued to a preceding scheme character: "news:" and "Reviews:" are words, and
# "xhttps:" is another scheme (browsers fetch nothing over it).
SCHEME = r"(?:^|[^A-Za-z0-9+.\-])(?:https?|ftps?|wss?):[/\\]*"
PROTOCOL_RELATIVE = r"(?:\]\(\s*<?|\]:\s*<?|=\s*[\"']?|<)[/\\]{2}[/\\]*"
_HOST = regex.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def normalize_hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    """Lowercased, validated, sorted host names; a bad entry raises one PolicyError naming it."""
    if isinstance(hosts, str):
        raise PolicyError(f"allow_hosts must be a list of host names, not the string {hosts!r}")
    out = set()
    for i, host in enumerate(hosts):
        if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
            hint = " (give the bare host: no scheme, path, port or wildcard)" if isinstance(host, str) else ""
            raise PolicyError(f"allow_hosts[{i}]: {host!r} is not a host name{hint}")
        out.add(host.lower())
    return tuple(sorted(out))


def _allowed_after_start(hosts: Iterable[str]) -> list[tuple[str, str]]:
    """(string, terminators) pairs: each host ends with a host terminator or with ". "."""
    pairs = []
    for host in hosts:
        pairs.append((host, HOST_END))
        pairs.append((host + ".", WHITESPACE))
    return pairs


def exfiltration_rules(allow_hosts: Iterable[str] = ()) -> list[dict]:
    """Regex rules (policy mappings) forbidding links to hosts outside ``allow_hosts``."""
    hosts = normalize_hosts(allow_hosts)
    www_hosts = [h[len("www."):] for h in hosts if h.startswith("www.")]
    # Slashes belong to the URL start; whitespace right after it means no URL ("the http: scheme").
    after_host = (departure_regex(_allowed_after_start(hosts), skip_first="/\\" + WHITESPACE) if hosts
                  else r"[^\s/\\]")
    after_www = departure_regex(_allowed_after_start(www_hosts)) if www_hosts else "[a-z0-9-]"
    return [
        {"id": "exfil:url", "regex": SCHEME + after_host, "ignore_case": True},
        {"id": "exfil:protocol-relative", "regex": PROTOCOL_RELATIVE + after_host, "ignore_case": True},
        {"id": "exfil:www", "regex": r"www\." + after_www, "ignore_case": True},
        {"id": "exfil:script-url", "regex": r"(?:javascript|vbscript):", "ignore_case": True},
    ]
