"""Bounded, rate-limited, 429-adaptive scheduling of API requests.

``Limiter`` is the one gate every API request of a run passes: a hard bound on
requests in flight, an optional requests-per-second rate, and an adaptive limit
that halves when the API answers 429 (with a pause shared by all workers, so they
do not retry in lockstep) and grows back by one per window of successes.
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


class Limiter:
    """At most ``limit`` requests in flight, at most ``rate`` starts per second.

    Args:
        limit: the hard bound on requests in flight (the adaptive limit never exceeds it).
        rate: starts per second, or None for no rate limit.
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
        self.max_limit = limit
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.throttles = 0
        self._interval = 1.0 / rate if rate else 0.0
        self._next_start = 0.0
        self._pause_until = 0.0
        self._successes = 0
        self._clock = clock
        self._sleep = sleep
        self._cond = asyncio.Condition()
        self._queue: deque[object] = deque()

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
        """Wait for a free slot, the end of any shared pause, and the next rate tick.

        A set ``stop`` ends every wait at once with Stopped: a stopped run starts nothing.
        """
        stopped = stop.is_set if stop is not None else lambda: False
        while True:
            delay = self._pause_until - self._clock()
            if delay > 0:
                await sleep_unless(stop, delay, self._sleep)
                continue
            async with self._cond:
                # First come, first served: a worker that just released a slot must not jump
                # ahead of requests already waiting (polls would starve behind submissions).
                me = object()
                self._queue.append(me)
                try:
                    # Waiters see a stop when the next in-flight request releases its slot.
                    await self._cond.wait_for(partial(self._my_turn, me, stopped))
                finally:
                    self._queue.remove(me)
                    self._cond.notify_all()
                if stopped():
                    raise Stopped
                # A 429 may have started a pause while we waited for the slot.
                if self._pause_until <= self._clock():
                    self.in_flight += 1
                    break
        self.peak = max(self.peak, self.in_flight)
        if self._interval:
            now = self._clock()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
            if start > now:
                try:
                    await sleep_unless(stop, start - now, self._sleep)
                except BaseException:
                    await self.release()
                    raise

    def _my_turn(self, me: object, stopped: Callable[[], bool]) -> bool:
        return stopped() or (self._queue[0] is me and self.in_flight < self.limit)

    async def release(self) -> None:
        """Give a slot back."""
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    async def succeeded(self) -> None:
        """Count a success: after a full window of them, allow one more in flight (at once)."""
        if self.limit >= self.max_limit:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit += 1
            async with self._cond:
                self._cond.notify_all()

    def throttled(self, wait: float) -> None:
        """The API said 429: halve the limit and pause every worker for ``wait`` seconds."""
        self.throttles += 1
        self.limit = max(1, self.limit // 2)
        self._successes = 0
        self._pause_until = max(self._pause_until, self._clock() + wait)


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
    pauses every worker through the limiter; other errors back off with jitter. The last
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
                # Shared by every worker: nobody waits past the deadline in the pause either.
                limiter.throttled(max(0.0, min(wait, left)))
                wait = 0.0  # the limiter's shared pause is the wait
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
