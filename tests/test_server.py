"""``safedecode serve`` end to end, with the official ``openai`` client (sync, async, streaming)
against a live server that this module starts (``python -m safedecode.cli serve`` in a subprocess,
on a free 127.0.0.1 port), plus unit tests of what decides the streamed text (``TextTracker``),
how OpenAI tools become guard tools, and how per-request policies are resolved.

Every guarded answer is judged by the ``regex`` oracle (:func:`safedecode.find_violations`), never
by the guard itself. Requests use greedy decoding and few tokens (2 busy cores).
"""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from safedecode import Conversation, Policy, PolicyError, find_violations, load_policy
from safedecode.server.worker import TextTracker
from safedecode.tokens.vocabulary import Vocabulary
from safedecode.integrations.wire import REQUEST_LIMITS, PolicyTooLargeError
from safedecode.integrations.wire import parse as resolve
from safedecode.server.process import running_server
from safedecode.server.schemas import MAX_BODY_BYTES, ChatMessage, ToolDef

MAX_POLICY_RULES = REQUEST_LIMITS.max_rules
from safedecode.channels.tool_schemas import ToolError, tool_models
from tests.support.policy_oracle import forbidden_alternatives
from tests.support.text_oracle import json_strings

MODEL = "SmolLM2-135M-Instruct"
PASSWORD = {"forbid": [{"literal": "hunter2", "id": "pw"}]}
REPEAT_PASSWORD = [{"role": "user", "content": "Repeat after me exactly: the password is hunter2"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                           "parameters": WEATHER}}]


# -- unit tests (no server) -------------------------------------------------------------------
def _vocabulary(*pieces: bytes):
    """A hand-built vocabulary: id i is pieces[i]; the last id is EOS."""
    eos = len(pieces)
    return Vocabulary(token_bytes=tuple(pieces) + (None,), eos_ids=frozenset({eos}), special_ids=frozenset({eos}),
                      family="custom")


def _feed(tracker, ids):
    return [(tracker.feed(i), tracker.take()) for i in ids]


def test_tracker_holds_back_incomplete_utf8_and_possible_stop_strings():
    vocab = _vocabulary(b"ab", b"\xc3", b"\xa9", b"ST", b"OP", b"S")
    tracker = TextTracker(vocab, stops=["STOP"])
    steps = _feed(tracker, [0, 1, 2, 5, 0])
    assert steps == [(False, "ab"), (False, ""), (False, "\u00e9"), (False, ""), (False, "Sab")]
    tracker = TextTracker(vocab, stops=["STOP"])
    assert _feed(tracker, [0, 3, 4]) == [(False, "ab"), (False, ""), (True, "")]
    text, content = tracker.final()
    assert text == content == "ab" and tracker.rest(content) == ""


def test_tracker_never_streams_past_a_token_boundary_and_backs_off_an_end_sensitive_cut():
    vocab = _vocabulary(b"foobar", b"X ")
    policy = Policy(forbid=[{"literal": "foo", "whole_word": True}])
    tracker = TextTracker(vocab, stops=["bar"], policy=policy)
    assert _feed(tracker, [1, 0]) == [(False, "X "), (True, "")]
    # "X foo" would read as a whole-word "foo" (\bfoo\b sees the end): cut at the token boundary.
    assert tracker.final() == ("X ", "X ")
    tracker = TextTracker(vocab, stops=["bar"])  # no policy: the exact OpenAI cut
    _feed(tracker, [0])
    assert tracker.final()[0] == "foo"


def test_tracker_pauses_content_at_the_tool_call_tag():
    vocab = _vocabulary(b"hi <tool", b"_call>{}", b"</tool_call>")
    tracker = TextTracker(vocab, pause="<tool_call>")
    assert _feed(tracker, [0, 1, 2, 3]) == [(False, ""), (False, ""), (False, ""), (True, "")]
    assert tracker.final() == ("hi <tool_call>{}</tool_call>", "hi ")
    assert tracker.rest("hi ") == "hi "


