"""The device-side token automaton (:mod:`safedecode.engine.device_automaton`) against the numba
kernels, on CPU tensors: random walks over real compiled policies check ``advance`` against
``CompiledPolicy.next_state`` step by step (ids outside the vocabulary, violated rows included) and
``mask`` against ``device_mask.mask_rows`` on the numba path bit for bit (padded and short widths,
EOS inside a block, EOS restoration of stuck rows, rows not passed or inactive untouched). The step
must do no host read: it runs on the ``meta`` device and under ``torch.compile(fullgraph=True)``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safedecode import Policy, compile_policy
from safedecode.engine import kernels
from safedecode.engine.compiled import compile_parts
from safedecode.engine.device_automaton import (
    DeviceAutomaton,
    DeviceAutomatonTooLargeError,
    device_automaton,
)
from safedecode.engine.device_mask import mask_rows
from safedecode.policy.rules import load_policy

BLOCK = {"id": "call", "open": "<call>", "body": r'\{"n": (?:0|[1-9][0-9]{0,2})\}', "close": "</call>"}
INLINE = Policy(forbid=[{"literal": "hunter2"}, {"regex": "ab+c"}, {"regex": "sk-[A-Za-z0-9]{6,}"}, BLOCK],
                special_tokens="forbid")
WORDS = ["hunter2", "hunter", "abbbc", "ab", "c", "sk-", "abc123XYZ", "<call>", '{"n": ', "12", "}", "</call>",
         " the", " key", "AKIA", "IOSFODNN7EXAMPLE", "ghp_", "-----BEGIN RSA PRIVATE KEY-----", "\n", "x"]


@pytest.fixture(scope="module")
def policies(smollm2_tokenizer, sentencepiece_tokenizer):
    """``name -> (compiled, tokenizer)``: secrets.toml (7 components), an inline policy with a block
    and forbidden special tokens, a policy combined from two parts, and another tokenizer family."""
    tok = smollm2_tokenizer
    return {
        "secrets": (compile_policy(load_policy("secrets"), tok), tok),
        "inline": (compile_policy(INLINE, tok), tok),
        "combined": (compile_parts([Policy(forbid=[{"literal": "hunter2"}]), load_policy("shell")], tok), tok),
        "sentencepiece": (compile_policy(Policy(forbid=[{"literal": "hunter2"}, {"regex": "ab+c"}]),
                                         sentencepiece_tokenizer), sentencepiece_tokenizer),
    }


def token_pool(compiled, tokenizer, rng) -> np.ndarray:
    """Ids that walk the policies into deep states, forbidden ids, EOS, special ids, random ids and
    ids outside the vocabulary (negative and too large)."""
    ids = [i for w in WORDS for i in tokenizer.encode(w, add_special_tokens=False)]
    vocab = compiled.vocab_size
    ids += list(compiled.eos_ids) + sorted(compiled.vocabulary.special_ids)[:4]
    ids += rng.integers(0, vocab, 20).tolist() + [-1, -7, vocab, vocab + 5, 2**40]
    return np.array(ids, np.int64)


def oracle_mask(compiled, logits, rows, states):
    """The numba path: ``mask_rows`` on contiguous CPU logits (float32/16 via their memory)."""
    out = logits.clone()
    mask_rows(out, rows, [compiled] * len(rows), [tuple(s) for s in states])
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def walk_and_compare(compiled, tokenizer, automaton, pool, rng, *, batch=6, steps=40, dtype=torch.float32):
    vocab = compiled.vocab_size
    k = compiled.n_components
    states = np.zeros((batch, k), np.int64)
    device_states = automaton.start_states(batch)
    seen = {"violated": 0, "restored": 0, "eos_blocked": 0}
    queues = [[] for _ in range(batch)]
    for step in range(steps):
        # Whole words (deep states: inside a block, a counter), single ids of the pool, sometimes a
        # forbidden id of the row's state; a violated row sometimes starts a new output.
        tokens = rng.choice(pool, batch)
        for i in range(batch):
            if (states[i] < 0).any() and rng.random() < 0.2:
                states[i] = 0
                device_states[i] = 0
            if not queues[i] and rng.random() < 0.5:
                queues[i] = tokenizer.encode(str(rng.choice(WORDS)), add_special_tokens=False)
            if queues[i]:
                tokens[i] = queues[i].pop(0)
            if rng.random() < 0.08 and (states[i] >= 0).all():
                forbidden = compiled.forbidden_ids(tuple(states[i]))
                forbidden = forbidden[~np.isin(forbidden, compiled.eos_ids)]
                if len(forbidden):
                    tokens[i] = rng.choice(forbidden)
        expected = np.array([compiled.next_state(tuple(int(s) for s in row), int(t)) for row, t in zip(states, tokens)],
                            np.int64).reshape(batch, k)
        device_states = automaton.advance(device_states, torch.from_numpy(tokens))
        assert device_states.dtype == torch.int64
        assert np.array_equal(device_states.numpy(), expected), (step, tokens.tolist())
        states = expected
        if rng.random() < 0.05:  # a caller's stop: every component violated
            states[0] = kernels.VIOLATED
            device_states[0] = kernels.VIOLATED
        seen["violated"] += int((states < 0).any(axis=1).sum())

        width = int(rng.choice([vocab, vocab + 13, vocab - 3]))
        n_rows = batch + 2  # two rows never passed: must stay untouched
        logits = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(step)).to(dtype)
        logits[logits > 2.0] = float("-inf")  # another processor's -inf
        rows = rng.permutation(n_rows)[:batch]
        for i in range(batch):  # some rows are left with nothing but forbidden ids: EOS comes back
            if rng.random() < 0.2:
                forbidden = compiled.forbidden_ids(tuple(int(s) for s in states[i]), width)
                logits[rows[i]] = float("-inf")
                logits[rows[i], torch.from_numpy(forbidden[:5])] = 1.0
            state = tuple(int(s) for s in states[i])
            seen["eos_blocked"] += min(state) >= 0 and compiled.eos_ids[0] in compiled.forbidden_ids(state)
        want = oracle_mask(compiled, logits, rows.tolist(), states.tolist())
        got = logits.clone()
        automaton.mask(got, torch.from_numpy(rows), device_states)
        assert torch.equal(bits(got), bits(want)), step
        eos = compiled.eos_ids[0]
        seen["restored"] += sum(bool(torch.isneginf(logits[r, eos]) and want[r, eos] == 0) for r in rows)
    return seen


@pytest.mark.parametrize("name", ["secrets", "inline", "combined", "sentencepiece"])
def test_advance_and_mask_agree_with_the_kernels_on_random_walks(policies, name):
    compiled, tokenizer = policies[name]
    rng = np.random.default_rng(sorted(policies).index(name))
    automaton = DeviceAutomaton(compiled, "cpu")
    assert automaton.mask_layout == "dense"
    pool = token_pool(compiled, tokenizer, rng)
    seen = {"violated": 0, "restored": 0, "eos_blocked": 0}
    for _ in range(3):
        for key, value in walk_and_compare(compiled, tokenizer, automaton, pool, rng).items():
            seen[key] += value
    assert seen["violated"] > 0 and seen["restored"] > 0, seen  # the walks reached the interesting cases
    if name == "inline":
        assert seen["eos_blocked"] > 0, seen


@pytest.mark.parametrize("layout", ["bits", "ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_mask_layout_and_half_precision_agree(policies, layout, dtype):
    compiled, tokenizer = policies["inline"]
    rng = np.random.default_rng(7)
    automaton = DeviceAutomaton(compiled, "cpu", mask_layout=layout)
    assert automaton.mask_layout == layout
    walk_and_compare(compiled, tokenizer, automaton, token_pool(compiled, tokenizer, rng), rng, steps=25, dtype=dtype)


def test_every_state_and_every_token_of_a_small_policy(policies):
    """Exhaustive on the inline policy: every (state, token) destination, every state's mask."""
    compiled, _ = policies["inline"]
    automaton = DeviceAutomaton(compiled, "cpu", mask_layout="ids")
    vocab = compiled.vocab_size
    tokens = torch.arange(-2, vocab + 2)
    for k, tables in enumerate(kernels.unpack_tables(compiled.blob)):
        for q in range(len(tables["byte_state"])):
            states = torch.zeros(len(tokens), compiled.n_components, dtype=torch.int64)
            states[:, k] = q
            got = automaton.advance(states, tokens)[:, k].numpy()
            want = np.array([kernels.next_state(compiled.blob, k, q, int(t)) for t in tokens.tolist()])
            assert np.array_equal(got, want), (k, q)
            state = [0] * compiled.n_components
            state[k] = q
            mask = automaton.forbidden(torch.tensor([state]), vocab)[0]
            assert np.array_equal(np.flatnonzero(mask.numpy()), compiled.forbidden_ids(tuple(state))), (k, q)


