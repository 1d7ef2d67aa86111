"""A request whose safedecode config cannot be compiled (it skipped ``validate_params``) fails
closed in the vLLM plugin — only EOS is left — and stays closed when the engine rewrites its output
list (which makes a guarded row read its output again from the start)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from safedecode.integrations.vllm import SafeDecodeLogitsProcessor


def allowed(plugin, width):
    logits = torch.zeros(1, width)
    plugin.apply(logits)
    return torch.nonzero(~torch.isneginf(logits[0])).flatten().tolist()


def test_a_bad_config_stays_closed_when_the_output_is_rewritten(smollm2_tokenizer):
    tok = smollm2_tokenizer
    plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=tok)
    output = []
    bad = SimpleNamespace(extra_args={"safedecode": {"policy": {"forbid": [{"regex": "(a"}]}}})
    plugin.update_state(SimpleNamespace(removed=[], moved=[], added=[(0, bad, [1], output)]))
    eos = [tok.eos_token_id]
    assert allowed(plugin, len(tok)) == eos
    output += tok.encode("hello there", add_special_tokens=False)
    assert allowed(plugin, len(tok)) == eos
    output.clear()  # the engine rewrote the list (e.g. a resumed request): the row reads it again
    assert allowed(plugin, len(tok)) == eos
