"""The output guard of a request: a :class:`~.spec.GuardSpec` compiled into one policy automaton.

:func:`compile_guard` compiles, with the same engine and the same exactness, the product of:

  * **control tokens**: every special id except EOS and end-of-turn is masked in every state, and
    their text (``<|im_start|>`` written with ordinary tokens) is a forbidden phrase, as are the
    tool-result tags (the output cannot fake a tool response);
  * **delimiters and nonce**: the content delimiter markers (any case and spacing, and near misses
    such as ``<<untrustable``) and the request's nonce (any case);
  * **system-prompt leaks**: every ``leak_window``-character span of the system text (so no span of
    that length or more can be copied verbatim); default :data:`DEFAULT_LEAK_WINDOW`;
  * **links**: URLs, markdown links/images and autolinks only to ``allow_hosts``
    (:mod:`safedecode.channels.exfil`);
  * **tool calls**: with ``tools``, a call must name a declared tool with schema-valid arguments
    (:mod:`safedecode.channels.tools`, a block rule); without tools the tool-call tag itself is forbidden;
    ``tool_choice="required"`` makes the output one or more calls and nothing else, ``"none"``
    forbids calls;
  * everything the user's ``policy`` forbids.

The request-independent rules form one policy that is compiled once and cached (memory and
disk); the nonce and the system-prompt spans form a small per-request policy. The two run side by
side (:func:`safedecode.engine.compiled.combine`).

Why 24 characters: long enough that common phrasing shared with a system prompt ("you are a
helpful assistant" has 27 characters, but an answer rarely repeats it whole) passes, short enough
that any sentence-length copy — or a secret of 24+ characters — cannot leave. Lower it for prompts
holding short secrets (a 10-character password needs ``leak_window <= 10``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import regex

from ..automata.negation import departure_regex
from ..engine.compiled import CompiledPolicy, combine, compile_policy
from ..errors import PolicyError
from ..policy.automaton import DEFAULT_MAX_STATES, DEFAULT_WORK_BUDGET
from ..policy.rules import DocumentRule, Policy
from ..tokens.vocabulary import Vocabulary, vocabulary_of
from .chat_format import ChatFormat
from .exfil import exfiltration_rules
from .spec import DEFAULT_LEAK_WINDOW, TOOL_CHOICES, GuardSpec
from .tools import ToolError, escaped_spelling_rules, tool_call_regex


def guard_vocabulary(tokenizer, chat_format: ChatFormat) -> Vocabulary:
    """The tokenizer's vocabulary with the format's end-of-turn token counted as EOS."""
    vocabulary = vocabulary_of(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(chat_format.end_of_turn)
    if not isinstance(end_of_turn, int) or end_of_turn in vocabulary.eos_ids or end_of_turn >= vocabulary.size:
        return vocabulary
    return dataclasses.replace(vocabulary, eos_ids=vocabulary.eos_ids | {end_of_turn})


def channel_policy(spec: GuardSpec) -> Policy:
    """The channel rules: control tokens and their text, delimiters, links, tool calls (cacheable)."""
    fmt = spec.format
    texts = set(fmt.control_tokens) | {fmt.tool_result_open.strip(), fmt.tool_result_close.strip()}
    rules = [{"id": "channel:control-text", "literal": t} for t in sorted(texts) if t]
    # The delimiters' markers in any case and spacing, and near misses ("<<untrustable").
    rules.append({"id": "channel:delimiter", "regex": r"<<\s*/?\s*untrust", "ignore_case": True})
    rules += exfiltration_rules(spec.allow_hosts)
    rules += _tool_rules(spec)
    return Policy(forbid=rules, special_tokens="forbid")


def user_policy(policy: Optional[Policy], calls_possible: bool) -> Optional[Policy]:
    """A user policy as the guard enforces it: its rules, plus (when a tool call is possible) their
    companions over the JSON-escaped spelling, so that they apply to the decoded value of every
    string in a call (:func:`safedecode.channels.tools.escaped_spelling_rules`; they apply to the whole
    output, so with tools a forbidden phrase spelled with ``\\"``/``\\\\`` outside a call is
    refused too — as a CommonMark renderer would show it). Special tokens are the channel part's job."""
    if policy is None or not policy.forbid:
        return None
    companions = escaped_spelling_rules(policy) if calls_possible else []
    return Policy(forbid=list(policy.forbid) + companions)


def static_policy(spec: GuardSpec) -> Policy:
    """The request-independent part of the guard, as one policy: the channel rules and the spec's
    policies as :func:`user_policy` enforces them (the guard compiles them as separate parts)."""
    channel = channel_policy(spec)
    users = [user_policy(policy, _calls_possible(channel, spec.policies)) for policy in spec.policies]
    return Policy(forbid=list(channel.forbid) + [rule for user in users if user for rule in user.forbid],
                  special_tokens="forbid")


