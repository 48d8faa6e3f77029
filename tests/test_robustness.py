"""Errors nobody foresaw end one item, never the run; every wait ends by --deadline.

Workers, pollers and downloaders get work functions or fake clients that raise once (or
always); the deadline tests run on virtual time, so nothing here sleeps for long. One
``slow`` test runs ``status --wait --deadline`` against a slow ``mock-server`` process.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from clihelpers import KEY, MockServer, cli, statuses, write_manifest

from runner.api.client import TaskState
from runner.api.retry import RetryPolicy
from runner.engine.download import NOT_BY_DEADLINE, Downloader
from runner.engine.lifecycle import LedgerConfig, Media
from runner.engine.poll import Poller, PollTiming
from runner.engine.schedule import Limiter, Stopped, describe, retrying, run_pool
from runner.errors import FatalApiError, RetryableError
from runner.ledger.store import open_ledger

NO_WAIT = RetryPolicy(attempts=3, wait_initial=0.0, wait_max=0.0)
#: How long one in-process stage may take before the test calls it hung.
HANG = 10.0


class VirtualTime:
    """A monotonic clock that moves only when something sleeps on it, at once; notes sleeps."""

    def __init__(self) -> None:
        self.now = 5000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def completed(task_id: str) -> TaskState:
    """A finished task with one video."""
    return TaskState(task_id=task_id, status="completed", progress=100,
                     video_urls=(f"http://127.0.0.1:9/{task_id}.mp4",))


class FakeClient:
    """``get_task`` and ``download`` follow a script: ``fail(key, call_number)`` may raise.

    ``hang`` makes every call wait until it is cancelled (a server that never answers).
    """

    def __init__(self, fail: Callable[[str, int], None] | None = None, *,
                 hang: bool = False) -> None:
        self.fail = fail or (lambda key, n: None)
        self.hang = hang
        self.calls: list[str] = []
        self.cancelled = 0

    async def _call(self, key: str) -> None:
        self.calls.append(key)
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.fail(key, self.calls.count(key))

    async def get_task(self, task_id: str) -> TaskState:
        await self._call(task_id)
        return completed(task_id)

    async def download(self, url: str, out: IO[bytes]) -> int:
        await self._call(url)
        return out.write(b"video bytes")


def type_error_on(key: str, *, times: int = 1) -> Callable[[str, int], None]:
    """Raise TypeError for ``key``'s first ``times`` calls (what a malformed answer did)."""
    def fail(called: str, n: int) -> None:
        if called == key and n <= times:
            msg = "'int' object is not iterable"
            raise TypeError(msg)
    return fail


def submitted(ledger: Any, *jobs: str) -> None:
    """A submitted row with task ``task_<n>`` for each job ``job-<n>``."""
    for job in jobs:
        ledger.append(job, status="submitted", task_id="task_" + job.removeprefix("job-"))


def done(ledger: Any, *jobs: str) -> None:
    """A completed row with a video link for each job."""
    for job in jobs:
        ledger.append(job, status="completed", task_id="task_" + job.removeprefix("job-"),
                      video_url=f"http://127.0.0.1:9/{job}.mp4")


# -- the worker pool ---------------------------------------------------------------------------


async def test_pool_reports_an_unforeseen_error_and_every_other_item_runs():
    """One item's TypeError reaches on_error once; the other 19 items all run."""
    ran: list[int] = []
    errors: list[tuple[int, Exception]] = []

    async def work(item: int) -> None:
        await asyncio.sleep(0)
        if item == 7:
            raise TypeError(item)
        ran.append(item)

    await asyncio.wait_for(run_pool(range(20), work, workers=4, stop=asyncio.Event(),
                                    on_error=lambda item, exc: errors.append((item, exc))), HANG)
    assert sorted(ran) == [i for i in range(20) if i != 7]
    assert [(item, type(exc)) for item, exc in errors] == [(7, TypeError)]


