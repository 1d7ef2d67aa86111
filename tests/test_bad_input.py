"""Bad input gets one clear error naming the problem — never a traceback, never a silent pass.

The CLI answers exit 2 and one line on stderr; the loaders and the wire format raise one
``SafeDecodeError`` (a ``ValueError``); both are fuzzed with hypothesis."""
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedecode.integrations import wire
from safedecode.cli import main
from safedecode.errors import SafeDecodeError
from safedecode.policy.rules import policy_from_mapping

GOOD = '[[forbid]]\nid = "pw"\nliteral = "hunter2"\n'


def run_cli(args, capsys, stdin="", monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_one_line_error(code, err, *words):
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("safedecode: error:"), err
    for word in words:
        assert word in err[0], err


def test_policy_that_is_a_directory(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["check", "--policy", tmp_path, "-"], capsys, "x", monkeypatch)
    assert_one_line_error(code, err, "is a directory")


def test_deeply_nested_toml(tmp_path, capsys, monkeypatch):
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    code, _, err = run_cli(["check", "--policy", deep, "-"], capsys, "x", monkeypatch)
    assert_one_line_error(code, err, "deep.toml", "nested too deeply")


def test_a_byte_order_mark_is_accepted(tmp_path, capsys, monkeypatch):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    code, out, _ = run_cli(["check", "--policy", bom, "-"], capsys, "the password is hunter2", monkeypatch)
    assert code == 1 and "pw" in out


@pytest.mark.parametrize("kind", ["file", "empty-dir"])
def test_tokenizer_that_is_a_file_or_an_empty_directory(tmp_path, capsys, kind):
    policy = tmp_path / "p.toml"
    policy.write_text(GOOD)
    target = tmp_path / "tok"
    if kind == "file":
        target.write_text("not a tokenizer")
    else:
        target.mkdir()
    code, _, err = run_cli(["compile", "--policy", policy, "--tokenizer", target, "--no-cache"], capsys)
    assert_one_line_error(code, err, "--tokenizer")


def test_unknown_rule_key_is_named_with_a_suggestion(tmp_path, capsys, monkeypatch):
    typo = tmp_path / "typo.toml"
    typo.write_text('[[forbid]]\nlitteral = "x"\n')
    code, _, err = run_cli(["check", "--policy", typo, "-"], capsys, "x", monkeypatch)
    assert_one_line_error(code, err, "typo.toml", "unknown key 'litteral'", "did you mean 'literal'")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.text(alphabet=st.sampled_from(list('[]{}="\'\\ \n#.,:abcdefilortx0123456789')), max_size=200)
                 .map(lambda t: ("[[forbid]]\n" + t).encode())))
def test_fuzzed_policy_files_exit_0_1_or_2_with_one_line(tmp_path_factory, capsys, data):
    path = tmp_path_factory.mktemp("fuzz") / "p.toml"
    path.write_bytes(data)
    text = path.parent / "t.txt"
    text.write_text("some text hunter2 abc")
    code, _, err = run_cli(["check", "--policy", path, text], capsys)
    assert code in (0, 1, 2)
    if code == 2:
        assert len(err) == 1 and err[0].startswith("safedecode: error:"), err


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["forbid", "literal", "regex", "id", "ignore_case", "whole_word", "variants", "body",
                         "open", "close", "special_tokens", "policy", "allow_hosts", "leak_window", "x"]),
        children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzzed_policy_mappings_raise_only_safedecode_errors(value):
    try:
        policy_from_mapping(value)
    except SafeDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(json_values, st.dictionaries(st.sampled_from(["safedecode", "safedecode_policy", "safedecode_leak_window",
                                                      "safedecode_allow_hosts", "safedecodex", "other"]),
                                     json_values | st.text(max_size=12).map(json.dumps), max_size=3))
def test_fuzzed_wire_options_raise_only_safedecode_errors(options, extra):
    try:
        wire.parse(options, extra)
    except SafeDecodeError:
        pass
