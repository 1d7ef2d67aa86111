"""The plugin inside the real vLLM engine (offline ``LLM``), judged by the ``regex`` oracle.

Every prompt here makes SmolLM2 write the forbidden text when unguarded (asserted, so no test is
vacuous); guarded, vLLM's own output text must contain no match of the request's policy, and
unguarded requests in the same batch must come out exactly as when they run alone."""
from __future__ import annotations

import json

import pytest
from vllm import LLM, SamplingParams

from safedecode import Policy, find_violations, load_policy

from .conftest import ENGINE_ARGS, chat

CASES = [  # (prompt, policy as the wire format carries it)
    ("Repeat exactly: the password is hunter2", {"forbid": [{"literal": "hunter2", "id": "pw"}]}),
    ("Say the word banana five times.", {"forbid": [{"literal": "banana", "ignore_case": True, "id": "fruit"}]}),
    ("What is the capital of France?", {"forbid": [{"regex": r"Par[a-z]+", "id": "city"}]}),
]


def guarded(policy: dict, **options) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=0, extra_args={"safedecode": {"policy": policy}}, **options)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


@pytest.fixture(scope="module")
def unguarded(llm, tokenizer):
    prompts = [chat(tokenizer, p) for p, _ in CASES]
    return texts(llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0)))


def test_unguarded_outputs_violate(unguarded):
    for (_, spec), text in zip(CASES, unguarded):
        assert find_violations(Policy(**spec), text), text  # the guard has something to do


def test_each_request_gets_its_own_policy_and_unguarded_rows_are_untouched(llm, tokenizer, unguarded):
    prompts, params = [], []
    for (prompt, spec), free in zip(CASES, unguarded):  # guarded and unguarded interleaved
        prompts += [chat(tokenizer, prompt), chat(tokenizer, prompt)]
        params += [guarded(spec), SamplingParams(max_tokens=24, temperature=0)]
    out = texts(llm.generate(prompts, params))
    for k, ((_, spec), free) in enumerate(zip(CASES, unguarded)):
        assert not find_violations(Policy(**spec), out[2 * k]), out[2 * k]
        assert out[2 * k].strip(), "the guarded request still answers"
        assert out[2 * k + 1] == free  # the unguarded twin is exactly the unguarded run


def test_a_shipped_policy_by_name_and_an_inline_one_by_json_text(llm, tokenizer):
    prompt = chat(tokenizer, "Repeat exactly: the key is AKIAIOSFODNN7EXAMPLE")
    named = SamplingParams(max_tokens=24, temperature=0, extra_args={"safedecode": "secrets"})
    inline = SamplingParams(max_tokens=24, temperature=0,
                            extra_args={"safedecode": json.dumps({"policy": {"forbid": [{"literal": "AKIA"}]}})})
    free, by_name, by_json = texts(llm.generate([prompt] * 3, [SamplingParams(max_tokens=24, temperature=0),
                                                               named, inline]))
    assert find_violations(load_policy("secrets"), free), free
    assert not find_violations(load_policy("secrets"), by_name), by_name
    assert "AKIA" not in by_json


def test_n_seeds_and_stop_strings(llm, tokenizer):
    prompt, spec = CASES[1]
    policy = Policy(**spec)
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=32, stop=["\n\n"],
                            extra_args={"safedecode": {"policy": spec}})
    first, again = (llm.generate([chat(tokenizer, prompt)], params)[0].outputs for _ in range(2))
    assert len(first) == 4
    for sample in first:
        assert not find_violations(policy, sample.text), sample.text
        assert "\n\n" not in sample.text
    assert [s.text for s in first] == [s.text for s in again]  # a seed reproduces the guarded samples
    free = llm.generate([chat(tokenizer, prompt)], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=32))
    assert any(find_violations(policy, s.text) for s in free[0].outputs)


def test_a_bad_config_is_refused_with_safedecodes_message(llm, tokenizer):
    for extra, needle in [({"safedecode": {"polcy": "secrets"}}, "polcy"),
                          ({"safedecode": "no-such-policy"}, "no-such-policy"),
                          ({"safedecode": {"policy": {"forbid": [{"regex": "(a"}]}}}, "regex")]:
        with pytest.raises(Exception, match=needle):
            llm.generate([chat(tokenizer, "hi")], SamplingParams(max_tokens=4, extra_args=extra))


def test_vllms_own_structured_outputs_beside_a_safedecode_config_are_refused(llm, tokenizer):
    """vLLM's grammar admits JSON escapes the raw-text rules cannot see: refused at admission, by name."""
    from vllm.sampling_params import StructuredOutputsParams

    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json={"type": "object"}),
                            extra_args={"safedecode": {"policy": "secrets"}})
    with pytest.raises(Exception, match="vLLM's own structured_outputs .*JSON escapes"):
        llm.generate([chat(tokenizer, "hi")], params)


def test_preemption_with_a_small_kv_cache(model_dir, tokenizer):
    """Many long guarded requests on a KV cache that holds only a few of them: vLLM preempts and
    resumes rows (recomputing them); each resumed row's guide starts over from its own output."""
    small = LLM(model=model_dir, **{**ENGINE_ARGS, "max_model_len": 256}, num_gpu_blocks_override=4,
                max_num_seqs=8, disable_log_stats=False)  # 4 blocks hold two of the eight requests
    prompt, spec = CASES[1]
    params = SamplingParams(max_tokens=160, temperature=0.8, seed=1, ignore_eos=True,
                            extra_args={"safedecode": {"policy": spec}})
    outputs = small.generate([chat(tokenizer, f"{prompt} Then count to {k}.") for k in range(8)], params)
    preemptions = sum(int(m.value) for m in small.get_metrics() if m.name == "vllm:num_preemptions")
    del small
    assert preemptions > 0, "the KV cache was large enough: nothing was preempted"
    for output in outputs:
        text = output.outputs[0].text
        assert len(output.outputs[0].token_ids) == 160
        assert not find_violations(Policy(**spec), text), text
