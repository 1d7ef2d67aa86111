"""The text contract of DESIGN §1, written independently of the library: what text a byte string is,
and whether that text contains a match of a pattern (by the ``regex`` package)."""
import regex

_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def incomplete_tail(data: bytes) -> int:
    """Length of a trailing, so far valid but unfinished UTF-8 sequence (0 if none)."""
    for k in range(1, min(3, len(data)) + 1):
        lead = data[-k]
        need = 1 if 0xC2 <= lead <= 0xDF else 2 if 0xE0 <= lead <= 0xEF else 3 if 0xF0 <= lead <= 0xF4 else 0
        if need == 0:
            if 0x80 <= lead <= 0xBF:
                continue  # a continuation byte: look further back for the lead
            return 0
        if k > need:
            return 0
        rest = data[len(data) - k + 1:]
        lo, hi = _SECOND_BYTE.get(lead, (0x80, 0xBF))
        ok = all((lo <= b <= hi) if i == 0 else (0x80 <= b <= 0xBF) for i, b in enumerate(rest))
        return k if ok and k <= need else 0
    return 0


def text_of(data: bytes) -> str:
    """UTF-8 with U+FFFD for invalid bytes; an incomplete sequence at the very end is not yet a char."""
    return data[:len(data) - incomplete_tail(data)].decode("utf-8", "replace")


def contains(pattern: str, flags: int, data: bytes) -> bool:
    return regex.search(pattern, text_of(data), flags) is not None


def adds_replacement_char(data: bytes, token: bytes) -> bool:
    """Does appending ``token`` to ``data`` add a U+FFFD (invalid UTF-8) to the text? (The text of
    ``data`` is a prefix of the text of ``data + token``.)"""
    return "\ufffd" in text_of(data + token)[len(text_of(data)):]


def assert_agrees_on_prefixes(dfa, pattern, flags, data):
    """A byte DFA says "match" after each prefix of ``data`` exactly when ``regex.search`` does."""
    state = dfa.start
    for i in range(len(data) + 1):
        if i:
            state = int(dfa.trans[state, data[i - 1]])
        expected = regex.search(pattern, text_of(data[:i]), flags) is not None
        assert bool(dfa.end_accept[state]) == expected, (pattern, data[:i], text_of(data[:i]))


def dfa_verdicts(dfa, data: bytes) -> tuple[bool, bool]:
    """(violated at some prefix, EOS blocked at the end) by walking a byte DFA over ``data``."""
    state = dfa.start
    for byte in data:
        state = int(dfa.trans[state, byte])
        if state == 0:
            return True, False
    return False, bool(dfa.eos_blocked_or_none()[state])


def json_strings(value):
    """Every key and string value of a parsed JSON document, depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)
