"""``$SAFEDECODE_VLLM_PRECOMPILE``: the vLLM plugin compiles the named policies when the engine
starts (in the background), and a request naming one uses that compiled policy instead of
compiling in an engine step; a bad name is logged and never stops the engine."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from safedecode.integrations.vllm import PRECOMPILE_ENV, SafeDecodeLogitsProcessor


def add(plugin, config):
    output = []
    plugin.update_state(SimpleNamespace(removed=[], moved=[],
                                        added=[(0, SimpleNamespace(extra_args={"safedecode": config}), [1], output)]))
    return plugin._rows[0].guide.compiled


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
