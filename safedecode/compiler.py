"""Policy → byte-level DFA: the compiler pipeline, one call per layer.

``parse`` (syntax) → ``resolve`` + ``build_alphabet`` (charsets) → ``build_nfa`` (nfa) →
``determinize`` (dfa) → ``to_bytes`` (utf8). The result answers, for any byte string, whether its
UTF-8 decoding contains a match of any rule — exactly as ``regex.search`` does.
"""
from __future__ import annotations

import numpy as np
import regex

from . import charsets
from .aho_corasick import phrase_dfa, plain_phrase
from .blocks import co_reachable, compose_block
from .dfa import START_STATE, CharDFA, determinize
from .errors import AutomatonTooLargeError, PolicyError
from .nfa import build_nfa
from .policy import BlockRule, LiteralRule, Policy, RegexRule
from .syntax import Alt, Chars, Node, Repeat, Seq, parse, uses_assertion
from .utf8 import ByteDFA, to_bytes

DEFAULT_MAX_STATES = 200_000  # per rule (and per component)
COMPONENT_STATES = 40_000  # most states a component of literal rules may have before it is halved
PRODUCT_BOUND = 4_000  # most states the product bound of a group of regex rules may promise


def _char_specs(node: Node, out: list) -> None:
    if isinstance(node, Chars):
        out.append(node.spec)
    elif isinstance(node, (Seq, Alt)):
        for item in node.items:
            _char_specs(item, out)
    elif isinstance(node, Repeat):
        _char_specs(node.item, out)


class _CharContext:
    """The alphabet shared by a set of parsed patterns: classes of their character sets, word and newline."""

    def __init__(self, nodes: list[Node]):
        specs: list = []
        for node in nodes:
            _char_specs(node, specs)
        charsets.prefetch_case_variants(s.value for s in specs if s.kind == "char" and s.ignore_case)
        distinct = list(dict.fromkeys(specs))
        sets = [charsets.resolve(spec) for spec in distinct]
        word_index, newline_index = len(sets), len(sets) + 1
        sets += [charsets.resolve(charsets.WORD_CHARS), charsets.resolve(charsets.NEWLINE)]
        self.alphabet = charsets.build_alphabet(sets)
        index_of = {spec: i for i, spec in enumerate(distinct)}
        classes = [frozenset(int(c) for c in self.alphabet.set_classes[i]) for i in range(len(sets))]
        self.classes_of = lambda spec: classes[index_of[spec]]
        self.word_classes = np.zeros(self.alphabet.n_classes, dtype=bool)
        self.word_classes[list(classes[word_index])] = True
        (self.newline_class,) = classes[newline_index]

    def search_dfa(self, nodes: list[Node], max_states: int, fast_path: bool = True) -> CharDFA:
        """The character DFA of "contains a match of one of ``nodes``" over this alphabet."""
        phrases = [plain_phrase(node) for node in nodes]
        if fast_path and nodes and all(p is not None for p in phrases):  # plain phrase lists: Aho–Corasick
            dfa = phrase_dfa(phrases, self.alphabet, self.word_classes)
            if dfa.n_states > max_states:
                raise AutomatonTooLargeError(f"more than {max_states} DFA states")
            return dfa
        return determinize(
            build_nfa(nodes, self.classes_of), self.alphabet, self.word_classes, self.newline_class,
            distinguish_words=any(uses_assertion(n, {"word_boundary", "not_word_boundary"}) for n in nodes),
            distinguish_newline=any(uses_assertion(n, {"dollar"}) for n in nodes),
            max_states=max_states)


def compile_nodes(nodes: list[Node], max_states: int = DEFAULT_MAX_STATES, fast_path: bool = True) -> ByteDFA:
    """Compile parsed patterns into one byte DFA for "contains a match of any of them".

    Plain phrase lists take the Aho–Corasick fast path unless ``fast_path`` is False (tests
    compare both constructions).
    """
    return to_bytes(_CharContext(nodes).search_dfa(nodes, max_states, fast_path), max_states=max_states)


def compile_block(rule: BlockRule, rule_id: str, max_states: int = DEFAULT_MAX_STATES) -> ByteDFA:
    """The byte DFA of a block rule: an ``open`` detector composed with the anchored body language."""
    opener = parse(regex.escape(rule.open), rule=rule_id)
    language = parse(rule.pattern, rule=rule_id)
    opening = parse(rule.opening_pattern, rule=rule_id) if rule.at_start else None
    context = _CharContext([opener, language] + ([opening] if opening else []))
    try:
        grammar = context.search_dfa([language], max_states)
        if not co_reachable(grammar.trans)[START_STATE]:
            raise PolicyError(f"rule {rule_id}: the block's body and close match no text at all "
                              f"(forbid the opening tag as a literal instead)")
        dfa = compose_block(context.search_dfa([opener], max_states), grammar,
                            context.search_dfa([opening], max_states) if opening else None)
        return to_bytes(dfa, max_states=max_states)
    except AutomatonTooLargeError:
        raise _too_large(rule_id, max_states) from None


