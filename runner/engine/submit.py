"""Submit one job: upload its images (``uploads``), POST it under the retry policy, record it.

Job-level failures are data: every outcome ends as a ledger row (``submitted``,
``rejected``, ``error`` or ``unknown``) and never raises. Only a fatal answer
(auth, permission, balance) stops the batch, by setting ``stop`` and keeping the
error for the caller; a model the API does not serve stops only that model's jobs.
The ``submitting`` row is flushed *before* the POST, so a crash at any point leaves
a trace that the next run turns into ``unknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.api import Client, RetryPolicy
from runner.engine.resume import AMBIGUOUS
from runner.engine.schedule import Clock, Limiter, Sleep, Stopped, sleep_unless
from runner.engine.uploads import Uploads
from runner.errors import (
    AmbiguousError,
    ApiError,
    FatalApiError,
    LedgerError,
    ModelUnavailableError,
    RejectedError,
    RetryableError,
)
from runner.ledger import Recorder
from runner.models import Job, canonical_json


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def job_fields(job: Job, *, request: bool = True) -> dict[str, object]:
    """The ledger cells that describe a job's request (without ``request`` when False:
    the caller fills that cell from the body it sends).

    ``duration``, ``resolution`` and ``aspect_ratio`` hold what the API renders (the API's
    default where the manifest left a field out): what the price was estimated on.
    ``image_file``/``image_sha256`` list the local images one per line, and ``image_url``
    their uploaded URLs once known (else the first image the manifest gave by URL).
    ``metadata`` holds the job's tags as canonical JSON (sorted keys), empty without tags.
    """
    return {
        "idempotency_key": job.idempotency_key,
        "fingerprint": job.fingerprint,
        "model": job.model,
        "duration": job.resolved("duration"),
        "resolution": job.resolved("resolution"),
        "aspect_ratio": job.resolved("aspect_ratio"),
        "image_url": None if job.uploads else job.image_url,
        "image_file": "\n".join(u.file for u in job.uploads) or None,
        "image_sha256": "\n".join(u.sha256 for u in job.uploads) or None,
        "prompt": job.prompt,
        "manifest": job.manifest,
        "request": canonical_json(job.body()) if request and not job.uploads else None,
        "take": job.take,
        "metadata": canonical_json(dict(job.metadata)) if job.metadata else None,
    }


#: The cells of a task's outcome: a new submission (a new take) starts with them empty.
TASK_CELLS = dict.fromkeys(("progress", "video_url", "expires_at", "thumbnail_url", "cost",
                            "file", "bytes", "file_sha256"))


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
    #: Jobs a fatal answer (auth, permission, balance) refused.
    refused: int = 0
    ledger_errors: list[LedgerError] = field(default_factory=list)
    #: Models the API said it does not serve, with its words: their jobs are not sent.
    unavailable: dict[str, str] = field(default_factory=dict)
    uploads: Uploads = field(init=False)

    def __post_init__(self) -> None:
        self.uploads = Uploads(self.client, self.limiter, self.policy, self.stop,
                               clock=self.clock, sleep=self.sleep)
        self.uploads.reuse(self.ledger.latest.values(), now=self.wall_clock())

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
        except Exception as exc:  # noqa: BLE001 - one job's unforeseen failure is data
            try:
                self._crashed(job, exc)
            except LedgerError as error:
                self.ledger_errors.append(error)
                self.stop.set()
            return True

    def _crashed(self, job: Job, exc: Exception) -> None:
        """Record a job whose submission failed in a way nobody foresaw; the others go on.

        A ``submitting`` row means the POST may have left: the job becomes ``unknown``
        (never resent blindly). Before that row, nothing was sent: ``error``.
        """
        what = f"internal error ({type(exc).__name__}: {_first_line(exc)})"
        status = self.ledger.latest.get(job.job_id, {}).get("status")
        if status == "submitting":  # written by this run: earlier runs' were made 'unknown'
            self._record(job, "unknown", 0, error=f"{what}; the task may exist")
        elif status in AMBIGUOUS:
            return  # an earlier run's 'unknown' stays as it is
        else:
            self._record(job, "error", 0, error=f"not sent: {what}", cells=job_fields(job))

    async def _submit(self, job: Job) -> bool:
        refusal = self.unavailable.get(job.model)
        if refusal is not None:
            # Nothing is created for a model the API does not serve: 'error' lets a later
            # run try again, and this run spends no request on it.
            self._record(job, "error", 0, error=f"not sent: {refusal}", cells=job_fields(job))
            return True
        try:
            body, cells = await self._prepare(job)
        except Stopped:
            return False
        except ApiError as exc:
            # Nothing was submitted: 'error' (the next run uploads and submits again).
            self._record(job, "error", 0, error=f"image upload: {exc.message}",
                         cells=job_fields(job))
            if isinstance(exc, FatalApiError):
                self.refused += 1
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
                            # ``cells`` holds the request sent: not encoded twice.
                            **(TASK_CELLS | job_fields(job, request=False) | cells),
                        )
                    done = await self.client.submit(job, body)
            except Stopped:
                if pending is None:
                    return False
                self._fail(job, "error", attempt - 1, pending, maybe_created)
            except RetryableError as exc:
                if exc.status == 429:
                    self.limiter.throttled(self._wait(attempt, exc, started))
                if self._may_retry(attempt, started):
                    pending = exc
                    if exc.status != 429:
                        await self._pause(self._wait(attempt, exc, started))
                    continue
                self._fail(job, "error", attempt, exc, maybe_created)
            except AmbiguousError as exc:
                maybe_created = exc
                if self.retry_ambiguous and self._may_retry(attempt, started):
                    pending = exc
                    await self._pause(self._wait(attempt, exc, started))
                    continue
                self._fail(job, "unknown", attempt, exc, maybe_created)
            except ModelUnavailableError as exc:
                # Refused before processing: nothing was created, so 'error', not 'rejected'.
                self.unavailable.setdefault(job.model, exc.message)
                self._fail(job, "error", attempt, exc, maybe_created)
            except RejectedError as exc:
                self._fail(job, "rejected", attempt, exc, maybe_created)
            except FatalApiError as exc:
                self._fail(job, "error", attempt, exc, maybe_created)
                self.refused += 1
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

    def _wait(self, attempt: int, exc: ApiError, started: float) -> float:
        """The backoff before the next try: never past what is left of the policy's time."""
        return self.policy.wait(attempt, exc.retry_after, elapsed=self.clock() - started)

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

    async def _prepare(self, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body to send (local images uploaded) and the ledger cells it adds."""
        return await self.uploads.prepare(job, self.ledger.latest.get(job.job_id, {}))
