"""Verification certificates: every shipped policy verifies against SmolLM2; a wrong mask is caught."""
import json
from pathlib import Path

import pytest

from safedecode import Policy, compile_policy, load_policy
from safedecode.cli import main
from safedecode.engine.verify import VerificationError, verify

GRAMMARS = sorted((Path(__file__).resolve().parent.parent / "grammars").glob("*.toml"))


@pytest.mark.parametrize("path", GRAMMARS, ids=[p.stem for p in GRAMMARS])
def test_every_shipped_policy_verifies_on_smollm2(path, smollm2_tokenizer):
    certificate = verify(load_policy(path), smollm2_tokenizer)
    assert certificate["verified"] and certificate["states_checked"] > 0
    assert certificate["tokens_checked"] == certificate["states_checked"] * len(smollm2_tokenizer)


def test_a_wrong_mask_is_reported_with_a_counterexample(smollm2_tokenizer):
    compiled_for_other_rule = compile_policy(Policy(forbid=[{"literal": "hunter2"}]), smollm2_tokenizer)
    with pytest.raises(VerificationError) as failure:
        verify(Policy(forbid=[{"literal": "hunter3"}]), smollm2_tokenizer, compiled=compiled_for_other_rule)
    example = failure.value.counterexample
    assert example["kind"].startswith("masked but harmless")
    assert example["resulting_text"].endswith("hunter2")


def test_cli_verify_prints_a_certificate(tmp_path, capsys):
    policy = tmp_path / "p.toml"
    policy.write_text('[[forbid]]\nliteral = "hunter2"\n[[forbid]]\nregex = "x[0-9]{3}"\n')
    assert main(["verify", "--policy", str(policy), "--tokenizer", "qwen2.5"]) == 0
    certificate = json.loads(capsys.readouterr().out)
    assert certificate["verified"] is True and certificate["vocabulary_size"] > 150_000
    assert len(certificate["policy_hash"]) == 64 and certificate["library_version"]
