"""The policy contract: does a text (or the text of some bytes) violate a policy?

The reference semantics is ``safedecode.find_violations``: a match of any rule's ``pattern`` by the
``regex`` package, on DESIGN §1's text of the bytes (:func:`.text_oracle.text_of`: UTF-8, U+FFFD for
invalid bytes, an incomplete sequence at the very end not yet a character). :class:`PolicyOracle`
gives the same verdict fast enough to judge every candidate token of an adversarial run:

* a plain literal rule (no ``ignore_case``, ``whole_word`` or ``variants``) by substring search —
  what ``regex.search`` of the escaped literal without flags is;
* every other literal or regex rule by its own ``regex`` pattern, compiled once (never merged into
  an alternation: inline flags and group numbers stay the rule's own);
* block rules by ``find_violations`` on a policy of the block rules alone (partial matching);
* document rules (output types) by the ``regex`` package's partial ``fullmatch`` of their language,
  here: the text must still be a prefix of a word of it.
"""
from __future__ import annotations

import regex

from safedecode import Policy, find_violations
from safedecode.policy import BlockRule, DocumentRule, LiteralRule

from .text_oracle import text_of


class PolicyOracle:
    """``oracle(data)``: whether the text of ``data`` (bytes) contains a match of ``policy``;
    ``oracle.violates_text(text)`` for a text."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.literals: list[str] = []
        self.patterns: list = []
        blocks = []
        self.documents = []
        for rule in policy.forbid:
            if isinstance(rule, BlockRule):
                blocks.append(rule)
            elif isinstance(rule, DocumentRule):
                self.documents.append(regex.compile(rule.document))
            elif isinstance(rule, LiteralRule) and not (rule.ignore_case or rule.whole_word or rule.variants):
                self.literals.append(rule.literal)
            else:
                self.patterns.append(regex.compile(rule.pattern, rule.flags))
        self.blocks = Policy(forbid=blocks) if blocks else None

    def violates_text(self, text: str) -> bool:
        return (any(literal in text for literal in self.literals)
                or any(pattern.search(text) for pattern in self.patterns)
                or (self.blocks is not None and bool(find_violations(self.blocks, text)))
                or any(not document.fullmatch(text, partial=True) for document in self.documents))

    def complete(self, text: str) -> bool:
        """Whether ``text`` is a whole word of every document rule (EOS may end it)."""
        return all(document.fullmatch(text) for document in self.documents)

    def __call__(self, data: bytes) -> bool:
        return self.violates_text(text_of(data))


def forbidden_alternatives(policy: Policy, content) -> int:
    """How many ``top_logprobs`` alternatives of an OpenAI chat ``logprobs.content`` would complete a
    match of ``policy`` after the answer so far (``find_violations`` on the decoded bytes), asserting
    on the way that every reported logprob is finite and the alternatives hold at most all the mass."""
    count, prefix = 0, b""
    for step in content:
        assert step.top_logprobs and step.logprob > float("-inf")
        assert sum(2.718281828459045 ** t.logprob for t in step.top_logprobs) <= 1.0 + 1e-4
        for alternative in step.top_logprobs:
            assert alternative.logprob > float("-inf")
            count += bool(find_violations(policy, text_of(prefix + bytes(alternative.bytes))))
        prefix += bytes(step.bytes)
    return count

