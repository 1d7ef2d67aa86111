"""Policy → byte-level DFA: the compiler pipeline, one call per layer.

``parse`` (syntax) → ``resolve`` + ``build_alphabet`` (charsets) → ``build_nfa`` (nfa) →
``determinize`` (dfa) → ``to_bytes`` (utf8). The result answers, for any byte string, whether its
UTF-8 decoding contains a match of any rule — exactly as ``regex.search`` does.
"""
from __future__ import annotations

import numpy as np
import regex

from ..automata import charsets
from ..automata.aho_corasick import phrase_dfa, plain_phrase, sequence_dfa, set_sequence
from ..automata.blocks import co_reachable, compose_block
from ..automata.dfa import START_STATE, CharDFA, determinize
from ..automata.documents import can_complete, compose_document, shortest_completion
from ..automata.nfa import build_nfa
from ..automata.syntax import (
    DEFAULT_WORK_BUDGET,
    SERVER_WORK_BUDGET,
    Alt,
    Budget,
    BudgetExceededError,
    Chars,
    CharSpec,
    Node,
    Repeat,
    Seq,
    budget_or_unlimited,
    parse,
    uses_assertion,
)
from ..automata.utf8 import ByteDFA, to_bytes
from ..errors import AutomatonTooLargeError, PolicyError
from .rules import BlockRule, DocumentRule, LiteralRule, Policy, RegexRule

DEFAULT_MAX_STATES = 200_000  # per rule (and per component)
COMPONENT_STATES = 40_000  # most states a component of literal rules may have before it is halved
PRODUCT_BOUND = 4_000  # most states the product bound of a group of regex rules may promise

__all__ = ["Budget", "BudgetExceededError", "DEFAULT_WORK_BUDGET", "SERVER_WORK_BUDGET", "DEFAULT_MAX_STATES",
           "compile_components", "compile_nodes", "compile_block", "compile_document", "compile_policy_dfa"]


def _char_specs(node: Node, out: list) -> None:
    """Append the CharSpec of every atom of ``node``, in order; a plain literal character (the bulk
    of a phrase list) as its code point, which hashes much faster than the dataclass."""
    if isinstance(node, Chars):
        spec = node.spec
        out.append(spec.value if spec.kind == "char" and not spec.ignore_case else spec)
    elif isinstance(node, (Seq, Alt)):
        for item in node.items:
            _char_specs(item, out)
    elif isinstance(node, Repeat):
        _char_specs(node.item, out)


