"""Rule variants (safedecode/variants.py): real evasions are found with the right variant and not
without it, ordinary text is not, every generated pattern is inside the supported syntax, and the
compiled automaton refuses exactly the token where the text first contains a match."""
from __future__ import annotations

import base64
import itertools

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import safedecode
from safedecode.errors import PolicyError
from safedecode.policy.rules import (
    LiteralRule,
    Policy,
    RegexRule,
    find_violations,
    load_policy,
    policy_from_mapping,
)
from safedecode.automata.syntax import parse
from safedecode.policy.variants import (
    SEPARATOR,
    VARIANTS,
    _Emitter,
    base64_forms,
    confusables,
    literal_pattern,
    nfkc_preimages,
    separator,
)
from tests.support.grammar_cases import (
    SECRETS_NEGATIVE,
    SECRETS_POSITIVE,
    SHELL_NEGATIVE,
    SHELL_POSITIVE,
)
from tests.support.text_oracle import text_of


def bomb(*variants, **options) -> Policy:
    return Policy(forbid=[dict(literal="bomb", id="bomb", variants=list(variants), **options)])


def b64_with_bomb_at(k: int) -> str:
    """Base64 of a sentence in which "bomb" starts at byte 15 + k: alignment k % 3."""
    return base64.b64encode(b"x" * k + b"how to build a bomb at home").decode()


# (text, the variant that must find it). Each is found with exactly that variant and by no other
# single variant, nor without variants.
EVASIONS = [
    ("a ｂｏｍｂ here", "confusables"),                          # fullwidth (NFKC)
    ("a 𝐛𝐨𝐦𝐛 here", "confusables"),                           # mathematical bold (NFKC)
    ("a 𝕓𝕠𝕞𝕓 here", "confusables"),                           # double-struck
    ("a b\u043emb here", "confusables"),                       # Cyrillic о (confusables.txt)
    ("a \u0184omb here", "confusables"),                       # Ƅ (tone six) for b
    ("a b.o.m.b here", "spacing"),
    ("a b o m b here", "spacing"),
    ("a b-o-m-b here", "spacing"),
    ("a b\u200bo\u200bm\u200bb here", "spacing"),              # zero-width spaces
    ("a b\u00adom\u00adb here", "spacing"),                    # soft hyphens
    ("a b\u0336o\u0336m\u0336b\u0336 here", "spacing"),        # combining strike-through
    ("a b. o. m. b here", "spacing"),
    ("a b★o★m★b here", "spacing"),                            # symbols
    ("a b😀o💣m👍🏽b here", "spacing"),                          # emoji (with a skin-tone modifier)
    ("a b\ufffdo\ufffdm\ufffdb here", "spacing"),             # what invalid bytes decode to
    ("a bжoжmжb here", "spacing"),                            # another script's letters are filler
    ("a b_o_m_b here", "spacing"),
    ("a b0mb here", "leet"),
    ("a 8omb here", "leet"),
    ("a BOMB here", "case"),
    ("a bOmB here", "case"),
    ("a bmob here", "encodings"),                              # reversed
    ("a %62omb here", "encodings"),                            # URL-encoded, mixed
    ("q=%62%6F%6d%62", "encodings"),
    ("626f6d62", "encodings"),                                 # hex
    ("626F6D62", "encodings"),
    ("\\x62\\x6f\\x6d\\x62", "encodings"),
    ("62 6f 6d 62", "encodings"),
] + [(b64_with_bomb_at(k), "encodings") for k in range(3)] + [
    (b64_with_bomb_at(1).replace("+", "-").replace("/", "_"), "encodings"),
    (base64.urlsafe_b64encode(b"??>bomb??>").decode(), "encodings"),  # base64url: '-' and '_'
]

NEAR_MISSES = [  # with every variant on a whole-word "bomb": ordinary text
    "The bomber flew over the tomb.",
    "bombastic, bombs, abomb",
    "Bob, mom and Bambi went to the mall.",
    "A womb, a comb and a combo.",
    "mob rule, b-movies and BMW",
    base64.b64encode(b"hello world, this text is perfectly fine").decode(),
    "626f6d, 62",  # the hex bytes of "bomb" with a separator hex forms do not allow
    "Meet at 6:26, room 6d62.",
]


