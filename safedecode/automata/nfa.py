"""Thompson NFA over character classes for the union of a policy's patterns.

Layer 3 of the compiler. Nodes are stored in flat lists (struct-of-arrays) so the determinizer can
walk them quickly. There is a single ``MATCH`` node shared by every pattern: the automaton only
answers "does the text contain a match of any rule", which is all the mask needs (reports name the
rule by re-running the oracle, see :func:`safedecode.policy.rules.find_violations`).

Invariants:
  * ``CHAR`` nodes consume one character whose class is in ``char_classes[node]``;
  * ``EPS``/``SPLIT``/``ASSERT`` consume nothing; ``ASSERT`` nodes carry an assertion kind;
  * the node count is bounded by ``max_nodes`` (a counted repeat is expanded into copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import AutomatonTooLargeError
from .syntax import Alt, Assert, Budget, Chars, Node, Repeat, Seq

CHAR, EPS, SPLIT, ASSERT, MATCH = range(5)


@dataclass
class NFA:
    kind: list[int] = field(default_factory=list)
    out1: list[int] = field(default_factory=list)
    out2: list[int] = field(default_factory=list)
    arg: list = field(default_factory=list)  # CHAR: frozenset of classes; ASSERT: kind string
    start: int = -1
    match: int = -1
    max_nodes: int = 1_000_000
    budget: Optional[Budget] = None

    def add(self, kind: int, out1: int = -1, out2: int = -1, arg=None) -> int:
        if self.budget is not None and not len(self.kind) & 255:
            self.budget.spend(256)  # about a microsecond a node, charged 256 nodes at a time
        if len(self.kind) >= self.max_nodes:
            raise AutomatonTooLargeError(
                f"the patterns expand to more than {self.max_nodes} NFA nodes; reduce counted repetitions")
        self.kind.append(kind)
        self.out1.append(out1)
        self.out2.append(out2)
        self.arg.append(arg)
        return len(self.kind) - 1


def build_nfa(patterns: list[Node], classes_of_spec, max_nodes: int = 1_000_000,
              budget: Optional[Budget] = None) -> NFA:
    """Build one NFA matching any of ``patterns``.

    ``classes_of_spec(spec) -> frozenset[int]`` maps a CharSpec to its alphabet classes; ``budget``
    (a :class:`~safedecode.automata.syntax.Budget`) is charged for the nodes built.
    """
    nfa = NFA(max_nodes=max_nodes, budget=budget)
    nfa.match = nfa.add(MATCH)

    def compile_node(node: Node, next_node: int) -> int:
        """Compile ``node`` so that after matching it continues at ``next_node``; return its entry."""
        if isinstance(node, Chars):
            return nfa.add(CHAR, next_node, arg=classes_of_spec(node.spec))
        if isinstance(node, Assert):
            return nfa.add(ASSERT, next_node, arg=node.kind)
        if isinstance(node, Seq):
            entry = next_node
            for item in reversed(node.items):
                entry = compile_node(item, entry)
            return entry if node.items else nfa.add(EPS, next_node)
        if isinstance(node, Alt):
            entries = [compile_node(item, next_node) for item in node.items]
            entry = entries[-1]
            for other in reversed(entries[:-1]):
                entry = nfa.add(SPLIT, other, entry)
            return entry
        if isinstance(node, Repeat):
            return compile_repeat(node, next_node)
        raise TypeError(node)

    def compile_repeat(node: Repeat, next_node: int) -> int:
        entry = next_node
        if node.max is None:  # item* loop, then `min` mandatory copies before it
            loop = nfa.add(SPLIT, -1, next_node)
            nfa.out1[loop] = compile_node(node.item, loop)
            entry = loop
        else:
            for _ in range(node.max - node.min):  # optional copies: (item (item ...)?)?
                entry = nfa.add(SPLIT, compile_node(node.item, entry), next_node)
        for _ in range(node.min):
            entry = compile_node(node.item, entry)
        return entry

    entries = [compile_node(pattern, nfa.match) for pattern in patterns]
    if not entries:  # an empty policy: a start node that can never consume anything
        entries = [nfa.add(CHAR, nfa.match, arg=frozenset())]
    start = entries[-1]
    for other in reversed(entries[:-1]):
        start = nfa.add(SPLIT, other, start)
    nfa.start = start
    return nfa
