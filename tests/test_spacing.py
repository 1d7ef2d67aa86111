"""The ``spacing`` separator (safedecode/variants.py): every character that is not a letter or digit
— symbols, emoji, U+FFFD (what an invalid byte decodes to), other scripts' letters, marks,
invisible characters — lets a spaced-out phrase through the *oracle*, and the guard refuses it.

Evasions are driven through the real guard on the SmolLM2 vocabulary: an adversary boosts every
token that continues the evasion (any tokenization, single bytes included, so an invalid byte
between two letters is a 0x80 token) and :class:`SafeLogitsProcessor` must mask exactly the
tokens after which the text contains a match. Each evasion is judged twice: by the ``regex``
oracle on the generated pattern, and independently (strip every character that is not an ASCII
letter/digit or a Latin letter, then look for the phrase).
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safedecode
from safedecode import SafeLogitsProcessor
from safedecode.policy.rules import Policy, find_violations, load_policy
from safedecode.policy.variants import (
    LETTERS,
    SEPARATOR,
    letters,
    literal_pattern,
    nonword,
    regex_pattern,
    separator,
    validate_separators,
)
from tests.support.text_oracle import text_of

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("damn", "bomb")


def spaced_policy(*variants: str, whole_word: bool = True) -> Policy:
    return Policy(forbid=[dict(id=w, literal=w, whole_word=whole_word, ignore_case=True,
                               variants=["spacing", *variants]) for w in WORDS])


# --------------------------------------------------------------------------------------------
# Independent judge: what a reader sees once the filler is gone
# --------------------------------------------------------------------------------------------
def is_letter(c: str) -> bool:
    """ASCII letters and digits, and letters whose Unicode name says LATIN (written without the
    library: its LETTERS is the Latin *script* property, this is the character name)."""
    return (c.isascii() and c.isalnum()) or (c.isalpha() and unicodedata.name(c, "").startswith("LATIN"))


def stripped(text: str) -> str:
    return "".join(c for c in text if is_letter(c)).lower()


def spell(word: str, sep: str) -> str:
    return sep.join(word)


# (name, separator between every two letters) — each is not a letter or digit
SEPARATORS = [
    ("star", "★"), ("stars", "☆★"), ("bullet", "•"), ("arrow", "→"), ("check", "✓"), ("heart", "♥"),
    ("section", "§"), ("currency", "€"), ("math", "∑"), ("box", "█"), ("braille", "⠿"),
    ("emoji", "😀"), ("bomb emoji", "💣"), ("skin tone", "👍🏽"), ("emoji+VS16", "❤️"),
    ("flag", "🇺🇸"), ("zwj family", "👨\u200d👩\u200d👧"), ("keycap", "#\ufe0f\u20e3"),
    ("replacement char", "\ufffd"), ("private use", "\ue000"), ("bell", "\x07"), ("tab", "\t"),
    ("cyrillic letter", "ж"), ("greek letter", "ω"), ("han", "中"), ("arabic comma", "،"),
    ("devanagari danda", "।"), ("superscript two", "²"), ("tag char", "\U000E0041"),
    ("combining strike", "\u0336"), ("combining cyrillic", "\u0489"), ("word joiner", "\u2060"),
    ("mixed", " ★😀\u200b.\ufffd_"), ("underscore", "_"), ("dot", "."),
]


@pytest.mark.parametrize("name,sep", SEPARATORS, ids=[n for n, _ in SEPARATORS])
def test_every_non_letter_is_a_separator(name, sep):
    policy = spaced_policy()
    for word in WORDS:
        text = f"you {spell(word, sep)} fool"
        assert word in stripped(text)  # the independent judge: the word is there
        assert [v.rule_id for v in find_violations(policy, text)] == [word], (name, text)
        assert not find_violations(Policy(forbid=[dict(literal=word, whole_word=True, ignore_case=True)]), text)


@pytest.mark.parametrize("c", ["a", "Z", "0", "9", "é", "ß", "ø", "ł", "ɐ", "ḁ", "ｂ", "\u212a", "\u017f"])
def test_letters_and_digits_are_never_separators(c):
    assert not regex.fullmatch(SEPARATOR, c, regex.I) and regex.fullmatch(LETTERS, c, regex.I), c
    assert not regex.fullmatch(separator(("spacing",)), c, regex.I), c


def test_stand_ins_are_not_separators():
    """Under leet and confusables, what stands for a letter is a letter, not filler."""
    leet = separator(("spacing", "leet"))
    for c in "@$!|+":
        assert regex.fullmatch(SEPARATOR, c) and not regex.fullmatch(leet, c), c
    confusable = separator(("spacing", "confusables"))
    for c in ["ⓑ", "\U0001F131", "\u0430", "\U0001d41b", "²"]:  # circled, squared, Cyrillic а, bold 𝐛, ² (z)
        assert not regex.fullmatch(confusable, c), c
    assert regex.fullmatch(confusable, "★") and regex.fullmatch(confusable, "\ufffd")
    # leet turns the digits into letters: "d4mn" with leet, "d 4 m n" is not "damn" with a filler
    assert find_violations(spaced_policy("leet"), "d.4.m.n") and not find_violations(spaced_policy(), "d.4.m.n")


def test_a_phrase_in_another_script_keeps_its_script_letters():
    rule = Policy(forbid=[dict(id="b", literal="бомба", whole_word=True, variants=["spacing"])])
    assert find_violations(rule, "это б★о★м★б★а!") and find_violations(rule, "б ω о м б а")  # Greek: filler
    assert not find_violations(rule, "б o м б а")  # a Latin o is always a letter
    assert not find_violations(rule, "бобомба") and not find_violations(rule, "б ж о м б а")
    assert not regex.fullmatch(separator(("spacing",), "бомба"), "ж")
    assert regex.fullmatch(separator(("spacing",)), "ж")
    cjk = Policy(forbid=[dict(id="j", literal="日本", variants=["spacing"])])
    assert find_violations(cjk, "日★本") and not find_violations(cjk, "日の本")  # kana are letters there


# --------------------------------------------------------------------------------------------
# whole_word with separators
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,found", [
    ("a s s", True), ("you a★s★s", True), ("(a.s.s)", True), ("ass", True), ("a\ufffds\ufffds", True),
    ("has sand", False), ("class assignment", False), ("bass s", False), ("a s sand", False),
    ("the a s, s t", True),   # letters a, s, s standing alone: a spelled-out word
    ("xa s s", False), ("a s sx", False), ("éa s s", False), ("a s sé", False),
    ("my_a_s_s_var", True),   # _ is a separator, so it also ends a word (\b would not)
    ("жa s s", True),         # another script's letter is filler, so it ends a word too (\b would not)
    ("4a s s", False),        # a digit is a letter
])
def test_whole_word_boundaries(text, found):
    policy = Policy(forbid=[dict(id="ass", literal="ass", whole_word=True, ignore_case=True, variants=["spacing"])])
    assert bool(find_violations(policy, text)) == found, text


@given(st.text(st.sampled_from(list("damnDAMN_!@$.,'-4é жω😀\u0301\u0336\ufffd\u200b҂бомба日本")), max_size=12),
       st.sampled_from([("damn", ("spacing",)), ("damn", ("spacing", "leet")), ("бомба", ("spacing",)),
                        ("日本", ("spacing", "case"))]))
@settings(max_examples=400, deadline=None)
def test_spaced_whole_word_matches_everything_the_plain_rule_matches(text, case):
    """Each variant only adds matches: what ``\\b…\\b`` finds, the non-letter boundaries find too."""
    word, variants = case
    for t in (text, word + text, text + word, text[: len(text) // 2] + word + text[len(text) // 2:]):
        if regex.search(rf"\b{regex.escape(word)}\b", t, regex.I):
            assert regex.search(literal_pattern(word, True, True, variants), t, regex.I), t


def test_whole_word_pattern_shape():
    pattern = literal_pattern("damn", True, True, ("spacing",))
    sep, end = separator(("spacing",), "admn"), nonword(("spacing",), "admn")
    assert sep == end  # without stand-ins, what separates letters also ends a word
    assert pattern == rf"(?:\A|{end})[Dd]{sep}*[Aa]{sep}*[Mm]{sep}*[Nn](?:{end}|\Z)"
    leet = literal_pattern("damn", True, True, ("spacing", "leet"))
    for text in ["damn!", "!damn", "$damn$", "d a m n|", "@ d a m n"]:  # ! $ @ | are letters, yet end a word
        assert regex.search(leet, text, regex.I), text
    for text in ["d!amn", "d a m n4", "4damn", "xd@mn"]:
        assert not regex.search(leet, text, regex.I), text
    # a phrase that starts or ends with a separator keeps \b there
    assert literal_pattern("'em", True, False, ("spacing",)).startswith(r"\b")
    assert literal_pattern("damn", False, True, ("spacing",)).startswith("[Dd][^0-9A-Za-z")


# --------------------------------------------------------------------------------------------
# Narrowing the separators (the API a rule's `separators` key would use)
# --------------------------------------------------------------------------------------------
def test_narrowed_separators():
    narrow = r"[\s.\-_]"
    pattern = literal_pattern("damn", True, True, ("spacing", "leet"), narrow)
    assert regex.search(pattern, "d.a-m n", regex.I) and regex.search(pattern, "d_a_m_n!", regex.I)
    assert not regex.search(pattern, "d★a★m★n", regex.I) and not regex.search(pattern, "d\ufffdamn", regex.I)
    # letters are taken out of a narrowed set too
    assert separator(("spacing",), "", "[a-z.]") == r"[\.]"
    spaced_regex = regex_pattern("bo+m", False, ("spacing",), narrow)
    assert regex.search(spaced_regex, "b.o-o m") and not regex.search(spaced_regex, "b★o★m")
    assert literal_pattern("damn", False, False, ("spacing", "leet"), "[@]") == r"d[4\@a]mn"  # nothing left
    for bad, why in [("x", "not a letter"), ("[", "invalid"), ("(?:a|b)", "one character class"),
                     (".", "one character class"), ("", "must be"), (3, "must be"),
                     ("[^\\x00-\\U0010FFFF]", "no character"), ("[a-zé]", "not a letter")]:
        with pytest.raises(ValueError, match=why):
            validate_separators(bad)
    assert validate_separators(narrow) == narrow


def test_generated_patterns_stay_in_the_supported_syntax():
    from safedecode.automata.syntax import parse

    for variants in [("spacing",), ("spacing", "leet"), ("case", "confusables", "spacing", "leet", "encodings")]:
        for word in ["damn", "I'm", "a b", "café", "бомба", "日本", "x"]:
            for whole_word in (False, True):
                pattern = literal_pattern(word, whole_word, True, variants)
                assert pattern.isascii()
                parse(pattern, ignore_case=True)
                assert regex.search(pattern, f" {word} ", regex.I), (word, variants)
    assert letters(("spacing",)) == letters(("spacing",), "damn")  # one class for a whole ASCII word list


# --------------------------------------------------------------------------------------------
# Through the real guard
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[(), ("leet",)], ids=["spacing", "spacing+leet"])
def guard(request, smollm2_tokenizer):
    compiled = safedecode.compile_policy(spaced_policy(*request.param), smollm2_tokenizer, cache_dir=False)
    return compiled, SafeLogitsProcessor(compiled)


def violates(policy: Policy, data: bytes) -> bool:
    return bool(find_violations(policy, text_of(data)))


def push(guard, prefix: bytes, evasion: bytes, suffix: bytes = b" ok"):
    """The adversary: at each step it boosts every token that continues ``prefix + evasion + suffix``
    (every tokenization: whole words, pieces, single bytes); the processor must mask exactly those
    after which the text contains a match. Returns the text generated (stops where the processor
    refuses every continuation)."""
    compiled, processor = guard
    vocab, policy = compiled.vocabulary, compiled.policy
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocab.token_bytes):
        if b:
            by_bytes.setdefault(b, []).append(i)
    target = prefix + evasion + suffix
    processor.reset()
    prompt, generated, data = [by_bytes[b"\n"][0]], [], b""
    while len(data) < len(target):
        rest = target[len(data):]
        wanted = [i for k in range(1, min(len(rest), 24) + 1) for i in by_bytes.get(rest[:k], [])]
        assert wanted  # SmolLM2 has a token for every byte but C0 C1 F5-FF and a few controls
        scores = torch.zeros((1, vocab.size))
        scores[0, wanted] = 100.0 + torch.arange(len(wanted), dtype=torch.float32)
        out = processor(torch.tensor([prompt + generated]), scores)[0]
        for token in wanted:
            assert bool(torch.isneginf(out[token])) == violates(policy, data + vocab.token_bytes[token]), (
                data, vocab.token_bytes[token])
        choice = int(torch.argmax(out))
        if choice not in wanted:
            break
        generated.append(choice)
        data += vocab.token_bytes[choice]
        assert not violates(policy, data), data
    return data


def byte_token(vocab, value: int) -> int:
    return next(i for i, b in enumerate(vocab.token_bytes) if b == bytes([value]))


EVASIONS = [(name, spell(word, sep).encode()) for name, sep in SEPARATORS for word in WORDS[:1]] + [
    ("invalid byte 0x80", b"d\x80a\x80m\x80n"),
    ("invalid byte 0xbf", b"b\xbfo\xbfm\xbfb"),
    ("lead byte without continuation", b"b\xf3o\xe2m\xc3b"),
    ("lone continuation bytes", b"d\x80\xbfa\x80m\x80\x80n"),
    ("truncated sequence", b"d\xe2\x98a\xe2\x98m\xe2\x98n"),  # one U+FFFD each
    ("bad second byte", b"d\xe0\x80a\xed\xa0m\xf4\x90n"),  # surrogate / above U+10FFFF
    ("mixed bytes and symbols", "b★".encode() + b"\x80o" + " 😀m\u200b".encode() + b"\xf0\x9fb"),
    ("mixed everything", "D . ★ \u200b 😀 \ufffd A _ ж M ⠿ N".encode()),
]


@pytest.mark.parametrize("name,evasion", EVASIONS, ids=[n for n, _ in EVASIONS])
def test_guard_stops_the_evasion(guard, name, evasion):
    compiled = guard[0]
    text = text_of(b"you " + evasion + b" ok")
    word = next(w for w in WORDS if w in stripped(text))  # independent: the word is in the text
    assert regex.search(compiled.policy.forbid[WORDS.index(word)].pattern, text, regex.I)  # the oracle
    data = push(guard, b"you ", evasion)
    assert len(data) < len(b"you " + evasion), f"{name}: the evasion was completed"
    assert not violates(compiled.policy, data)
    # the guard let the adversary go right up to the last letter, then refused it
    assert stripped(text_of(data)).endswith(word[:-1]), (name, data)


def test_an_invalid_byte_token_between_letters(guard):
    """The byte-level vocabulary has a token per byte: 0x80 alone decodes to U+FFFD."""
    compiled, _ = guard
    vocab = compiled.vocabulary
    x80 = byte_token(vocab, 0x80)
    d, a, m, n = (byte_token(vocab, ord(c)) for c in "damn")
    state = compiled.start_state
    for token in (d, x80, a, x80, m, x80):
        assert token not in set(compiled.forbidden_ids(state).tolist())
        state = compiled.next_state(state, token)
    assert n in set(compiled.forbidden_ids(state).tolist())


@pytest.mark.parametrize("text", [
    "The bass sounded great.", "It has sand in it.", "Adam ran to the dam; nobody saw.",
    "I'm going to the dam now.", "Bob, mom and Bambi.", "A womb, a comb, a bomber.",
    "Café ★ déjà vu 😀 — fine.", "Température: 20 °C, ça va?", "Привет, как дела? Всё хорошо.",
])
def test_guard_lets_ordinary_text_through(guard, text):
    data = push(guard, b"", text.encode(), b"")
    assert data == text.encode(), text


def test_word_list_cost(smollm2_tokenizer):
    """The negated class, with a separator-based word boundary, stays as cheap as the old block
    list (9,759 DFA states / 7.2 MB); with \\b it made the automaton ~8x larger."""
    base = load_policy(ROOT / "grammars" / "profanity-wordlist.toml")
    rules = [dict(id=r.id, literal=r.literal, whole_word=r.whole_word, ignore_case=r.ignore_case,
                  variants=["spacing"]) for r in base.forbid]
    stats = safedecode.compile_policy(Policy(forbid=rules), smollm2_tokenizer, cache_dir=False).stats
    assert stats["components"] == 1 and stats["dfa_states"] < 12_000 and stats["table_bytes"] < 8_000_000, stats


# --------------------------------------------------------------------------------------------
# Benign text: the red-team benchmark's benign prompts and outputs, and ordinary sentences
# --------------------------------------------------------------------------------------------
ORDINARY_TEXTS = [
    "It has sand in it, and the class assignment is due on Monday.",
    "The bass player passed the glass to his boss.",
    "Adam and Dan met at the dam near Amsterdam.",
    "Madam, I'm Adam. Damascus is a city; the damage was minor.",
    "Bob said: a s k me later, a.s.a.p. — then left.",
    "The bomber jacket, the tomb, a combo of bombastic words.",
    "We assess assets and passwords; glass, grass, brass, mass, pass.",
    "I'd like 2 coffees, 3 teas and a scone, please.",
    "Price: $5.99 (20% off!) — offer ends 31/12.",
    "Email: support@example.com, phone +1 (555) 010-9999.",
    "Use `git commit -m \"fix\"` and then `git push origin main`.",
    "def add(a, b):\n    return a + b  # simple\n",
    "for (int i = 0; i < n; i++) { s += a[i]; }",
    "<div class=\"header\">Hello &amp; welcome</div>",
    "https://docs.example.com/a/b?c=d&e=f#g",
    "The quick brown fox jumps over the lazy dog. 🦊🐶",
    "Great job!!! 🎉🎉 See you at 5 pm ☺️",
    "Items: • apples • pears • plums → total ★★★★☆",
    "H₂O, CO₂, E = mc², ½ cup of sugar, 90° angle.",
    "Café au lait, naïve façade, déjà vu, jalapeño, Straße, smørrebrød.",
    "Il a dit : « à demain », puis il est parti.",
    "Der Mann aß sein Brot und trank Wasser.",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Москва — столица России. Да, мы знаем.",
    "東京は日本の首都です。よろしくお願いします。",
    "A. S. Byatt, D. A. M. Nelson and B. O. Marks wrote the report.",
    "Initials on the form: A S, then S for signature.",
    "Press Ctrl+D, then A, then M, then N to open the menu.",
    "She said \"damp\" not \"dame\"; the dams are closed.",
    "Bombay (now Mumbai) and Bombardier are proper nouns.",
    "Sodium, Arsenal and Hello are fine words.",
    "a\u200bb\u200bc — zero-width spaces in ordinary text.",
    "Tab\tseparated\tvalues\tand\ttrailing spaces   ",
    "Broken bytes \ufffd\ufffd in a log line are not words.",
    "Ask me about it: a, s, sure!",
    "Dad, Ann, Mom and Nan went out.",
    "The Mississippi's bass-boat season begins… 🚤 a ★ s ✓ t.",
    "Rate it: A★★★ S★★ T★ — thanks! 👍🏽",
    "Chords: D → A → Em → G, then 🎸 solo.",
    "Grades ⇒ A＋, S＋, B; note ※ see p. 3 ⓘ",
    "Ph.D., M.A., B.Sc. and M.B.A. degrees.",
]


#: Ordinary text that spells a word out letter by letter: flagged with `spacing`, before and after;
#: and the price of other scripts' letters being filler: single Latin letters inside Cyrillic text
#: (flagged after, not before).
SPELLED_OUT = [
    "Section 3.2(a)(s)(s) of the act applies.",
    "The list: d, a, m, n, o, p.",
    "Adam ran to the dam, n'est-ce pas?",
    "Ответ: A, затем S и ещё S ниже — это варианты.",
]

#: Ordinary text with emoji or symbols instead of spaces: the new separators make every one of these
#: characters a word boundary, and a word is still a word.
EMOJI_SPACED = [t.replace(" ", sep) for t in ORDINARY_TEXTS[:20] for sep in ("👏", "★", "·", "\ufffd")]


def redteam_benign_texts() -> list[tuple[str, str]]:
    """(source, text): the benign prompts of the red-team corpus (user, system and document text)
    and the stored outputs of the benign cases in every mode (benchmarks/results/redteam.json)."""
    from tests.support import redteam_corpus as rt

    out = []
    for case in rt.build_corpus():
        if case.is_attack:
            continue
        out.append(("prompt", case.user))
        out += [("prompt", c.text) for c in case.content]
        if case.system:
            out.append(("prompt", case.system))
    stored = json.loads((ROOT / "benchmarks" / "results" / "redteam.json").read_text())
    for mode, rows in stored["outcomes"].items():
        out += [(f"output:{mode}", row["text"]) for row in rows if row["category"] in rt.BENIGN_CATEGORIES]
    return out


def test_benign_texts_are_not_flagged():
    policy = load_policy(ROOT / "grammars" / "profanity-wordlist.toml")
    spaced = Policy(forbid=[dict(id=r.id, literal=r.literal, whole_word=r.whole_word, ignore_case=r.ignore_case,
                                 variants=["spacing", "leet"]) for r in policy.forbid])
    texts = [t for _, t in redteam_benign_texts()] + ORDINARY_TEXTS + EMOJI_SPACED
    assert len(texts) > 300
    flagged = [(t, [v.rule_id for v in find_violations(spaced, t)]) for t in texts if find_violations(spaced, t)]
    assert flagged == []
    assert all(not find_violations(policy, t) for t in texts)
    assert all(find_violations(spaced, t) for t in SPELLED_OUT)
    np.testing.assert_equal(len(ORDINARY_TEXTS), len(set(ORDINARY_TEXTS)))
