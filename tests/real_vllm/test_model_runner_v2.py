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


def logits_context(rows, slots, pos, fed):
    """vLLM's own V2 ``LogitsContext`` for one step: logits row -> slot, the step's slots, each row's
    position and the token fed there (the sampled one, or a draft)."""
    return LogitsContext(expanded_idx_mapping=torch.tensor(rows, dtype=torch.int32),
                         idx_mapping=torch.tensor(slots, dtype=torch.int32),
                         idx_mapping_np=np.array(slots, dtype=np.int32),
                         expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
                         input_ids=torch.tensor(fed, dtype=torch.int64), pos=torch.tensor(pos, dtype=torch.int64),
                         seq_lens_upper_bound_np=np.array([p + 1 for p in pos], dtype=np.int32))


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
        ctx = logits_context(rows, slots, pos, fed)
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


@pytest.fixture()
def v2_both(model_dir, tokenizer, monkeypatch):
    """Two plugins built by vLLM's loader on one ``RequestState``: the device automaton forced on
    CPU tensors ($SAFEDECODE_DEVICE_AUTOMATON=1) and the host path (=0)."""
    from vllm.v1.worker.gpu import buffer_utils

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    width = len(tokenizer)
    states = RequestState(max_num_reqs=5, max_model_len=96, max_num_batched_tokens=96, num_speculative_steps=2,
                          vocab_size=width, device=torch.device("cpu"))
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=model_dir))
    plugins = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SAFEDECODE_DEVICE_AUTOMATON", flag)
        processors = loader.build_custom_logits_processors(config, states, False, [])
        plugins.append(next(p for p in processors if isinstance(p, SafeDecodeLogitsProcessor)))
    assert plugins[0].device_automaton and not plugins[1].device_automaton
    return plugins, states, width


