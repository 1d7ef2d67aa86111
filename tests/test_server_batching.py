"""The embedded engine's batching (:class:`safedecode.server.worker.Batch`), in process: several
requests in one ``generate`` call, each with its own guard, options and stopping rules.

No cross-talk: every answer is judged by the ``regex`` oracle against its *own* request's policy
(each request forbids something different), carries only its own marker, and equals the answer
the same request gets alone (greedy decoding; seeded sampling). Rows end on their own (EOS, stop
string, ``max_tokens``, cancellation) and their job is answered at once while the others go on.
"""
from __future__ import annotations

import asyncio

import pytest

from safedecode import Policy, find_violations
from safedecode.server.worker import Batch, Engine

pytest.importorskip("fastapi")
from safedecode.server.app import Server  # noqa: E402
from safedecode.server.schemas import ChatRequest, CompletionRequest  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
MARKERS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@pytest.fixture(scope="module")
def server():
    from safedecode.models import load_default_model

    model, tokenizer = load_default_model()
    engine = Engine(model, tokenizer, max_queue=64, max_batch=16)
    yield Server(engine, MODEL)
    engine.close()


def _policy(i: int) -> dict:
    """Request i's own policy: the first letters of its marker, or a digit pair (different for each)."""
    return {"forbid": [{"literal": MARKERS[i][1:4]}, {"literal": str(10 + 7 * i)}]}


def _job(server, i: int, **options):
    """Request i: a completion or a chat (alternating), echoing its own marker, under its own policy."""
    options.setdefault("safedecode", {"policy": _policy(i)})
    body = dict(model=MODEL, max_tokens=options.pop("max_tokens", 10), temperature=options.pop("temperature", 0),
                **options)
    text = f"Repeat exactly, twice: {MARKERS[i]} {10 + 7 * i} {MARKERS[i]}"
    if i % 2:
        return server.prepare_chat(ChatRequest(messages=[{"role": "user", "content": text}], **body)).job
    return server.prepare_completion(CompletionRequest(prompt=text + "\n" + "Answer: " * (i % 3 + 1), **body)).job


def _run(server, jobs, log=None):
    """Run ``jobs`` as one batch; their outcomes, in order (``log`` gets each job's index as it is answered)."""
    done = {}

    def on_done(job, outcomes):
        done[id(job)] = outcomes
        if log is not None:
            log.append((jobs.index(job), sum(o.completion_tokens for o in done[id(job)])))

    Batch(server.engine, jobs, on_done).generate()
    return [done[id(job)] for job in jobs]


def test_a_batch_of_different_requests_has_no_cross_talk_and_matches_each_alone(server):
    alone = [_run(server, [_job(server, i)])[0][0] for i in range(8)]
    together = [outcomes[0] for outcomes in _run(server, [_job(server, i) for i in range(8)])]
    premise = _run(server, [_job(server, 0, safedecode={})])[0][0].text  # unguarded, it echoes its marker
    assert MARKERS[0][1:4] in premise or "10" in premise, premise
    for i, outcome in enumerate(together):
        assert not find_violations(Policy(**_policy(i)), outcome.text), (i, outcome.text)
        others = [m for k, m in enumerate(MARKERS) if k != i]
        assert not any(m in outcome.text for m in others), (i, outcome.text)
        assert outcome.prompt_tokens == alone[i].prompt_tokens
    assert [o.text for o in together] == [o.text for o in alone]
    assert len({o.text for o in together}) >= 6


def test_rows_end_on_their_own_and_their_job_is_answered_at_once(server):
    short = _job(server, 0, max_tokens=2)
    stopped = _job(server, 2, max_tokens=30, ignore_eos=True, stop=[" "])
    long = _job(server, 4, max_tokens=12, ignore_eos=True)
    log = []
    outcomes = _run(server, [long, short, stopped], log)
    assert [o[0].completion_tokens for o in outcomes][:2] == [12, 2]
    assert outcomes[1][0].finish_reason == "length" and outcomes[0][0].finish_reason == "length"
    assert outcomes[2][0].finish_reason == "stop" and " " not in outcomes[2][0].text
    assert log[-1][0] == 0 and [i for i, _ in log[:2]] in ([1, 2], [2, 1])  # the long one last


