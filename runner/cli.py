"""Command line: flags -> frozen config -> command function -> exit code."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the apimart-batch CLI and return its exit code."""
    return 0
