"""Download completed videos before their links expire, and never replace a file.

Where a video lands: ``<out>/<manifest file stem>/<job file>``. The job file comes from
the job id, made safe (no separators, no ``..``, no control characters) and suffixed
with a hash of the raw id whenever making it safe changed it, so two jobs can never
share a file; a later take (a regeneration) adds ``.take<N>``. The manifest folder keeps
two manifests that share a job id (and an ``--out``) apart.

No file is ever replaced. Each video is streamed to a hidden temporary file beside its
target, checked against Content-Length, hashed (SHA-256), fsynced, recorded as
``downloaded`` (file, bytes, ``file_sha256``), and only then linked into place, which
fails if anything is there: a crash, a disconnect or a full disk never leaves a partial
file under the final name, and a crash after the row leaves a row whose file is missing,
which the next run fetches again. A target that exists but that the ledger does not
record as this job's (another manifest's video, a user's file) is reported, and the job
stays ``completed``. A file recorded as downloaded that is gone is fetched again; one
that changed (its size, or with ``verify`` its hash) is kept under a new name beside it
(``<name>.changed-<UTC time>.mp4``, said in the row) and the video is fetched again.

Before a link past its ``expires_at`` is given up, the task is asked again (it may hand
out a fresh link; the docs do not say whether APIMart does): a fresh link is recorded
and downloaded. Only when there is none is the job ``expired`` (``run --retry-failed``
buys it again). Without a key, or for a task of another API, the refresh is skipped and
the job stays ``completed``, saying so.

Whatever goes wrong for one job, even in a way nobody foresaw, leaves it ``completed``
for a later ``download``; only a ledger that cannot be written stops the stage. At the
deadline (``run --wait --deadline``) downloads in flight are cut, their partial files
removed, and none starts after it: the deadline bounds the whole command.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, cast
from urllib.parse import urlsplit, urlunsplit

from runner.api import RetryPolicy, TaskState
from runner.engine.poll import state_cells
from runner.engine.schedule import Clock, Limiter, Sleep, Stopped, cut_at, describe, retrying
from runner.errors import ApiError, LedgerError, RejectedError
from runner.ledger import Recorder
from runner.models import parse_iso

if TYPE_CHECKING:
    from runner.api import Client  # aiohttp: only the commands that use the network load it

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".m4v"})
_TAKE = re.compile(r"\.take[0-9]+$")


def file_name(job_id: str, url: str, take: int = 1) -> str:
    """A file name for one take of the job's video: safe, unique per job id and take."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    ext = suffix if suffix in _EXTENSIONS else ".mp4"
    safe = _safe(job_id)
    return safe + (f".take{take}" if take > 1 else "") + ext


def _safe(name: str) -> str:
    """``name`` as one path component, unique: a hash is added whenever it had to change."""
    safe = _UNSAFE.sub("_", name).strip("._")[:80] or "job"
    # Also for capitals ('Fox' and 'fox' are one file on case-insensitive file systems),
    # and for an id that looks like a later take of another ('hero.take2').
    if safe != name or safe != safe.lower() or _TAKE.search(safe):
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def video_path(out: Path, job_id: str, row: Mapping[str, str], url: str) -> Path:
    """Where the job's video goes: ``<out>/<manifest file stem>/<job file>``.

    A row of a ledger without a ``manifest`` column (an old version) goes to ``<out>``.
    """
    take = row.get("take", "")
    folder = video_folder(out, row.get("manifest", ""))
    return folder / file_name(job_id, url, int(take) if take.isdigit() else 1)


def video_folder(out: Path, manifest: str) -> Path:
    """The folder of one manifest's videos: ``<out>/<manifest file stem>`` (made safe as a
    job file is); ``out`` itself for a row without a manifest (an old ledger)."""
    return out / _safe(PurePosixPath(manifest.replace("\\", "/")).stem) if manifest else out


def expires_ts(row: Mapping[str, str]) -> float | None:
    """The row's ``expires_at`` as a unix time, or None."""
    return parse_iso(row.get("expires_at", ""))


def needs_download(row: Mapping[str, str], *, verify: bool = False) -> bool:
    """Completed with a link, or downloaded but the file is gone or changed.

    A changed file is one whose size differs from the record, or with ``verify`` whose
    SHA-256 does (reading every file: what ``download`` does, not every ``run``).
    """
    if row.get("status") == "completed":
        return bool(row.get("video_url"))
    if row.get("status") == "downloaded":
        return file_problem(row, verify=verify) is not None
    return False


def file_problem(row: Mapping[str, str], *, verify: bool = False) -> str | None:
    """Why a ``downloaded`` row's file is not the video it records ('missing', ...), or None."""
    path = Path(row.get("file", ""))
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if not path.is_file() or str(size) != row.get("bytes"):
        return f"changed (now {size} bytes, recorded {row.get('bytes') or '?'})"
    recorded = row.get("file_sha256", "")
    if verify and recorded:
        try:
            with path.open("rb") as file:
                digest = hashlib.file_digest(file, "sha256")
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if digest.hexdigest() != recorded:
            return "changed (its SHA-256 differs from the one recorded at download)"
    return None


