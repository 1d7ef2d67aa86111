"""Policy → byte-level DFA: the compiler pipeline, one call per layer.

``parse`` (syntax) → ``resolve`` + ``build_alphabet`` (charsets) → ``build_nfa`` (nfa) →
``determinize`` (dfa) → ``to_bytes`` (utf8). The result answers, for any byte string, whether its
UTF-8 decoding contains a match of any rule — exactly as ``regex.search`` does.
"""
from __future__ import annotations

import numpy as np

from . import charsets
from .dfa import determinize
from .errors import AutomatonTooLargeError
from .nfa import build_nfa
from .policy import Policy
from .syntax import Alt, Chars, Node, Repeat, Seq, parse, uses_assertion
from .utf8 import ByteDFA, to_bytes

DEFAULT_MAX_STATES = 200_000


def _char_specs(node: Node, out: list) -> None:
    if isinstance(node, Chars):
        out.append(node.spec)
    elif isinstance(node, (Seq, Alt)):
        for item in node.items:
            _char_specs(item, out)
    elif isinstance(node, Repeat):
        _char_specs(node.item, out)


def compile_nodes(nodes: list[Node], max_states: int = DEFAULT_MAX_STATES) -> ByteDFA:
    """Compile parsed patterns into one byte DFA for "contains a match of any of them"."""
    specs: list = []
    for node in nodes:
        _char_specs(node, specs)
    charsets.prefetch_case_variants(s.value for s in specs if s.kind == "char" and s.ignore_case)
    distinct = list(dict.fromkeys(specs))
    sets = [charsets.resolve(spec) for spec in distinct]
    word_index, newline_index = len(sets), len(sets) + 1
    sets += [charsets.resolve(charsets.WORD_CHARS), charsets.resolve(charsets.NEWLINE)]
    alphabet = charsets.build_alphabet(sets)
    index_of = {spec: i for i, spec in enumerate(distinct)}
    classes = [frozenset(int(c) for c in alphabet.set_classes[i]) for i in range(len(sets))]
    nfa = build_nfa(nodes, lambda spec: classes[index_of[spec]])
    word_classes = np.zeros(alphabet.n_classes, dtype=bool)
    word_classes[list(classes[word_index])] = True
    (newline_class,) = classes[newline_index]
    dfa = determinize(
        nfa, alphabet, word_classes, newline_class,
        distinguish_words=any(uses_assertion(n, {"word_boundary", "not_word_boundary"}) for n in nodes),
        distinguish_newline=any(uses_assertion(n, {"dollar"}) for n in nodes),
        max_states=max_states)
    return to_bytes(dfa, max_states=max_states)


def compile_policy_dfa(policy: Policy, max_states: int = DEFAULT_MAX_STATES) -> ByteDFA:
    """The byte DFA of a whole policy; an over-limit policy is refused naming the culprit rule."""
    ids = policy.rule_ids()
    nodes = [parse(rule.pattern, rule.ignore_case, rule_id) for rule, rule_id in zip(policy.forbid, ids)]
    try:
        return compile_nodes(nodes, max_states)
    except AutomatonTooLargeError:
        for rule_id, node in zip(ids, nodes):
            try:
                compile_nodes([node], max_states)
            except AutomatonTooLargeError:
                raise AutomatonTooLargeError(
                    f"rule {rule_id}: its DFA exceeds the state limit of {max_states}; simplify the pattern "
                    f"(broad counted repeats such as .{{0,200}} blow up) or raise max_states") from None
        raise AutomatonTooLargeError(
            f"the combination of the policy's {len(nodes)} rules exceeds the state limit of {max_states} "
            f"DFA states (each rule alone fits); split the policy or raise max_states") from None
