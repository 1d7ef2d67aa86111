"""The FastAPI application: OpenAI-compatible endpoints, every answer guarded.

Endpoints: ``GET /health`` (engine counters), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``).

A chat request becomes a :class:`~safedecode.Conversation`: system/developer and user messages are
trusted, messages marked untrusted and every ``tool`` message go into the content channel (a tool
result with source ``tool:<name>``), and the answer is generated under
``Conversation.guard(policy, tools, allow_hosts, tool_choice)``. A completion request (a raw
prompt) is generated under the policy alone. The policy is the server's ``--policy`` plus whatever
the request adds (:mod:`safedecode.integrations.wire`, the one wire format).

The answer comes from an engine (:class:`~.worker.EngineBase`): the embedded worker, or a vLLM
server (:mod:`.upstream`, ``--upstream URL``) that receives the same guard as wire options; the
request preparation and the response formatting here are the same for both.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): a bad request or
policy → 400 with safedecode's own message, an unknown model → 404, a body over
:data:`~.schemas.MAX_BODY_BYTES` or an inline policy over its limits → 413, a full queue → 503, an
upstream unreachable or failing → 502, or not answering in time → 504. A streamed request waits for
its first event, so an error before any text is an HTTP error too.
Request preparation (prompt encoding, guard compilation) runs on one helper thread, generation on
the engine's worker thread, so the event loop only moves bytes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from ..extras import require

require("fastapi", "server", "safedecode serve")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from ..channels.conversation import Conversation
from ..channels.tool_schemas import call_json, tool_models
from ..channels.tools import ToolCallError, declare_tools, parse_tool_calls
from ..errors import AutomatonTooLargeError, SafeDecodeError
from ..integrations.wire import REQUEST_LIMITS, PolicyTooLargeError, RequestOptions, output_type_of, policy_parts
from ..integrations.wire import parse as parse_options
from ..policy.rules import Policy
from .schemas import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    MAX_BODY_BYTES,
    MAX_QUEUE,
    MAX_TOKENS_LIMIT,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
)
from .upstream import UpstreamError
from .worker import Engine, EngineBase, Job, Outcome, ServerBusyError, TextTracker


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
             500: "internal_error", 502: "upstream_error", 503: "server_busy", 504: "upstream_timeout"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @classmethod
    def of(cls, exc: Exception) -> "ApiError":
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, (PolicyTooLargeError, AutomatonTooLargeError)):
            return cls(413, str(exc))
        if isinstance(exc, ServerBusyError):
            return cls(503, str(exc))
        if isinstance(exc, UpstreamError):
            return cls(exc.status, str(exc))
        if isinstance(exc, ToolCallError):  # impossible under the guard: a server fault, not the client's
            return cls(500, f"invalid tool call in the output: {exc}")
        if isinstance(exc, SafeDecodeError):
            return cls(400, str(exc))
        return cls(500, f"internal error: {type(exc).__name__}: {exc}")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "error"), "param": None,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before anything parses it.
    The body is read (bounded) and replayed; later ``receive`` calls (disconnect) pass through."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        body, more = b"", True
        while more and (declared is None or int(declared) <= self.limit) and len(body) <= self.limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        size = int(declared) if declared is not None and int(declared) > self.limit else len(body)
        if size > self.limit:
            error = ApiError(413, f"request body of {size} bytes; the limit is {self.limit} bytes")
            return await error.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class Prepared:
    """A job ready for the engine, and what formatting its answer needs."""

    job: Job
    kind: str                # "chat" or "completion"
    tools: dict              # tool name → pydantic model (chat with tools)
    format: Any = None       # the ChatFormat (chat)
    trusted_text: Optional[str] = None  # the conversation's trusted text: FromTrusted is re-checked on parse
    output: Any = None       # the response_format's OutputType: each answer must be one complete document


class Server:
    """The application's state: the engine (embedded or upstream: :class:`~.worker.EngineBase`), the
    model's chat format and the default policy."""

    def __init__(self, engine: EngineBase, model_name: str, default_policy: Optional[Policy] = None):
        from ..channels.chat_format import detect_chat_format

        self.engine, self.model_name, self.default_policy = engine, model_name, default_policy
        self.created = int(time.time())
        self.policy_names = policy_names() if engine.remote else {}
        self.prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safedecode-prepare")
        try:
            self.format, self.format_error = detect_chat_format(engine.tokenizer), None
        except SafeDecodeError as exc:  # completions still work; chat answers 400 with the reason
            self.format, self.format_error = None, exc

    # -- preparing a request (on the helper thread) -------------------------------------------
    def _budget(self, default: int, prompt_tokens: int, max_tokens: Optional[int]) -> int:
        """The request's token budget, checked against the server limit and the model's context."""
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty")
        max_tokens = max_tokens or default
        if max_tokens > MAX_TOKENS_LIMIT:
            raise ApiError(400, f"max_tokens={max_tokens}: the limit is {MAX_TOKENS_LIMIT}")
        if prompt_tokens + max_tokens > self.engine.context_length:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context length of {self.engine.context_length} tokens")
        return max_tokens

    def _options(self, body) -> RequestOptions:
        """The request's options (the one wire format, with the top-level ``response_format``), and
        what this engine cannot honour refused."""
        options = parse_options(body.safedecode, body.vllm_xargs, default=self.default_policy,
                                response_format=body.response_format)
        if body.stream and body.n > 1:
            raise ApiError(400, f"n={body.n} with stream: streaming answers one choice; ask without stream, or n=1")
        if body.stream and body.logprobs is not None and body.logprobs is not False:
            raise ApiError(400, "logprobs with stream: logprobs come with non-streamed answers only")
        if self.engine.remote and not self.engine.guarded_logprobs and body.logprobs is not None \
                and body.logprobs is not False:
            raise ApiError(400, "logprobs: the upstream vLLM reports the raw model distribution (its default "
                                "--logprobs-mode raw_logprobs), where a token the guard masks still has a finite "
                                "logprob; start vLLM with --logprobs-mode processed_logprobs to get the guarded one")
        if options.guard is not None:
            raise ApiError(400, "safedecode.guard: the server builds the conversation's guard itself; the guard "
                                "object is for engines that receive token ids (the vLLM plugin)")
        if not self.engine.remote:
            return options
        if options.telemetry_options():
            raise ApiError(400, "safedecode.report, safedecode.stop_threshold: not available behind --upstream "
                                "(the guard runs inside vLLM, which does not return the blocked mass)")
        # The policies as the upstream will parse them (names, inline rules): the gateway's own copy of
        # the guard is then compiled from the very parts the vLLM plugin compiles.
        remote = parse_options({"policy": policy_wire(options, self.policy_names)})
        return dataclasses.replace(options, parts=remote.parts, budgets=remote.budgets)

    def _job(self, body, ids, processor, tracker, max_tokens, wire: Optional[dict] = None) -> Job:
        """The engine's job; ``wire``: the guard as wire options, for an engine that guards remotely."""
        logprobs = body.logprobs if isinstance(body, CompletionRequest) else \
            (body.top_logprobs or 0) if body.logprobs else None
        return Job(input_ids=ids, processor=processor, tracker=tracker, max_tokens=max_tokens,
                   temperature=body.temperature, top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos,
                   stream=body.stream, wire=wire, n=body.n, logprobs=logprobs)

    @staticmethod
    def _wire(options: RequestOptions, wire: dict) -> dict:
        """``wire`` with the request's ``response_format`` (the upstream compiles the same document rule)."""
        if options.response_format is not None:
            wire["response_format"] = options.response_format.wire()
        return wire

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        from ..adapters.processor import SafeLogitsProcessor
        from ..engine.compiled import compile_parts
        from ..tokens.vocabulary import vocabulary_of

        options = self._options(body)
        if options.channel_options:
            raise ApiError(400, f"{', '.join(options.channel_options)}: these options apply to "
                                f"/v1/chat/completions only")
        tokenizer = self.engine.tokenizer
        ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        max_tokens = self._budget(DEFAULT_COMPLETION_TOKENS, len(ids), body.max_tokens)
        policy = options.policy
        parts, budgets = policy_parts(options, guard=False)
        compiled = compile_parts(list(parts), tokenizer, budgets=budgets, max_states=REQUEST_LIMITS.max_states)
        guarded = compiled is not None
        processor = SafeLogitsProcessor(compiled, **options.telemetry_options()) if guarded \
            else None
        vocabulary = processor.compiled.vocabulary if processor else vocabulary_of(tokenizer)
        tracker = TextTracker(vocabulary, body.stop, policy=policy)
        wire = self._wire(options, {"policy": policy_wire(options, self.policy_names)}) \
            if guarded and self.engine.remote else None
        return Prepared(self._job(body, ids, processor, tracker, max_tokens, wire), "completion", {},
                        output=output_type_of(options))

    def prepare_chat(self, body: ChatRequest) -> Prepared:
        if self.format is None:
            raise ApiError(400, f"chat is not available for this model: {self.format_error}")
        options = self._options(body)
        conversation = build_conversation(Conversation(self.engine.tokenizer, self.format), body.messages, options)
        models, choice = _tool_choice(tool_models(body.tools), body.tool_choice)
        if options.response_format is not None and models:
            raise ApiError(400, "response_format with tools: the answer is either one document or tool calls; "
                                "send one of them")
        encoded = conversation.encode(models or None)
        parts, budgets = policy_parts(options, guard=True, trusted_text=conversation.trusted_text)
        what = dict(policy=parts, tools=models or None, allow_hosts=options.allow_hosts,
                    leak_window=options.leak_window, tool_choice=choice)
        guard = conversation.guard(**what, max_states=REQUEST_LIMITS.max_states, budget=budgets,
                                   **options.telemetry_options())
        pause = self.format.tool_call_open.strip() if models else None
        tracker = TextTracker(guard.compiled.vocabulary, body.stop, pause=pause, policy=guard.compiled.policy)
        max_tokens = self._budget(DEFAULT_CHAT_TOKENS, len(encoded), body.max_completion_tokens or body.max_tokens)
        wire = None
        if self.engine.remote:  # the same guard as data: the spec Conversation.guard compiled, and the policies
            chosen = {m.__name__ for m in models}
            definitions = [t.model_dump(exclude_none=True) for t in body.tools or () if t.function.name in chosen]
            wire = self._wire(options, dict(conversation.guard_spec(**what).to_wire(definitions),
                                            policy=policy_wire(options, self.policy_names)))
        job = self._job(body, list(encoded.input_ids), guard, tracker, max_tokens, wire)
        return Prepared(job, "chat", declare_tools(models), self.format, conversation.trusted_text,
                        output=output_type_of(options, conversation.trusted_text))

    # -- answering ---------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} not found; this server serves {self.model_name!r}")

    async def answer(self, request: Request, body, prepare) -> Any:
        self.check_model(body.model)
        loop = asyncio.get_running_loop()
        try:
            with self.engine.arriving():
                prepared = await loop.run_in_executor(self.prepare_pool, prepare, body)
                job = self.engine.submit(prepared.job)
        except Exception as exc:
            raise ApiError.of(exc) from None
        reply = Reply(prepared, self.model_name, body.include_usage)
        while True:  # wait for the first event (a stream's first delta, else the answer); a client that
            try:     # went away cancels the generation
                kind, value = await asyncio.wait_for(job.next_event(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return JSONResponse({}, status_code=499)
        if kind == "error":  # before anything was sent: an HTTP error, streamed or not
            raise ApiError.of(value)
        if body.stream:
            return StreamingResponse(reply.events((kind, value)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return reply.response(value)
        except SafeDecodeError as exc:
            raise ApiError.of(exc) from None


class Reply:
    """Formats one job's answer as an OpenAI response or as a stream of chunks."""

    def __init__(self, prepared: Prepared, model: str, include_usage: bool):
        self.prepared, self.model, self.include_usage = prepared, model, include_usage
        chat = prepared.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _tool_calls(self, outcome: Outcome) -> list[dict]:
        fmt, tools = self.prepared.format, self.prepared.tools
        if not tools:
            return []
        calls = parse_tool_calls(outcome.text, tools, fmt.tool_call_open, fmt.tool_call_close,
                                 fmt.tool_call_arguments_key, trusted_text=self.prepared.trusted_text)
        return [{"id": "call_" + secrets.token_hex(12), "type": "function", "function": call_json(c)} for c in calls]

    @staticmethod
    def _usage(outcomes: list) -> dict:
        completion = sum(o.completion_tokens for o in outcomes)
        return {"prompt_tokens": outcomes[0].prompt_tokens, "completion_tokens": completion,
                "total_tokens": outcomes[0].prompt_tokens + completion}

    def _envelope(self, choices: list, chunk: bool = False, **extra) -> dict:
        kind = self.object + (".chunk" if chunk and self.prepared.kind == "chat" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [dict({"index": 0, "logprobs": None}, **choice) for choice in choices], **extra}

    def _finish(self, outcome: Outcome, calls: list) -> str:
        """The choice's finish reason: ``tool_calls`` with calls; with a response_format, an answer
        that ended without completing its document is never presented as one: ``content_filter``
        (the guard left it nothing else), as :func:`safedecode.generate` does."""
        if calls:
            return "tool_calls"
        output = self.prepared.output
        if output is not None and outcome.finish_reason == "stop":
            from ..channels.output_types import OutputTypeError

            try:
                output.parse(outcome.content)
            except OutputTypeError:
                return "content_filter"
        return outcome.finish_reason

    def _logprobs(self, outcome: Outcome) -> Optional[dict]:
        """OpenAI's logprobs object of a choice (chat: ``content``; completions: the legacy lists)."""
        if outcome.logprobs is None:
            return None
        vocabulary = self.prepared.job.tracker.vocabulary

        def spelled(token: int) -> tuple[str, list[int]]:
            raw = vocabulary.token_bytes[token] or b""
            return raw.decode("utf-8", errors="replace"), list(raw)

        if self.prepared.kind == "chat":
            content = []
            for token, logprob, top in outcome.logprobs:
                text, raw = spelled(token)
                content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": [
                    dict(zip(("token", "bytes"), spelled(i)), logprob=lp) for i, lp in top]})
            return {"content": content, "refusal": None}
        tokens, offsets, offset = [], [], 0
        for token, _, _ in outcome.logprobs:
            tokens.append(spelled(token)[0])
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in outcome.logprobs],
                "top_logprobs": [{spelled(i)[0]: lp for i, lp in top} for _, _, top in outcome.logprobs],
                "text_offset": offsets}

    def response(self, outcomes: list) -> dict:
        choices = []
        for outcome in outcomes:
            calls = self._tool_calls(outcome)
            finish = self._finish(outcome, calls)
            if self.prepared.kind == "completion":
                choice = {"text": outcome.text, "finish_reason": finish}
            else:
                content = outcome.content if outcome.content.strip() or not calls else None
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choice = {"message": message, "finish_reason": finish}
            choices.append(dict(choice, index=outcome.index, logprobs=self._logprobs(outcome)))
        reports = [o.report for o in outcomes]
        extra = {"safedecode": {"report": reports[0] if len(reports) == 1 else reports}} \
            if reports[0] is not None else {}
        return self._envelope(choices, usage=self._usage(outcomes), **extra)

    def _chunk(self, text: Optional[str] = None, finish: Optional[str] = None, **delta) -> str:
        if self.prepared.kind == "completion":
            choice = {"text": text or "", "finish_reason": finish}
        else:
            choice = {"delta": dict(delta, **({"content": text} if text is not None else {})), "finish_reason": finish}
        return _sse(self._envelope([choice], chunk=True))

    def _closing_chunks(self, outcomes: list) -> list[str]:
        """What a stream (one choice) sends once the generation is over: the rest of the content,
        the tool calls, the finish reason and (if asked) the usage."""
        (outcome,) = outcomes
        calls = self._tool_calls(outcome)
        chunks = [self._chunk(outcome.rest)] if outcome.rest else []
        if calls:
            chunks.append(self._chunk(tool_calls=[dict(call, index=i) for i, call in enumerate(calls)]))
        chunks.append(self._chunk(finish=self._finish(outcome, calls)))
        if self.include_usage:
            chunks.append(_sse(self._envelope([], chunk=True, usage=self._usage(outcomes))))
        return chunks

    async def events(self, first: tuple[str, Any]):
        """The server-sent events of a streamed answer, from its ``first`` event on; leaving early
        (disconnect) cancels the job."""
        job = self.prepared.job
        try:
            if self.prepared.kind == "chat":
                yield self._chunk("", role="assistant")
            event = first
            while event[0] == "delta":
                yield self._chunk(event[1])
                event = await job.next_event()
            kind, value = event
            try:
                chunks = self._closing_chunks(value) if kind == "done" else [_sse(ApiError.of(value).body())]
            except SafeDecodeError as exc:
                chunks = [_sse(ApiError.of(exc).body())]
            for chunk in chunks:
                yield chunk
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op once the job is done; stops it if the client went away


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_conversation(conversation: Conversation, messages: list[ChatMessage], options: RequestOptions) -> Conversation:
    """Messages → segments: system/developer/user trusted, untrusted ones and every ``tool`` message
    in the content channel (source ``tool:<name>``), assistant turns with their tool calls re-rendered."""
    bad = sorted(i for i in options.untrusted if not 0 <= i < len(messages))
    if bad:
        raise ApiError(400, f"safedecode.untrusted: message indices {bad} out of range (0..{len(messages) - 1})")
    fmt = conversation.format
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if message.role == "tool":
            name = message.name or call_names.get(message.tool_call_id or "") or "result"
            conversation.content(message.text, source=f"tool:{name}"[:64])
        elif message.untrusted or i in options.untrusted:
            if message.role == "assistant":
                raise ApiError(400, f"messages[{i}]: an assistant message cannot be marked untrusted")
            conversation.content(message.text, source=message.name or "document")
        elif message.role in ("system", "developer"):
            conversation.system(message.text)
        elif message.role == "user":
            conversation.user(message.text)
        else:
            calls = []
            for j, call in enumerate(message.tool_calls or ()):
                try:
                    function = call["function"]
                    arguments = function.get("arguments") or "{}"
                    payload = {"name": function["name"],
                               fmt.tool_call_arguments_key: json.loads(arguments) if isinstance(arguments, str) else arguments}
                except (KeyError, TypeError, json.JSONDecodeError) as exc:
                    raise ApiError(400, f"messages[{i}].tool_calls[{j}]: not a valid function call: {exc}") from None
                call_names[str(call.get("id", ""))] = function["name"]
                calls.append(fmt.tool_call_open + json.dumps(payload, ensure_ascii=False) + fmt.tool_call_close)
            conversation.assistant("\n".join([message.text] * bool(message.text) + calls))
    return conversation


