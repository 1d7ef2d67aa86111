"""The documented way to reuse a processor across ``model.generate`` calls — ``reset()`` between
them — is exact, even in the case no heuristic can decide: a new prompt that is a one-token
extension of the previous call's rows. Judged by the ``regex`` oracle on each token's own text."""
import numpy as np
import torch

from safedecode import Policy, SafeLogitsProcessor, find_violations

POLICY = Policy(forbid=[{"regex": r"\AParis", "id": "starts-with-paris"}, {"regex": r"\bberlin\b", "id": "berlin"}])


def oracle_mask(tokenizer, vocab: int) -> np.ndarray:
    """Ids whose text, as the whole output, violates the policy (the start of a new generation)."""
    return np.array([i for i in range(vocab)
                     if find_violations(POLICY, tokenizer.decode([i], skip_special_tokens=False,
                                                                 clean_up_tokenization_spaces=False))
                     and i not in tokenizer.all_special_ids], dtype=np.int64)


def masked(guard, ids, vocab) -> np.ndarray:
    scores = guard(torch.tensor([ids]), torch.zeros(1, vocab))
    return np.flatnonzero(torch.isneginf(scores[0]).numpy())


def test_reset_makes_a_one_token_extension_prompt_a_new_generation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    vocab = len(tok)
    guard = SafeLogitsProcessor(POLICY, tok)
    prompt = tok.encode("Name a city:", add_special_tokens=False)
    first = masked(guard, prompt, vocab)  # call 1: one step, then (say) max_new_tokens=1 ends it
    (token,) = tok.encode(" The", add_special_tokens=False)[:1]
    guard.reset()  # the documented contract between generate calls
    second = masked(guard, prompt + [token], vocab)  # call 2: its prompt extends call 1's row by one token
    expected = oracle_mask(tok, vocab)
    assert len(expected) > 0
    assert np.array_equal(first, expected)
    assert np.array_equal(second, expected)  # "The" is prompt, not output: "Paris" may not start the output


def test_bad_shapes_and_dtypes_get_a_clear_error(smollm2_tokenizer):
    guard = SafeLogitsProcessor(POLICY, smollm2_tokenizer)
    vocab = len(smollm2_tokenizer)
    for ids, scores, kind in [(torch.tensor([1, 2]), torch.zeros(vocab), ValueError),
                              (torch.tensor([[1, 2]]), torch.zeros(vocab), ValueError),
                              (torch.tensor([[1, 2]]), torch.zeros(2, vocab), ValueError),
                              (torch.tensor([[1.0, 2.0]]), torch.zeros(1, vocab), TypeError)]:
        try:
            guard(ids, scores)
        except kind as exc:
            assert "SafeLogitsProcessor" in str(exc) and ("shape" in str(exc) or "integers" in str(exc))
        else:
            raise AssertionError(f"{tuple(ids.shape)}, {tuple(scores.shape)}: accepted")
