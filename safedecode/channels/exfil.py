"""Output rules against exfiltration through links: every fetch a renderer would make goes to an allowed host.

An injected instruction can make a model leak data by writing it into a URL that the client then
fetches (a markdown image renders without a click) or that the user clicks. These rules forbid every
*spelling* of such a URL that a renderer resolves to a host off the allow-list: the text as a
CommonMark renderer reads it (link destinations, reference definitions, autolinks, backslash escapes,
character references; raw HTML passed through) and as an HTML parser and the WHATWG URL parser read
the HTML (attribute values with character references decoded, leading C0 controls and spaces
stripped, TAB/LF/CR removed anywhere in the URL, ``\\`` read as ``/``, ``srcset`` candidates, CSS
``url()``). The threat model (covered and not covered) is written down in ``grammars/README.md``.

By construction, at every step: after a URL start the text must stay on its way to
``host + terminator`` for some allowed host (:func:`safedecode.automata.negation.departure_regex`), so a
disallowed host can never even begin and data can only travel in the path or query of an allowed host.
Where a class cannot be allow-listed exactly, it is refused whole (fail closed):

``exfil:url``
    a scheme ``http https ftp ftps ws wss`` that starts a word (not glued to a letter, digit, ``+``,
    ``.`` or ``-``: "news:" is a word), its letters possibly split by TAB/LF/CR, an optional ``\\``
    before the colon (a CommonMark escape), then any run of ``/``, ``\\``, TAB, LF, CR (browsers read
    ``https:\\\\evil`` and ``https:evil`` as ``https://evil``), then the host.
``exfil:protocol-relative``
    ``//``, ``\\\\``, ``/\\`` or ``\\/`` (a TAB/LF/CR may sit between the two) not glued to a scheme
    character, ``:`` or a slash: a protocol-relative URL in any link target, attribute, ``srcset``
    candidate or CSS ``url()``, and a UNC path ``\\\\host\\share``.
``exfil:www``
    a ``www.`` autolink (GitHub-flavoured markdown), against the allowed hosts starting with ``www.``.
``exfil:attribute-url``, ``exfil:attribute-url-single-quoted``, ``exfil:style-url``
    inside a double- or single-quoted HTML attribute value (any attribute: ``href``, ``src``,
    ``srcset``, ``style``, meta ``content``, ...; a URL start anywhere in the value) or a ``<style>``
    element (CSS ``url()``, ``image-set()``, ``@import``), where TAB/LF/CR are removed from the URL,
    a URL start (a scheme as above, glued or not, or two slashes anywhere) is followed by a *strict*
    host: TAB/LF/CR between its characters are transparent, and the host ends at
    ``/ ? # \\ < > [ ] ^ |`` or a space (characters that end it or that the host parser refuses), or
    at punctuation the parser keeps (a closing quote or parenthesis) as long as no ``@`` and no label
    separator followed by a label character comes before the host surely ends. One rule per context:
    their automata add up instead of multiplying.
``exfil:script-url``
    ``javascript:`` and ``vbscript:`` (letters possibly split by TAB/LF/CR), anywhere.
``exfil:host-scheme``
    ``file:`` followed by two slashes (a host, or a Windows UNC path), ``smb:`` and ``mailto:``
    followed by anything but a space (a ``mailto:`` query carries a prefilled body), anywhere.
``exfil:link-scheme``
    in a markdown link destination or reference definition, any scheme other than the six above.
``exfil:autolink-scheme``
    a CommonMark autolink ``<scheme:...>`` with any other scheme (refused when its ``>`` is written:
    ``<xsl:template match="...">`` is no autolink and stays).
``exfil:attribute-scheme``
    after ``=``, a quote, a bracket or other punctuation (an attribute value, a ``srcset`` candidate,
    a CSS function), any other scheme of two or more characters followed by a slash (``ssh://``,
    ``itms-services://``, ``search-ms:...:\\\\host``).
``exfil:data-url``
    ``data:`` at the start of an attribute value (an ``iframe`` loads it as a page).
``exfil:char-ref``
    every HTML character reference that decodes to an ASCII character other than ``& < > " '``:
    numeric (decimal or hex, any zero padding, with or without ``;``) up to 127, and the named ones
    (``&colon;``, ``&sol;``, ``&bsol;``, ``&Tab;``, ``&NewLine;``, ``&period;``, ...). A URL's scheme,
    colon and slashes are ASCII, so no reference can spell them; references to other characters stay.
``exfil:css-escape``
    a backslash after ``style=`` (before the next ``<`` or ``>``) or in a ``<style>`` element (a CSS
    escape can spell any character, ``url(\\2f\\2f evil)``).
``exfil:active-html``
    ``<script``, ``srcdoc=`` (a nested page whose references are decoded twice) and ``on...=`` event
    handlers inside a tag: code builds URLs no rule can read.

After a full allowed host (outside the strict contexts above) the next character must end the host:
``/ ? # ) ] > " ' , ; * ` `` or whitespace, or a ``.`` followed by whitespace (a sentence end).
``:`` (a port, or a userinfo trick such as ``allowed.com:x@evil.com``) and ``@`` are refused there;
hosts with ports are not supported. After the punctuation among those (``) " ' , ; * ` ``, which the
URL parser keeps in a host inside an autolink or a link destination), an ``@`` or a label separator
(``.`` or a full stop IDNA maps to it) followed by a label character is refused until whitespace or
``/ ? # \\ < > [ ] ^ |``: ``<https://allowed.com);.evil.io>`` is a name under evil.io.

The host rules are case-insensitive (``ignore_case``); the others spell ASCII letters in both cases
(``[hH]``): scheme and tag names have no other case, and Unicode case folding would only add states.
The hand-written expectations are in ``tests/test_exfil.py``; ``tests/test_exfil_renderer.py``
checks the rules against a real renderer (markdown-it-py, html5lib, WHATWG URL rules) with an
adversary writing every spelling token by token through the compiled guard.
"""
from __future__ import annotations