@pytest.mark.parametrize("text,variant", EVASIONS)
def test_evasion_found_with_its_variant_only(text, variant):
    assert [v.rule_id for v in find_violations(bomb(variant), text)] == ["bomb"], text
    assert find_violations(bomb(), text) == []
    for other in VARIANTS:
        if other != variant:
            assert find_violations(bomb(other), text) == [], (text, other)


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses(text):
    assert find_violations(bomb(*VARIANTS, whole_word=True), text) == []


def test_whole_word_with_variants():
    policy = bomb(*VARIANTS, whole_word=True)
    for text in ["a b.o.m.b!", "bo mb", "ＢＯＭＢ", "b0mb.", "bmob", "%62omb", "x %62omb", "626f6d62"]:
        assert find_violations(policy, text), text
    for text in ["xbomb", "bombx", "xbmob", "x%62om", "cl%62omb"[:-1]]:
        assert not find_violations(policy, text), text


@given(st.binary(max_size=5), st.binary(min_size=1, max_size=12), st.binary(max_size=5))
@settings(max_examples=300, deadline=None)
def test_base64_forms_are_in_every_encoding(prefix, data, suffix):
    """Whatever surrounds ``data``, its encoding contains the form of its alignment."""
    forms = base64_forms(data)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(prefix + data + suffix).decode()
        assert regex.search(forms[len(prefix) % 3], encoded), (prefix, data, suffix)


# --------------------------------------------------------------------------------------------
# Generated patterns
# --------------------------------------------------------------------------------------------
LITERALS = ["bomb", "a", "I'm", "x]y\\z^-", "café", "日本", "🙂ok", "a b", "ſs"]
SUBSETS = [()] + [(v,) for v in VARIANTS] + [tuple(VARIANTS), ("case", "confusables", "leet"),
                                              ("spacing", "leet", "encodings")]


@pytest.mark.parametrize("literal", LITERALS)
def test_generated_patterns_parse_and_keep_the_plain_literal(literal):
    for variants, whole_word, ignore_case in itertools.product(SUBSETS, (False, True), (False, True)):
        rule = LiteralRule(literal=literal, whole_word=whole_word, ignore_case=ignore_case, variants=variants)
        pattern = rule.pattern
        assert pattern.isascii() or not variants
        parse(pattern, ignore_case=ignore_case)
        plain = rf"\b{regex.escape(literal)}\b" if whole_word else regex.escape(literal)
        for text in (literal, f" {literal} ", f"({literal}!"):
            if regex.search(plain, text, rule.flags):
                assert regex.search(pattern, text, rule.flags), (literal, variants, text)


def test_variants_are_canonical_and_change_nothing_when_absent():
    rule = Policy(forbid=[{"literal": "bomb", "variants": ["leet", "case", "leet"]}]).forbid[0]
    assert rule.variants == ("case", "leet")
    assert LiteralRule(literal="a.b", whole_word=True).pattern == r"\ba\.b\b"
    assert RegexRule(regex="a+b").pattern == "a+b"


def test_example_pattern():
    assert literal_pattern("bomb", False, False, ("leet",)) == "[8b][0o]m[8b]"
    assert literal_pattern("bomb", False, False, ("case",)) == "(?i:[Bb][Oo][Mm][Bb])"
    assert literal_pattern("bomb", True, True, ("leet",)) == r"\b[8Bb][0Oo][Mm][8Bb]\b"


def test_confusable_data_comes_from_the_package_and_nfkc():
    assert "\u043e" in confusables()["o"] and "o" in confusables()["\u043e"]  # Cyrillic о
    assert {"ｂ", "𝐛", "ⓑ"} <= nfkc_preimages()["b"]
    assert all(len(k) == 1 and all(len(c) == 1 for c in v) for k, v in confusables().items())


def test_separator_never_stands_for_a_letter():
    assert regex.fullmatch(SEPARATOR, "$") and regex.fullmatch(SEPARATOR, "\u200b")
    leet_sep = separator(("spacing", "leet"))
    for c in "@$!|+":
        assert not regex.fullmatch(leet_sep, c), c
    assert regex.fullmatch(leet_sep, ".") and regex.fullmatch(leet_sep, "\u00ad")