def test_openai_tools_become_guard_models_and_unsupported_schemas_are_refused():
    (model,) = tool_models([ToolDef(**TOOLS[0])])
    assert model.__name__ == "get_weather" and model.__doc__ == "Current weather for a city."
    schema = model.model_json_schema()
    assert schema["required"] == ["city", "unit"] and schema["additionalProperties"] is False
    assert schema["properties"]["city"]["maxLength"] == 40
    for bad, message in [({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}, "anyOf"),
                         ({"type": "object", "properties": {"a": {"type": "string", "minimum": 1}}}, "minimum"),
                         ({"type": "object", "properties": {"a": {"type": "null"}}}, "unsupported type"),
                         ({"type": "object", "required": ["b"]}, r"'required' names \['b'\]")]:
        with pytest.raises(ToolError, match=message):
            tool_models([ToolDef(type="function", function={"name": "t", "parameters": bad})])


def test_policies_add_to_the_server_default_and_read_vllm_xargs():
    default = Policy(forbid=[{"literal": "base"}])
    options = resolve({"policy": ["secrets", PASSWORD], "allow_hosts": ["a.com"]},
                      {"safedecode_policy": json.dumps({"forbid": [{"literal": "x"}]}),
                       "safedecode_allow_hosts": "b.com, a.com", "other_plugin": 1}, default=default)
    literals = [getattr(rule, "literal", None) for rule in options.policy.forbid]
    assert literals[0] == "base" and "hunter2" in literals and literals[-1] == "x"
    assert len(options.policy.forbid) == 3 + len(load_policy("secrets").forbid)
    assert options.allow_hosts == ("a.com", "b.com")
    assert resolve(None, None, default=default).policy == default
    with pytest.raises(PolicyError, match="unknown key 'safedecode_nope'"):
        resolve(None, {"safedecode_nope": 1})
    with pytest.raises(PolicyTooLargeError):
        resolve({"policy": {"forbid": [{"literal": "a"}] * (MAX_POLICY_RULES + 1)}})


def test_tool_messages_always_go_to_the_content_channel():
    from safedecode.server.app import build_conversation

    messages = [ChatMessage(role="system", content="sys"), ChatMessage(role="user", content="u"),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
                ChatMessage(role="tool", tool_call_id="c1", content="sunny"),
                ChatMessage(role="user", content="page", untrusted=True)]
    conversation = build_conversation(Conversation(None, "chatml"), messages, resolve())
    channels = [(s.channel, s.source) for s in conversation.segments]
    assert channels == [("system", ""), ("user", ""), ("assistant", ""), ("content", "tool:get_weather"),
                        ("content", "document")]
    assert '"name": "get_weather"' in conversation.segments[2].text


# -- the live server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a ``safedecode serve`` subprocess (embedded model, no server policy)."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    try:
        with running_server(log=log) as base:
            yield base
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=180)


def _chat(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 10)
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)
    return response.choices[0].message.content or ""


def _stream_text(stream) -> list[str]:
    return [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]


def test_models_health_and_unknown_model(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and {"queued", "running", "completed", "cancelled"} <= set(health)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.chat.completions.create(model="gpt-4", messages=REPEAT_PASSWORD, max_tokens=1)


def test_unguarded_says_it_guarded_never_and_the_stream_matches(client):
    policy = Policy(**PASSWORD)
    free = _chat(client, REPEAT_PASSWORD)
    assert find_violations(policy, free), free  # the prompt works: unguarded, the model says it
    guarded = _chat(client, REPEAT_PASSWORD, extra_body={"safedecode": {"policy": PASSWORD}})
    via_xargs = _chat(client, REPEAT_PASSWORD, extra_body={"vllm_xargs": {"safedecode_policy": json.dumps(PASSWORD)}})
    assert guarded == via_xargs and guarded.strip()
    assert not find_violations(policy, guarded)
    deltas = _stream_text(client.chat.completions.create(
        model=MODEL, messages=REPEAT_PASSWORD, temperature=0, max_tokens=10, stream=True,
        extra_body={"safedecode": {"policy": PASSWORD}}))
    assert "".join(deltas) == guarded
    for end in range(len(deltas) + 1):  # nothing forbidden at any point of the stream
        assert not find_violations(policy, "".join(deltas[:end]))


def test_the_response_carries_the_telemetry_report_when_asked(server):
    body = {"model": MODEL, "messages": REPEAT_PASSWORD, "temperature": 0, "max_tokens": 12,
            "safedecode": {"policy": PASSWORD, "report": True}}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=180).json()
    report = answer["safedecode"]["report"]
    assert report["blocked_steps"] >= 1 and report["rules"] == ["pw"] and report["max_removed_mass"] > 0.5
    assert not find_violations(Policy(**PASSWORD), answer["choices"][0]["message"]["content"] or "")
    del body["safedecode"]["report"]
    assert "safedecode" not in httpx.post(server + "/v1/chat/completions", json=body, timeout=180).json()


