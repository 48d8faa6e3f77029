"""The ledger: an append-only CSV file, the run's "never pay twice" memory.

One row per event, UTF-8, one header row; the last row of a ``job_id`` is its state.
Rows are complete: each repeats the job's previous row with the new fields changed, so
the last row alone holds the task id, prompt and everything else. Columns are read by
header name, so ledgers of older versions (fewer or other columns, other order) still
load; a missing column of today is added once by an atomic rewrite, and columns we do
not know are kept.

Spreadsheet safety: a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return would be a live formula when the CSV is opened in a spreadsheet
(OWASP "CSV injection"), so it is written with a leading ``'`` (``=1+1`` is stored as
``'=1+1``, ``-1`` as ``'-1``). A value that itself starts with ``'`` also gets one
more ``'``, so reading simply drops one leading ``'`` from every cell that has one and
every value comes back exactly as it was written.

Durability: each row reaches the operating system before ``append`` returns (it
survives ``kill -9``); ``fsync`` runs when a row is appended a second or more after the
last one, within a second while idle (``keep_synced``), and at close; a failed fsync is a
``LedgerError``. A last row cut short by a crash is removed on the next open,
with a warning; its bytes are appended to ``<ledger>.torn`` in case they held a task id.
One run at a time: an OS lock on ``<ledger>.lock`` (which holds the holder's pid) is
released by the kernel when the holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import io
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, Protocol, Self

from runner.errors import LedgerError, LedgerLockedError

COLUMNS: Final = (
    "time", "job_id", "status", "task_id", "attempts", "http_status", "error",
    "idempotency_key", "fingerprint", "model", "duration", "resolution", "aspect_ratio",
    "image_url", "image_file", "image_sha256", "uploaded_at", "prompt", "manifest",
    "base_url", "mock", "progress", "video_url", "expires_at", "thumbnail_url", "cost",
    "file", "bytes", "request",
)  # fmt: skip

FSYNC_INTERVAL: Final = 1.0
_REQUIRED: Final = ("job_id", "status")
_SET_BY_LEDGER: Final = frozenset({"time", "job_id", "mock", "base_url"})
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r", "'")

# The default limit (128 KiB a cell) would make a ledger with one long error text unreadable.
csv.field_size_limit(2**31 - 1)


def escape_cell(value: str) -> str:
    """Make ``value`` inert in a spreadsheet, losslessly (see the module docstring)."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_cell(cell: str) -> str:
    """Undo :func:`escape_cell`."""
    return cell.removeprefix("'")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _encode(cells: Iterable[str]) -> bytes:
    buffer = io.StringIO()
    # The default "\r\n" terminator makes the writer quote cells holding "\r" or "\n".
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue().encode()


def ledger_path(manifest: str, *, mock: bool, override: str | None = None) -> str:
    """The ledger a manifest's rows go to: ``<stem>[.mock].ledger.csv`` beside it."""
    if override:
        return override
    path = Path(manifest)
    return str(path.with_name(path.stem + (".mock" if mock else "") + ".ledger.csv"))


class Recorder(Protocol):
    """What the pipeline stages need of a ledger (``Ledger``, or a run's set of them)."""

    @property
    def latest(self) -> Mapping[str, Mapping[str, str]]: ...

    def append(self, job_id: str, **fields: object) -> None: ...


def write_csv(rows: Iterable[Mapping[str, str]], columns: Iterable[str]) -> str:
    """``rows`` as CSV text under a ``columns`` header, cells escaped as in the ledger."""
    names = list(columns)
    lines = [_encode(names)] + [_encode(escape_cell(row.get(n, "")) for n in names) for row in rows]
    return b"".join(lines).decode()


def _error(where: object, what: str, hint: str) -> LedgerError:
    return LedgerError(f"{where}: {what}\n  hint: {hint}")


