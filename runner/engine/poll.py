"""Poll tasks to a terminal state, appending a ledger row whenever one changes.

Polling is idempotent, so every transient failure (network, 429, 5xx) is retried
with backoff and never turns a task into ``failed``. A task id the API says it does
not know (HTTP 400 "Invalid task ID") is recorded as ``not_found`` once and not polled
again; any other 4xx stops polling like an auth failure and records nothing (the API
target is wrong, not the task). An error nobody foresaw (a bug, an answer that breaks
the parser) leaves the task pollable: it is polled again later, like after a transient
error, and after ``policy.attempts`` such errors in a row it is left for a later
``status``. Only a fatal answer or a ledger that cannot be written stops the poller.
At the deadline, polls in flight are cut (a GET is safe to abandon) and their tasks
stay recorded as they were.
Tasks wait in one heap ordered by their next poll time: memory is one small
entry per running task, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from runner.api import RetryPolicy, TaskState
from runner.engine.schedule import Clock, Limiter, Sleep, Stopped, cut_at, retrying
from runner.errors import FatalApiError, LedgerError, RejectedError, RetryableError
from runner.ledger import Recorder
from runner.models import iso_utc

if TYPE_CHECKING:
    from runner.api import Client  # aiohttp: only the commands that use the network load it

#: Last statuses that have a task to poll.
POLLABLE_STATES = frozenset({"submitted", "pending", "processing"})
#: Last statuses of a task that ended without a video (APIMart refunds failed tasks).
NO_VIDEO_STATES = frozenset({"failed", "cancelled", "not_found"})
#: How a 400 says the task id itself is unknown (documented: "Invalid task ID").
_UNKNOWN_TASK = re.compile(r"\b(invalid|unknown)[ _-]?task[ _-]?id\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PollTiming:
    """When to poll: ``first`` s after submission, then growing by ``growth`` up to ``interval``.

    With the defaults a task is polled 10, 25, 47.5 and 77.5 s after submission, then every
    30 s: a task seen completing waits at most the pause in force (on average half of it,
    about 15 s for tasks of a minute or more), for about one request per 30 s of its run.
    A task resumed by ``status --wait`` is polled at once, then ``first`` s later.
    """

    first: float = 10.0
    interval: float = 30.0
    growth: float = 1.5
    deadline: float | None = None


def state_cells(state: TaskState) -> dict[str, object]:
    """The ledger cells a task state fills."""
    return {
        "status": state.status,
        "progress": state.progress,
        "video_url": state.video_urls[0] if state.video_urls else None,
        "expires_at": iso_utc(state.expires_at) if state.expires_at else None,
        "thumbnail_url": state.thumbnail_url,
        "cost": state.cost,
        "error": state.error,
    }


@dataclass
class Poller:
    """Polls every task it is given until each is terminal, the deadline passes, or ``stop``.

    ``on_completed`` is called with the job id of each task that reaches ``completed``
    (the download stage hooks in there); ``on_polled`` after every poll (progress display);
    ``on_error`` with the job id and the exception when a task's poll fails in a way
    nobody foresaw, the first time in a row (the task stays pollable; every such failure
    counts as a poll error). None of the three may raise.
    """

    client: Client
    ledger: Recorder
    limiter: Limiter
    policy: RetryPolicy
    stop: asyncio.Event
    timing: PollTiming = field(default_factory=PollTiming)
    on_completed: Callable[[str], None] | None = None
    on_polled: Callable[[], None] | None = None
    on_error: Callable[[str, Exception], None] | None = None
    repeat: bool = True
    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    counts: Counter[str] = field(default_factory=Counter)
    fatal: FatalApiError | None = None
    _heap: list[tuple[float, int, str, str, float]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _busy: int = 0
    #: Unforeseen errors in a row, per job; a job that reaches ``policy.attempts`` is let be.
    _errors: Counter[str] = field(default_factory=Counter)
    _let_be: set[str] = field(default_factory=set)

    def add(self, job_id: str, task_id: str, *, delay: float | None = None) -> None:
        """Schedule a task's first poll (default: ``timing.first`` from now)."""
        wait = self.timing.first if delay is None else delay
        heapq.heappush(self._heap, (self.clock() + wait, next(self._seq), job_id, task_id, wait))
        self._wake.set()

    def close(self) -> None:
        """No more tasks will be added; workers return once the heap drains."""
        self._closed = True
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Tasks not yet terminal (those let be after repeated unforeseen errors included)."""
        return len(self._heap) + self._busy + len(self._let_be)

    async def work(self) -> None:
        """One polling worker; run several concurrently."""
        while (item := await self._next()) is not None:
            _, _, job_id, task_id, gap = item
            self._busy += 1
            try:
                state = await self._poll_once(job_id, task_id)
            finally:
                self._busy -= 1
            # not_found is final too: the API will never know the task again.
            ended = state is not None and (state.terminal or state.status == "not_found")
            lost = state is None and (self.fatal is not None or self.stop.is_set())
            if self.repeat and not ended and not lost and job_id not in self._let_be:
                # A task resumed with no delay still waits ``first`` before its second poll.
                grown = max(gap * self.timing.growth, self.timing.first, 0.001)
                self.add(job_id, task_id, delay=min(self.timing.interval, grown))
            if self.on_polled is not None:
                self.on_polled()
            self._wake.set()

    async def _next(self) -> tuple[float, int, str, str, float] | None:
        while not self.stop.is_set():
            deadline = self.timing.deadline
            if deadline is not None and self.clock() >= deadline:
                return None
            timeout: float | None = None
            if self._heap:
                timeout = self._heap[0][0] - self.clock()
                if timeout <= 0:
                    return heapq.heappop(self._heap)
            elif self._closed and not self._busy:
                return None
            if deadline is not None:
                timeout = min(timeout if timeout is not None else deadline, deadline - self.clock())
            self._wake.clear()
            await self._nap(timeout)
        return None

    async def _nap(self, seconds: float | None) -> None:
        """Wait for a new task, a finished poll, ``stop`` or ``seconds``, whichever comes first."""
        waits: list[asyncio.Future[object]] = [
            asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.stop.wait())
        ]
        if seconds is not None:
            waits.append(asyncio.ensure_future(self.sleep(max(seconds, 0.0))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _poll_once(self, job_id: str, task_id: str) -> TaskState | None:
        """``_poll``, cut at the deadline; an error nobody foresaw leaves the task pollable."""
        cut = cut_at(self.timing.deadline, self.clock)
        try:
            async with cut:
                state = await self._poll(job_id, task_id)
        except TimeoutError:
            if not cut.expired():
                raise
            return None  # the deadline: the task stays as recorded, still running
        except LedgerError:
            raise  # our own record is broken: that stops the run
        except Exception as exc:  # noqa: BLE001 - one task's surprise must not stop the others
            self.counts["poll errors"] += 1
            self._errors[job_id] += 1
            if self._errors[job_id] >= self.policy.attempts:
                self._let_be.add(job_id)  # a later 'status' tries again
            if self.on_error is not None and self._errors[job_id] == 1:
                self.on_error(job_id, exc)  # once per run of errors: the same one again is noise
            return None
        if state is not None:
            self._errors.pop(job_id, None)
        return state

    async def _poll(self, job_id: str, task_id: str) -> TaskState | None:
        """Poll once (with retries for transient errors); record a row if anything changed."""
        try:
            state = await retrying(
                partial(self.client.get_task, task_id), limiter=self.limiter,
                policy=self.policy, stop=self.stop, clock=self.clock, sleep=self.sleep,
                deadline=self.timing.deadline,
            )
        except Stopped:
            return None  # never sent: the run is ending
        except RetryableError:
            if not self.stop.is_set():
                self.counts["poll errors"] += 1
            return None  # try again at the next scheduled poll
        except RejectedError as exc:
            if exc.code == "invalid_task_id":
                # Nothing was sent: one damaged id must not end the run. It is left as it
                # is recorded, and no longer polled in this run.
                self.counts["poll errors"] += 1
                if self.on_error is not None:
                    self.on_error(job_id, exc)
                return TaskState(task_id=task_id, status="not_found")
            if exc.status != 400 or not _UNKNOWN_TASK.search(exc.message):
                # Any other refusal (a 404 for every task, a 400 about the request) means a
                # wrong target, not lost tasks: stop, and record nothing a later poll could
                # not undo.
                self._stop(FatalApiError(exc.message, status=exc.status, code=exc.code))
                return None
            self.ledger.append(job_id, status="not_found",
                               error=f"the API no longer knows task {task_id}: {exc.message}")
            self.counts["not_found"] += 1
            return TaskState(task_id=task_id, status="not_found")
        except FatalApiError as exc:
            self._stop(exc)
            return None
        self._record(job_id, state)
        return state

    def _stop(self, exc: FatalApiError) -> None:
        self.fatal = self.fatal or exc
        self.stop.set()

    def _record(self, job_id: str, state: TaskState) -> None:
        row: Mapping[str, str] = self.ledger.latest.get(job_id, {})
        cells = state_cells(state)
        changed = any(str(v if v is not None else "") != row.get(k, "") for k, v in cells.items())
        if changed:
            self.ledger.append(job_id, **cells)
        if state.terminal:
            self.counts[state.status] += 1
            if state.status == "completed" and self.on_completed is not None:
                self.on_completed(job_id)
