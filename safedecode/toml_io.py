"""Reading the library's TOML data files (policies, chat formats) with one clear error each."""
from __future__ import annotations

import tomllib
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .errors import SafeDecodeError


def read_toml(path: Path | Traversable, error: type[SafeDecodeError], what: str) -> dict[str, Any]:
    """The parsed file, or ``error`` naming the file: missing ("no such <what> file") or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise error(f"{path}: no such {what} file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
