"""The one text rule (DESIGN §1): ``text_of`` / ``Vocabulary.text`` / ``Vocabulary.decoder`` and
everything that decodes output ids agree with the independent oracle — including a trailing
incomplete UTF-8 sequence, where two copies of the rule used to disagree (``'a\\ufffd'`` vs ``'a'``)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from safedecode.integrations.generation import _result
from safedecode.server.worker import TextTracker
from safedecode.tokens.vocabulary import Vocabulary, text_of

from tests.support.text_oracle import text_of as oracle_text

# Pieces that split UTF-8 sequences every way: lead bytes, continuations, invalid bytes, ASCII.
PIECES = (b"a", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xff", b"\x80", b"ok ", b"\xed\xa0")
EOS = len(PIECES)
VOCAB = Vocabulary(token_bytes=PIECES + (None,), eos_ids=frozenset({EOS}), special_ids=frozenset({EOS}), family="custom")
ids_strategy = st.lists(st.integers(0, len(PIECES) - 1), max_size=12)


@settings(max_examples=400, deadline=None)
@given(ids_strategy)
def test_every_decoder_of_ids_agrees_with_the_oracle(ids):
    data = b"".join(PIECES[i] for i in ids)
    expected = oracle_text(data)
    assert text_of(data) == expected
    assert VOCAB.text(ids) == expected
    decoder = VOCAB.decoder()
    assert "".join(decoder.feed(i) for i in ids) == expected
    assert _result(ids + [EOS], VOCAB, stopped=False).text == expected  # generate()'s result
    tracker = TextTracker(VOCAB)
    for i in ids:
        tracker.feed(i)
    assert tracker.text == expected  # the server's streamed text


@given(ids_strategy)
def test_final_reads_an_incomplete_tail_as_replacement(ids):
    data = b"".join(PIECES[i] for i in ids)
    assert text_of(data, final=True) == data.decode("utf-8", "replace")


def test_the_reported_disagreement():
    """``Vocabulary.text`` used to give ``'a\\ufffd'`` where ``generate`` gave ``'a'``."""
    ids = [PIECES.index(b"a"), PIECES.index(b"\xc3")]
    assert VOCAB.text(ids) == "a" == _result(ids, VOCAB, stopped=False).text
