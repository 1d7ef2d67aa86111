"""The processor inside real ``model.generate`` runs on the embedded SmolLM2.

A checking processor placed right after the guard recomputes, for every row at every step, from
that row's generated tokens alone:

* the ground truth, by the ``regex`` oracle on the text of the tokens' bytes (DESIGN §1, the text
  oracle of tests/support): the text so far contains no match; every masked token among the risky
  ones (those that continue a forbidden phrase, and digits) and a random sample of the other masked
  tokens would create a match; every allowed risky token and a random sample of the other allowed
  ones would not — so a wrong kernel, table or state fails here;
* the row tracking: the guard masked exactly the ids the compiled policy forbids after that row's
  tokens — so batching, left padding, beam reordering and processor reuse cannot mix rows up;

and every final text is checked by the ``regex`` oracle.
"""
import random

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, NoBadWordsLogitsProcessor

import safedecode
from safedecode import Policy, SafeLogitsProcessor, find_violations
from tests.support.adversary import Adversary
from tests.support.policy_oracle import PolicyOracle

pytestmark = pytest.mark.model

POLICY = Policy(forbid=[
    {"literal": "Paris", "id": "paris"},
    {"literal": "hunter2", "id": "hunter2"},
    {"literal": " the ", "id": "the"},
    {"regex": r"\d{2}", "id": "two-digits"},
])
PHRASES = [b"Paris", b"hunter2", b" the "]  # the literal rules, for the risky tokens
SAMPLE = 150  # masked and allowed tokens judged at random per row and step, besides the risky ones


class MaskChecker(LogitsProcessor):
    """Checks the guard's mask of every row against the oracle and against that row's own tokens."""

    def __init__(self, guard: SafeLogitsProcessor):
        self.guard = guard
        self.oracle = PolicyOracle(POLICY)
        self.vocab = guard.compiled.vocabulary
        self.adversary = Adversary(self.vocab)
        self.digits = [i for i, b in enumerate(self.vocab.token_bytes) if b and b[:1].isdigit()]
        self.text_ids = [i for i, b in enumerate(self.vocab.token_bytes) if b]
        self.rng = random.Random(0)
        self.steps = 0
        self.masked_total = 0
        self.judged = {"masked": 0, "allowed": 0}

    def risky(self, data: bytes) -> set[int]:
        """Tokens that continue a partial match of a phrase (over every tokenization), and digits."""
        return {t for phrase in PHRASES for t in self.adversary.candidates(data, phrase)} | set(self.digits)

    def __call__(self, input_ids, scores):
        compiled = self.guard.compiled
        start = self.guard.prompt_length
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row, start:].tolist()
            actual = np.flatnonzero(torch.isneginf(scores[row]).numpy())
            data = b"".join(self.vocab.token_bytes[t] or b"" for t in tokens)
            assert not self.oracle(data), f"row {row} step {self.steps}: the text so far violates: {data!r}"
            masked = set(actual.tolist())
            risky = self.risky(data)
            masked_text = sorted(t for t in masked if self.vocab.token_bytes[t])
            judged_masked = (risky & masked) | set(self.rng.sample(masked_text, min(SAMPLE, len(masked_text))))
            for t in judged_masked:
                assert self.oracle(data + self.vocab.token_bytes[t]), (
                    f"row {row} step {self.steps}: {self.vocab.token_bytes[t]!r} after {data!r} is safe but masked")
            judged_allowed = (risky | set(self.rng.sample(self.text_ids, SAMPLE))) - masked
            for t in judged_allowed:
                assert not self.oracle(data + self.vocab.token_bytes[t]), (
                    f"row {row} step {self.steps}: {self.vocab.token_bytes[t]!r} after {data!r} creates a match "
                    "but is allowed")
            self.judged["masked"] += len(judged_masked)
            self.judged["allowed"] += len(judged_allowed)
            expected = compiled.forbidden_ids(compiled.walk(tokens), scores.shape[-1])
            assert np.array_equal(actual, expected), f"row {row} step {self.steps}: mask differs from its suffix's"
            self.masked_total += len(actual)
        self.steps += 1
        return scores


def run(model, tokenizer, prompts, guard, **kwargs):
    checker = MaskChecker(guard)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, logits_processor=LogitsProcessorList([guard, checker]),
                         pad_token_id=tokenizer.pad_token_id, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for text in texts:
        assert find_violations(POLICY, text) == [], text
    assert checker.steps > 0 and checker.masked_total > 0
    assert checker.judged["masked"] > 0 and checker.judged["allowed"] > 0  # the oracle judged both ways
    return texts


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_greedy_batch_with_left_padding(smollm2_model):
    model, tok = smollm2_model
    prompts = [chat(tok, "What is the capital of France?"), chat(tok, "Count from 10 to 20."),
               chat(tok, "Repeat after me: the password is hunter2")]
    texts = run(model, tok, prompts, SafeLogitsProcessor(POLICY, tok), max_new_tokens=24, do_sample=False)
    assert all(t.strip() for t in texts)


