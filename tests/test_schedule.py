"""Limiter and worker pool: hard bounds, rate, 429 adaptation."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import selectors
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import pytest

from runner.api.retry import NO_WAIT, RetryPolicy
from runner.emulator.config import EmulatorConfig
from runner.emulator.faults import Faults
from runner.engine.schedule import MIN_RATE, SETTLE, Limiter, Stopped, retrying, run_pool
from runner.errors import AmbiguousError, RetryableError

T = TypeVar("T")


async def never(seconds: float) -> None:
    """A sleep that only a stop (cancellation) ends."""
    await asyncio.Event().wait()


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


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks: a wait for the next timer moves the loop's clock there instead."""

    loop: VirtualLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            msg = "nothing scheduled: the simulation is stuck"
            raise RuntimeError(msg)
        self.loop.now += max(0.0, timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time: asyncio.sleep(60) returns at once, 60 s later."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def simulated(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a VirtualLoop; its ``loop.time`` is the clock to inject."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


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


def test_a_429_never_lowers_concurrency():
    """After 429s the limit stays, and that many requests are still in flight at once."""

    async def main() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(4, clock=loop.time)
        for _ in range(3):
            limiter.throttled(0.0)
        running = peak = 0

        async def work(_: int) -> None:
            nonlocal running, peak
            async with limiter.slot():
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.1)
                running -= 1

        await run_pool(range(40), work, workers=8, stop=asyncio.Event())
        return limiter.limit, peak, limiter.throttles

    assert simulated(main) == (4, 4, 3)


def test_only_the_refused_request_waits_its_retry_after():
    """The refused task's next start waits its 5 s; another task starts meanwhile."""

    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(4, clock=loop.time)
        began = loop.time()

        async def refused() -> float:
            async with limiter.slot():
                pass
            limiter.throttled(5.0)
            async with limiter.slot():
                return loop.time() - began

        async def other() -> float:
            await asyncio.sleep(0.5)
            async with limiter.slot():
                return loop.time() - began

        retried, other_started = await asyncio.gather(refused(), other())
        return retried, other_started, limiter.in_flight

    retried, other_started, in_flight = simulated(main)
    assert retried == pytest.approx(5.0)
    assert other_started == pytest.approx(0.5)
    assert in_flight == 0


async def test_a_stop_ends_the_retry_after_wait_holding_no_slot():
    """A stop during a 429's wait raises Stopped at once; no slot is taken."""
    limiter = Limiter(1, sleep=never)
    stop = asyncio.Event()
    async with limiter.slot():
        pass
    limiter.throttled(1000.0)
    waiting = asyncio.create_task(limiter.acquire(stop))
    await asyncio.sleep(0)
    stop.set()
    with pytest.raises(Stopped):
        await asyncio.wait_for(waiting, 1.0)
    assert limiter.in_flight == 0


async def test_429s_of_requests_sent_before_a_cut_do_not_cut_again():
    """A burst of refusals of requests sent together cuts the pace once, not once each."""
    fake = FakeTime()
    limiter = Limiter(8, clock=fake.clock, sleep=fake.sleep)
    started = asyncio.Barrier(8)

    async def refused() -> None:
        async with limiter.slot():
            await started.wait()
        limiter.throttled(0.0)

    await asyncio.gather(*(refused() for _ in range(8)))
    assert (limiter.throttles, limiter.cuts) == (8, 1)


async def accepted(limiter: Limiter, fake: FakeTime, count: int, gap: float) -> None:
    """``count`` requests the server accepted, started ``gap`` seconds apart."""
    for _ in range(count):
        async with limiter.slot():
            pass
        await limiter.succeeded()
        fake.now += gap


async def refused(limiter: Limiter) -> None:
    """One request answered 429 with no Retry-After."""
    async with limiter.slot():
        pass
    limiter.throttled(0.0)


async def test_a_cut_settles_below_the_rate_the_server_accepted():
    """After 50 accepted starts in the last second, a 429 sets the pace to SETTLE × 50/s."""
    fake = FakeTime()
    limiter = Limiter(1, clock=fake.clock, sleep=fake.sleep)
    await accepted(limiter, fake, 50, 0.019)
    await refused(limiter)
    assert limiter.learned == pytest.approx(SETTLE * 50)
    assert limiter.rate == pytest.approx(SETTLE * 50)
    fake.now += 10
    assert SETTLE * 50 < limiter.rate < 50 * 1.15  # growing again, slowly


