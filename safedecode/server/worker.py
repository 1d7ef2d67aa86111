"""The generation worker: one model, batches of generations, streamed token by token.

Invariants:
  * **no cross-talk**: exactly one thread (the worker) ever runs the model. It takes the jobs
    waiting (up to ``max_batch`` rows) and runs them as one batched ``generate`` (:class:`Batch`),
    but every job carries its own logits processor (per-generation state; it sees only its own
    rows, its padding cut off), its own sampler (temperature, top_p, its own seeded generator),
    its own stopping rules and its own :class:`TextTracker`, so nothing is shared between requests
    but the immutable model and compiled policies. A request's answer is therefore the same whether
    it ran alone or among others (given the same seed, or greedy decoding), up to floating point:
    left padding changes the model's numerics slightly, which can flip a near tie (see the README,
    "Serving");
  * **cancellation frees the row**: :meth:`Job.cancel` (a client disconnected) is checked after
    every token by a ``StoppingCriteria``, so the job's rows end at the next step and it is
    answered while the others go on; a job cancelled while queued never starts;
  * **only guarded text is streamed**: the text is the generated tokens' bytes decoded exactly as
    DESIGN §1 defines it (an incomplete UTF-8 tail is held back), and a delta never goes past a
    token boundary — the points where the guard's prefix-safety holds — nor into a possible stop
    string or tool-call tag (see :class:`TextTracker`).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import SafeDecodeError
from ..integrations.generation import finish_reason
from ..policy.rules import Policy, find_violations


class ServerBusyError(SafeDecodeError):
    """The queue is full (HTTP 503)."""


def load_model(spec: str = "default"):
    """``(model, tokenizer, name)``: the embedded SmolLM2 for ``"default"``, else a local HF model
    directory (never downloads)."""
    if spec in ("default", None):
        from ..models import DEFAULT_MODEL_NAME, load_default_model

        model, tokenizer = load_default_model()
        return model, tokenizer, DEFAULT_MODEL_NAME
    path = Path(spec)
    if not path.is_dir():
        raise SafeDecodeError(f"--model {spec!r}: not 'default' or a local Hugging Face model directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer, path.name


class TextTracker:
    """The generated text of one job, and how much of it may be sent so far.

    ``text`` is the text of the tokens (DESIGN §1, :meth:`Vocabulary.decoder`: an incomplete tail is
    held back); it only grows. ``boundaries[k]`` is the text length after ``k`` tokens. ``stops``
    end the generation at their first occurrence (the answer excludes them, as in OpenAI's API);
    ``pause`` (the tool-call tag) ends the streamable *content* where it first appears.
    """

    def __init__(self, vocabulary, stops=(), pause: Optional[str] = None, policy: Optional[Policy] = None):
        self.vocabulary = vocabulary
        self.stops = tuple(stops or ())
        self.pause = pause
        self.policy = policy
        self.decoder = vocabulary.decoder()
        self.text = ""
        self.boundaries = [0]
        self.tokens = 0
        self.eos = False
        self.stopped_at: Optional[int] = None
        self.paused_at: Optional[int] = None
        self.sent = 0

    def feed(self, token_id: int) -> bool:
        """Append one generated token; True when the generation must end (EOS or a stop string)."""
        self.tokens += 1
        if token_id in self.vocabulary.eos_ids:
            self.eos = True
            return True
        before = len(self.text)
        self.text += self.decoder.feed(token_id)
        self.boundaries.append(len(self.text))
        if self.pause and self.paused_at is None:
            found = self.text.find(self.pause, max(0, before - len(self.pause) + 1))
            self.paused_at = found if found >= 0 else None
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.stopped_at = min(hits)
        return bool(hits)

    def _held(self) -> int:
        """Length of the longest suffix of ``text`` that could begin a stop string or the pause tag."""
        markers = self.stops + ((self.pause,) if self.pause and self.paused_at is None else ())
        longest = 0
        for marker in markers:
            for k in range(min(len(marker) - 1, len(self.text)), longest, -1):
                if self.text.endswith(marker[:k]):
                    longest = k
                    break
        return longest

    def _boundary_at_most(self, end: int) -> int:
        return self.boundaries[bisect.bisect_right(self.boundaries, end) - 1]

    def take(self) -> str:
        """The next delta that may be streamed now (possibly empty)."""
        end = len(self.text) - self._held()
        for limit in (self.stopped_at, self.paused_at):
            if limit is not None:
                end = min(end, limit)
        end = self._boundary_at_most(end)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def final(self) -> tuple[str, str]:
        """``(text, content)`` once the generation is over: the answer (cut before a stop string) and
        its content part (before the first tool-call tag). A cut inside a token that would read as a
        violation (an end-sensitive rule such as ``foo\\b``) backs off to the token boundary."""
        text = self.text
        if self.stopped_at is not None:
            cut = self.stopped_at
            if cut not in self.boundaries and self.policy is not None and find_violations(self.policy, text[:cut]):
                cut = self._boundary_at_most(cut)
            text = text[:cut]
        content = text if self.paused_at is None else text[:self.paused_at]
        return text, content

    def clone(self) -> "TextTracker":
        """A fresh tracker with the same rules (another choice of the same request)."""
        return TextTracker(self.vocabulary, self.stops, self.pause, self.policy)

    def kept_tokens(self) -> int:
        """How many generated tokens the final text covers (EOS, and tokens past a stop string, excluded)."""
        text, _ = self.final()
        fed = len(self.boundaries) - 1
        if len(text) == len(self.text):
            return fed
        return sum(1 for k in range(fed) if self.boundaries[k] < len(text))

    def rest(self, content: str) -> str:
        """What a stream has not sent yet of the final ``content`` (from :meth:`final`)."""
        delta, self.sent = content[self.sent:], max(self.sent, len(content))
        return delta


@dataclass
class Outcome:
    text: str            # the whole answer (tool calls included)
    content: str         # the answer before the first tool-call tag
    rest: str            # what a stream has not sent yet of ``content``
    finish_reason: str   # one of FINISH_REASONS (integrations.generation.finish_reason), or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    report: Optional[dict] = None  # blocked-mass telemetry, when the request asked for it
    index: int = 0       # the choice
    logprobs: Optional[list] = None  # per kept token: (id, logprob, [(id, logprob), ...]) when asked


@dataclass
class Job:
    """One generation request. ``processor`` is this job's own (stateful) logits processor or None;
    ``wire`` the same guard as per-request options of the wire format, for an engine that guards
    elsewhere (:mod:`.upstream`: the vLLM plugin compiles it; None without any guard).

    ``n`` choices: rows of the same prompt, each with its own guard state (its own guide in the
    processor's batch, or its own guide copy at the gateway) and its own tracker (``trackers[i]``;
    ``tracker`` is row 0's). ``logprobs``: None, or how many alternatives to report per token (0: the
    chosen token's only) — of the guarded distribution (:class:`LogprobRecorder`)."""

    input_ids: list[int]
    processor: Any
    tracker: TextTracker
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False
    stream: bool = False
    events: Optional[asyncio.Queue] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    wire: Optional[dict] = None
    n: int = 1
    logprobs: Optional[int] = None
    trackers: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)  # per row: one entry per fed token (see Outcome)

    def __post_init__(self) -> None:
        if not self.trackers:
            self.trackers = [self.tracker] + [self.tracker.clone() for _ in range(self.n - 1)]
        self.token_logprobs = [[] for _ in range(self.n)]

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value) -> None:
        """Hand an event to the request's coroutine: ("delta", str), ("done", Outcome), ("error", exc)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    async def next_event(self) -> tuple[str, Any]:
        return await self.events.get()

    def feed(self, token_id: int, row: int = 0, logprob=None) -> bool:
        """One generated token of choice ``row`` (and its logprob entry, when asked): track it, stream
        what may be sent now; True when the generation of that row must end (EOS or a stop string).
        Every engine calls this once per token and row."""
        tracker = self.trackers[row]
        stop = tracker.feed(token_id)
        if logprob is not None:
            self.token_logprobs[row].append(logprob)
        if self.stream and (delta := tracker.take()):
            self.emit("delta", delta)
        return stop

    def done(self, row: int = 0) -> bool:
        """Whether choice ``row`` has ended (EOS or a stop string)."""
        tracker = self.trackers[row]
        return tracker.eos or tracker.stopped_at is not None

    def outcome(self, stopped: bool, ended: bool = False, report: Optional[dict] = None, row: int = 0) -> Outcome:
        """The answer of choice ``row`` once the engine is done: ``stopped``, the guard's row is
        stopped (only EOS was left); ``ended``, the engine itself ended the answer (its end-of-sequence)."""
        tracker = self.trackers[row]
        text, content = tracker.final()
        ended = ended or tracker.eos or tracker.stopped_at is not None
        if self.cancelled.is_set() and not ended:
            reason = "cancelled"
        else:
            reason = finish_reason(ended=ended, stopped=stopped)
        logprobs = self.token_logprobs[row][:tracker.kept_tokens()] if self.logprobs is not None else None
        return Outcome(text=text, content=content, rest=tracker.rest(content), finish_reason=reason,
                       prompt_tokens=len(self.input_ids), completion_tokens=tracker.tokens, report=report,
                       index=row, logprobs=logprobs)


class EngineBase:
    """What the server needs of an engine (the embedded :class:`Engine`, :class:`.upstream.UpstreamEngine`):
    ``tokenizer``, ``context_length``, ``submit`` (queue a :class:`Job`; its events come back on
    the event loop), ``run`` (one job to the end, before serving: the warm-up), ``stats``, ``close``;
    and ``remote``: whether the guard runs elsewhere (the job's ``wire`` options are sent there);
    ``guarded_logprobs``: whether the logprobs it reports are of the guarded distribution."""

    remote = False
    guarded_logprobs = True

    def __init__(self, tokenizer, context_length: int, max_queue: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.counters = dict(queued=0, running=0, completed=0, cancelled=0, failed=0, generated_tokens=0)
        self._arriving = 0

    @contextlib.contextmanager
    def arriving(self):
        """Around a request's preparation and :meth:`submit`: while any request is arriving, a
        batching engine may wait a little for it (:class:`Engine`'s ``batch_wait``)."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def arriving_now(self) -> int:
        with self._lock:
            return self._arriving

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters)

    def _count(self, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                self.counters[key] += value

    def _admit(self, job: Job, *waiting: str) -> Job:
        """Count ``job`` as queued and bind it to the running event loop; raises
        :class:`ServerBusyError` when ``max_queue`` jobs are ``waiting`` (these counters together)."""
        with self._lock:
            busy = sum(self.counters[key] for key in waiting or ("queued",))
            if busy >= self.max_queue:
                raise ServerBusyError(f"{busy} requests are waiting; try again later")
            self.counters["queued"] += 1
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        return job

    def _finished(self, job: Job, outcomes: list) -> None:
        """Count a job that ran (running → completed or cancelled) and hand it its outcomes (one per choice)."""
        cancelled = any(o.finish_reason == "cancelled" for o in outcomes)
        self._count(running=-1, completed=int(not cancelled), cancelled=int(cancelled),
                    generated_tokens=sum(o.completion_tokens for o in outcomes))
        job.emit("done", outcomes)

    def _failed(self, job: Job, exc: Exception) -> None:
        self._count(running=-1, failed=1)
        job.emit("error", exc)

    def submit(self, job: Job) -> Job:
        raise NotImplementedError

    def run(self, job: Job) -> list:
        """Generate ``job`` to the end: one :class:`Outcome` per choice."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Engine(EngineBase):
    """Runs :class:`Job` s on one worker thread (see the module invariants), in batches: the worker
    takes every job waiting (up to ``max_batch`` rows) and generates them in one ``model.generate``
    call (:class:`Batch`); counts what it did.

    ``batch_wait``: how long (seconds) the worker may hold a batch back for requests still being
    prepared (:meth:`EngineBase.arriving`: their prompt is being encoded and their guard compiled),
    so that clients that sent together run together; 0 starts each batch at once."""

    def __init__(self, model, tokenizer, max_queue: int, max_batch: int = 16, batch_wait: float = 0.25):
        super().__init__(tokenizer, int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30), max_queue)
        if max_batch < 1:
            raise SafeDecodeError(f"--max-batch {max_batch}: must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._held: Optional[Job] = None  # taken from the queue but left for the next batch (too many rows)
        self._current: list[Job] = []
        self._closing = threading.Event()
        self.counters.update(batches=0, batched_rows=0, max_batch_rows=0)
        self._thread = threading.Thread(target=self._work, name="safedecode-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (from the event loop); raises :class:`ServerBusyError` when ``max_queue`` jobs wait."""
        self._queue.put(self._admit(job))
        return job

    def close(self) -> None:
        """Stop the worker: the running generations are cancelled, queued jobs are not started."""
        self._closing.set()
        self._queue.put(None)
        while self._current and self._thread.is_alive():
            for job in list(self._current):
                job.cancel()
            self._thread.join(timeout=0.1)
        self._thread.join(timeout=30)

    def _take(self) -> Optional[list]:
        """The next batch: the first waiting job (blocking), then every job waiting or arriving within
        ``batch_wait`` while rows are left; None once closed."""
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            return None
        jobs, rows = [first], first.n
        deadline = time.monotonic() + self.batch_wait
        while rows < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if self.arriving_now() == 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
                continue
            if job is None:
                self._queue.put(None)  # closing: finish this batch first
                break
            if rows + job.n > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            rows += job.n
        return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            self._count(queued=-len(jobs), running=len(jobs))
            if self._closing.is_set():
                for job in jobs:
                    job.cancel()
            self._current = jobs
            batch = Batch(self, jobs, self._finished)
            try:
                batch.generate()
            except Exception as exc:  # reported to the requests still running, never kills the worker
                for job in batch.unfinished():
                    self._failed(job, exc)
            finally:
                self._current = []

    def run(self, job: Job) -> list:
        """Generate ``job`` alone to the end, on the calling thread (the warm-up): its outcomes."""
        done: list = []
        Batch(self, [job], lambda _, outcomes: done.extend(outcomes)).generate()
        return done


class Batch:
    """One ``model.generate`` call over the rows of several jobs: every job's prompt is left-padded
    to the longest, its ``n`` rows copied. Nothing is shared between jobs but the model:

      * each job's own logits processor sees only its rows, with its padding cut off, so its guard
        reads exactly the ids it would read alone (:meth:`process`);
      * each job's own EOS rule (``ignore_eos``), logprob recorder (after its guard: the guarded
        distribution) and sampler (its temperature and top_p, its own ``torch.Generator`` seeded with
        its seed) — generate itself runs greedy, and a sampled row's scores become one-hot on the
        sampled id;
      * each row ends on its own (EOS, a stop string, the job's ``max_tokens``, cancellation): the
        stopping criterion returns a per-row flag, after which transformers feeds that row only pad
        ids, ignored here; a job whose rows have all ended is answered at once (``on_done``), while
        the others go on.
    """

    def __init__(self, engine: Engine, jobs: list, on_done):
        import torch

        self.engine, self.jobs, self.on_done = engine, jobs, on_done
        self.spans: list = [None] * len(jobs)  # per job in the batch: (its first row, its padding)
        self.ended = [[False] * job.n for job in jobs]
        self.stopped = [[False] * job.n for job in jobs]
        self.finished = [False] * len(jobs)
        self.recorders = [LogprobRecorder(job.logprobs) if job.logprobs is not None else None for job in jobs]
        self.generators = []
        for job in jobs:
            generator = None
            if job.temperature > 0:
                generator = torch.Generator(device=engine.model.device)
                generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
            self.generators.append(generator)

    def unfinished(self) -> list:
        return [job for job, finished in zip(self.jobs, self.finished) if not finished]

    def generate(self) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        for j, job in enumerate(self.jobs):  # cancelled while queued: never starts
            if job.cancelled.is_set():
                self._finish(j)
        live = [j for j, finished in enumerate(self.finished) if not finished]
        if not live:
            return
        pad = self.engine.pad_token_id
        width = max(len(self.jobs[j].input_ids) for j in live)
        rows, mask = [], []
        for j in live:
            job = self.jobs[j]
            padding = width - len(job.input_ids)
            self.spans[j] = (len(rows), padding)
            rows += [[pad] * padding + list(job.input_ids)] * job.n
            mask += [[0] * padding + [1] * len(job.input_ids)] * job.n
        device = self.engine.model.device
        ids = torch.tensor(rows, device=device)
        eos = sorted(self.jobs[live[0]].tracker.vocabulary.eos_ids)
        self.engine._count(batches=1, batched_rows=len(rows))
        with self.engine._lock:
            self.engine.counters["max_batch_rows"] = max(self.engine.counters["max_batch_rows"], len(rows))
        with torch.no_grad():
            self.engine.model.generate(
                ids, attention_mask=torch.tensor(mask, device=device), do_sample=False,
                max_new_tokens=max(self.jobs[j].max_tokens for j in live), eos_token_id=eos, pad_token_id=pad,
                logits_processor=LogitsProcessorList([self.process]),
                stopping_criteria=StoppingCriteriaList([self.tap]))
        for j in range(len(self.jobs)):  # generate reached its own length limit
            if not self.finished[j]:
                self._finish(j)

    def process(self, input_ids, scores):
        """The batch's one logits processor: each live job's rows through that job's own guard,
        recorder and sampler."""
        import torch

        for j, job in enumerate(self.jobs):
            if self.finished[j]:
                continue
            start, padding = self.spans[j]
            rows = slice(start, start + job.n)
            part = scores[rows]
            if job.ignore_eos:
                part[:, sorted(job.tracker.vocabulary.eos_ids)] = float("-inf")
            if job.processor is not None:
                part = job.processor(input_ids[rows, padding:].contiguous(), part)
            if self.recorders[j] is not None:
                self.recorders[j](None, part)
            if self.generators[j] is not None:
                chosen = sample(part, job.temperature, job.top_p, self.generators[j])
                part = torch.full_like(part, float("-inf")).scatter_(1, chosen, 0.0)
            scores[rows] = part
        return scores

    def tap(self, input_ids, scores, **kwargs):
        """The stopping criterion, called after every generated token: feed each live row's token
        (and its logprob entry) to its job, stream what may be sent, end the rows that are done, and
        answer each job whose rows have all ended."""
        import torch

        last = input_ids[:, -1].tolist()
        ends = [True] * len(last)
        for j, job in enumerate(self.jobs):
            if self.finished[j]:
                continue
            start, _ = self.spans[j]
            cancelled = job.cancelled.is_set()
            for row in range(job.n):
                if self.ended[j][row]:
                    continue
                token = last[start + row]
                recorder = self.recorders[j]
                stop = job.feed(token, row, recorder.entry(row, token) if recorder is not None else None)
                if stop or job.done(row) or cancelled or job.trackers[row].tokens >= job.max_tokens:
                    self.ended[j][row] = True
                    self.stopped[j][row] = self._is_stopped(job, row)
                else:
                    ends[start + row] = False
            if all(self.ended[j]):
                self._finish(j)
        return torch.tensor(ends, dtype=torch.bool, device=input_ids.device)

    @staticmethod
    def _is_stopped(job: Job, row: int) -> bool:
        guides = job.processor.guides if job.processor is not None else []
        return row < len(guides) and guides[row].is_stopped

    def _finish(self, j: int) -> None:
        job = self.jobs[j]
        self.finished[j] = True
        telemetry = getattr(job.processor, "telemetry", None)
        outcomes = [job.outcome(stopped=self.stopped[j][row] if self.ended[j][row] else self._is_stopped(job, row),
                                report=telemetry.report(row) if telemetry is not None else None, row=row)
                    for row in range(job.n)]
        self.on_done(job, outcomes)


def sample(scores, temperature: float, top_p: float, generator):
    """One token id per row (shape ``(rows, 1)``) drawn from ``softmax(scores / temperature)``
    restricted to the top-``top_p`` nucleus (the most likely tokens until their mass reaches
    ``top_p``; at least one), with ``generator``. Masked ids (-inf) are never drawn."""
    import torch

    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[(ordered.cumsum(-1) - ordered) >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator)


class LogprobRecorder:
    """A logits processor placed right after the guard: it keeps each row's log-probabilities of
    the *guarded* distribution (the model's scores after the guard's mask, before temperature and
    top_p — transformers applies those warpers after every given processor), so a token the guard
    forbids has logprob -inf and is never reported. ``entry(row, token)`` is what the reply shows
    for the token chosen: ``(token, logprob, [(id, logprob), ...])`` with at most ``top`` finite
    alternatives, best first."""

    def __init__(self, top: int):
        self.top = top
        self.last = None

    def __call__(self, input_ids, scores):
        import torch

        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def entry(self, row: int, token: int) -> tuple:
        import torch

        values = self.last[row]
        alternatives = []
        if self.top:
            best = torch.topk(values, self.top)
            alternatives = [(int(i), float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist())
                            if v != float("-inf")]
        return token, float(values[token]), alternatives


__all__ = ["EngineBase", "Engine", "Batch", "sample", "Job", "Outcome", "TextTracker", "LogprobRecorder", "ServerBusyError", "load_model"]
