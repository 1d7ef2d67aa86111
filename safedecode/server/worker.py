"""The generation worker: one model, continuous batching, every job streamed token by token.

Invariants:
  * **no cross-talk**: exactly one thread (the worker) ever runs the model. It keeps one
    :class:`Batch` of rows in flight and admits waiting jobs between steps (up to ``max_batch``
    rows), but every job carries its own logits processor (per-generation state; it sees only its
    own rows' ids, never padding), its own sampler (temperature, top_p, its own seeded generator),
    its own stopping rules and its own :class:`TextTracker`, so nothing is shared between requests
    but the immutable model and compiled policies. A request's answer is therefore the same whether
    it ran alone or among others (given the same seed, or greedy decoding), up to floating point:
    padding and the batch's size change the model's numerics slightly, which can flip a near tie
    (see the README, "Serving");
  * **a job ends on its own**: EOS, a stop string, ``max_tokens`` or :meth:`Job.cancel` (a client
    disconnected), checked after every token; the job is answered at once and its rows leave the
    batch while the others go on; a job cancelled while queued never starts; a job whose guard
    raises is answered with the error, the others go on;
  * **only guarded text is streamed**: the text is the generated tokens' bytes decoded exactly as
    DESIGN §1 defines it (an incomplete UTF-8 tail is held back), and a delta never goes past a
    token boundary — the points where the guard's prefix-safety holds — nor into a possible stop
    string or tool-call tag (see :class:`TextTracker`).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
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


def load_model(spec: str = "default", dtype: str = "float32"):
    """``(model, tokenizer, name)``: the embedded SmolLM2 for ``"default"``, else a local HF model
    directory (never downloads), in ``dtype`` (``"float32"`` or ``"bfloat16"``)."""
    import torch

    if dtype not in ("float32", "bfloat16"):
        raise SafeDecodeError(f"--dtype {dtype!r}: must be float32 or bfloat16")
    if spec in ("default", None):
        from ..models import DEFAULT_MODEL_NAME, load_default_model

        model, tokenizer = load_default_model(getattr(torch, dtype))
        return model, tokenizer, DEFAULT_MODEL_NAME
    path = Path(spec)
    if not path.is_dir():
        raise SafeDecodeError(f"--model {spec!r}: not 'default' or a local Hugging Face model directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype)).eval()
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
        """Generate ``job`` to the end, outside a running event loop (the warm-up): one
        :class:`Outcome` per choice. It goes through :meth:`submit` like any request, so the embedded
        model only ever runs on the engine's worker thread (see :class:`Engine`); the counters are
        left as they were (``/health`` counts requests only)."""
        with self._lock:
            counters = dict(self.counters)

        async def answered() -> list:
            self.submit(job)
            while True:
                kind, value = await job.next_event()
                if kind == "error":
                    raise value
                if kind == "done":
                    return value

        try:
            return asyncio.run(answered())
        finally:
            with self._lock:
                self.counters.update(counters)

    def close(self) -> None:
        pass


class Engine(EngineBase):
    """Runs :class:`Job` s on one worker thread (see the module invariants) by **continuous
    batching**: the worker keeps one :class:`Batch` of rows in flight and, between two decoding
    steps, admits every job waiting (while rows are free, up to ``max_batch``), so a request that
    arrives while others generate starts at the next step instead of waiting for them to end; a
    job leaves the batch as soon as its rows have ended. Counts what it did.

    ``batch_wait``: when the engine is idle, how long (seconds) the worker may hold the first
    admission back for requests still being prepared (:meth:`EngineBase.arriving`: their prompt is
    being encoded and their guard compiled), so that clients that sent together share one prefill;
    0 starts at once. While rows are running it never waits: late arrivals join a step later.
    ``prefill_chunk``: a prompt longer than this many tokens is read that many per step while the
    others decode (:class:`Batch`'s chunked prefill).

    Only the worker thread runs the model, the warm-up included (:meth:`EngineBase.run`): with
    torch's OpenMP backend, one parallel torch operation on a second thread (the event loop's)
    leaves that thread's own pool of OpenMP threads behind, and every later step of the worker then
    took ~70% longer on 2 cores (33 → 57 ms per SmolLM2 step at 2 threads)."""

    def __init__(self, model, tokenizer, max_queue: int, max_batch: int = 16, batch_wait: float = 0.25,
                 prefill_chunk: int = 256):
        super().__init__(tokenizer, int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30), max_queue)
        if max_batch < 1:
            raise SafeDecodeError(f"--max-batch {max_batch}: must be at least 1")
        if prefill_chunk < 1:
            raise SafeDecodeError(f"prefill_chunk {prefill_chunk}: must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.batch_wait = batch_wait
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._held: Optional[Job] = None  # taken from the queue but waiting for free rows (first in line)
        self._batch: Optional[Batch] = None
        self._closing = threading.Event()
        self.counters.update(batches=0, batched_rows=0, max_batch_rows=0, steps=0)
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
        while self._thread.is_alive() and (batch := self._batch) is not None and batch.jobs():
            for job in batch.jobs():
                job.cancel()
            self._thread.join(timeout=0.1)
        self._thread.join(timeout=30)

    def _take(self, free: int, idle: bool) -> Optional[list]:
        """The jobs to admit now, in arrival order, while their rows fit in ``free``: when ``idle``,
        the first waiting job (blocking) and every job waiting or arriving within ``batch_wait``;
        else the jobs already waiting (possibly none). None once closed (the queue's sentinel)."""
        jobs, rows = [], 0
        deadline = time.monotonic() + self.batch_wait
        while True:
            if self._held is not None:
                job, self._held = self._held, None
            elif idle and not jobs:
                job = self._queue.get()
            else:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    if not idle or self.arriving_now() == 0 or time.monotonic() >= deadline:
                        return jobs
                    time.sleep(0.002)
                    continue
            if job is None:
                return None
            if rows + job.n > free and (jobs or not idle):  # wait for rows to free (first in line keeps its place)
                self._held = job
                return jobs
            jobs.append(job)
            rows += job.n
            if rows >= free:
                return jobs

    def _work(self) -> None:
        batch = self._batch = Batch(self, on_done=self._finished, on_failed=self._failed)
        closed = False
        while not (closed and batch.empty):
            free = self.max_batch - batch.rows if batch.joinable or batch.empty else 0
            jobs = self._take(free, idle=batch.empty) if not closed and free > 0 else []
            if jobs is None:
                closed = True
                for job in batch.jobs():
                    job.cancel()
                continue
            if jobs:
                self._count(queued=-len(jobs), running=len(jobs))
                if self._closing.is_set():
                    for job in jobs:
                        job.cancel()
                batch.admit(jobs)
            if not batch.empty:
                batch.step()
        while (job := self._held if self._held is not None else self._next_queued()) is not None:
            self._held = None  # closed: a job still queued is answered as cancelled, never started
            self._count(queued=-1, running=1)
            job.cancel()
            batch.admit([job])

    def _next_queued(self) -> Optional[Job]:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None


class _Rows:
    """One job's rows in a :class:`Batch`: its ids so far (prompt and generated, ``n`` rows), its
    own logprob recorder and sampler, and which of its rows have ended."""

    def __init__(self, job: Job, device):
        import torch

        self.job = job
        self.ids = torch.tensor([list(job.input_ids)] * job.n, device=device)
        self.read, self.cache = 0, None  # chunked prefill: prompt tokens read so far, and their cache
        self.ended = [False] * job.n
        self.stopped = [False] * job.n
        self.finished = False
        self.recorder = LogprobRecorder(job.logprobs) if job.logprobs is not None else None
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
        self.banned = sorted(job.tracker.vocabulary.eos_ids) if job.ignore_eos else None

    def choose(self, scores):
        """The next token of each row (shape ``(n, 1)``), from this job's rows of the step's
        logits: its EOS rule, its guard (reading exactly its own ids), its recorder (the guarded
        distribution), then its sampler (greedy: the best allowed token)."""
        if self.banned:
            scores[:, self.banned] = float("-inf")
        if self.job.processor is not None:
            scores = self.job.processor(self.ids, scores)
        if self.recorder is not None:
            self.recorder(None, scores)
        if self.generator is not None:
            return sample(scores, self.job.temperature, self.job.top_p, self.generator)
        return scores.argmax(dim=-1, keepdim=True)

    def feed(self, chosen, pad: int) -> None:
        """Append the step's tokens (an ended row gets ``pad``, ignored) and hand each live row's
        token to the job; end the rows that are done (EOS, stop string, ``max_tokens``, cancelled)."""
        import torch

        job = self.job
        tokens = chosen[:, 0].tolist()
        cancelled = job.cancelled.is_set()
        for row, token in enumerate(tokens):
            if self.ended[row]:
                tokens[row] = pad
                continue
            entry = self.recorder.entry(row, token) if self.recorder is not None else None
            stop = job.feed(token, row, entry)
            if stop or job.done(row) or cancelled or job.trackers[row].tokens >= job.max_tokens:
                self.ended[row] = True
                self.stopped[row] = self.is_stopped(row)
        self.ids = torch.cat([self.ids, torch.tensor(tokens, device=self.ids.device)[:, None]], dim=1)

    def is_stopped(self, row: int) -> bool:
        guides = self.job.processor.guides if self.job.processor is not None else []
        return row < len(guides) and guides[row].is_stopped

    def outcomes(self) -> list:
        telemetry = getattr(self.job.processor, "telemetry", None)
        return [self.job.outcome(stopped=self.stopped[row] if self.ended[row] else self.is_stopped(row),
                                 report=telemetry.report(row) if telemetry is not None else None, row=row)
                for row in range(self.job.n)]


class Batch:
    """The rows in flight: one KV cache over every row of every running job, which new jobs join
    between steps (:meth:`admit`: their prompts' prefill, merged into the cache) and which a job
    leaves once its rows have ended (:meth:`step`). Nothing is shared between jobs but the model:

      * each job's own logits processor sees only its rows' ids (its prompt and what it generated,
        never padding), so its guard reads exactly the ids it would read alone (:class:`_Rows`);
      * each job's own EOS rule (``ignore_eos``), logprob recorder (after its guard: the guarded
        distribution) and sampler (greedy, or its temperature and top_p with its own
        ``torch.Generator`` seeded with its seed);
      * each row ends on its own (EOS, a stop string, the job's ``max_tokens``, cancellation); a job
        whose rows have all ended is answered at once (``on_done``) and its rows leave the cache; a
        job whose guard raises is answered with the error (``on_failed``) and leaves, the others go
        on; an error of the model itself fails the jobs running.

    The cache is left-padded: every row's real tokens are the last ``lengths[row]`` of its
    ``width`` columns, and the attention mask and position ids are derived from ``lengths``, so a
    row reads the same positions whatever joined or left around it (its numerics still depend on
    the batch: see the README, "Serving"). Joining needs a cache whose layers are plain growing
    key/value tensors (transformers' ``DynamicCache`` of ``DynamicLayer`` s, as for Llama-family
    models); with any other cache (sliding windows, linear attention) the batch is not ``joinable``:
    new jobs wait until it is empty, and rows stay in the cache until then. ``joinable`` is None
    until the model's first forward shows which.

    **Chunked prefill**: once the cache is known to be joinable, a job whose prompt is longer than
    the engine's ``prefill_chunk`` tokens is prefilled apart, that many tokens per
    :meth:`step` (:meth:`prefill_chunk`), in its own cache, and joins when its prompt is read: a
    long prompt (an injected document) then pauses the running rows for one chunk's forward per
    step, never for its whole prefill.
    """

    def __init__(self, engine: Engine, jobs=(), on_done=None, on_failed=None):
        self.engine, self.on_done, self.on_failed = engine, on_done, on_failed
        self.pending = list(jobs)  # for generate()
        self.prefilling: list[_Rows] = []  # long prompts read a chunk per step, in their own cache
        self._clear()
        self.joinable: Optional[bool] = None
        self.cache_argument = _cache_keyword(engine.model)

    @property
    def rows(self) -> int:
        return sum(r.job.n for r in self.running + self.prefilling)

    @property
    def empty(self) -> bool:
        return not self.running and not self.prefilling

    def jobs(self) -> list:
        return [r.job for r in self.running + self.prefilling if not r.finished]

    def generate(self) -> None:
        """Run the jobs given at construction to the end, together (tests, the warm-up, benchmarks)."""
        jobs, self.pending = self.pending, []
        self.admit(jobs)
        while not self.empty:
            self.step()

    def admit(self, jobs: list) -> None:
        """Start ``jobs``: a job cancelled while queued is answered at once, never started; the others'
        prompts (``n`` rows each, left-padded to the longest) run through the model in one prefill,
        their first tokens are chosen, and their rows join the cache."""
        import torch

        for job in jobs:
            if job.cancelled.is_set():
                self.on_done(job, [job.outcome(stopped=False, row=row) for row in range(job.n)])
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        chunk = self.engine.prefill_chunk
        if self.joinable:  # long prompts: a chunk per step, apart
            self.prefilling += [_Rows(job, self.engine.model.device) for job in jobs if len(job.input_ids) > chunk]
            jobs = [job for job in jobs if len(job.input_ids) <= chunk]
        if not jobs:
            return
        engine, model = self.engine, self.engine.model
        new = [_Rows(job, model.device) for job in jobs]
        lengths = torch.tensor([r.ids.shape[1] for r in new for _ in range(r.job.n)], device=model.device)
        width = int(lengths.max())
        ids = torch.cat([torch.nn.functional.pad(r.ids, (width - r.ids.shape[1], 0), value=engine.pad_token_id)
                         for r in new])
        engine._count(batches=1, batched_rows=len(ids))
        out = self._forward(new, input_ids=ids, attention_mask=_mask(lengths, width),
                            position_ids=_positions(lengths, width), logits_to_keep=1)
        if out is None:
            return
        with self._aborting(new):
            self._enter(new, out, lengths, width)

    def step(self) -> None:
        """One step: a decoding step of every running row (the model reads each row's last token,
        each job chooses its next tokens, and the jobs that have ended leave), then one chunk of
        the first long prompt being prefilled."""
        if self.running:
            self._decode()
        if self.prefilling:
            self.prefill_chunk()

    def prefill_chunk(self) -> None:
        """Read the next ``chunk`` tokens of the first long prompt into its own cache; once its
        prompt is read, its first tokens are chosen and its rows join the running ones. A job
        cancelled meanwhile is answered as such and never joins."""
        import torch

        r = self.prefilling[0]
        if r.job.cancelled.is_set():
            self.prefilling.pop(0)
            r.finished = True
            self.on_done(r.job, r.outcomes())
            return
        done, total = r.read, r.ids.shape[1]
        end = min(total, done + self.engine.prefill_chunk)
        if done == 0:
            self.engine._count(batches=1, batched_rows=r.job.n)
        positions = torch.arange(done, end, device=r.ids.device).expand(r.job.n, -1)
        out = self._forward([r], input_ids=r.ids[:, done:end], position_ids=positions, logits_to_keep=1,
                            attention_mask=torch.ones(r.job.n, end, dtype=torch.long, device=r.ids.device),
                            **({self.cache_argument: r.cache} if r.cache is not None else {}))
        if out is None:
            self.prefilling.pop(0)
            return
        r.cache, r.read = _cache_of(out), end
        if end < total:
            return
        self.prefilling.pop(0)
        r.cache = None  # from here on, the batch's (out's cache is this chunk's: the whole prompt's)
        with self._aborting([r]):
            self._enter([r], out, torch.full((r.job.n,), total, device=r.ids.device), total)

    def _enter(self, new: list, out, lengths, width: int) -> None:
        """The prefilled ``new`` rows (their prompts read: ``out``'s cache of ``width`` columns)
        choose their first tokens and join the running ones."""
        cache = _cache_of(out)
        joinable = _joinable(cache)
        if self.joinable is None:
            self.joinable = joinable
        if self.running and not (joinable and self.joinable):  # never reached: admit() waits for rows
            raise RuntimeError("this model's cache cannot be joined")
        self._choose(new, out.logits[:, -1, :])
        self._join(new, cache, lengths, width)
        self._leave()
        with self.engine._lock:
            self.engine.counters["max_batch_rows"] = max(self.engine.counters["max_batch_rows"], self.rows)

    def _decode(self) -> None:
        import torch

        last = torch.cat([r.ids[:, -1:] for r in self.running])
        self.engine._count(steps=1)
        out = self._forward(self.running, input_ids=last, attention_mask=_mask(self.lengths + 1, self.width + 1),
                            position_ids=self.lengths[:, None], **{self.cache_argument: self.cache})
        if out is None:
            return
        with self._aborting():
            self.cache, self.lengths, self.width = _cache_of(out), self.lengths + 1, self.width + 1
            self._choose(self.running, out.logits[:, -1, :])
            self._leave()

    def _forward(self, group: list, **inputs):
        """The model's output for ``inputs``, or None when the model raised: then the jobs of
        ``group`` (the rows it ran for) fail, and the worker goes on."""
        import torch

        try:
            with torch.no_grad():
                return self.engine.model(use_cache=True, **inputs)
        except Exception as exc:
            self._abort(exc, group)
            return None

    @contextlib.contextmanager
    def _aborting(self, new=()):
        """Around the bookkeeping after a forward: an error there (a bug, never a request's input:
        a guard's errors fail only its job, in :meth:`_choose`) fails every job running or joining
        and empties the batch, so the worker keeps serving."""
        try:
            yield
        except Exception as exc:
            self._abort(exc, self.running + [r for r in new if r not in self.running])

    def _abort(self, exc: Exception, group: list) -> None:
        if any(r in self.running for r in group):
            self._clear()
        for r in group:
            if not r.finished:
                self._fail(r, exc)

    def _choose(self, group: list, logits) -> None:
        """Each job of ``group`` (whose rows are ``logits``' rows, in order) chooses and feeds its tokens."""
        first = 0
        for r in group:
            scores, first = logits[first:first + r.job.n], first + r.job.n
            if r.finished:
                continue
            try:
                r.feed(r.choose(scores), self.engine.pad_token_id)
            except Exception as exc:  # this job's guard (or sampler): only this job fails
                self._fail(r, exc)
                continue
            if all(r.ended):
                r.finished = True
                self.on_done(r.job, r.outcomes())

    def _fail(self, r: _Rows, exc: Exception) -> None:
        r.finished = True
        if self.on_failed is None:
            raise exc
        self.on_failed(r.job, exc)

    def _join(self, new: list, cache, lengths, width: int) -> None:
        """Add the prefilled ``new`` rows (their ``cache`` of ``width`` columns) to the running ones."""
        import torch

        if not self.running:
            self.running, self.cache, self.lengths, self.width = new, cache, lengths, width
            return
        total = max(self.width, width)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([_pad_left(a, total), _pad_left(b, total)]))
        self.running += new
        self.lengths, self.width = torch.cat([self.lengths, lengths]), total

    def _clear(self) -> None:
        """No running rows (``running``, in the cache's row order), no ``cache``, no ``lengths`` (per
        row: its real tokens in the cache), ``width`` 0 (the cache's columns)."""
        self.running: list[_Rows] = []
        self.cache, self.lengths, self.width = None, None, 0

    def _leave(self) -> None:
        """Drop the finished jobs' rows from the cache (a joinable one), then the columns no row needs."""
        import torch

        if not any(r.finished for r in self.running):
            return
        if all(r.finished for r in self.running):
            self._clear()
            return
        if not self.joinable:
            return
        keep, first = [], 0
        for r in self.running:
            if not r.finished:
                keep += range(first, first + r.job.n)
            first += r.job.n
        index = torch.tensor(keep, device=self.lengths.device)
        self.cache.batch_select_indices(index)
        self.running = [r for r in self.running if not r.finished]
        self.lengths = self.lengths[index]
        unused = self.width - int(self.lengths.max())
        if unused:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.width -= unused


def _mask(lengths, width: int):
    """The attention mask of rows whose real tokens are the last ``lengths[row]`` of ``width`` columns."""
    import torch

    return (torch.arange(width, device=lengths.device)[None, :] >= (width - lengths)[:, None]).long()


def _positions(lengths, width: int):
    """The position ids of rows whose real tokens are the last ``lengths[row]`` of ``width``
    columns (a padding column gets 0)."""
    import torch

    columns = torch.arange(width, device=lengths.device)[None, :]
    return (columns - (width - lengths)[:, None]).clamp(min=0)


def _pad_left(tensor, width: int):
    """A key/value tensor (batch, heads, columns, dim) with zero columns added on the left up to ``width``."""
    import torch

    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def _cache_keyword(model) -> str:
    """The name of the model's cache argument: ``cache`` (transformers 5.25 and later), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    """The cache a forward returned (``cache``, or ``past_key_values`` before transformers 5.25)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _joinable(cache) -> bool:
    """Whether rows can join and leave ``cache`` (see :class:`Batch`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


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
