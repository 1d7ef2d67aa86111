"""The shipped policies in grammars/: they load, every rule has an id, and each catches what it
claims and nothing of the near misses next to it.

These tests use the oracle (``find_violations``, i.e. ``regex.search``), not the compiler: they
are about the *content* of the policies. The texts (fake keys assembled at run time from a
seeded generator) are in ``tests/support/grammar_cases.py``.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from safedecode.policy.rules import Policy, find_violations, load_policy
from tests.support.grammar_cases import (
    PROFANITY_NEGATIVE,
    PROFANITY_POSITIVE,
    SECRETS_NEGATIVE,
    SECRETS_POSITIVE,
    SHELL_NEGATIVE,
    SHELL_POSITIVE,
)

GRAMMARS = Path(__file__).resolve().parent.parent / "grammars"
POLICY_FILES = sorted(GRAMMARS.glob("*.toml"))


@functools.cache
def policy(name: str) -> Policy:
    return load_policy(GRAMMARS / name)


def found_ids(name: str, text: str) -> set[str]:
    return {v.rule_id for v in find_violations(policy(name), text)}


# --------------------------------------------------------------------------------------------
# Every policy file
# --------------------------------------------------------------------------------------------
def test_the_three_policies_are_shipped():
    assert {p.name for p in POLICY_FILES} >= {"secrets.toml", "shell.toml", "profanity-wordlist.toml"}


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policy_loads_and_every_rule_has_a_unique_id(path):
    loaded = policy(path.name)
    assert loaded.forbid, f"{path.name} has no rules"
    for index, rule in enumerate(loaded.forbid):
        assert rule.id, f"{path.name}: forbid[{index}] has no id"
    ids = loaded.rule_ids()
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate ids"


def test_ids_are_unique_across_policies():
    """Policies are meant to be combined; a report must still say which rule fired."""
    seen: dict[str, str] = {}
    for path in POLICY_FILES:
        for rule_id in policy(path.name).rule_ids():
            assert rule_id not in seen, f"id {rule_id!r} in both {seen[rule_id]} and {path.name}"
            seen[rule_id] = path.name


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policy_accepts_ordinary_text(path):
    link = " see https://example.com/docs?page=2#install."
    text = (
        "Here is a short summary of the meeting. We reviewed the build, removed the old cache "
        "with `rm -rf ./build`, and agreed to rotate the API keys next week. The classic approach "
        f"is to assume nothing and test everything;{link}\n"
        "def main():\n    print('hello, world')\n"
    )
    if path.name == "exfil.toml":  # its job is to refuse every link: only the link may be refused
        assert {v.rule_id for v in find_violations(policy(path.name), text)} == {"exfil:url"}
        text = text.replace(link, "")
    assert find_violations(policy(path.name), text) == []


def test_exfil_policy_is_the_no_host_link_rules():
    from safedecode.channels.exfil import exfiltration_rules

    rules = [rule.model_dump(exclude_defaults=True) for rule in policy("exfil.toml").forbid]
    assert rules == exfiltration_rules(())


def test_control_token_policy_covers_every_shipped_chat_format():
    from safedecode.channels.chat_format import available_chat_formats, load_chat_format

    literals = {rule.literal for rule in policy("control-tokens.toml").forbid}
    expected = {t for name in available_chat_formats() for t in load_chat_format(name).control_tokens}
    assert literals == expected
    assert found_ids("control-tokens.toml", "ok <|im_start|>system") == {"control:im-start"}


def test_readme_describes_every_policy():
    readme = (GRAMMARS / "README.md").read_text(encoding="utf-8")
    for path in POLICY_FILES:
        assert f"`{path.name}`" in readme, f"grammars/README.md does not mention {path.name}"
    assert "safedecode check --policy secrets" in readme


# --------------------------------------------------------------------------------------------
# secrets.toml
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,rule_id", SECRETS_POSITIVE)
def test_secrets_positive(text, rule_id):
    assert found_ids("secrets.toml", text) == {rule_id}


@pytest.mark.parametrize("text", SECRETS_NEGATIVE)
def test_secrets_near_miss(text):
    assert find_violations(policy("secrets.toml"), text) == []


def test_secrets_comment_examples_match_their_rule():
    """Each '# Example: X' in secrets.toml is caught by the rule right below it."""
    source = (GRAMMARS / "secrets.toml").read_text(encoding="utf-8")
    blocks = source.split("[[forbid]]")
    checked = 0
    for block, rule_id in zip(blocks[:-1], policy("secrets.toml").rule_ids()):
        for example in re.findall(r"^# Example: (.+?)(?:  +\(.*\))?$", block, re.M):
            assert rule_id in found_ids("secrets.toml", example + "\n"), (rule_id, example)
            checked += 1
    assert checked >= 10


# --------------------------------------------------------------------------------------------
# shell.toml
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,rule_ids", SHELL_POSITIVE)
def test_shell_positive(text, rule_ids):
    assert found_ids("shell.toml", text) == rule_ids


@pytest.mark.parametrize("text", SHELL_NEGATIVE)
def test_shell_near_miss(text):
    assert find_violations(policy("shell.toml"), text) == []


def test_shell_comment_examples():
    """'# Matches:' / '# Not matched:' lines in shell.toml are true for the rule right below them.

    Examples on one line are separated by three or more spaces; each is checked followed by a
    newline, as a command would be.
    """
    source = (GRAMMARS / "shell.toml").read_text(encoding="utf-8")
    blocks = source.split("[[forbid]]")
    checked = 0
    for block, rule_id in zip(blocks[:-1], policy("shell.toml").rule_ids()):
        mode = None
        for line in block.splitlines():
            heading = re.match(r"# (Matches|Not matched): +(.*)", line)
            continuation = re.match(r"#  {8,}(\S.*)", line)
            if heading:
                mode, rest = heading.group(1), heading.group(2)
            elif continuation and mode:
                rest = continuation.group(1)
            else:
                mode = None
                continue
            for example in re.split(r" {3,}", rest.strip()):
                ids = found_ids("shell.toml", example + "\n")
                if mode == "Matches":
                    assert rule_id in ids, (rule_id, example)
                else:
                    assert not ids, (rule_id, example, ids)
                checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------------------------
# profanity-wordlist.toml
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,rule_id", PROFANITY_POSITIVE)
def test_profanity_positive(text, rule_id):
    assert found_ids("profanity-wordlist.toml", text) == {rule_id}


@pytest.mark.parametrize("text", PROFANITY_NEGATIVE)
def test_profanity_near_miss(text):
    assert find_violations(policy("profanity-wordlist.toml"), text) == []


def test_profanity_rules_are_whole_word_case_insensitive_literals():
    for rule in policy("profanity-wordlist.toml").forbid:
        assert getattr(rule, "literal", None), rule.id
        assert rule.whole_word and rule.ignore_case, rule.id
        assert rule.id == "profanity-" + rule.literal.lower().replace(" ", "-")


# --------------------------------------------------------------------------------------------
# Coverage: every rule of every policy is exercised by a positive example above
# --------------------------------------------------------------------------------------------
def test_every_rule_has_a_positive_example():
    """(A word list needs no example per word: the shape of its rules is checked above.)"""
    fired = {
        "secrets.toml": {rule_id for _, rule_id in SECRETS_POSITIVE},
        "shell.toml": set().union(*(ids for _, ids in SHELL_POSITIVE)),
    }
    for name, ids in fired.items():
        missing = set(policy(name).rule_ids()) - ids
        assert not missing, f"{name}: rules without a positive example: {sorted(missing)}"
