"""Submit one job: upload its local image if needed, POST it under the retry policy, record it.

Job-level failures are data: every outcome ends as a ledger row (``submitted``,
``rejected``, ``error`` or ``unknown``) and never raises. Only a fatal answer
(auth, permission, balance) stops the batch, by setting ``stop`` and keeping the
error for the caller. The ``submitting`` row is flushed *before* the POST, so a
crash at any point leaves a trace that the next run turns into ``unknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from runner.api import Client, Uploaded
from runner.errors import (
    AmbiguousError,
    ApiError,
    FatalApiError,
    LedgerError,
    RejectedError,
    RetryableError,
)
from runner.ledger import Recorder
from runner.models import Job, iso_utc, parse_iso
from runner.resume import AMBIGUOUS
from runner.retry import RetryPolicy
from runner.schedule import Clock, Limiter, Sleep, Stopped, retrying, sleep_unless

#: Uploaded image URLs live 72 h (apimart-api.md §5); reuse one only while it has
#: this much life left, so the API can still fetch it while the task runs.
UPLOAD_LIFETIME = 72 * 3600.0
UPLOAD_REUSE_MARGIN = 12 * 3600.0


def job_fields(job: Job) -> dict[str, object]:
    """The ledger cells that describe a job's request."""
    return {
        "idempotency_key": job.idempotency_key,
        "fingerprint": job.fingerprint,
        "model": job.model,
        "duration": job.duration,
        "resolution": job.resolution,
        "aspect_ratio": job.aspect_ratio,
        "image_url": job.image_url,
        "image_file": job.image_file,
        "image_sha256": job.image_sha256,
        "prompt": job.prompt,
        "manifest": job.manifest,
    }


