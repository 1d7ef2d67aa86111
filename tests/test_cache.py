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


def test_cache_key_separates_policy_and_vocabulary(sentencepiece_tokenizer, smollm2_tokenizer, cache_dir):
    compile_policy(POLICY, sentencepiece_tokenizer)
    compile_policy(Policy(forbid=[{"literal": "other"}]), sentencepiece_tokenizer)
    compile_policy(POLICY, smollm2_tokenizer)
    assert len(list(cache_dir.glob("*.npz"))) == 3


def assert_recompiled(tokenizer, good) -> None:
    """A new process (memory cache empty) refuses the damaged file and compiles the policy again."""
    compiled_module._memory_cache.clear()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = compile_policy(POLICY, tokenizer)
    assert "loaded_from_cache" not in again.stats
    assert np.array_equal(again.blob, good.blob)


def test_corrupt_cache_file_is_recompiled_not_trusted(sentencepiece_tokenizer, cache_dir):
    good = compile_policy(POLICY, sentencepiece_tokenizer)
    (path,) = cache_dir.glob("*.npz")
    path.write_bytes(b"garbage")
    assert_recompiled(sentencepiece_tokenizer, good)


def test_a_cache_file_whose_tables_changed_on_disk_is_recompiled_not_trusted(sentencepiece_tokenizer, cache_dir):
    """One bit of the stored tables flipped in place (the file still opens): the load's check (the
    archive's CRC-32 of each array) refuses it, and the policy is compiled again, not taken from it."""
    good = compile_policy(POLICY, sentencepiece_tokenizer)
    (path,) = cache_dir.glob("*.npz")
    stored = bytearray(path.read_bytes())
    tables = good.blob.tobytes()
    at = stored.find(tables)
    assert at >= 0, "the tables are stored as they are (np.savez, uncompressed)"
    stored[at + len(tables) // 2] ^= 0x01
    path.write_bytes(bytes(stored))
    with np.load(path) as data:  # still a readable archive: a well-formed file, not garbage
        assert set(data.files) >= {"blob"}
    assert_recompiled(sentencepiece_tokenizer, good)
    compiled_module._memory_cache.clear()
    assert compile_policy(POLICY, sentencepiece_tokenizer).stats.get("loaded_from_cache") is True  # rewritten


def test_compiled_policy_is_read_only(sentencepiece_tokenizer, cache_dir):
    compiled = compile_policy(POLICY, sentencepiece_tokenizer)
    with pytest.raises(ValueError):
        compiled.blob[0] = 1
