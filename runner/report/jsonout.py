"""JSON documents written as they are produced, so that memory stays flat in the jobs.

A document is a mapping whose values may be iterators (written as lists, one item at a
time) or :class:`Later` (computed when the writer reaches it, e.g. totals counted while
the jobs above them were written). The text is exactly ``json.dumps(..., indent=2,
ensure_ascii=False)`` of the materialised document, plus a newline.
"""

from __future__ import annotations

import json
import json.encoder
import math
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
    """``json.dumps(value, indent=2, ensure_ascii=False)``, several times faster.

    With an indent, json encodes in pure Python, through generators; plain data (texts,
    numbers, lists and mappings with text keys) is laid out here the same way, with the C
    string escaper. Anything else goes to json itself.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=allow_nan, indent=2)
    text = encoder.encode

    def scalar(value: Any) -> str:
        kind = type(value)
        if kind is str:
            return _quote(value)
        if value is None:
            return "null"
        if kind is bool:
            return "true" if value else "false"
        if kind is int:
            return int.__repr__(value)
        if kind is float and math.isfinite(value):
            return float.__repr__(value)
        raise _NotPlainError

    def layout(value: Any, pad: str) -> str:
        if isinstance(value, dict):
            if not value:
                return "{}"
            inner = pad + "  "
            parts = []
            for key, item in value.items():
                if type(key) is not str:
                    raise _NotPlainError
                parts.append(f"{inner}{_quote(key)}: {layout(item, inner)}")
            return "{\n" + ",\n".join(parts) + "\n" + pad + "}"
        if isinstance(value, list):
            if not value:
                return "[]"
            inner = pad + "  "
            return ("[\n" + ",\n".join(inner + layout(item, inner) for item in value)
                    + "\n" + pad + "]")
        return scalar(value)

    def dumps(value: Any) -> str:
        try:
            return layout(value, "")
        except _NotPlainError:
            return text(value)

    return dumps


class _NotPlainError(Exception):
    """A value the fast layout leaves to json (a float that is not finite, a tuple, ...)."""


_quote: Callable[[str], str] = getattr(json.encoder, "c_encode_basestring", None) or (
    json.encoder.py_encode_basestring
)
