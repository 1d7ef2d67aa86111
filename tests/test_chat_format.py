"""Chat formats (channels/*.toml): every shipped file loads; rendering agrees with the real SmolLM2
template and with inline excerpts of the official Qwen2.5 / Llama-3.1 / Gemma-3 / Mistral-v0.3
templates; detection from a template or a vocabulary; bad files give one ChatFormatError naming
the file and the field."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from safedecode.channels.chat_format import (
    ROLES, ChatFormat, available_chat_formats, chat_format_from_mapping,
    detect_chat_format, load_chat_format,
)
from safedecode.errors import ChatFormatError, SafeDecodeError

CHANNELS = Path(__file__).resolve().parent.parent / "channels"  # the repository's folder

SHIPPED = ["chatml", "gemma", "llama3", "mistral"]


def msg(role, content):
    return {"role": role, "content": content}


SYS, USER, ASSISTANT = msg("system", "Be terse."), msg("user", "What is 2+2?\nShow work."), msg("assistant", "4")
USER2, TOOL = msg("user", "And 3+3?"), msg("tool", '{"result": 6}')

# ----------------------------------------------------------------------------------------------
# Excerpts of the official chat templates (tools-list / date headers left out), rendered with the
# Jinja settings transformers uses.

QWEN25 = """\
{%- for message in messages %}
    {%- if message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA31 = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

GEMMA3 = """\
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""

MISTRAL_V03 = """\
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# (format, template, conversation, add_generation_prompt). Mistral v0.3 puts the system text in the
# *last* user turn, we in the first: its cases have one user turn after the system message.
TEMPLATE_CASES = [
    ("chatml", QWEN25, [SYS, USER, ASSISTANT], False),
    ("chatml", QWEN25, [USER, ASSISTANT, TOOL], True),
    ("llama3", LLAMA31, [SYS, USER, ASSISTANT], False),
    ("llama3", LLAMA31, [SYS, USER, ASSISTANT, USER2], True),
    ("llama3", LLAMA31, [USER, ASSISTANT, TOOL], True),
    ("gemma", GEMMA3, [SYS, USER, ASSISTANT], False),
    ("gemma", GEMMA3, [SYS, USER, ASSISTANT, USER2], True),
    ("gemma", GEMMA3, [USER], True),
    ("mistral", MISTRAL_V03, [SYS, USER], True),
    ("mistral", MISTRAL_V03, [USER, ASSISTANT, USER2], True),
    ("mistral", MISTRAL_V03, [USER, ASSISTANT], False),
]


def render_template(template, fmt, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=fmt.bos, eos_token=fmt.end_of_turn)


class StubTokenizer:
    """What detect_chat_format reads from a transformers tokenizer."""

    def __init__(self, chat_template=None, vocab=(), name_or_path="stub/tokenizer"):
        self.chat_template, self.name_or_path, self._vocab = chat_template, name_or_path, vocab

    def get_vocab(self):
        return {token: i for i, token in enumerate(self._vocab)}


def to_toml(data, table=""):
    """A tiny TOML writer for the test files: scalars and string arrays as JSON (a subset of
    TOML's syntax), nested mappings as [a.b] tables."""
    out = [f"[{table}]"] if table else []
    out += [f"{key} = {json.dumps(value)}" for key, value in data.items() if not isinstance(value, dict)]
    out += [to_toml(value, f"{table}.{key}" if table else key) for key, value in data.items()
            if isinstance(value, dict)]
    return "\n".join(out) + "\n"


def chatml_data():
    return tomllib.loads((CHANNELS / "chatml.toml").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# The shipped files


def test_every_shipped_format_loads_under_its_own_name():
    assert available_chat_formats() == SHIPPED
    for name in SHIPPED:
        fmt = load_chat_format(name)
        assert fmt.name == name
        assert load_chat_format(CHANNELS / f"{name}.toml") == fmt
        assert fmt.end_of_turn in fmt.control_tokens
        # every detect marker is a control token, so vocabulary detection can work too
        assert set(fmt.detect) <= set(fmt.control_tokens)
        # every turn start we render for an existing role is well formed
        for role in ROLES:
            if role != "system" or fmt.system_role_supported:
                assert "{role}" not in fmt.turn_start_for(role) + fmt.turn_end_for(role)


def test_names_are_case_insensitive_with_aliases():
    assert load_chat_format("ChatML").name == "chatml"
    for alias in ("hermes", "Qwen", "SMOLLM"):
        assert load_chat_format(alias).name == "chatml"
    assert load_chat_format("Llama-3").name == "llama3"
    with pytest.raises(ChatFormatError) as info:
        load_chat_format("vicuna")
    assert "'vicuna'" in str(info.value) and "chatml, gemma, llama3, mistral" in str(info.value)


def test_role_names_and_overrides():
    gemma, llama, mistral = (load_chat_format(n) for n in ("gemma", "llama3", "mistral"))
    assert gemma.turn_start_for("assistant") == "<start_of_turn>model\n"
    assert llama.turn_start_for("tool") == "<|start_header_id|>ipython<|end_header_id|>\n\n"
    assert (mistral.turn_start_for("user"), mistral.turn_end_for("user")) == ("[INST] ", "[/INST]")
    assert (mistral.turn_start_for("assistant"), mistral.turn_end_for("assistant")) == (" ", "</s>")
    for fmt in (gemma, mistral):
        with pytest.raises(ChatFormatError, match="no system role"):
            fmt.turn_start_for("system")
    with pytest.raises(ChatFormatError, match="unknown role 'moderator'"):
        llama.turn_start_for("moderator")


def test_role_headers_are_the_distinct_control_token_headers():
    assert load_chat_format("chatml").role_headers() == (
        "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")  # tool → user
    assert load_chat_format("gemma").role_headers() == ("<start_of_turn>user\n", "<start_of_turn>model\n")
    assert load_chat_format("mistral").role_headers() == ("[INST] ",)  # " " and "" are no headers
    assert len(load_chat_format("llama3").role_headers()) == 4


# ----------------------------------------------------------------------------------------------
# Rendering agrees with the models' templates


@pytest.mark.parametrize("messages, generation", [([SYS, USER, ASSISTANT], False), ([SYS, USER], True)])
def test_chatml_matches_smollm2_template(smollm2_tokenizer, messages, generation):
    expected = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert load_chat_format("chatml").render(messages, add_generation_prompt=generation) == expected


@pytest.mark.parametrize("name, template, messages, generation", TEMPLATE_CASES)
def test_render_matches_official_template(name, template, messages, generation):
    fmt = load_chat_format(name)
    expected = render_template(template, fmt, messages, generation)
    assert fmt.render(messages, add_generation_prompt=generation) == expected


def test_tool_results_in_formats_without_a_tool_role():
    conversation = [USER, ASSISTANT, TOOL]
    assert load_chat_format("gemma").render(conversation) == (
        "<bos><start_of_turn>user\nWhat is 2+2?\nShow work.<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        '<start_of_turn>user\n```tool_output\n{"result": 6}\n```<end_of_turn>\n')
    assert load_chat_format("mistral").render(conversation) == (
        '<s>[INST] What is 2+2?\nShow work.[/INST] 4</s>[TOOL_RESULTS] {"result": 6}[/TOOL_RESULTS]')


def test_system_text_without_a_system_role_must_come_first():
    gemma = load_chat_format("gemma")
    with pytest.raises(ChatFormatError, match="message 1"):
        gemma.render([USER, SYS])
    with pytest.raises(ChatFormatError, match="no user message"):
        gemma.render([SYS])


# ----------------------------------------------------------------------------------------------
# Detection


def test_detects_chatml_on_smollm2(smollm2_tokenizer):
    assert detect_chat_format(smollm2_tokenizer).name == "chatml"


@pytest.mark.parametrize("template, name", [
    (LLAMA31, "llama3"), (GEMMA3, "gemma"), (MISTRAL_V03, "mistral"), (QWEN25, "chatml"),
    ({"default": GEMMA3, "tool_use": LLAMA31}, "gemma"),  # HF's dict of named templates
    (QWEN25 + LLAMA31, "llama3"),  # both match: the format with more markers wins
])
def test_detects_from_template(template, name):
    assert detect_chat_format(StubTokenizer(chat_template=template)).name == name


def test_detects_from_vocabulary_without_template():
    llama_vocab = ["hello", *load_chat_format("llama3").control_tokens]
    assert detect_chat_format(StubTokenizer(vocab=llama_vocab)).name == "llama3"
    # a template, when present, decides: the vocabulary is not consulted
    with pytest.raises(ChatFormatError):
        detect_chat_format(StubTokenizer(chat_template="{{ messages }}", vocab=llama_vocab))


def test_unknown_template_names_every_missing_marker():
    template = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}<|im_start|>\n{% endfor %}"
    with pytest.raises(ChatFormatError) as info:
        detect_chat_format(StubTokenizer(chat_template=template, name_or_path="acme/alpaca"))
    text = str(info.value)
    assert "'acme/alpaca'" in text and "has a chat_template" in text and "chat_format=" in text
    assert "chatml: '<|im_end|>' not found" in text  # only the marker that is missing
    assert "gemma: '<start_of_turn>', '<end_of_turn>' not found" in text
    assert "'<|start_header_id|>'" in text and "'[INST]'" in text


def test_no_template_and_no_markers_in_vocabulary():
    with pytest.raises(ChatFormatError, match="has no chat_template; looked in its vocabulary"):
        detect_chat_format(StubTokenizer(vocab=["<s>", "</s>", "hello"]))


# ----------------------------------------------------------------------------------------------
# Bad files: one ChatFormatError naming the file and the field


def test_toml_writer_round_trips():
    assert tomllib.loads(to_toml(chatml_data())) == chatml_data()
    mistral = tomllib.loads((CHANNELS / "mistral.toml").read_text(encoding="utf-8"))
    assert tomllib.loads(to_toml(mistral)) == mistral


def _drop_end_of_turn(d):
    del d["end_of_turn"]


def _set(path, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return edit


@pytest.mark.parametrize("edit, field, problem", [
    (_drop_end_of_turn, "end_of_turn", "missing"),
    (_set("bos", 1), "bos", "valid string"),
    (_set("control_tokens", "<|im_start|>"), "control_tokens", "valid tuple"),
    (_set("control_tokens", []), "control_tokens", "must not be empty"),
    (_set("detect", ["<|im_start|>", ""]), "detect.1", "must not be empty"),
    (_set("system_role_supported", "yes"), "system_role_supported", "valid boolean"),
    (_set("colour", "blue"), "colour", "unknown key"),
    (_set("roles.moderator", "mod"), "roles.moderator", "unknown key"),
    (_set("roles.user", {"name": "user", "turn_start": 3}), "roles.user.turn_start", "valid string"),
    (_set("roles.user", {"name": "user", "prefix": "x"}), "roles.user.prefix", "unknown key"),
    (_set("roles.tool", {"turn_start": ""}), "roles.tool.name", "missing"),
    (_set("end_of_turn", "</s>"), "end_of_turn", "not one of control_tokens"),
    (_set("bos", "<s>"), "bos", "not one of control_tokens"),
    (_set("system_role_supported", False), "roles.system", "must be absent"),
])
def test_malformed_file_names_file_and_field(tmp_path, edit, field, problem):
    data = chatml_data()
    edit(data)
    path = tmp_path / "broken.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    with pytest.raises(ChatFormatError) as info:
        load_chat_format(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field '{field}': ")
    assert problem in message


def test_missing_system_role_when_supported():
    data = chatml_data()
    del data["roles"]["system"]
    with pytest.raises(ChatFormatError, match=r"^<x>: field 'roles.system': missing, but system_role_supported"):
        chat_format_from_mapping(data, source="<x>")


def test_bad_toml_and_missing_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nbos = \n', encoding="utf-8")
    with pytest.raises(ChatFormatError, match=rf"^{path}: not valid TOML"):
        load_chat_format(path)
    with pytest.raises(ChatFormatError, match="no such chat-format file"):
        load_chat_format(tmp_path / "absent.toml")


def test_errors_are_safedecode_errors_and_direct_construction_is_checked():
    assert issubclass(ChatFormatError, SafeDecodeError)
    data = chatml_data()
    data["turn_end"] = None
    with pytest.raises(ChatFormatError, match=r"^field 'turn_end': "):
        ChatFormat(**data)


# ----------------------------------------------------------------------------------------------
# The channels directory


def test_channels_dir_adds_formats_and_a_missing_one_is_an_error(tmp_path, monkeypatch):
    data = chatml_data() | {"name": "custom"}
    (tmp_path / "custom.toml").write_text(to_toml(data), encoding="utf-8")
    monkeypatch.setenv("SAFEDECODE_CHANNELS_DIR", str(tmp_path))
    assert available_chat_formats() == sorted(SHIPPED + ["custom"])  # added to the shipped ones
    assert load_chat_format("CUSTOM").name == "custom"
    assert load_chat_format("chatml").name == "chatml"
    monkeypatch.setenv("SAFEDECODE_CHANNELS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ChatFormatError, match="SAFEDECODE_CHANNELS_DIR"):
        available_chat_formats()


def test_the_shipped_formats_are_package_data_equal_to_the_repository_folder(monkeypatch):
    """importlib.resources finds channels/ inside the package (a symlink here, a copy in the wheel)."""
    from importlib import resources

    monkeypatch.delenv("SAFEDECODE_CHANNELS_DIR", raising=False)
    shipped = resources.files("safedecode").joinpath("data", "channels")
    for path in CHANNELS.glob("*.toml"):
        assert shipped.joinpath(path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    assert available_chat_formats() == sorted(p.stem for p in CHANNELS.glob("*.toml"))