def test_named_policy_guards_a_secret_in_completions(client):
    secrets = load_policy("secrets")
    prompt = "My OpenAI key is sk-proj-4f9Qk2LmZx81NwTb7yHc3VdE. Again, my OpenAI key is"
    args = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    free = client.completions.create(**args).choices[0].text
    assert find_violations(secrets, free), free
    # Every form of the wire format asks for the same rules and gets them (vllm_xargs={"safedecode":
    # NAME} was once skipped: the request ran unguarded).
    forms = [{"safedecode": {"policy": "secrets"}}, {"vllm_xargs": {"safedecode": "secrets"}},
             {"vllm_xargs": {"safedecode": json.dumps({"policy": "secrets"})}},
             {"vllm_xargs": {"safedecode_policy": "secrets"}}]
    answers = [client.completions.create(extra_body=form, **args).choices[0].text for form in forms]
    for form, guarded in zip(forms, answers):
        assert not find_violations(secrets, guarded), (form, guarded)
    assert len(set(answers)) == 1, answers


def test_async_client_completions_stream_and_stop(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=180)
        args = dict(model=MODEL, prompt="Repeat this number exactly: 482\nNumber:", max_tokens=4, temperature=0)
        whole = await client.completions.create(**args)
        stream = await client.completions.create(stream=True, **args)
        deltas = [chunk.choices[0].text async for chunk in stream]
        stopped = await client.completions.create(stop=["8"], **args)
        return whole.choices[0], "".join(deltas), stopped.choices[0]

    whole, streamed, stopped = asyncio.run(run())
    assert whole.text == streamed and whole.text.strip() == "482"
    assert stopped.text == " 4" and stopped.finish_reason == "stop"


