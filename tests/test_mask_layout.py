"""The mask layouts (tokens/token_automaton.choose_layouts): every state's mask is bit for bit what the
reference layout built by ``build_token_automaton`` gives — mostly-forbidden states of structured
outputs stored by their allowed ranks (the kernel fills the row and puts the allowed ids back),
others by their own forbidden ranges or against a reference — and what a walk of every token's bytes
through the DFA gives (``engine.verify``), on several components masked into one row, on padded and
short rows, in every logits dtype, with the EOS rule."""
import numpy as np
import pytest
import torch

import safedecode
from safedecode import Policy, compile_policy
from safedecode.channels.output_types import output_type
from safedecode.engine import kernels
from safedecode.engine.compiled import _trie_and_bytes, combine
from safedecode.engine.device_mask import mask_rows
from safedecode.engine.verify import verify
from safedecode.policy.automaton import compile_components
from safedecode.tokens.token_automaton import COMPLEMENT, NO_REFERENCE, build_token_automaton
from safedecode.tokens.vocabulary import vocabulary_of

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                   "country": {"type": "string", "enum": ["US", "GB", "DE"]},
                   "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["name", "age", "country", "postal_code"], "additionalProperties": False,
}
TAGS = {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": ["bug", "question"]}}


@pytest.fixture(scope="module")
def policies():
    secrets = safedecode.load_policy("secrets")
    return {
        "person": output_type(PERSON).policy(None),
        "person+secrets": output_type(PERSON).policy(secrets),
        "secrets": secrets,
        "tags": output_type(TAGS).policy(None),
    }


@pytest.fixture(scope="module")
def compiled(policies, smollm2_tokenizer):
    return {name: compile_policy(p, smollm2_tokenizer, cache_dir=False) for name, p in policies.items()}


def _reference_layouts(policy, tokenizer):
    """Each component's tables in the layout built by ``build_token_automaton`` (before
    ``choose_layouts``): every state against a reference."""
    vocabulary = vocabulary_of(tokenizer)
    trie, _ = _trie_and_bytes(vocabulary)
    return [build_token_automaton(dfa, trie) for dfa, _ in compile_components(policy)]


def _ranges_mask(lo, hi, n):
    d = np.zeros(n + 1, np.int64)
    np.add.at(d, lo, 1)
    np.add.at(d, hi, -1)
    return np.cumsum(d[:n]) > 0


def _reference_forbidden(t, shared, state, width):
    """What the kernel wrote before the layouts: forb(q) ∪ (forbidden(ref(q)) − override(q)), the
    static special ids, EOS inside a block; all but EOS in a stopped state."""
    eos = shared["eos_ids"]
    if state < 0:
        out = np.ones(width, bool)
        out[eos[eos < width]] = False
        return out
    n_ranks = len(shared["rank_to_id"])
    ref = t["state_ref"][state]
    p = t["ref_forb_ptr"]
    ranks = _ranges_mask(t["ref_forb_lo"][p[ref]:p[ref + 1]], t["ref_forb_hi"][p[ref]:p[ref + 1]], n_ranks)
    ranks[t["override"][t["override_ptr"][state]:t["override_ptr"][state + 1]]] = False
    f = t["forb_ptr"]
    ranks |= _ranges_mask(t["forb_lo"][f[state]:f[state + 1]], t["forb_hi"][f[state]:f[state + 1]], n_ranks)
    out = np.zeros(width, bool)
    ids = shared["rank_to_id"][ranks]
    out[ids[ids < width]] = True
    static = shared["static_forbidden"]
    out[static[static < width]] = True
    if shared["eos_blocked"][state]:
        out[eos[eos < width]] = True
    return out


def _kernel_forbidden(blob, component, state, width):
    row = np.zeros(width, np.int32)
    kernels.mask_row(blob, component, state, row, np.int32(-1))
    return row == -1


@pytest.mark.parametrize("name", ["person", "person+secrets", "secrets", "tags"])
def test_every_state_masks_as_the_reference_layout(name, policies, compiled, smollm2_tokenizer):
    policy, c = policies[name], compiled[name]
    vocab = c.vocab_size
    reference = _reference_layouts(policy, smollm2_tokenizer)
    tables = kernels.unpack_tables(c.blob)
    assert len(reference) == len(tables)
    layouts = set()
    for k, (t, new) in enumerate(zip(reference, tables)):
        n_states = len(t["byte_state"])
        assert np.array_equal(np.asarray(new["byte_state"]), t["byte_state"])
        layouts.update(np.sign(np.asarray(new["state_ref"])).tolist())
        shared = {key: np.asarray(new[key]) for key in ("rank_to_id", "eos_ids", "static_forbidden", "eos_blocked")}
        rng = np.random.default_rng(k)
        for state in [-1, *range(n_states)]:
            # the vocabulary's width, every state; a padded and a short row for some
            widths = [vocab] + ([vocab + 67, vocab - 300] if rng.random() < 0.1 or state < 1 else [])
            for width in widths:
                got = _kernel_forbidden(c.blob, k, state, width)
                want = _reference_forbidden(t, shared, state, width)
                if not np.array_equal(got, want):
                    bad = np.flatnonzero(got != want)
                    pytest.fail(f"{name} component {k} state {state} width {width}: {len(bad)} ids differ, "
                                f"e.g. {bad[:5]} (kernel masks {got[bad[:5]]})")
    if name.startswith("person") or name == "tags":
        assert any(COMPLEMENT in np.asarray(t["state_ref"]) for t in tables) and c.stats["complement_states"] > 0
        assert -1 in layouts  # COMPLEMENT and NO_REFERENCE (sign -1)
    if name == "secrets":  # phrase-like rules keep states against a reference
        assert 0 in layouts or 1 in layouts


def test_structured_tables_are_small(compiled):
    """The states of a JSON document rule no longer store tens of thousands of overrides each."""
    assert compiled["person"].blob.nbytes < 10e6, compiled["person"].stats
    assert compiled["tags"].blob.nbytes < 5e6, compiled["tags"].stats
    for c in compiled.values():
        assert c.stats["overrides"] < 1e6


@pytest.mark.parametrize("name", ["person", "tags"])
def test_verify_walks_every_token_of_every_state(name, policies, compiled, smollm2_tokenizer):
    """The independent oracle: each token's bytes walked through the DFA from every reachable state."""
    certificate = verify(policies[name], smollm2_tokenizer, compiled=compiled[name])
    assert certificate["verified"] and certificate["states_checked"] > 20


def _all_states(c):
    return [len(t["byte_state"]) for t in kernels.unpack_tables(c.blob)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("extra", [0, 128, -500])
def test_several_components_in_one_row_every_dtype(dtype, extra, compiled, smollm2_tokenizer):
    """A row masked by every component (complement layouts among them, in any order) is the union of
    their forbidden sets; unmasked entries keep their exact bits; the EOS rule as the kernels apply
    it (the first EOS back when nothing is left)."""
    phrases = compile_policy(Policy(forbid=[{"literal": "hello"}, {"regex": "[0-9]{3}-[0-9]{2}"}],
                                        special_tokens="forbid"),
                             smollm2_tokenizer, cache_dir=False)
    both = [combine([compiled["person+secrets"], phrases]), combine([phrases, compiled["tags"], compiled["person"]])]
    width = compiled["person"].vocab_size + extra
    rng = np.random.default_rng(7)
    for c in both:
        n_states = _all_states(c)
        states = [tuple(int(rng.integers(-1 if rng.random() < 0.05 else 0, n)) for n in n_states) for _ in range(24)]
        states[0] = (0,) * len(n_states)
        logits = torch.from_numpy(rng.normal(size=(len(states), width)).astype(np.float32) * 4).to(dtype)
        original = logits.clone()
        mask_rows(logits, list(range(len(states))), [c] * len(states), states)
        for i, state in enumerate(states):
            want = np.zeros(width, bool)
            for k, s in enumerate(state):
                want |= _kernel_forbidden(c.blob, k, s, width)
            eos = [e for e in c.eos_ids if e < width]
            if eos and want.all():
                want[eos[0]] = False  # the one EOS rule
                assert logits[i, eos[0]].item() == 0.0
                keep = np.ones(width, bool)
                keep[eos[0]] = False
            else:
                keep = np.ones(width, bool)
            got = torch.isneginf(logits[i]).numpy()
            assert np.array_equal(got & keep, want & keep), (i, state, np.flatnonzero((got != want) & keep)[:5])
            same = ~want & keep
            assert torch.equal(logits[i][torch.from_numpy(same)].view(-1), original[i][torch.from_numpy(same)].view(-1))


def test_a_complement_state_keeps_what_another_component_masked(compiled, smollm2_tokenizer):
    """Component order does not matter: a complement fill never unmasks an id masked before it."""
    phrases = compile_policy(Policy(forbid=[{"literal": '{"'}], special_tokens="forbid"), smollm2_tokenizer,
                             cache_dir=False)
    for parts in ([phrases, compiled["person"]], [compiled["person"], phrases]):
        c = combine(parts)
        ks = [k for k, t in enumerate(kernels.unpack_tables(c.blob)) if np.asarray(t["state_ref"])[0] == COMPLEMENT]
        assert ks, "the JSON start state is stored by its allowed ranks"
        row = np.zeros(c.vocab_size, np.int32)
        for k in range(c.n_components):
            kernels.mask_row(c.blob, k, 0, row, np.int32(-1))
        want = np.zeros(c.vocab_size, bool)
        for k in range(c.n_components):
            want |= _kernel_forbidden(c.blob, k, 0, c.vocab_size)
        assert np.array_equal(row == -1, want)
        assert c.forbidden_ids(c.start_state).tolist() == np.flatnonzero(want).tolist()
        brace = smollm2_tokenizer.convert_tokens_to_ids("{")
        assert not want[brace]  # '{' alone still allowed; '{"' as one token is not
        assert want[smollm2_tokenizer.convert_tokens_to_ids('{"')]


def test_layout_codes():
    assert kernels.COMPLEMENT == COMPLEMENT and kernels.NO_REFERENCE == NO_REFERENCE
