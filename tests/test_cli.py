"""The command line: exit codes, reports and error messages."""
import json

import pytest

from safedecode.cli import main

POLICY = '''
[[forbid]]
id = "pw"
literal = "hunter2"

[[forbid]]
regex = 'sk-[A-Za-z0-9]{20,}'
'''


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    return path


def test_check_reports_violations_with_position_and_exits_1(policy_file, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("line one\nthe password is hunter2, key sk-" + "a" * 22 + "\n")
    assert main(["check", "--policy", str(policy_file), str(text)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{text}:2:17: pw: 'hunter2'"
    assert out[1].startswith(f"{text}:2:30: forbid[1]: 'sk-")


def test_check_clean_text_exits_0(policy_file, tmp_path, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("nothing to see")
    assert main(["check", "--policy", str(policy_file), str(text)]) == 0


@pytest.mark.parametrize("args, message", [
    (["check", "--policy", "missing.toml", "-"], "no such policy file"),
    (["check", "--policy", "{policy}", "no-such-text.txt"], "no such file"),
    (["compile", "--policy", "{policy}", "--tokenizer", "nope"], "--tokenizer 'nope'"),
])
def test_bad_input_exits_2_with_one_clear_line(policy_file, args, message, capsys):
    args = [a.replace("{policy}", str(policy_file)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("safedecode: error:")


def test_bad_policy_file_exit_2_names_rule_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[forbid]]\nid = "x"\nregex = "(a)\\\\1"\n')
    assert main(["check", "--policy", str(bad), "-"]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "'x'" in err and "backreference" in err and "position 3" in err


def test_compile_reports_sizes_as_json(policy_file, capsys):
    assert main(["compile", "--policy", str(policy_file), "--tokenizer", "qwen2.5", "--json", "--no-cache"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rules"] == 2 and stats["vocab_size"] > 150_000
    assert stats["token_states"] > 0 and stats["table_bytes"] > 0 and len(stats["policy_hash"]) == 64