def _calls_possible(channel: Policy, policies=()) -> bool:
    """Whether the output may hold JSON strings whose decoded values rules must govern: a tool call
    is possible, or a policy has a JSON document rule (an output type)."""
    return (any(rule.id == "tool:call" for rule in channel.forbid)
            or any(isinstance(rule, DocumentRule) and rule.json_strings for p in policies for rule in p.forbid))


def request_policy(spec: GuardSpec, calls_possible: bool = False) -> Policy:
    """The per-request part: the nonce and every ``leak_window``-character span of the system text.
    With ``calls_possible``, a span holding ``"`` or ``\\`` is also forbidden in its JSON-escaped
    spelling (:func:`~safedecode.channels.tools.escaped_spelling_rules`): a tool argument's decoded value
    must not copy it either."""
    system, leak_window = spec.system_text, spec.leak_window
    spans = sorted({system[i:i + leak_window] for i in range(len(system) - leak_window + 1)})
    rules = [{"id": "channel:nonce", "literal": spec.nonce, "ignore_case": True}]
    rules += [{"id": "channel:system-leak", "literal": span} for span in spans if span.strip()]
    if calls_possible:
        escapable = [rule for rule in rules if '"' in rule["literal"] or "\\" in rule["literal"]]
        rules += escaped_spelling_rules(Policy(forbid=escapable)) if escapable else []
    return Policy(forbid=rules)


def _tool_rules(spec: GuardSpec) -> list[dict]:
    """The tool-call block rule (and ``tool:only-calls``), or ``tool:none``."""
    fmt, declared, tool_choice = spec.format, spec.tools, spec.tool_choice
    open_tag, close_tag = fmt.tool_call_open.strip(), fmt.tool_call_close.strip()
    if any(token in open_tag for token in fmt.control_tokens):
        if declared:
            raise ToolError(f"chat format {fmt.name!r} opens a tool call with a control token ({open_tag!r}); "
                            f"guarded tool calls need a format whose tool-call tags are text (e.g. chatml)")
        return []  # the control token itself is masked: no call can start
    body = tool_call_regex(declared, spec.trusted_text, fmt.tool_call_arguments_key) if declared else None
    if body is None or tool_choice == "none":  # no tool may (or can) be called: the tag itself is forbidden
        if tool_choice == "required":
            raise ToolError("tool_choice='required' but no tool can be called (no tools, or a required "
                            "FromTrusted field has no value in the trusted text)")
        return [{"id": "tool:none", "literal": open_tag}]
    rules = [{"id": "tool:call", "open": open_tag, "body": rf"[ \n]?(?:{body})[ \n]?", "close": close_tag,
              "at_start": tool_choice == "required"}]
    if tool_choice == "required" and close_tag:  # calls only: after a call, another call or the end
        after = departure_regex([(open_tag, None), ("\n" + open_tag, None)])
        rules.append({"id": "tool:only-calls", "regex": regex.escape(close_tag) + after})
    return rules


def compile_guard(spec: GuardSpec, tokenizer, *, max_states: int = DEFAULT_MAX_STATES,
                  budget=DEFAULT_WORK_BUDGET) -> CompiledPolicy:
    """The guard of ``spec`` compiled against ``tokenizer``'s vocabulary (end of turn counted as EOS).

    Parts, run side by side: the channel rules (cached), each of the spec's policies (cached, so a
    shipped policy is not recompiled when a request adds inline rules) and the per-request nonce and
    system-prompt spans. ``max_states`` bounds the compilation of every part, ``budget`` the work
    of compiling each policy (an int, None for unbounded, or one per policy): servers pass their
    request limits, so an over-large request is refused by the one compilation itself, as soon as a
    limit is passed."""
    vocabulary = guard_vocabulary(tokenizer, spec.format)
    channel = channel_policy(spec)
    calls_possible = _calls_possible(channel, spec.policies)
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(spec.policies)
    if len(budgets) != len(spec.policies):
        raise PolicyError(f"budget: {len(budgets)} budgets for {len(spec.policies)} policies")
    parts = [compile_policy(channel, vocabulary, max_states=max_states)]
    for item, item_budget in zip(spec.policies, budgets):
        user = user_policy(item, calls_possible)
        if user is not None:
            parts.append(compile_policy(user, vocabulary, max_states=max_states, budget=item_budget))
    parts.append(compile_policy(request_policy(spec, calls_possible), vocabulary, cache_dir=False,
                                max_states=max_states))
    return combine(parts)


__all__ = ["DEFAULT_LEAK_WINDOW", "TOOL_CHOICES", "compile_guard", "channel_policy", "user_policy", "static_policy", "request_policy",
           "guard_vocabulary"]