@dataclass
class Submitter:
    """Submits jobs one call at a time; share one instance between all workers."""

    client: Client
    ledger: Recorder
    limiter: Limiter
    policy: RetryPolicy
    stop: asyncio.Event
    retry_ambiguous: bool = False
    clock: Clock = time.monotonic
    wall_clock: Clock = time.time
    sleep: Sleep = asyncio.sleep
    counts: Counter[str] = field(default_factory=Counter)
    fatal: FatalApiError | None = None
    ledger_errors: list[LedgerError] = field(default_factory=list)
    _uploads: dict[str, asyncio.Future[Uploaded]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reuse_uploads()

    async def __call__(self, job: Job) -> bool:
        """Submit ``job`` and append its outcome to the ledger.

        Returns False when the run was stopped before the job was sent (it has no new row).
        A ledger that fails stops the run but never the requests already in flight: their
        task ids must still reach the user, through ``ledger_errors``.
        """
        try:
            return await self._submit(job)
        except LedgerError as exc:
            self.ledger_errors.append(exc)
            self.stop.set()
            return True

    async def _submit(self, job: Job) -> bool:
        image_url = None
        if job.image_file:
            try:
                image_url = await self._upload(job)
            except Stopped:
                return False
            except ApiError as exc:
                # Nothing was submitted: 'error' (the next run uploads and submits again).
                self._record(job, "error", 0, error=f"image upload: {exc.message}",
                             cells=job_fields(job))
                if isinstance(exc, FatalApiError):
                    self._stop(exc)
                return True
        started = self.clock()
        attempt = 0
        # The last failure, recorded if the run stops before the next try.
        pending: ApiError | None = None
        # Once any try was ambiguous the task may exist: whatever comes later, the job can
        # only end 'submitted' or 'unknown', never 'error' (which the next run resends).
        maybe_created: AmbiguousError | None = None
        if self.ledger.latest.get(job.job_id, {}).get("status") in AMBIGUOUS:
            # --resubmit-unknown: an earlier run's try may already have created it.
            maybe_created = AmbiguousError("an earlier run's try may have created the task")
        while True:
            attempt += 1
            try:
                async with self.limiter.slot(self.stop):
                    if pending is None:
                        self.ledger.append(
                            job.job_id, status="submitting", task_id=None, attempts=0,
                            http_status=None, error=None,
                            **(job_fields(job) | self._image_cells(job, image_url)),
                        )
                    done = await self.client.submit(job, image_url)
            except Stopped:
                if pending is None:
                    return False
                self._fail(job, "error", attempt - 1, pending, maybe_created)
            except RetryableError as exc:
                if exc.status == 429:
                    self.limiter.throttled(self.policy.wait(attempt, exc.retry_after))
                if self._may_retry(attempt, started):
                    pending = exc
                    if exc.status != 429:
                        await self._pause(self.policy.wait(attempt, exc.retry_after))
                    continue
                self._fail(job, "error", attempt, exc, maybe_created)
            except AmbiguousError as exc:
                maybe_created = exc
                if self.retry_ambiguous and self._may_retry(attempt, started):
                    pending = exc
                    await self._pause(self.policy.wait(attempt, exc.retry_after))
                    continue
                self._fail(job, "unknown", attempt, exc, maybe_created)
            except RejectedError as exc:
                self._fail(job, "rejected", attempt, exc, maybe_created)
            except FatalApiError as exc:
                self._fail(job, "error", attempt, exc, maybe_created)
                self._stop(exc)
            else:
                await self.limiter.succeeded()
                note = "replayed by the API for the same Idempotency-Key" if done.replayed else None
                try:
                    self.ledger.append(
                        job.job_id, status="submitted", task_id=done.task_id, attempts=attempt,
                        http_status=done.http_status, error=note,
                    )
                except LedgerError as exc:
                    # The task exists and is paid for: its id must reach the user somehow.
                    msg = (f"{exc}\n  job '{job.job_id}' WAS created as task {done.task_id}; "
                           "the ledger could not record it, so note it before rerunning")
                    raise LedgerError(msg) from exc
                self.counts["submitted"] += 1
            return True

    async def _pause(self, seconds: float) -> None:
        """Back off before a retry; a stop ends the pause early (the next slot says Stopped)."""
        with contextlib.suppress(Stopped):
            await sleep_unless(self.stop, seconds, self.sleep)

    def _may_retry(self, attempt: int, started: float) -> bool:
        within_time = self.clock() - started < self.policy.timeout
        return attempt < self.policy.attempts and within_time and not self.stop.is_set()

    def _fail(self, job: Job, status: str, attempts: int, exc: ApiError,
              maybe_created: AmbiguousError | None) -> None:
        """Record a failed submission; 'unknown' if any earlier try may have created it."""
        if maybe_created is None:
            self._record(job, status, attempts, exc)
        elif maybe_created is exc:
            self._record(job, "unknown", attempts, exc)
        else:
            note = (f"{exc.message} (after an earlier try that may have created the task: "
                    f"{maybe_created.message})")
            self._record(job, "unknown", attempts, exc, error=note)

    def _record(self, job: Job, status: str, attempts: int, exc: ApiError | None = None,
                error: str | None = None, cells: Mapping[str, object] | None = None) -> None:
        self.ledger.append(
            job.job_id, status=status, attempts=attempts,
            http_status=exc.status if exc else None,
            error=error or (exc.message if exc else None), **(cells or {}),
        )
        self.counts[status] += 1

    def _stop(self, exc: FatalApiError) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.stop.set()

    def _image_cells(self, job: Job, image_url: str | None) -> dict[str, Any]:
        if not job.image_file or not image_url:
            return {}
        cells: dict[str, Any] = {"image_url": image_url}
        upload = self._uploads.get(job.image_sha256 or "")
        done = upload is not None and upload.done() and upload.exception() is None
        if done and upload is not None and upload.result().url == image_url:
            cells["uploaded_at"] = iso_utc(upload.result().created_at)
        return cells

    def _reuse_uploads(self) -> None:
        """Seed the upload cache with earlier runs' uploads that still have life left."""
        now = self.wall_clock()
        for row in self.ledger.latest.values():
            sha, url, when = row.get("image_sha256"), row.get("image_url"), row.get("uploaded_at")
            if not (sha and url and when) or sha in self._uploads:
                continue
            created = parse_iso(when)
            if created is not None and now < created + UPLOAD_LIFETIME - UPLOAD_REUSE_MARGIN:
                future: asyncio.Future[Uploaded] = asyncio.get_running_loop().create_future()
                future.set_result(Uploaded(url=url, created_at=created))
                self._uploads[sha] = future

    async def _upload(self, job: Job) -> str:
        """Upload the job's image once per content per run; concurrent jobs share one upload."""
        sha = job.image_sha256 or ""
        row = self.ledger.latest.get(job.job_id, {})
        # Resending an ambiguous job: the body must match the first one byte for byte,
        # or a server that honours Idempotency-Key answers 422 instead of replaying.
        ambiguous = row.get("status") in AMBIGUOUS
        if ambiguous and row.get("image_sha256") == sha and row.get("image_url"):
            return row["image_url"]
        pending = self._uploads.get(sha)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._uploads[sha] = pending
            try:
                pending.set_result(await self._upload_now(job))
            except (ApiError, Stopped) as exc:
                pending.set_exception(exc)
                # The waiting jobs see it through the future; mark it retrieved for asyncio.
                pending.exception()
        return (await pending).url

    async def _upload_now(self, job: Job) -> Uploaded:
        path = job.image_file or ""
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as exc:
            msg = f"{path}: cannot read the image: {exc.strerror}"
            raise RejectedError(msg) from exc
        if hashlib.sha256(data).hexdigest() != job.image_sha256:
            msg = f"{path}: the image changed since the manifest was validated; rerun"
            raise RejectedError(msg)
        # Only "not sent" failures are retried: uploads carry no idempotency key.
        return await retrying(
            partial(self.client.upload_image, data, Path(path).name), limiter=self.limiter,
            policy=self.policy, stop=self.stop, clock=self.clock, sleep=self.sleep,
        )
