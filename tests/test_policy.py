"""Policies as data, and every bad input giving one clear error that names the problem."""
import pytest
import regex

from safedecode import AutomatonTooLargeError, PatternError, Policy, PolicyError, find_violations, load_policy
from safedecode.policy.automaton import compile_components, compile_policy_dfa


def write(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_policy_reads_forbid_tables(tmp_path):
    path = write(tmp_path, '''
[[forbid]]
id = "pw"
literal = "password"
ignore_case = true

[[forbid]]
regex = 'sk-[A-Za-z0-9]{20,}'

[[forbid]]
literal = "ass"
whole_word = true
''')
    policy = load_policy(path)
    assert [type(r).__name__ for r in policy.forbid] == ["LiteralRule", "RegexRule", "LiteralRule"]
    assert policy.rule_ids() == ["pw", "forbid[1]", "forbid[2]"]
    found = find_violations(policy, "My PassWord is sk-" + "a" * 24 + ", not classic ass.")
    assert [(v.rule_id, v.text) for v in found] == [("pw", "PassWord"), ("forbid[1]", "sk-" + "a" * 24),
                                                     ("forbid[2]", "ass")]


def test_rule_semantics_are_the_oracles():
    policy = Policy(forbid=[{"literal": "a.b", "whole_word": True, "ignore_case": True}])
    rule = policy.forbid[0]
    assert rule.pattern == r"\ba\.b\b" and rule.flags == regex.IGNORECASE
    assert find_violations(policy, "xa.b") == [] and find_violations(policy, "A.B!") != []


def test_policy_is_immutable_and_hashable():
    policy = Policy(forbid=[{"literal": "x"}])
    with pytest.raises(Exception):
        policy.forbid = ()
    assert policy.digest() == Policy(forbid=[{"literal": "x"}]).digest() != Policy(forbid=[{"literal": "y"}]).digest()
    assert len({policy, Policy(forbid=[{"literal": "x"}])}) == 1


@pytest.mark.parametrize("body, expected", [
    ('[[forbid]]\nliteral = "a"\nregex = "b"\n', ["forbid[0]", "both 'literal' and 'regex'"]),
    ('[[forbid]]\nid = "r1"\nignore_case = true\n', ["forbid[0]", "'r1'", "exactly one of 'literal', 'regex', 'body'"]),
    ('[[forbid]]\nliteral = "a"\ncolour = "red"\n', ["forbid[0]", "colour", "unknown key"]),
    ('[[forbid]]\nliteral = ""\n', ["forbid[0]", "literal", "must not be empty"]),
    ('[[forbid]]\nliteral = 42\n', ["forbid[0]", "literal"]),
    ('[[forbid]]\nliteral = "a"\nignore_case = "yes"\n', ["forbid[0]", "ignore_case"]),
    ('[[forbid]]\nregex = "a"\nwhole_word = true\n', ["forbid[0]", "whole_word", "unknown key"]),
    ('[[forbid]]\nliteral = "a"\n[[forbid]]\nid = "bad"\nregex = "(?<=x)y"\n', ["forbid[1]", "'bad'", "lookbehind", "position 0"]),
    ('[[forbid]]\nregex = "a|"\n', ["forbid[0]", "empty string"]),
    ('[[forbid]]\nregex = "a("\n', ["forbid[0]", "invalid regex"]),
    ('forbid = "x"\n', ["'forbid' must be an array"]),
    ('allow = []\n', ["unknown top-level key", "allow"]),
    ('[[forbid]\n', ["not valid TOML"]),
])
def test_bad_policy_files_name_file_rule_and_field(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, (part, message)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "nope.toml")


@pytest.mark.parametrize("pattern, construct, position", [
    (r"(a)\1", "backreference", 3),
    (r"a(?=b)", "lookahead", 1),
    (r"a(?!b)", "negative lookahead", 1),
    (r"(?<=a)b", "lookbehind", 0),
    (r"(?<!a)b", "negative lookbehind", 0),
    (r"(?>ab)c", "atomic group", 0),
    (r"a++", "possessive", 2),
    (r"a{2}+", "possessive", 4),
    (r"(a)?(?(1)b|c)", "conditional", 4),
    (r"(?R)a", "recursion", 0),
    (r"(?:abc){e<=1}", "fuzzy", 7),
    (r"a\Kb", r"\K", 1),
    (r"\X", "grapheme", 0),
    (r"(?m)^a", "multiline", 2),
    (r"(?x)a b", "verbose", 2),
    (r"[[:alpha:]]", "POSIX", 1),
    (r"a{", "escaped", 1),
])
def test_unsupported_constructs_are_refused_with_position(pattern, construct, position):
    with pytest.raises(PatternError) as info:
        Policy(forbid=[{"regex": pattern, "id": "rule-x"}])
    assert construct in str(info.value)
    assert info.value.position == position
    assert "rule-x" in str(info.value) and repr(pattern) in str(info.value)


@pytest.mark.parametrize("pattern", ["a*", "a?", r"\b", "^", "(a|)", "(?:x*)*", "$"])
def test_patterns_matching_the_empty_string_are_refused(pattern):
    with pytest.raises(PatternError, match="empty string"):
        Policy(forbid=[{"regex": pattern}])


def test_state_limit_names_the_rule_never_hangs():
    policy = Policy(forbid=[{"literal": "fine", "id": "ok"}, {"regex": r"(a|b)*a(a|b){12}", "id": "blowup"}])
    with pytest.raises(AutomatonTooLargeError, match="rule blowup"):
        compile_policy_dfa(policy, max_states=2000)
    assert compile_policy_dfa(Policy(forbid=[{"regex": r"(a|b)*a(a|b){3}"}]), max_states=2000).n_states > 0


def test_rules_whose_union_explodes_become_separate_components():
    rules = [{"regex": rf"{c}[^\n]*{c}!"} for c in "abcdefghij"]  # each small, their union is not
    components = compile_components(Policy(forbid=rules), component_states=300)
    assert len(components) > 1
    assert sorted(i for _, members in components for i in members) == list(range(len(rules)))
    assert all(dfa.n_states <= 300 for dfa, _ in components)


def test_state_limit_for_a_combination_of_rules():
    rules = [{"regex": rf"{c}[^\n]*{c}!"} for c in "abcdefghij"]  # each small, their product is not
    assert all(compile_policy_dfa(Policy(forbid=[r]), max_states=300) for r in rules)
    with pytest.raises(AutomatonTooLargeError, match="combination"):
        compile_policy_dfa(Policy(forbid=rules), max_states=300)
