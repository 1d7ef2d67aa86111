"""Compile time is bounded by a work budget, and case-insensitive literals compile in near-linear time.

* ``ignore_case`` literals (and other plain sequences of character sets) take the bit-parallel
  fast path (:func:`safedecode.automata.aho_corasick.sequence_dfa`), which must mean exactly what the
  general subset construction means — and what ``regex.search`` says;
* work is counted in deterministic units, so "near-linear" is tested on units, never on time;
* a :class:`~safedecode.policy.automaton.Budget` over its limit refuses with an error naming the rule.
"""
import random

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedecode.policy.automaton import (DEFAULT_WORK_BUDGET, SERVER_WORK_BUDGET, Budget, BudgetExceededError,
                                 compile_components, compile_nodes, compile_policy_dfa)
from safedecode.errors import AutomatonTooLargeError
from safedecode.policy.rules import Policy, load_policy
from safedecode.automata.syntax import parse

from tests.support.text_oracle import assert_agrees_on_prefixes

FOLDING = "aAbBiIİıkK\u212asSſßẞσςΣµΜμ\u0345ιΙéÉ 😀"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phrases=st.lists(st.tuples(st.text(alphabet=FOLDING, min_size=1, max_size=5), st.booleans()),
                        min_size=1, max_size=6),
       draw=st.data())
def test_case_insensitive_literals_fast_path_equals_general_construction_and_oracle(phrases, draw):
    """Mixed case-sensitive and case-insensitive phrases; texts spliced from their case variants."""
    pieces = [c for p, _ in phrases for c in p] + [c.upper() for p, _ in phrases for c in p] + \
             [c.lower() for p, _ in phrases for c in p] + ["x", "SS", "ss"]
    data = draw.draw(st.lists(st.sampled_from(pieces), max_size=10).map(lambda cs: "".join(cs).encode()))
    nodes = [parse(regex.escape(p), ignore_case=ic) for p, ic in phrases]
    pattern = "|".join(f"(?i:{regex.escape(p)})" if ic else f"(?-i:{regex.escape(p)})" for p, ic in phrases)
    fast, general = compile_nodes(nodes), compile_nodes(nodes, fast_path=False)
    assert_agrees_on_prefixes(fast, pattern, 0, data)
    assert_agrees_on_prefixes(general, pattern, 0, data)


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.sampled_from(["a", "b", r"\d", "[a-c]", ".", r"(?i:k)", r"(?i:ß)", r"\w", "é"]),
                      min_size=1, max_size=6),
       data=st.lists(st.sampled_from(["a", "b", "c", "1", "k", "K", "\u212a", "ß", "ẞ", "é", " ", "\n"]),
                     max_size=10).map(lambda cs: "".join(cs).encode()))
def test_sequences_of_classes_take_the_fast_path_exactly(items, data):
    pattern = "".join(items)
    fast = compile_nodes([parse(pattern)])
    assert_agrees_on_prefixes(fast, pattern, 0, data)


def _units(policy) -> int:
    budget = Budget(None)
    compile_components(policy, budget=budget)
    return budget.used


@pytest.mark.parametrize("alphabet", ["a", "ab", "abcdefghij klmnop"])
def test_case_insensitive_literal_work_grows_near_linearly(alphabet):
    rng = random.Random(0)

    def literal(n):
        return Policy(forbid=[{"literal": "".join(rng.choice(alphabet) for _ in range(n)), "ignore_case": True}])

    _units(literal(1000))  # the first compile also pays for the oracle scans of its characters
    small, large = _units(literal(1000)), _units(literal(4000))
    assert large < 8 * small, (small, large)  # quadratic would be about 16×


def test_long_case_insensitive_literal_compiles_within_the_server_budget_when_moderate():
    policy = Policy(forbid=[{"literal": "Confidential project Hydra " * 40, "ignore_case": True}])
    compile_components(policy, budget=SERVER_WORK_BUDGET)


def test_over_budget_is_refused_naming_the_rule():
    policy = Policy(forbid=[{"literal": "fine", "id": "ok"}, {"regex": r"\w{500}", "id": "huge"}])
    with pytest.raises(BudgetExceededError) as info:
        compile_components(policy, budget=SERVER_WORK_BUDGET)
    message = str(info.value)
    assert "rule huge" in message and "units of work" in message and f"{SERVER_WORK_BUDGET:,}" in message
    assert isinstance(info.value, AutomatonTooLargeError)  # callers that catch "too large" keep working


def test_budget_bounds_the_work_actually_done():
    budget = Budget(200_000)
    with pytest.raises(BudgetExceededError):
        compile_components(Policy(forbid=[{"regex": r"\w{300}"}]), budget=budget)
    assert budget.used < 200_000 + 50_000  # stops within one step of the limit


def test_over_budget_literal_group_names_its_rules():
    rng = random.Random(1)
    policy = Policy(forbid=[{"literal": "".join(rng.choice("abc ") for _ in range(3000)), "ignore_case": True,
                             "id": f"long{i}"} for i in range(3)])
    with pytest.raises(BudgetExceededError, match="rules long0, long1, long2"):
        compile_components(policy, budget=50_000)


def test_budget_object_is_shared_and_none_is_unbounded():
    policy = Policy(forbid=[{"literal": "secret", "ignore_case": True}, {"regex": r"sk-[A-Za-z0-9]{20,}"}])
    budget = Budget(DEFAULT_WORK_BUDGET)
    compile_components(policy, budget=budget)
    first = budget.used
    assert first > 0
    compile_components(policy, budget=budget)
    assert budget.used > first
    compile_components(policy, budget=None)
    compile_policy_dfa(policy, budget=SERVER_WORK_BUDGET)


@pytest.mark.parametrize("name", ["secrets", "profanity-wordlist", "control-tokens", "exfil", "shell"])
def test_shipped_policies_fit_the_default_budget(name):
    compile_components(load_policy(name), budget=DEFAULT_WORK_BUDGET)


@settings(max_examples=100, deadline=None)
@given(sets=st.lists(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=4), min_size=1, max_size=8))
def test_the_sweep_partition_equals_the_matrix_partition(sets):
    """Many distinct sets (long literals of many scripts) take a sweep; it must partition alike."""
    from safedecode.automata import charsets
    ranges = [charsets.normalize((lo, lo + width) for lo, width in s) for s in sets]
    cuts = sorted({0, charsets.MAX_CODE_POINT + 1} | {x for r in ranges for lo, hi in r for x in (lo, hi + 1)})
    starts = np.array(cuts[:-1], dtype=np.int64)
    matrix, sweep = charsets.build_alphabet(ranges), charsets._build_alphabet_sweep(ranges, starts)
    assert matrix.n_classes == sweep.n_classes
    rename = dict(zip(sweep.interval_class.tolist(), matrix.interval_class.tolist()))
    assert [rename[c] for c in sweep.interval_class.tolist()] == matrix.interval_class.tolist()
    for a, b in zip(matrix.set_classes, sweep.set_classes):
        assert sorted(a.tolist()) == sorted(rename[c] for c in b.tolist())
