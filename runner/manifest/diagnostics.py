"""One manifest's diagnostics, each at the YAML position of what the user must edit.

Past :data:`MAX_DIAGNOSTICS` a file's further problems are printed as one line, a
:class:`Truncated` diagnostic that still carries them: :func:`every_problem` and
:func:`problem_count` see through it, and :func:`diagnostics_json` lists them all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from runner.errors import Diagnostic
from runner.manifest.schemas import Problem
from runner.manifest.yamlfile import Pos, YamlMap, YamlSeq

#: Most diagnostics printed per file; the rest are counted.
MAX_DIAGNOSTICS = 100

DocPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Truncated(Diagnostic):
    """The one line shown for a file's problems past the limit; ``hidden`` holds them all."""

    hidden: tuple[Diagnostic, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    """A file a matrix axis was read from (``sources``): its name as shown, the manifest's
    position that names it, and the line of each value read, in order."""

    file: str
    ref: Pos
    lines: tuple[int, ...] = ()


class Reporter:
    """Collects one file's diagnostics; a later stage never repeats a place an earlier judged."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: The parsed document the positions are looked up in (None until it is parsed).
        self.doc: Any = None
        self.diagnostics: list[Diagnostic] = []
        #: Matrix axes read from a file, by their path: a problem of value ``i`` of such an
        #: axis is reported at the line it was read from.
        self.sources: dict[DocPath, Source] = {}
        self._early: set[tuple[int, int, str]] = set()

    def at(
        self,
        path: DocPath,
        message: str,
        hint: str | None,
        *,
        at_key: bool = False,
        late: bool = False,
    ) -> None:
        """Report a problem at ``path`` of the document (at its key with ``at_key``).

        A value of an axis read from a file (``sources``) is reported at its line there.
        """
        source = self.sources.get(path[:4]) if len(path) > 4 else None
        index = path[4] if source is not None else None
        if source is not None and isinstance(index, int) and 0 <= index < len(source.lines):
            shown = locate(self.doc, path[:4])[0]
            self.in_source(source, source.lines[index], message, hint, shown)
            return
        shown, pos = locate(self.doc, path, at_key=at_key)
        self.add(pos, shown, message, hint, late=late)

    def in_source(
        self, source: Source, line: int, message: str, hint: str | None, path: str = ""
    ) -> None:
        """Report a problem at ``line`` of a file the manifest reads, naming where it does."""
        text = f"{message} (in the file read at {self.path}:{source.ref[0]})"
        self.diagnostics.append(Diagnostic(source.file, line, 1, path, text, hint))

    def all(self, prefix: DocPath, problems: list[Problem]) -> None:
        """Report every schema problem, each at its place below ``prefix``."""
        for problem in problems:
            path = (*prefix, *problem.path)
            self.at(path, problem.message, problem.hint, at_key=problem.at_key)

    def add(
        self, pos: Pos, path: str, message: str, hint: str | None = None, *, late: bool = False
    ) -> None:
        """Report a problem at ``pos``, shown as ``path``."""
        # A later stage re-checks values the schema stage already judged where they were
        # written; one problem per place is enough.
        if late and (pos[0], pos[1], path) in self._early:
            return
        if not late:
            self._early.add((pos[0], pos[1], path))
        self.diagnostics.append(Diagnostic(self.path, pos[0], pos[1], path, message, hint))

    def trim(self) -> list[Diagnostic]:
        """The diagnostics in file order, without repeats, past the limit as one summary."""
        unique = set(self.diagnostics)
        self.diagnostics = sorted(unique, key=lambda d: (d.line, d.col, d.path, d.message))
        if len(self.diagnostics) > MAX_DIAGNOSTICS:
            hidden = tuple(self.diagnostics[MAX_DIAGNOSTICS:])
            total = len(self.diagnostics)
            message = (f"... and {len(hidden)} more; {total} problems found in this file "
                       f"(only the first {MAX_DIAGNOSTICS} are shown)")
            first = hidden[0]
            summary = Truncated(first.file, first.line, first.col, "", message, None, hidden)
            self.diagnostics = [*self.diagnostics[:MAX_DIAGNOSTICS], summary]
        return self.diagnostics


def every_problem(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Every problem, in order, with each :class:`Truncated` line replaced by what it hides."""
    found: list[Diagnostic] = []
    for diagnostic in diagnostics:
        found += diagnostic.hidden if isinstance(diagnostic, Truncated) else [diagnostic]
    return found


def problem_count(diagnostics: Iterable[Diagnostic]) -> int:
    """How many problems ``diagnostics`` stand for, counting those past the printed limit."""
    return len(every_problem(diagnostics))


def diagnostics_document(diagnostics: Iterable[Diagnostic]) -> dict[str, Any]:
    """Every problem as plain data: ``{"total": N, "problems": [{file, line, col, ...}]}``.

    Each problem has ``file``, ``line`` and ``col`` (1-based), ``path`` (the place in the
    document, e.g. ``jobs[2].duration``; null for the file as a whole), ``message`` and
    ``hint`` (null when there is none). Nothing is cut: past the printed limit too.
    """
    problems = [
        {"file": d.file, "line": d.line, "col": d.col, "path": d.path or None,
         "message": d.message, "hint": d.hint}
        for d in every_problem(diagnostics)
    ]  # fmt: skip
    return {"total": len(problems), "problems": problems}


def diagnostics_json(diagnostics: Iterable[Diagnostic]) -> str:
    """:func:`diagnostics_document` as indented JSON text, for ``validate --json``."""
    return json.dumps(diagnostics_document(diagnostics), indent=2, ensure_ascii=False)


def locate(doc: Any, path: DocPath, *, at_key: bool = False) -> tuple[str, Pos]:
    """A readable path and the position of ``path`` in the document, or of its deepest part."""
    node, pos, shown = doc, getattr(doc, "pos", (1, 1)), ""
    for n, step in enumerate(path):
        if isinstance(node, YamlMap) and isinstance(step, str) and step in node:
            last = n == len(path) - 1
            empty = node[step] is None  # an empty value's mark is the next token's
            pos = node.key_pos[step] if (at_key and last) or empty else node.value_pos[step]
            shown += _key_text(step, first=not shown)
        elif isinstance(node, YamlSeq) and isinstance(step, int) and 0 <= step < len(node):
            pos = node.item_pos[step]
            shown += f"[{step}]"
        else:
            break
        node = node[step]
    return shown, pos


def _key_text(key: str, *, first: bool) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", key):
        return key if first else f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"
