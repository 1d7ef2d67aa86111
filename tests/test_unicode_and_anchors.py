"""Token-level exactness on the hard cases: split characters, invalid bytes, Unicode case folding,
anchors and word boundaries at the end of the text.

Each case walks a token sequence through the compiled policy and asserts, at every step, that the
next token is masked iff the ``regex`` oracle finds a match in the text it would produce.
"""
import pytest

from safedecode import Policy, compile_policy
from safedecode.tokens.vocabulary import vocabulary_of

from tests.support.text_oracle import contains, text_of


def violates(policy, data):
    return any(contains(r.pattern, r.flags, data) for r in policy.forbid)


def byte_tokens(vocab):
    """Token id of each single byte that has one (SmolLM2 lacks 21 of them; SentencePiece has all)."""
    found = {}
    for token_id, data in enumerate(vocab.token_bytes):
        if data is not None and len(data) == 1:
            found.setdefault(data[0], token_id)
    return found


def tokenizations(tokenizer, vocab, text: bytes):
    """Several token sequences for the same bytes: the tokenizer's own, one byte per token, mixed."""
    singles = byte_tokens(vocab)
    seqs = [[singles[b] for b in text]] if all(b in singles for b in text) else []
    try:
        own = tokenizer.encode(text.decode("utf-8"), add_special_tokens=False)
        seqs.append(own)
        half = len(text) // 2
        seqs.append(tokenizer.encode(text[:half].decode("utf-8", "ignore"), add_special_tokens=False)
                    + [singles[b] for b in text[len(text[:half].decode("utf-8", "ignore").encode()):]])
    except UnicodeDecodeError:
        pass
    return [s for s in seqs if b"".join(vocab.token_bytes[i] for i in s) == text]


def assert_exact_along(compiled, policy, vocab, ids):
    """Masked ⇔ violating, at every step of ``ids``; stops at the first masked token."""
    state = compiled.start_state
    data = b""
    for token in ids:
        forbidden = set(compiled.forbidden_ids(state).tolist())
        after = data + vocab.token_bytes[token]
        assert (token in forbidden) == violates(policy, after), (data, vocab.token_bytes[token], text_of(after))
        if token in forbidden:
            return True
        state = compiled.next_state(state, token)
        data = after
    return False


CASES = [
    # (policy rules, texts)
    ([{"literal": "café"}], ["un café noir", "cafe", "café", "caf\u00e9", "cafe\u0301"]),
    ([{"literal": "straße", "ignore_case": True}], ["STRAẞE", "Straße", "STRASSE", "strasse", "STRAßE!"]),
    ([{"literal": "istanbul", "ignore_case": True}], ["İSTANBUL", "ISTANBUL", "ıstanbul", "Istanbul"]),
    ([{"literal": "σοφός", "ignore_case": True}], ["ΣΟΦΌΣ", "σοφός", "σοφόσ", "ΣΟΦΟΣ", "σοφος"]),
    ([{"regex": r"\ufffd"}], ["ok"]),  # invalid bytes are exercised in the byte-level test below
    ([{"regex": r"foo\b"}], ["foo", "foo bar", "foobar", "a foo.", "food"]),
    ([{"regex": r"\bbar"}], ["bar", "rebar", "re bar", "_bar"]),
    ([{"regex": r"end$"}], ["the end", "the end\n", "the end\n\n", "ending", "end."]),
    ([{"regex": r"a $"}], ["a \n", "a \n\n", "a b"]),  # `$` also matches before a final "\n" (token " \n")
    ([{"regex": r"end\Z"}], ["the end", "the end\n", "endless"]),
    ([{"regex": r"^Sure"}], ["Sure thing", "I am Sure", " Sure"]),
    ([{"regex": r"\Bing\b"}], ["sing", "ing", "singing loud", "in g"]),
    ([{"regex": r"[😀-🙏]+"}], ["hi 😀", "hi 🙂 there", "no emoji"]),
    ([{"regex": r"\p{Lu}{3}"}], ["ÉTÉ", "été", "AbC", "ΑΒΓ"]),
]


@pytest.mark.parametrize("rules, texts", CASES)
def test_exact_on_every_tokenization(smollm2_tokenizer, rules, texts):
    policy = Policy(forbid=rules)
    compiled = compile_policy(policy, smollm2_tokenizer)
    vocab = vocabulary_of(smollm2_tokenizer)
    for text in texts:
        for ids in tokenizations(smollm2_tokenizer, vocab, text.encode()):
            assert_exact_along(compiled, policy, vocab, ids)


@pytest.mark.parametrize("family", ["smollm2_tokenizer", "sentencepiece_tokenizer"])
def test_multibyte_character_split_across_tokens(family, request):
    tokenizer = request.getfixturevalue(family)
    policy = Policy(forbid=[{"literal": "é"}])
    compiled = compile_policy(policy, tokenizer)
    vocab = vocabulary_of(tokenizer)
    singles = byte_tokens(vocab)
    lead, tail = singles[0xC3], singles[0xA9]
    assert lead not in compiled.forbidden_ids(compiled.start_state), "an incomplete character is not text yet"
    after_lead = compiled.next_state(compiled.start_state, lead)
    assert tail in compiled.forbidden_ids(after_lead), "completing 'é' across two tokens must be masked"
    assert assert_exact_along(compiled, policy, vocab, [singles[b] for b in "caf\u00e9".encode()])


@pytest.mark.parametrize("family", ["smollm2_tokenizer", "sentencepiece_tokenizer"])
def test_invalid_bytes_read_as_replacement_character(family, request):
    tokenizer = request.getfixturevalue(family)
    policy = Policy(forbid=[{"regex": r"x\ufffd"}])
    compiled = compile_policy(policy, tokenizer)
    vocab = vocabulary_of(tokenizer)
    singles = byte_tokens(vocab)
    for tail in [b"\xff", b"\x80", b"\xc0", b"\xe2\x82a", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xe2\x82\xac"]:
        if not all(b in singles for b in tail):
            continue  # SmolLM2 has no token for some bytes (e.g. 0xFF): they can never be generated
        ids = [singles[ord("x")]] + [singles[b] for b in tail]
        assert_exact_along(compiled, policy, vocab, ids)
    # a lone continuation byte right after "x" is U+FFFD at once; a lone lead byte is not (yet)
    state = compiled.next_state(compiled.start_state, singles[ord("x")])
    assert singles[0x80] in compiled.forbidden_ids(state)
    assert singles[0xE2] not in compiled.forbidden_ids(state)


def test_word_boundary_literal_at_end_of_text(smollm2_tokenizer):
    """``whole_word`` sees the end of the current text as a boundary (prefix-safety)."""
    policy = Policy(forbid=[{"literal": "ass", "whole_word": True}])
    compiled = compile_policy(policy, smollm2_tokenizer)
    vocab = vocabulary_of(smollm2_tokenizer)
    for text in ["ass", "classic", "an ass.", "assassin", "pass"]:
        for ids in tokenizations(smollm2_tokenizer, vocab, text.encode()):
            assert_exact_along(compiled, policy, vocab, ids)
    classic = smollm2_tokenizer.encode("classic", add_special_tokens=False)
    assert not assert_exact_along(compiled, policy, vocab, classic), "'classic' contains no whole word 'ass'"