def test_active_rows_only(policies):
    compiled, _ = policies["inline"]
    automaton = device_automaton(compiled, "cpu")
    assert device_automaton(compiled, "cpu") is automaton
    logits = torch.full((3, compiled.vocab_size), float("-inf"))
    before = logits.clone()
    states = torch.full((3, compiled.n_components), kernels.VIOLATED, dtype=torch.int64)
    automaton.mask(logits, torch.arange(3), states, torch.tensor([True, False, True]))
    eos = compiled.eos_ids[0]
    assert torch.equal(logits[1], before[1])  # inactive: not even EOS restored
    for r in (0, 2):  # stuck rows get their first EOS back, nothing else changes
        assert logits[r, eos] == 0 and torch.isneginf(torch.cat([logits[r, :eos], logits[r, eos + 1:]])).all()


def test_over_budget_is_a_clear_error(policies):
    compiled, _ = policies["inline"]
    with pytest.raises(DeviceAutomatonTooLargeError, match="over the budget"):
        DeviceAutomaton(compiled, "cpu", budget_bytes=1000)
    with pytest.raises(ValueError, match="mask_layout"):
        DeviceAutomaton(compiled, "cpu", mask_layout="sparse")


def step(automaton, states, tokens, logits, rows, active):
    states = automaton.advance(states, tokens)
    automaton.mask(logits, rows, states, active)
    return states


