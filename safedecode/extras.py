"""Optional features and the extra that installs each: one clear error when it is missing.

The core (policies, compiler, kernels, the transformers processor, the channel guard and tool
calls) needs only the base dependencies. Other features live behind extras of the package
(``pip install 'safedecode[server]'``); :func:`require` raises :class:`MissingDependencyError`
naming the feature, the missing module and the command that installs it.
"""
from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError


def require(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(f"{feature} needs the package {module!r}, which is not installed: "
                                     f"pip install 'safedecode[{extra}]'")


__all__ = ["require", "MissingDependencyError"]