class _CharContext:
    """The alphabet shared by a set of parsed patterns: classes of their character sets, word and newline."""

    def __init__(self, nodes: list[Node], budget: Budget = None):
        self.budget = budget = budget_or_unlimited(budget)
        specs: list = []  # CharSpecs, and plain literal characters as their code points
        for node in nodes:
            _char_specs(node, specs)
        budget.spend(len(specs) // 4)
        distinct = [CharSpec("char", s, False) if isinstance(s, int) else s for s in dict.fromkeys(specs)]
        charsets.prefetch_case_variants((s.value for s in distinct if s.kind == "char" and s.ignore_case), budget)
        sets = [charsets.resolve(spec, budget) for spec in distinct]
        word_index, newline_index = len(sets), len(sets) + 1
        sets += [charsets.resolve(charsets.WORD_CHARS, budget), charsets.resolve(charsets.NEWLINE)]
        budget.spend(len(sets) * (1 + sum(map(len, sets)) // 100))  # the partition: sets × cut points
        self.alphabet = charsets.build_alphabet(sets)
        index_of = {spec: i for i, spec in enumerate(distinct)}
        classes = [frozenset(int(c) for c in self.alphabet.set_classes[i]) for i in range(len(sets))]
        self.classes_of = lambda spec: classes[index_of[spec]]
        self.word_classes = np.zeros(self.alphabet.n_classes, dtype=bool)
        self.word_classes[list(classes[word_index])] = True
        (self.newline_class,) = classes[newline_index]

    def search_dfa(self, nodes: list[Node], max_states: int, fast_path: bool = True) -> CharDFA:
        """The character DFA of "contains a match of one of ``nodes``" over this alphabet."""
        budget = self.budget
        phrases = [plain_phrase(node) for node in nodes]
        if fast_path and nodes and all(p is not None for p in phrases):  # plain phrase lists: Aho–Corasick
            dfa = phrase_dfa(phrases, self.alphabet, self.word_classes, budget)
            if dfa.n_states > max_states:
                raise AutomatonTooLargeError(f"more than {max_states} DFA states")
            return dfa
        sequences = [set_sequence(node) for node in nodes]
        if fast_path and nodes and all(s is not None for s in sequences):  # e.g. ignore_case literals
            return sequence_dfa([[self.classes_of(spec) for spec in seq] for seq in sequences], self.alphabet,
                                self.word_classes, max_states, budget)
        return determinize(
            build_nfa(nodes, self.classes_of, budget=budget), self.alphabet, self.word_classes, self.newline_class,
            distinguish_words=any(uses_assertion(n, {"word_boundary", "not_word_boundary"}) for n in nodes),
            distinguish_newline=any(uses_assertion(n, {"dollar"}) for n in nodes),
            max_states=max_states, budget=budget)


def compile_nodes(nodes: list[Node], max_states: int = DEFAULT_MAX_STATES, fast_path: bool = True,
                  budget: Budget = None) -> ByteDFA:
    """Compile parsed patterns into one byte DFA for "contains a match of any of them".

    Plain phrase lists take the Aho–Corasick fast path, and other plain sequences of characters
    (``ignore_case`` literals) the bit-parallel one, unless ``fast_path`` is False (tests compare
    them with the general construction). ``budget`` (a :class:`Budget`) bounds the work; over it,
    :class:`BudgetExceededError` is raised.
    """
    context = _CharContext(nodes, budget)
    return to_bytes(context.search_dfa(nodes, max_states, fast_path), max_states=max_states,
                    budget=context.budget)


def compile_block(rule: BlockRule, rule_id: str, max_states: int = DEFAULT_MAX_STATES,
                  budget: Budget = None) -> ByteDFA:
    """The byte DFA of a block rule: an ``open`` detector composed with the anchored body language."""
    budget = budget_or_unlimited(budget)
    budget.label = f"rule {rule_id}"
    opener = parse(regex.escape(rule.open), rule=rule_id)
    language = parse(rule.pattern, rule=rule_id)
    opening = parse(rule.opening_pattern, rule=rule_id) if rule.at_start else None
    try:
        context = _CharContext([opener, language] + ([opening] if opening else []), budget)
        grammar = context.search_dfa([language], max_states)
        if not co_reachable(grammar.trans)[START_STATE]:
            raise PolicyError(f"rule {rule_id}: the block's body and close match no text at all "
                              f"(forbid the opening tag as a literal instead)")
        budget.spend(grammar.n_states * (4 + grammar.trans.shape[1] // 16))  # the composition
        dfa = compose_block(context.search_dfa([opener], max_states), grammar,
                            context.search_dfa([opening], max_states) if opening else None)
        return to_bytes(dfa, max_states=max_states, budget=budget)
    except BudgetExceededError:
        raise
    except AutomatonTooLargeError:
        raise _too_large(rule_id, max_states) from None


def compile_document(rule: DocumentRule, rule_id: str, max_states: int = DEFAULT_MAX_STATES,
                     budget: Budget = None) -> ByteDFA:
    """The byte DFA of a document rule: the whole text must be one word of ``rule.document``."""
    budget = budget_or_unlimited(budget)
    budget.label = f"rule {rule_id}"
    node = parse(rule.pattern, rule=rule_id)
    try:
        language = _CharContext([node], budget).search_dfa([node], max_states)
        if not can_complete(language)[START_STATE]:
            raise PolicyError(f"rule {rule_id}: the document language matches no text at all")
        return to_bytes(compose_document(language), max_states=max_states, budget=budget)
    except BudgetExceededError:
        raise
    except AutomatonTooLargeError:
        raise _too_large(rule_id, max_states) from None


def _too_large(rule_id: str, max_states: int) -> AutomatonTooLargeError:
    return AutomatonTooLargeError(
        f"rule {rule_id}: its DFA exceeds the state limit of {max_states}; simplify the pattern "
        f"(broad counted repeats such as .{{0,200}} blow up) or raise max_states")


def _label(ids, indices) -> str:
    names = [str(ids[i]) for i in indices]
    if len(names) == 1:
        return f"rule {names[0]}"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"rules {shown} (compiled together)"


def compile_components(policy: Policy, max_states: int = DEFAULT_MAX_STATES,
                       component_states: int = COMPONENT_STATES,
                       progress=None, budget=DEFAULT_WORK_BUDGET) -> list[tuple[ByteDFA, list[int]]]:
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
    * Block and document rules are each a component of their own (:func:`compile_block`,
      :func:`compile_document`).

    ``progress``, if given, is called as ``progress(rules_done, rules)`` as rules are compiled.

    ``budget`` bounds the work of the whole call: an ``int`` (units of roughly a microsecond of
    work; :data:`DEFAULT_WORK_BUDGET` by default, :data:`SERVER_WORK_BUDGET` for untrusted
    policies), ``None`` for unbounded, or a :class:`Budget` to share with other work. Over it,
    :class:`BudgetExceededError` (an :class:`AutomatonTooLargeError`) names the rule being compiled.
    """
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    ids = policy.rule_ids()
    nodes = [parse(rule.pattern, rule.ignore_case, rule_id) for rule, rule_id in zip(policy.forbid, ids)]
    literal = [i for i, rule in enumerate(policy.forbid) if isinstance(rule, LiteralRule)]
    regexes = [i for i, rule in enumerate(policy.forbid) if isinstance(rule, RegexRule)]
    tick = progress or (lambda done, total: None)
    components = _split_compile(literal, nodes, ids, component_states, max_states, budget)
    tick(len(literal), len(nodes))
    alone = {}
    for n, i in enumerate(regexes, 1):
        budget.label = _label(ids, [i])
        try:
            alone[i] = compile_nodes([nodes[i]], max_states, budget=budget)
        except BudgetExceededError:
            raise
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
        budget.label = _label(ids, sorted(members))
        dfa = alone[members[0]] if len(members) == 1 else compile_nodes([nodes[i] for i in members], max_states,
                                                                        budget=budget)
        components.append((dfa, sorted(members)))
    for i, rule in enumerate(policy.forbid):  # a positive grammar is always its own component
        if isinstance(rule, BlockRule):
            components.append((compile_block(rule, ids[i], max_states, budget), [i]))
        elif isinstance(rule, DocumentRule):
            components.append((compile_document(rule, ids[i], max_states, budget), [i]))
    for dfa, members in components:
        if isinstance(policy.forbid[members[0]], DocumentRule):
            _check_completable(dfa, ids[members[0]], components, ids)
    tick(len(nodes), len(nodes))
    return components


def _check_completable(document: ByteDFA, document_id: str, components, ids) -> None:
    """Refuse a document rule that no text can complete without another rule of the policy matching
    (the product automaton has no path to a complete document): name the rules that block it, and
    how far a document gets."""
    others = [(dfa, members) for dfa, members in components if dfa is not document]
    possible, prefix = shortest_completion(document, [dfa for dfa, _ in others])
    if possible is not False:  # completable, or not decided within the search limit (ends cleanly at run time)
        return
    alone = [members for dfa, members in others if shortest_completion(document, [dfa])[0] is False]
    blockers = sorted(ids[i] for members in alone for i in members)
    who = (f"rule(s) {', '.join(blockers)}" if len(blockers) <= 5 or not alone else
           f"rules {', '.join(blockers[:5])} and {len(blockers) - 5} more (compiled together)")
    if not alone:
        who = "the other rules together"
    raise PolicyError(f"rule {document_id}: no complete document is possible: {who} forbid every way to finish it "
                      f"(the furthest a document gets is {prefix.decode('utf-8', 'replace')!r})")


def _split_compile(indices, nodes, ids, limit, max_states, budget=None) -> list[tuple[ByteDFA, list[int]]]:
    """Compile ``indices`` as one component, halving the set until each part fits ``limit``."""
    if not indices:
        return []
    group = [nodes[i] for i in indices]
    plain = all(plain_phrase(node) is not None or set_sequence(node) is not None for node in group)
    # Aho–Corasick unions grow linearly with the phrases; others may not, so keep them small.
    cap = max_states if len(indices) == 1 or plain else limit
    if budget is not None:
        budget.label = _label(ids, indices)
    try:
        return [(compile_nodes(group, cap, budget=budget), indices)]
    except BudgetExceededError:
        raise
    except AutomatonTooLargeError:
        if len(indices) == 1:
            raise _too_large(ids[indices[0]], max_states) from None
    half = len(indices) // 2
    return (_split_compile(indices[:half], nodes, ids, limit, max_states, budget)
            + _split_compile(indices[half:], nodes, ids, limit, max_states, budget))


def compile_policy_dfa(policy: Policy, max_states: int = DEFAULT_MAX_STATES,
                       budget=DEFAULT_WORK_BUDGET) -> ByteDFA:
    """The single byte DFA of a whole policy (tests and verification); refused if over the limit."""
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    ids = policy.rule_ids()
    if any(isinstance(rule, (BlockRule, DocumentRule)) for rule in policy.forbid):
        raise PolicyError("a policy with block or document rules has no single-DFA form; use compile_components")
    nodes = [parse(rule.pattern, rule.ignore_case, rule_id) for rule, rule_id in zip(policy.forbid, ids)]
    budget.label = _label(ids, range(len(ids)))
    try:
        return compile_nodes(nodes, max_states, budget=budget)
    except BudgetExceededError:
        raise
    except AutomatonTooLargeError:
        for rule_id, node in zip(ids, nodes):
            budget.label = f"rule {rule_id}"
            try:
                compile_nodes([node], max_states, budget=budget)
            except BudgetExceededError:
                raise
            except AutomatonTooLargeError:
                raise _too_large(rule_id, max_states) from None
        raise AutomatonTooLargeError(
            f"the combination of the policy's {len(nodes)} rules exceeds the state limit of {max_states} "
            f"DFA states (each rule alone fits); split the policy or raise max_states") from None