#: What a job counts as when the deadline passed before its video was on disk.
NOT_BY_DEADLINE = "not downloaded by the deadline"
#: What a job counts as when its target holds a file that is not its video.
CONFLICT = "file conflicts"
#: How a task's state is asked for again when its link has expired (a Poller-like GET).
Refresh = Callable[[str], Awaitable[TaskState]]


@dataclass
class Downloader:
    """Downloads videos of completed jobs into ``out``; share one instance between workers.

    ``deadline`` (a ``clock`` time) cuts downloads in flight and starts none after it.
    ``on_error`` is told (job id, exception) of each download that failed in a way nobody
    foresaw; the job stays ``completed``, with the error in its row. ``refresh`` asks the
    API for a task's state (None: no key, so no fresh link can be asked for);
    ``base_url`` is what this command's rows record: only such tasks are asked.
    ``verify`` re-reads downloaded files to compare their SHA-256 with the record.
    """

    client: Client
    ledger: Recorder
    out: Path
    limiter: Limiter
    policy: RetryPolicy
    #: Once set, no download starts (one waiting for its slot ends with no row).
    stop: asyncio.Event
    wall_clock: Clock = time.time
    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    counts: Counter[str] = field(default_factory=Counter)
    #: A --mock ledger's links name the emulator of the process that polled them, whose
    #: port is gone: they are fetched from this origin (the emulator of this process).
    origin: str | None = None
    deadline: float | None = None
    on_error: Callable[[str, Exception], None] | None = None
    refresh: Refresh | None = None
    base_url: str | None = None
    verify: bool = False

    def needs_download(self, row: Mapping[str, str]) -> bool:
        """Completed with a link, or downloaded but the file is gone or changed."""
        return needs_download(row, verify=self.verify)

    async def __call__(self, job_id: str) -> None:
        """Download one job's video and record ``downloaded`` (or why not).

        Never raises for the job's own sake; a ``LedgerError`` does (the record is broken).
        """
        if self.deadline is not None and self.clock() >= self.deadline:
            self.counts[NOT_BY_DEADLINE] += 1
            return
        try:
            await self._download(job_id)
        except LedgerError:
            raise
        except Exception as exc:  # noqa: BLE001 - one job's surprise must not stop the others
            self._fail(job_id, f"the download failed unexpectedly ({describe(exc)}); it stays "
                       "completed for a later 'apimart-batch download'", "download errors")
            if self.on_error is not None:
                self.on_error(job_id, exc)

    async def _download(self, job_id: str) -> None:
        row = self.ledger.latest[job_id]
        problem = None
        if row.get("status") == "downloaded":
            problem = file_problem(row, verify=self.verify)
            if problem is None:
                return
            self.counts["missing files" if problem == "missing" else "changed files"] += 1
        expires = expires_ts(row)
        if expires is not None and expires <= self.wall_clock():
            fresh = await self._fresh_link(job_id, row)
            if fresh is None:
                return
            row = fresh
        url = row.get("video_url", "")
        target = video_path(self.out, job_id, row, url)
        if self.origin is not None:
            url = _rebase(url, self.origin)
        note = None
        if problem not in (None, "missing"):
            try:
                aside = _set_aside(Path(row.get("file", "")), target)
            except OSError as exc:
                self._fail(job_id, f"{row.get('file')}: {problem} since it was downloaded, and "
                           f"it cannot be moved aside ({exc.strerror or exc}); it was not "
                           "replaced", CONFLICT)
                return
            if aside is not None:
                note = f"the file had {problem} since it was downloaded: kept as {aside.name}"
        if _occupied(target):
            self._fail(job_id, f"{target} exists and is not this job's video (another "
                       "manifest's, or a file of yours); it was not replaced (move it away, "
                       "or pass another --out)", CONFLICT)
            return
        cut = cut_at(self.deadline, self.clock)
        try:
            async with cut:
                got = await retrying(partial(self._fetch, url, target), limiter=self.limiter,
                                     policy=self.policy, stop=self.stop, clock=self.clock,
                                     sleep=self.sleep, deadline=self.deadline)
        except Stopped:
            return  # never started: the job stays completed for the next run
        except TimeoutError:
            if not cut.expired():
                raise
            self.counts[NOT_BY_DEADLINE] += 1  # cut: the job stays completed, no file
        except ApiError as exc:
            self._fail(job_id, exc.message, "download errors")
        except (OSError, _DiskError) as exc:
            error = exc.error if isinstance(exc, _DiskError) else exc
            self._fail(job_id, f"{target}: cannot write the video: "
                       f"{error.strerror or error}", "download errors")
        else:
            self._place(job_id, target, got, note)

    def _place(self, job_id: str, target: Path, got: tuple[Path, int, str],
               note: str | None) -> None:
        """Record the video, then link it into place, never over an existing file."""
        tmp, size, digest = got
        try:
            # Recorded first: a crash before the link leaves a row whose file is missing,
            # which the next run fetches again; the other order would leave a file that
            # the ledger does not know, which no run may ever replace.
            self.ledger.append(job_id, status="downloaded", file=str(target.absolute()),
                               bytes=size, file_sha256=digest, error=note)
            try:
                _link(tmp, target)
            except FileExistsError:
                self._fail(job_id, f"{target} appeared while the video was downloading and "
                           "is not this job's; it was not replaced (move it away, or pass "
                           "another --out)", CONFLICT)
                return
            except OSError as exc:
                self._fail(job_id, f"{target}: cannot write the video: {exc.strerror}",
                           "download errors")
                return
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _fsync_dir(target.parent)
        self.counts["downloaded"] += 1

    async def _fresh_link(self, job_id: str, row: Mapping[str, str]) -> Mapping[str, str] | None:
        """The row with a fresh link from the task query; None once the job is recorded so."""
        when = row.get("expires_at")
        task = row.get("task_id", "")
        target = row.get("base_url", "").rstrip("/")
        if self.refresh is None or (target and target != (self.base_url or "").rstrip("/")):
            why = "no API key" if self.refresh is None else f"the task belongs to {target}"
            self._fail(job_id, f"the video link expired at {when}; asking the task for a fresh "
                       f"link was skipped ({why}); run 'apimart-batch download' with the key "
                       "(and --base-url) of the API that created it", "expired")
            return None
        try:
            state = await retrying(partial(self.refresh, task), limiter=self.limiter,
                                   policy=self.policy, stop=self.stop, clock=self.clock,
                                   sleep=self.sleep, deadline=self.deadline)
        except Stopped:
            return None
        except RejectedError:
            state = None  # the API no longer knows the task: no link will come
        except ApiError as exc:
            self._fail(job_id, f"the video link expired at {when}; asking the task for a fresh "
                       f"link failed ({exc.message}); a later run asks again", "expired")
            return None
        fresh = state is not None and state.status == "completed" and bool(state.video_urls)
        if state is not None and fresh and (state.expires_at is None
                                            or state.expires_at > self.wall_clock()):
            self.ledger.append(job_id, **state_cells(state))
            self.counts["fresh links"] += 1
            return self.ledger.latest[job_id]
        self.ledger.append(job_id, status="expired", error=(
            f"the video link expired at {when} and the task query gives no fresh one; the "
            "video is lost (regenerate it: 'apimart-batch run MANIFEST --retry-failed')"))
        self.counts["expired"] += 1
        return None

    def _fail(self, job_id: str, message: str, count_as: str) -> None:
        # The job stays 'completed' so the next run tries again while the link lives;
        # the same failure again adds no row, so a rerun stays a no-op.
        row = self.ledger.latest.get(job_id, {})
        if row.get("status") != "completed" or row.get("error") != message:
            self.ledger.append(job_id, status="completed", error=message)
        self.counts[count_as] += 1

    async def _fetch(self, url: str, target: Path) -> tuple[Path, int, str]:
        """Stream ``url`` to a hidden file beside ``target``: (that file, bytes, SHA-256)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                disk = _Disk(out)
                size = await self.client.download(url, cast("IO[bytes]", disk))
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp, size, disk.digest.hexdigest()


def _link(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``; FileExistsError if anything is there (never replaced)."""
    try:
        os.link(tmp, target)  # atomic, and fails on an existing target: no check-then-act
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: the check leaves a window, but only there.
        if _occupied(target):
            raise FileExistsError(target) from None
        tmp.replace(target)


