"""Row recognition on long contexts: every row's mask is the mask of its own history.

``GuideBatch`` no longer compares whole rows with the previous call's (O(batch x length) per step);
it reads each row at O(batch) positions (kernels.guard_step / _find_parents). These tests drive it
like ``generate`` does — greedy, beam search (rows reordered and duplicated), left padding, new
generations and processor reuse — on prompts of thousands of ids, and check at every step, for every
row, against an independent recomputation from that row's own generated ids (which the driver, not
the guard, knows): the state (``CompiledPolicy.walk`` from scratch) and the exact set of masked ids
(``CompiledPolicy.forbidden_ids`` of that state), and in places the ``regex`` oracle on the text.

The adversarial cases: rows that share their last ids (beyond the recognition windows) but differ
far back; rows whose prompts differ at one position far back; equal rows; a new generation of the
same shape; reuse with ``reset()`` where the new prompt is a one-token extension of the old rows.
No timing here: speed is benchmarks/scale.py's (--context-only).
"""
import numpy as np
import pytest
import torch

from safedecode import Policy, SafeLogitsProcessor, find_violations
from safedecode.engine import kernels

POLICY = Policy(forbid=[
    {"regex": r"START[ a-z]*END", "id": "start-end"},  # its state remembers a START far back
    {"regex": r"\AParis", "id": "starts-with-paris"},  # differs between the start and any later state
    {"literal": "berlin", "id": "berlin"},
])
PROMPT_LENGTH = 3000


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    tok = smollm2_tokenizer
    guard = SafeLogitsProcessor(POLICY, tok)

    def one(text):
        ids = tok.encode(text, add_special_tokens=False)
        return ids

    pieces = {name: one(text) for name, text in
              [("begin", " BEGIN"), ("start", " START"), ("x", " x"), ("end", " END"), ("paris", "Paris"),
               ("ber", " ber"), ("lin", "lin"), ("the", " The")]}
    rng = np.random.default_rng(5)
    words = [i for i in tok.encode(" the quick brown fox jumps over a lazy dog and then some more words",
                                   add_special_tokens=False)]
    prompt = [int(w) for w in rng.choice(words, PROMPT_LENGTH)]
    return tok, guard, pieces, prompt


class Run:
    """A simulated ``generate``: rows are ``prompt + generated``; every call checks every row."""

    def __init__(self, guard, prompts, vocab):
        self.guard, self.vocab = guard, vocab
        self.prompt_length = len(prompts[0])
        assert all(len(p) == self.prompt_length for p in prompts)
        self.rows = [list(p) for p in prompts]
        self.call()

    def call(self):
        """One processor call; every row's state and mask against its own history (and the prompt
        length: a new generation mid-run, or a continuation taken for a new one, fails here)."""
        ids = torch.tensor(self.rows, dtype=torch.long)
        scores = torch.zeros((len(self.rows), self.vocab))
        self.guard(ids, scores)
        compiled = self.guard.compiled
        self.masks = []
        for r, row in enumerate(self.rows):
            generated = row[self.prompt_length:]
            expected = compiled.walk(generated)
            assert self.guard.states[r] == expected, f"row {r}: state of another history"
            actual = np.flatnonzero(torch.isneginf(scores[r]).numpy())
            assert np.array_equal(actual, compiled.forbidden_ids(expected, self.vocab)), f"row {r}: mask"
            self.masks.append(set(actual.tolist()))
        assert self.guard.prompt_length == self.prompt_length
        assert self.guard.batch.rows == len(self.rows)

    def step(self, parents, tokens):
        """Row ``i`` becomes row ``parents[i]`` + ``tokens[i]``; then the guard is called."""
        self.rows = [self.rows[p] + [int(t)] for p, t in zip(parents, tokens)]
        self.call()

    def extend(self, token_lists):
        """Each row appends its own list of ids (rows keep their places), one call per id."""
        for j in range(max(len(t) for t in token_lists)):
            self.step(range(len(self.rows)), [t[min(j, len(t) - 1)] for t in token_lists])


def test_rows_sharing_a_long_suffix_swap_places(setup):
    """Two beams differ only in their first generated word (BEGIN / START), then share 40 ids — far
    more than the recognition windows; beam search swaps and duplicates them. Only a START row may
    not say END, wherever it sits."""
    tok, guard, p, prompt = setup
    guard.reset()
    run = Run(guard, [prompt, prompt], len(tok))
    run.extend([p["begin"], p["start"]])
    run.extend([p["x"] * 40, p["x"] * 40])
    end = p["end"][0]
    for parents in ([1, 0], [0, 0], [1, 1], [1, 0], [0, 1]):
        before = [run.rows[q] for q in parents]
        run.step(parents, [p["x"][0]] * 2)
        for r, history in enumerate(before):
            inside = "START" in tok.decode(history[len(prompt):])
            assert (end in run.masks[r]) == inside, f"parents {parents}: row {r}"


