"""The upstream engine: ``safedecode serve --upstream URL`` in front of a vLLM OpenAI server.

The server prepares every request exactly as for the embedded engine (the same
:class:`~safedecode.Conversation`, prompt token ids, guard and :class:`~.worker.TextTracker`); this
engine sends the token ids to vLLM's ``/v1/completions`` with the guard as per-request options
(``vllm_xargs: {"safedecode": <the job's wire options>}``: the conversation's
``GuardSpec.to_wire()`` and the request's policies), so the safedecode vLLM plugin compiles the same
guard as ``Conversation.guard``. vLLM streams the token ids back (``return_token_ids``); each one is

* **checked** against the gateway's own copy of the guard (a :class:`~safedecode.engine.Guide`): a
  token the guard forbids — an upstream without the plugin, or with another tokenizer — ends the
  request with HTTP 502, and its text is never sent;
* **fed** to the job (:meth:`~.worker.Job.feed`): the same text rule, stop strings, streaming and
  tool-call parsing as the embedded engine.

At start (:meth:`UpstreamEngine.connect`) the gateway reads the served model and its context
length from ``/v1/models``, loads the tokenizer locally (``--model``, or the local directory vLLM
reports; never downloads), checks that vLLM tokenizes a probe text to the same ids (``/tokenize``),
that a request with an invalid safedecode config is refused (the plugin is loaded), and whether vLLM
reports logprobs after the logits processors (``--logprobs-mode processed_logprobs``): one token
under a guard that forbids every character, with its top logprobs — a token that guard masks listed
with a finite logprob means raw logprobs, and the gateway then refuses ``logprobs`` with 400 saying so.
With guarded logprobs, each token's alternatives are checked against the gateway's guard like the
tokens: a masked one reported with a finite logprob ends the request with 502; masked ones at
vLLM's floor (-9999) are dropped, as they have probability 0. Upstream
failures answer 502 (unreachable, an error, a forbidden token) or 504 (no answer within the
timeout), naming the upstream; vLLM's own 400 (safedecode's message) is passed on as 400.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from ..errors import SafeDecodeError
from ..extras import require
from .worker import EngineBase, Job, Outcome

#: Probe text of the start-up checks: plain text, a control token's spelling, non-ASCII.
PROBE_TEXT = "Hello, world! Café <|im_start|> 日本語 🙂 x = 42"
#: A config the plugin must refuse (an unknown key): a 200 means no plugin guards the upstream.
PROBE_CONFIG = json.dumps({"policy_probe": "safedecode gateway start-up check"})
#: The logprobs probe's policy: every character is forbidden (left: EOS, and tokens whose bytes are
#: an incomplete UTF-8 sequence, which add no character yet).
PROBE_POLICY = {"forbid": [{"regex": "[\\s\\S]", "id": "logprobs-probe"}]}
#: What vLLM's OpenAI server reports for a logprob of -inf (it clamps them to this).
MASKED_LOGPROB = -9999.0


class UpstreamError(SafeDecodeError):
    """The upstream failed or refused: ``status`` is the HTTP status the client gets (400, 502, 504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UpstreamEngine(EngineBase):
    """Runs :class:`Job` s on a vLLM OpenAI server; many at once (vLLM batches them).
    ``transport``: an ``httpx`` transport (tests), default the network."""

    remote = True

    def __init__(self, url: str, tokenizer, model_name: str, context_length: int, max_queue: int,
                 timeout: float = 600.0, transport=None):
        super().__init__(tokenizer, context_length, max_queue)
        self.url, self.model_name, self.timeout, self.transport = url.rstrip("/"), model_name, timeout, transport
        self._tasks: set = set()

    # -- start-up ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str, model: Optional[str] = None, max_queue: int = 256, timeout: float = 600.0,
                transport=None) -> "UpstreamEngine":
        """The engine for the vLLM server at ``url``, checked (see the module docstring). ``model``:
        ``"default"`` (the embedded SmolLM2's tokenizer) or a local model directory; None: the
        directory vLLM reports for its model. Raises :class:`UpstreamError` with the reason."""
        require("httpx", "server", "safedecode serve --upstream")
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise UpstreamError(502, f"--upstream {url!r}: expected an http:// or https:// URL of a vLLM OpenAI server")
        listing = _sync_call(url, "GET", "/v1/models", None, timeout, transport)
        models = listing.get("data") or []
        if len(models) != 1:
            raise UpstreamError(502, f"upstream {url} serves {len(models)} models; the gateway needs exactly one")
        card = models[0]
        tokenizer = load_tokenizer(model, card.get("root"), card["id"])
        engine = cls(url, tokenizer, card["id"], int(card.get("max_model_len") or 1 << 30), max_queue, timeout,
                     transport)
        engine._check_tokenizer()
        engine._check_plugin()
        engine.guarded_logprobs = engine._probe_logprobs()
        return engine

    def _check_tokenizer(self) -> None:
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        theirs = _sync_call(self.url, "POST", "/tokenize", {"model": self.model_name, "prompt": PROBE_TEXT,
                                                            "add_special_tokens": False},
                            self.timeout, self.transport)
        if list(theirs.get("tokens") or []) != list(ids):
            raise UpstreamError(502, f"upstream {self.url} tokenizes {PROBE_TEXT!r} as {theirs.get('tokens')}, the "
                                     f"gateway's tokenizer as {ids}: give --model the upstream model's directory")

    def _check_plugin(self) -> None:
        body = {"model": self.model_name, "prompt": self.tokenizer("Hi")["input_ids"], "max_tokens": 1,
                "vllm_xargs": {"safedecode": PROBE_CONFIG}}
        try:
            _sync_call(self.url, "POST", "/v1/completions", body, self.timeout, self.transport)
        except UpstreamError as exc:
            if exc.status == 400 and "policy_probe" in str(exc):
                return
            raise
        raise UpstreamError(502, f"upstream {self.url} accepted an invalid safedecode config: the safedecode vLLM "
                                 f"plugin is not loaded there (install safedecode in vLLM's environment)")

    def _probe_logprobs(self) -> bool:
        """Whether vLLM reports logprobs after the logits processors (module docstring): the top
        alternatives of one greedy token after "Hi" under :data:`PROBE_POLICY`, judged by the
        gateway's own copy of that guard — with raw logprobs, masked text tokens lead the list."""
        from ..engine.compiled import compile_policy
        from ..engine.guide import Guide
        from ..policy.rules import Policy

        body = {"model": self.model_name, "prompt": self.tokenizer("Hi")["input_ids"], "max_tokens": 1,
                "temperature": 0, "logprobs": 5, "return_tokens_as_token_ids": True,
                "vllm_xargs": {"safedecode": json.dumps({"policy": PROBE_POLICY})}}
        answer = _sync_call(self.url, "POST", "/v1/completions", body, self.timeout, self.transport)
        choices = answer.get("choices") or [{}]
        top = ((choices[0].get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if not top:
            raise UpstreamError(502, f"upstream {self.url} answered the logprobs probe without logprobs")
        guide = Guide(compile_policy(Policy(**PROBE_POLICY), self.tokenizer))
        return not any(value > MASKED_LOGPROB and guide.violating_components(_token_id(key, self.url))
                       for key, value in top.items())

    # -- the engine interface ------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Start ``job`` now (from the event loop); :class:`ServerBusyError` when ``max_queue`` run."""
        self._admit(job, "queued", "running")
        task = job.loop.create_task(self._serve(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def run(self, job: Job) -> list:
        """Generate ``job`` to the end, outside a running event loop (the warm-up)."""
        return asyncio.run(self.generate(job))

    def close(self) -> None:
        for task in list(self._tasks):
            try:
                task.cancel()
            except RuntimeError:  # its event loop is already closed
                pass

    async def _serve(self, job: Job) -> None:
        self._count(queued=-1, running=1)
        try:
            outcome = await self.generate(job)
        except asyncio.CancelledError:
            job.cancel()
            self._failed(job, UpstreamError(502, f"the gateway stopped while upstream {self.url} answered"))
            raise
        except Exception as exc:  # reported to the request as an API error, never a traceback
            self._failed(job, self._error(exc))
        else:
            self._finished(job, outcome)

    async def generate(self, job: Job) -> list:
        """Stream ``job`` from the upstream: check and feed every token id (module docstring). Its
        ``n`` choices are vLLM's ``n`` sequences (each its own guarded row in the plugin); each
        choice's tokens are checked with its own copy of the guard."""
        import httpx

        from ..engine.guide import Guide

        guides = [Guide(job.processor.compiled) if job.processor is not None else None for _ in range(job.n)]
        eos = job.tracker.vocabulary.eos_ids
        body = {"model": self.model_name, "prompt": list(job.input_ids), "max_tokens": job.max_tokens,
                "temperature": job.temperature, "top_p": job.top_p, "ignore_eos": job.ignore_eos,
                "stop_token_ids": sorted(eos), "stream": True, "return_token_ids": True}
        if job.n > 1:
            body["n"] = job.n
        if job.seed is not None:
            body["seed"] = job.seed
        if job.logprobs is not None:  # (the server refuses logprobs unless they are guarded)
            body["logprobs"], body["return_tokens_as_token_ids"] = job.logprobs, True
        if job.wire is not None:
            body["vllm_xargs"] = {"safedecode": json.dumps(job.wire, ensure_ascii=False)}
        ended = [False] * job.n
        finished = [False] * job.n  # the row ended here (a stop string) or upstream (finish_reason)
        async with httpx.AsyncClient(transport=self.transport, timeout=self._timeout()) as client:
            async with client.stream("POST", self.url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _refusal(self.url, response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = _json(data, self.url)
                    if "error" in chunk:
                        raise UpstreamError(502, f"upstream {self.url} failed: {_message(chunk)}")
                    for choice in chunk.get("choices") or ():
                        row = choice.get("index", 0)
                        if not isinstance(row, int) or not 0 <= row < job.n:
                            raise UpstreamError(502, f"upstream {self.url} sent choice index {row!r} for a "
                                                     f"request of {job.n} choice(s)")
                        if finished[row]:
                            continue  # ended here (a stop string): the rest of that row is not used
                        ids = choice.get("token_ids")
                        if ids is None and choice.get("text"):
                            raise UpstreamError(502, f"upstream {self.url} sent text without token ids: it must "
                                                     f"support return_token_ids (vLLM >= 0.10)")
                        logprobs = self._logprobs(job, choice, len(ids or ()))
                        for j, token in enumerate(ids or ()):
                            entry = self._entry(guides[row], token, eos, logprobs, j, job.logprobs) if logprobs \
                                else None
                            if not self._allowed(guides[row], token, eos):
                                raise UpstreamError(502, f"upstream {self.url} sent token {token}, which the guard "
                                                         f"forbids here: is the safedecode vLLM plugin loaded there, "
                                                         f"with the same tokenizer?")
                            if job.feed(token, row, logprob=entry):
                                finished[row] = True
                                break
                        reason = choice.get("finish_reason")
                        if reason is not None and not finished[row]:
                            if reason not in ("stop", "length"):
                                raise UpstreamError(502, f"upstream {self.url} ended the answer with "
                                                         f"finish_reason={reason!r}")
                            ended[row], finished[row] = reason == "stop", True
                    if all(finished) or job.cancelled.is_set():
                        break  # leaving the block closes the connection: vLLM aborts the request
        return [job.outcome(stopped=guides[row] is not None and guides[row].is_stopped, ended=ended[row], row=row)
                for row in range(job.n)]

    def _logprobs(self, job: Job, choice: dict, count: int) -> Optional[tuple]:
        """The chunk's (token_logprobs, top_logprobs) lists, one entry per token id, when asked."""
        if job.logprobs is None:
            return None
        block = choice.get("logprobs") or {}
        values, tops = block.get("token_logprobs") or [], block.get("top_logprobs") or [None] * count
        if len(values) != count or len(tops) != count:
            raise UpstreamError(502, f"upstream {self.url} sent {len(values)} logprobs for {count} token ids")
        return values, tops

    def _entry(self, guide, token: int, eos, logprobs: tuple, j: int, top: int) -> tuple:
        """The job's logprob entry of the ``j``-th token of a chunk, ``(token, logprob, [(id, logprob)])``,
        its alternatives checked against the guard *before* the token is appended: one the guard masks
        must be at vLLM's floor (dropped: probability 0), never finite (502)."""
        values, tops = logprobs
        alternatives = []
        for key, value in (tops[j] or {}).items():
            alt = _token_id(key, self.url)
            if value <= MASKED_LOGPROB:
                continue
            if guide is not None and alt not in eos and guide.violating_components(alt):
                raise UpstreamError(502, f"upstream {self.url} reported a finite logprob for token {alt}, which the "
                                         f"guard masks: are its logprobs processed (--logprobs-mode processed_logprobs)?")
            alternatives.append((alt, float(value)))
        alternatives.sort(key=lambda item: -item[1])
        value = values[j]
        return token, float(value) if value is not None and value > MASKED_LOGPROB else float("-inf"), \
            alternatives[:top]

    @staticmethod
    def _allowed(guide, token: int, eos) -> bool:
        """Whether the guard allows ``token`` next (EOS always: it adds no text); advances the guard."""
        if guide is None or token in eos:
            return True
        if guide.violating_components(token):
            return False
        guide.advance(token)
        return True

    def _timeout(self):
        import httpx

        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))

    def _error(self, exc: Exception) -> Exception:
        """An exception of a generation as what the client gets (:class:`UpstreamError` for transport failures)."""
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(504, f"upstream {self.url} did not answer within {self.timeout:g} s "
                                      f"({type(exc).__name__})")
        if isinstance(exc, httpx.HTTPError):
            return UpstreamError(502, f"upstream {self.url} could not be reached or failed: "
                                      f"{type(exc).__name__}: {exc}")
        return exc


def load_tokenizer(model: Optional[str], root: Optional[str], served: str):
    """The upstream model's tokenizer, never downloaded: ``model`` (``"default"``: the embedded
    SmolLM2's; a local directory; or a model name already in the local Hugging Face cache), or when
    None what vLLM reports as the model's ``root`` (its directory or name)."""
    if model == "default":
        from ..models import load_default_tokenizer

        return load_default_tokenizer()
    spec = model or root
    if spec:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        reason = "vLLM reports no model root"
    where = f"--model {model!r}" if model else f"vLLM's model root {root!r}"
    raise UpstreamError(502, f"cannot load the tokenizer of upstream model {served!r} from {where} (not a local "
                             f"model directory nor in the local Hugging Face cache; nothing is downloaded: "
                             f"{reason}); give --model DIR (the upstream model's files)")


def _sync_call(url: str, method: str, path: str, body: Optional[dict], timeout: float, transport) -> Any:
    """One start-up request to the upstream, its JSON answer (UpstreamError otherwise)."""
    import httpx

    try:
        with httpx.Client(transport=transport, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0))) as c:
            response = c.request(method, url + path, json=body)
    except httpx.TimeoutException as exc:
        raise UpstreamError(504, f"upstream {url} did not answer {path} within {timeout:g} s ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        raise UpstreamError(502, f"upstream {url} could not be reached: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise _refusal(url, response, path)
    return _json(response.text, url)


def _refusal(url: str, response, path: str = "/v1/completions") -> UpstreamError:
    """An upstream's non-200 answer: its 400 (a refused config, with safedecode's message) stays 400."""
    try:
        message = _message(response.json())
    except ValueError:
        message = response.text[:500]
    status = 400 if response.status_code == 400 else 502
    return UpstreamError(status, f"upstream {url}{path} answered {response.status_code}: {message}")


def _token_id(key: str, url: str) -> int:
    """A logprobs key of vLLM's ``return_tokens_as_token_ids`` (``token_id:42``) as the id."""
    if isinstance(key, str) and key.startswith("token_id:") and key[9:].isdigit():
        return int(key[9:])
    raise UpstreamError(502, f"upstream {url} sent logprobs keyed {key!r}, not token ids: it must support "
                             f"return_tokens_as_token_ids")


def _message(payload: Any) -> str:
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _json(text: str, url: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise UpstreamError(502, f"upstream {url} sent something that is not JSON: {text[:200]!r}") from None


__all__ = ["UpstreamEngine", "UpstreamError", "load_tokenizer"]