def test_raw_stream_is_openai_sse_ending_with_done(server):
    body = {"model": MODEL, "messages": REPEAT_PASSWORD, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _check_tool_call(call):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_tool_calls_come_back_in_openai_shape(client, server):
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    response = client.chat.completions.create(model=MODEL, messages=question, tools=TOOLS, tool_choice="required",
                                              max_tokens=40, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_tool_call(choice.message.tool_calls[0])

    async def stream():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=180)
        chunks = await client.chat.completions.create(
            model=MODEL, messages=question, tools=TOOLS, max_tokens=40, temperature=0, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(stream())
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert [call.index for call in calls] == list(range(len(calls))) and calls
    _check_tool_call(calls[0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


BIG = "x" * (MAX_BODY_BYTES + 1)


@pytest.mark.parametrize("path, body, status, message", [
    ("chat", {"safedecode": {"policy": {"forbid": [{"regex": "(a)\\1"}]}}}, 400, "backreference"),
    ("chat", {"safedecode": {"policy": {"forbid": [{"literal": "a", "colour": 1}]}}}, 400, "unknown key"),
    ("chat", {"safedecode": {"policy": "nope"}}, 400, "unknown policy name 'nope'"),
    ("chat", {"safedecode": {"untrusted": [7]}}, 400, "indices [7] out of range"),
    ("chat", {"safedecode": {"colour": 1}}, 400, "safedecode: unknown key 'colour'"),
    ("chat", {"safedecode": {"polcy": "secrets"}}, 400, "unknown key 'polcy' (did you mean 'policy'?)"),
    ("chat", {"vllm_xargs": {"safedecode_polcy": "secrets"}}, 400, "unknown key 'safedecode_polcy'"),
    ("chat", {"vllm_xargs": {"safedecode": '{"forbid": []}'}}, 400, "an inline policy goes under 'policy'"),
    ("chat", {"safedecode_policy": "secrets"}, 400, "unknown top-level key 'safedecode_policy'"),
    ("chat", {"vllm_xargs": {"safedecode_policy": "{not json"}}, 400, "not valid JSON"),
    ("chat", {"tool_choice": "required"}, 400, "tool_choice='required'"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "t", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/x"}}}}}]}, 400, "$ref"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat", {"max_tokens": 10 ** 6}, 400, "max_tokens=1000000"),
    ("chat", {"n": 2, "stream": True}, 400, "n=2 with stream"),
    ("chat", {"n": 9}, 400, "n: Input should be less than or equal to 8"),
    ("chat", {"logprobs": True, "stream": True}, 400, "logprobs with stream"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    ("chat", {"top_k": 5}, 400, "unsupported field 'top_k'"),
    ("chat", {"functions": [{"name": "f"}]}, 400, "unsupported field 'functions'"),
    ("completions", {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("chat", {"parallel_tool_calls": False}, 400, "parallel_tool_calls"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}}}, 400, "keyword 'minimum'"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": False, "schema": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}, 400, "keyword 'uniqueItems'"),
    ("chat", {"response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("chat", {"response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "t"}}]},
     400, "response_format with tools"),
    ("chat", {"response_format": {"type": "json_object"}, "safedecode": {"response_format": {"type": "text"}}}, 400,
     "response_format given twice"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "[a-z]{1,9}x[a-z]{0,40}y[a-z]{1,60}"}}},
    }}}, 413, "limit"),
    ("chat", {"model": "nope"}, 404, "model 'nope' not found"),
    ("completions", {"safedecode": {"allow_hosts": ["a.com"]}}, 400, "chat/completions only"),
    ("completions", {"prompt": ""}, 400, "the prompt is empty"),
    ("chat", {"safedecode": {"policy": {"forbid": [{"literal": "a"}] * (MAX_POLICY_RULES + 1)}}}, 413, "rules"),
    ("chat", {"safedecode": {"policy": {"forbid": [{"regex": "(a|b)*a(a|b){20}"}]}}}, 413, "state limit"),
    ("chat", {"safedecode": {"policy": {"forbid": [{"regex": "\\w{60}"}]}}}, 413, "work budget"),
    ("completions", {"safedecode": {"policy": {"forbid": [{"regex": "\\w{60}"}]}}}, 413, "work budget"),
    ("chat", {"safedecode": {"policy": ["exfil", "secrets"]}}, 200, ""),  # named policies: trusted, no budget
    ("chat", {"messages": [{"role": "user", "content": BIG}]}, 413, "request body"),
])
def test_bad_requests_get_a_status_and_a_message_naming_the_problem(server, path, body, status, message):
    what = {"messages": REPEAT_PASSWORD} if path == "chat" else {"prompt": "hi"}
    request = {"model": MODEL, **what, "max_tokens": 1, **body}
    response = httpx.post(f"{server}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                          json=request, timeout=60)
    assert response.status_code == status, response.text
    if status != 200:
        assert message in response.json()["error"]["message"]


def test_bad_json_and_the_official_client_errors(server, client):
    response = httpx.post(server + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="backreference"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1,
                                  extra_body={"safedecode": {"policy": {"forbid": [{"regex": "(a)\\1"}]}}})


def _nonce_request(i: int) -> dict:
    """16 distinct deterministic requests: completions and chat, streamed or not, with or without a policy."""
    number = 307 + 41 * i
    policy = {"safedecode": {"policy": {"forbid": [{"literal": str(number)[1:]}]}}} if i % 3 == 0 else {}
    if i % 4 == 3:
        return dict(kind="chat", stream=i % 2 == 0, messages=[{"role": "user", "content": f"Repeat exactly: {number}"}],
                    extra_body=policy)
    return dict(kind="completion", stream=i % 2 == 0, prompt=f"Repeat this number exactly: {number}\nNumber:",
                extra_body=policy)


def _ask(base: str, request: dict) -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    args = dict(model=MODEL, max_tokens=4, temperature=0, stream=request["stream"], extra_body=request["extra_body"])
    if request["kind"] == "chat":
        response = client.chat.completions.create(messages=request["messages"], **args)
        if request["stream"]:
            return "".join(_stream_text(response))
        return response.choices[0].message.content
    response = client.completions.create(prompt=request["prompt"], **args)
    if request["stream"]:
        return "".join(chunk.choices[0].text for chunk in response)
    return response.choices[0].text


def test_sixteen_concurrent_clients_each_get_their_own_answer(server):
    requests = [_nonce_request(i) for i in range(16)]
    alone = [_ask(server, r) for r in requests]
    assert len(set(alone)) >= 12, alone  # the answers depend on the request, so a mix-up would show
    before = httpx.get(server + "/health").json()
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda r: _ask(server, r), requests))
    assert together == alone
    health = httpx.get(server + "/health").json()  # they were batched: fewer generate calls than requests
    assert health["batches"] - before["batches"] < 16 and health["max_batch_rows"] >= 2, health


