"""The vLLM V1 logits-processor plugin, against the stand-in of vLLM's persistent batch
(:mod:`tests.support.vllm_batch`: adds, removals, condensing moves, swaps, as ``BatchUpdate`` documents them).

Every step, every row's mask is checked against ``CompiledPolicy.forbidden_ids`` recomputed from
scratch from that row's own output tokens; unguarded rows must be untouched.
"""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safedecode.engine.compiled import combine, compile_policy
from safedecode.engine.device_mask import DeviceMasks, mask_rows
from safedecode.integrations.options import request_policy
from safedecode.integrations.vllm import SafeDecodeLogitsProcessor
from safedecode.policy.rules import load_policy
from safedecode.engine.kernels import unpack_tables
from tests.support.vllm_batch import (BatchUpdate, MoveDirectionality, PersistentBatch, Request,
                                       SamplingParams)

# --- fixtures -------------------------------------------------------------------------------------

INLINE = {"forbid": [{"literal": "hunter2"}, {"regex": "ab+c"}]}  # two components
CONFIGS = [
    {"policy": INLINE},
    json.dumps({"policy": json.dumps(INLINE)}),  # the vllm_xargs form: all JSON text
    "control-tokens",
    {"policy": {"forbid": [{"literal": "idiot", "whole_word": True, "ignore_case": True}]}},
    None,  # unguarded
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def pool(tokenizer):
    """Token ids that walk the test policies into deep states (and forbidden tokens)."""
    words = ["hunter", "hun", "ter", "2", "a", "b", "c", "ab", "bc", " idiot", "id", "iot", " ", "x",
             "<|im_start|>", "<|im_", "start", "|>", "IDIOT", " I", "di"]
    ids = {i for w in words for i in tokenizer.encode(w, add_special_tokens=False)}
    return sorted(ids)


def expected_mask(config, output, width, tokenizer) -> np.ndarray:
    compiled = compile_policy(resolve_policy(_policy_spec(config)), tokenizer)
    return compiled.forbidden_ids(compiled.walk(output), width)


def resolve_policy(spec):
    """The policy a request's ``policy`` value names, through the plugin's own wire-format parser."""
    return request_policy({"safedecode": {"policy": spec}})


def _policy_spec(config):
    config = json.loads(config) if isinstance(config, str) and config.startswith("{") else config
    return config["policy"] if isinstance(config, dict) else config


def make_logits(rows: int, width: int, layout: str, seed: int) -> torch.Tensor:
    values = torch.randn(rows, width + 3, generator=torch.Generator().manual_seed(seed))
    if layout == "strided":  # not viewable by the kernel: the DeviceMasks path, on CPU
        return values[:, :width]
    return values[:, :width].contiguous().to(getattr(torch, layout))


# --- the scenario ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["float32", "strided", "bfloat16"])
def test_masks_follow_each_request_through_adds_moves_swaps_and_removals(tokenizer, pool, layout):
    rng = random.Random(layout)
    width = len(tokenizer)
    eos = tokenizer.eos_token_id
    plugin = SafeDecodeLogitsProcessor(None, torch.device("cpu"), False, tokenizer=tokenizer)
    batch = PersistentBatch()
    waiting = [Request(CONFIGS[i % len(CONFIGS)], adversarial=(i == 3)) for i in range(14)]
    checked = {"guarded": 0, "partial": 0, "violated": 0, "moves": 0, "swaps": 0, "removed": 0}
    for step in range(60):
        new = [waiting.pop(0) for _ in range(rng.randint(0, 2)) if waiting]
        size = len(batch.slots) + len(new)
        swaps = [(rng.randrange(size), rng.randrange(size))] if size and rng.random() < 0.5 else []
        update = batch.step(new, swaps)
        if update is not None:
            checked["removed"] += len(update.removed)
            for _, _, d in update.moved:
                checked["swaps" if d is MoveDirectionality.SWAP else "moves"] += 1
        plugin.update_state(update)
        assert plugin.needs_output_token_ids() == any(r.config is not None for r in batch.slots)
        if not batch.slots:
            continue
        logits = make_logits(len(batch.slots), width, layout, seed=step)
        before = logits.clone()
        assert plugin.apply(logits) is logits
        for i, req in enumerate(batch.slots):
            masked = np.flatnonzero(torch.isneginf(logits[i]).numpy())
            if req.config is None:
                assert torch.equal(logits[i], before[i]), f"step {step}: unguarded row {i} was modified"
            else:
                want = expected_mask(req.config, req.output, width, tokenizer)
                assert np.array_equal(masked, want), f"step {step}, row {i}, output {req.output}"
                assert eos not in masked
                checked["guarded"] += 1
                checked["partial"] += 0 < len(want) < width - 1  # a state that forbids some tokens
                checked["violated"] += len(want) == width - 1
            # The "engine" samples: mostly from the pool; the adversarial request a forbidden token.
            forbidden = set(masked.tolist())
            bad = [t for t in pool if t in forbidden and t != eos]
            if req.adversarial and bad and rng.random() < 0.5:
                token = rng.choice(bad)
            else:
                ids = pool if rng.random() < 0.9 else rng.sample(range(width), 50)  # now and then any id
                token = rng.choice([t for t in ids if t not in forbidden] or [eos])
            req.output.append(token)
            req.done = token == eos or rng.random() < 0.06 or len(req.output) > 25
    assert all(checked.values()), checked
    assert not waiting


def test_rows_that_share_a_state_get_the_mask_each_would_get_alone(tokenizer):
    """The kernel reads a state's mask once for all the rows in it: every row's mask must still be
    ``forbidden_ids`` of its own state, for states listed by ids, states with more ids than the
    shared list holds ("e" forbids every token with an e), complement states (a JSON document)
    and stopped rows; a row whose EOS someone else masked gets it back only if it has nothing left."""
    configs = [{"policy": {"forbid": [{"literal": "e"}]}}, {"policy": INLINE},
               {"response_format": {"type": "json_object"}}, "secrets"]
    prefixes = [tokenizer.encode(t, add_special_tokens=False) for t in ("", "hun", '{"a', "ab")]
    width, eos = len(tokenizer), tokenizer.eos_token_id
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    rows = [(configs[i % 4], list(prefixes[(i // 4) % 4])) for i in range(32)]  # 16 (config, prefix) pairs
    plugin.update_state(SimpleNamespace(removed=[], moved=[], added=[
        (i, SimpleNamespace(extra_args={"safedecode": config}), [1], output) for i, (config, output) in enumerate(rows)]))
    rng = random.Random(0)
    kinds = {"shared": 0, "long": 0, "complement": 0, "stopped": 0, "restored": 0}
    for step in range(8):
        logits = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(step))
        logits[::3, eos] = float("-inf")  # another processor's min_tokens
        eos_masked = torch.isneginf(logits[:, eos]).tolist()
        plugin.apply(logits)
        states = {}
        for i, (config, output) in enumerate(rows):
            compiled = plugin._rows[i].compiled
            state = compiled.walk(output)
            want = set(compiled.forbidden_ids(state, width).tolist())
            if eos_masked[i]:
                want.add(eos)
                if len(want) == width:  # nothing left: the one EOS rule gives the first EOS back
                    want.discard(next(e for e in compiled.eos_ids if e < width))
                    kinds["restored"] += 1
            masked = set(np.flatnonzero(torch.isneginf(logits[i]).numpy()).tolist())
            assert masked == want, (step, i, config, output)
            states.setdefault((id(compiled), state), []).append(i)
            kinds["long"] += len(want) > 4096
            kinds["complement"] += width // 2 < len(want) < width - 1
            kinds["stopped"] += min(state) < 0
        kinds["shared"] += sum(len(group) > 1 for group in states.values())
        for group in states.values():  # rows in one state take one token: they stay together
            allowed = np.flatnonzero(~torch.isneginf(logits[group[0]]).numpy())
            token = int(rng.choice(allowed)) if rng.random() < 0.9 else rng.randrange(width)
            for i in group:
                rows[i][1].append(token)
    assert all(kinds.values()), kinds


def test_an_add_or_a_move_onto_an_index_discards_its_request(tokenizer):
    """vLLM's Add replaces the request at its index, a unidirectional move discards the one at its
    destination: the new occupant must not inherit the old one's policy or state."""
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    guarded = SamplingParams({"safedecode": {"policy": INLINE}})
    hunter = tokenizer.encode("hunter", add_special_tokens=False)
    plugin.update_state(BatchUpdate(3, [], [(i, guarded, None, list(hunter)) for i in range(3)], []))
    plugin.update_state(BatchUpdate(3, [], [(0, SamplingParams(), None, []), (2, SamplingParams(), None, [])],
                                    [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    logits = make_logits(2, len(tokenizer), "float32", 6)
    before = logits.clone()
    plugin.apply(logits)
    assert torch.equal(logits, before) and not plugin.needs_output_token_ids()


def test_a_forbidden_token_sampled_anyway_leaves_only_eos(tokenizer):
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    output: list[int] = []
    plugin.update_state(BatchUpdate(1, [], [(0, SamplingParams({"safedecode": {"policy": INLINE}}), None, output)], []))
    output.extend(tokenizer.encode("hunter2", add_special_tokens=False))
    logits = make_logits(1, len(tokenizer), "float32", 0)
    plugin.apply(logits)
    allowed = np.flatnonzero(~torch.isneginf(logits[0]).numpy())
    assert allowed.tolist() == [tokenizer.eos_token_id]


@pytest.mark.parametrize("layout", ["float32", "strided"])
def test_never_stuck_restores_eos_only_on_guarded_rows(tokenizer, layout):
    """Another processor masked EOS (min_tokens) and the policy leaves nothing: EOS comes back."""
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    bad = tokenizer.encode("hunter2", add_special_tokens=False)
    added = [(0, SamplingParams({"safedecode": {"policy": INLINE}}), None, list(bad)), (1, SamplingParams(), None, [])]
    plugin.update_state(BatchUpdate(2, [], added, []))
    logits = make_logits(2, len(tokenizer), layout, 1)
    logits[:, tokenizer.eos_token_id] = float("-inf")
    logits[1] = float("-inf")
    plugin.apply(logits)
    assert logits[0, tokenizer.eos_token_id].item() == 0.0
    assert torch.isneginf(logits[0]).sum().item() == len(tokenizer) - 1
    assert torch.isneginf(logits[1]).all(), "an unguarded row is never touched"


def test_async_placeholder_fails_closed_until_the_token_is_known(tokenizer):
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    output: list[int] = []
    plugin.update_state(BatchUpdate(1, [], [(0, SamplingParams({"safedecode": {"policy": INLINE}}), None, output)], []))
    output.extend(tokenizer.encode("hunter", add_special_tokens=False) + [-1])
    logits = make_logits(1, len(tokenizer), "float32", 2)
    plugin.apply(logits)
    assert np.flatnonzero(~torch.isneginf(logits[0]).numpy()).tolist() == [tokenizer.eos_token_id]
    output[-1] = tokenizer.encode(" x", add_special_tokens=False)[0]  # the engine fills the placeholder in
    logits = make_logits(1, len(tokenizer), "float32", 3)
    plugin.apply(logits)
    want = expected_mask({"policy": INLINE}, output, len(tokenizer), tokenizer)
    assert np.array_equal(np.flatnonzero(torch.isneginf(logits[0]).numpy()), want)


def test_invalid_config_that_skipped_validation_fails_closed(tokenizer):
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=tokenizer)
    plugin.update_state(BatchUpdate(1, [], [(0, SamplingParams({"safedecode": "no-such-policy"}), None, [])], []))
    logits = make_logits(1, len(tokenizer), "float32", 4)
    plugin.apply(logits)
    assert np.flatnonzero(~torch.isneginf(logits[0]).numpy()).tolist() == [tokenizer.eos_token_id]


def test_tokenizer_comes_from_the_vllm_config(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(tmp_path), tokenizer_revision=None,
                                                          trust_remote_code=False))
    plugin = SafeDecodeLogitsProcessor(config, "cpu", False)
    output = tokenizer.encode("hunter", add_special_tokens=False)
    plugin.update_state(BatchUpdate(1, [], [(0, SamplingParams({"safedecode": {"policy": INLINE}}), None, output)], []))
    logits = make_logits(1, len(tokenizer), "float32", 5)
    plugin.apply(logits)
    want = expected_mask({"policy": INLINE}, output, len(tokenizer), tokenizer)
    assert len(want) and np.array_equal(np.flatnonzero(torch.isneginf(logits[0]).numpy()), want)


# --- configuration --------------------------------------------------------------------------------


def test_interface_basics():
    plugin = SafeDecodeLogitsProcessor(None, "cpu", False, tokenizer=object())
    assert plugin.is_argmax_invariant() is False
    assert plugin.needs_output_token_ids() is False
    plugin.update_state(None)
    logits = torch.randn(2, 5)
    assert torch.equal(plugin.apply(logits.clone()), logits)  # nothing guarded: untouched, no tokenizer needed


@pytest.mark.parametrize("extra_args", [
    None, {}, {"other": 1},
    {"safedecode": "secrets"}, {"safedecode": "secrets.toml"}, {"safedecode": {"policy": "shell"}},
    {"safedecode": {"policy": INLINE}}, {"safedecode": {"policy": json.dumps(INLINE)}},
    {"safedecode": json.dumps({"policy": INLINE})}, {"safedecode": json.dumps({"policy": "secrets"})},
    {"safedecode_policy": "secrets"}, {"safedecode_policy": json.dumps(INLINE)},
    {"safedecode": {"policy": ["secrets", INLINE]}},
])
def test_validate_params_accepts(extra_args):
    SafeDecodeLogitsProcessor.validate_params(SamplingParams(extra_args))


@pytest.mark.parametrize("extra_args, expected", [
    ({"safedecode": "secrets"}, ["secrets"]),
    ({"safedecode_policy": "secrets"}, ["secrets"]),  # the flat vllm_xargs key is honoured, never ignored
    ({"safedecode": {"policy": "shell"}, "safedecode_policy": "secrets"}, ["shell", "secrets"]),  # they add up
])
def test_every_wire_form_gives_the_rules_it_asked_for(extra_args, expected):
    policy = request_policy(extra_args)
    assert policy.rule_ids() == [i for name in expected for i in load_policy(name).rule_ids()]


@pytest.mark.parametrize("extra_args, message", [
    ({"safedecode": "no-such-policy"}, "unknown policy name 'no-such-policy'; known: control-tokens"),
    ({"safedecode": "../grammars/secrets"}, "unknown policy name '../grammars/secrets'"),
    ({"safedecode": "/etc/passwd"}, "unknown policy name '/etc/passwd'"),
    ({"safedecode": {"polcy": "secrets"}}, "unknown key 'polcy' (did you mean 'policy'?)"),
    ({"safedecode": {"forbid": [{"literal": "x"}]}}, "an inline policy goes under 'policy'"),
    ({"safedecode": None}, "expected an object"),
    ({"safedecode": 3}, "expected an object"),
    ({"safedecode": '{"policy": '}, "not valid JSON"),
    ({"safedecode": ["secrets"]}, "expected an object"),
    ({"safedecode": {"policy": 7}}, "policy"),
    ({"safedecode": {"policy": {"forbid": [{"regex": "(?=x)y"}]}}}, "lookahead (?=...) is not supported"),
    ({"safedecode": {"policy": {"forbid": [{"regex": "a*"}]}}}, "can match the empty string"),
    ({"safedecode": {"policy": {"forbid": [{"literl": "x"}]}}}, "unknown key 'literl' (did you mean 'literal'?)"),
    ({"safedecode": {"policy": {"forbid": "x"}}}, "'forbid' must be an array"),
    ({"safedecode": {"policy": '{"forbid": [{"literal": ""}]}'}}, "must not be empty"),
    ({"safedecode": {"policy": "{" + " " * (1 << 20) + "}"}}, "the limit is"),
    ({"safedecode": {"policy": {"forbid": [{"literal": "a"}] * 1001}}}, "rules; the limit is 1000"),
    ({"safedecode_polcy": "secrets"}, "unknown key 'safedecode_polcy' (did you mean 'safedecode_policy'?)"),
    ({"safedecodex": "secrets"}, "unknown key 'safedecodex'"),
    ({"safedecode_allow_hosts": "a.com"}, "allow_hosts: part of the channel guard; send them with a 'guard'"),
    ({"safedecode": {"policy": "secrets", "report": True}}, "report: not supported by the vLLM plugin"),
])
def test_validate_params_refuses_naming_the_problem(extra_args, message):
    with pytest.raises(ValueError) as info:
        SafeDecodeLogitsProcessor.validate_params(SamplingParams(extra_args))
    assert str(info.value).startswith("extra_args: ")
    assert message in str(info.value)


@pytest.mark.parametrize("extra_args", [{"safedecode": {"policy": "secrets"}}, {"safedecode_policy": "secrets"},
                                        {"safedecode": {"response_format": {"type": "json_object"}}}])
def test_vllms_own_structured_outputs_with_a_safedecode_config_is_refused(extra_args):
    """vLLM's grammar would admit JSON escapes the raw-text rules cannot see: the combination is
    refused by name; vLLM's structured outputs alone, or safedecode alone, pass."""
    theirs = {"json": {"type": "object"}}
    with pytest.raises(ValueError) as info:
        SafeDecodeLogitsProcessor.validate_params(SamplingParams(extra_args, structured_outputs=theirs))
    assert str(info.value).startswith("extra_args: safedecode with vLLM's own structured_outputs")
    assert "response_format" in str(info.value)
    SafeDecodeLogitsProcessor.validate_params(SamplingParams(None, structured_outputs=theirs))
    SafeDecodeLogitsProcessor.validate_params(SamplingParams({"other_plugin": 1}, structured_outputs=theirs))
    SafeDecodeLogitsProcessor.validate_params(SamplingParams(extra_args))


# --- the device-mask helper -----------------------------------------------------------------------


def test_device_masks_equal_the_kernel_for_random_states(tokenizer):
    """DeviceMasks (any device: run here on CPU) writes the same bits as the numba kernels,
    including state -1 and the EOS restoration, and leaves rows it is not given alone."""
    parts = [compile_policy(resolve_policy(spec), tokenizer) for spec in (INLINE, "control-tokens")]
    compiled = combine(parts)  # three components
    n_states = [len(t["byte_state"]) for t in unpack_tables(compiled.blob)]
    rng = np.random.default_rng(0)
    width = len(tokenizer) + 7  # a model's padded vocabulary: ids past the tokenizer's
    masks = DeviceMasks("cpu", budget_bytes=1 << 20)  # small: eviction happens
    for trial in range(30):
        batch = int(rng.integers(1, 9))
        rows = sorted(rng.choice(batch, size=int(rng.integers(1, batch + 1)), replace=False).tolist())
        states = [tuple(int(rng.integers(-1, n)) if rng.random() < 0.9 else -1 for n in n_states) for _ in rows]
        logits = torch.randn(batch, width, generator=torch.Generator().manual_seed(trial))
        logits[rng.random(batch) < 0.5, tokenizer.eos_token_id] = float("-inf")  # "min_tokens"
        by_kernel, by_device = logits.clone(), logits.clone()
        mask_rows(by_kernel, rows, [compiled] * len(rows), states)
        masks.apply(by_device, rows, [compiled] * len(rows), states)
        assert torch.equal(by_kernel.view(torch.int32), by_device.view(torch.int32)), (trial, rows, states)
        for r in set(range(batch)) - set(rows):
            assert torch.equal(by_device[r], logits[r])
    assert masks._bytes <= masks.budget_bytes


def test_safe_logits_processor_device_branch_equals_the_cpu_kernel(tokenizer):
    """SafeLogitsProcessor on logits the kernel cannot view (here: strided CPU) masks through its
    fallback path; the masks must equal the in-place kernel's."""
    from safedecode.adapters.processor import SafeLogitsProcessor

    compiled = compile_policy(resolve_policy(INLINE), tokenizer)
    fast, device = SafeLogitsProcessor(compiled), SafeLogitsProcessor(compiled)
    text = tokenizer.encode("say hunter and ab", add_special_tokens=False)
    ids = torch.tensor([[5, 6, 7], [5, 6, 8]])
    for step, token in enumerate(text):
        ids = torch.cat([ids, torch.tensor([[token], [text[-1 - step]]])], dim=1)
        scores = make_logits(2, len(tokenizer), "strided", step)
        expected = fast(ids, scores.contiguous())
        got = device(ids, scores)
        assert torch.equal(torch.isneginf(expected), torch.isneginf(got))
    assert fast.states == device.states