def _set_aside(recorded: Path, target: Path) -> Path | None:
    """Move a changed file at ``target`` to a free name beside it (``x.changed-<UTC>.mp4``).

    The paid video then comes back under its own name and nothing is lost. None when the
    changed file is not at ``target`` (an older layout): nothing is in the way.
    """
    if recorded.absolute() != target.absolute():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 1000):
        aside = recorded.with_name(f"{recorded.stem}.changed-{stamp}"
                                   f"{f'-{n}' if n > 1 else ''}{recorded.suffix}")
        if not _occupied(aside):
            recorded.rename(aside)
            return aside
    raise FileExistsError(errno.EEXIST, "no free name beside it", str(recorded))


def _occupied(path: Path) -> bool:
    """Something is at ``path``: a file, a folder, or a link (even a dangling one)."""
    return path.is_symlink() or path.exists()


def _rebase(url: str, origin: str) -> str:
    """``url`` with the scheme and host of ``origin``."""
    base = urlsplit(origin)
    return urlunsplit(urlsplit(url)._replace(scheme=base.scheme, netloc=base.netloc))


class _DiskError(Exception):
    """Writing a video to disk failed: a local fault, never retried like a network one."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Disk:
    """The temporary file as the client sees it: a failed write raises ``_DiskError``.

    The client reads every ``OSError`` during a download as a broken connection, which
    would retry a full disk as if the network had failed.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        try:
            return self._file.write(data)
        except OSError as exc:
            raise _DiskError(exc) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
