"""Download completed videos before their links expire.

Each file is streamed to a hidden temporary file in the output folder, checked
against Content-Length, fsynced and moved into place with ``os.replace``: a crash,
a disconnect or a full disk never leaves a partial file under the final name.
Names come from the job id, made safe (no separators, no ``..``, no control
characters) and suffixed with a hash of the raw id whenever making it safe changed
it, so two jobs can never share a file.

Whatever goes wrong for one job, even in a way nobody foresaw, leaves it ``completed``
for a later ``download``; only a ledger that cannot be written stops the stage. At the
deadline (``run --wait --deadline``) downloads in flight are cut, their partial files
removed, and none starts after it: the deadline bounds the whole command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, cast
from urllib.parse import urlsplit, urlunsplit

from runner.api import Client, RetryPolicy
from runner.engine.schedule import Clock, Limiter, Sleep, Stopped, cut_at, describe, retrying
from runner.errors import ApiError, LedgerError
from runner.ledger import Recorder
from runner.models import parse_iso

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".m4v"})


def file_name(job_id: str, url: str) -> str:
    """A file name for the job's video: safe, unique per job id, with the URL's extension."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    ext = suffix if suffix in _EXTENSIONS else ".mp4"
    safe = _UNSAFE.sub("_", job_id).strip("._")[:80] or "job"
    # Also for capitals: 'Fox' and 'fox' are one file on case-insensitive file systems.
    if safe != job_id or safe != safe.lower():
        safe += "-" + hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return safe + ext


def expires_ts(row: Mapping[str, str]) -> float | None:
    """The row's ``expires_at`` as a unix time, or None."""
    return parse_iso(row.get("expires_at", ""))


def needs_download(row: Mapping[str, str]) -> bool:
    """Completed with a link, or downloaded but the file is gone or damaged."""
    if row.get("status") == "completed":
        return bool(row.get("video_url"))
    if row.get("status") == "downloaded":
        path = Path(row.get("file", ""))
        return not (path.is_file() and str(path.stat().st_size) == row.get("bytes"))
    return False


#: What a job counts as when the deadline passed before its video was on disk.
NOT_BY_DEADLINE = "not downloaded by the deadline"


@dataclass
class Downloader:
    """Downloads videos of completed jobs into ``out``; share one instance between workers.

    ``deadline`` (a ``clock`` time) cuts downloads in flight and starts none after it.
    ``on_error`` is told (job id, exception) of each download that failed in a way nobody
    foresaw; the job stays ``completed``, with the error in its row.
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

    def needs_download(self, row: Mapping[str, str]) -> bool:
        """Completed with a link, or downloaded but the file is gone or damaged."""
        return needs_download(row)

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
        url = row.get("video_url", "")
        if self.origin is not None:
            url = _rebase(url, self.origin)
        expires = expires_ts(row)
        if expires is not None and expires <= self.wall_clock():
            self._fail(job_id, f"the video link expired at {row.get('expires_at')}; it can no "
                       "longer be downloaded (generate the job again under a new id)", "expired")
            return
        name = file_name(job_id, url)
        target = self.out / name
        cut = cut_at(self.deadline, self.clock)
        try:
            async with cut:
                size = await retrying(partial(self._fetch, url, target), limiter=self.limiter,
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
            # Absolute, so a rerun from another folder still finds the file intact.
            self.ledger.append(job_id, status="downloaded", file=str(target.absolute()),
                               bytes=size, error=None)
            self.counts["downloaded"] += 1

    def _fail(self, job_id: str, message: str, count_as: str) -> None:
        # The job stays 'completed' so the next run tries again while the link lives;
        # the same failure again (an expired link) adds no row, so a rerun stays a no-op.
        row = self.ledger.latest.get(job_id, {})
        if row.get("status") != "completed" or row.get("error") != message:
            self.ledger.append(job_id, status="completed", error=message)
        self.counts[count_as] += 1

    async def _fetch(self, url: str, target: Path) -> int:
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                size = await self.client.download(url, cast("IO[bytes]", _Disk(out)))
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)
        return size


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

    def write(self, data: bytes) -> int:
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
