"""The ledger: an append-only CSV file, the run's "never pay twice" memory.

One row per event, UTF-8, one header row; the last row of a ``job_id`` is its state.
Rows are complete: each repeats the job's previous row with the new fields changed, so
the last row alone holds the task id, prompt and everything else. Columns are read by
header name, so ledgers of older versions (fewer or other columns, other order) still
load; a missing column of today is added once by an atomic rewrite, after the file as it
was is kept as ``<ledger>.bak-<UTC time>``; columns we do not know are kept.

Strict reading: a ledger that does not look like ours is refused (``LedgerError``, exit 2,
``FILE:LINE``, a hint), never reinterpreted, and left as it is. Refused: a header with a
duplicated column or one that only looks like ours (``' cost'``); a header row in the
middle; a row with another number of cells than the header; a row longer than
``MAX_ROW``; a status not in ``STATUSES``; cells whose shape shows a shifted or swapped
column (a task id that is not a bounded token, a fingerprint that is not hex, ...); a
task id on a row whose status says no task exists; a row that drops or changes the task
id its job's previous row had (only ``submitting`` starts afresh, only ``submitted``
names a new task); a job id with spaces around it (a rerun would not find the job). A
UTF-8 BOM, CRLF or LF line ends and quoting styles are harmless and accepted silently. The
writer checks its own rows the same way.

Harmless oddities, signs of a hand edit that change no decision, are accepted with one
warning per kind (``FILE:LINE`` of the first, and how many): a row whose crc no longer
matches its cells (changed after it was written), blank lines, columns we do not write,
spaces around a value in a column we write without them, a ``metadata`` cell that is not
a JSON object of text values.

Spreadsheet safety: a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return would be a live formula when the CSV is opened in a spreadsheet
(OWASP "CSV injection"), so it is written with a leading ``'`` (``=1+1`` is stored as
``'=1+1``, ``-1`` as ``'-1``). A value that itself starts with ``'`` also gets one
more ``'``, so reading simply drops one leading ``'`` from every cell that has one and
every value comes back exactly as it was written.

Complete rows: the last column, ``crc``, holds ``c`` and the CRC-32 (8 hex digits) of the
row's values in the columns up to ``request``. A crash can cut the last row anywhere,
and a cut row can still parse with every cell (a quoted cell cut between a doubled
quote closes early: ``"{""model"`` reads as ``{"model``), so cell count alone proves
nothing. The last line of the file counts as complete when it has the header's cells,
passes the checks above, and its crc matches (or its crc is empty and ``crc`` is the
header's last column: the cut fell just after the last comma, every other cell is
whole). Such a row is kept even without its newline, which is added before the next
row. A ledger without a ``crc`` column (older versions, read before their upgrade) has
only cell count and checks to go on. Only a last line that is *not* complete is
removed as cut short, with a warning, its bytes appended to ``<ledger>.torn``; a cut
row never ends with its newline, so any other line that fails is refused, and so is an
open quote that runs to the end over lines that are whole rows. Elsewhere a crc that
does not match (a row changed in a spreadsheet) is no reason to refuse: such a row is
judged by its cells.

Durability: each row reaches the operating system before ``append`` returns (it
survives ``kill -9``); ``fsync`` runs when a row is appended a second or more after the
last one, within a second while idle (``keep_synced``), and at close; a failed fsync is a
``LedgerError``.

One run per file: ``open_ledger`` follows the path to the file itself (symlinks, also of
directories, resolved) and takes two ``flock`` locks at once, or fails with
``LedgerLockedError`` (exit 75); the kernel drops both when the holder dies. First
``<resolved path>.lock``, which holds the holder's pid for the message (and keeps out
older versions, which lock only that). Then the ledger file itself: a flock belongs to
the inode, so hard links and bind mounts, which no path comparison can catch, contend
for it too. An atomic rewrite gives the file a new inode, so the new file is locked
before it is renamed into place, and the old one stays locked until close; a process
that locked a file that was replaced meanwhile sees that its inode is no longer the
path's and locks again. A rewrite would split hard links (the other names keep the old
file), so a file with more than one link is never rewritten: refused, with a hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import io
import itertools
import json
import operator
import os
import re
import stat
import sys
import time
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, Protocol, Self

from runner.errors import LedgerError, LedgerLockedError
from runner.shard import Shard, shard_ledger_path

COLUMNS: Final = (
    "time", "job_id", "status", "task_id", "attempts", "http_status", "error",
    "idempotency_key", "fingerprint", "model", "duration", "resolution", "aspect_ratio",
    "image_url", "image_file", "image_sha256", "uploaded_at", "prompt", "manifest",
    "base_url", "mock", "progress", "video_url", "expires_at", "thumbnail_url", "cost",
    "file", "bytes", "request", "take", "file_sha256", "metadata", "crc",
)  # fmt: skip

#: Every status a row may hold, by the stage that writes it:
#: submit: ``submitting`` (flushed before the POST), ``submitted``, ``error`` (known not
#: created), ``rejected``, ``unknown`` (may exist; also what ``run`` makes of a
#: ``submitting`` row an earlier run left); poll: ``pending``, ``processing``,
#: ``completed``, ``failed``, ``cancelled`` (the API's states, normalised),
#: ``not_found`` (the API no longer knows the task); download: ``downloaded``, and
#: ``completed`` again when a download failed, ``expired`` when the link expired and the
#: task query gave no fresh one (the video is lost; ``run --retry-failed`` buys it again).
STATUSES: Final = frozenset({
    "submitting", "submitted", "error", "rejected", "unknown", "pending", "processing",
    "completed", "failed", "cancelled", "not_found", "downloaded", "expired",
})  # fmt: skip
#: Statuses written while no task is known: their rows never hold a task id. An ``error``
#: row holds only the task id its job's previous row had (a new try that failed before
#: anything was sent keeps the record of an earlier, deliberate purchase).
NO_TASK_STATUSES: Final = frozenset({"submitting", "unknown", "rejected"})
#: The most bytes one row may take on disk: far more than any row we write (a request
#: body is at most a few hundred KiB), far less than junk that would pass for a job.
MAX_ROW: Final = 1024 * 1024

FSYNC_INTERVAL: Final = 1.0
_REQUIRED: Final = ("job_id", "status")
_SET_BY_LEDGER: Final = frozenset({"time", "job_id", "mock", "base_url", "crc"})
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r", "'")
_FORMULA_CHARS: Final = frozenset(_FORMULA_START)
_CALLER_SETS: Final = frozenset(COLUMNS) - _SET_BY_LEDGER
# Frozen: a column added later is not covered, so the crcs written today stay valid.
_CRC_COVERS: Final = COLUMNS[: COLUMNS.index("request") + 1]
#: The same rule as ``api.valid_task_id`` (and no ``..``): no path, no control character.
_TASK_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
#: The shape of a non-empty cell in these columns; another value shows a shifted or
#: swapped column.
_SHAPES: Final = {
    "task_id": (_TASK_ID, "a task id (letters, digits, '_', '.', ':' or '-'; at most 128)"),
    "fingerprint": (re.compile(r"[0-9a-f]{8,64}"), "a fingerprint (hex digits)"),
    "idempotency_key": (re.compile(r"[!-~]{1,200}"), "an Idempotency-Key (no spaces)"),
    "attempts": (re.compile(r"[0-9]{1,9}"), "a number of attempts"),
    "http_status": (re.compile(r"[0-9]{3}"), "an HTTP status"),
    "mock": (re.compile(r"[01]"), "0 or 1"),
    "request": (re.compile(r"\{.*\}", re.DOTALL), "a JSON object"),
    "take": (re.compile(r"[1-9][0-9]{0,5}"), "a take number (1, 2, ...)"),
    "file_sha256": (re.compile(r"[0-9a-f]{64}"), "a SHA-256 (64 hex digits)"),
}
#: Columns whose values the runner writes without spaces around them.
_TRIMMED: Final = ("time", "model", "duration", "resolution", "aspect_ratio", "uploaded_at",
                   "progress", "expires_at", "cost", "bytes", "metadata")
#: Each kind of harmless oddity: what one is, and what several are called.
_ODDITIES: Final = {
    "edited": ("a row changed since apimart-batch wrote it (its crc no longer matches its "
               "cells); it is read as it is now", "rows"),
    "blank": ("a blank line; it is skipped", "blank lines"),
    "spaces": ("spaces around the value of column {column!r}; it is read as it is", "rows"),
    "metadata": ("a metadata cell that is not a JSON object of text values; its tags are not "
                 "shown", "rows"),
}
_SEPARATOR: Final = "\x1f"
_REOPENS: Final = 10
_BOM: Final = "\ufeff".encode()
_FIX_BY_HAND: Final = "restore the ledger from a backup, or fix that line by hand"

# The default limit (128 KiB a cell) would make a ledger with one long error text unreadable.
csv.field_size_limit(2**31 - 1)


def escape_cell(value: str) -> str:
    """Make ``value`` inert in a spreadsheet, losslessly (see the module docstring)."""
    return "'" + value if value and value[0] in _FORMULA_CHARS else value


def unescape_cell(cell: str) -> str:
    """Undo :func:`escape_cell`."""
    return cell.removeprefix("'")


def row_crc(row: Mapping[str, str]) -> str:
    """The ``crc`` cell of ``row``: ``c`` and the CRC-32 of its values up to ``request``."""
    data = "\x1f".join([row.get(name, "") for name in _CRC_COVERS])
    return f"c{zlib.crc32(data.encode(errors='surrogatepass')):08x}"


# A scanned row has every column of today: item lookups, several times faster than .get.
_crc_cells: Final = operator.itemgetter(*_CRC_COVERS)
_trimmed_cells: Final = operator.itemgetter(*_TRIMMED)


def _scanned_crc(row: Mapping[str, str]) -> str:
    """:func:`row_crc` of a row as ``_Scan`` yields it (every column present)."""
    return f"c{zlib.crc32(_SEPARATOR.join(_crc_cells(row)).encode(errors='surrogatepass')):08x}"


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _encode(cells: Iterable[str]) -> bytes:
    buffer = io.StringIO()
    # The default "\r\n" terminator makes the writer quote cells holding "\r" or "\n".
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue().encode()


def _line(row: Mapping[str, str], header: Iterable[str]) -> bytes:
    """``row`` as one CSV line under ``header``, escaped, its ``crc`` filled in."""
    values = {**row, "crc": row_crc(row)}
    return _encode([escape_cell(values.get(name, "")) for name in header])


class _LineWriter:
    """:func:`_line` for one ledger's appends: one CSV writer and buffer, reused."""

    def __init__(self, header: list[str]) -> None:
        self._header = header
        self._buffer = io.StringIO()
        # The default "\r\n" terminator makes the writer quote cells holding "\r" or "\n".
        self._writer = csv.writer(self._buffer)

    def line(self, row: Mapping[str, str]) -> bytes:
        """``row`` (whose ``crc`` is filled in) as one escaped CSV line."""
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        chars = _FORMULA_CHARS
        self._writer.writerow([
            "'" + value if value and value[0] in chars else value
            for value in map(row.get, self._header, itertools.repeat(""))
        ])  # fmt: skip
        return buffer.getvalue().encode()


