"""The plugin under vLLM's tensor parallelism, for real: ``LLM(tensor_parallel_size=3)`` on CPU
(SmolLM2 has 9 attention heads and 3 key/value heads, so 3 is the smallest split; three worker
processes on this machine's cores). Under tensor parallelism every worker computes the logits and
samples, so every worker's instance of the plugin must apply the same mask: each guarded output is
judged by the ``regex`` oracle, and the unguarded twin of each request shows the guard had
something to do there (not vacuous)."""
from __future__ import annotations

import gc

import pytest
from vllm import LLM, SamplingParams

from safedecode import Policy, find_violations, load_policy

from .conftest import ENGINE_ARGS, chat
from .test_offline import CASES, guarded, texts


@pytest.fixture(scope="module")
def tp_llm(model_dir):
    patch = pytest.MonkeyPatch()
    # One NUMA node here: vLLM's CPU workers cannot each get their own, so their threads are not bound.
    patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=model_dir, **ENGINE_ARGS, tensor_parallel_size=3, distributed_executor_backend="mp")
    yield llm
    del llm
    gc.collect()
    patch.undo()


def test_every_tensor_parallel_worker_applies_each_requests_guard(tp_llm, tokenizer):
    prompts = [chat(tokenizer, p) for p, _ in CASES]
    key = chat(tokenizer, "Repeat exactly: the key is AKIAIOSFODNN7EXAMPLE")
    free = texts(tp_llm.generate(prompts + [key], SamplingParams(max_tokens=24, temperature=0)))
    params = [guarded(spec) for _, spec in CASES]
    params.append(SamplingParams(max_tokens=24, temperature=0, extra_args={"safedecode": "secrets"}))
    params += [SamplingParams(max_tokens=24, temperature=0)] * len(prompts)  # unguarded rows in the same batch
    out = texts(tp_llm.generate(prompts + [key] + prompts, params))
    policies = [Policy(**spec) for _, spec in CASES] + [load_policy("secrets")]
    for policy, unguarded, text in zip(policies, free, out):
        assert find_violations(policy, unguarded), unguarded  # the guard has something to do
        assert not find_violations(policy, text), text
        assert text.strip(), "the guarded request still answers"
    assert out[len(policies):] == free[:len(prompts)]  # unguarded rows are untouched by their neighbours' guards