def test_device_automaton_masks_equal_the_host_path_step_by_step(v2_both, tokenizer):
    """The device path (every guarded slot's state a tensor, advanced from ``all_token_ids`` /
    ``total_len`` and ``ctx.input_ids`` without reading them back) on CPU tensors: each step its
    logits equal the host path's bit for bit, and each guarded row's mask is ``forbidden_ids`` of the
    row's visible output — through slots re-added with their output so far (preemption), a policy
    that cannot be compiled (fails closed), reordered rows, drafts and uncommitted tokens."""
    (device, host), states, width = v2_both
    configs = dict(CONFIGS)
    configs[4] = {"policy": {"forbid": [{"regex": "("}]}}  # cannot compile: fails closed
    rng = random.Random(1)
    pieces = [t for w in ("hunter2", "hunter", "abbbc", "ab", "c", " the", " key", "AKIA", "IOSFODNN7EXAMPLE")
              for t in tokenizer.encode(w, add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    slots = [0, 1, 2, 3, 4]
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    outputs = {slot: [] for slot in slots}
    admitted_at = {}

    def admit(slot, step):  # as vLLM's RequestState.add_request: the prompt plus any output so far
        states.prompt_len.np[slot] = len(prompt)
        states.prefill_len.np[slot] = len(prompt) + len(outputs[slot])
        states.all_token_ids.gpu[slot, :len(prompt) + len(outputs[slot])] = torch.tensor(prompt + outputs[slot])
        states.total_len.gpu[slot] = len(prompt) + len(outputs[slot])
        params = SamplingParams(extra_args={"safedecode": configs[slot]} if slot in configs else None)
        assert device.add_request(slot, params) == host.add_request(slot, params) == (slot in configs)
        admitted_at[slot] = step

    for slot in slots:
        admit(slot, 0)
    for step in range(40):
        if step in (15, 30):  # preemption: the slot comes back with its output so far
            admit(0 if step == 15 else 3, step)
        rows, pos, fed, visible = [], [], [], []
        for slot in rng.sample(slots, len(slots)):
            total = len(prompt) + len(outputs[slot])
            # the last sampled token not yet committed (never right after a (re)admission)
            uncommitted = rng.random() < 0.2 and outputs[slot] and admitted_at[slot] < step
            committed = outputs[slot][:-1] if uncommitted else outputs[slot]
            if committed:
                states.all_token_ids.gpu[slot, len(prompt):len(prompt) + len(committed)] = torch.tensor(committed)
            states.total_len.gpu[slot] = len(prompt) + len(committed)
            rows.append(slot), pos.append(total - 1), fed.append((prompt + outputs[slot])[-1])
            visible.append(list(outputs[slot]))
            drafts = [rng.choice(pieces) for _ in range(rng.randrange(3))] if slot in (0, 2, 4) else []
            for k, draft in enumerate(drafts):
                rows.append(slot), pos.append(total + k), fed.append(draft)
                visible.append(outputs[slot] + drafts[:k + 1])
        ctx = logits_context(rows, slots, pos, fed)
        logits = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(step))
        if step % 7 == 3:  # a row another processor left with only forbidden ids: EOS comes back
            logits[0] = float("-inf")
        before = logits.clone()
        host_logits = logits.clone()
        for plugin, tensor in ((device, logits), (host, host_logits)):
            plugin.apply_staged_writes()
            plugin.apply(tensor, ctx)
        assert torch.equal(logits.view(torch.int32), host_logits.view(torch.int32)), step
        for r, (slot, seen) in enumerate(zip(rows, visible)):
            if slot not in configs:
                assert torch.equal(logits[r], before[r]), "an unguarded row was touched"
            elif slot == 4:
                assert set(torch.nonzero(~torch.isneginf(logits[r])).flatten().tolist()) <= {eos}
            elif not (step % 7 == 3 and r == 0):
                masked = set(torch.nonzero(torch.isneginf(logits[r])).flatten().tolist())
                assert masked == expected_mask(tokenizer, configs[slot], seen, width), (step, slot, seen)
        for slot in slots:
            choice = rng.choice(pieces)
            r = rows.index(slot)
            if slot in configs and torch.isneginf(logits[r, choice]):
                choice = eos if not torch.isneginf(logits[r, eos]) else int(torch.argmax(logits[r]))
            outputs[slot].append(choice)
    assert any(outputs[slot] for slot in CONFIGS)


def test_device_automaton_fails_closed_past_its_bound(v2_both, tokenizer):
    """More newly committed tokens in one step than the device path walks: the row fails closed
    (every id but EOS), never skips them."""
    (device, _), states, width = v2_both
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    states.prompt_len.np[0] = states.prefill_len.np[0] = len(prompt)
    states.all_token_ids.gpu[0, :len(prompt)] = torch.tensor(prompt)
    states.total_len.gpu[0] = len(prompt)
    assert device.add_request(0, SamplingParams(extra_args={"safedecode": CONFIGS[0]}))
    output = tokenizer.encode(" the key is", add_special_tokens=False) * 3
    assert len(output) > device._lookahead
    states.all_token_ids.gpu[0, len(prompt):len(prompt) + len(output)] = torch.tensor(output)
    states.total_len.gpu[0] = len(prompt) + len(output)
    ctx = logits_context([0], [0], [len(prompt) + len(output) - 1], [output[-1]])
    logits = torch.randn(1, width)
    device.apply_staged_writes()
    device.apply(logits, ctx)
    assert set(torch.nonzero(~torch.isneginf(logits[0])).flatten().tolist()) == {tokenizer.eos_token_id}


def test_precompiled_policies_have_their_device_tables_before_the_first_request(model_dir, monkeypatch):
    """$SAFEDECODE_VLLM_PRECOMPILE on the device path: the warm-up builds the named policy's device
    tables too, so the engine step that admits the first request naming it builds nothing."""
    from vllm.v1.worker.gpu import buffer_utils

    from safedecode.engine import device_automaton as module

    built = []

    class Counted(module.DeviceAutomaton):
        def __init__(self, compiled, device, **options):
            built.append(compiled)
            super().__init__(compiled, device, **options)

    monkeypatch.setattr(module, "DeviceAutomaton", Counted)
    monkeypatch.setattr(module, "_shared", type(module._shared)())  # nothing built by an earlier test
    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
    monkeypatch.setenv("SAFEDECODE_DEVICE_AUTOMATON", "1")
    monkeypatch.setenv("SAFEDECODE_VLLM_PRECOMPILE", "secrets")
    from safedecode.models import load_default_tokenizer

    states = RequestState(max_num_reqs=2, max_model_len=32, max_num_batched_tokens=32, num_speculative_steps=0,
                          vocab_size=len(load_default_tokenizer()), device=torch.device("cpu"))
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=model_dir))
    processors = loader.build_custom_logits_processors(config, states, False, [])
    plugin = next(p for p in processors if isinstance(p, SafeDecodeLogitsProcessor))
    plugin._warmup.join()
    assert built == [plugin.precompiled["secrets"]]
    assert plugin.add_request(0, SamplingParams(extra_args={"safedecode": "secrets"}))
    plugin.apply_staged_writes()
    assert built == [plugin.precompiled["secrets"]]  # the admitting step looked the tables up