def _wait_until_cancelled(server: str, before: dict) -> dict:
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(server + "/health").json()
        if health["cancelled"] > before["cancelled"] and health["running"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


LONG = {"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def test_a_client_that_disconnects_mid_stream_frees_its_generation(server):
    before = httpx.get(server + "/health").json()
    with httpx.stream("POST", server + "/v1/completions", json=dict(LONG, stream=True), timeout=120) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    health = _wait_until_cancelled(server, before)
    assert health["generated_tokens"] - before["generated_tokens"] < 100


def test_a_client_that_gives_up_on_a_plain_request_frees_its_generation(server):
    before = httpx.get(server + "/health").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.5))
    health = _wait_until_cancelled(server, before)
    assert health["generated_tokens"] - before["generated_tokens"] < 100


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    assert sample(7) == sample(7)


def test_serve_refuses_a_bad_policy_file_before_loading_the_model(tmp_path, capsys):
    from safedecode.cli import main

    assert main(["serve", "--policy", str(tmp_path / "missing.toml")]) == 2
    assert "no such policy file" in capsys.readouterr().err


# -- response_format, n, logprobs ------------------------------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "password": {"type": "string", "maxLength": 24},
    "role": {"type": "string", "enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "password", "role", "tags"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK_PERSON = [{"role": "user", "content": "The admin is Ann and her password is hunter2. "
                                          "Give her record as JSON with her password."}]