def test_prompts_that_differ_far_back_and_left_padding(setup):
    """Three batch items x two beams: item B's prompt differs from A's at position 5 only, item C is
    left-padded. Beams are reordered across the rows of an item; each item's rows must keep their
    own history (item C generates BEGIN, the others START: only they may not say END)."""
    tok, guard, p, prompt = setup
    guard.reset()
    a = list(prompt)
    b = list(prompt)
    b[5] = tok.encode(" zebra", add_special_tokens=False)[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    c = [pad] * 700 + prompt[700:]
    run = Run(guard, [a, a, b, b, c, c], len(tok))
    run.extend([p["start"], p["start"], p["start"], p["start"], p["begin"], p["begin"]])
    rng = np.random.default_rng(0)
    for step in range(30):
        parents = [int(rng.integers(0, 2)) + 2 * (r // 2) for r in range(6)]  # within each item
        run.step(parents, [p["x"][0]] * 6)
    end = p["end"][0]
    assert [end in m for m in run.masks] == [True, True, True, True, False, False]
    # Now across items too (not what generate does, but a permutation of rows of equal length):
    # rows of A and B have equal last 31+ ids and differ only at position 5.
    for parents in ([2, 3, 0, 1, 4, 5], [0, 2, 1, 3, 5, 4], [4, 1, 2, 3, 0, 5]):
        run.step(parents, [p["x"][0]] * 6)


@pytest.mark.parametrize("seed", range(4))
def test_random_beam_search_over_few_ids(setup, seed):
    """Random parents (with duplicates), ids from a handful of words so that rows keep colliding on
    their last ids and on long suffixes; 6 rows, 80 steps, each checked against its own history."""
    tok, guard, p, prompt = setup
    guard.reset()
    rng = np.random.default_rng(seed)
    alphabet = [p["x"][0], p["x"][0], p["x"][0], p["begin"][0], p["start"][0], p["end"][0], p["ber"][0],
                p["lin"][0], p["paris"][0]]
    rows = 6
    run = Run(guard, [prompt] * rows, len(tok))
    for step in range(80):
        parents = sorted(int(x) for x in rng.integers(0, rows, rows)) if rng.random() < 0.7 else \
            [int(x) for x in rng.permutation(rows)]
        if rng.random() < 0.5:
            tokens = [int(rng.choice(alphabet))] * rows  # every row gets the same id
        else:
            tokens = [int(rng.choice(alphabet)) for _ in range(rows)]
        # A beam never takes a masked id (the guard's own mask of its parent).
        tokens = [t if t not in run.masks[q] else p["x"][0] for q, t in zip(parents, tokens)]
        run.step(parents, tokens)
    for row in run.rows:  # and the texts themselves, by the regex oracle
        assert find_violations(POLICY, tok.decode(row[len(prompt):])) == []


def test_new_generation_of_the_same_shape_is_detected(setup):
    """Without reset: a new prompt of one more column with the old rows' first and last ids, whose
    ids before those differ from the old rows' (a new chat turn ends with a header), starts over (``Run``
    checks every row is back at the start state); so does a prompt as long as the previous rows
    (the same shape), and one of another batch size."""
    tok, guard, p, prompt = setup
    guard.reset()
    run = Run(guard, [prompt, prompt], len(tok))
    run.extend([p["start"] + p["x"] * 3] * 2)  # equal rows: no pair position to read, only the windows
    length = len(run.rows[0])
    header = tok.encode(" and the assistant says:", add_special_tokens=False) + p["x"] + p["the"]
    fresh = (prompt * 2)[:length + 1 - len(header)] + header  # the old rows' last id, then one more
    assert len(fresh) == length + 1 and fresh[0] == run.rows[0][0] and fresh[-2] == run.rows[0][-1]
    again = Run(guard, [fresh, fresh], len(tok))
    paris = tok.encode("Paris", add_special_tokens=False)[0]
    assert paris in again.masks[0]  # the anchored rule applies again: this is a start
    again.extend([p["begin"], p["begin"]])
    # The same shape and the same prompts is a continuation (assisted decoding goes back to the
    # accepted tokens): the prompt boundary stays, the states are those of the ids after it.
    rows = [again.rows[0], again.rows[1][:-1] + [p["x"][0]]]
    guard(torch.tensor(rows, dtype=torch.long), torch.zeros((2, len(tok))))
    assert guard.prompt_length == again.prompt_length
    assert guard.states == [guard.compiled.walk(row[again.prompt_length:]) for row in rows]
    Run(guard, [fresh, fresh, fresh], len(tok))  # another batch size


def test_reuse_with_reset_when_the_new_prompt_extends_the_old_rows(setup):
    """The case no recognition can tell apart (tests/test_processor_reuse.py, on a long prompt, with
    beams): the new prompt is an old row plus one id. After reset() it is a prompt: 'Paris' may not
    start the output."""
    tok, guard, p, prompt = setup
    guard.reset()
    run = Run(guard, [prompt, prompt], len(tok))
    run.extend([p["start"], p["begin"]])
    run.step([1, 0], [p["x"][0]] * 2)
    guard.reset()
    rows = [row + [p["the"][0]] for row in run.rows]
    again = Run(guard, rows, len(tok))  # checks: a new generation, prompt = the whole rows
    paris = tok.encode("Paris", add_special_tokens=False)[0]
    assert all(paris in m for m in again.masks)


def test_a_stopped_row_stays_stopped_whichever_equal_row_it_extends(setup):
    """Beams equal id for id are interchangeable, except that one may have been stopped (telemetry's
    early stop): every row extending an equal row then fails closed (only EOS left)."""
    tok, guard, p, prompt = setup
    guard.reset()
    run = Run(guard, [prompt, prompt, prompt], len(tok))
    run.extend([p["x"] * 2, p["x"] * 2, p["start"] * 2])
    guard.batch.stop(1)  # rows 0 and 1 are equal
    ids = torch.tensor([run.rows[0] + [p["x"][0]], run.rows[1] + [p["x"][0]], run.rows[2] + [p["x"][0]]])
    scores = torch.zeros((3, len(tok)))
    guard(ids, scores)
    stopped = [all(s == kernels.VIOLATED for s in state) for state in guard.states]
    assert stopped == [True, True, False]
    alive = torch.nonzero(~torch.isneginf(scores[0])).flatten().tolist()
    assert alive and all(i in guard.compiled.eos_ids for i in alive)


def test_degenerate_shapes(setup):
    """No ids at all, a single id, no rows: each is a prompt (new generation), nothing read out of
    bounds (the kernels run without bounds checks); then generation continues normally."""
    tok, guard, p, prompt = setup
    guard.reset()
    for ids in ([[], []], [[5], [5]], [[6, 7, 9], [6, 7, 9]]):  # never one more column: all prompts
        scores = torch.zeros((len(ids), len(tok)))
        guard(torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1), scores)
        assert guard.prompt_length == len(ids[0]) and guard.states == [guard.compiled.start_state] * 2
    guard(torch.tensor([[6, 7, 9, 11, 12]] * 2), torch.zeros((2, len(tok))))  # a jump that extends them
    assert guard.prompt_length == 3 and guard.states == [guard.compiled.walk([11, 12])] * 2
    guard(torch.zeros((0, 4), dtype=torch.long), torch.zeros((0, len(tok))))
    run = Run(guard, [prompt[:3], prompt[:3]], len(tok))
    run.extend([p["start"] + p["x"] * 10, p["begin"] + p["x"] * 10])


@pytest.mark.model
def test_real_beam_search_on_a_long_prompt(smollm2_model):
    """transformers' own beam search (3 beams, 2 prompts of ~600 ids, left padding; the simulated runs above use 3,000): each row's mask
    equals the mask of that row's generated ids, recomputed from scratch, at every step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tok = smollm2_model
    guard = SafeLogitsProcessor(Policy(forbid=[{"literal": "Paris"}, {"regex": r"\d{2}"}]), tok)

    class Checker(LogitsProcessor):
        steps = 0

        def __call__(self, input_ids, scores):
            start = guard.prompt_length
            for r in range(input_ids.shape[0]):
                expected = guard.compiled.walk(input_ids[r, start:].tolist())
                assert guard.states[r] == expected
                actual = np.flatnonzero(torch.isneginf(scores[r]).numpy())
                assert np.array_equal(actual, guard.compiled.forbidden_ids(expected, scores.shape[-1]))
            Checker.steps += 1
            return scores

    filler = " ".join(["The city council met on Tuesday to discuss the budget for 12 new parks."] * 35)
    prompts = [tok.apply_chat_template([{"role": "user", "content": filler + f" Question {k}: name the capital of "
                                         f"France and count to 30."}], tokenize=False, add_generation_prompt=True)
               for k in range(2)]
    prompts[1] = prompts[1].replace("Tuesday", "Monday", 1)  # the two prompts differ far back only
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["input_ids"].shape[1] > 500
    out = model.generate(**enc, logits_processor=LogitsProcessorList([guard, Checker()]), num_beams=3,
                         num_return_sequences=3, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert Checker.steps > 1
    for text in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True):
        assert "Paris" not in text
