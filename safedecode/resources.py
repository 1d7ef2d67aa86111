"""Where the library's data lives — policies (``grammars/``) and chat formats (``channels/``) — and
how its TOML files are read, with one clear error each.

Both folders stay top-level in the repository and ship inside the wheel as package data
(``safedecode/data/grammars`` and ``safedecode/data/channels`` are symlinks to them in the
checkout, copied into the wheel). They are found through :mod:`importlib.resources`, so an editable
install and a wheel install behave the same, from any working directory.

``$SAFEDECODE_POLICY_DIR`` and ``$SAFEDECODE_CHANNELS_DIR`` *add* directories (several, separated by
``os.pathsep``), searched before the shipped one: a configured file with a shipped name takes its
place. A configured directory that does not exist is an error, never skipped (fail closed: a policy
an operator meant to add must not silently go missing).

Invariants:
  * a name is a plain file stem (``[A-Za-z0-9][A-Za-z0-9_.-]*``, ``.toml`` optional), so a name can
    never reach a file outside these directories;
  * every entry point (library, CLI, server, vLLM plugin) resolves names through this module.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .errors import SafeDecodeError

POLICY_ENV = "SAFEDECODE_POLICY_DIR"
CHANNELS_ENV = "SAFEDECODE_CHANNELS_DIR"
_KINDS = {"policy": ("grammars", POLICY_ENV), "chat-format": ("channels", CHANNELS_ENV)}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def data_dirs(kind: str, error: type[SafeDecodeError]) -> list[Traversable]:
    """The directories searched for ``kind`` (``"policy"`` or ``"chat-format"``): the configured
    ones in order, then the shipped one."""
    folder, env = _KINDS[kind]
    found: list[Traversable] = []
    for entry in filter(None, os.environ.get(env, "").split(os.pathsep)):
        if not os.path.isdir(entry):
            raise error(f"${env}: {entry!r} is not a directory")
        found.append(Path(entry))
    shipped = resources.files("safedecode").joinpath("data", folder)
    if not shipped.is_dir():
        raise error(f"the shipped {folder}/ directory is missing from the safedecode package "
                    f"({shipped}): reinstall safedecode, or set ${env}")
    found.append(shipped)
    return found


def catalogue(kind: str, error: type[SafeDecodeError]) -> dict[str, Traversable]:
    """``{name: file}`` of every ``*.toml`` of :func:`data_dirs`, the first directory winning."""
    files: dict[str, Traversable] = {}
    for directory in data_dirs(kind, error):
        for entry in sorted(directory.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".toml") and entry.is_file():
                files.setdefault(entry.name[:-len(".toml")], entry)
    return dict(sorted(files.items()))


def find(kind: str, name: str, error: type[SafeDecodeError]) -> Traversable:
    """The file of ``name`` (``"secrets"`` or ``"secrets.toml"``), or ``error`` listing the known
    names with a suggestion."""
    stem = name.removesuffix(".toml")
    files = catalogue(kind, error)
    if NAME.fullmatch(stem) and stem in files:
        return files[stem]
    raise error(f"unknown {kind} name {name!r}{suggest(stem, files)}; known: {', '.join(files) or '(none)'}")


def suggest(word: str, choices, prefix: str = " (did you mean ", suffix: str = "?)") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"{prefix}{close[0]!r}{suffix}" if close else ""


__all__ = ["POLICY_ENV", "CHANNELS_ENV", "NAME", "data_dirs", "catalogue", "find", "suggest", "read_toml", "parse_toml", "parse_json", "from_mapping"]

def read_toml(path: Path | Traversable, error: type[SafeDecodeError], what: str) -> dict[str, Any]:
    """The parsed file, or ``error`` naming the file: missing ("no such <what> file"), a directory,
    unreadable, not UTF-8, not TOML, or nested too deeply. A UTF-8 byte-order mark is accepted."""
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what} file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8: {exc}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return parse_toml(text, error, str(path))


def parse_toml(text: str, error: type[SafeDecodeError], source: str) -> dict[str, Any]:
    """``text`` parsed as TOML, or ``error`` starting with ``source``."""
    return _parse(tomllib.loads, tomllib.TOMLDecodeError, "TOML", text, error, source)


def parse_json(text: str, error: type[SafeDecodeError], source: str) -> Any:
    """``text`` parsed as JSON, or ``error`` starting with ``source``."""
    return _parse(json.loads, json.JSONDecodeError, "JSON", text, error, source)


def _parse(loads, decode_error: type[Exception], what: str, text: str, error: type[SafeDecodeError], source: str):
    try:
        return loads(text)
    except decode_error as exc:
        raise error(f"{source}: not valid {what}: {exc}") from None
    except RecursionError:
        raise error(f"{source}: not valid {what}: nested too deeply") from None


def from_mapping(build, data: Any, error: type[SafeDecodeError], source: str, what: str):
    """``build(**data)`` for a plain mapping (parsed TOML/JSON); every error is one ``error``
    starting with ``source`` (``what``: "a policy", "a chat format")."""
    if not isinstance(data, Mapping):
        raise error(f"{source}: {what} must be a table/object, got {type(data).__name__}")
    try:
        return build(**data)
    except SafeDecodeError as exc:
        raise error(f"{source}: {exc}") from None