def ledger_path(
    manifest: str, *, mock: bool, override: str | None = None, shard: Shard | None = None
) -> str:
    """The ledger a manifest's rows go to: ``<stem>[.mock].ledger.csv`` beside it.

    With a shard, its tag goes before the ending: ``<stem>.shard-I-of-N.ledger.csv``
    (also in an ``override``: ``--ledger L.csv --shard 1/4`` writes ``L.shard-1-of-4.csv``).
    """
    path = Path(manifest)
    base = override or str(path.with_name(path.stem + (".mock" if mock else "") + ".ledger.csv"))
    return base if shard is None else shard_ledger_path(base, shard)


class Recorder(Protocol):
    """What the pipeline stages need of a ledger (``Ledger``, or a run's set of them)."""

    @property
    def latest(self) -> Mapping[str, Mapping[str, str]]: ...

    def append(self, job_id: str, **fields: object) -> None: ...


def write_csv(rows: Iterable[Mapping[str, str]], columns: Iterable[str]) -> str:
    """``rows`` as CSV text under a ``columns`` header, cells escaped as in the ledger."""
    names = list(columns)
    return b"".join([_encode(names), *(_line(row, names) for row in rows)]).decode()


def _error(where: object, what: str, hint: str) -> LedgerError:
    return LedgerError(f"{where}: {what}\n  hint: {hint}")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _problem(
    row: Mapping[str, str], before: str | None, changed: Container[str] | None = None
) -> tuple[str, str] | None:
    """Why ``row`` cannot be trusted, as (what, hint), or None.

    ``before``: the task id cell of the job's previous row, None for its first row.
    ``changed``: the only columns whose shape may be wrong (the rest come from a row that
    passed these checks already); None: all of them.
    """
    job, status, task = row["job_id"], row["status"], row["task_id"]
    if job == "job_id" and status == "status":
        what = "a header row in the middle of the ledger (two ledgers joined?)"
        return what, "remove that line, or keep each ledger in a file of its own"
    if not job or "\0" in job:
        return f"job id {_shown(job)} is not one", _FIX_BY_HAND
    if job != job.strip():
        what = (f"job id {_shown(job)} has spaces around it: a rerun would not find job "
                f"{job.strip()!r} here and buy it again")
        return what, f"remove the spaces; {_FIX_BY_HAND}"
    if status not in STATUSES:
        what = f"status {_shown(status)} is not a status apimart-batch writes"
        if status.strip() in STATUSES:
            return what, f"remove the spaces around {status.strip()!r}"
        known = ", ".join(sorted(STATUSES))
        return what, f"a shifted or swapped column? (statuses: {known}); {_FIX_BY_HAND}"
    for name, (shape, meaning) in _SHAPES.items():
        if changed is not None and name not in changed:
            continue
        value = row.get(name, "")
        if value and (not shape.fullmatch(value) or (name == "task_id" and ".." in value)):
            what = f"{name} {_shown(value)} is not {meaning}"
            return what, f"a shifted or swapped column (a spreadsheet re-save?); {_FIX_BY_HAND}"
    if task and status in NO_TASK_STATUSES:
        what = f"status {status!r} with task id {task!r}, but that status says no task exists"
        hint = "a shifted or swapped column? if the task exists, the row must say so"
        return what, f"{hint}; {_FIX_BY_HAND}"
    if status in ("submitting", "submitted") or (before is None and status != "error"):
        return None
    if task == (before or ""):
        return None
    if not task:
        what = (f"job {job!r} had task {before!r}; this {status!r} row drops it, so a "
                "rerun would buy the job again")
        return what, "put the task id back on this row, or remove the row if it is wrong"
    if not before:
        what = f"status {status!r} with task id {task!r}, but no earlier row of the job has a task"
        return what, _FIX_BY_HAND
    return f"job {job!r} had task {before!r}; this {status!r} row names {task!r}", _FIX_BY_HAND


