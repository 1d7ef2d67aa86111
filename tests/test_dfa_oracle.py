"""The compiled byte DFA agrees with ``regex.search`` on every prefix of every text (DESIGN §1).

Patterns are drawn at random from the supported syntax; texts from an alphabet that stresses the
hard cases: multi-byte characters, case-folding pairs (ß/ẞ, İ/i, σ/ς/Σ, K/K), word/non-word
boundaries, newlines (for ``$``), and raw invalid bytes (which decode to U+FFFD).
"""
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safedecode.policy.automaton import compile_nodes
from safedecode.errors import PatternError
from safedecode.automata.syntax import parse

from tests.support.text_oracle import assert_agrees_on_prefixes

CHARS = ["a", "b", "c", "A", "B", "é", "É", "ß", "ẞ", "i", "I", "İ", "ı", "σ", "ς", "Σ", "k", "K", "\u212a",
         " ", "\n", "_", "1", "٣", "-", ".", "€", "😀", "\u0301"]
ESCAPED = [regex.escape(c) for c in CHARS]
SETS = [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", r"\p{L}", r"\p{Lu}", r"\P{Ll}", r"\p{N}", r"\p{Mn}",
        r"\p{P}", r"\p{So}", r"[a-c]", r"[^ab]", r"[\d_]", r"[é-ẞ]", r"[^\W\d]", ".", r"\x41", r"\u00e9", r"\t"]
ANCHORS = ["^", "$", r"\A", r"\Z", r"\b", r"\B"]


def patterns():
    atom = st.one_of(st.sampled_from(ESCAPED), st.sampled_from(SETS))
    leaf = st.one_of(atom, atom, st.sampled_from(ANCHORS))

    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}|{t[1]}"),
            inner.map(lambda p: f"(?:{p})"),
            inner.map(lambda p: f"(?i:{p})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?"]))
            .map(lambda t: f"(?:{t[0]}){t[1]}"),
        )

    return st.recursive(leaf, extend, max_leaves=6)


def texts():
    piece = st.one_of(st.sampled_from(CHARS).map(lambda c: c.encode()),
                      st.sampled_from([b"\xff", b"\xe2\x82", b"\xc3", b"\xf0\x9f", b"\x80", b"\xed\xa0\x80"]))
    return st.lists(piece, max_size=12).map(b"".join)


def compiled(pattern, ignore_case=False):
    try:
        node = parse(pattern, ignore_case=ignore_case)
    except PatternError:
        assume(False)
    return compile_nodes([node], max_states=20_000)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pattern=patterns(), ignore_case=st.booleans(), data=st.lists(texts(), min_size=1, max_size=4))
def test_dfa_matches_regex_search_on_every_prefix(pattern, ignore_case, data):
    dfa = compiled(pattern, ignore_case)
    flags = regex.IGNORECASE if ignore_case else 0
    for text in data:
        assert_agrees_on_prefixes(dfa, pattern, flags, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(pattern=patterns(), data=texts())
def test_inline_global_flag(pattern, data):
    """``(?i)`` at the start applies to the whole pattern, like the oracle."""
    full = "(?i)" + pattern
    assert_agrees_on_prefixes(compiled(full), full, 0, data)


def test_union_of_patterns_is_any_match():
    pats = [r"\bcat\b", r"dog$", r"(?i:ß)x", r"^\d+z"]
    dfa = compile_nodes([parse(p) for p in pats])
    for text in ["cat", "a cat!", "concat", "hotdog", "dog\n", "dogs", "SSx", "ẞx", "12z", "a12z", "12 z"]:
        expected = any(regex.search(p, text) for p in pats)
        assert bool(dfa.end_accept[dfa.walk(dfa.start, text.encode())]) == expected, text


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from([r"a[ab]{3}", r"ab[a-c]{2,}", r"[ab]a{2}[ab]{3}", r"b\w{4}", r"(?:ab|a)[ab]{2}",
                                r"a[ab]{2}b?", r"(?i:A)[ab]{3}", r"a[ab]{1,3}c"]),
       data=st.lists(st.sampled_from([b"a", b"b", b"c", b" ", b"A"]), max_size=14).map(b"".join))
def test_counted_runs_that_overlap_their_prefix(pattern, data):
    """Σ*a[ab]{n} is the textbook exponential DFA; dominance pruning must keep it exact."""
    assert_agrees_on_prefixes(compiled(pattern), pattern, 0, data)


@settings(max_examples=300, deadline=None)
@given(phrases=st.lists(st.text(alphabet="abé😀 \n", min_size=1, max_size=5), min_size=1, max_size=8),
       draw=st.data())
def test_aho_corasick_fast_path_equals_the_general_construction(phrases, draw):
    """Texts are spliced from pieces of the phrases, so overlaps and failure links get exercised."""
    pieces = [p[i:j] for p in phrases for i in range(len(p)) for j in range(i + 1, len(p) + 1)]
    parts = draw.draw(st.lists(st.one_of(st.sampled_from(pieces).map(str.encode),
                                         st.sampled_from([b"a", b"\xc3", b"\xff", b" "])), max_size=8))
    data = b"".join(parts)
    nodes = [parse(regex.escape(p)) for p in phrases]
    fast, general = compile_nodes(nodes), compile_nodes(nodes, fast_path=False)
    pattern = "|".join(regex.escape(p) for p in phrases)
    assert_agrees_on_prefixes(fast, pattern, 0, data)
    assert_agrees_on_prefixes(general, pattern, 0, data)
