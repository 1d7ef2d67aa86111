"""Case-insensitive classes, properties and alternations against the oracle (``regex.IGNORECASE``).

Under IGNORECASE, ``regex`` matches a property alone (``\\p{Lu}``) differently from the same
property as a member of a set, and it makes sets where the pattern shows none: adjacent
single-character alternatives are merged (``(?:[ι]|\\p{Lu})``), and the first character of a match
is pre-checked against the set of possible first items. safedecode refuses a property in those
places (with its position) and must agree with the oracle everywhere else — tested here with
hypothesis on alternations and concatenations of classes, properties and case-folding characters.
"""
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedecode.policy.automaton import compile_nodes
from safedecode.errors import PatternError
from safedecode.automata.syntax import parse

from tests.support.text_oracle import assert_agrees_on_prefixes

# Characters whose case folding reaches across classes: Greek iota forms and U+0345, micro sign,
# title-case digraphs, kra (no case variant), Kelvin sign, long s, dotted/dotless i, sharp s,
# symbol forms of Greek letters, double-struck C.
TRICKY = ["\u0345", "ι", "Ι", "\u1fbe", "µ", "μ", "Μ", "ǅ", "ǆ", "Ǆ", "ĸ", "ŉ", "k", "K", "\u212a", "s", "S", "ſ",
          "i", "I", "İ", "ı", "ß", "ẞ", "ϐ", "β", "Β", "ϒ", "ℂ", "σ", "ς", "Σ", "x", "X", "a", "1", " ", "\u0301",
          "é", "É"]
ATOMS = [r"\p{Lu}", r"\p{Lt}", r"\p{Ll}", r"\P{Lu}", r"\p{L}", r"\p{Greek}", r"\p{Mn}", r"\p{Latin}", "[ι]", "µ",
         r"\u0345", "ß", "\u212a", "ſ", "İ", "ı", "x", "Σ", "ǅ", "[a-z]", r"\w", r"[^\W\d]", r"[ι\p{Lu}]", r"[\p{Lt}x]",
         r"\d", "."]


def patterns():
    atom = st.sampled_from(ATOMS)

    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}|{t[1]}"),
            st.lists(atom, min_size=2, max_size=4).map(lambda a: "(?:" + "|".join(a) + ")"),
            inner.map(lambda p: f"(?:{p})"),
            inner.map(lambda p: f"(?-i:{p})"),
            st.tuples(inner, st.sampled_from(["?", "+", "{2}", "*"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
        )

    return st.recursive(atom, extend, max_leaves=5)


def texts():
    return st.lists(st.sampled_from(TRICKY), max_size=8).map(lambda cs: "".join(cs).encode())


def compile_or_refusal(pattern):
    """The byte DFA of ``pattern`` under IGNORECASE, or None if it was refused (checked to say where)."""
    try:
        node = parse(pattern, ignore_case=True)
    except PatternError as exc:
        if "empty string" in exc.message:
            return None
        assert "under ignore_case" in exc.message and exc.position is not None, exc
        assert pattern[exc.position:].startswith(("\\p", "\\P", "[")), exc
        return None
    return compile_nodes([node], max_states=20_000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pattern=patterns(), data=st.lists(texts(), min_size=1, max_size=4))
def test_classes_properties_and_alternations_under_ignore_case(pattern, data):
    dfa = compile_or_refusal(pattern)
    if dfa is None:
        return
    for text in data:
        assert_agrees_on_prefixes(dfa, pattern, regex.IGNORECASE, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pattern=patterns(), prefix=st.sampled_from(["", "x", "(?:a|x)"]), data=texts())
def test_inline_ignore_case_after_a_prefix(pattern, prefix, data):
    """With a leading literal the first-character pre-check no longer applies, so more is accepted."""
    full = f"{prefix}(?i:{pattern})"
    try:
        node = parse(full)
    except PatternError as exc:
        assert "empty string" in exc.message or exc.position is not None
        return
    assert_agrees_on_prefixes(compile_nodes([node], max_states=20_000), full, 0, data)


@pytest.mark.parametrize("pattern, position", [
    (r"(?:[ι]|\p{Lu})", 7),            # merged into one set: ĸ is not matched, U+0345 is
    (r"(?:\p{Lu}|\p{Ll})", 3),
    (r"(?:\p{Lt}|x)", 3),
    (r"\p{Lu}?x", 0),                  # first-character pre-check over {\p{Lu}, x}
    (r"(?:\p{Lu}x|y)", 3),
    (r"x\p{Lu}|x\p{Ll}", 1),           # common prefix moved out, then merged
    (r"a(?:K|\p{Ll})", 6),
])
def test_property_as_a_set_member_is_refused_with_its_position(pattern, position):
    with pytest.raises(PatternError) as info:
        parse(pattern, ignore_case=True, rule="r1")
    assert info.value.position == position
    assert "ignore_case" in str(info.value) and "rule r1" in str(info.value)


@pytest.mark.parametrize("pattern", [r"(?:µ|[Μ])", r"(?:\u0345|x)", r"[ι\p{Lu}]", r"\p{Lu}x", r"a\p{Lu}|b",
                                     r"(?:[ι]|\w)", r"(?:ſ|K|İ|ß)", r"(?-i:\p{Lu}|\p{Ll})", r"x(?:\p{Lu})+"])
def test_accepted_patterns_agree_with_the_oracle_on_every_tricky_character(pattern):
    dfa = compile_or_refusal(pattern)
    assert dfa is not None, pattern
    compiled = regex.compile(pattern, regex.IGNORECASE)
    candidates = TRICKY + [chr(cp) for cp in range(0x80, 0x3000) if not 0xD800 <= cp <= 0xDFFF][::3]
    for first in ["", "x", "a", "b"]:
        for c in candidates:
            for text in (first + c, first + c + "x"):
                expected = compiled.search(text) is not None
                state = dfa.walk(dfa.start, text.encode())
                assert bool(dfa.end_accept[state]) == expected, (pattern, text)


def test_case_sensitive_alternations_of_properties_are_plain_unions():
    dfa = compile_or_refusal(r"(?-i:[ι]|\p{Lu})")
    for c in TRICKY:
        expected = regex.search(r"[ι]|\p{Lu}", c) is not None
        assert bool(dfa.end_accept[dfa.walk(dfa.start, c.encode())]) == expected, c
