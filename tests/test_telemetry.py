"""Blocked-mass telemetry: the removed probability equals softmax mass of the masked ids (computed
here independently), blocked steps name the rule the oracle finds, the early stop fails closed,
and the audit log never holds the blocked text."""
import json

import pytest
import torch

import safedecode
from safedecode import Policy, SafeLogitsProcessor
from safedecode.integrations.generation import FINISH_REASONS

POLICY = Policy(forbid=[{"literal": "password", "id": "pw"}, {"regex": r"\d{4}-\d{4}", "id": "card"}])


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def step(processor, tokenizer, prefix_ids, favour):
    """One call with random logits pushed toward ``favour``; returns (original, masked) scores."""
    torch.manual_seed(len(prefix_ids))
    scores = torch.randn(1, len(tokenizer))
    for rank, token in enumerate(favour):
        scores[0, token] += 20.0 - rank
    original = scores.clone()
    masked = processor(torch.tensor([[1] + prefix_ids]), scores)
    return original, masked


def test_removed_mass_is_the_softmax_mass_of_the_masked_ids(smollm2_tokenizer):
    processor = SafeLogitsProcessor(POLICY, smollm2_tokenizer, telemetry=True)
    prefix = []
    for token in ids_of(smollm2_tokenizer, "My password is 1234-5678"):
        favour = [token]
        original, masked = step(processor, smollm2_tokenizer, prefix, favour)
        expected = float(torch.softmax(original[0].double(), -1)[torch.isneginf(masked[0])].sum())
        recorded = processor.telemetry.rows[0].steps[-1].removed_mass
        assert recorded == pytest.approx(expected, abs=1e-5)
        prefix.append(favour[0] if not torch.isneginf(masked[0, favour[0]]) else int(torch.argmax(masked[0])))
    report = processor.telemetry.report()
    assert report["blocked_steps"] >= 2 and report["max_removed_mass"] > 0.9
    assert set(report["rules"]) == {"pw", "card"}


def test_a_blocked_step_names_the_rule(smollm2_tokenizer):
    processor = SafeLogitsProcessor(POLICY, smollm2_tokenizer, telemetry=True)
    prefix = ids_of(smollm2_tokenizer, "the pass")
    step(processor, smollm2_tokenizer, prefix[:-1], prefix[-1:])  # starts the generation
    step(processor, smollm2_tokenizer, prefix, ids_of(smollm2_tokenizer, "word"))
    last = processor.telemetry.rows[0].steps[-1]
    assert last.removed_mass > 0.5 and last.rules == ("pw",)


def test_sustained_pressure_ends_the_row(smollm2_tokenizer):
    processor = SafeLogitsProcessor(POLICY, smollm2_tokenizer, stop_threshold=0.5, stop_after=2)
    eos = smollm2_tokenizer.eos_token_id
    prefix = ids_of(smollm2_tokenizer, "pass")
    outs = []
    for k in range(3):
        _, masked = step(processor, smollm2_tokenizer, prefix + [prefix[-1]] * k, ids_of(smollm2_tokenizer, "word"))
        outs.append(masked[0])
    allowed = torch.nonzero(~torch.isneginf(outs[-1])).flatten().tolist()
    assert allowed == [eos]  # fail closed: only EOS is left
    assert processor.telemetry.report()["stopped_early"]
    assert processor.guides[0].is_stopped  # the row's guide holds the stop: later steps stay closed
    _, later = step(processor, smollm2_tokenizer, prefix + [prefix[-1]] * 3, ids_of(smollm2_tokenizer, "hello"))
    assert torch.nonzero(~torch.isneginf(later[0])).flatten().tolist() == [eos]
    assert int((~torch.isneginf(outs[0])).sum()) > 1000  # the first steps were not cut


def test_audit_log_redacts_the_candidate(smollm2_tokenizer, tmp_path):
    log = tmp_path / "audit.jsonl"
    processor = SafeLogitsProcessor(POLICY, smollm2_tokenizer, audit_log=log)
    prefix = ids_of(smollm2_tokenizer, "my pass")
    step(processor, smollm2_tokenizer, prefix[:-1], prefix[-1:])
    step(processor, smollm2_tokenizer, prefix, ids_of(smollm2_tokenizer, "word"))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and lines[-1]["rules"] == ["pw"] and lines[-1]["removed_mass"] > 0.5
    assert "word" not in log.read_text()


def test_bad_telemetry_options_are_refused(smollm2_tokenizer):
    with pytest.raises(ValueError, match="stop_threshold"):
        SafeLogitsProcessor(POLICY, smollm2_tokenizer, stop_threshold=1.5)
    with pytest.raises(ValueError, match="stop_after"):
        SafeLogitsProcessor(POLICY, smollm2_tokenizer, stop_threshold=0.5, stop_after=0)


def test_generate_reports_telemetry(smollm2_model):
    model, tokenizer = smollm2_model
    policy = Policy(forbid=[{"literal": " the ", "id": "the"}])  # the model wants it almost at once
    result = safedecode.generate(model, tokenizer, [{"role": "user", "content": "Describe the sun in one sentence."}],
                                 policy, max_new_tokens=16, telemetry=True)
    assert result.report is not None and result.report["steps"] == len(result.token_ids) + (
        result.finish_reason == "stop")
    assert " the " not in result.text
    assert result.report["blocked_steps"] >= 1 and result.report["rules"] == ["the"]


def test_an_early_stop_finishes_as_content_filter(smollm2_model):
    """The one finish-reason vocabulary: a row the guard ended is "content_filter", as in the server."""
    model, tokenizer = smollm2_model
    policy = Policy(forbid=[{"literal": " the ", "id": "the"}])
    result = safedecode.generate(model, tokenizer, [{"role": "user", "content": "Describe the sun in one sentence."}],
                                 policy, max_new_tokens=16, stop_threshold=1e-6, stop_after=1)
    assert result.report["stopped_early"] and result.finish_reason == "content_filter"
    assert result.finish_reason in FINISH_REASONS
    assert len(result.token_ids) < 16  # it ended: only EOS was left
