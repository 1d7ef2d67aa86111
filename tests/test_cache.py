"""Compiled policies are cached: in process, then on disk keyed by policy, vocabulary and library."""
import numpy as np
import pytest

from safedecode import Policy, SafeLogitsProcessor, compile_policy
from safedecode.engine import compiled as compiled_module

POLICY = Policy(forbid=[{"literal": "cache me"}, {"regex": r"x\d{3}"}])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDECODE_CACHE_DIR", str(tmp_path))
    compiled_module._memory_cache.clear()
    return tmp_path


def test_second_processor_recompiles_nothing(sentencepiece_tokenizer, cache_dir, monkeypatch):
    first = SafeLogitsProcessor(POLICY, sentencepiece_tokenizer)
    assert len(list(cache_dir.glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recompiled")

    monkeypatch.setattr(compiled_module, "_compile", fail)
    second = SafeLogitsProcessor(POLICY, sentencepiece_tokenizer)
    assert second.compiled is first.compiled  # in-process cache
    compiled_module._memory_cache.clear()
    third = compile_policy(POLICY, sentencepiece_tokenizer)  # a new process would load from disk
    assert third.stats.get("loaded_from_cache") is True
    assert np.array_equal(third.blob, first.compiled.blob)
    for text in ["", "cache", "cache m", "x1", "x12", "a cache me"]:
        ids = sentencepiece_tokenizer.encode(text, add_special_tokens=False)
        assert np.array_equal(third.forbidden_ids(third.walk(ids)), first.compiled.forbidden_ids(first.compiled.walk(ids)))


def test_cache_key_separates_policy_and_vocabulary(sentencepiece_tokenizer, smollm2_tokenizer, cache_dir):
    compile_policy(POLICY, sentencepiece_tokenizer)
    compile_policy(Policy(forbid=[{"literal": "other"}]), sentencepiece_tokenizer)
    compile_policy(POLICY, smollm2_tokenizer)
    assert len(list(cache_dir.glob("*.npz"))) == 3


def test_corrupt_cache_file_is_recompiled_not_trusted(sentencepiece_tokenizer, cache_dir):
    good = compile_policy(POLICY, sentencepiece_tokenizer)
    (path,) = cache_dir.glob("*.npz")
    path.write_bytes(b"garbage")
    compiled_module._memory_cache.clear()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = compile_policy(POLICY, sentencepiece_tokenizer)
    assert "loaded_from_cache" not in again.stats
    assert np.array_equal(again.blob, good.blob)


def test_compiled_policy_is_read_only(sentencepiece_tokenizer, cache_dir):
    compiled = compile_policy(POLICY, sentencepiece_tokenizer)
    with pytest.raises(ValueError):
        compiled.blob[0] = 1
