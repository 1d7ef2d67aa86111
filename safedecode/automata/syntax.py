"""Pattern syntax: parse a regex (the supported subset of the ``regex`` package) into a small AST.

Layer 1 of the compiler. It only decides *structure*; what a character set contains is decided
later by asking the ``regex`` package itself (see :mod:`safedecode.automata.charsets`), so that ``\\w``,
``\\p{L}``, ``[^a-z]`` and case-insensitivity mean exactly what the oracle says.

Invariants:
  * every pattern is first compiled by ``regex`` itself, so a syntax error reads as regex's own;
  * constructs an automaton cannot express (backreferences, lookaround, atomic groups, possessive
    quantifiers, conditionals, recursion, fuzzy matching, ``\\K``/``\\G``/``\\X``) and flags that
    change anchors or matching mode (``m``, ``x``, ``a``, ``L``, ``f``, ``w``, ``V1``...) raise
    :class:`PatternError` naming the construct and its 0-based position — never approximated;
  * a pattern that can match the empty string is refused (it would forbid every output).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Union

import regex

from ..errors import AutomatonTooLargeError, PatternError

MAX_REPEAT = 1000

# Work budgets (units of roughly one microsecond of compiling on one core; see :class:`Budget`).
DEFAULT_WORK_BUDGET = 120_000_000  # library default: about two minutes, generous
SERVER_WORK_BUDGET = 500_000  # for untrusted policies: refusal after roughly 0.3–0.7 s measured on 2 busy cores


class BudgetExceededError(AutomatonTooLargeError):
    """Compiling needed more work than the :class:`Budget` allows; the policy is refused."""


class Budget:
    """A work budget shared by every stage of compiling one policy.

    Each stage calls :meth:`spend` with units of work proportional to what it is about to do (NFA
    nodes built, threads visited during subset construction, rows of the byte DFA, oracle scans of
    character sets...). A unit is calibrated to roughly one microsecond on one core, so a budget of
    ``N`` units refuses a policy after roughly ``N`` microseconds of work — never after a large
    automaton was built. ``limit=None`` means unbounded. ``label`` names the rule (or group of
    rules) being compiled, for the error message.
    """

    def __init__(self, limit: Optional[int] = DEFAULT_WORK_BUDGET):
        self.limit = limit
        self.used = 0
        self.label: Optional[str] = None

    def spend(self, units: int = 1) -> None:
        self.used += units
        if self.limit is not None and self.used > self.limit:
            where = f"{self.label}: " if self.label else ""
            raise BudgetExceededError(
                f"{where}compiling needs more than {self.limit:,} units of work (the work budget); "
                f"simplify the pattern (long case-insensitive or counted runs of broad classes such as "
                f"\\w{{500}} are expensive) or raise the budget")


def budget_or_unlimited(budget: Optional[Budget]) -> Budget:
    """``budget``, or a fresh unbounded one."""
    return budget if budget is not None else Budget(None)


# ---------------------------------------------------------------------------------------------
# AST
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CharSpec:
    """One character-consuming atom.

    kind ``"char"``: ``value`` is a code point; ``"set"``: ``value`` is regex source for a set of
    single characters (``[...]``, ``\\d``, ``\\p{L}``...); ``"any"``: ``.`` (``value``: dotall).
    ``ignore_case`` is the IGNORECASE state in force where the atom appears.
    """

    kind: str
    value: Union[int, str, bool]
    ignore_case: bool
    position: Optional[int] = field(default=None, compare=False)  # where it starts in the pattern


@dataclass(frozen=True)
class Chars:
    spec: CharSpec


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    item: object
    min: int
    max: Optional[int]  # None: unbounded


@dataclass(frozen=True)
class Assert:
    """Zero-width assertion: ``start`` (\\A, ^), ``end`` (\\Z), ``dollar`` ($: end or before a final
    newline), ``word_boundary`` (\\b), ``not_word_boundary`` (\\B)."""

    kind: str


Node = Union[Chars, Seq, Alt, Repeat, Assert]
EMPTY = Seq(())


def nullable(node: Node) -> bool:
    """True if ``node`` can match the empty string (assertions count as empty)."""
    if isinstance(node, Chars):
        return False
    if isinstance(node, Assert):
        return True
    if isinstance(node, Seq):
        return all(nullable(item) for item in node.items)
    if isinstance(node, Alt):
        return any(nullable(item) for item in node.items)
    if isinstance(node, Repeat):
        return node.min == 0 or nullable(node.item)
    raise TypeError(node)


def uses_assertion(node: Node, kinds: set[str]) -> bool:
    """True if any assertion of one of ``kinds`` occurs in ``node``."""
    if isinstance(node, Assert):
        return node.kind in kinds
    if isinstance(node, (Seq, Alt)):
        return any(uses_assertion(item, kinds) for item in node.items)
    if isinstance(node, Repeat):
        return uses_assertion(node.item, kinds)
    return False


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_CLASS_ESCAPES = set("dDwWsS")
_REFUSED_ESCAPES = {
    "K": "\\K (keep out)", "G": "\\G (search anchor)", "X": "\\X (grapheme cluster)",
    "m": "\\m (start of word)", "M": "\\M (end of word)", "L": "\\L<...> (named list)",
    "g": "\\g<...> (group reference)", "k": "\\k<...> (backreference)", "z": "\\z",
    "R": "\\R", "h": "\\h", "Q": "\\Q",
}
_SUPPORTED_FLAGS = {"i", "s", "u"}
_FLAG_NAMES = {"m": "multiline", "x": "verbose", "a": "ASCII", "L": "locale", "f": "full case-folding",
               "w": "Unicode word boundaries", "b": "best-match fuzzy", "e": "enhance-match fuzzy",
               "p": "POSIX leftmost-longest", "r": "reverse", "V": "version"}


class _Parser:
    def __init__(self, pattern: str, ignore_case: bool, rule: Optional[str]):
        self.p = pattern
        self.i = 0
        self.rule = rule
        self.ignore_case = ignore_case
        self.dotall = False

    # -- helpers ----------------------------------------------------------------------------
    def error(self, message: str, position: Optional[int] = None) -> PatternError:
        return PatternError(message, self.p, self.i if position is None else position, self.rule)

    def refuse(self, construct: str, position: int) -> PatternError:
        return self.error(f"{construct} is not supported: an automaton cannot express it exactly", position)

    def peek(self, k: int = 0) -> str:
        """The character ``k`` ahead, or NUL past the end (NUL is in none of the sets we test)."""
        j = self.i + k
        return self.p[j] if j < len(self.p) else "\x00"

    def startswith(self, s: str) -> bool:
        return self.p.startswith(s, self.i)

    # -- grammar ----------------------------------------------------------------------------
    def parse(self) -> Node:
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error(f"unbalanced {self.peek()!r}")
        return node

    def alternation(self) -> Node:
        saved = (self.ignore_case, self.dotall)  # inline flags last until the end of the group
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        self.ignore_case, self.dotall = saved
        return branches[0] if len(branches) == 1 else Alt(tuple(branches))

    def sequence(self) -> Node:
        items = []
        while self.i < len(self.p) and self.peek() not in "|)":
            atom = self.atom()
            if atom is None:
                continue
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def quantified(self, atom: Node) -> Node:
        start = self.i
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            bounds = self.counted_repeat()
            if bounds is None:
                return atom
            lo, hi = bounds
        else:
            return atom
        if self.peek() == "+":
            raise self.refuse("possessive quantifier", self.i)
        if self.peek() == "?":  # lazy: the set of matched texts is the same for "contains a match"
            self.i += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._looks_counted()):
            raise self.error("multiple repeat")
        if isinstance(atom, Assert):
            raise self.error("a quantifier cannot apply to an assertion", start)
        return Repeat(atom, lo, hi)

    def _looks_counted(self) -> bool:
        saved = self.i
        try:
            return self.counted_repeat() is not None
        except PatternError:
            return True
        finally:
            self.i = saved

    def counted_repeat(self) -> Optional[tuple[int, Optional[int]]]:
        start = self.i
        m = regex.compile(r"\{(\d*)(,?)(\d*)\}").match(self.p, self.i)
        if not m or (not m.group(1) and not m.group(3)):
            if regex.compile(r"\{[^}]*[<=>]").match(self.p, self.i):
                raise self.refuse("fuzzy matching", start)
            raise self.error("a literal '{' must be escaped as '\\{'", start)
        self.i = m.end()
        lo = int(m.group(1)) if m.group(1) else 0
        if not m.group(2):
            hi: Optional[int] = lo
        else:
            hi = int(m.group(3)) if m.group(3) else None
        biggest = max(lo, hi or 0)
        if biggest > MAX_REPEAT:
            raise self.error(f"repetition count {biggest} exceeds the supported maximum {MAX_REPEAT}", start)
        return lo, hi

    def atom(self) -> Optional[Node]:
        c = self.peek()
        start = self.i
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape()
        self.i += 1
        if c == ".":
            return Chars(CharSpec("any", self.dotall, self.ignore_case))
        if c == "^":
            return Assert("start")
        if c == "$":
            return Assert("dollar")
        if c in "*+?":
            raise self.error("nothing to repeat", start)
        if c == "{":
            self.i = start
            raise self.error("a literal '{' must be escaped as '\\{'", start)
        return Chars(CharSpec("char", ord(c), self.ignore_case))

    def group(self) -> Optional[Node]:
        start = self.i
        self.i += 1
        if self.peek() != "?":
            return self.group_body(start)
        self.i += 1
        if self.startswith(":"):
            self.i += 1
            return self.group_body(start)
        if self.startswith("P<") or (self.startswith("<") and self.peek(1) not in "=!"):
            end = self.p.find(">", self.i)
            self.i = end + 1
            return self.group_body(start)
        refused = [("P=", "backreference (?P=name)"), ("P>", "recursion (?P>name)"),
                   ("=", "lookahead (?=...)"), ("!", "negative lookahead (?!...)"),
                   ("<=", "lookbehind (?<=...)"), ("<!", "negative lookbehind (?<!...)"),
                   (">", "atomic group (?>...)"), ("|", "branch reset group (?|...)"),
                   ("(", "conditional (?(...)...)"), ("R", "recursion (?R)"), ("&", "recursion (?&name)")]
        for prefix, construct in refused:
            if self.startswith(prefix):
                raise self.refuse(construct, start)
        if self.peek().isdigit() or (self.peek() in "+-" and self.peek(1).isdigit()):
            raise self.refuse("recursion (?N)", start)
        if self.startswith("#"):
            end = self.p.find(")", self.i)
            self.i = end + 1
            return None
        return self.flag_group(start)

    def flag_group(self, start: int) -> Optional[Node]:
        on, off, target = set(), set(), None
        current = on
        while self.i < len(self.p) and self.peek() not in ":)":
            c = self.peek()
            if c == "-":
                current = off
            elif c == "V":
                raise self.error("version flags (?V0)/(?V1) are not supported", self.i)
            elif c not in _SUPPORTED_FLAGS:
                name = _FLAG_NAMES.get(c, "unknown")
                raise self.error(f"inline flag '{c}' ({name}) is not supported; supported: i, s, u", self.i)
            else:
                current.add(c)
            self.i += 1
        target = self.peek()
        self.i += 1
        if target == ":":  # scoped: (?i:...)
            saved = (self.ignore_case, self.dotall)
            self._apply_flags(on, off)
            node = self.alternation()
            self._expect_close(start)
            self.ignore_case, self.dotall = saved
            return node
        self._apply_flags(on, off)  # (?i): applies to the end of the enclosing group
        return None

    def _apply_flags(self, on: set, off: set) -> None:
        if "i" in on:
            self.ignore_case = True
        if "i" in off:
            self.ignore_case = False
        if "s" in on:
            self.dotall = True
        if "s" in off:
            self.dotall = False

    def group_body(self, start: int) -> Node:
        node = self.alternation()
        self._expect_close(start)
        return node

    def _expect_close(self, start: int) -> None:
        if self.peek() != ")":
            raise self.error("missing ')' for the group opened here", start)
        self.i += 1

    def char_class(self) -> Node:
        start = self.i
        j = self.i + 1
        if j < len(self.p) and self.p[j] == "^":
            j += 1
        if j < len(self.p) and self.p[j] == "]":
            j += 1
        while j < len(self.p) and self.p[j] != "]":
            if self.p[j] == "\\":
                if self.p.startswith(("\\p{", "\\P{", "\\N{"), j):
                    j = self.p.index("}", j)
                else:
                    self._check_class_escape(j)
                    j += 1
            elif self.p[j] == "[":
                raise self.error("nested sets and POSIX classes ([:name:]) inside [...] are not supported; "
                                 "escape a literal '[' as '\\['", j)
            j += 1
        self.i = j + 1
        return Chars(CharSpec("set", self.p[start:self.i], self.ignore_case, start))

    def _check_class_escape(self, j: int) -> None:
        c = self.p[j + 1] if j + 1 < len(self.p) else ""
        if c in _REFUSED_ESCAPES and c not in "z":
            raise self.refuse(_REFUSED_ESCAPES[c], j)

    def escape(self) -> Node:
        start = self.i
        c = self.peek(1)
        self.i += 2
        if c == "A":
            return Assert("start")
        if c == "Z":
            return Assert("end")
        if c == "b":
            return Assert("word_boundary")
        if c == "B":
            return Assert("not_word_boundary")
        if c in _CLASS_ESCAPES:
            return Chars(CharSpec("set", "\\" + c, self.ignore_case, start))
        if c in "pPN":
            if self.peek() == "{":
                end = self.p.index("}", self.i)
                self.i = end + 1
            else:
                self.i += 1
            # \N{name} is one character; letting the oracle resolve it keeps regex's Unicode names.
            return Chars(CharSpec("set", self.p[start:self.i], self.ignore_case, start))
        if c in _SIMPLE_ESCAPES:
            return Chars(CharSpec("char", ord(_SIMPLE_ESCAPES[c]), self.ignore_case))
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            self.i += width
            return Chars(CharSpec("char", int(digits, 16), self.ignore_case))
        if c == "0":
            m = regex.compile(r"[0-7]{0,2}").match(self.p, self.i)
            self.i = m.end()
            return Chars(CharSpec("char", int("0" + m.group(), 8), self.ignore_case))
        if c.isdigit():
            m = regex.compile(r"[0-7]{2}").match(self.p, self.i)
            if c in "01234567" and m:
                self.i = m.end()
                return Chars(CharSpec("char", int(c + m.group(), 8), self.ignore_case))
            raise self.refuse(f"backreference \\{c}", start)
        if c in _REFUSED_ESCAPES:
            raise self.refuse(_REFUSED_ESCAPES[c], start)
        if c.isalnum():
            raise self.error(f"unsupported escape \\{c}", start)
        return Chars(CharSpec("char", ord(c), self.ignore_case))


def parse(pattern: str, ignore_case: bool = False, rule: Optional[str] = None) -> Node:
    """Parse ``pattern`` (with IGNORECASE if ``ignore_case``) into an AST, or raise PatternError.

    ``rule`` only labels errors. Results are cached: policies are parsed when validated and again
    when compiled.
    """
    if not isinstance(pattern, str) or not pattern:
        raise PatternError("the pattern must be a non-empty string", pattern if isinstance(pattern, str) else None,
                           rule=rule)
    try:
        return _parse_cached(pattern, bool(ignore_case))
    except PatternError as exc:
        if rule is None:
            raise
        raise PatternError(exc.message, exc.pattern, exc.position, rule) from None


def parse_allowing_empty(pattern: str, ignore_case: bool = False) -> Node:
    """The AST of ``pattern`` even when it can match the empty string (a JSON-schema ``pattern``
    constrains a whole value, where empty can be legitimate; :func:`parse` refuses such patterns
    because as a forbidden pattern they would forbid every output). Raises :class:`PatternError`
    for a construct the automaton cannot express."""
    return _Parser(pattern, ignore_case, None).parse()


@functools.lru_cache(maxsize=16384)
def _parse_cached(pattern: str, ignore_case: bool) -> Node:
    try:
        regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except regex.error as exc:
        raise PatternError(f"invalid regex: {exc.msg}", pattern, exc.pos) from None
    node = _Parser(pattern, ignore_case, None).parse()
    if nullable(node):
        raise PatternError("can match the empty string, so it would forbid every output", pattern, None)
    _check_case_insensitive_sets(node, pattern)
    return node


# ---------------------------------------------------------------------------------------------
# Case-insensitive properties where ``regex`` treats them as members of a set
# ---------------------------------------------------------------------------------------------
# Under IGNORECASE, ``regex`` matches a property alone (``\p{Lu}``) differently from the same
# property as a member of a set: alone, ``(?i)\p{Lu}`` matches every cased letter (ĸ included);
# in a set, a character matches if one of its case variants has the property (U+0345, whose
# variant Ι is Lu, yes; ĸ, which has no variant, no). Two places make a set where the pattern
# shows none: its optimiser merges adjacent single-character alternatives into one set
# (``(?:[ι]|\p{Lu})``, also after moving a common prefix out: ``x\p{Lu}|x\p{Ll}``), and its
# search loop pre-checks the first character of a match against the set of all possible first
# items when the pattern does not start with one (``(?:\p{Lu}x|y)``, ``\p{Lu}?x``). Character
# classes in brackets are sets already and literal characters match alike either way (checked over
# every cased character), so only properties can differ — and only those whose two meanings
# really differ (decided by the oracle itself, two scans) are refused, with their position.
def _maybe_differs(spec: CharSpec) -> bool:
    return spec.kind == "set" and spec.ignore_case and ("\\p" in spec.value or "\\P" in spec.value)


@functools.lru_cache(maxsize=1024)
def _member_meaning_differs(source: str) -> bool:
    """True if ``source`` under IGNORECASE matches other characters alone than as a set member."""
    from .charsets import normalize, scan  # charsets builds on this module

    alone = scan(source, True)
    member = scan(f"(?:{source}|\\x00)", True)  # merged into a set with U+0000 by regex's optimiser
    if not (alone and alone[0][0] == 0):
        member = normalize((max(lo, 1), hi) for lo, hi in member if hi >= 1)
    return alone != member


def _risky(node) -> bool:
    return isinstance(node, Chars) and _maybe_differs(node.spec) and _member_meaning_differs(node.spec.value)


def _first_items(node: Node, out: list) -> bool:
    """Append the atoms that can consume a match's first character; return True if ``node`` can
    also be passed without consuming one (then the next item's first atoms count too)."""
    if isinstance(node, Chars):
        out.append(node)
        return False
    if isinstance(node, Assert):
        return True
    if isinstance(node, Seq):
        for item in node.items:
            if not _first_items(item, out):
                return False
        return True
    if isinstance(node, Alt):
        passable = False
        for item in node.items:
            passable |= _first_items(item, out)
        return passable
    if isinstance(node, Repeat):
        return _first_items(node.item, out) or node.min == 0
    raise TypeError(node)


def _refuse_member(node: Chars, pattern: str, where: str) -> PatternError:
    source = node.spec.value
    return PatternError(
        f"{source} under ignore_case {where} is not supported: there the regex package matches it as a member "
        f"of a case-insensitive set, which differs from {source} alone (e.g. for U+0345 or ĸ); write "
        f"single-character alternatives as one class (e.g. [ι{source}]), make the pattern start with one "
        f"character or class, or drop ignore_case", pattern, node.spec.position)


def _check_case_insensitive_sets(node: Node, pattern: str) -> None:
    """Refuse a case-insensitive property where ``regex`` would match it as a set member (above)."""
    if "\\p" not in pattern and "\\P" not in pattern:
        return
    firsts: list = []
    _first_items(node, firsts)
    simple_start = isinstance(node, Chars) or (isinstance(node, Seq) and isinstance(node.items[0], Chars))
    if not simple_start and len(set(f.spec for f in firsts)) >= 2:
        for item in firsts:
            if _risky(item):
                raise _refuse_member(item, pattern, "as one of several possible first characters of a match")
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, (Seq, Alt)):
            stack.extend(current.items)
        elif isinstance(current, Repeat):
            stack.append(current.item)
        if not isinstance(current, Alt):
            continue
        heads = [b.items[0] if isinstance(b, Seq) and b.items else b for b in current.items]
        shared_head = all(isinstance(h, Chars) for h in heads) and all(
            h.spec.ignore_case == heads[0].spec.ignore_case and (h.spec == heads[0].spec or "set" in (
                h.spec.kind, heads[0].spec.kind)) for h in heads)
        for branch in current.items:
            if _risky(branch):
                raise _refuse_member(branch, pattern, "as an alternative of an alternation")
            if shared_head and isinstance(branch, Seq) and branch.items and _risky(branch.items[-1]):
                raise _refuse_member(branch.items[-1], pattern,
                                     "as the last item of alternatives that share a first item")