def test_a_cancelled_job_frees_its_row_and_the_others_go_on(server):
    doomed = _job(server, 1, max_tokens=200, ignore_eos=True)
    other = _job(server, 3, max_tokens=12, ignore_eos=True)
    alone = _run(server, [_job(server, 3, max_tokens=12, ignore_eos=True)])[0][0].text
    feed = doomed.feed

    def feed_then_cancel(token, row=0, logprob=None):
        if doomed.trackers[row].tokens == 3:
            doomed.cancel()  # as the app does when the client disconnects
        return feed(token, row, logprob)

    doomed.feed = feed_then_cancel
    log = []
    gone, kept = _run(server, [doomed, other], log)
    assert gone[0].finish_reason == "cancelled" and gone[0].completion_tokens <= 5
    assert log[0][0] == 0 and kept[0].completion_tokens == 12 and kept[0].text == alone
    queued = _job(server, 5)
    queued.cancel()
    (outcome,), = _run(server, [queued])
    assert outcome.finish_reason == "cancelled" and outcome.completion_tokens == 0


def test_sampling_options_are_per_row_and_seeded_sampling_is_reproducible_in_a_batch(server):
    def sampled(seed, **options):
        return _job(server, 6, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed, n=3, **options)

    alone = [o.text for o in _run(server, [sampled(7)])[0]]
    batch = _run(server, [_job(server, 0), sampled(7), _job(server, 1, temperature=0.5, seed=3), sampled(8)])
    assert [o.text for o in batch[1]] == alone and len(set(alone)) > 1
    assert batch[0][0].text == _run(server, [_job(server, 0)])[0][0].text  # its greedy neighbour is unaffected
    for i, outcomes in zip((0, 6, 1, 6), batch):
        for outcome in outcomes:
            assert not find_violations(Policy(**_policy(i)), outcome.text), outcome.text


def test_logprobs_in_a_batch_are_each_rows_guarded_distribution(server):
    def asking(i):
        return _job(server, i, max_tokens=6, logprobs=5)

    alone = [_run(server, [asking(i)])[0][0] for i in (0, 2)]
    together = [o[0] for o in _run(server, [asking(0), _job(server, 1), asking(2)])[0::2]]
    for i, a, b in zip((0, 2), alone, together):
        assert [t for t, _, _ in a.logprobs] == [t for t, _, _ in b.logprobs]
        for (_, lp_a, top_a), (_, lp_b, top_b) in zip(a.logprobs, b.logprobs):
            assert lp_b == pytest.approx(lp_a, abs=1e-3)
            assert [t for t, _ in top_a][:3] == [t for t, _ in top_b][:3]
        vocabulary = server.engine.tokenizer
        prefix = ""
        for token, _, top in b.logprobs:  # no alternative that would complete a match of its own policy
            for alternative, logprob in top:
                text = prefix + vocabulary.decode([alternative])
                assert logprob > float("-inf") and not find_violations(Policy(**_policy(i)), text), text
            prefix += vocabulary.decode([token])


def test_the_worker_batches_jobs_that_wait_together(server):
    engine = server.engine

    async def go():
        prepared = [_job(server, i, max_tokens=4) for i in range(8)]
        with engine.arriving():  # as the app marks a request being prepared: the batch waits for them
            jobs = [engine.submit(job) for job in prepared]
        return [await job.next_event() for job in jobs]

    before = engine.stats()
    events = asyncio.run(go())
    after = engine.stats()
    assert all(kind == "done" for kind, _ in events)
    assert after["batches"] - before["batches"] == 1 and after["batched_rows"] - before["batched_rows"] == 8
    assert after["completed"] - before["completed"] == 8
    for i, (_, outcomes) in enumerate(events):
        assert not find_violations(Policy(**_policy(i)), outcomes[0].text)