@pytest.mark.parametrize("reporting", [False, True], ids=["no-on_error", "on_error-raises"])
async def test_pool_without_a_report_winds_down_lets_in_flight_finish_then_raises(reporting):
    """No on_error (or one that raises): nothing new starts, items in flight end, then it raises."""
    started: list[int] = []
    finished: list[int] = []
    release = asyncio.Event()

    async def work(item: int) -> None:
        started.append(item)
        if item == 0:
            await asyncio.sleep(0)
            raise TypeError(item)
        await release.wait()  # a request in flight when item 0 fails
        finished.append(item)

    def refuse(item: int, exc: Exception) -> None:
        raise exc

    pool = asyncio.ensure_future(run_pool(range(10), work, workers=3, stop=asyncio.Event(),
                                          on_error=refuse if reporting else None))
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    with pytest.raises(TypeError):
        await asyncio.wait_for(pool, HANG)
    assert started == [0, 1, 2]
    assert sorted(finished) == [1, 2]


async def test_pool_takes_stopped_for_an_item_never_sent_not_for_an_error():
    """Stopped from work is how a stopped run ends an item: no report, no raise."""
    stop = asyncio.Event()
    errors: list[object] = []

    async def work(item: int) -> None:
        stop.set()
        raise Stopped

    await run_pool(range(5), work, workers=2, stop=stop, on_error=lambda *e: errors.append(e))
    assert errors == []


def test_describe_names_the_class_and_line_never_the_text():
    """A message built from server text could hold a key: describe shows class and place only."""
    try:
        raise ValueError(KEY)
    except ValueError as exc:
        text = describe(exc)
    assert text.startswith("ValueError at test_robustness.py:")
    assert KEY not in text


# -- polling -----------------------------------------------------------------------------------


def poller(ledger: Any, client: Any, time_: VirtualTime, *, timing: PollTiming | None = None,
           errors: list[tuple[str, Exception]] | None = None, **kw: Any) -> Poller:
    """A Poller on virtual time with every submitted job of ``ledger`` queued at once."""
    polls = Poller(client, ledger, Limiter(2, clock=time_.clock, sleep=time_.sleep), NO_WAIT,
                   asyncio.Event(), timing or PollTiming(first=1.0, interval=5.0),
                   clock=time_.clock, sleep=time_.sleep,
                   on_error=(lambda job, exc: errors.append((job, exc))) if errors is not None
                   else None, **kw)
    for job_id, row in ledger.latest.items():
        polls.add(job_id, row["task_id"], delay=0.0)
    polls.close()
    return polls


async def test_a_poll_that_raises_once_leaves_its_task_pollable_and_the_others_go_on(tmp_path):
    """A TypeError while polling task_0: reported once, polled again and completed; task_1 too."""
    time_ = VirtualTime()
    client = FakeClient(type_error_on("task_0"))
    errors: list[tuple[str, Exception]] = []
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0", "job-1")
        polls = poller(ledger, client, time_, errors=errors)
        await asyncio.wait_for(asyncio.gather(polls.work(), polls.work()), HANG)
        assert {job: row["status"] for job, row in ledger.latest.items()} == {
            "job-0": "completed", "job-1": "completed"}
    assert [(job, type(exc)) for job, exc in errors] == [("job-0", TypeError)]
    assert client.calls.count("task_0") == 2
    assert polls.counts["poll errors"] == 1
    assert not polls.stop.is_set()


async def test_a_task_that_always_breaks_polling_is_let_be_after_the_attempt_bound(tmp_path):
    """A poll that always raises: tried policy.attempts times, then left pollable for later."""
    time_ = VirtualTime()
    client = FakeClient(type_error_on("task_0", times=1000))
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0", "job-1")
        polls = poller(ledger, client, time_)
        await asyncio.wait_for(polls.work(), HANG)
        assert ledger.latest["job-0"]["status"] == "submitted"
        assert ledger.latest["job-1"]["status"] == "completed"
    assert client.calls.count("task_0") == NO_WAIT.attempts
    assert polls.waiting == 1  # still running, as far as anyone knows


