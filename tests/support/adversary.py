"""The adversary: logits pushed toward forbidden text through every tokenization, judged by an oracle.

One driver, :func:`adversarial_steps`, for the tests and the benchmarks. At every step the adversary
adds +100 (+ rank, in a random order) to every token that extends the longest partial match of its
target (a string the policy forbids), over *all* tokenizations of the rest of the target; the
processor runs; the argmax is appended. Each step is judged against an oracle on the bytes
(``violation(data) -> bool``, e.g. :class:`.policy_oracle.PolicyOracle`):

* *over-blocked*: a masked text token whose appending would create no match;
* *leaked*: an allowed token (every candidate of the adversary, plus a random sample of text tokens)
  whose appending would create a match;
* *completed*: the argmax really produced forbidden text.

The tests assert none of the three ever happens (:func:`drive`); the benchmarks count them for
every peer (``benchmarks/overhead.py``).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

TARGET_STEPS = 12  # the adversary changes its target every 12 steps (and with every new generation)
MAX_BYTES = 70  # a generation longer than this ends (keeps the oracle fast); a new one starts


class Adversary:
    """Chooses tokens that extend the longest partial match of a target, over all tokenizations."""

    def __init__(self, vocabulary):
        items = sorted((b, i) for i, b in enumerate(vocabulary.token_bytes) if b)
        self.sorted_bytes = [b for b, _ in items]
        self.sorted_ids = [i for _, i in items]
        self.by_bytes: dict[bytes, list[int]] = {}
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


@dataclass
class Step:
    """One step of an adversarial run, judged."""

    step: int
    starts_generation: bool  # the first step of a generation (a fresh processor, an empty text)
    data: bytes  # the text's bytes before this step's token
    wanted: list[int]  # the adversary's candidates (all boosted)
    masked: set[int]  # ids the processor set to -inf (ids at -inf before it ran are not counted)
    masked_checked: int  # masked text tokens judged (all, or a random sample)
    overblocked: list[int]  # of those, the ones whose appending creates no match
    allowed_checked: int  # allowed tokens judged: the candidates and a random sample of text tokens
    leaked: list[int]  # of those, the ones whose appending creates a match
    choice: int  # the argmax of the processed logits, appended
    after: bytes  # the text's bytes after ``choice``
    completed: bool  # the text after ``choice`` violates: the generation ends
    generation: list[int]  # the ids of the current generation, ``choice`` included
    processor: object  # the processor of the current generation


def adversarial_steps(new_processor: Callable[[], object], vocabulary, targets: Sequence[Sequence[bytes]],
                      violation: Callable[[bytes], bool], *, steps: int, seed: int, prompt: Sequence[int],
                      masked_sample: int, allowed_sample: int, exact: Optional[Callable[[bytes], bool]] = None,
                      mask_non_text: bool = False) -> Iterator[Step]:
    """Drive processors (a fresh one from ``new_processor()`` per generation) for ``steps`` steps at
    B=1 and yield each judged :class:`Step`.

    ``targets``: pools of forbidden strings; a target is drawn from a random pool (from the only one
    if there is one). ``exact(data)`` (default always True) is False where only safety, not
    exactness, is judged: a masked token whose text ``data`` is not exact is not an over-block.
    ``mask_non_text``: non-text ids (special tokens, EOS) are at -inf in the logits the processor
    gets. A generation ends when it completed forbidden text or passed :data:`MAX_BYTES` bytes.
    """
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    exact = exact or (lambda data: True)
    token_bytes = vocabulary.token_bytes
    adversary = Adversary(vocabulary)
    text_ids = [i for i, b in enumerate(token_bytes) if b]
    non_text = torch.tensor([i for i, b in enumerate(token_bytes) if not b], dtype=torch.long)
    pools = [pool for pool in targets if pool]
    processor, data, generated, target = None, b"", [], b""
    for step in range(steps):
        starts = processor is None
        if starts or step % TARGET_STEPS == 0:
            target = rng.choice(pools[0] if len(pools) == 1 else rng.choice(pools))
        if starts:
            processor, data, generated = new_processor(), b"", []
        wanted = adversary.candidates(data, target)
        scores = torch.from_numpy(np_rng.normal(size=(1, vocabulary.size)).astype(np.float32))
        if mask_non_text:
            scores[0, non_text] = float("-inf")
        for rank, token in enumerate(rng.sample(wanted, len(wanted))):
            scores[0, token] += 100.0 + rank  # a random tokenization of the forbidden continuation wins
        before = torch.isneginf(scores[0])
        out = processor(torch.tensor([list(prompt) + generated], dtype=torch.long), scores)
        masked = set(np.flatnonzero((torch.isneginf(out[0]) & ~before).numpy()).tolist())
        masked_text = sorted(t for t in masked if token_bytes[t])
        checked = masked_text if len(masked_text) <= masked_sample else rng.sample(masked_text, masked_sample)
        over = [t for t in checked if not violation(data + token_bytes[t]) and exact(data + token_bytes[t])]
        allowed = (set(wanted) | set(rng.sample(text_ids, min(allowed_sample, len(text_ids))))) - masked
        leaks = [t for t in sorted(allowed) if violation(data + token_bytes[t])]
        choice = int(torch.argmax(out[0]))
        after = data + (token_bytes[choice] or b"")
        completed = violation(after)
        generated.append(choice)
        yield Step(step, starts, data, wanted, masked, len(checked), over, len(allowed), leaks, choice, after,
                   completed, generated, processor)
        data = after
        if completed or len(data) > MAX_BYTES:
            processor = None


def drive(tokenizer=None, *, targets: Sequence[bytes], policy=None, processor=None, steps: int = 60, seed: int = 0,
          check_sample: int = 1500, violation=None, eos_masked=None, exact=None):
    """Run the adversary against a guard for ``steps`` steps, asserting at every step that nothing
    was over-blocked or leaked, that the chosen token left the text safe, that every special token
    the policy forbids is masked, and that EOS is masked exactly where ``eos_masked(data)`` says
    (default: never). Returns (the adversary's tokens blocked, the last generation's ids, processor).

    The guard is ``processor`` (reset at every new generation), or else
    ``SafeLogitsProcessor(policy, tokenizer)``; the oracle is ``violation(data)``, by default
    :class:`~.policy_oracle.PolicyOracle` of the guard's policy. ``exact(data)`` as in
    :func:`adversarial_steps`.
    """
    from safedecode import SafeLogitsProcessor

    from .policy_oracle import PolicyOracle
    from .text_oracle import text_of

    processor = processor or SafeLogitsProcessor(policy, tokenizer)
    compiled = processor.compiled
    vocab = compiled.vocabulary
    violation = violation or PolicyOracle(compiled.policy)
    eos_masked = eos_masked or (lambda data: False)
    special = vocab.special_ids - vocab.eos_ids if compiled.policy.special_tokens == "forbid" else set()
    prompt = [next(i for i, b in enumerate(vocab.token_bytes) if b)]

    def fresh():
        processor.reset()
        return processor

    blocked_wanted, generated = 0, []
    for step in adversarial_steps(fresh, vocab, [targets], violation, steps=steps, seed=seed, prompt=prompt,
                                  masked_sample=check_sample, allowed_sample=check_sample, exact=exact):
        data = step.data
        assert bool(step.masked & vocab.eos_ids) == eos_masked(data), f"EOS masking is wrong after {data!r}"
        assert special <= step.masked, "a forbidden special token was left allowed"
        stray = {t for t in step.masked if not vocab.token_bytes[t]} - special - vocab.eos_ids
        assert not stray, f"over-blocking: non-text ids {sorted(stray)[:10]} masked after {data!r}"
        assert not step.overblocked, (f"over-blocking: {vocab.token_bytes[step.overblocked[0]]!r} after {data!r} "
                                      "is safe but masked")
        assert not step.leaked, (f"leak: {vocab.token_bytes[step.leaked[0]]!r} after {data!r} creates a match "
                                 "but is allowed")
        assert not step.completed, f"unsafe text after step {step.step}: {text_of(step.after)!r}"
        blocked_wanted += len(set(step.wanted) & step.masked)
        generated = step.generation
    return blocked_wanted, generated, processor
