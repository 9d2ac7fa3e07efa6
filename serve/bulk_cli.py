"""Registers ``mriseg bulk`` (serve/bulk.py) with serve/cli.py's plugin list."""

from serve.bulk import register

__all__ = ["register"]
