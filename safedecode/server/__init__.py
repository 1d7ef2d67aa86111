"""Stage 7 — ``safedecode serve``: an OpenAI-compatible HTTP server whose every answer is guarded.

Modules (each small, one job):

* :mod:`.schemas`  — the request bodies (pydantic) and the documented size limits; per-request
  options (``safedecode`` / ``vllm_xargs``) follow the one wire format of :mod:`safedecode.integrations.wire`;
* (tool definitions become pydantic models in :mod:`safedecode.channels.tool_schemas`);
* :mod:`.worker`   — the engine interface (:class:`~.worker.EngineBase`), the embedded generation
  worker (one model, one generation at a time, streaming and cancellation) and the text that may be
  streamed;
* :mod:`.upstream` — the other engine: a vLLM OpenAI server running the safedecode plugin
  (``safedecode serve --upstream URL``), every returned token checked against the gateway's guard;
* :mod:`.app`      — the FastAPI application (endpoints, errors, server-sent events) and :func:`serve`.

FastAPI and uvicorn are imported only here, so the library itself does not need them. May import
every stage's public nouns; nothing below imports the server.
"""