async def test_a_fatal_answer_still_stops_polling(tmp_path):
    """FatalApiError keeps its meaning: polling stops and the error is kept for the exit code."""
    def fatal(key: str, n: int) -> None:
        raise FatalApiError("APIMart answered 401", status=401)

    time_ = VirtualTime()
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0")
        polls = poller(ledger, FakeClient(fatal), time_)
        await asyncio.wait_for(polls.work(), HANG)
    assert polls.stop.is_set()
    assert polls.fatal is not None
    assert polls.fatal.status == 401


async def test_a_poll_in_flight_at_the_deadline_is_cut_and_its_task_stays_running(tmp_path):
    """A server that never answers: the poll is cancelled at the deadline, the row is unchanged."""
    time_ = VirtualTime()
    client = FakeClient(hang=True)
    timing = PollTiming(first=1.0, interval=5.0, deadline=time_.now + 0.001)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0")
        before = dict(ledger.latest["job-0"])
        polls = poller(ledger, client, time_, timing=timing)
        await asyncio.wait_for(polls.work(), HANG)
        assert dict(ledger.latest["job-0"]) == before
    assert (client.calls, client.cancelled) == (["task_0"], 1)
    assert polls.waiting == 1
    assert time_.now <= timing.deadline


@pytest.mark.parametrize("status", [503, 429])
async def test_a_retry_after_past_the_deadline_is_never_waited(tmp_path, status):
    """Retry-After: 600 under a 30 s deadline: no wait goes past it, polling ends at it."""
    def busy(key: str, n: int) -> None:
        msg = f"APIMart answered {status}"
        raise RetryableError(msg, status=status, retry_after=600.0)

    time_ = VirtualTime()
    start = time_.now
    timing = PollTiming(first=1.0, interval=5.0, deadline=start + 30.0)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0")
        polls = poller(ledger, FakeClient(busy), time_, timing=timing)
        await asyncio.wait_for(polls.work(), HANG)
    assert time_.now <= start + 30.0
    assert max(time_.sleeps) <= 30.0
    assert polls.waiting == 1


async def test_retrying_stops_before_a_wait_that_outlasts_the_deadline():
    """The last RetryableError comes back at once when the next try would start too late."""
    time_ = VirtualTime()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        raise RetryableError("APIMart answered 503", status=503, retry_after=20.0)

    limiter = Limiter(1, clock=time_.clock, sleep=time_.sleep)
    with pytest.raises(RetryableError):
        await retrying(call, limiter=limiter, policy=NO_WAIT, clock=time_.clock,
                       sleep=time_.sleep, deadline=time_.now + 50.0)
    assert (calls, time_.sleeps) == (3, [20.0, 20.0])  # a third wait would end at 60 s


# -- downloads ---------------------------------------------------------------------------------


def downloader(ledger: Any, client: Any, out: Path, **kw: Any) -> Downloader:
    """A Downloader into ``out`` with no backoff."""
    return Downloader(client, ledger, out, Limiter(2), NO_WAIT, asyncio.Event(), **kw)


async def test_a_download_that_raises_once_stays_completed_for_a_later_download(tmp_path):
    """A TypeError for job-0's video: its row says so and stays completed; job-1 is on disk."""
    out = tmp_path / "videos"
    out.mkdir()
    client = FakeClient(type_error_on("http://127.0.0.1:9/job-0.mp4"))
    errors: list[tuple[str, Exception]] = []
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        done(ledger, "job-0", "job-1")
        fetch = downloader(ledger, client, out,
                           on_error=lambda job, exc: errors.append((job, exc)))
        await asyncio.wait_for(asyncio.gather(fetch("job-0"), fetch("job-1")), HANG)
        row = ledger.latest["job-0"]
        assert row["status"] == "completed"
        assert "failed unexpectedly (TypeError at runner/" in row["error"]
        assert ledger.latest["job-1"]["status"] == "downloaded"
        assert sorted(p.name for p in out.iterdir()) == ["job-1.mp4"]
        await asyncio.wait_for(fetch("job-0"), HANG)  # a later download fetches it
        assert ledger.latest["job-0"]["status"] == "downloaded"
    assert [(job, type(exc)) for job, exc in errors] == [("job-0", TypeError)]
    assert fetch.counts == {"download errors": 1, "downloaded": 2}