class _Scan:
    """One pass over a ledger file: its header, its rows, where the last complete row ends."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file, self.path = file, path
        self.header: list[str] = []
        self.offset = self.end = 0
        self.exhausted = self.torn = False

    def _lines(self) -> Iterator[str]:
        for raw in self.file:
            if not raw.endswith(b"\n"):
                self.torn = True
                break
            try:
                line = raw.decode()
            except UnicodeDecodeError as exc:
                where = f"{self.path}: byte {self.offset + exc.start}"
                raise _error(where, "not UTF-8 text", "is this a ledger?") from exc
            self.offset += len(raw)
            yield line
        self.exhausted = True

    def _records(self) -> Iterator[list[str]]:
        reader = csv.reader(self._lines(), strict=True)
        try:
            for record in reader:
                self.end = self.offset
                if record:
                    yield record
        except csv.Error as exc:
            if not self.exhausted:
                where = f"{self.path}:{reader.line_num}"
                raise _error(where, f"malformed CSV ({exc})", "was it edited by hand?") from exc
            self.torn = True  # an unterminated quoted cell at the very end

    def rows(self) -> Iterator[dict[str, str]]:
        """Yield every complete row, with every column of today (missing ones empty)."""
        records = self._records()
        header = next(records, [""])
        header[0] = header[0].removeprefix("\ufeff")  # saved by a spreadsheet as UTF-8 with BOM
        if missing := [name for name in _REQUIRED if name not in header]:
            what = f"not an apimart-batch ledger (missing columns {', '.join(missing)})"
            raise _error(self.path, what, "pass another --ledger; this file was left as it is")
        self.header = header
        blank = dict.fromkeys(COLUMNS, "")
        for record in records:
            yield blank | {
                name: unescape_cell(cell) for name, cell in zip(header, record, strict=False)
            }


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


def iter_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, str]]:
    """Yield every row of the ledger at ``path`` in file order, without locking or repairing it.

    A row cut short at the end (a crash, or a run writing right now) is skipped.
    """
    path = Path(path)
    _require_regular(path)
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _error(path, f"cannot read ({exc.strerror})", "check the path") from exc
    with file:
        yield from _Scan(file, path).rows()


def read_latest(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The last row of each job in the ledger at ``path``, without locking or modifying it."""
    return {row["job_id"]: row for row in iter_rows(path)}


def ledger_is_mock(path: str | os.PathLike[str]) -> bool:
    """True when the ledger at ``path`` holds rows of --mock runs (read without locking)."""
    return any(row["mock"] == "1" for row in iter_rows(path))