def policy_wire(options: RequestOptions, names: dict) -> list:
    """The request's policies (``options.parts``: the server default, each named policy, the inline
    rules) as the wire format's ``policy`` list for an upstream engine: a trusted part (no work
    budget) by its name in ``names`` (:func:`policy_names`), otherwise inline."""
    return [names[part.digest()] if budget is None and part.digest() in names
            else part.model_dump(mode="json", exclude={"description"})
            for part, budget in zip(options.parts, options.budgets)]


def policy_names() -> dict:
    """``{digest: name}`` of the shipped and configured policies."""
    from ..policy.rules import available_policies, named_policy

    return {named_policy(name).digest(): name for name in available_policies()}


def _tool_choice(models: list, choice) -> tuple[list, str]:
    """OpenAI's tool_choice → (tools the guard may allow, the guard's tool_choice)."""
    if choice is None or isinstance(choice, str):
        return models, choice or "auto"
    name = choice.function.get("name")
    chosen = [m for m in models if m.__name__ == name]
    if not chosen:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the request's tools")
    return chosen, "required"


def create_app(server: Server) -> FastAPI:
    """The FastAPI application serving ``server``'s model."""
    app = FastAPI(title="safedecode", description=__doc__.splitlines()[0])
    app.add_middleware(BodyLimit)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}").response()
        where = ".".join(str(p) for p in err["loc"] if p != "body")
        message = err["msg"].removeprefix("Value error, ")
        return ApiError(400, f"{where}: {message}" if where else message).response()

    @app.get("/health")
    async def health():
        return dict(status="ok", model=server.model_name, **server.engine.stats())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "safedecode"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        server.check_model(name)
        return {"id": name, "object": "model", "created": server.created, "owned_by": "safedecode"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.answer(request, body, server.prepare_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await server.answer(request, body, server.prepare_chat)

    return app


def serve(model: Optional[str] = None, policy=None, host: str = "127.0.0.1", port: int = 8000,
          max_queue: Optional[int] = None, log_level: str = "info", upstream: Optional[str] = None,
          upstream_timeout: float = 600.0, max_batch: int = 16, dtype: str = "float32") -> int:
    """Load the model (or connect to the ``upstream`` vLLM server), warm the guard up, and serve until
    interrupted (``safedecode serve``). ``model``: the embedded engine's model (default: the embedded
    SmolLM2); with ``upstream``, where the upstream model's tokenizer is (default: the directory vLLM
    reports). ``max_batch``: the embedded engine's most rows (choices) generated together; ``dtype``:
    its model's (``"float32"`` or ``"bfloat16"``)."""
    require("uvicorn", "server", "safedecode serve")
    import uvicorn

    from ..policy.rules import load_policy

    default_policy = load_policy(policy) if policy else None  # a name or a path (the one resolver)
    if upstream:
        from .upstream import UpstreamEngine

        engine: EngineBase = UpstreamEngine.connect(upstream, model, max_queue=max_queue or MAX_QUEUE,
                                                    timeout=upstream_timeout)
        name = engine.model_name
    else:
        from .worker import load_model

        model_obj, tokenizer, name = load_model(model or "default", dtype)
        engine = Engine(model_obj, tokenizer, max_queue=max_queue or MAX_QUEUE, max_batch=max_batch)
    server = Server(engine, name, default_policy)
    try:
        warm_up(server)
        uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
    finally:
        engine.close()
    return 0


def warm_up(server: Server) -> None:
    """Compile the request-independent guards and run one token, so the first request is fast."""
    body = dict(model=server.model_name, max_tokens=1, temperature=0)
    prepared = (server.prepare_chat(ChatRequest(messages=[{"role": "user", "content": "Hi"}], **body))
                if server.format is not None else server.prepare_completion(CompletionRequest(prompt="Hi", **body)))
    server.engine.run(prepared.job)


__all__ = ["create_app", "serve", "Server", "ApiError", "build_conversation", "warm_up"]
