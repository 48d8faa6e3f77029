"""Prompt files: a matrix's ``prompt`` axis read from a text file or from a CSV column.

``matrix: {prompt: {file: prompts.txt}}`` reads one prompt a line (surrounding whitespace
removed; blank lines and lines starting with ``#`` skipped); ``{csv: products.csv, column:
prompt}`` reads that column of a CSV file with a header row. Paths are relative to the
manifest's folder. The prompts then stand in the entry as if listed, so expansion, job
ids (from the prompt's text) and validation are the list's. A problem of one prompt is
reported at its file and line, naming the manifest line that reads the file (see
:meth:`Reporter.at`).
"""

from __future__ import annotations

import csv
import io
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.manifest.diagnostics import DocPath, Reporter, Source, locate

#: Largest prompt file read, in bytes (as for a manifest).
MAX_SOURCE_BYTES = 5 * 1024 * 1024
_AXIS = "prompt"
#: Characters a prompt must not hold: controls other than tab and line ends (a binary file?).
_CONTROLS = frozenset(map(chr, [*range(0x20), 0x7F])) - {"\t", "\n", "\r"}


def read_sources(entries: list[Any], folder: Path, reporter: Reporter) -> list[Any]:
    """``entries`` with each prompt file replaced by the prompts it holds.

    An entry whose file cannot be used keeps the mapping, so it does not expand; a bad
    line is left out of the prompts (every problem is reported, so loading fails anyway).
    """
    out = list(entries)
    for index, entry in enumerate(entries):
        matrix = entry.get("matrix") if isinstance(entry, dict) else None
        if not isinstance(matrix, dict) or not isinstance(spec := matrix.get(_AXIS), dict):
            continue
        axis: DocPath = ("jobs", index, "matrix", _AXIS)
        prompts = _read(spec, folder, axis, reporter)
        if prompts is not None:
            out[index] = {**entry, "matrix": {**matrix, _AXIS: prompts}}
    return out


def _read(
    spec: dict[str, Any], folder: Path, axis: DocPath, reporter: Reporter
) -> list[str] | None:
    """The prompts of one source (None when it cannot be used; reported)."""
    form = _form(spec)
    if form is None:
        return None  # the schema says what is wrong with the mapping
    key, name, column = form
    path = folder / name
    shown = str(path)
    ref = locate(reporter.doc, axis)[1]
    source = Source(shown, ref)
    text = _text(path, shown, (*axis, key), source, reporter)
    if text is None:
        return None
    found = _csv_lines(text, column, source, reporter) if column else _lines(text)
    prompts: list[str] = []
    lines: list[int] = []
    first: dict[str, int] = {}
    problems = 0
    for line, prompt in found:  # a bad line is reported and left out; the rest is judged
        bad = next((ch for ch in prompt if ch in _CONTROLS), None) if prompt else None
        if prompt is None:
            problems += 1
        elif bad is not None:
            message = f"a control character (U+{ord(bad):04X}) in this prompt"
            reporter.in_source(source, line, message, "is this a text file? save it as UTF-8 text")
            problems += 1
        elif not column and "\r" in prompt:
            # Only a CR that no LF follows is left after strip(): old Mac line ends, which
            # would make the whole file one prompt.
            reporter.in_source(source, line, "a carriage return (CR) inside the line",
                               "save the file with LF or CRLF line ends: one prompt a line")
            problems += 1
        elif prompt in first:
            message = f"the same prompt as line {first[prompt]}: both would be one job"
            hint = "remove one; for several takes of one prompt use 'repeat: N' on the entry"
            reporter.in_source(source, line, message, hint)
            problems += 1
        else:
            first[prompt] = line
            prompts.append(prompt)
            lines.append(line)
    if not prompts:
        if not problems:
            what = "no prompts in it" if key == "file" else f"no rows in its '{column}' column"
            hint = ("one prompt a line; blank lines and lines starting with # are skipped"
                    if key == "file" else "a header row, then one row per prompt")
            reporter.at((*axis, key), f"{shown}: {what}", hint)
        return None
    reporter.sources[axis] = Source(shown, ref, tuple(lines))
    return prompts