# -- continuous batching: jobs join the running batch between steps and leave it as they end --------


def _judge(outcome, i: int) -> None:
    """Request i's answer passes its own policy's regex oracle and carries no other request's marker."""
    assert not find_violations(Policy(**_policy(i)), outcome.text), (i, outcome.text)
    assert not any(m in outcome.text for k, m in enumerate(MARKERS) if k != i), (i, outcome.text)


def test_a_job_joins_the_running_batch_between_steps_and_leaves_when_it_ends(server):
    def make():
        return [_job(server, 4, max_tokens=20, ignore_eos=True), _job(server, 1, max_tokens=6, ignore_eos=True),
                _job(server, 2, max_tokens=9, ignore_eos=True)]

    alone = [_run(server, [job])[0][0] for job in make()]
    long, late, later = make()
    order = []
    batch = Batch(server.engine, on_done=lambda job, outcomes: order.append((job, outcomes[0])))
    batch.admit([long])
    for _ in range(4):
        batch.step()
    batch.admit([late])  # joins while `long` is 5 tokens in: its prefill, then one shared step
    assert batch.rows == 2
    for _ in range(2):
        batch.step()
    batch.admit([later])
    widths = []
    while not batch.empty:
        batch.step()
        if not batch.empty:  # the cache holds exactly the running rows, and no column that none of them needs
            layer = batch.cache.layers[0]
            assert layer.keys.shape[0] == batch.rows and layer.keys.shape[-2] == batch.width
            assert batch.width == int(batch.lengths.max())
            widths.append(batch.width)
    assert [job for job, _ in order] == [late, later, long]  # each answered when it ends, not with the batch
    assert batch.rows == 0
    outcomes = {id(job): outcome for job, outcome in order}
    for i, job, solo in zip((4, 1, 2), (long, late, later), alone):
        got = outcomes[id(job)]
        _judge(got, i)
        assert got.completion_tokens == job.max_tokens and got.text == solo.text, (i, got.text, solo.text)


def test_the_worker_admits_a_request_that_arrives_while_another_generates(server):
    engine = server.engine

    async def go():
        long = engine.submit(_job(server, 0, max_tokens=40, ignore_eos=True, stream=True))
        kind, _ = await long.next_event()  # a first delta: `long` is generating
        assert kind == "delta"
        short = engine.submit(_job(server, 3, max_tokens=4, ignore_eos=True))
        answered = []
        for job in (short, long):
            while (event := await job.next_event())[0] == "delta":
                pass
            answered.append((job, event))
        return long, short, answered

    before = engine.stats()
    long, short, answered = asyncio.run(go())
    after = engine.stats()
    assert all(kind == "done" for _, (kind, _) in answered)
    (_, (_, short_outcomes)), (_, (_, long_outcomes)) = answered
    assert long_outcomes[0].completion_tokens == 40 and short_outcomes[0].completion_tokens == 4
    assert not long.done(0) and long.trackers[0].tokens == 40
    # the short request ran inside the long one's generation: it started after the first and ended
    # before it (the steps of both together are fewer than their steps one after the other)
    assert after["batches"] - before["batches"] == 2 and after["max_batch_rows"] >= 2
    assert after["steps"] - before["steps"] < 40 + 4 - 1
    _judge(short_outcomes[0], 3)
    _judge(long_outcomes[0], 0)
    assert short_outcomes[0].text == _run(server, [_job(server, 3, max_tokens=4, ignore_eos=True)])[0][0].text