def _tags_cell(cell: str) -> bool:
    """Whether a ``metadata`` cell is a JSON object of text values (what the runner writes)."""
    try:
        tags = json.loads(cell)
    except (ValueError, RecursionError):
        return False
    return isinstance(tags, dict) and all(isinstance(value, str) for value in tags.values())


def _parse(text: str) -> list[str]:
    """The cells of one record (``[]`` for a blank line); csv.Error if it is not one."""
    records = list(csv.reader([text], strict=True))
    if len(records) != 1:
        msg = f"{len(records)} records in one"
        raise csv.Error(msg)
    return records[0]


class _Scan:
    """One pass over a ledger file: its header, its rows, and the state of its end."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file, self.path = file, path
        self.header: list[str] = []
        #: Where the last row kept ends; with ``torn``, what follows is a row cut short.
        self.end = 0
        self.torn = False
        #: What the last row kept lacks of its line end (b"" when it has one).
        self.open_end = b""
        self._tasks: dict[str, str] = {}
        self._header_line = 1
        self._has_crc = False
        #: Harmless oddities met: kind -> (first line, how many, the column it names).
        self._odd: dict[str, tuple[int, int, str]] = {}

    def _records(self) -> Iterator[tuple[int, int, bytes]]:
        """(first line, offset, bytes) of each record, lines joined while a quote is open."""
        offset = line = 0
        while True:
            first, parts, size, quotes = line + 1, [], 0, 0
            while chunk := self.file.readline(MAX_ROW + 1 - size):
                parts.append(chunk)
                size, line, quotes = size + len(chunk), line + 1, quotes + chunk.count(b'"')
                if size > MAX_ROW:
                    where = f"{self.path}:{first}"
                    what = f"a row longer than {MAX_ROW // 1024} KiB (no ledger row is)"
                    raise _error(where, what, "is this a ledger? " + _FIX_BY_HAND)
                if not chunk.endswith(b"\n") or quotes % 2 == 0:
                    break
            if not parts:
                return
            yield first, offset, b"".join(parts)
            offset += size

    def _cells(self, line: int, offset: int, raw: bytes) -> list[str]:
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            where, what = f"{self.path}:{line}", f"not UTF-8 text (byte {offset + exc.start})"
            raise _error(where, what, "is this a ledger?") from exc
        try:
            return _parse(text)
        except csv.Error as exc:
            where = f"{self.path}:{line}"
            raise _error(where, f"malformed CSV ({exc})", "was it edited by hand?") from exc

    def _check_header(self, header: list[str], line: int) -> None:
        where = f"{self.path}:{line}"
        for name in header:
            if name not in COLUMNS and (like := name.strip().lower()) in COLUMNS:
                what = f"column {name!r} is not one of ours, but looks like {like!r}"
                raise _error(where, what, "give it our exact name; this file was left as it is")
        if missing := [name for name in _REQUIRED if name not in header]:
            what = f"not an apimart-batch ledger (missing columns {', '.join(missing)})"
            raise _error(where, what, "pass another --ledger; this file was left as it is")
        if twice := sorted({name for name in header if header.count(name) > 1}):
            what = f"column {twice[0]!r} appears twice in the header: which one holds the job's?"
            raise _error(where, what, "rename or remove one of them; this file was left as it is")

    def _whole(self, cells: list[str], row: Mapping[str, str]) -> bool:
        """Whether the last line, cells parsed, is a complete row (see the module docstring)."""
        if len(cells) != len(self.header):
            return False
        if "crc" not in self.header:
            return _problem(row, self._tasks.get(row["job_id"])) is None
        crc = row["crc"]
        return crc == row_crc(row) or (not crc and self.header[-1] == "crc")

    def _is_row(self, raw: bytes) -> bool:
        """Whether one physical line reads, on its own, as a sound row."""
        try:
            cells = _parse(raw.decode())
        except (UnicodeDecodeError, csv.Error):
            return False
        if len(cells) != len(self.header):
            return False
        return _problem(self._row(cells), None) is None

    def _tail(self, line: int, raw: bytes) -> None:
        """The last line is not complete: a row cut short, unless it hides whole rows."""
        if any(self._is_row(part + b"\n") for part in raw.split(b"\n")[1:-1]):
            where = f"{self.path}:{line}"
            what = "a quoted cell opened on this line runs to the end of the file, over whole rows"
            raise _error(where, what, 'a quote (") is missing or extra there')
        self.torn = True

    def _row(self, cells: list[str]) -> dict[str, str]:
        """Cells by header name, with every column of today (missing ones empty)."""
        cells_by_name = zip(self.header, map(unescape_cell, cells), strict=False)
        return dict.fromkeys(COLUMNS, "") | dict(cells_by_name)

    @staticmethod
    def _line_end(raw: bytes) -> bytes:
        """What a kept record lacks of its line end."""
        return b"" if raw.endswith(b"\n") else b"\n" if raw.endswith(b"\r") else b"\r\n"

    def _note(self, kind: str, line: int, column: str = "") -> None:
        first, count, named = self._odd.get(kind, (line, 0, column))
        self._odd[kind] = (first, count + 1, named)

    def _inspect(self, line: int, row: Mapping[str, str]) -> None:
        """Note the harmless oddities of one whole row (see the module docstring)."""
        crc = row["crc"]
        if crc and self._has_crc and crc != _scanned_crc(row):
            self._note("edited", line)
        for name, value in zip(_TRIMMED, _trimmed_cells(row), strict=True):
            if value and value != value.strip():
                self._note("spaces", line, name)
                break
        if row["metadata"] and not _tags_cell(row["metadata"]):
            self._note("metadata", line)

    def warnings(self) -> list[str]:
        """One warning per kind of harmless oddity met, at its first line, with a count."""
        found = []
        if extra := [name for name in self.header if name not in COLUMNS]:
            names = ", ".join(map(repr, extra))
            found.append(f"{self.path}:{self._header_line}: columns apimart-batch does not "
                         f"write: {names}; they are kept as they are")
        for kind, (line, count, column) in self._odd.items():
            what, several = _ODDITIES[kind]
            text = f"{self.path}:{line}: {what.format(column=column)}"
            found.append(text + (f" ({count} {several} like this; this is the first)"
                                 if count != 1 else ""))
        return found

    def rows(self) -> Iterator[dict[str, str]]:
        """Yield every complete row, with every column of today (missing ones empty)."""
        records = self._records()
        header: list[str] = [""]
        for line, offset, raw in records:
            bom = len(_BOM) if offset == 0 and raw.startswith(_BOM) else 0  # a spreadsheet's
            header = self._cells(line, offset + bom, raw[bom:])
            self.end = offset + len(raw)
            self.open_end = self._line_end(raw)
            if header:
                self._check_header(header, line)
                self._header_line = line
                break
            self._note("blank", line)
        else:
            self._check_header(header, 1)
        self.header = header
        self._has_crc = "crc" in header
        for line, offset, raw in records:
            ended = raw.endswith(b"\n") and raw.count(b'"') % 2 == 0
            try:
                cells = self._cells(line, offset, raw)
            except LedgerError:
                if ended:
                    raise
                self._tail(line, raw)
                return
            where = f"{self.path}:{line}"
            if cells:
                row = self._row(cells)
                if not ended and not self._whole(cells, row):
                    self._tail(line, raw)
                    return
                if len(cells) != len(header):
                    what = f"{len(cells)} cells, but the header has {len(header)}"
                    raise _error(where, what, "a row cut or shifted? " + _FIX_BY_HAND)
                if problem := _problem(row, self._tasks.get(row["job_id"])):
                    raise _error(where, *problem)
                self._tasks[row["job_id"]] = row["task_id"]
                self._inspect(line, row)
            else:
                self._note("blank", line)
            self.end = offset + len(raw)
            self.open_end = self._line_end(raw)
            if cells:
                yield row


_KINDS: Final = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)  # fmt: skip


def _require_regular(path: Path) -> None:
    """Refuse an existing path that is not a regular file (a missing one is left to the caller).

    Reading a FIFO blocks forever, and the header rewrite would replace ``/dev/null``.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing or unreachable: opening it says why
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise _error(path, f"is {kind}, not a regular file", "pass a file path to --ledger")


