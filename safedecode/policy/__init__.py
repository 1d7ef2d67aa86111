"""Stage 1 — policies: what may never appear in the output.

Owns the rule model (:mod:`.rules`: literal, regex, block and document rules, loading by name or path, the
``regex``-package reference check :func:`find_violations`), the obfuscation variants that widen a
rule (:mod:`.variants`), and the compilation of a policy's rules into character automata
(:mod:`.automaton`).

May import: :mod:`safedecode.automata` (regex syntax and automaton construction), and the
top-level :mod:`safedecode.errors`, :mod:`safedecode.extras`, :mod:`safedecode.resources`.
"""
from .rules import (
                    BlockRule,
                    DocumentRule,
                    LiteralRule,
                    Policy,
                    RegexRule,
                    Rule,
                    Violation,
                    available_policies,
                    find_violations,
                    load_policy,
                    named_policy,
                    policy_from_mapping,
                    rule_violated,
)

__all__ = ["Policy", "LiteralRule", "RegexRule", "BlockRule", "DocumentRule", "Rule", "Violation", "load_policy",
           "named_policy", "available_policies", "policy_from_mapping", "find_violations", "rule_violated"]