def _rewrite(
    path: Path, header: list[str], rows: Iterable[Mapping[str, str]], mode: int | None
) -> None:
    """Replace ``path`` atomically with ``header`` and ``rows``; fsync file and directory."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # we hold the lock: no clash
    try:
        with temp.open("wb") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            out.write(_encode(header))
            for row in rows:
                out.write(_encode(escape_cell(row.get(name, "")) for name in header))
            out.flush()
            os.fsync(out.fileno())
        temp.replace(path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        what = f"cannot write the ledger ({exc.strerror})"
        raise _error(path, what, "check permissions and free space") from exc
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        what = f"cannot save the ledger's directory to disk (fsync: {exc.strerror})"
        raise _error(path, what, "check the disk") from exc


def _lock(path: Path) -> int:
    """Lock ``<path>.lock`` at once, or raise LedgerLockedError with the holder's pid."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        what = f"cannot create the lock file ({exc.strerror})"
        raise _error(lock_path, what, "check the directory's permissions") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LedgerLockedError(str(path), int(holder) if holder.isdecimal() else None) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
        lock_fd: int,
        mock: bool,
        base_url: str,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._header, self._latest, self._lock_fd = header, latest, lock_fd
        self._mock, self._base_url, self._clock = "1" if mock else "0", base_url, clock
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._synced = clock()
        self._unsynced = False
        self._broken = False

    @property
    def latest(self) -> Mapping[str, Mapping[str, str]]:
        """job_id -> that job's last row (a read-only view)."""
        return MappingProxyType(self._latest)

    def append(self, job_id: str, **changes: object) -> None:
        """Write the job's previous row with ``changes`` applied (None: an empty cell).

        ``time``, ``mock`` and ``base_url`` are filled in here. The row has reached the
        OS when this returns; it is then ``latest[job_id]``.
        """
        if bad := sorted(changes.keys() - set(COLUMNS) | changes.keys() & _SET_BY_LEDGER):
            msg = f"append: {', '.join(bad)}: not a column the caller may set"
            raise ValueError(msg)
        if self._fd is None or self._broken:
            what = "closed, or a write or fsync failed earlier: no more rows"
            raise _error(self.path, what, "open the ledger again (it repairs a cut row)")
        row = dict(self._latest.get(job_id) or dict.fromkeys(self._header, ""))
        row |= {name: "" if value is None else str(value) for name, value in changes.items()}
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        row |= {"time": stamp, "job_id": job_id, "mock": self._mock, "base_url": self._base_url}
        try:
            data = _encode(escape_cell(row[name]) for name in self._header)
        except UnicodeEncodeError as exc:
            where = f"{self.path}: job {job_id!r}"
            raise _error(where, f"not valid Unicode ({exc.reason})", "fix the manifest") from exc
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
            os.close(self._fd)
            self._fd = None
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)

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

    Args:
        mock: this run talks to the emulator; a ledger of the other mode is refused.
        base_url: the API this run talks to; a change from the ledger's last row warns
            (not for mock runs: the emulator's port changes from run to run).
        warn: receives warnings (a repaired last row, a changed base URL).
        clock: seconds, monotonic; decides when to fsync (tests inject a fake).
        create: create a missing ledger; when False, a missing ledger is an error.

    Raises:
        LedgerLockedError: another process holds the ledger.
        LedgerError: the ledger is missing its directory, unreadable, not a ledger, or
            was written in the other mode.
    """
    path = Path(path)
    if not path.parent.is_dir():
        what = f"directory {path.parent} does not exist"
        raise _error(path, what, "create it, or pass another --ledger")
    _require_regular(path)
    if not create and not path.exists():
        raise _error(path, "no such ledger", "check --ledger; has anything been submitted yet?")
    lock_fd = _lock(path)
    try:
        header, latest = _load(path, mock=mock, base_url=base_url, warn=warn)
        return Ledger(
            path, header, latest, lock_fd=lock_fd, mock=mock, base_url=base_url, clock=clock
        )
    except BaseException:
        os.close(lock_fd)
        raise


def _load(
    path: Path, *, mock: bool, base_url: str, warn: Callable[[str], None]
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Read, check and repair (or create) the ledger; we hold its lock."""
    try:
        file = path.open("r+b")
    except FileNotFoundError:
        _rewrite(path, list(COLUMNS), (), None)
        return list(COLUMNS), {}
    except OSError as exc:
        raise _error(path, f"cannot open ({exc.strerror})", "check its permissions") from exc
    with file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            _rewrite(path, list(COLUMNS), (), None)
            return list(COLUMNS), {}
        scan = _Scan(file, path)
        latest: dict[str, dict[str, str]] = {}
        modes: set[str] = set()
        last_url = ""
        for row in scan.rows():
            latest[row["job_id"]] = row
            modes.add(row["mock"])
            last_url = row["base_url"] or last_url
        if mock and "0" in modes:
            what = "written by real runs; --mock must not add emulator rows to it"
            raise _error(path, what, "use another --ledger for --mock runs")
        if not mock and "1" in modes:
            what = "written by --mock runs; a mock task id must never make a real run skip a job"
            raise _error(path, what, "use another --ledger for real runs")
        if not mock and last_url and last_url.rstrip("/") != base_url.rstrip("/"):
            warn(
                f"{path}: the last row was written against {last_url}, this run uses {base_url}; "
                "task ids of one API are unknown to the other"
            )
        if scan.torn:
            file.seek(scan.end)
            cut = file.read()
            kept = path.with_name(path.name + ".torn")
            try:
                with kept.open("ab") as aside:  # kept, in case the cut text held a paid task id
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
        if missing := [name for name in COLUMNS if name not in scan.header]:
            header = list(COLUMNS) + [name for name in scan.header if name not in COLUMNS]
            file.seek(0)
            _rewrite(
                path, header, _Scan(file, path).rows(), os.fstat(file.fileno()).st_mode & 0o7777
            )
            warn(f"{path}: added the columns {', '.join(missing)} (ledger of an older version)")
            return header, latest
        if scan.torn:
            try:
                file.truncate(scan.end)
                os.fsync(file.fileno())
            except OSError as exc:
                what = f"cannot remove the cut last row ({exc.strerror})"
                raise _error(path, what, "check permissions and free space") from exc
        return scan.header, latest