def iter_rows(
    path: str | os.PathLike[str], warn: Callable[[str], None] | None = None
) -> Iterator[dict[str, str]]:
    """Yield every row of the ledger at ``path`` in file order, without locking or repairing it.

    A row cut short at the end (a crash, or a run writing right now) is skipped, and an
    empty file (a run creating the ledger right now: it locks the file, then writes the
    header) has no rows. ``warn``, when given, receives the harmless oddities met (see the
    module docstring) once the last row is read.
    """
    path = Path(path)
    _require_regular(path)
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _error(path, f"cannot read ({exc.strerror})", "check the path") from exc
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            return
        scan = _Scan(file, path)
        yield from scan.rows()
        if warn is not None:
            for message in scan.warnings():
                warn(message)


def read_latest(
    path: str | os.PathLike[str], warn: Callable[[str], None] | None = None
) -> dict[str, dict[str, str]]:
    """The last row of each job in the ledger at ``path``, without locking or modifying it.

    ``warn`` receives the harmless oddities met, as for :func:`iter_rows`.
    """
    return {row["job_id"]: row for row in iter_rows(path, warn)}


def ledger_is_mock(path: str | os.PathLike[str]) -> bool:
    """True when the ledger at ``path`` holds rows of --mock runs (read without locking)."""
    return any(row["mock"] == "1" for row in iter_rows(path))


