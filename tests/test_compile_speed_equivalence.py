"""The compiled (numba) paths of the compiler build exactly what the pure-Python ones built.

The Python implementations live on in ``tests/support`` as oracles:

* :mod:`tests.support.reference_token_automaton` — the token automaton's Python driver: the numba
  driver must give identical tables (same arrays, same order) on random policies and vocabularies,
  with the reference threshold lowered so that references and the reference cap are exercised;
* :mod:`tests.support.reference_automata` — the Aho–Corasick phrase DFA built with Python dicts:
  the numba trie and failure pass must give the identical table (same state numbers).
"""
import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safedecode.automata.syntax import parse
from safedecode.errors import PatternError
from safedecode.policy.automaton import compile_components, compile_nodes
from safedecode.policy.rules import load_policy
from safedecode.tokens import token_automaton
from safedecode.tokens.trie import build_trie
from safedecode.tokens.vocabulary import vocabulary_of

from safedecode.automata.aho_corasick import phrase_dfa, plain_phrase
from safedecode.policy.automaton import _CharContext

from tests.support import reference_automata, reference_token_automaton

PIECES = ["a", "b", "ab", "ba", "aa", " ", " a", "é", "ß", "\n", "1", "k", "K", "-", "_", "sk", "x", "😀"]
RAW = [b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f", b"\x80"]
SIMPLE = ["a", "b", "ab", r"\d", r"\w", "[ab]", ".", "é", r"\s", "(?i:k)", "ß", "-"]


def simple_patterns():
    atom = st.sampled_from(SIMPLE)
    leaf = st.one_of(atom, atom, st.sampled_from(["^", "$", r"\b", r"\B", r"\A", r"\Z"]))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}|{t[1]}"),
        st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{2,}"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
    ), max_leaves=5)


def vocabularies():
    token = st.one_of(st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map(lambda p: "".join(p).encode()),
                      st.lists(st.sampled_from(RAW + [b"a", b"b"]), min_size=1, max_size=3).map(b"".join))
    return st.lists(token, min_size=1, max_size=120)


def assert_same_tables(new: dict, old: dict) -> None:
    assert new.keys() == old.keys()
    for key in old:
        a, b = np.asarray(new[key]), np.asarray(old[key])
        assert a.dtype == b.dtype, key
        assert a.shape == b.shape and np.array_equal(a, b), key


def both(dfa, trie, threshold=None):
    return (token_automaton.build_token_automaton(dfa, trie, threshold=threshold),
            reference_token_automaton.build_token_automaton(dfa, trie, threshold=threshold))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(patterns=st.lists(simple_patterns(), min_size=1, max_size=3), tokens=vocabularies(),
       threshold=st.integers(0, 6))
def test_token_automaton_equals_the_python_driver(patterns, tokens, threshold):
    try:
        nodes = [parse(p) for p in patterns]
    except PatternError:
        assume(False)
    dfa = compile_nodes(nodes, max_states=5_000)
    trie = build_trie(tokens)
    assert_same_tables(*both(dfa, trie, threshold))
    assert_same_tables(*both(dfa, trie))


@pytest.mark.parametrize("name", ["secrets", "shell", "exfil"])
def test_token_automaton_equals_the_python_driver_on_shipped_policies(name, smollm2_tokenizer):
    trie = build_trie(vocabulary_of(smollm2_tokenizer).token_bytes)
    for dfa, _ in compile_components(load_policy(name)):
        assert_same_tables(*both(dfa, trie))


def test_token_automaton_reference_cap_and_chunks(smollm2_tokenizer, monkeypatch):
    """A low threshold makes nearly every state a reference until the cap; small chunks make the
    driver stop and resume often; progress is reported up to the last state."""
    trie = build_trie(vocabulary_of(smollm2_tokenizer).token_bytes)
    dfa = compile_nodes([parse(r"(?:^|[^0-9A-Za-z_-])sk-[A-Za-z0-9]{20,}"), parse(regex.escape("password"))])
    monkeypatch.setattr(token_automaton, "CHUNK", 7)
    calls = []
    new = token_automaton.build_token_automaton(dfa, trie, progress=lambda done, total: calls.append((done, total)),
                                                threshold=10)
    old = reference_token_automaton.build_token_automaton(dfa, trie, threshold=10)
    assert_same_tables(new, old)
    assert int(new["n_references"][0]) == token_automaton.MAX_REFERENCES
    assert calls[-1][0] == calls[-1][1] == len(new["byte_state"])


