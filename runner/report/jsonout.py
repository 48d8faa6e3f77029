"""JSON documents written as they are produced, so that memory stays flat in the jobs.

A document is a mapping whose values may be iterators (written as lists, one item at a
time) or :class:`Later` (computed when the writer reaches it, e.g. totals counted while
the jobs above them were written). The text is exactly ``json.dumps(..., indent=2,
ensure_ascii=False)`` of the materialised document, plus a newline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO


class Later:
    """A document value computed when it is written (or materialised)."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute


def materialized(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` as plain data: iterators as lists, :class:`Later` values computed, in order."""
    return {key: _plain(value) for key, value in document.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Later):
        value = value.compute()
    if isinstance(value, Iterator):
        return [_plain(item) for item in value]
    return value


def write_json(out: TextIO, document: Mapping[str, Any], *, allow_nan: bool = True) -> None:
    """Write ``document`` to ``out`` as indented JSON and a newline, item by item."""
    dumps = _dumper(allow_nan)
    out.write("{")
    first = True
    for key, value in document.items():
        out.write(("\n" if first else ",\n") + "  " + json.dumps(key, ensure_ascii=False) + ": ")
        first = False
        if isinstance(value, Later):
            value = value.compute()
        if isinstance(value, Iterator):
            _write_list(out, value, dumps)
        else:
            out.write(dumps(value).replace("\n", "\n  "))
    out.write("}\n" if first else "\n}\n")


def _write_list(out: TextIO, items: Iterator[Any], dumps: Callable[[Any], str]) -> None:
    out.write("[")
    empty = True
    for item in items:
        out.write(("\n" if empty else ",\n") + "    " + dumps(item).replace("\n", "\n    "))
        empty = False
    out.write("]" if empty else "\n  ]")


def _dumper(allow_nan: bool) -> Callable[[Any], str]:
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=allow_nan, indent=2)
    return encoder.encode