async def test_a_download_in_flight_at_the_deadline_is_cut_and_none_starts_after(tmp_path):
    """The deadline cuts a stalled download (no file left) and starts no other."""
    out = tmp_path / "videos"
    out.mkdir()
    time_ = VirtualTime()
    client = FakeClient(hang=True)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        done(ledger, "job-0", "job-1")
        rows = dict(ledger.latest)
        fetch = downloader(ledger, client, out, clock=time_.clock, sleep=time_.sleep,
                           deadline=time_.now + 0.001)
        await asyncio.wait_for(fetch("job-0"), HANG)
        time_.now += 1.0
        await asyncio.wait_for(fetch("job-1"), HANG)
        assert dict(ledger.latest) == rows
    assert (len(client.calls), client.cancelled) == (1, 1)
    assert list(out.iterdir()) == []
    assert fetch.counts == {NOT_BY_DEADLINE: 2}


async def test_media_polls_and_downloads_the_rest_when_one_task_always_breaks(tmp_path):
    """Media with one task whose polls always raise: every other video still lands on disk."""
    client = FakeClient(type_error_on("task_0", times=1000))
    errors: list[str] = []
    config = LedgerConfig(ledger="l.csv", concurrency=2, policy=NO_WAIT,
                          timing=PollTiming(first=0.0, interval=0.001))
    out = tmp_path / "videos"
    out.mkdir()
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        submitted(ledger, "job-0", "job-1", "job-2")
        media = Media(client, ledger, config, asyncio.Event(), Limiter(2), base_url="x",
                      out=out, on_error=lambda job, exc: errors.append(job))
        media.resume(list(ledger.latest))
        media.poller.close()
        await asyncio.wait_for(media.run(), HANG)
        assert {job: row["status"] for job, row in ledger.latest.items()} == {
            "job-0": "submitted", "job-1": "downloaded", "job-2": "downloaded"}
    assert errors == ["job-0"]  # reported once, though polled policy.attempts times
    assert client.calls.count("task_0") == NO_WAIT.attempts
    assert media.counts()["downloaded"] == 2


# -- a slow server, end to end -----------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


DEADLINE = 3.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "slow_flags",
    [
        pytest.param(["--latency-ms", "30000", "--latency-jitter", "0"], id="30s-answers"),
        pytest.param(["--rate-limit-rps", "0.001", "--rate-limit-scope", "api",
                      "--retry-after", "99999"], id="retry-after-99999"),
    ],
)
def test_status_wait_ends_by_the_deadline_against_a_slow_server(mock_server, tmp_path,
                                                               slow_flags):
    """Polls that take 30 s or a Retry-After of 27 h: --deadline 3 still ends in seconds."""
    port = free_port()
    fast = mock_server("--port", str(port), "--task-seconds", "3600")
    ledger = tmp_path / "batch.ledger.csv"
    assert cli(tmp_path, "run", write_manifest(tmp_path, 3), "--base-url", fast.url).returncode == 0
    _stop(fast)
    # The same URL, so the ledger's tasks are this server's; it adopts them as its own.
    slow = mock_server("--port", str(port), "--task-seconds", "3600", "--adopt-tasks",
                       *slow_flags)
    assert slow.url == fast.url
    started = time.monotonic()
    done = cli(tmp_path, "status", ledger.name, "--wait", "--deadline", str(DEADLINE),
               "--base-url", slow.url)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr  # tasks still running: not done yet
    assert "Traceback" not in done.stderr
    assert set(statuses(ledger)) <= {"submitted", "pending"}
    assert slow.api_requests().get("poll", 0) >= 1  # it did wait on the slow server
    # A hang guard, not a benchmark: without the deadline this took 70 s or more.
    assert elapsed < DEADLINE + 5, elapsed


def _stop(server: MockServer) -> None:
    server.process.kill()
    try:
        server.process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - the fixture kills it at teardown
        pytest.fail("mock-server did not stop")