@pytest.mark.parametrize("layout", ["dense", "bits", "ids"])
def test_the_step_never_reads_the_device(policies, layout):
    """On the ``meta`` device tensors have no data: ``.item()``, ``.tolist()``, ``bool(t)`` and
    ``.cpu()`` of one raise, so a step that runs there reads nothing back."""
    compiled, _ = policies["inline"]
    with pytest.raises(Exception):
        torch.zeros(1, device="meta").item()  # the premise of the test
    automaton = DeviceAutomaton(compiled, "meta", mask_layout=layout)
    states = automaton.start_states(4)
    logits = torch.empty(5, compiled.vocab_size + 3, device="meta")
    out = step(automaton, states, torch.zeros(4, dtype=torch.int64, device="meta"), logits,
               torch.arange(4, device="meta"), torch.ones(4, dtype=torch.bool, device="meta"))
    assert out.shape == (4, compiled.n_components) and out.device.type == "meta"


def test_the_step_compiles_to_one_graph(policies):
    """``fullgraph=True`` refuses a graph break, which any host read (``.item()``, ``.tolist()``) is;
    the compiled step gives the eager result."""
    compiled, tokenizer = policies["inline"]
    automaton = DeviceAutomaton(compiled, "cpu")
    compiled_step = torch.compile(step, backend="eager", fullgraph=True)
    tokens = torch.tensor(tokenizer.encode("sk-abc123", add_special_tokens=False)[:4] + [0] * 4)[:4]
    states = automaton.start_states(4)
    logits = torch.randn(4, compiled.vocab_size)
    eager_logits = logits.clone()
    got = compiled_step(automaton, states, tokens, logits, torch.arange(4), torch.ones(4, dtype=torch.bool))
    want = step(automaton, states, tokens, eager_logits, torch.arange(4), torch.ones(4, dtype=torch.bool))
    assert torch.equal(got, want) and torch.equal(logits, eager_logits)
