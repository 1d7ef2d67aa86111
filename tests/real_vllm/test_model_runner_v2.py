"""The plugin on vLLM's Model Runner V2 interface, on CPU, through vLLM's own V2 loader and types
(the V2 runner itself needs a GPU): loading with every installed plugin, request validation, slots
added and re-added (preemption), committed tokens in ``RequestState``, rows reordered every step,
speculative draft rows and a sampled token not yet committed. Every guarded row's mask must equal
``CompiledPolicy.forbidden_ids`` of the state recomputed from scratch from that row's own visible
output; unguarded rows must be untouched."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.worker.gpu.sample.logits_processor import loader
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext
from vllm.v1.worker.gpu.states import RequestState

from safedecode import compile_policy
from safedecode.integrations.options import request_policy
from safedecode.integrations.vllm import SafeDecodeLogitsProcessor

CONFIGS = {0: {"policy": {"forbid": [{"literal": "hunter2", "id": "pw"}]}},
           2: {"policy": {"forbid": [{"regex": "ab+c", "id": "abc"}, {"literal": "hunter", "id": "h"}]}},
           3: "secrets"}


def test_vllm_loads_the_plugin_for_the_v2_runner_and_validates_with_it():
    classes = loader._load_v2_logitsprocs_plugins()  # every installed plugin, as `vllm serve` does
    assert SafeDecodeLogitsProcessor in classes
    validate = loader.build_custom_logits_processors_params_validator(None)
    validate(SamplingParams(extra_args={"safedecode": "secrets"}))
    with pytest.raises(VLLMValidationError, match="no-such-policy"):
        validate(SamplingParams(extra_args={"safedecode": "no-such-policy"}))


@pytest.fixture()
def v2(model_dir, tokenizer, monkeypatch):
    # vLLM counts the CPU platform as having UVA, but this CPU torch has no pinned-memory allocator:
    # take vLLM's own fallback for platforms without pinned memory (NonUvaBuffer).
    from vllm.v1.worker.gpu import buffer_utils

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    width = len(tokenizer)
    states = RequestState(max_num_reqs=4, max_model_len=96, max_num_batched_tokens=96, num_speculative_steps=2,
                          vocab_size=width, device=torch.device("cpu"))
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=model_dir))
    processors = loader.build_custom_logits_processors(config, states, False, [])
    plugin = next(p for p in processors if isinstance(p, SafeDecodeLogitsProcessor))
    return plugin, states, width


def expected_mask(tokenizer, config, output, width) -> set:
    compiled = compile_policy(request_policy({"safedecode": config}), tokenizer)
    return set(compiled.forbidden_ids(compiled.walk(output), width).tolist())


def test_masks_follow_slots_drafts_and_preemption(v2, tokenizer):
    plugin, states, width = v2
    rng = random.Random(0)
    pieces = [t for w in ("hunter2", "hunter", "abbbc", "ab", "c", " the", " key", "AKIA", "IOSFODNN7EXAMPLE")
              for t in tokenizer.encode(w, add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    slots = [0, 1, 2, 3]
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    outputs = {slot: [] for slot in slots}

    def admit(slot):
        states.prompt_len.np[slot] = len(prompt)
        states.all_token_ids.gpu[slot, :len(prompt)] = torch.tensor(prompt)
        states.total_len.gpu[slot] = len(prompt) + len(outputs[slot])
        guarded = plugin.add_request(slot, SamplingParams(extra_args={"safedecode": CONFIGS[slot]}
                                                          if slot in CONFIGS else None))
        assert guarded == (slot in CONFIGS)

    for slot in slots:
        admit(slot)
    for step in range(40):
        if step == 20:  # slot 0 is preempted and resumes with its output so far
            admit(0)
        rows, pos, fed, visible = [], [], [], []
        for slot in rng.sample(slots, len(slots)):  # rows reordered every step
            total = len(prompt) + len(outputs[slot])
            uncommitted = rng.random() < 0.2 and outputs[slot]  # the last sampled token not yet committed
            committed = outputs[slot][:-1] if uncommitted else outputs[slot]
            states.all_token_ids.gpu[slot, len(prompt):len(prompt) + len(committed)] = torch.tensor(committed or [0])[
                :len(committed)]
            states.total_len.gpu[slot] = len(prompt) + len(committed)
            last = (prompt + outputs[slot])[-1]
            rows.append(slot), pos.append(total - 1), fed.append(last), visible.append(list(outputs[slot]))
            drafts = [rng.choice(pieces) for _ in range(rng.randrange(3))] if slot in (0, 2) else []
            for k, draft in enumerate(drafts):  # speculative rows: the drafts are only in input_ids
                rows.append(slot), pos.append(total + k), fed.append(draft)
                visible.append(outputs[slot] + drafts[:k + 1])
        ctx = LogitsContext(expanded_idx_mapping=torch.tensor(rows, dtype=torch.int32),
                            idx_mapping=torch.tensor(slots, dtype=torch.int32),
                            idx_mapping_np=np.array(slots, dtype=np.int32),
                            expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
                            input_ids=torch.tensor(fed, dtype=torch.int64), pos=torch.tensor(pos, dtype=torch.int64),
                            seq_lens_upper_bound_np=np.array([p + 1 for p in pos], dtype=np.int32))
        logits = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(step))
        before = logits.clone()
        plugin.apply_staged_writes()
        plugin.apply(logits, ctx)
        for r, (slot, seen) in enumerate(zip(rows, visible)):
            if slot not in CONFIGS:
                assert torch.equal(logits[r], before[r]), "an unguarded row was touched"
                continue
            masked = set(torch.nonzero(torch.isneginf(logits[r])).flatten().tolist())
            assert masked == expected_mask(tokenizer, CONFIGS[slot], seen, width), (step, slot, seen)
        for slot in slots:  # sample the next token: often a forbidden-leaning piece, never masked ones
            choice = rng.choice(pieces)
            r = rows.index(slot)
            if slot in CONFIGS and torch.isneginf(logits[r, choice]):
                choice = eos if not torch.isneginf(logits[r, eos]) else int(torch.argmax(logits[r]))
            outputs[slot].append(choice)
    assert any(outputs[slot] for slot in CONFIGS)