def assert_same_char_dfa(new, old) -> None:
    assert new.trans.dtype == old.trans.dtype and np.array_equal(new.trans, old.trans)
    assert new.end_accept.dtype == old.end_accept.dtype and np.array_equal(new.end_accept, old.end_accept)
    assert np.array_equal(new.word_class, old.word_class) and new.alphabet is old.alphabet
    assert (new.eos_blocked is None) == (old.eos_blocked is None)


@settings(max_examples=300, deadline=None)
@given(phrases=st.lists(st.text(alphabet="abcé😀 \n-", min_size=1, max_size=6), min_size=1, max_size=30))
def test_phrase_dfa_equals_the_python_construction(phrases):
    nodes = [parse(regex.escape(p)) for p in phrases]
    context = _CharContext(nodes)
    literal = [plain_phrase(node) for node in nodes]
    new = phrase_dfa(literal, context.alphabet, context.word_classes)
    old = reference_automata.phrase_dfa(literal, context.alphabet, context.word_classes)
    assert_same_char_dfa(new, old)


def test_phrase_dfa_equals_the_python_construction_on_many_phrases(smollm2_tokenizer):
    import random

    rng = random.Random(3)
    words = ["pass", "password", "word", "sword", "or", "the house", "house party", "ho", "use", "a", "é€"]
    phrases = list(dict.fromkeys(" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(3000)))
    nodes = [parse(regex.escape(p)) for p in phrases]
    context = _CharContext(nodes)
    literal = [plain_phrase(node) for node in nodes]
    assert_same_char_dfa(phrase_dfa(literal, context.alphabet, context.word_classes),
                         reference_automata.phrase_dfa(literal, context.alphabet, context.word_classes))


def _old_spec_order(node, out):
    from safedecode.automata.syntax import Alt, Chars, Repeat, Seq

    if isinstance(node, Chars):
        out.append(node.spec)
    elif isinstance(node, (Seq, Alt)):
        for item in node.items:
            _old_spec_order(item, out)
    elif isinstance(node, Repeat):
        _old_spec_order(node.item, out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(patterns=st.lists(st.one_of(simple_patterns(), st.text(alphabet="abk é", min_size=1, max_size=4).map(regex.escape)),
                         min_size=1, max_size=5), ignore_case=st.booleans())
def test_char_context_partitions_as_before(patterns, ignore_case):
    """Literal characters are deduplicated as code points now: same sets in the same order, so the
    same alphabet (class numbers included)."""
    from safedecode.automata import charsets

    try:
        nodes = [parse(p, ignore_case=ignore_case) for p in patterns]
    except PatternError:
        assume(False)
    specs: list = []
    for node in nodes:
        _old_spec_order(node, specs)
    sets = [charsets.resolve(spec) for spec in dict.fromkeys(specs)]
    sets += [charsets.resolve(charsets.WORD_CHARS), charsets.resolve(charsets.NEWLINE)]
    old = charsets.build_alphabet(sets)
    new = _CharContext(nodes).alphabet
    assert new.n_classes == old.n_classes
    assert np.array_equal(new.starts, old.starts) and np.array_equal(new.interval_class, old.interval_class)


@given(st.integers(1, 60), st.integers(1, 12), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_byte_classes_merge_exactly_the_identical_columns(n_states, n_distinct, seed):
    """``byte_classes``: two bytes share a class iff their columns of ``trans`` are equal (checked
    against numpy's own column comparison), and each class's column is its bytes' column."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, n_states, (n_states, n_distinct)).astype(np.int32)
    trans = np.ascontiguousarray(distinct[:, rng.integers(0, n_distinct, 256)])
    columns, class_of = token_automaton.byte_classes(trans)
    assert np.array_equal(columns[:, class_of], trans)
    same_column = (trans[:, :, None] == trans[:, None, :]).all(axis=0)
    assert np.array_equal(class_of[:, None] == class_of[None, :], same_column)
