"""Bounded, rate-limited, 429-adaptive scheduling of API requests.

``Limiter`` is the one gate every API request of a run passes: a hard bound on
requests in flight, an optional requests-per-second ceiling (``--rate``), and a pace
learned from 429s: a 429 sets the pace just below the rate the API was seen to accept,
which then grows slowly until the next 429 (AIMD on the interval between starts). A 429
never lowers concurrency and pauses only the refused request, for its Retry-After.
``run_pool`` feeds items to N workers without creating a task per item up front,
so memory stays flat in the number of jobs; an error nobody foresaw in one item's work
ends that item only. ``cut_at`` and ``retrying(deadline=...)`` keep every wait of a
stage inside its ``--deadline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sized
from contextlib import asynccontextmanager
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import TypeVar

from runner.api import RetryPolicy
from runner.errors import RetryableError

T = TypeVar("T")


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Stopped(Exception):
    """The run was stopped while a request waited for its turn: it was never sent."""


async def sleep_unless(stop: asyncio.Event | None, seconds: float, sleep: Sleep) -> None:
    """``sleep(seconds)``, cut short when ``stop`` is set; then raise Stopped if it is."""
    if stop is None:
        await sleep(seconds)
        return
    if not stop.is_set():
        nap = asyncio.ensure_future(sleep(seconds))
        woken = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((nap, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            nap.cancel()
            woken.cancel()
    if stop.is_set():
        raise Stopped


#: Seconds over which the requests the server accepted are counted, to learn its rate after
#: a 429. APIMart documents no limit (../shared/apimart-api.md, 4.4: no per-key rate or
#: concurrency is published, nor whether Retry-After is sent). Limits are commonly stated per
#: second, and a token bucket's burst is commonly one second's worth: counted over one second,
#: the burst that preceded the first 429 passes for a rate of about R, not several times R.
RATE_WINDOW = 1.0
#: After a 429, the pace is this share of the rate the server was seen to accept.
SETTLE = 0.92
#: A 429 cuts the pace again only for a request started this many latencies (the average
#: time a request holds its slot) after the last cut.
GRACE = 0.5
#: Growth of the pace per second after a cut, as a share of the cut pace: slow near the rate
#: that drew the 429 (each crossing of a token bucket's rate costs a few 429s), and faster
#: the longer no 429 comes, so that a pace learned too low recovers.
GROWTH = 0.005
#: Seconds after a cut at which that growth per second has doubled (it grows with the time).
GROWTH_DOUBLES = 10.0
#: Seconds in which the pace doubles while it is below the pace set by the last cut that
#: measured the server: after 429s that measured nothing (every request refused, say a quota
#: window that ran out), the pace climbs back quickly to where it was good.
CATCH_UP_DOUBLES = 1.0
#: The lowest pace, in requests per second.
MIN_RATE = 1.0

_STARTED: ContextVar[tuple[object, float] | None] = ContextVar("limiter_started", default=None)
"""(limiter token, start time) of the last request this task started: whose 429 it is."""
_HOLD: ContextVar[tuple[object, float] | None] = ContextVar("limiter_hold", default=None)
"""(limiter token, clock time) before which this task's next request must not start."""


