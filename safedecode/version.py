"""The library version (single source: the package metadata reads it, the disk cache keys on it)."""

__version__ = "0.1.0"
