"""The vLLM plugin warms up when the engine starts (tokenizer, vocabulary, kernels; off with
``$SAFEDECODE_VLLM_WARMUP=0``), and with ``$SAFEDECODE_VLLM_PRECOMPILE`` compiles the named policies when the engine
starts (in the background), and a request naming one uses that compiled policy instead of
compiling in an engine step; a bad name is logged and never stops the engine."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from safedecode.integrations.vllm import PRECOMPILE_ENV, WARMUP_ENV, SafeDecodeLogitsProcessor


def add(plugin, config):
    output = []
    plugin.update_state(SimpleNamespace(removed=[], moved=[],
                                        added=[(0, SimpleNamespace(extra_args={"safedecode": config}), [1], output)]))
    return plugin._rows[0].compiled


def test_named_policies_are_ready_before_the_first_request(smollm2_tokenizer, monkeypatch):
    monkeypatch.setenv(PRECOMPILE_ENV, "secrets, shell")
    plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=smollm2_tokenizer)
    compiled = add(plugin, "secrets")  # waits for the warm-up if it is still running
    assert set(plugin.precompiled) == {"secrets", "shell"}
    assert compiled is plugin.precompiled["secrets"]  # the request reused it: nothing compiled in the step


def test_a_bad_name_is_logged_and_the_plugin_still_works(smollm2_tokenizer, monkeypatch, caplog):
    monkeypatch.setenv(PRECOMPILE_ENV, "no-such-policy")
    with caplog.at_level(logging.ERROR, logger="safedecode.integrations.vllm"):
        plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=smollm2_tokenizer)
        compiled = add(plugin, {"policy": {"forbid": [{"literal": "hunter2"}]}})
    assert "no-such-policy" in caplog.text and plugin.precompiled == {}
    logits = torch.zeros(1, len(smollm2_tokenizer))
    plugin.apply(logits)
    assert torch.isneginf(logits[0]).sum() == len(compiled.forbidden_ids(compiled.start_state, logits.shape[1]))


def test_the_warm_up_loads_the_tokenizer_in_the_background(monkeypatch, caplog):
    """No tokenizer given: the warm-up thread loads it from the model config, off the engine step."""
    loaded = []

    class Config:  # what the plugin reads of vllm_config
        model_config = SimpleNamespace(tokenizer="unused", tokenizer_revision=None, trust_remote_code=False)

    monkeypatch.delenv(WARMUP_ENV, raising=False)
    monkeypatch.delenv(PRECOMPILE_ENV, raising=False)
    import transformers

    def fake_load(name, **kwargs):  # the tokenizer load is the part under test, not transformers
        from safedecode.models import load_default_tokenizer
        loaded.append(name)
        return load_default_tokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_load)
    with caplog.at_level(logging.INFO, logger="safedecode.integrations.vllm"):
        plugin = SafeDecodeLogitsProcessor(Config(), torch.device("cpu"), False)
        assert plugin._warmup is not None and plugin._warmup.name == "safedecode-warmup"
        plugin._warmup.join()
    assert loaded == ["unused"] and plugin._tokenizer is not None
    assert "tokenizer and kernels ready" in caplog.text
    add(plugin, {"policy": {"forbid": [{"literal": "hunter2"}]}})
    assert loaded == ["unused"]  # the request reused it


def test_the_warm_up_can_be_turned_off_and_its_failure_is_not_fatal(monkeypatch, caplog):
    monkeypatch.setenv(WARMUP_ENV, "0")
    monkeypatch.delenv(PRECOMPILE_ENV, raising=False)
    assert SafeDecodeLogitsProcessor(None, torch.device("cpu"), False)._warmup is None
    monkeypatch.delenv(WARMUP_ENV)
    with caplog.at_level(logging.WARNING, logger="safedecode.integrations.vllm"):
        plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False)  # no config: no tokenizer to load
        plugin._warmup.join()
    assert "warm-up failed" in caplog.text