def _form(spec: dict[str, Any]) -> tuple[str, str, str] | None:
    """(``file`` or ``csv``, the file's name, the CSV column or '') of a well-formed source."""
    key = "csv" if "csv" in spec else "file"
    name, column = spec.get(key), spec.get("column", "") if key == "csv" else ""
    if len(spec) != (2 if key == "csv" else 1) or not isinstance(name, str) or not name.strip():
        return None
    if not isinstance(column, str) or (key == "csv" and not column.strip()):
        return None
    return key, name, column.strip()


def _text(
    path: Path, shown: str, where: DocPath, source: Source, reporter: Reporter
) -> str | None:
    """The file's text, or None (reported at the manifest's reference, or at the bad line)."""
    hint = f"the path is relative to the manifest's folder ({path.parent})"
    try:
        if not stat.S_ISREG(path.stat().st_mode) and not path.is_dir():
            # Reading a FIFO or a device would block or never end.
            reporter.at(where, f"the prompt file {shown} is not a regular file", hint)
            return None
        with path.open("rb") as stream:
            raw = stream.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        reporter.at(where, f"cannot read the prompt file {shown}: {exc.strerror or exc}", hint)
        return None
    if len(raw) > MAX_SOURCE_BYTES:
        message = f"{shown} is larger than the {MAX_SOURCE_BYTES // 2**20} MiB limit"
        reporter.at(where, message, "split it over several entries or manifests")
        return None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        reporter.in_source(source, 1, "the file is UTF-16, not UTF-8", "save it as UTF-8")
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        message = f"the file is not UTF-8 (byte 0x{raw[exc.start]:02x} on this line)"
        reporter.in_source(source, line, message, "save the file as UTF-8")
        return None


def _lines(text: str) -> Iterator[tuple[int, str | None]]:
    """(line, prompt) of each line that holds one: stripped, blanks and # comments skipped."""
    for number, line in enumerate(text.split("\n"), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            yield number, prompt


def _csv_lines(
    text: str, column: str, source: Source, reporter: Reporter
) -> Iterator[tuple[int, str | None]]:
    """(first line, prompt) of each CSV row; (line, None) for a row reported as unusable."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            reporter.in_source(source, 1, "the CSV file is empty", "give a header row first")
            yield 1, None
            return
        start = reader.line_num
        names = [name.strip() for name in header]
        if names.count(column) != 1:
            _no_column(names, column, source, reporter)
            yield 1, None
            return
        at = names.index(column)
        for row in reader:
            line, start = start + 1, reader.line_num
            if not row:
                continue
            cell = row[at].strip() if at < len(row) else None
            if cell:
                yield line, cell
                continue
            what = (f"no '{column}' cell: the row has {len(row)}, the header {len(header)}"
                    if cell is None else f"the '{column}' cell is empty")
            reporter.in_source(source, line, what, "give this row its prompt, or remove the row")
            yield line, None
    except csv.Error as exc:
        reporter.in_source(source, reader.line_num or 1, f"malformed CSV ({exc})",
                           'a quote (") is missing or extra on this line')
        yield reader.line_num or 1, None


def _no_column(names: list[str], column: str, source: Source, reporter: Reporter) -> None:
    """Report a header that lacks ``column`` (or has it twice)."""
    if column in names:
        message = f"column '{column}' appears twice in the header"
        reporter.in_source(source, 1, message, "rename one of them")
        return
    near = [name for name in names if name.lower() == column.lower()]
    shown = ", ".join(repr(name) for name in names if name) or "none"
    hint = f"did you mean '{near[0]}'? (exact name)" if near else f"the columns are {shown}"
    reporter.in_source(source, 1, f"no column '{column}' in the header", hint)