def _document(text: str, schema: dict):
    """The oracles: the text parses as JSON, validates against the schema (jsonschema), and no
    decoded string breaks the policy (the regex oracle)."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    for string in json_strings(value):
        assert not find_violations(Policy(**PASSWORD), string), string
    return value


def test_json_schema_answers_validate_and_hold_the_policy(client, server):
    args = dict(model=MODEL, messages=ASK_PERSON, max_tokens=60, temperature=0,
                extra_body={"safedecode": {"policy": PASSWORD}})
    free = client.chat.completions.create(response_format=PERSON_FORMAT, model=MODEL, messages=ASK_PERSON,
                                          max_tokens=60, temperature=0).choices[0]
    assert free.finish_reason == "stop" and json_strings(json.loads(free.message.content))
    assert "hunter2" in free.message.content  # the premise: without the policy the document carries it
    guarded = client.chat.completions.create(response_format=PERSON_FORMAT, **args).choices[0]
    assert guarded.finish_reason == "stop", guarded
    _document(guarded.message.content, PERSON)  # the content is the document, nothing added
    streamed = client.chat.completions.create(response_format=PERSON_FORMAT, stream=True, **args)
    assert "".join(_stream_text(streamed)) == guarded.message.content
    # strict false (or absent): the same exact enforcement
    loose = dict(PERSON_FORMAT, json_schema=dict(PERSON_FORMAT["json_schema"], strict=False))
    assert client.chat.completions.create(response_format=loose, **args).choices[0].message.content == \
        guarded.message.content
    anything = client.chat.completions.create(response_format={"type": "json_object"}, **args).choices[0]
    if anything.finish_reason == "stop":
        assert isinstance(_document(anything.message.content, {"type": "object"}), dict)
    else:
        assert anything.finish_reason == "length"
    # completions too, and an answer cut short is never presented as a document
    name = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
            "additionalProperties": False}
    text = client.completions.create(model=MODEL, prompt="Ann's record as JSON:", max_tokens=30, temperature=0,
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "n", "schema": name}}}).choices[0]
    assert text.finish_reason == "stop" and _document(text.text, name), text
    cut = client.chat.completions.create(response_format=PERSON_FORMAT, **dict(args, max_tokens=4)).choices[0]
    assert cut.finish_reason == "length"


def test_n_choices_are_independent_and_each_guarded(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=40, temperature=1.0,
                                              seed=11, n=3, response_format=PERSON_FORMAT,
                                              extra_body={"safedecode": {"policy": PASSWORD}})
    assert [c.index for c in response.choices] == [0, 1, 2]
    documents = []
    for choice in response.choices:
        if choice.finish_reason == "stop":
            documents.append(_document(choice.message.content, PERSON))
        else:
            assert choice.finish_reason == "length" and not find_violations(Policy(**PASSWORD), choice.message.content)
    assert documents and response.usage.completion_tokens >= 3
    plain = client.chat.completions.create(model=MODEL, messages=REPEAT_PASSWORD, max_tokens=8, temperature=1.0,
                                           seed=5, n=3, extra_body={"safedecode": {"policy": PASSWORD}})
    texts = [c.message.content for c in plain.choices]
    assert len(texts) == 3 and len(set(texts)) > 1, texts  # sampled independently
    assert not any(find_violations(Policy(**PASSWORD), t) for t in texts)


def test_logprobs_are_of_the_guarded_distribution(client):
    """Oracle: at every step, a top_logprobs token whose bytes would complete a match of the policy
    after the answer so far (the regex oracle) must not be there, and every reported logprob is
    finite; the premise: unguarded, such tokens are among the top ones."""
    policy = Policy(**PASSWORD)

    def steps(extra):
        response = client.chat.completions.create(model=MODEL, messages=REPEAT_PASSWORD, max_tokens=12,
                                                  temperature=0, logprobs=True, top_logprobs=20, **extra)
        choice = response.choices[0]
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        return choice.logprobs.content

    assert forbidden_alternatives(policy, steps({})) > 0  # unguarded: the model ranks the secret high
    assert forbidden_alternatives(policy, steps({"extra_body": {"safedecode": {"policy": PASSWORD}}})) == 0
    text = client.completions.create(model=MODEL, prompt="The password is hunter", max_tokens=3, temperature=0,
                                     logprobs=5, extra_body={"safedecode": {"policy": PASSWORD}}).choices[0]
    assert len(text.logprobs.tokens) == len(text.logprobs.top_logprobs) <= 3
    assert all(not find_violations(policy, "hunter" + token) for top in text.logprobs.top_logprobs for token in top)


def test_harmless_extras_are_accepted_and_anything_else_is_named(client):
    answer = client.chat.completions.create(model=MODEL, messages=REPEAT_PASSWORD, max_tokens=2, temperature=0,
                                            user="u-1", metadata={"team": "a"}, store=False, service_tier="auto")
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="unsupported field 'reasoning_effort'"):
        client.chat.completions.create(model=MODEL, messages=REPEAT_PASSWORD, max_tokens=2,
                                       reasoning_effort="low")
