"""Shared session fixtures: the embedded SmolLM2 model/tokenizer, a Llama-style SentencePiece
tokenizer with byte fallback (built in-test), and Qwen2.5's tiktoken encoding. All offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: on this 2-core box, with other processes competing, torch's 2 OpenMP
# threads spin-wait on each other and greedy generation gets 5-12x slower (measured); 1 thread
# is stable. Set before torch is first imported; export OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from tests.support.sentencepiece_fixture import build_sentencepiece_tokenizer  # noqa: E402

# The tests against the real vLLM run in their own environment (`make test-vllm`): elsewhere the
# folder is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["real_vllm"]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from safedecode.models import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="session")
def smollm2_model():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (float32, eval mode)."""
    from safedecode.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return build_sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def qwen_encoding():
    from safedecode.tokens.vocabulary import qwen_encoding as _qwen_encoding

    return _qwen_encoding("2.5")