# --------------------------------------------------------------------------------------------
# Regex rules
# --------------------------------------------------------------------------------------------
def test_regex_rule_variants_expand_literal_characters():
    policy = Policy(forbid=[{"regex": r"\bbomb(?:s|ing)?\b", "id": "r",
                             "variants": ["case", "confusables", "spacing", "leet"]}])
    for text in ["b o m b i n g", "𝐁𝐎𝐌𝐁𝐬", "B0MBS", "b.o.m.b"]:
        assert find_violations(policy, text), text
    for text in ["bombastic", "the tomb", "bomber"]:
        assert not find_violations(policy, text), text


REGEX_TEXTS = [t for t, _ in SECRETS_POSITIVE + SHELL_POSITIVE] + list(SECRETS_NEGATIVE) + list(SHELL_NEGATIVE)


@pytest.mark.parametrize("name", ["secrets.toml", "shell.toml", "exfil.toml"])
def test_regex_emitter_keeps_meaning(name):
    """Written back without expansion, every shipped regex means what it meant (the same matches on
    the grammar tests' texts), and with spacing it still parses."""
    for rule in load_policy(f"grammars/{name}").forbid:
        if not isinstance(rule, RegexRule):
            continue
        node = parse(rule.regex, rule.ignore_case)
        same = _Emitter((), rule.ignore_case).node(node)
        parse(same, rule.ignore_case)
        for text in REGEX_TEXTS:
            expected = [m.span() for m in regex.finditer(rule.regex, text, rule.flags)]
            assert [m.span() for m in regex.finditer(same, text, rule.flags)] == expected, (rule.id, text)
        parse(_Emitter(("spacing", "confusables"), rule.ignore_case).node(node), rule.ignore_case)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,needle", [
    ({"literal": "x", "id": "k", "variants": ["case", "homoglyphs"]}, "unknown variant 'homoglyphs'"),
    ({"regex": "x+", "id": "k", "variants": ["encodings"]}, "'encodings' applies to literal rules only"),
    ({"literal": "x", "id": "k", "variants": "case"}, "must be a list"),
    ({"literal": "x", "id": "k", "variants": [1]}, "unknown variant 1"),
])
def test_bad_variants_name_rule_and_field(rule, needle):
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"forbid": [{"literal": "ok"}, rule]}, source="p.toml")
    message = str(info.value)
    assert "p.toml" in message and "forbid[1] (id 'k')" in message and "variants" in message and needle in message


def test_block_rules_take_no_variants():
    with pytest.raises(PolicyError, match="forbid.0.*variants.*unknown key"):
        Policy(forbid=[{"open": "<a>", "body": "x", "close": "</a>", "variants": ["case"]}])


def test_bad_regex_with_variants_reports_the_original_position():
    with pytest.raises(safedecode.errors.PatternError) as info:
        Policy(forbid=[{"regex": "ab(?=c)", "id": "k", "variants": ["spacing"]}])
    assert "forbid[0]" in str(info.value) and "lookahead" in str(info.value)


def test_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[forbid]]\nid = "b"\nliteral = "bomb"\nvariants = ["confusables", "spacing"]\n')
    policy = load_policy(path)
    assert policy.forbid[0].variants == ("confusables", "spacing")
    assert find_violations(policy, "ｂ.ｏ.ｍ.ｂ")


# --------------------------------------------------------------------------------------------
# The compiled automaton agrees with the oracle, token by token
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["substring", "whole_word"])
def compiled_bomb(request, smollm2_tokenizer):
    return safedecode.compile_policy(bomb(*VARIANTS, whole_word=request.param), smollm2_tokenizer, cache_dir=False)


@pytest.mark.parametrize("text", [t for t, _ in EVASIONS] + NEAR_MISSES)
def test_automaton_refuses_exactly_where_the_match_appears(compiled_bomb, smollm2_tokenizer, text):
    """Walk the SmolLM2 tokenization: each token is refused iff the text with it contains a match,
    so the first refused token is exactly where the oracle first finds one."""
    policy = compiled_bomb.policy
    token_bytes = compiled_bomb.vocabulary.token_bytes
    state, data = compiled_bomb.start_state, b""
    for token in smollm2_tokenizer.encode(text, add_special_tokens=False):
        matched = bool(find_violations(policy, text_of(data + token_bytes[token])))
        assert (token in set(compiled_bomb.forbidden_ids(state).tolist())) == matched, (text, data)
        if matched:
            return
        state, data = compiled_bomb.next_state(state, token), data + token_bytes[token]
    assert text in NEAR_MISSES, f"{text!r}: no token completed a match"