def test_sampling_and_beam_search(smollm2_model):
    model, tok = smollm2_model
    prompts = [chat(tok, "Tell me about Paris."), chat(tok, "List some numbers.")]
    torch.manual_seed(0)
    run(model, tok, prompts, SafeLogitsProcessor(POLICY, tok), max_new_tokens=16, do_sample=True, temperature=1.0)
    run(model, tok, prompts, SafeLogitsProcessor(POLICY, tok), max_new_tokens=12, num_beams=3, do_sample=False)


def test_processor_reused_across_generate_calls(smollm2_model):
    model, tok = smollm2_model
    guard = SafeLogitsProcessor(POLICY, tok)
    first = run(model, tok, [chat(tok, "Count from 10 to 20.")], guard, max_new_tokens=10)
    second = run(model, tok, [chat(tok, "What is the capital of France?"), chat(tok, "Say hi.")], guard,
                 max_new_tokens=10)
    assert first and len(second) == 2


def test_phrase_the_unguarded_model_says_is_not_said(smollm2_model):
    model, tok = smollm2_model
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    never = Policy(forbid=[{"literal": "zzqqxxj"}])  # a policy that forbids nothing the model says
    unguarded = safedecode.generate(model, tok, messages, never, max_new_tokens=30)
    assert "Paris" in unguarded.text  # precondition: the model does say it
    guarded = safedecode.generate(model, tok, messages, Policy(forbid=[{"literal": "Paris"}]), max_new_tokens=30)
    assert "Paris" not in guarded.text and find_violations(Policy(forbid=[{"literal": "Paris"}]), guarded.text) == []
    assert guarded.text.strip(), "the guarded answer must still say something"
    assert str(guarded) == guarded.text


def test_generate_batch_returns_a_list(smollm2_model):
    model, tok = smollm2_model
    results = safedecode.generate(model, tok, ["Hello", "The capital of France is"], POLICY, max_new_tokens=8)
    assert isinstance(results, list) and len(results) == 2
    assert all(find_violations(POLICY, r.text) == [] for r in results)


def test_bad_words_ids_leaks_through_another_tokenization_safedecode_does_not(smollm2_tokenizer):
    """transformers bans token *sequences*; the same phrase spelled with other tokens gets through."""
    tok = smollm2_tokenizer
    phrase = "hunter2"
    bad_words = [tok.encode(phrase, add_special_tokens=False), tok.encode(" " + phrase, add_special_tokens=False)]
    spelled = [tok.convert_tokens_to_ids(c) for c in phrase]  # one token per character
    assert spelled not in bad_words and all(isinstance(i, int) for i in spelled)
    vocab = len(tok)

    def force(processor):
        ids = [tok.eos_token_id]
        for target in spelled:
            scores = torch.zeros((1, vocab))
            scores[0, target] = 10.0  # the model "wants" the next character of the phrase
            scores = processor(torch.tensor([ids]), scores)
            ids.append(int(torch.argmax(scores[0])))
        return tok.decode(ids[1:])

    leaked = force(NoBadWordsLogitsProcessor(bad_words, eos_token_id=tok.eos_token_id))
    assert phrase in leaked
    guarded = force(SafeLogitsProcessor(Policy(forbid=[{"literal": phrase}]), tok))
    assert phrase not in guarded


def test_eos_is_restored_when_nothing_else_is_left(smollm2_tokenizer):
    tok = smollm2_tokenizer
    guard = SafeLogitsProcessor(Policy(forbid=[{"regex": r"[\s\S]"}]), tok)  # every character is forbidden
    forbidden = set(guard.compiled.forbidden_ids(guard.compiled.start_state, len(tok)).tolist())
    assert len(forbidden) > 40_000
    scores = torch.zeros((1, len(tok)))
    # Another processor (e.g. min_new_tokens) masked EOS and everything the policy would still allow
    # (special tokens, and lone UTF-8 lead bytes, which are not yet a character).
    scores[0, [i for i in range(len(tok)) if i not in forbidden]] = float("-inf")
    out = guard(torch.tensor([[1, 2, 3]]), scores)
    alive = torch.nonzero(~torch.isneginf(out[0])).flatten().tolist()
    assert alive == [guard.compiled.eos_ids[0]]
    assert out[0, alive[0]] == 0.0
