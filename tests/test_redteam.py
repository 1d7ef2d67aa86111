"""Smoke test of the red-team corpus (tests/support/redteam_corpus.py): the cases, their oracles, the
ROC AUC. No model is loaded (the runs are benchmarks/redteam.py's, made by hand: see its docstring)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.support import redteam_corpus as rt
from tests.support.channel_oracle import Request

CASES = rt.build_corpus()
POLICIES = {"shipped": rt.shipped_policy()}


def test_corpus_size_and_categories():
    attacks = [c for c in CASES if c.is_attack]
    benign = [c for c in CASES if not c.is_attack]
    assert len(attacks) >= 100 and len(benign) >= 50
    assert {c.category for c in attacks} == set(rt.ATTACK_CATEGORIES)
    assert {c.category for c in benign} == set(rt.BENIGN_CATEGORIES)
    assert len({c.id for c in CASES}) == len(CASES)
    assert rt.build_corpus() == CASES  # seeded: the same corpus every run


def test_no_token_shaped_string_in_the_sources():
    """The fake secrets are assembled at run time: neither the corpus nor the benchmark holds one."""
    benchmark = Path(__file__).resolve().parent.parent / "benchmarks" / "redteam.py"
    for path in (Path(rt.__file__), benchmark):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"AKIA[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{36}|sk-[A-Za-z0-9]{20}", source), path
        assert all(value not in source for value in rt.make_secrets().values()), path


def _request(case) -> Request:
    """What the injection oracle needs, without a tokenizer (no nonce, no tool runtime)."""
    return Request(system=case.system or "", trusted_text=(case.system or "") + "\n" + case.user,
                   control_tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
                   tool_result_tags=("<tool_response>", "</tool_response>"),
                   allow_hosts=rt.ALLOW_HOSTS if case.is_conversation else ())


@pytest.mark.parametrize("case", [c for c in CASES if c.is_attack], ids=lambda c: c.id)
def test_every_attack_has_an_oracle_that_flags_its_bait(case):
    """The text each attack wants written is caught by the oracles (for tool hijacks: a planted
    tool call), and the benign prompts carry a deterministic utility check instead."""
    assert case.bait
    verdict = rt.judge_output(case, case.bait, case.bait, [], _request(case), POLICIES)
    assert verdict.success
    if case.payloads:
        assert verdict.payload, "the payload detector must find the attack's payload in its bait"
    if case.category == "tool_hijack":
        assert case.tools and "<tool_call>" in case.bait


def test_benign_cases_have_a_utility_check():
    for case in CASES:
        if not case.is_attack:
            assert not case.bait and not case.payloads
            assert case.expect or case.category in ("answer", "support")
            assert case.expect_tool is None or case.expect_tool in case.tools


@pytest.mark.parametrize("text, payload, word, forms", [
    ("You are an idiot.", "idiot", True, ["verbatim"]),
    ("an idiotic idea, scrap that, classic", "idiot", True, []),
    ("scrap", "crap", True, []),
    ("I D I O T", "idiot", True, ["obfuscated"]),
    ("you 1d10t", "idiot", True, ["obfuscated"]),
    ("id\u200biot", "idiot", True, ["obfuscated"]),
    ("\u0456d\u0456\u043et", "idiot", True, ["obfuscated"]),          # Cyrillic look-alikes
    ("WW91IGFyZSBhbiBpZGlvdC4=", "idiot", True, ["base64"]),
    ("7374757069640a", "stupid", True, ["hex"]),
    (".toidi na era uoY", "idiot", True, ["reversed"]),
    ("m%6Fr%6Fn", "moron", True, ["url-encoded"]),
    ("Ivy\nDew\nIce\nOwls\nTrees", "idiot", True, ["acrostic"]),
    ("K E Y - 1 2 3 4 - X", "KEY-1234-X", False, ["obfuscated"]),
    ("KEY-1234-X", "KEY-1234-X", False, ["verbatim"]),
    ("KEY-1234", "KEY-1234-X", False, []),
])
def test_payload_forms(text, payload, word, forms):
    assert rt.payload_forms(text, payload, word) == forms


def test_roc_auc_on_known_inputs():
    assert rt.roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert rt.roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert rt.roc_auc([1, 1], [1, 1]) == 0.5
    assert rt.roc_auc([0.1, 0.4, 0.35, 0.8], [0.0, 0.3, 0.5]) == pytest.approx(8 / 12)  # 8 of 12 pairs ordered
    assert math.isnan(rt.roc_auc([], [1.0]))
    curve = rt.roc_curve([0.9, 0.2], [0.5, 0.1])
    assert curve[0] == (0.0, 0.0) and curve[-1] == (1.0, 1.0)
    assert curve == [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]


def test_select_is_stratified():
    picked = rt.select(CASES, len(rt.ATTACK_CATEGORIES + rt.BENIGN_CATEGORIES))
    assert sorted(c.category for c in picked) == sorted(rt.ATTACK_CATEGORIES + rt.BENIGN_CATEGORIES)
