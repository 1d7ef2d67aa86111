"""Block rules (a positive grammar after an opening tag) against the ``regex`` partial-match oracle.

For random texts built from the grammar's own pieces, the composite byte DFA must say "MATCH
reached" exactly when the oracle (:func:`safedecode.policy.rules.find_violations`, which decides the
block language with ``regex`` full and partial matching) reports a violation at some prefix, and
its ``eos_blocked`` flag must hold exactly when a block is left unfinished.
"""
import random

import pytest
from hypothesis import given, settings, strategies as st

from safedecode import Policy, find_violations
from safedecode.policy.automaton import compile_components
from safedecode.policy.rules import open_block

from tests.support.text_oracle import dfa_verdicts, text_of

BODY = r'\{"name": "(?:get_weather|send)", "args": \{"n": (?:0|[1-9][0-9]{0,3})\}\}'
RULES = [
    {"id": "call", "open": "<call>", "body": BODY, "close": "</call>"},
    {"id": "first", "open": "<call>", "body": BODY, "close": "</call>", "at_start": True},
    {"id": "no-close", "open": "[[", "body": r"[a-c]{1,3}\]\]"},
]
PIECES = ["<call>", "</call>", '{"name": "', "get_weather", "send", '", "args": {"n": ', "0", "7", "12", "}}",
          "hello ", "<ca", "ll>", "[[", "ab", "]]", "é", "\n", "x"]


@pytest.mark.parametrize("rule", RULES, ids=[r["id"] for r in RULES])
def test_block_dfa_agrees_with_the_partial_match_oracle(rule):
    policy = Policy(forbid=[rule])
    ((dfa, _),) = compile_components(policy)
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 9)))
        data = text.encode()
        violated, eos_blocked = dfa_verdicts(dfa, data)
        expected = bool(find_violations(policy, text_of(data)))
        assert violated == expected, f"{rule['id']}: DFA says {violated} for {text!r}"
        if not violated:
            assert eos_blocked == (open_block(policy, text_of(data)) is not None), text
        seen[violated] += 1
    assert min(seen.values()) > 25  # both verdicts were exercised


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<call>/{}"name: get_wthrsd,0123456789 é')), max_size=40))
def test_block_dfa_on_arbitrary_texts(text):
    policy = Policy(forbid=[RULES[0]])
    ((dfa, _),) = compile_components(policy)
    assert dfa_verdicts(dfa, text.encode())[0] == bool(find_violations(policy, text))


def test_a_grammar_that_matches_nothing_is_refused():
    from safedecode import PolicyError

    policy = Policy(forbid=[{"id": "never", "open": "<call>", "body": r"[^\x00-\U0010ffff]", "close": "</call>"}])
    with pytest.raises(PolicyError, match="never.*match no text"):
        compile_components(policy)


def test_a_lead_byte_that_cannot_complete_inside_a_block_is_refused():
    """After ``<call>`` only ``{`` may follow: a lead byte of a multi-byte character is a dead end."""
    policy = Policy(forbid=[RULES[0]])
    ((dfa, _),) = compile_components(policy)
    assert dfa_verdicts(dfa, "<call>".encode() + b"\xc3")[0] is True
    inside_string = '<call>{"name": "'.encode()
    assert dfa_verdicts(dfa, inside_string + b"\xc3")[0] is True  # the enum allows no "é"
    assert dfa_verdicts(dfa, "hello ".encode() + b"\xc3") == (False, False)  # free text: harmless


def test_block_rules_load_from_toml_and_refuse_bad_input(tmp_path):
    from safedecode import PolicyError, load_policy

    path = tmp_path / "p.toml"
    path.write_text('[[forbid]]\nid = "t"\nopen = "<t>"\nbody = "a+"\nclose = "</t>"\n')
    assert load_policy(path).forbid[0].close == "</t>"
    path.write_text('[[forbid]]\nopen = "<t>"\nbody = "a$"\n')
    with pytest.raises(PolicyError, match="body.*anchors"):
        load_policy(path)
    path.write_text('[[forbid]]\nopen = "<t>"\nbody = "a"\nregex = "b"\n')
    with pytest.raises(PolicyError, match="exactly one"):
        load_policy(path)
