"""Assisted and prompt-lookup decoding call the processor with lengths that jump forward (accepted
candidate tokens) and back (rejected ones). The output still starts at the prompt boundary: a jump
must never make generated text part of the "prompt" (that let "secret code" straddle a jump: a
fail-open found by driving transformers' prompt lookup through the guard).

Judged by: greedy decoding's identity (assisted and prompt-lookup greedy outputs equal plain greedy
output), the ``regex`` oracle (``find_violations``), and each call's mask against a from-scratch
walk of the row's ids after the prompt.
"""
import random

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

import safedecode
from safedecode.engine.guide import Guide, GuideBatch

POLICY = safedecode.Policy(forbid=[{"literal": "hunter2"}, {"literal": "secret code"}, {"regex": r"AKIA[0-9A-Z]{6}"}])
PROMPT = [{"role": "user", "content": "Repeat exactly, three times: the secret code is hunter2. "
                                      "the secret code is hunter2. the secret code is hunter2."}]


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant_model"])
def test_assisted_greedy_equals_plain_greedy_and_never_leaks(smollm2_model, mode):
    model, tokenizer = smollm2_model
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outputs = {}
    for name, extra in [("plain", {}), (mode, {"prompt_lookup_num_tokens": 8} if mode == "prompt_lookup"
                                       else {"assistant_model": model})]:
        guard = safedecode.SafeLogitsProcessor(POLICY, tokenizer)
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([guard]), max_new_tokens=60,
                             do_sample=False, **extra)
        outputs[name] = out[0, inputs["input_ids"].shape[1]:].tolist()
        text = tokenizer.decode(outputs[name])
        assert not safedecode.find_violations(POLICY, text), (name, text)
    assert outputs[mode] == outputs["plain"]


def test_masks_follow_jumps_forward_and_back(smollm2_tokenizer):
    compiled = safedecode.compile_policy(POLICY, smollm2_tokenizer)
    vocab = compiled.vocab_size
    rng = random.Random(7)
    pieces = [smollm2_tokenizer.encode(t, add_special_tokens=False) for t in
              ["the secret", " code", " is", " hunter", "2", " AKIA", "12", "AB", "CD", " ok", " secret"]]
    for trial in range(20):
        batch = rng.choice([1, 2, 3])
        prompt_len = rng.randint(3, 40)
        rows = np.array([[rng.randrange(20, vocab) for _ in range(prompt_len)] for _ in range(batch)])
        output = [[t for _ in range(40) for t in rng.choice(pieces)] for _ in range(batch)]
        guides = GuideBatch(compiled)
        was_stopped = [False] * batch
        length = prompt_len
        for call in range(14):  # the first call is the prompt; then +1, jumps forward and back
            if call:
                length = max(prompt_len, min(prompt_len + 40, length + rng.choice([1, 1, 1, 3, 6, 0, -2, -4])))
            ids = np.array([list(rows[i]) + [t for t in output[i]][:length - prompt_len] for i in range(batch)])
            length = ids.shape[1]
            scores = torch.zeros((batch, vocab))
            guides.step(ids.astype(np.int64), scores)
            for i in range(batch):
                expected = Guide(compiled)
                expected.advance_all(ids[i, prompt_len:].tolist())
                if was_stopped[i]:  # forbidden text got through earlier: going back does not revive the row
                    expected.stop()
                masked = np.flatnonzero(torch.isneginf(scores[i]).numpy())
                assert masked.tolist() == expected.forbidden(vocab).tolist(), (trial, length)
                was_stopped[i] = expected.is_stopped


def test_a_stopped_row_stays_stopped_across_a_jump(smollm2_tokenizer):
    compiled = safedecode.compile_policy(POLICY, smollm2_tokenizer)
    guides = GuideBatch(compiled)
    ids = np.arange(100, 120, dtype=np.int64)[None, :]
    guides.step(ids, torch.zeros((1, compiled.vocab_size)))
    guides.stop(0)
    jumped = np.concatenate([ids, np.array([[200, 201, 202]])], axis=1)
    scores = torch.zeros((1, compiled.vocab_size))
    guides.step(jumped, scores)
    assert guides.states[0][0] < 0
    assert torch.isfinite(scores[0]).sum() == 1 and torch.isfinite(scores[0, list(compiled.eos_ids)]).any()