def _too_large(rule_id: str, max_states: int) -> AutomatonTooLargeError:
    return AutomatonTooLargeError(
        f"rule {rule_id}: its DFA exceeds the state limit of {max_states}; simplify the pattern "
        f"(broad counted repeats such as .{{0,200}} blow up) or raise max_states")


def compile_components(policy: Policy, max_states: int = DEFAULT_MAX_STATES,
                       component_states: int = COMPONENT_STATES,
                       progress=None) -> list[tuple[ByteDFA, list[int]]]:
    """Split the policy into components whose union DFAs stay small; return (DFA, rule indices) each.

    The text contains a match of some rule iff some component's DFA says so, so running the
    components side by side (a product automaton, evaluated lazily by the kernel) is exact.

    * Literal rules combine additively (an Aho–Corasick-like union), so they form one component,
      halved only if it still exceeds ``component_states``.
    * Regex rules can multiply each other's states — gaps (``curl.*\\| *sh``) remember what
      they saw, counted runs (``sk-[A-Za-z0-9]{20,}``, ``AKIA[0-9A-Z]{16}``) count in parallel. A
      union DFA never has more states than the product of its parts, so regex rules are compiled
      one by one and packed greedily (largest first) into groups whose product of
      character-level sizes stays within ``PRODUCT_BOUND``.
    * Block rules are each a component of their own (:func:`compile_block`).

    ``progress``, if given, is called as ``progress(rules_done, rules)`` as rules are compiled.
    """
    ids = policy.rule_ids()
    nodes = [parse(rule.pattern, rule.ignore_case, rule_id) for rule, rule_id in zip(policy.forbid, ids)]
    literal = [i for i, rule in enumerate(policy.forbid) if isinstance(rule, LiteralRule)]
    regexes = [i for i, rule in enumerate(policy.forbid) if isinstance(rule, RegexRule)]
    tick = progress or (lambda done, total: None)
    components = _split_compile(literal, nodes, ids, component_states, max_states)
    tick(len(literal), len(nodes))
    alone = {}
    for n, i in enumerate(regexes, 1):
        try:
            alone[i] = compile_nodes([nodes[i]], max_states)
        except AutomatonTooLargeError:
            raise _too_large(ids[i], max_states) from None
        tick(len(literal) + n, len(nodes))
    groups: list[tuple[int, list[int]]] = []  # (product bound, rule indices)
    for i in sorted(regexes, key=lambda k: -alone[k].char_states):
        size = max(alone[i].char_states, 2)
        for g, (bound, members) in enumerate(groups):
            if bound * size <= PRODUCT_BOUND:
                groups[g] = (bound * size, members + [i])
                break
        else:
            groups.append((size, [i]))
    for _, members in groups:
        dfa = alone[members[0]] if len(members) == 1 else compile_nodes([nodes[i] for i in members], max_states)
        components.append((dfa, sorted(members)))
    for i, rule in enumerate(policy.forbid):  # a block is a positive grammar: always its own component
        if isinstance(rule, BlockRule):
            components.append((compile_block(rule, ids[i], max_states), [i]))
    tick(len(nodes), len(nodes))
    return components


def _split_compile(indices, nodes, ids, limit, max_states) -> list[tuple[ByteDFA, list[int]]]:
    """Compile ``indices`` as one component, halving the set until each part fits ``limit``."""
    if not indices:
        return []
    group = [nodes[i] for i in indices]
    plain = all(plain_phrase(node) is not None for node in group)
    # Aho–Corasick unions grow linearly with the phrases; others may not, so keep them small.
    cap = max_states if len(indices) == 1 or plain else limit
    try:
        return [(compile_nodes(group, cap), indices)]
    except AutomatonTooLargeError:
        if len(indices) == 1:
            raise _too_large(ids[indices[0]], max_states) from None
    half = len(indices) // 2
    return (_split_compile(indices[:half], nodes, ids, limit, max_states)
            + _split_compile(indices[half:], nodes, ids, limit, max_states))


def compile_policy_dfa(policy: Policy, max_states: int = DEFAULT_MAX_STATES) -> ByteDFA:
    """The single byte DFA of a whole policy (tests and verification); refused if over the limit."""
    ids = policy.rule_ids()
    if any(isinstance(rule, BlockRule) for rule in policy.forbid):
        raise PolicyError("a policy with block rules has no single-DFA form; use compile_components")
    nodes = [parse(rule.pattern, rule.ignore_case, rule_id) for rule, rule_id in zip(policy.forbid, ids)]
    try:
        return compile_nodes(nodes, max_states)
    except AutomatonTooLargeError:
        for rule_id, node in zip(ids, nodes):
            try:
                compile_nodes([node], max_states)
            except AutomatonTooLargeError:
                raise _too_large(rule_id, max_states) from None
        raise AutomatonTooLargeError(
            f"the combination of the policy's {len(nodes)} rules exceeds the state limit of {max_states} "
            f"DFA states (each rule alone fits); split the policy or raise max_states") from None