def test_a_job_whose_guard_fails_leaves_alone_and_the_others_go_on(server):
    broken, kept = _job(server, 5, max_tokens=8, ignore_eos=True), _job(server, 6, max_tokens=8, ignore_eos=True)
    alone = _run(server, [_job(server, 6, max_tokens=8, ignore_eos=True)])[0][0].text
    guard, calls = broken.processor, []

    def failing(ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("guard failure")
        return guard(ids, scores)

    broken.processor = failing
    done, failed = {}, {}
    batch = Batch(server.engine, [broken, kept], on_done=lambda job, o: done.__setitem__(id(job), o),
                  on_failed=lambda job, exc: failed.__setitem__(id(job), exc))
    batch.generate()
    assert str(failed[id(broken)]) == "guard failure" and id(broken) not in done
    assert id(kept) not in failed and done[id(kept)][0].text == alone


def test_a_cache_that_cannot_be_joined_runs_its_batch_to_the_end_first(server, monkeypatch):
    """With a cache whose layers are not plain growing key/value tensors (sliding windows, linear
    attention), new jobs wait until the running batch is empty, and ended rows stay until then."""
    from safedecode.server import worker

    monkeypatch.setattr(worker, "_joinable", lambda cache: False)
    engine = Engine(server.engine.model, server.engine.tokenizer, max_queue=8)  # it learns at its first forward

    async def go():
        long = engine.submit(_job(server, 0, max_tokens=12, ignore_eos=True, stream=True))
        assert (await long.next_event())[0] == "delta"
        short = engine.submit(_job(server, 3, max_tokens=3, ignore_eos=True))
        events = []
        for job in (long, short):
            while (event := await job.next_event())[0] == "delta":
                pass
            events.append(event)
        return events

    before = engine.stats()
    try:
        events = asyncio.run(go())
    finally:
        engine.close()
    after = engine.stats()
    assert [kind for kind, _ in events] == ["done", "done"]
    assert after["steps"] - before["steps"] == (12 - 1) + (3 - 1)  # one after the other: no shared step
    assert after["batches"] - before["batches"] == 2
    _judge(events[0][1][0], 0)
    _judge(events[1][1][0], 3)


def test_a_bfloat16_engine_keeps_every_guard(server):
    """``safedecode serve --dtype bfloat16``: the model's scores are bfloat16; each request's guard
    masks them the same way (judged by the regex oracle of its own policy), joined or not."""
    from safedecode.server.worker import load_model

    model, tokenizer, _ = load_model("default", "bfloat16")
    assert str(next(model.parameters()).dtype) == "torch.bfloat16"
    engine = Engine(model, tokenizer, max_queue=8, max_batch=8)
    try:
        fast = Server(engine, MODEL)
        premise = _run(fast, [_job(fast, 0, safedecode={})])[0][0].text  # unguarded, it echoes its marker
        assert MARKERS[0][1:4] in premise or "10" in premise, premise
        jobs = [_job(fast, i, max_tokens=12) for i in range(4)]
        batch = Batch(engine, on_done=lambda job, outcomes: done.__setitem__(id(job), outcomes[0]))
        done = {}
        for job in jobs:  # one joins per step
            batch.admit([job])
            batch.step()
        while not batch.empty:
            batch.step()
        for i, job in enumerate(jobs):
            _judge(done[id(job)], i)
    finally:
        engine.close()


def test_a_model_error_fails_the_jobs_it_ran_for_and_the_next_ones_run(server, monkeypatch):
    model, calls = server.engine.model, []

    class Flaky:  # the model, raising once: at its third call (a decoding step of both jobs)
        device, config, forward = model.device, model.config, model.forward

        def __call__(self, **inputs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory")
            return model(**inputs)

    monkeypatch.setattr(server.engine, "model", Flaky())
    first, second = _job(server, 0, max_tokens=6), _job(server, 7, max_tokens=6)
    done, failed = {}, {}
    batch = Batch(server.engine, on_done=lambda job, o: done.__setitem__(id(job), o[0]),
                  on_failed=lambda job, exc: failed.__setitem__(id(job), str(exc)))
    batch.admit([first])
    batch.admit([second])  # calls 1 and 2: the prefills
    batch.step()           # call 3: fails both
    assert failed == {id(first): "out of memory", id(second): "out of memory"} and not done and batch.empty
    third = _job(server, 2, max_tokens=6)
    batch.admit([third])
    while not batch.empty:
        batch.step()
    monkeypatch.undo()
    assert done[id(third)].text == _run(server, [_job(server, 2, max_tokens=6)])[0][0].text


def _with_context(server, job):
    """``job`` with a prompt made longer (a few chunks of 8 tokens) by some context in front."""
    job.input_ids = server.engine.tokenizer("Some context. " * 6)["input_ids"] + list(job.input_ids)
    return job


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_others_decode(server, monkeypatch):
    """Chunked prefill: a prompt longer than the engine's ``prefill_chunk`` is read a chunk per
    step in its own cache while the running rows keep decoding, then joins; its answer passes its
    own policy and equals its answer alone, and the running job's too."""
    monkeypatch.setattr(server.engine, "prefill_chunk", 8)

    def make():
        running = _job(server, 2, max_tokens=16, ignore_eos=True)
        return running, _with_context(server, _job(server, 5, max_tokens=6, ignore_eos=True))

    running, long = make()
    alone = {}
    for i, job in zip(("running", "long"), make()):  # alone, in a batch that has read no cache yet: one prefill
        alone[i] = _run(server, [job])[0][0].text
    chunks = -(-len(long.input_ids) // 8)
    assert chunks >= 4
    done = {}
    batch = Batch(server.engine, on_done=lambda job, outcomes: done.__setitem__(id(job), outcomes[0]))
    batch.admit([running])
    assert batch.joinable is True
    batch.admit([long])
    assert batch.prefilling and batch.rows == 2
    for k in range(chunks):  # each step: one decoding step of `running`, one chunk of `long`
        before = running.trackers[0].tokens
        batch.step()
        assert running.trackers[0].tokens == before + 1
        assert (long.trackers[0].tokens == 0) == (k < chunks - 1)
    assert not batch.prefilling and len(batch.running) == 2
    while not batch.empty:
        batch.step()
    _judge(done[id(long)], 5)
    _judge(done[id(running)], 2)
    assert done[id(running)].text == alone["running"]
    assert done[id(long)].text == alone["long"], (done[id(long)].text, alone["long"])


def test_a_long_prompt_cancelled_while_it_is_prefilled_never_joins(server, monkeypatch):
    monkeypatch.setattr(server.engine, "prefill_chunk", 8)
    running, long = _job(server, 2, max_tokens=6, ignore_eos=True), _with_context(server, _job(server, 5, max_tokens=6))
    done = {}
    batch = Batch(server.engine, on_done=lambda job, outcomes: done.__setitem__(id(job), outcomes[0]))
    batch.admit([running])
    batch.admit([long])
    batch.step()
    long.cancel()
    batch.step()
    assert done[id(long)].finish_reason == "cancelled" and done[id(long)].completion_tokens == 0
    assert not batch.prefilling and [r.job for r in batch.running] == [running]
    while not batch.empty:
        batch.step()
    assert done[id(running)].completion_tokens == 6


def test_the_warm_up_runs_on_the_worker_and_leaves_no_trace_in_the_counters(server):
    import threading

    engine, threads = server.engine, set()
    job = _job(server, 4, max_tokens=5, ignore_eos=True)
    guard = job.processor

    class Recording:  # the job's guard, noting the thread that calls it: the one that ran the model
        def __call__(self, ids, scores):
            threads.add(threading.current_thread().name)
            return guard(ids, scores)

        def __getattr__(self, name):
            return getattr(guard, name)

    job.processor = Recording()
    before = engine.stats()
    (outcome,) = engine.run(job)
    after = engine.stats()
    assert threads == {"safedecode-engine"}
    assert outcome.completion_tokens == 5 and outcome.finish_reason == "length"
    _judge(outcome, 4)
    assert {k: v for k, v in after.items() if k != "max_batch_rows"} == \
        {k: v for k, v in before.items() if k != "max_batch_rows"}
