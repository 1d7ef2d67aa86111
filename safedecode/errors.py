"""Every error safedecode raises on bad input derives from :class:`SafeDecodeError`.

Each one names the problem precisely (file, rule index/id, field, pattern position) so that a
user can fix the input without reading the library's source.
"""
from __future__ import annotations


class SafeDecodeError(ValueError):
    """Base class of all safedecode input errors."""


class PolicyError(SafeDecodeError):
    """A policy file or policy object is malformed (unknown key, wrong type, empty string...)."""


class PatternError(SafeDecodeError):
    """A pattern cannot be compiled: bad syntax, an unsupported construct, or it matches ''.

    ``pattern`` and ``position`` (0-based index into the pattern, or ``None``) locate the problem.
    """

    def __init__(self, message: str, pattern: str | None = None, position: int | None = None,
                 rule: str | None = None):
        self.message = message
        self.pattern = pattern
        self.position = position
        self.rule = rule
        where = ""
        if rule is not None:
            where += f"rule {rule}: "
        if pattern is not None:
            where += f"pattern {pattern!r}"
            if position is not None:
                where += f" at position {position}"
            where += ": "
        super().__init__(where + message)


class AutomatonTooLargeError(SafeDecodeError):
    """Determinization exceeded the configured state limit; the policy is refused, never approximated."""


class VocabularyError(SafeDecodeError):
    """A tokenizer could not be turned into a token-id → bytes table."""


class ChatFormatError(SafeDecodeError):
    """A chat-format file is malformed, a format name is unknown, or a tokenizer's format cannot be
    detected; the message names the file and field, or what was looked for and not found."""


class MissingDependencyError(ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra
    that installs it (``pip install 'safedecode[server]'``)."""