from typing import Iterable

import regex

from ..automata.negation import departure_regex
from ..errors import PolicyError

HOST_END = "/?#)]>\"',;*` \t\r\n"
WHITESPACE = " \t\r\n"
# Browsers remove TAB, LF and CR anywhere in a URL (WHATWG URL parser), so between two characters of
# a scheme, a host or the slashes they are invisible.
URL_INVISIBLE = "\t\n\r"
_T = r"[\t\n\r]*"
# Schemes whose URLs a browser fetches from a host: these are allow-listed by host; every other
# scheme in a link context is refused.
FETCH_SCHEMES = ("ftp", "ftps", "http", "https", "ws", "wss")
SCHEME_CHARS = "A-Za-z0-9+.\\-"
# Named character references (WHATWG list) whose value holds an ASCII character other than & < > " '.
ASCII_NAMED_REFERENCES = (
    "DiacriticalGrave", "Hat", "NewLine", "Tab", "UnderBar", "VerticalLine", "ast", "bne", "bsol", "colon",
    "comma", "commat", "dollar", "equals", "excl", "fjlig", "grave", "lbrace", "lbrack", "lcub", "lowbar",
    "lpar", "lsqb", "midast", "num", "nvgt", "nvlt", "percnt", "period", "plus", "quest", "rbrace", "rbrack",
    "rcub", "rpar", "rsqb", "semi", "sol", "verbar", "vert",
)
_HOST = regex.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def _ci(c: str) -> str:
    """One character, ASCII letters in both cases (rules without ``ignore_case`` stay ASCII: a
    scheme or tag name has no other case, and Unicode case folding would only cost states)."""
    return f"[{c.lower()}{c.upper()}]" if c.isascii() and c.isalpha() else regex.escape(c)


def _spelled(word: str) -> str:
    """``word`` in any ASCII case with TAB/LF/CR allowed between its characters."""
    return _T.join(_ci(c) for c in word)


def _word(word: str) -> str:
    """``word`` in any ASCII case."""
    return "".join(_ci(c) for c in word)


def _alternation(words: Iterable[str]) -> str:
    return "(?:" + "|".join(_spelled(w) for w in words) + ")"


# A scheme starts a word: not glued to a scheme character ("Reviews:", "xhttps:" are no URLs).
WORD_START = rf"(?:^|[^{SCHEME_CHARS}])"
FETCH_SCHEME = _alternation(["https", "http", "ftps", "ftp", "wss", "ws"]) + _T + r"\\?:"
SCHEME = WORD_START + FETCH_SCHEME + r"[/\\\t\n\r]*"
SLASHES = r"[/\\]" + _T + r"[/\\][/\\\t\n\r]*"
PROTOCOL_RELATIVE = rf"(?:^|[^{SCHEME_CHARS}:/\\])" + SLASHES
# Where a renderer removes TAB/LF/CR from a URL that ends only at a quote: a quoted attribute value
# (from any URL start inside it: srcset candidates, style url(), meta refresh content) and a <style>
# element (CSS url(), image-set(), @import strings). One rule each: their automata add, not multiply.
STRICT_CONTEXTS = {
    "exfil:attribute-url": r'=[\x00-\x20]*"[^"]*',
    "exfil:attribute-url-single-quoted": r"=[\x00-\x20]*'[^']*",
    "exfil:style-url": "<" + "".join(f"[{c}{c.upper()}]" for c in "style") + "[^<]*",
}
STRICT_START = rf"(?:{FETCH_SCHEME}|[/\\]{_T}[/\\])" + r"[/\\\t\n\r]*"
MD_DESTINATION = r"(?:\]\(\s*<?|\]:\s*<?)"
# From a start tag up to the separator before an attribute name, until the next "<": fail closed (a
# quoted value may hold ">", so the tag is not taken to end there; text after a tag up to the next
# tag counts too, an "on...=" there is refused as well).
TAG_BEFORE_ATTRIBUTE = r"""<[a-zA-Z][^<]*[\x00-\x20/"']"""
ATTRIBUTE_START = r"=[\x00-\x20]*[\"']?[\x00-\x20]*"


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


