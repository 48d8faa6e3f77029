"""Limiter and worker pool: hard bounds, rate, 429 adaptation."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from runner.api.retry import NO_WAIT, RetryPolicy
from runner.engine.schedule import Limiter, Stopped, retrying, run_pool
from runner.errors import AmbiguousError, RetryableError


class FakeTime:
    """A clock that only moves when something sleeps; concurrent sleeps overlap."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, target)


@pytest.mark.parametrize("limit", [1, 2, 5, 10])
async def test_pool_never_exceeds_limit(limit):
    """However many items, exactly `limit` are in the slot at the peak, and all run."""
    limiter = Limiter(limit)
    running = peak = done = 0

    async def work(_: int) -> None:
        nonlocal running, peak, done
        async with limiter.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            running -= 1
            done += 1

    await run_pool(range(50), work, workers=limit * 2, stop=asyncio.Event())
    assert done == 50
    # Every worker yields inside its slot, so the limit fills: a serialising limiter fails here.
    assert peak == limit
    assert limiter.peak == peak


async def test_pool_stops_taking_items_after_stop():
    """Once stop is set, no further item is started."""
    stop = asyncio.Event()
    seen: list[int] = []

    async def work(item: int) -> None:
        seen.append(item)
        if item == 3:
            stop.set()

    await run_pool(range(100), work, workers=1, stop=stop)
    assert seen == [0, 1, 2, 3]


async def test_rate_spaces_starts():
    """With rate=2/s, starts are 0.5 s apart on the injected clock."""
    fake = FakeTime()
    limiter = Limiter(4, rate=2.0, clock=fake.clock, sleep=fake.sleep)
    starts: list[float] = []

    async def work(_: int) -> None:
        async with limiter.slot():
            starts.append(fake.now)

    await run_pool(range(5), work, workers=4, stop=asyncio.Event())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 5
    assert all(gap == pytest.approx(0.5) for gap in gaps)


async def test_throttle_halves_limit_pauses_and_recovers():
    """A 429 halves the limit and pauses everyone; successes grow it back to the maximum."""
    fake = FakeTime()
    limiter = Limiter(8, clock=fake.clock, sleep=fake.sleep)
    limiter.throttled(5.0)
    assert limiter.limit == 4
    await limiter.acquire()
    assert fake.now == pytest.approx(1005.0)
    await limiter.release()
    for _ in range(4 + 5 + 6 + 7):
        await limiter.succeeded()
    assert limiter.limit == 8
    await limiter.succeeded()
    assert limiter.limit == 8


async def test_a_grown_limit_wakes_a_waiter_at_once():
    """When successes raise the limit, a request waiting for a slot starts without a release."""
    limiter = Limiter(2)
    limiter.throttled(0.0)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    await limiter.succeeded()
    await asyncio.wait_for(waiter, 1.0)
    assert limiter.in_flight == 2


async def test_throttle_never_below_one():
    """Repeated 429s leave one request in flight, never zero."""
    limiter = Limiter(3)
    for _ in range(5):
        limiter.throttled(0.0)
    assert limiter.limit == 1
    assert limiter.throttles == 5


@pytest.mark.parametrize("bad", [0, -1], ids=["zero", "negative"])
def test_limit_must_be_positive(bad):
    """A non-positive concurrency is refused with the parameter's name."""
    with pytest.raises(ValueError, match="'concurrency' must be > 0"):
        Limiter(bad)


async def test_slots_are_handed_out_first_come_first_served():
    """A worker that frees a slot and asks again queues behind requests already waiting."""
    limiter = Limiter(1)
    order: list[str] = []
    await limiter.acquire()

    async def waiter() -> None:
        async with limiter.slot():
            order.append("waiter")

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    await limiter.release()
    async with limiter.slot():
        order.append("releaser")
    await task
    assert order == ["waiter", "releaser"]


async def test_retrying_resends_retryable_errors_then_gives_up():
    """RetryableError is resent within the attempts, a 429 throttles; the last error is raised."""
    fake = FakeTime()
    limiter = Limiter(4, clock=fake.clock, sleep=fake.sleep)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        raise RetryableError("busy", status=429 if calls == 1 else 503)

    with pytest.raises(RetryableError, match="busy"):
        await retrying(flaky, limiter=limiter, policy=RetryPolicy(attempts=3),
                       clock=fake.clock, sleep=fake.sleep)
    assert calls == 3
    assert limiter.throttles == 1
    assert limiter.in_flight == 0


async def test_retrying_returns_first_success_and_never_resends_other_errors():
    """A success ends the loop; an AmbiguousError is raised at once, never resent."""
    answers: list[object] = [RetryableError("refused"), "ok"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    limiter = Limiter(1)
    assert await retrying(call, limiter=limiter, policy=NO_WAIT) == "ok"
    answers[:] = [AmbiguousError("maybe created"), "never"]
    with pytest.raises(AmbiguousError):
        await retrying(call, limiter=limiter, policy=NO_WAIT)
    assert answers == ["never"]


async def test_retrying_never_starts_a_call_queued_when_the_run_stops():
    """A call waiting for a slot when stop is set raises Stopped and is never made."""
    limiter = Limiter(1)
    stop = asyncio.Event()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        return "sent"

    await limiter.acquire()
    queued = asyncio.create_task(retrying(call, limiter=limiter, policy=NO_WAIT, stop=stop))
    await asyncio.sleep(0)
    stop.set()
    await limiter.release()
    with pytest.raises(Stopped):
        await queued
    assert (calls, limiter.in_flight) == (0, 0)