async def test_the_pace_climbs_back_fast_after_429s_that_measured_nothing():
    """Refusals with nothing accepted drop the pace; without 429s it is back within seconds."""
    fake = FakeTime()
    limiter = Limiter(1, clock=fake.clock, sleep=fake.sleep)
    await accepted(limiter, fake, 20, 0.045)
    await refused(limiter)
    good = limiter.learned
    assert good == pytest.approx(SETTLE * 20)
    for _ in range(6):  # a quota window ran out: every request refused
        fake.now += 2.0
        await refused(limiter)
    assert limiter.rate == MIN_RATE
    fake.now += 5.0
    assert limiter.rate == pytest.approx(good, rel=0.01)


async def test_rate_spacing_is_exact_when_sleeps_wake_late():
    """--rate 10/s: 101 starts span 10 s of the clock, although every sleep wakes 5 ms late."""
    fake = FakeTime()

    async def late(seconds: float) -> None:
        await fake.sleep(seconds + 0.005)

    limiter = Limiter(4, rate=10.0, clock=fake.clock, sleep=late)
    starts: list[float] = []

    async def work(_: int) -> None:
        async with limiter.slot():
            starts.append(fake.now)

    await run_pool(range(101), work, workers=4, stop=asyncio.Event())
    # A pace counted from the wake-ups would take 101 × 5 ms longer.
    assert starts[-1] - starts[0] == pytest.approx(10.0, abs=0.006)


async def test_a_learned_pace_never_exceeds_the_rate_given():
    """With --rate 5/s a 429 lowers the pace below 5/s; growing back, it stops at 5/s."""
    fake = FakeTime()
    limiter = Limiter(1, rate=5.0, clock=fake.clock, sleep=fake.sleep)
    assert limiter.rate == 5.0
    await accepted(limiter, fake, 5, 0.0)
    limiter.throttled(0.0)
    assert limiter.rate == pytest.approx(SETTLE * 5.0)
    fake.now += 3600
    assert limiter.rate == 5.0


async def _against_token_bucket(
    n: int, retry_after: float | None, *, concurrency: int = 64, rps: float = 100.0
) -> tuple[Limiter, list[float], int, int]:
    """Submit ``n`` requests through a Limiter to the emulator's token bucket (``rps``, a
    second's burst), 100 ms latency; returns the limiter, the accepted times, 429s, sends."""
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    faults = Faults(EmulatorConfig(rate_limit_rps=rps), loop.time, rng)
    limiter = Limiter(concurrency, clock=loop.time, sleep=asyncio.sleep)
    policy = RetryPolicy()
    accepted: list[float] = []
    refused = sent = 0

    async def submit(_: int) -> None:
        nonlocal refused, sent
        for attempt in itertools.count(1):
            async with limiter.slot():
                sent += 1
                await asyncio.sleep(rng.lognormvariate(math.log(0.1), 0.3))
                answer = faults.admit("submit")
            if answer == "ok":
                accepted.append(loop.time())
                await limiter.succeeded()
                return
            refused += 1
            limiter.throttled(policy.wait(attempt, retry_after))

    await run_pool(range(n), submit, workers=concurrency, stop=asyncio.Event())
    return limiter, accepted, refused, sent


@pytest.mark.parametrize("retry_after", [1.0, None], ids=["retry-after", "no-retry-after"])
def test_the_pace_learned_from_429s_settles_just_below_the_server_limit(retry_after):
    """Against a 100/s token bucket (simulated time), 64 in flight: the pace settles below
    100/s, near it; few requests are refused; concurrency is never lowered."""
    limiter, accepted, refused, sent = simulated(partial(_against_token_bucket, 1500, retry_after))
    assert len(accepted) == 1500
    assert limiter.learned is not None
    assert 80 < limiter.learned < 100
    assert limiter.peak == limiter.limit == 64
    # The server's rate, first to last accepted (its one-second burst included): a limiter
    # that halved concurrency and paused everyone on each 429 got about 0.87 of it here.
    assert (len(accepted) - 1) / (accepted[-1] - accepted[0]) > 90
    assert refused / sent < 0.04  # the first 429s: what was in flight when the first came


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