def _fsync_directory(path: Path) -> None:
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        what = f"cannot save the ledger's directory to disk (fsync: {exc.strerror})"
        raise _error(path, what, "check the disk") from exc


def _rewrite(
    real: Path, header: list[str], rows: Iterable[Mapping[str, str]], mode: int | None
) -> int:
    """Replace ``real`` atomically with ``header`` and ``rows``; fsync file and directory.

    Returns the new file open for appends, locked before it took the ledger's name.
    """
    temp = real.with_name(f".{real.name}.{os.getpid()}.tmp")  # we hold the lock: no clash
    fd = -1
    try:
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new inode: nobody else has it
        if mode is not None:
            os.fchmod(fd, mode)
        with open(fd, "wb", closefd=False) as out:
            out.write(_encode(header))
            for row in rows:
                out.write(_line(row, header))
        os.fsync(fd)
        temp.replace(real)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        temp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        what = f"cannot write the ledger ({exc.strerror})"
        raise _error(real, what, "check permissions and free space") from exc
    try:
        _fsync_directory(real)
    except LedgerError:
        os.close(fd)
        raise
    return fd


def _backup(path: Path, real: Path) -> Path:
    """Keep the file as it is now as ``<ledger>.bak-<UTC time>`` (a hard link, else a copy)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(100):
        kept = real.with_name(f"{real.name}.bak-{stamp}" + (f"-{n}" if n else ""))
        try:
            try:
                os.link(real, kept)  # the rewrite leaves the old inode to this name alone
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: copy
                with real.open("rb") as source, kept.open("xb") as copy:
                    while block := source.read(1 << 20):
                        copy.write(block)
                    copy.flush()
                    os.fsync(copy.fileno())
        except FileExistsError:
            continue
        except OSError as exc:
            what = f"cannot keep a backup before the rewrite ({exc.strerror})"
            raise _error(path, what, "check permissions and free space") from exc
        return kept
    raise _error(path, "cannot find a free backup name", "remove old .bak- files")


def _refuse_split(path: Path, st: os.stat_result, what: str) -> None:
    """A file with hard links must not be rewritten: its other names would keep the old file."""
    if st.st_nlink > 1:
        raise _error(
            path,
            f"has {st.st_nlink} hard links; {what} means replacing the file, which would leave "
            "the other names on the old copy",
            "keep one name (cp the file to a new one, then mv it over this one) and use "
            "symlinks for the others; this file was left as it is",
        )


def _holder(fd: int) -> int | None:
    """The pid Linux names in /proc/locks for the flock on ``fd``'s file, if one is clear."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    pids = {fields[4] for fields in map(str.split, text.splitlines())
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key}
    pid = pids.pop() if len(pids) == 1 else ""
    return int(pid) if pid.isdecimal() and int(pid) > 0 else None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _Lock:
    """The locks of one open ledger: the sidecar (with our pid) and each inode it had."""

    def __init__(self, sidecar: int, fd: int) -> None:
        self.sidecar = sidecar
        self.fds = [fd]

    @property
    def fd(self) -> int:
        """The ledger file as it is now, open for appends."""
        return self.fds[-1]

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.sidecar, 0)
        for fd in (*self.fds, self.sidecar):
            with contextlib.suppress(OSError):
                os.close(fd)


