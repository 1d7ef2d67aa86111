"""The plugin inside the real ``vllm serve`` (OpenAI-compatible), driven by the ``openai`` client:
chat and completions, streamed and not, eight concurrent clients; every answer judged by the
``regex`` oracle, and a bad config answered with 400 and safedecode's message."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from safedecode import Policy, find_violations

POLICY = {"forbid": [{"literal": "banana", "ignore_case": True, "id": "fruit"},
                     {"regex": r"Par[a-z]+", "id": "city"}]}
XARGS = {"safedecode": json.dumps({"policy": POLICY})}  # vllm_xargs carries strings: JSON text
QUESTIONS = ["Say the word banana five times.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def client(vllm_url):
    return openai.OpenAI(base_url=vllm_url + "/v1", api_key="none", max_retries=0, timeout=300)


def clean(text: str) -> bool:
    return not find_violations(Policy(**POLICY), text)


def ask(client, question: str, guarded: bool, stream: bool) -> str:
    extra = {"extra_body": {"vllm_xargs": XARGS}} if guarded else {}
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                               temperature=0, **extra)
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, **extra)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_is_guarded_and_unguarded_chat_is_not(client, stream):
    for question in QUESTIONS:
        free = ask(client, question, guarded=False, stream=stream)
        assert not clean(free), free  # the model wants the forbidden text
        answer = ask(client, question, guarded=True, stream=stream)
        assert clean(answer) and answer.strip(), answer


@pytest.mark.parametrize("stream", [False, True])
def test_completions_are_guarded(client, tokenizer, stream):
    from .conftest import chat

    prompt = chat(tokenizer, QUESTIONS[0])
    free = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert not clean(free), free
    result = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                       stream=stream, extra_body={"vllm_xargs": XARGS})
    text = "".join(c.choices[0].text for c in result) if stream else result.choices[0].text
    assert clean(text) and text.strip(), text


def test_eight_concurrent_clients(client):
    jobs = [(QUESTIONS[k % 2], k % 4 != 3, k % 2 == 0) for k in range(16)]  # mostly guarded, some not
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    for (question, guarded, _), answer in zip(jobs, answers):
        if guarded:
            assert clean(answer), (question, answer)
    assert any(not clean(a) for (_, g, _), a in zip(jobs, answers) if not g)  # unguarded rows untouched


@pytest.mark.parametrize("xargs, needle", [({"safedecode": "no-such-policy"}, "no-such-policy"),
                                           ({"safedecode": json.dumps({"polcy": "secrets"})}, "polcy"),
                                           ({"safedecode_policy": "secrets", "safedecode_x": "1"}, "safedecode_x")])
def test_a_bad_config_is_a_400_with_safedecodes_message(client, xargs, needle):
    with pytest.raises(openai.BadRequestError, match=needle):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body={"vllm_xargs": xargs})


def test_vllms_response_format_beside_a_safedecode_config_is_a_400(client):
    """OpenAI's response_format becomes vLLM's structured_outputs: with a safedecode config, refused by
    name (safedecode's own response_format is the way: one automaton with every rule)."""
    with pytest.raises(openai.BadRequestError, match="JSON escapes"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_object"},
                                       extra_body={"vllm_xargs": {"safedecode": "secrets"}})


def test_the_gateway_finds_that_this_vllm_reports_raw_logprobs(vllm_url):
    """vLLM's default --logprobs-mode (raw_logprobs): the gateway's start-up probe sees a token the
    guard masks listed with a finite logprob, so it will refuse logprobs (test_gateway.py runs vLLM
    with processed_logprobs, where they are honoured)."""
    from safedecode.server.upstream import UpstreamEngine

    assert UpstreamEngine.connect(vllm_url, "default").guarded_logprobs is False