# Terminators that a URL parser still reads as part of the host (autolinks, link destinations and
# attributes can hold them): after them a label separator and a label character would start a new
# final label (allowed.com);.evil.io is a name under evil.io) and "@" would make what came before a
# userinfo, so those are refused until the host surely ended (whitespace, / ? # \ < > [ ] ^ |).
HOST_PUNCTUATION = ")\"',;*`"
# Label separators: "." and those IDNA maps to "." (ideographic, fullwidth, halfwidth full stops).
LABEL_DOTS = ".\u3002\uff0e\uff61"
_LABEL_CHAR = r"[^\s/?#\\<>\[\]^|.\u3002\uff0e\uff61]"
_HOST_RUN = r"[^\s/?#\\<>\[\]^|]"
# In a strict context a host ends for sure at a character that ends it or that the host parser
# refuses; the punctuation it keeps (a closing quote or parenthesis) is followed as above.
STRICT_HOST_END = "/?#\\ <>[]^|"
STRICT_HOST_PUNCTUATION = "\"'()*,;!$&+=~{}`"


def _host_tail(names: str, punctuation: str, run: str) -> str:
    """``name``, a punctuation terminator, a run of characters the host parser keeps, then ``@`` or
    a label separator and a label character: a host that went on past the allowed one."""
    return (f"(?:{names}){_class(punctuation, negated=False)}{run}*"
            f"(?:@|{_class(LABEL_DOTS, negated=False)}{_T}{_LABEL_CHAR})")


def _after_host(hosts: tuple[str, ...], skip_first: str = "") -> str:
    """The first departure from ``host + terminator``, or a host that goes on after a punctuation
    terminator into a new label or a userinfo."""
    departure = departure_regex(_allowed_after_start(hosts), skip_first=skip_first)
    names = "|".join(regex.escape(h) for h in sorted(hosts, key=len, reverse=True))
    tail = _host_tail(names, HOST_PUNCTUATION, _HOST_RUN)
    return f"(?:{departure}|{tail})"


def _char(c: str) -> str:
    if c.isascii() and c.isalnum():
        return c
    return f"\\u{ord(c):04x}"


def _class(chars: Iterable[str], negated: bool = True) -> str:
    body = "".join(_char(c) for c in sorted(set(chars)))
    return ("[^" if negated else "[") + body + "]"


def strict_departure(hosts: Iterable[str]) -> str:
    """The first departure from ``host + terminator`` where TAB/LF/CR are invisible (removed by the
    URL parser): they may sit anywhere and never end the host. A host ends with a character of
    :data:`STRICT_HOST_END`, or with punctuation of :data:`STRICT_HOST_PUNCTUATION` as long as no
    ``@`` nor label separator and label character follows before the host surely ends. The start
    absorbs slashes; a space right after it means no URL."""
    hosts = tuple(hosts)
    trie: dict = {}
    for host in hosts:
        node = trie
        for c in host:
            node = node.setdefault(c, {})
        node[""] = STRICT_HOST_END + STRICT_HOST_PUNCTUATION

    def node_regex(node: dict, root: bool) -> str:
        children = {c: child for c, child in node.items() if c != ""}
        excluded = set(children) | set(node.get("", "")) | set(URL_INVISIBLE)
        if root:
            excluded |= set("/\\ ")
        branches = [_class(excluded)]
        branches += [_char(c) + node_regex(child, False) for c, child in sorted(children.items())]
        return _T + "(?:" + "|".join(branches) + ")"

    names = "|".join(_spelled(h) for h in sorted(hosts, key=len, reverse=True))
    tail = _T + _host_tail(names, STRICT_HOST_PUNCTUATION, r"[^ \x0b\x0c/?#\\<>\[\]^|]")
    return f"(?:{node_regex(trie, True)}|{tail})"


