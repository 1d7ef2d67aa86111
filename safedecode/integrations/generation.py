"""``safedecode.generate``: one call from a prompt (or chat messages) to guarded text.

It builds the :class:`~safedecode.adapters.processor.SafeLogitsProcessor`, runs ``model.generate`` and
returns :class:`GenerationResult` objects whose ``.text`` is the text the guarantee is about: the
generated tokens' bytes, concatenated and decoded as UTF-8 with replacement (DESIGN §1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import LogitsProcessorList

from ..adapters.processor import SafeLogitsProcessor
from ..engine.compiled import CompiledPolicy
from ..policy.rules import Policy, load_policy

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class GenerationResult:
    """One generated sequence. ``str(result)`` is its text."""

    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_REASONS (see finish_reason)
    extra: dict[str, Any] = field(default_factory=dict)
    tool_calls: list = field(default_factory=list)  # validated pydantic instances (Conversation + tools)
    #: With ``output_type``: the validated value (a model instance, the parsed JSON, the matched text,
    #: the Literal value or Enum member), or None when the answer is not a complete document (then
    #: ``finish_reason`` is ``"length"`` or ``"content_filter"`` and ``extra["output_error"]`` says why).
    parsed: Any = None
    report: Optional[dict] = None  # blocked-mass telemetry (telemetry=True): see safedecode.adapters.telemetry

    def __str__(self) -> str:
        return self.text


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _as_batch(prompt_or_messages) -> tuple[list, bool]:
    """Normalize the input to a list of prompts/message lists; report whether it was a batch."""
    if isinstance(prompt_or_messages, str) or _is_messages(prompt_or_messages):
        return [prompt_or_messages], False
    if isinstance(prompt_or_messages, (list, tuple)) and prompt_or_messages and all(
            isinstance(p, str) or _is_messages(p) for p in prompt_or_messages):
        return list(prompt_or_messages), True
    raise TypeError("prompt_or_messages must be a string, a list of chat messages ({'role', 'content'} dicts), "
                    "or a list of either (a batch)")


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages were given but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _as_policy(policy) -> Union[Policy, CompiledPolicy]:
    if isinstance(policy, (Policy, CompiledPolicy)):
        return policy
    if isinstance(policy, (str, Path)):
        return load_policy(policy)
    if isinstance(policy, dict):
        return Policy(**policy)
    raise TypeError(f"policy must be a safedecode.Policy, a path to a TOML policy, or a dict; got {type(policy).__name__}")


TELEMETRY_OPTIONS = ("telemetry", "stop_threshold", "stop_after", "audit_log")


def generate(model, tokenizer, prompt_or_messages, policy=None, *, tools=None, allow_hosts=(),
             leak_window=None, tool_choice: str = "auto", output_type=None, **generate_kwargs):
    """Generate under ``policy``; returns a :class:`GenerationResult` (a list of them for a batch).

    ``prompt_or_messages``: a prompt string, a list of chat messages (rendered with the tokenizer's
    chat template), a list of either for a batch (left-padded), or a
    :class:`~safedecode.Conversation` — then the conversation's guard runs (``policy``, ``tools``,
    ``allow_hosts``, ``leak_window``, ``tool_choice``: see :meth:`Conversation.guard`) and the
    result's ``tool_calls`` holds the validated calls. ``generate_kwargs`` go to
    ``model.generate`` (``max_new_tokens`` defaults to 128, decoding to greedy); a
    ``logits_processor`` list given there runs before the guard. ``telemetry=True`` (and
    ``stop_threshold``, ``stop_after``, ``audit_log``: see :mod:`safedecode.adapters.telemetry`) fills each
    result's ``report`` with the probability mass the guard removed and the rules that removed it.

    ``output_type`` (a pydantic model class, a JSON schema dict, a regex, ``typing.Literal`` or an
    ``Enum``: see :mod:`safedecode.channels.output_types`) makes the whole answer one value of that
    type, under the same automaton as the policy and the guard; each result's ``parsed`` holds the
    validated value.
    """
    from ..channels.conversation import Conversation
    from ..channels.output_types import output_type as as_output_type

    options = {k: generate_kwargs.pop(k) for k in TELEMETRY_OPTIONS if k in generate_kwargs}
    if isinstance(prompt_or_messages, Conversation):
        shape = None if output_type is None else as_output_type(output_type, prompt_or_messages.trusted_text)
        return _generate_conversation(model, prompt_or_messages, policy, tools, allow_hosts, leak_window,
                                      tool_choice, generate_kwargs, options, shape)
    if tools or allow_hosts or leak_window is not None or tool_choice != "auto":
        raise TypeError("tools, allow_hosts, leak_window and tool_choice need a safedecode.Conversation prompt")
    if policy is None and output_type is None:
        raise TypeError("generate(model, tokenizer, prompt, policy): a policy (or an output_type) is required "
                        "for a plain prompt")
    shape = None if output_type is None else as_output_type(output_type)
    policy = _as_policy(policy) if policy is not None else None
    if shape is not None:
        policy = shape.policy(policy.policy if isinstance(policy, CompiledPolicy) else policy)
    prompts, batched = _as_batch(prompt_or_messages)
    processor = SafeLogitsProcessor(policy, tokenizer, **options)
    texts = [_render(tokenizer, p) for p in prompts]
    add_special = not all(isinstance(p, (list, tuple)) for p in prompts)  # the template already has them
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tokenizer.padding_side = padding_side
    results = _run(model, tokenizer, encoded, processor, generate_kwargs, shape)
    return results if batched or generate_kwargs.get("num_return_sequences", 1) > 1 else results[0]


def _generate_conversation(model, conversation, policy, tools, allow_hosts, leak_window, tool_choice, kwargs,
                           options, shape=None):
    """One guarded generation for a Conversation, with its tool calls parsed and validated."""
    from ..channels.tools import declare_tools, parse_tool_calls

    policy = _as_policy(policy) if policy is not None else None
    if isinstance(policy, CompiledPolicy):
        policy = policy.policy
    if shape is not None:
        if tools:
            raise TypeError("output_type and tools cannot be combined: the answer is either one document or tool calls")
        policy = [p for p in (policy, Policy(forbid=[shape.rule()])) if p is not None]
    encoded = conversation.encode(tools)
    processor = conversation.guard(policy=policy, tools=tools, allow_hosts=allow_hosts,
                                   leak_window=leak_window, tool_choice=tool_choice, **options)
    kwargs = dict(kwargs)
    kwargs.setdefault("eos_token_id", list(processor.compiled.eos_ids))
    ids = torch.tensor([encoded.input_ids])
    (result,) = _run(model, conversation.tokenizer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                     processor, kwargs, shape)
    fmt = conversation.format
    result.tool_calls = parse_tool_calls(result.text, declare_tools(tools), fmt.tool_call_open, fmt.tool_call_close,
                                         fmt.tool_call_arguments_key,
                                         trusted_text=conversation.trusted_text) if tools else []
    return result


def _run(model, tokenizer, encoded, processor: SafeLogitsProcessor, generate_kwargs, shape=None) -> list:
    """``model.generate`` with ``processor`` last; one result per row (grouped per prompt when
    ``num_return_sequences`` > 1), parsed as ``shape`` (an output type) if given."""
    device = getattr(model, "device", torch.device("cpu"))
    encoded = {k: v.to(device) for k, v in encoded.items()}
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    kwargs.setdefault("do_sample", False)
    if kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(processor)
    with torch.no_grad():
        output = model.generate(**encoded, logits_processor=processors, **kwargs)
    prompt_length = encoded["input_ids"].shape[1]
    vocabulary = processor.compiled.vocabulary
    num_return = kwargs.get("num_return_sequences", 1)
    guides = processor.guides
    results = []
    telemetry = processor.telemetry
    for row, sequence in enumerate(output[:, prompt_length:].tolist()):
        report = telemetry.report(row) if telemetry is not None else None
        results.append(_result(sequence, vocabulary, stopped=row < len(guides) and guides[row].is_stopped))
        results[-1].report = report
        if shape is not None:
            _parse(results[-1], shape)
    if num_return > 1:
        results = [results[i:i + num_return] for i in range(0, len(results), num_return)]
    return results


def _result(sequence: list[int], vocabulary, stopped: bool) -> GenerationResult:
    """Cut at the first EOS and take the text of the ids before it (DESIGN §1)."""
    kept = []
    for token in sequence:
        if token in vocabulary.eos_ids:
            break
        kept.append(token)
    return GenerationResult(text=vocabulary.text(kept), token_ids=kept,
                            finish_reason=finish_reason(ended=len(kept) < len(sequence), stopped=stopped))


def _parse(result: GenerationResult, shape) -> None:
    """Fill ``result.parsed``; an answer that ended without completing its document is never
    presented as one: it finishes as ``"content_filter"`` (the guard left it nothing else)."""
    from ..channels.output_types import OutputTypeError

    try:
        result.parsed = shape.parse(result.text)
    except OutputTypeError as exc:
        result.extra["output_error"] = str(exc)
        if result.finish_reason == "stop":
            result.finish_reason = "content_filter"


FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls")


def finish_reason(*, ended: bool, stopped: bool) -> str:
    """Why a generation ended, in OpenAI's vocabulary (the one :func:`generate` and the server use):
    ``"content_filter"`` when the guard failed closed (a forbidden token got through another
    processor, or telemetry's early stop: the row could only end), else ``"stop"`` when it ended by
    itself (EOS, end of turn, a stop string), else ``"length"``. The server answers
    ``"tool_calls"`` when the answer holds tool calls."""
    return "content_filter" if stopped else "stop" if ended else "length"