def _lock(path: Path, real: Path, *, create: bool) -> _Lock:
    """Lock ``<real>.lock``, then the file ``real`` itself (see the module docstring)."""
    sidecar_path = real.with_name(real.name + ".lock")
    try:
        sidecar = os.open(sidecar_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        what = f"cannot create the lock file ({exc.strerror})"
        raise _error(sidecar_path, what, "check the directory's permissions") from exc
    try:
        if not _try_flock(sidecar):
            holder = os.pread(sidecar, 32, 0).decode(errors="replace").strip()
            raise LedgerLockedError(str(path), int(holder) if holder.isdecimal() else None)
        fd = _lock_file(path, real, create=create)
    except BaseException:
        os.close(sidecar)
        raise
    os.ftruncate(sidecar, 0)
    os.pwrite(sidecar, f"{os.getpid()}\n".encode(), 0)
    return _Lock(sidecar, fd)


def _lock_file(path: Path, real: Path, *, create: bool) -> int:
    """Open and flock the file at ``real``, again until the lock is on the file of that name."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(_REOPENS):
        try:
            fd = os.open(real, flags, 0o666)
        except OSError as exc:
            raise _error(path, f"cannot open ({exc.strerror})", "check its permissions") from exc
        if not _try_flock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise LedgerLockedError(str(path), holder)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), real.stat()):
                return fd
        os.close(fd)  # replaced (a rewrite by the run we raced) or removed meanwhile
    what = "is replaced again and again while being opened"
    raise _error(path, what, "is another program rewriting it?")


class Ledger:
    """An open, locked ledger: the latest row of every job, and ``append`` for new rows.

    Use :func:`open_ledger`; single-threaded (appends are small blocking writes).
    """

    def __init__(
        self,
        path: Path,
        header: list[str],
        latest: dict[str, dict[str, str]],
        *,
        lock: _Lock,
        mock: bool,
        base_url: str,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._header, self._latest, self._lock = header, latest, lock
        self._mock, self._base_url, self._clock = "1" if mock else "0", base_url, clock
        self._fd: int | None = lock.fd
        self._synced = clock()
        self._unsynced = False
        self._broken = False
        self._lines = _LineWriter(header)
        self._second, self._second_text = -1, ""

    @property
    def latest(self) -> Mapping[str, Mapping[str, str]]:
        """job_id -> that job's last row (a read-only view)."""
        return MappingProxyType(self._latest)

    def append(self, job_id: str, **changes: object) -> None:
        """Write the job's previous row with ``changes`` applied (None: an empty cell).

        ``time``, ``mock``, ``base_url`` and ``crc`` are filled in here. The row has
        reached the OS when this returns; it is then ``latest[job_id]``. A row the
        ledger would refuse to read back (an unknown status, a task id where none may
        be) is a LedgerError and is not written; an ``error`` text that would make the
        row longer than ``MAX_ROW`` is cut.
        """
        if not changes.keys() <= _CALLER_SETS:
            bad = sorted(changes.keys() - set(COLUMNS) | changes.keys() & _SET_BY_LEDGER)
            msg = f"append: {', '.join(bad)}: not a column the caller may set"
            raise ValueError(msg)
        if self._fd is None or self._broken:
            what = "closed, or a write or fsync failed earlier: no more rows"
            raise _error(self.path, what, "open the ledger again (it repairs a cut row)")
        before = self._latest.get(job_id)
        row = dict(before or dict.fromkeys(self._header, ""))
        for name, value in changes.items():
            row[name] = "" if value is None else value if type(value) is str else str(value)
        row["time"] = self._stamp()
        row["job_id"], row["mock"], row["base_url"] = job_id, self._mock, self._base_url
        # The previous row passed these checks (when written, or when the ledger was read):
        # only the changed cells can have a wrong shape.
        if problem := _problem(row, None if before is None else before["task_id"], changes):
            what = f"refusing to write a row the ledger would not read back: {problem[0]}"
            where = f"{self.path}: job {job_id!r}"
            raise _error(where, what, "this is a bug of apimart-batch; please report it")
        row["crc"] = row_crc(row)
        try:
            data = self._lines.line(row)
            if len(data) > MAX_ROW:
                data = self._shortened(row, len(data))
        except UnicodeEncodeError as exc:
            where = f"{self.path}: job {job_id!r}"
            raise _error(where, f"not valid Unicode ({exc.reason})", "fix the manifest") from exc
        if len(data) > MAX_ROW:
            where = f"{self.path}: job {job_id!r}"
            what = f"a row of {len(data)} bytes; rows are at most {MAX_ROW} bytes"
            raise _error(where, what, "shorten the job's prompt or request")
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            self._broken = True  # a partial row must never get another row glued onto it
            what = f"cannot append a row ({exc.strerror})"
            raise _error(
                self.path, what, "free disk space; the next run repairs the last row"
            ) from exc
        self._latest[job_id] = row
        self._unsynced = True
        if self._clock() - self._synced >= FSYNC_INTERVAL:
            self.sync()

    def _shortened(self, row: dict[str, str], size: int) -> bytes:
        """The row's line with its ``error`` text cut to fit ``MAX_ROW`` (``row`` changes)."""
        text = row["error"].encode()
        keep = max(0, len(text) - (size - MAX_ROW) - 100)
        row["error"] = text[:keep].decode(errors="ignore") + f" [cut: {len(text) - keep} bytes]"
        row["crc"] = row_crc(row)
        return self._lines.line(row)

    def _stamp(self) -> str:
        """Now in UTC, to the millisecond: ``2026-01-31T12:00:00.123Z``."""
        now = time.time_ns()
        second, rest = divmod(now, 1_000_000_000)
        if second != self._second:  # the date and time part changes once a second
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{rest // 1_000_000:03d}Z"

    @property
    def unsynced(self) -> bool:
        """Rows have been appended since the last fsync."""
        return self._unsynced

    def sync(self) -> None:
        """Force the rows written so far onto the disk (fsync).

        Raises LedgerError when the fsync fails; the ledger then accepts no more rows.
        """
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = True  # the kernel may have dropped rows: write nothing after them
            what = f"cannot save the ledger to disk (fsync: {exc.strerror})"
            raise _error(self.path, what, "check the disk; the newest rows may be lost") from exc
        self._synced = self._clock()
        self._unsynced = False

    def close(self) -> None:
        """fsync, close the file and release the lock; closing twice is harmless."""
        if self._fd is None:
            return
        try:
            if not self._broken:
                self.sync()
            else:  # the failure was raised already: keep what can be kept, raise nothing new
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
        finally:
            self._fd = None
            self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def keep_synced(ledgers: Iterable[Ledger], interval: float = FSYNC_INTERVAL) -> None:
    """fsync each ledger holding unsynced rows every ``interval`` seconds, until cancelled.

    ``append`` fsyncs only when a row comes a second or more after the last fsync: without
    this, the last rows of a burst would wait for the next row or for the end of the run.
    """
    watched = tuple(ledgers)
    while True:
        await asyncio.sleep(interval)
        for ledger in watched:
            if ledger.unsynced:
                ledger.sync()


def open_ledger(
    path: str | os.PathLike[str],
    *,
    mock: bool,
    base_url: str,
    warn: Callable[[str], None] = _warn_stderr,
    clock: Callable[[], float] = time.monotonic,
    create: bool = True,
) -> Ledger:
    """Lock the ledger at ``path``, create or repair it, and return it ready for appends.

    A symlink is followed: the rows, the lock and any rewrite go to its target.

    Args:
        mock: this run talks to the emulator; a ledger of the other mode is refused.
        base_url: the API this run talks to; a change from the ledger's last row warns
            (not for mock runs: the emulator's port changes from run to run).
        warn: receives warnings (a repaired last row, a changed base URL, an upgrade).
        clock: seconds, monotonic; decides when to fsync (tests inject a fake).
        create: create a missing ledger; when False, a missing ledger is an error.

    Raises:
        LedgerLockedError: another process holds the ledger (under any of its names).
        LedgerError: the ledger is missing its directory, unreadable, not a ledger (see
            the module docstring), or was written in the other mode.
    """
    path = Path(path)
    if not path.parent.is_dir():
        what = f"directory {path.parent} does not exist"
        raise _error(path, what, "create it, or pass another --ledger")
    _require_regular(path)
    if not create and not path.exists():
        raise _error(path, "no such ledger", "check --ledger; has anything been submitted yet?")
    real = path.resolve()
    if not real.parent.is_dir():
        what = f"it links to {real}, whose directory does not exist"
        raise _error(path, what, "fix the link, or pass another --ledger")
    lock = _lock(path, real, create=create)
    try:
        header, latest = _load(path, real, lock, mock=mock, base_url=base_url, warn=warn)
        return Ledger(path, header, latest, lock=lock, mock=mock, base_url=base_url, clock=clock)
    except BaseException:
        lock.release()
        raise


def _load(
    path: Path, real: Path, lock: _Lock, *, mock: bool, base_url: str,
    warn: Callable[[str], None],
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Read, check and repair (or create) the ledger; we hold its lock."""
    try:
        file = real.open("r+b")
    except OSError as exc:
        raise _error(path, f"cannot open ({exc.strerror})", "check its permissions") from exc
    with file:
        st = os.fstat(file.fileno())
        if not os.path.samestat(st, os.fstat(lock.fd)):
            raise _error(path, "was replaced while being opened", "try again")
        if st.st_size == 0:
            _refuse_split(path, st, "writing its header")
            lock.fds.append(_rewrite(real, list(COLUMNS), (), None))
            return list(COLUMNS), {}
        scan = _Scan(file, path)
        latest: dict[str, dict[str, str]] = {}
        modes: set[str] = set()
        last_url = ""
        for row in scan.rows():
            latest[row["job_id"]] = row
            modes.add(row["mock"])
            last_url = row["base_url"] or last_url
        for message in scan.warnings():
            warn(message)
        if mock and "0" in modes:
            what = "written by real runs; --mock must not add emulator rows to it"
            raise _error(path, what, "use another --ledger for --mock runs")
        if not mock and "1" in modes:
            what = "written by --mock runs; a mock task id must never make a real run skip a job"
            raise _error(path, what, "use another --ledger for real runs")
        missing = [name for name in COLUMNS if name not in scan.header]
        if missing:
            _refuse_split(path, st, f"adding the columns {', '.join(missing)}")
        if not mock and last_url and last_url.rstrip("/") != base_url.rstrip("/"):
            warn(
                f"{path}: the last row was written against {last_url}, this run uses {base_url}; "
                "task ids of one API are unknown to the other"
            )
        if scan.torn:
            _set_aside(path, real, file, scan.end, warn)
        if missing:
            header = list(COLUMNS) + [name for name in scan.header if name not in COLUMNS]
            kept = _backup(path, real)
            file.seek(0)
            lock.fds.append(_rewrite(real, header, _Scan(file, path).rows(), st.st_mode & 0o7777))
            warn(f"{path}: added the columns {', '.join(missing)} (ledger of an older version); "
                 f"the file as it was is kept as {kept}")
            return header, latest
        try:
            if scan.torn:
                file.truncate(scan.end)
            elif scan.open_end:
                file.seek(0, os.SEEK_END)
                file.write(scan.open_end)  # the last row is whole: only its line end is missing
            if scan.torn or scan.open_end:
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            what = f"cannot repair the end of the ledger ({exc.strerror})"
            raise _error(path, what, "check permissions and free space") from exc
        return scan.header, latest


def _set_aside(
    path: Path, real: Path, file: BinaryIO, end: int, warn: Callable[[str], None]
) -> None:
    """Append the cut last row (from ``end``) to ``<ledger>.torn``, in case it held a task id."""
    file.seek(end)
    cut = file.read()
    kept = real.with_name(real.name + ".torn")
    try:
        with kept.open("ab") as aside:
            aside.write(cut)
            aside.flush()
            os.fsync(aside.fileno())
    except OSError as exc:
        what = f"cannot keep the cut last row in {kept} ({exc.strerror})"
        raise _error(path, what, "check permissions and free space") from exc
    warn(
        f"{path}: removed a last row cut short by a crash ({len(cut)} bytes, "
        f"appended to {kept}): {cut[:200].decode(errors='replace')!r}"
    )