def other_scheme(known: Iterable[str], sep: str = "", min_len: int = 1) -> str:
    """A scheme name (``[A-Za-z][A-Za-z0-9+.-]*``, at least ``min_len`` characters, ``sep`` between
    characters) that is not one of ``known`` (lowercase, compared case-insensitively)."""
    letters = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    rest = letters | set("0123456789+.-")
    trie: dict = {}
    for word in known:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[""] = {}
    rest_class = _class(rest, negated=False)

    def node_regex(node: dict, depth: int) -> str:
        children = sorted(c for c in node if c)
        allowed = (letters if depth == 0 else rest) - set(children) - {c.upper() for c in children}
        more = max(0, min_len - depth - 1)
        lead = sep if depth else ""
        branches = []
        if allowed:
            branches.append(lead + _class(allowed, negated=False) + f"(?:{sep}{rest_class}){{{more},}}")
        branches += [lead + _ci(c) + node_regex(node[c], depth + 1) for c in children]
        body = "(?:" + "|".join(branches) + ")"
        ends_here = depth >= min_len and "" not in node
        return body + "?" if ends_here else body

    return node_regex(trie, 0)


def _char_reference_rule() -> str:
    decimal = r"&#0*(?:[0-9]|[1-9][0-9]|1[01][0-9]|12[0-7])[^0-9]"
    hexadecimal = r"&#[xX]0*[0-7]?[0-9a-fA-F][^0-9a-fA-F]"
    named = "&(?:" + "|".join(ASCII_NAMED_REFERENCES) + ");"
    return f"{decimal}|{hexadecimal}|{named}"


def exfiltration_rules(allow_hosts: Iterable[str] = ()) -> list[dict]:
    """Regex rules (policy mappings) forbidding links to hosts outside ``allow_hosts``."""
    hosts = normalize_hosts(allow_hosts)
    www_hosts = [h[len("www."):] for h in hosts if h.startswith("www.")]
    # Slashes belong to the URL start; whitespace right after it means no URL ("the http: scheme").
    after_host = _after_host(hosts, skip_first="/\\" + WHITESPACE) if hosts else r"[^\s/\\]"
    after_www = _after_host(tuple(www_hosts)) if www_hosts else "[a-z0-9-]"
    strict_after = strict_departure(hosts) if hosts else _T + r"[^\s/\\]"
    other = other_scheme(FETCH_SCHEMES)
    other_long = other_scheme(FETCH_SCHEMES, sep=_T, min_len=2)
    rules = [
        {"id": "exfil:url", "regex": SCHEME + after_host},
        {"id": "exfil:protocol-relative", "regex": PROTOCOL_RELATIVE + after_host},
        {"id": "exfil:www", "regex": r"www\." + after_www},
    ]
    rules += [{"id": rule_id, "regex": context + STRICT_START + strict_after}
              for rule_id, context in STRICT_CONTEXTS.items()]
    rules = [dict(rule, ignore_case=True) for rule in rules]  # hosts are compared case-insensitively
    return rules + [
        {"id": "exfil:script-url", "regex": _alternation(["javascript", "vbscript"]) + _T + r"\\?:"},
        {"id": "exfil:host-scheme", "regex": WORD_START + "(?:" + _spelled("file") + _T + r"\\?:" + _T + r"[/\\]"
                                             + _T + r"[/\\]|" + _alternation(["smb", "mailto"]) + _T + r"\\?:[^ ])"},
        {"id": "exfil:link-scheme", "regex": MD_DESTINATION + other + r"\\?:"},
        {"id": "exfil:autolink-scheme", "regex": "<" + other_scheme(FETCH_SCHEMES, min_len=2) + r":[^\x00-\x20<>]*>"},
        {"id": "exfil:attribute-scheme", "regex": rf"[^{SCHEME_CHARS}\s][\x00-\x20]*" + other_long + _T + r"\\?:"
                                                  + _T + r"[/\\]"},
        {"id": "exfil:data-url", "regex": ATTRIBUTE_START + _spelled("data") + _T + ":"},
        {"id": "exfil:char-ref", "regex": _char_reference_rule()},
        {"id": "exfil:css-escape", "regex": "(?:<" + _word("style") + "[^<]*|" + _word("style")
                                            + r"[\x00-\x20]*=[^<>]*)\\"},
        {"id": "exfil:active-html", "regex": "<" + _word("script") + "|" + _word("srcdoc") + r"[\x00-\x20]*=|"
                                             + TAG_BEFORE_ATTRIBUTE + _word("on") + r"[a-zA-Z]+[\x00-\x20]*="},
    ]
