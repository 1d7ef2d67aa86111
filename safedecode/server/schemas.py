"""Request bodies of the OpenAI-compatible endpoints, and the server's documented limits.

No field is dropped silently: a field the server does not honour is refused with HTTP 400 naming
it — an unknown field, or a known one with a value the server cannot honour (penalties, a non-zero
``logit_bias``, ``parallel_tool_calls: false``...). The only fields accepted without effect are
:data:`HARMLESS_EXTRAS`: bookkeeping that changes nothing in the answer.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A request body larger than this is refused with HTTP 413 before it is parsed.
MAX_BODY_BYTES = 1 << 20
#: ``max_tokens`` above this is refused (400); the prompt plus ``max_tokens`` must fit the model.
MAX_TOKENS_LIMIT = 4096
#: Defaults when a request gives no ``max_tokens`` (OpenAI's completions default is 16).
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 256
#: At most this many stop strings of at most this many characters; at most this many tools.
MAX_STOP = 8
MAX_STOP_CHARS = 256
MAX_TOOLS = 64
#: Requests waiting for the model beyond this are refused with HTTP 503.
MAX_QUEUE = 256
#: Most choices per request (``n``), and most ``top_logprobs`` / completions ``logprobs``.
MAX_N = 8
MAX_TOP_LOGPROBS = 20
#: Fields accepted and ignored, because they change nothing in the answer: ``user`` (an end-user id),
#: ``metadata`` (tags), ``store`` (nothing is stored: the server keeps no answers), ``service_tier``
#: (one tier here). Every other field is honoured or refused with HTTP 400 naming it.
HARMLESS_EXTRAS = ("user", "metadata", "store", "service_tier")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    ignore_eos: bool = False  # vLLM's extra parameter: generate exactly max_tokens tokens
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: Optional[dict[str, Literal[0, 0.0]]] = None
    # The per-request options (safedecode.integrations.wire, the one wire format): parsed there, so the server
    # and the vLLM plugin accept exactly the same forms and give the same errors.
    safedecode: Any = None
    vllm_xargs: Optional[dict[str, Any]] = None
    # OpenAI's response_format (the wire format's field: parsed with the other options).
    response_format: Optional[dict[str, Any]] = None
    # HARMLESS_EXTRAS: accepted, no effect on the answer.
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data):
        """A top-level key that looks like ours but is not (``safedecode_policy``, ``safedecode2``)
        is refused, never ignored: a request must not run with fewer rules than it asked for; so is
        any other field this server does not honour."""
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key.startswith("safedecode") and key != "safedecode":
                    raise ValueError(f"unknown top-level key {key!r}: per-request options go in the "
                                     f"'safedecode' object, or as safedecode_* keys inside 'vllm_xargs'")
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(f"unsupported field {unknown[0]!r}: this server does not honour it, and refuses it "
                                 f"rather than ignore it (accepted without effect: {', '.join(HARMLESS_EXTRAS)})")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt string (or a list holding exactly one)."""

    prompt: Union[str, list[str]]
    echo: Literal[False] = False
    best_of: Literal[1, None] = None
    suffix: Literal[None] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)  # top alternatives per token (OpenAI: 0..5)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt string is supported per request")
            value = value[0]
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message. ``untrusted: true`` (a safedecode extension) puts it in the content channel."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    untrusted: bool = False

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[Literal["name"], str]


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ToolDef]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    parallel_tool_calls: Optional[Literal[True]] = None  # false (one call at most) is not enforced: refused
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "ToolDef",
           "MAX_BODY_BYTES", "MAX_TOKENS_LIMIT", "MAX_STOP",
           "MAX_TOOLS", "MAX_QUEUE", "MAX_N", "MAX_TOP_LOGPROBS", "HARMLESS_EXTRAS", "DEFAULT_COMPLETION_TOKENS",
           "DEFAULT_CHAT_TOKENS"]
