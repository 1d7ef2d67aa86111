"""Reading the library's TOML data files (policies, chat formats) with one clear error each."""
from __future__ import annotations

import tomllib
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .errors import SafeDecodeError


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
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise error(f"{source}: not valid TOML: nested too deeply") from None