class Limiter:
    """At most ``limit`` requests in flight, their starts paced by a rate learned from 429s.

    Without ``rate`` requests start as soon as a slot is free, until the first 429. A 429
    sets the pace to ``SETTLE`` times the rate the server was seen to accept (requests that
    succeeded, by start time, over the ``RATE_WINDOW`` before the refused one started), or
    lower; the pace then grows again (``GROWTH``), until the next 429 cuts it. Only a 429 of
    a request started after the last cut (and ``GRACE`` latencies) cuts again: the others
    were sent at the old pace.
    Concurrency is never lowered, and nobody else waits for a refused request: that one
    request waits its ``wait`` (the server's ``Retry-After``, else a backoff) before it is
    sent again. ``rate`` (``--rate``) is a ceiling on the pace, kept exactly: starts
    ``1/rate`` apart by the clock, however late a sleep wakes.

    Args:
        limit: the hard bound on requests in flight.
        rate: starts per second at most, or None for no ceiling.
        clock, sleep: injectable time, for tests.
    """

    def __init__(
        self,
        limit: int,
        *,
        rate: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if limit < 1:
            msg = f"'concurrency' must be > 0, got {limit}"
            raise ValueError(msg)
        if rate is not None and rate <= 0:
            msg = f"'rate' must be > 0, got {rate}"
            raise ValueError(msg)
        self.limit = limit
        self.ceiling = rate
        self.in_flight = 0
        self.peak = 0
        self.throttles = 0
        #: Requests per second set by the last cut (before its growth), None before any 429.
        self.learned: float | None = None
        #: Cuts of the pace so far (429s of requests sent at an older pace do not cut).
        self.cuts = 0
        self._cut_at = -math.inf
        self._good = 0.0  # the pace the last cut that measured the server set
        self._latency: float | None = None  # seconds a request holds its slot (an EWMA)
        self._last_start = -math.inf
        self._first_start: float | None = None
        self._starts: deque[float] = deque()
        self._accepted: deque[float] = deque()
        self._token = object()
        self._clock = clock
        self._sleep = sleep
        self._cond = asyncio.Condition()
        self._queue: deque[object] = deque()

    @property
    def rate(self) -> float | None:
        """Starts per second allowed now (None: no limit): ``ceiling``, or the pace the last
        cut set, grown since, when that is lower."""
        paces = [self.ceiling] if self.ceiling else []
        if self.learned is not None:
            paces.append(self._grown(max(0.0, self._clock() - self._cut_at)))
        return min(paces) if paces else None

    def _grown(self, elapsed: float) -> float:
        """The learned pace ``elapsed`` seconds after its cut."""
        assert self.learned is not None
        pace, good = self.learned, self._good
        if pace < good:
            # Doubling back up to where the server last accepted us, then growing slowly.
            catch_up = CATCH_UP_DOUBLES * math.log2(good / pace)
            if elapsed < catch_up:
                return float(pace * 2 ** (elapsed / CATCH_UP_DOUBLES))
            pace, elapsed = good, elapsed - catch_up
        return pace * (1 + GROWTH * elapsed * (1 + elapsed / GROWTH_DOUBLES))

    @asynccontextmanager
    async def slot(self, stop: asyncio.Event | None = None) -> AsyncIterator[None]:
        """Hold one in-flight slot for the duration of a request.

        Raises Stopped, holding no slot, when ``stop`` is set before the request may start.
        """
        await self.acquire(stop)
        try:
            yield
        finally:
            await self.release()

    async def acquire(self, stop: asyncio.Event | None = None) -> None:
        """Wait out this task's 429 wait, then for a free slot and the pace's next start.

        A set ``stop`` ends every wait at once with Stopped: a stopped run starts nothing.
        """
        stopped = stop.is_set if stop is not None else lambda: False
        # A hold outlives a request its policy gave up on: this task's next request (another
        # job's) waits it out too, as the server asked of this client.
        hold = _HOLD.get()
        if hold is not None and hold[0] is self._token:
            _HOLD.set(None)
            if hold[1] > self._clock():
                await sleep_unless(stop, hold[1] - self._clock(), self._sleep)
        # First come, first served: a worker that just released a slot must not jump ahead
        # of requests already waiting (polls would starve behind submissions). The head of
        # the queue also waits for the pace's tick, so that a cut applies at once.
        me = object()
        self._queue.append(me)
        try:
            while True:
                async with self._cond:
                    # Waiters see a stop when the next in-flight request releases its slot.
                    await self._cond.wait_for(partial(self._my_turn, me, stopped))
                if stopped():
                    raise Stopped
                now = self._clock()
                rate = self.rate
                tick = self._last_start + 1 / rate if rate else -math.inf
                if tick <= now:
                    # Started on the tick when it is less than a tick late, so that late
                    # wake-ups do not drift the pace below the rate; after idling, now.
                    start = tick if rate and now - tick < 1 / rate else now
                    break
                cuts = self.cuts
                await sleep_unless(stop, tick - now, self._sleep)
                if self.cuts == cuts:  # the pace held while we slept: the tick has come
                    start = tick
                    break
            self.in_flight += 1
        finally:
            self._queue.remove(me)
            async with self._cond:
                self._cond.notify_all()
        self._last_start = start
        self.peak = max(self.peak, self.in_flight)
        now = self._clock()
        if self._first_start is None:
            self._first_start = now
        self._starts.append(now)
        _trim(self._starts, now - RATE_WINDOW)
        _STARTED.set((self._token, now))

    def _my_turn(self, me: object, stopped: Callable[[], bool]) -> bool:
        return stopped() or (self._queue[0] is me and self.in_flight < self.limit)

    async def release(self) -> None:
        """Give a slot back."""
        started = self._started_here()
        if started is not None:
            took = self._clock() - started
            self._latency = took if self._latency is None else 0.9 * self._latency + 0.1 * took
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    async def succeeded(self) -> None:
        """Count a success of this task's last request: the server accepted it."""
        started = self._started_here()
        if started is not None:
            self._accepted.append(started)
            # Answers come back out of order: keep what a later 429 may still count.
            _trim(self._accepted, self._clock() - 2 * RATE_WINDOW)

    def throttled(self, wait: float) -> None:
        """The API said 429 to this task's last request: hold it back ``wait`` seconds, and
        cut the pace unless the request was sent before the last cut."""
        self.throttles += 1
        now = self._clock()
        _HOLD.set((self._token, now + wait))
        started = self._started_here()
        if started is None:
            started = now
        if started <= self._cut_at + GRACE * (self._latency or 0.0):
            # Sent at the old pace, or so soon after the cut that it may have met the server
            # still busy with those: no news about the new pace.
            return
        accepted = sum(1 for t in self._accepted if started - RATE_WINDOW < t <= started)
        if accepted:
            seen = accepted / RATE_WINDOW
        else:
            # Nothing accepted lately, so no measure of the server: half of what we sent.
            sent = sum(1 for t in self._starts if started - RATE_WINDOW < t <= started)
            first = self._first_start if self._first_start is not None else started
            seen = 0.5 * max(1, sent) / max(min(RATE_WINDOW, started - first), 1e-3)
        pace = self.rate
        self.learned = max(MIN_RATE, SETTLE * min(seen, pace if pace is not None else math.inf))
        if accepted:
            self._good = self.learned
        self._cut_at = now
        self.cuts += 1

    def _started_here(self) -> float | None:
        mine = _STARTED.get()
        return mine[1] if mine is not None and mine[0] is self._token else None


def _trim(times: deque[float], before: float) -> None:
    """Drop the times older than ``before`` from the (roughly time-ordered) left end."""
    while times and times[0] < before:
        times.popleft()


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    limiter: Limiter,
    policy: RetryPolicy,
    stop: asyncio.Event | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    deadline: float | None = None,
) -> T:
    """Run ``call`` in a limiter slot, resending it after a ``RetryableError`` per ``policy``.

    For requests that are safe to resend (reads, and refusals before processing): a 429
    slows the limiter's pace and holds this request back for its wait (the limiter makes
    the wait, in its next ``acquire``); other errors back off with jitter. The last
    ``RetryableError`` is raised when the policy or a stop says enough, or when the wait
    before the next try (a ``Retry-After`` included) would not end before ``deadline`` (a
    ``clock`` time); any other error is raised at once. ``Stopped`` means ``stop`` was set
    before a send could start.
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with limiter.slot(stop):
                result = await call()
        except RetryableError as exc:
            wait = policy.wait(attempt, exc.retry_after)
            left = deadline - clock() if deadline is not None else math.inf
            late = wait >= left  # a wait that outlasts the deadline is no retry
            if exc.status == 429:
                # Nobody waits past the deadline in the limiter's hold either.
                limiter.throttled(max(0.0, min(wait, left)))
                wait = 0.0  # the limiter holds the next try back for the wait
            stopped = stop is not None and stop.is_set()
            if (attempt >= policy.attempts or clock() - started >= policy.timeout or stopped
                    or late):
                raise
            with contextlib.suppress(Stopped):
                await sleep_unless(stop, wait, sleep)
            continue
        await limiter.succeeded()
        return result


def cut_at(deadline: float | None, clock: Clock = time.monotonic) -> asyncio.Timeout:
    """An ``asyncio.timeout`` that fires at ``deadline``, a ``clock`` time (None: never).

    The loop's own monotonic clock times it: ``clock`` only says how far away it is.
    Check ``expired()`` to tell its ``TimeoutError`` from one of the code inside.
    """
    if deadline is None:
        return asyncio.timeout(None)
    return asyncio.timeout(max(0.0, deadline - clock()))


def describe(exc: BaseException) -> str:
    """An error nobody foresaw, for a person: its class and the line of ours that raised it.

    Never its text: that may quote a server's answer, and so a key the server echoed.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).parent == _PACKAGE]
    if not (ours or frames):
        return type(exc).__name__
    frame = (ours or frames)[-1]
    where = f"{'runner/' if ours else ''}{Path(frame.filename).name}:{frame.lineno}"
    return f"{type(exc).__name__} at {where}"


_PACKAGE = Path(__file__).resolve().parent


async def run_pool(
    items: Iterable[T],
    work: Callable[[T], Awaitable[None]],
    *,
    workers: int,
    stop: asyncio.Event,
    on_error: Callable[[T, Exception], None] | None = None,
) -> None:
    """Run ``work`` on each item with ``workers`` coroutines; no new item after ``stop``.

    Items are pulled lazily from one shared iterator, so a million jobs cost a
    million iterations, not a million tasks.

    An ``Exception`` escaping ``work(item)`` (``Stopped`` aside: that item never started)
    ends that item only: ``on_error(item, exc)`` is called at once, in the worker that ran
    it, and the worker takes the next item; the others never notice. Without ``on_error``,
    or when ``on_error`` raises, the pool winds down instead: no new item starts, the
    items in flight finish, then the first such exception is raised. Cancellation is
    never caught.
    """
    if isinstance(items, Sized):
        workers = min(workers, max(1, len(items)))  # a large -j costs nothing up front
    iterator = iter(items)
    failures: list[Exception] = []

    async def worker() -> None:
        while not stop.is_set() and not failures:
            item = next(iterator, _DONE)
            if item is _DONE:
                return
            try:
                await work(item)  # type: ignore[arg-type]
            except Stopped:
                continue  # never sent: the loop sees the stop
            except Exception as exc:  # noqa: BLE001 - the point: one item's bug ends one item
                if on_error is None:
                    failures.append(exc)
                    return
                try:
                    on_error(item, exc)  # type: ignore[arg-type]
                except Exception as error:  # noqa: BLE001 - raised below, once in-flight ends
                    failures.append(error)
                    return

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    if failures:
        raise failures[0]


_DONE = object()
