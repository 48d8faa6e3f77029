"""After submission, in process against the emulator: uploads, polling, downloads, report.

The emulator runs on the frozen fake clock, moved to the real time first: the runner judges
link expiry by ``time.time``, so both sides must agree on "now". Tasks move only when a test
advances the clock, or at once with ``task_seconds=0``. Polls are brisk (no first delay,
10 ms apart) and retries never back off, so nothing here sleeps for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobfactory import make_job

from runner import app, report
from runner.api.client import Client, Secret, TaskState
from runner.api.retry import RetryPolicy
from runner.app import RunConfig
from runner.cli import build_parser
from runner.cli import main as cli_main
from runner.console import Console
from runner.emulator.contract import TASK_FAILURES, video_bytes
from runner.engine.download import Downloader, file_name
from runner.engine.lifecycle import LedgerConfig, run_download, run_status
from runner.engine.poll import Poller, PollTiming, iso_utc, state_cells
from runner.engine.runtime import interrupts
from runner.engine.schedule import Limiter
from runner.engine.submit import Submitter
from runner.engine.uploads import UPLOAD_LIFETIME, UPLOAD_REUSE_MARGIN
from runner.errors import LedgerError, LedgerLockedError, ManifestError, RejectedError, UsageError
from runner.ledger.store import iter_rows, open_ledger, read_latest
from runner.manifest.loader import load_manifests

KEY = Secret("sk-test-media-0000000000")
NO_WAIT = RetryPolicy(attempts=5, wait_initial=0.0, wait_max=0.0)
BRISK = PollTiming(first=0.0, interval=0.01)
REPO = Path(__file__).resolve().parent.parent
STILL = REPO / "jobs" / "stills" / "dawn.png"
FAILURE_MESSAGES = {failure["message"] for failure in TASK_FAILURES}
#: How long one in-process command may take before the test calls it hung.
HANG = 10.0


@pytest.fixture(autouse=True)
def _real_epoch(fake_clock: Any) -> None:
    """Start the emulator's frozen clock at the real time (see the module docstring)."""
    fake_clock.now = time.time()


def quiet() -> Console:
    """A console that writes to a string, never to the terminal."""
    return Console(quiet=True, stream=io.StringIO())


def write_manifest(folder: Path, jobs: list[dict[str, Any]], *, name: str = "media") -> str:
    """A sora-2 4 s manifest with these job entries."""
    doc = {"version": 1, "name": name, "defaults": {"model": "sora-2", "duration": 4},
           "jobs": jobs}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(path)


def prompts(folder: Path, count: int) -> str:
    """A manifest of ``count`` text-to-video jobs ``job-0`` ... ."""
    return write_manifest(folder, [{"id": f"job-{i}", "prompt": f"A lake at dawn, take {i}"}
                                   for i in range(count)])


async def run(srv: Any, manifest: str, **overrides: Any) -> int:
    """``run`` against the emulator ``srv``: no backoff, brisk polls, quiet."""
    fields = {"api_key": KEY, "base_url": srv.base_url, "policy": NO_WAIT,
              "timing": BRISK} | overrides
    with contextlib.redirect_stdout(io.StringIO()):
        return await asyncio.wait_for(app.run(RunConfig((manifest,), **fields), quiet()), HANG)


def ledger_of(manifest: str) -> str:
    """The default (non-mock) ledger of a manifest."""
    return app.ledger_path(manifest, mock=False)


def ledger_config(srv: Any, ledger: str, **overrides: Any) -> LedgerConfig:
    """The settings of ``status``/``download`` against the emulator ``srv``."""
    fields = {"api_key": KEY, "base_url": srv.base_url, "policy": NO_WAIT,
              "timing": BRISK} | overrides
    return LedgerConfig(ledger=ledger, **fields)


async def status(srv: Any, ledger: str, *, console: Console | None = None, **kw: Any) -> int:
    """``status LEDGER`` (``wait=True`` for --wait); fails the test if it hangs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return await asyncio.wait_for(
            run_status(ledger_config(srv, ledger, **kw), console or quiet()), HANG)


async def download(srv: Any, ledger: str, out: Path, **kw: Any) -> int:
    """``download LEDGER --out OUT``; fails the test if it hangs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return await asyncio.wait_for(
            run_download(ledger_config(srv, ledger, out=str(out), **kw), quiet()), HANG)


def statuses(ledger: str) -> dict[str, str]:
    """job_id -> latest status."""
    return {job: row["status"] for job, row in read_latest(ledger).items()}


def history(ledger: str, job_id: str) -> list[str]:
    """Every status the job's rows went through, in order."""
    return [row["status"] for row in iter_rows(ledger) if row["job_id"] == job_id]


def stat(srv: Any, name: str, route: str | None = None) -> Any:
    """One emulator counter; with ``route``, the requests to that route."""
    stats = srv.emulator.stats()
    return stats[name].get(route, 0) if route else stats[name]


async def completed_task(srv: Any, job_id: str) -> TaskState:
    """Create a task straight through the client and return its (completed) state."""
    job = make_job(job_id, model="sora-2", prompt=f"a still pond, {job_id}", duration=4,
              manifest_name="crafted")
    async with Client(srv.base_url, KEY) as client:
        task_id = (await client.submit(job)).task_id
        return await client.get_task(task_id)


def record(srv: Any, ledger: str, states: list[tuple[str, TaskState]]) -> None:
    """Write completed rows for (job_id, state) pairs, in this order."""
    with open_ledger(ledger, mock=False, base_url=srv.base_url) as opened:
        for job_id, state in states:
            opened.append(job_id, task_id=state.task_id, model="sora-2", duration=4,
                          **state_cells(state))


def listing(folder: Path) -> set[str]:
    """Names in a folder, hidden ones included."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def files(folder: Path) -> set[str]:
    """Paths of the files under a folder, relative to it, hidden ones included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


# -- local images -----------------------------------------------------------------------------


def image_manifest(folder: Path, images: list[str], *, name: str = "stills") -> str:
    """One job per entry of ``images``, each naming that local file."""
    return write_manifest(folder, [{"id": f"shot-{i}", "prompt": f"Dawn over the hills, {i}",
                                    "image": image} for i, image in enumerate(images)], name=name)


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's content."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_local_image_uploaded_once_for_every_job_and_take(emulator, tmp_path):
    """Every job and take of the example manifest shares one upload of dawn.png."""
    srv = await emulator(task_seconds=0)
    shutil.copytree(REPO / "jobs" / "stills", tmp_path / "stills")
    manifest = tmp_path / "local-image.yaml"
    shutil.copy(REPO / "jobs" / "local-image.yaml", manifest)
    assert await run(srv, str(manifest)) == 0
    rows = read_latest(ledger_of(str(manifest)))
    assert len(rows) == 3
    assert srv.emulator.stats()["uploads_per_sha256"] == {sha256(STILL): 1}
    assert {row["status"] for row in rows.values()} == {"submitted"}
    assert len({row["image_url"] for row in rows.values()}) == 1
    assert all(row["uploaded_at"] and row["image_sha256"] == sha256(STILL)
               for row in rows.values())


async def test_two_files_with_the_same_content_are_uploaded_once(emulator, tmp_path):
    """Identity is the content, not the path: a copy under another name is not sent again."""
    srv = await emulator()
    shutil.copy(STILL, tmp_path / "a.png")
    shutil.copy(STILL, tmp_path / "copy.png")
    assert await run(srv, image_manifest(tmp_path, ["a.png", "copy.png", "./a.png"])) == 0
    assert stat(srv, "uploads") == 1
    assert stat(srv, "requests", "upload") == 1
    assert stat(srv, "tasks_created") == 3


async def test_later_run_reuses_a_young_upload_from_the_ledger(emulator, tmp_path):
    """A job added later reuses the URL the ledger recorded instead of uploading again."""
    srv = await emulator()
    shutil.copy(STILL, tmp_path / "dawn.png")
    manifest = image_manifest(tmp_path, ["dawn.png"])
    assert await run(srv, manifest) == 0
    first = read_latest(ledger_of(manifest))["shot-0"]
    image_manifest(tmp_path, ["dawn.png", "dawn.png"])
    assert await run(srv, manifest) == 0
    second = read_latest(ledger_of(manifest))["shot-1"]
    assert stat(srv, "requests", "upload") == 1
    assert second["status"] == "submitted"
    assert (second["image_url"], second["uploaded_at"]) == (first["image_url"],
                                                            first["uploaded_at"])


@pytest.mark.parametrize(
    ("age", "uploads"),
    [
        pytest.param(UPLOAD_LIFETIME - UPLOAD_REUSE_MARGIN - 60, 1, id="young-reused"),
        pytest.param(UPLOAD_LIFETIME - UPLOAD_REUSE_MARGIN + 60, 2, id="old-uploaded-again"),
        pytest.param(UPLOAD_LIFETIME + 3600, 2, id="expired-uploaded-again"),
    ],
)
async def test_upload_reuse_depends_on_its_age(emulator, tmp_path, fake_clock, age, uploads):
    """A recorded upload is reused only while enough of its 72 h lifetime is left."""
    srv = await emulator()
    shutil.copy(STILL, tmp_path / "dawn.png")
    jobs = load_manifests([image_manifest(tmp_path, ["dawn.png", "dawn.png"])])[0].jobs
    ledger = str(tmp_path / "stills.ledger.csv")
    uploaded = fake_clock.now
    for job, wall in ((jobs[0], uploaded), (jobs[1], uploaded + age)):
        async with Client(srv.base_url, KEY) as client:
            with open_ledger(ledger, mock=False, base_url=srv.base_url) as opened:
                submit = Submitter(client, opened, Limiter(2), NO_WAIT, asyncio.Event(),
                                   wall_clock=lambda wall=wall: wall)
                assert await submit(job)
    rows = read_latest(ledger)
    assert stat(srv, "requests", "upload") == uploads
    assert (rows["shot-0"]["image_url"] == rows["shot-1"]["image_url"]) is (uploads == 1)
    assert {row["status"] for row in rows.values()} == {"submitted"}


@pytest.mark.parametrize("fault", ["500", "502", "reset_after_create"])
async def test_ambiguous_upload_is_never_repeated_in_the_run(emulator, tmp_path, fault):
    """An upload that may have been stored is not sent again, by the job or its siblings."""
    srv = await emulator()
    srv.emulator.script_upload([fault])
    shutil.copy(STILL, tmp_path / "dawn.png")
    manifest = image_manifest(tmp_path, ["dawn.png"] * 3)
    assert await run(srv, manifest) == 1
    rows = read_latest(ledger_of(manifest))
    assert stat(srv, "requests", "upload") == 1
    assert stat(srv, "tasks_created") == 0
    assert {row["status"] for row in rows.values()} == {"error"}
    assert all(row["error"].startswith("image upload: ") for row in rows.values())


@pytest.mark.parametrize("fault", ["429", "503"])
async def test_upload_refused_before_storing_is_retried(emulator, tmp_path, fault):
    """A 429 or 503 stored nothing, so the upload is sent again, and then only once."""
    srv = await emulator()
    srv.emulator.script_upload([fault, fault])
    shutil.copy(STILL, tmp_path / "dawn.png")
    manifest = image_manifest(tmp_path, ["dawn.png"] * 2)
    assert await run(srv, manifest) == 0
    assert stat(srv, "requests", "upload") == 3
    assert stat(srv, "uploads") == 1
    assert set(statuses(ledger_of(manifest)).values()) == {"submitted"}


def png(size: int) -> bytes:
    """A PNG signature padded to ``size`` bytes."""
    return b"\x89PNG\r\n\x1a\n" + bytes(size - 8)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param("big.png", png(10_000_001), "at most 10 MB", id="oversize"),
        pytest.param("text.png", b"just some text\n", "not a JPEG, PNG or WebP", id="not-image"),
        pytest.param("anim.gif", b"GIF89a" + bytes(64), "not a JPEG, PNG or WebP", id="gif"),
        pytest.param("gone.png", None, "does not exist", id="missing"),
    ],
)
async def test_bad_local_image_is_refused_before_any_request(
    emulator, tmp_path, name, content, message
):
    """Size, type (by content) and existence are checked before anything is sent."""
    srv = await emulator()
    if content is not None:
        (tmp_path / name).write_bytes(content)
    shutil.copy(STILL, tmp_path / "dawn.png")
    manifest = image_manifest(tmp_path, ["dawn.png", name])
    with pytest.raises(ManifestError) as caught:
        await run(srv, manifest)
    assert message in str(caught.value)
    assert stat(srv, "requests") == {}
    assert not Path(ledger_of(manifest)).exists()


# -- polling ----------------------------------------------------------------------------------


async def test_status_follows_tasks_and_records_rows_only_on_change(emulator, tmp_path,
                                                                    fake_clock):
    """Each status run polls once: pending, then processing with progress, then completed."""
    srv = await emulator(task_seconds=100)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    assert await run(srv, manifest) == 0
    assert await status(srv, ledger) == 0
    assert set(statuses(ledger).values()) == {"pending"}
    rows = len(list(iter_rows(ledger)))
    assert await status(srv, ledger) == 0
    assert len(list(iter_rows(ledger))) == rows  # nothing changed: no new row
    fake_clock.advance(50)
    assert await status(srv, ledger) == 0
    progress = {int(row["progress"]) for row in read_latest(ledger).values()}
    assert set(statuses(ledger).values()) == {"processing"}
    assert all(0 < p < 100 for p in progress)
    fake_clock.advance(50)
    assert await status(srv, ledger) == 0
    for row in read_latest(ledger).values():
        assert row["status"] == "completed"
        assert row["progress"] == "100"
        assert row["video_url"].endswith(f"video_{row['task_id']}.mp4")
        assert row["expires_at"] == iso_utc(int(fake_clock.now) + 86400)
        assert row["cost"] == "0.32"
    assert history(ledger, "job-0") == ["submitting", "submitted", "pending", "processing",
                                        "completed"]
    polls = stat(srv, "requests", "poll")
    assert await status(srv, ledger) == 0
    assert stat(srv, "requests", "poll") == polls  # terminal tasks are not polled again


@pytest.mark.parametrize("fault", ["429", "500", "502", "503", "504", "reset"])
async def test_wait_polls_through_transient_errors(emulator, tmp_path, fault):
    """Poll errors are retried, even past the attempt bound, and never mark a task failed."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    assert await run(srv, manifest) == 0
    srv.emulator.script_poll([fault] * 12)  # more than NO_WAIT.attempts for each task
    assert await status(srv, ledger, wait=True) == 0
    assert set(statuses(ledger).values()) == {"completed"}
    assert all("failed" not in history(ledger, job) for job in ("job-0", "job-1"))
    assert stat(srv, "requests", "poll") == 12 + 2
    assert stat(srv, "scripted_left")["poll"] == 0


@pytest.mark.parametrize("field", [False, True], ids=["error-object", "fail-reason"])
async def test_failed_task_is_recorded_with_its_error(emulator, tmp_path, field):
    """A failed task ends failed with the API's reason; status then exits 1."""
    srv = await emulator(task_seconds=0, fail_reason_field=field)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    srv.emulator.script_submit(["fail_task", "ok"])
    assert await run(srv, manifest) == 0
    assert await status(srv, ledger, wait=True) == 1
    rows = read_latest(ledger)
    failed = [row for row in rows.values() if row["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["error"] in FAILURE_MESSAGES
    assert sorted(statuses(ledger).values()) == ["completed", "failed"]


async def test_tasks_of_another_api_are_left_alone_with_the_flag_to_pass(emulator, tmp_path):
    """status against another API polls and writes nothing, exit 1 names the URL; links work."""
    first = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    assert await run(first, manifest) == 0
    rows = list(iter_rows(ledger))
    other = await emulator(task_seconds=0)  # knows none of those task ids
    console = Console(stream=io.StringIO())
    assert await status(other, ledger, wait=True, console=console) == 1
    assert f"2 tasks were submitted to {first.base_url}, not {other.base_url}: not polled; " \
           f"pass --base-url {first.base_url}" in console.stream.getvalue()
    assert list(iter_rows(ledger)) == rows
    assert stat(other, "requests") == {}
    assert f"status {ledger} --base-url {first.base_url} --wait" in \
        " ".join(report.build_report(ledger).next_steps)
    assert await status(first, ledger, wait=True) == 0
    # Video links are absolute and keyless: any --base-url downloads them from their origin.
    assert await download(other, ledger, tmp_path / "videos") == 0
    assert stat(other, "requests") == {}
    assert_intact(tmp_path / "videos", ledger)


async def test_unknown_task_is_recorded_not_found_once_and_never_polled_again(emulator,
                                                                            tmp_path):
    """A 400 "Invalid task ID" is recorded once; --wait then ends instead of polling forever."""
    srv = await emulator(task_seconds=0)
    ledger = str(tmp_path / "lost.ledger.csv")
    with open_ledger(ledger, mock=False, base_url=srv.base_url) as opened:
        for job in ("job-0", "job-1"):
            opened.append(job, status="submitted", task_id=f"task_forgotten_{job}")
    assert await status(srv, ledger, wait=True) == 1
    assert set(statuses(ledger).values()) == {"not_found"}
    assert all(history(ledger, job).count("not_found") == 1 for job in ("job-0", "job-1"))
    assert "no longer knows task" in read_latest(ledger)["job-0"]["error"]
    assert stat(srv, "requests", "poll") == 2
    assert await status(srv, ledger, wait=True) == 1
    assert stat(srv, "requests", "poll") == 2


async def test_wrong_api_path_stops_polling_and_records_nothing(emulator, tmp_path):
    """A 404 for every task is a wrong --base-url: exit 3, no task is written off."""
    srv = await emulator(task_seconds=0)
    ledger = str(tmp_path / "path.ledger.csv")
    with open_ledger(ledger, mock=False, base_url=srv.base_url + "/api") as opened:
        for job in ("job-0", "job-1"):
            opened.append(job, status="submitted", task_id=f"task_{job}")
    rows = list(iter_rows(ledger))
    console = Console(stream=io.StringIO())
    with contextlib.redirect_stdout(io.StringIO()):
        config = ledger_config(srv, ledger, base_url=srv.base_url + "/api", wait=True)
        assert await asyncio.wait_for(run_status(config, console), HANG) == 3
    assert list(iter_rows(ledger)) == rows
    assert "404 Not Found for GET /v1/tasks/task_" in console.stream.getvalue()


class VirtualTime:
    """A monotonic clock that moves only when something sleeps on it, at once."""

    def __init__(self) -> None:
        self.now = 5000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class ScriptedTasks:
    """A client whose ``get_task`` notes (task id, time) and answers with ``answer(task_id)``."""

    def __init__(self, clock: Any, answer: Any) -> None:
        self.clock, self.answer = clock, answer
        self.polls: list[tuple[str, float]] = []

    async def get_task(self, task_id: str) -> TaskState:
        self.polls.append((task_id, self.clock()))
        return self.answer(task_id)


def pending(task_id: str) -> TaskState:
    """Every task is still pending."""
    return TaskState(task_id=task_id, status="pending")


def poller_on(ledger: Any, client: Any, *, timing: PollTiming = BRISK,
              limiter: Limiter | None = None, time_: VirtualTime | None = None) -> Poller:
    """A Poller on virtual time (unless ``time_`` is None) with one task, ``task_0``, queued."""
    clock = {"clock": time_.clock, "sleep": time_.sleep} if time_ else {}
    poller = Poller(client, ledger, limiter or Limiter(1), NO_WAIT, asyncio.Event(), timing,
                    **clock)
    poller.add("job-0", "task_0", delay=0.0)
    poller.close()
    return poller


async def test_resumed_tasks_are_polled_no_faster_than_first(tmp_path):
    """After the immediate first poll of a resumed task, the next waits ``first``, then grows."""
    time_ = VirtualTime()
    start = time_.now
    client = ScriptedTasks(time_.clock, pending)
    timing = PollTiming(first=10.0, interval=30.0, growth=1.5, deadline=start + 60.0)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        await asyncio.wait_for(poller_on(ledger, client, timing=timing, time_=time_).work(), HANG)
    assert [at - start for _, at in client.polls] == [0.0, 10.0, 25.0, 47.5]


@pytest.mark.parametrize(
    ("detail", "not_found"),
    [
        pytest.param("Invalid task ID", True, id="invalid-task-id"),
        pytest.param("Invalid request parameters", False, id="other-400"),
    ],
)
async def test_only_an_invalid_task_id_400_writes_a_task_off(tmp_path, detail, not_found):
    """A 400 naming the task id records not_found; any other 400 stops polling, writes nothing."""
    def refuse(task_id: str) -> TaskState:
        what = f"APIMart answered 400 Bad Request for GET /v1/tasks/{task_id}: {detail}"
        raise RejectedError(what, status=400)

    client = ScriptedTasks(time.monotonic, refuse)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        ledger.append("job-0", status="submitted", task_id="task_0")
        poller = poller_on(ledger, client)
        await asyncio.wait_for(poller.work(), HANG)
        assert ledger.latest["job-0"]["status"] == ("not_found" if not_found else "submitted")
    assert len(client.polls) == 1
    assert (poller.fatal is None, poller.stop.is_set()) == (not_found, not not_found)


async def test_a_poll_waiting_for_its_slot_when_the_run_stops_is_never_sent(tmp_path):
    """stop set while a poll waits for the limiter: no request, no row, no error counted."""
    limiter = Limiter(1)
    await limiter.acquire()
    client = ScriptedTasks(time.monotonic, pending)
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        poller = poller_on(ledger, client, limiter=limiter)
        worker = asyncio.create_task(poller.work())
        for _ in range(10):  # the worker takes the task and queues for the slot
            await asyncio.sleep(0)
        poller.stop.set()
        await limiter.release()
        await asyncio.wait_for(worker, HANG)
        assert dict(ledger.latest) == {}
    assert (client.polls, poller.counts, poller.waiting) == ([], {}, 0)


async def test_wait_stops_at_the_deadline_with_tasks_still_running(emulator, tmp_path):
    """--deadline ends --wait with the unfinished tasks recorded as they are, exit 1."""
    srv = await emulator(task_seconds=3600)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    assert await run(srv, manifest) == 0
    deadline = PollTiming(first=0.0, interval=0.01, deadline=time.monotonic() + 0.2)
    assert await status(srv, ledger, wait=True, timing=deadline) == 1
    # A loaded machine may reach the deadline before the first poll: still running either way.
    assert set(statuses(ledger).values()) <= {"submitted", "pending"}


async def test_sigterm_ends_status_wait_promptly(emulator, tmp_path):
    """A SIGTERM while --wait idles between polls ends it at once with exit 143."""
    srv = await emulator(task_seconds=3600)
    manifest = prompts(tmp_path, 1)
    assert await run(srv, manifest) == 0
    slow = PollTiming(first=0.0, interval=3600.0)
    waiting = asyncio.ensure_future(status(srv, ledger_of(manifest), wait=True, timing=slow))
    while stat(srv, "requests", "poll") < 1:
        await asyncio.sleep(0.01)
    # Only once the run's own handler is installed: the default would end pytest.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(waiting, HANG) == 143  # the next poll is an hour away


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
     (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
    ids=["INT-INT", "TERM-TERM", "TERM-INT", "INT-TERM"],
)
async def test_a_second_signal_of_either_kind_aborts_at_once(first, second):
    """The first signal sets stop; a second of either kind cancels the block; both are kept."""
    stop = asyncio.Event()

    async def busy() -> list[int]:
        async with interrupts(stop) as caught:
            os.kill(os.getpid(), first)
            await stop.wait()
            os.kill(os.getpid(), second)
            await asyncio.sleep(3600)  # a request that would not end by itself
        return caught

    assert await asyncio.wait_for(busy(), HANG) == [first, second]


async def test_idle_status_wait_fsyncs_and_a_failed_fsync_is_a_ledger_error(
    emulator, tmp_path, monkeypatch
):
    """While --wait idles, the new rows are fsynced within a second; a failure ends it cleanly."""
    srv = await emulator(task_seconds=3600)
    manifest = prompts(tmp_path, 1)
    assert await run(srv, manifest) == 0
    tried: list[int] = []

    def broken_fsync(fd: int) -> None:
        tried.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    slow = PollTiming(first=0.0, interval=3600.0)
    with pytest.raises(LedgerError, match=r"cannot save the ledger to disk \(fsync: "):
        await status(srv, ledger_of(manifest), wait=True, timing=slow)
    assert tried
    assert statuses(ledger_of(manifest)) == {"job-0": "pending"}


class Terminal(io.StringIO):
    """A string stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "terminal"])
async def test_status_wait_progress_is_a_bar_on_a_terminal_and_quiet_elsewhere(
    emulator, tmp_path, tty
):
    """A terminal gets a bar with completed/failed/running; a pipe gets no progress at all."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 3)
    srv.emulator.script_submit(["ok", "fail_task", "ok"])
    assert await run(srv, manifest) == 0
    console = Console(stream=Terminal() if tty else io.StringIO())
    assert await status(srv, ledger_of(manifest), wait=True, console=console) == 1
    shown = console.stream.getvalue()
    if tty:
        assert "3/3 ok:2 fail:1" in shown
    else:  # no progress; only the failed job is named, with the way forward
        assert shown.startswith("warning: 1 jobs have no video (1 failed): job-1\n")
        assert shown.count("\n") == 2 and "--retry-failed" in shown


# -- downloads --------------------------------------------------------------------------------


async def completed_batch(emulator, tmp_path: Path, count: int, **knobs: Any) -> tuple[Any, str]:
    """An emulator and a ledger whose ``count`` jobs are all completed."""
    srv = await emulator(task_seconds=0, **knobs)
    manifest = prompts(tmp_path, count)
    assert await run(srv, manifest) == 0
    assert await status(srv, ledger_of(manifest), wait=True) == 0
    return srv, ledger_of(manifest)


def assert_intact(out: Path, ledger: str) -> None:
    """Every downloaded job's file is in ``out/<manifest stem>`` and holds what was served."""
    rows = read_latest(ledger)
    paths = {job: Path(Path(row["manifest"]).stem, f"{job}.mp4") for job, row in rows.items()}
    assert files(out) == {str(path) for path in paths.values()}
    for job, row in rows.items():
        body = (out / paths[job]).read_bytes()
        assert row["status"] == "downloaded"
        assert body == video_bytes(row["task_id"])
        assert row["file_sha256"] == hashlib.sha256(body).hexdigest()
        assert (row["file"], row["bytes"]) == (str((out / paths[job]).absolute()),
                                               str(len(body)))


async def test_download_is_byte_identical_and_a_rerun_is_a_no_op(emulator, tmp_path):
    """Each video lands once, named by its job id; a second download fetches nothing."""
    srv, ledger = await completed_batch(emulator, tmp_path, 3)
    out = tmp_path / "videos"
    assert await download(srv, ledger, out) == 0
    assert_intact(out, ledger)
    assert stat(srv, "downloads") == 3
    rows = len(list(iter_rows(ledger)))
    assert await download(srv, ledger, out) == 0
    assert stat(srv, "downloads") == 3
    assert len(list(iter_rows(ledger))) == rows


async def test_disconnect_mid_stream_is_retried_and_never_leaves_a_partial_file(emulator,
                                                                             tmp_path):
    """A download cut halfway is retried; the final name only ever holds the whole file."""
    srv, ledger = await completed_batch(emulator, tmp_path, 2)
    srv.emulator.script_download(["reset", "reset"])
    out = tmp_path / "videos"
    assert await download(srv, ledger, out) == 0
    assert_intact(out, ledger)
    assert stat(srv, "faults")["download_reset"] == 2


async def test_disconnects_past_the_retry_bound_leave_the_job_completed(emulator, tmp_path):
    """Every attempt cut: no file and no temporary file remain, exit 1; the next run works."""
    srv, ledger = await completed_batch(emulator, tmp_path, 1)
    srv.emulator.script_download(["reset"] * NO_WAIT.attempts)
    out = tmp_path / "videos"
    assert await download(srv, ledger, out) == 1
    row = read_latest(ledger)["job-0"]
    assert row["status"] == "completed"
    assert "GET video" in row["error"]
    assert files(out) == set()
    assert await download(srv, ledger, out) == 0
    assert_intact(out, ledger)


@pytest.mark.parametrize("damage", ["missing", "truncated", "grown"])
async def test_damaged_or_missing_file_is_fetched_again(emulator, tmp_path, damage):
    """A downloaded file that is gone or has the wrong size is downloaded again."""
    srv, ledger = await completed_batch(emulator, tmp_path, 2)
    out = tmp_path / "videos"
    assert await download(srv, ledger, out) == 0
    victim = out / "media" / "job-1.mp4"
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.write_bytes(victim.read_bytes() + b"junk")
    damaged = None if damage == "missing" else victim.read_bytes()
    assert await download(srv, ledger, out) == 0
    assert stat(srv, "downloads") == 3
    if damaged is not None:  # what was there is kept beside it, never overwritten
        [aside] = (out / "media").glob("job-1.changed-*.mp4")
        assert aside.read_bytes() == damaged
        assert aside.name in read_latest(ledger)["job-1"]["error"]
        aside.unlink()
    assert_intact(out, ledger)


HOSTILE_IDS = [
    "../escape", "../../etc/passwd", "a/b", "a_b", "/absolute", "..", ".", ".hidden",
    "back\\slash", "line\nbreak", "tab\tand\x1bescape", "x" * 300, "名前/ü", "CON",
]


async def test_path_hostile_job_ids_stay_inside_out_and_never_collide(emulator, tmp_path):
    """Ids from a hand-edited ledger cannot escape --out, hide a file or share a name."""
    srv = await emulator(task_seconds=0)
    state = await completed_task(srv, "any")
    ledger = str(tmp_path / "hostile.ledger.csv")
    record(srv, ledger, [(job_id, state) for job_id in HOSTILE_IDS])
    out = tmp_path / "deep" / "videos"
    assert await download(srv, ledger, out) == 0
    rows = read_latest(ledger)
    files = {Path(row["file"]) for row in rows.values()}
    assert len(files) == len(HOSTILE_IDS)
    for path in files:
        assert path.parent == out.absolute()
        assert not path.name.startswith(".")
        assert path.name.isprintable() and "\\" not in path.name
        assert len(path.name) < 120
        assert path.read_bytes() == video_bytes(state.task_id)
    assert listing(tmp_path) == {"deep", "hostile.ledger.csv", "hostile.ledger.csv.lock"}
    assert listing(out) == {p.name for p in files}


@pytest.mark.parametrize(
    ("job_id", "url", "name"),
    [
        pytest.param("clip", "https://cdn.example/v/x.MOV?sig=1", "clip.mov", id="url-extension"),
        pytest.param("clip", "https://cdn.example/v/x.exe", "clip.mp4", id="unknown-extension"),
        pytest.param("clip", "https://cdn.example/v/x", "clip.mp4", id="no-extension"),
    ],
)
def test_file_name_takes_the_extension_from_the_url(job_id, url, name):
    """The extension is the URL's when it is a video one, else .mp4."""
    assert file_name(job_id, url) == name


def test_file_names_differ_beyond_case():
    """'Fox' and 'fox' never share a file, even on a case-insensitive file system."""
    upper, lower = file_name("Fox", "x.mp4"), file_name("fox", "x.mp4")
    assert lower == "fox.mp4"
    assert upper.lower() != lower.lower()


async def test_expired_link_is_reported_and_not_fetched(emulator, tmp_path):
    """A link past expires_at is not requested; no fresh one: 'expired', with the way forward."""
    srv, ledger = await completed_batch(emulator, tmp_path, 1, link_ttl=0)
    out = tmp_path / "videos"
    assert await download(srv, ledger, out) == 1
    row = read_latest(ledger)["job-0"]
    assert row["status"] == "expired"
    assert "link expired" in row["error"] and "--retry-failed" in row["error"]
    assert stat(srv, "requests", "download") == 0
    assert files(out) == set()
    rows = len(list(iter_rows(ledger)))
    assert await download(srv, ledger, out) == 1
    assert len(list(iter_rows(ledger))) == rows  # the same news is not recorded twice
    steps = report.build_report(ledger).next_steps
    assert any("expired" in step and "--retry-failed" in step for step in steps), steps


async def test_a_download_waiting_for_its_slot_when_the_run_stops_is_never_started(tmp_path):
    """stop set while a download waits for the limiter: no request, no row, still completed."""
    limiter = Limiter(1)
    await limiter.acquire()
    stop = asyncio.Event()
    with open_ledger(tmp_path / "l.csv", mock=False, base_url="x") as ledger:
        ledger.append("job-0", status="completed", task_id="task_0",
                      video_url="http://127.0.0.1:9/video_task_0.mp4")
        rows = dict(ledger.latest)
        fetch = Downloader(client=None, ledger=ledger, out=tmp_path, limiter=limiter,
                           policy=NO_WAIT, stop=stop)
        started = asyncio.create_task(fetch("job-0"))
        for _ in range(10):  # into the limiter's queue
            await asyncio.sleep(0)
        stop.set()
        await limiter.release()
        await asyncio.wait_for(started, HANG)  # a request would fail: there is no client
        assert dict(ledger.latest) == rows
    assert fetch.counts == {}
    assert listing(tmp_path) == {"l.csv", "l.csv.lock"}


async def test_links_that_expire_soonest_are_downloaded_first(emulator, tmp_path, fake_clock):
    """With one download at a time, the order is by expires_at, not by ledger order."""
    srv = await emulator(task_seconds=0)
    states = []
    for job_id in ("early", "middle", "late"):
        states.append((job_id, await completed_task(srv, job_id)))
        fake_clock.advance(600)
    ledger = str(tmp_path / "order.ledger.csv")
    record(srv, ledger, [states[2], states[0], states[1]])
    assert list(read_latest(ledger)) == ["late", "early", "middle"]
    assert await download(srv, ledger, tmp_path / "videos", concurrency=1) == 0
    done = [row["job_id"] for row in iter_rows(ledger) if row["status"] == "downloaded"]
    assert done == ["early", "middle", "late"]


class FullDisk:
    """A file whose writes store half the data, then fail with ENOSPC."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def break_disk(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Make writing the temporary video file fail the way ``how`` says."""
    real_open, real_fsync = Path.open, os.fsync

    def part(path: Path) -> bool:
        return path.name.startswith(".") and ".part" in path.name

    def open_(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if part(path) and how == "eacces-on-open":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if part(path) and how == "enospc-on-write" else file

    def fsync(fd: int) -> None:
        if how == "enospc-on-fsync" and part(Path(os.readlink(f"/proc/self/fd/{fd}"))):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("how", ["enospc-on-write", "enospc-on-fsync", "eacces-on-open"])
async def test_disk_failure_leaves_the_job_completed_and_nothing_on_disk(emulator, tmp_path,
                                                                         how):
    """A full or unwritable disk: exit 1, job still completed, no file, no temp, no retry."""
    srv, ledger = await completed_batch(emulator, tmp_path, 1)
    out = tmp_path / "videos"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        break_disk(patch, how)
        assert await download(srv, ledger, out) == 1
    row = read_latest(ledger)["job-0"]
    assert row["status"] == "completed"
    strerror = os.strerror(errno.EACCES if how == "eacces-on-open" else errno.ENOSPC)
    assert row["error"] == f"{out / 'media' / 'job-0.mp4'}: cannot write the video: {strerror}"
    assert files(out) == set()
    assert stat(srv, "downloads") == (0 if how == "eacces-on-open" else 1)  # never retried
    assert await download(srv, ledger, out) == 0
    assert_intact(out, ledger)


async def test_out_that_is_not_a_folder_is_refused_before_any_download(emulator, tmp_path):
    """--out naming a file is a usage error; nothing is fetched and the ledger is unchanged."""
    srv, ledger = await completed_batch(emulator, tmp_path, 1)
    out = tmp_path / "taken"
    out.write_text("not a folder")
    rows = list(iter_rows(ledger))
    with pytest.raises(UsageError, match=r"--out .*taken: cannot create the folder"):
        await download(srv, ledger, out)
    assert list(iter_rows(ledger)) == rows
    assert stat(srv, "requests", "download") == 0


# -- status/download on a ledger: refusals ----------------------------------------------------


@pytest.mark.parametrize("command", ["status", "download"])
async def test_locked_ledger_is_refused_with_exit_75(emulator, tmp_path, command):
    """A second status/download while another holds the ledger stops before any request."""
    srv, ledger = await completed_batch(emulator, tmp_path, 1)
    before = srv.emulator.stats()["requests"]
    with open_ledger(ledger, mock=False, base_url=srv.base_url), \
            pytest.raises(LedgerLockedError) as caught:
        if command == "status":
            await status(srv, ledger)
        else:
            await download(srv, ledger, tmp_path / "videos")
    assert caught.value.exit_code == 75
    assert srv.emulator.stats()["requests"] == before


def not_ours(tmp_path: Path) -> str:
    path = tmp_path / "sales.csv"
    path.write_text("region,total\nnorth,3\n")
    return str(path)


def fifo(tmp_path: Path) -> str:
    path = tmp_path / "pipe.ledger.csv"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda tmp: str(tmp / "none.csv"), "cannot read", id="missing"),
        pytest.param(not_ours, "not an apimart-batch ledger", id="not-ours"),
        pytest.param(lambda tmp: str(tmp), "is a directory", id="a-folder"),
        pytest.param(fifo, "is a FIFO, not a regular file", id="a-fifo"),
    ],
)
@pytest.mark.parametrize("command", ["status", "download"])
async def test_bad_ledger_is_a_clear_error(emulator, tmp_path, command, make, message):
    """A missing, foreign, folder or FIFO ledger raises LedgerError (exit 2) naming it."""
    srv = await emulator()
    ledger = make(tmp_path)
    with pytest.raises(LedgerError, match=message) as caught:
        if command == "status":
            await status(srv, ledger)
        else:
            await download(srv, ledger, tmp_path / "videos")
    assert caught.value.exit_code == 2
    assert stat(srv, "requests") == {}


# -- run --wait -------------------------------------------------------------------------------


async def test_run_wait_downloads_every_video_and_a_rerun_sends_nothing(emulator, tmp_path):
    """submit, poll and download in one run; the same run again sends no request at all."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 6)
    out = tmp_path / "out"
    assert await run(srv, manifest, wait=True, out=str(out), concurrency=2) == 0
    assert_intact(out, ledger_of(manifest))
    assert stat(srv, "tasks_created") == 6
    requests = srv.emulator.stats()["requests"]
    assert await run(srv, manifest, wait=True, out=str(out)) == 0
    assert srv.emulator.stats()["requests"] == requests


async def test_run_wait_polls_while_later_jobs_are_still_being_submitted(emulator, tmp_path):
    """The first task completes (is polled) before the last job is submitted."""
    srv = await emulator(task_seconds=0, latency_ms=20, latency_jitter=0)
    manifest = prompts(tmp_path, 6)
    assert await run(srv, manifest, wait=True, out=str(tmp_path / "out"), concurrency=2) == 0
    order = [row["status"] for row in iter_rows(ledger_of(manifest))]
    last_submitted = len(order) - 1 - order[::-1].index("submitted")
    assert order.index("completed") < last_submitted


async def test_run_wait_with_poll_errors_and_a_failed_task(emulator, tmp_path):
    """Transient poll errors are ridden out; the failed task is recorded and exits 1."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 3)
    srv.emulator.script_submit(["ok", "fail_task", "ok"])
    srv.emulator.script_poll(["500", "429", "reset", "502"])
    out = tmp_path / "out"
    assert await run(srv, manifest, wait=True, out=str(out)) == 1
    ledger = ledger_of(manifest)
    assert sorted(statuses(ledger).values()) == ["downloaded", "downloaded", "failed"]
    failed = next(row for row in read_latest(ledger).values() if row["status"] == "failed")
    assert failed["error"] in FAILURE_MESSAGES
    assert len(files(out)) == 2


async def test_run_wait_uploads_then_downloads(emulator, tmp_path):
    """Local images and downloads in one run: one upload, every video on disk."""
    srv = await emulator(task_seconds=0)
    shutil.copy(STILL, tmp_path / "dawn.png")
    manifest = image_manifest(tmp_path, ["dawn.png"] * 3)
    out = tmp_path / "out"
    assert await run(srv, manifest, wait=True, out=str(out)) == 0
    assert stat(srv, "requests", "upload") == 1
    assert_intact(out, ledger_of(manifest))


async def test_run_wait_with_unusable_out_sends_nothing(emulator, tmp_path):
    """--out that cannot be a folder stops run --wait before the first request."""
    srv = await emulator()
    manifest = prompts(tmp_path, 2)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UsageError, match="cannot create the folder"):
        await run(srv, manifest, wait=True, out=str(tmp_path / "taken"))
    assert stat(srv, "requests") == {}


async def test_mock_ledger_status_and_download_work_in_a_later_process(tmp_path, monkeypatch):
    """A --mock ledger is polled and downloaded by later commands (each its own emulator)."""
    monkeypatch.setattr("runner.engine.runtime.MOCK_TASK_SECONDS", 0.0)
    manifest = prompts(tmp_path, 2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert await app.run(RunConfig((manifest,), mock=True, policy=NO_WAIT), quiet()) == 0
        ledger = app.ledger_path(manifest, mock=True)
        config = LedgerConfig(ledger=ledger, policy=NO_WAIT, timing=BRISK, wait=True,
                              out=str(tmp_path / "videos"))
        assert await asyncio.wait_for(run_status(config, quiet()), HANG) == 0
        assert set(statuses(ledger).values()) == {"completed"}
        assert await asyncio.wait_for(run_download(config, quiet()), HANG) == 0
    assert_intact(tmp_path / "videos", ledger)


# -- report -----------------------------------------------------------------------------------

NOW = 1_800_000_000.0


def crafted_ledger(path: Path, base_url: str = "https://api.apimart.ai",
                   manifest: str = "jobs/nightly.yaml") -> str:
    """A ledger with one job in each interesting state, as of ``NOW``."""
    rows = [
        ("ran", "processing", {"progress": 40}),
        ("done", "completed", {"expires_at": iso_utc(NOW + 3600), "cost": "0.32",
                               "video_url": "https://cdn.example/f/video/done.mp4"}),
        ("later", "completed", {"expires_at": iso_utc(NOW + 48 * 3600), "cost": "0.32",
                                "video_url": "https://cdn.example/f/video/later.mp4"}),
        ("gone", "completed", {"expires_at": iso_utc(NOW - 60), "cost": "0.32",
                               "video_url": "https://cdn.example/f/video/gone.mp4"}),
        ("saved", "downloaded", {"cost": "0.64", "file": str(path.parent / "saved.mp4"),
                                 "bytes": 4096, "duration": 8}),
        ("broke", "failed", {"error": "=HYPERLINK(\"x\") blocked by moderation"}),
        ("maybe", "unknown", {"task_id": "", "error": "no answer in time"}),
        ("bad", "rejected", {"task_id": "", "error": "Invalid request parameters"}),
    ]
    (path.parent / "saved.mp4").write_bytes(bytes(4096))
    with open_ledger(path, mock=False, base_url=base_url) as opened:
        for job_id, status_, cells in rows:
            fields: dict[str, Any] = {"task_id": f"task_{job_id}", "model": "sora-2",
                                      "duration": 4, "manifest": manifest} | cells
            opened.append(job_id, status=status_, **fields)
    return str(path)


def test_report_collapses_the_ledger_with_totals_costs_and_expiry(tmp_path):
    """One row per job, totals, estimated vs reported cost, links expiring within 24 h."""
    built = report.build_report(crafted_ledger(tmp_path / "n.ledger.csv"), now=NOW)
    assert [row["job_id"] for row in built.rows] == ["ran", "done", "later", "gone", "saved",
                                                     "broke", "maybe", "bad"]
    assert built.totals == {"processing": 1, "completed": 3, "downloaded": 1, "failed": 1,
                            "unknown": 1, "rejected": 1}
    assert built.estimated_usd == pytest.approx(0.32 * 5 + 0.64)  # jobs with a task id
    assert built.reported_usd == pytest.approx(0.32 * 3 + 0.64)
    assert built.expiring == ["done"]


def test_report_next_steps_are_exact_runnable_commands(tmp_path):
    """Each state that needs action gets one line, ending in a command argparse accepts."""
    folder = tmp_path / "my ledgers"
    folder.mkdir()
    ledger = crafted_ledger(folder / "n.ledger.csv", base_url="http://127.0.0.1:8765")
    steps = report.build_report(ledger, now=NOW).next_steps
    quoted = shlex.quote(ledger)
    target = "--base-url http://127.0.0.1:8765"
    run_cmd = f"apimart-batch run jobs/nightly.yaml --ledger {quoted} {target}"
    assert steps == [
        f"1 unknown (may be billed): check the APIMart dashboard, then: {run_cmd} "
        "--resubmit-unknown",
        f"1 rejected: fix those jobs in jobs/nightly.yaml (see the error column), then: "
        f"{run_cmd}",
        f"1 still running: apimart-batch status {quoted} {target} --wait",
        f"2 completed, not downloaded: apimart-batch download {quoted} {target}",
        "1 links past expires_at, not downloaded: 'download' asks each task for a fresh link "
        f"(needs the key): apimart-batch download {quoted} {target}",
        "1 failed, cancelled or expired (no video; APIMart refunds failed tasks): to buy them "
        f"again, a new take each: {run_cmd} --retry-failed",
    ]
    parser = build_parser()
    for step in steps:
        if "apimart-batch " in step:
            command = step[step.index("apimart-batch "):]
            args = parser.parse_args(shlex.split(command)[1:])
            assert getattr(args, "ledger", ledger) == ledger


def test_report_for_a_mock_ledger_beside_its_manifest_names_mock(tmp_path):
    """A --mock ledger's run command carries --mock and needs no --ledger or --base-url."""
    manifest = prompts(tmp_path, 1)
    ledger = app.ledger_path(manifest, mock=True)
    with open_ledger(ledger, mock=True, base_url="mock") as opened:
        opened.append("job-0", status="error", manifest=manifest, error="503")
    (step,) = report.build_report(ledger, now=NOW).next_steps
    assert step == f"1 not created (error): apimart-batch run {manifest} --mock"


def test_report_asks_to_download_again_when_a_file_went_missing(tmp_path):
    """A downloaded job whose file is gone is named, with the download command."""
    ledger = crafted_ledger(tmp_path / "n.ledger.csv")
    (tmp_path / "saved.mp4").unlink()
    steps = report.build_report(ledger, now=NOW).next_steps
    assert f"1 downloaded files missing or damaged: apimart-batch download {ledger}" in steps


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_report_formats(tmp_path, capsys, fmt):
    """table, csv and json carry the same jobs; csv keeps formula text inert."""
    ledger = crafted_ledger(tmp_path / "n.ledger.csv")
    assert cli_main(["report", ledger, "--format", fmt]) == 0
    text = capsys.readouterr().out
    if fmt == "json":
        doc = json.loads(text)
        assert [job["job_id"] for job in doc["jobs"]][:2] == ["ran", "done"]
        assert doc["totals"]["completed"] == 3
        assert doc["reported_usd"] == pytest.approx(1.6)
        assert any(step.startswith("1 still running: apimart-batch status")
                   for step in doc["next"])
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 8
        broke = next(row for row in rows if row["job_id"] == "broke")
        assert broke["error"].startswith("'=HYPERLINK")
    else:
        lines = text.splitlines()
        assert lines[0].split()[:3] == ["job_id", "status", "task_id"]
        assert any(line.startswith("gone ") and "completed" in line for line in lines)
        assert "8 jobs: 3 completed, 1 downloaded, 1 failed, 1 processing, 1 rejected, " \
               "1 unknown" in text
        assert "reported by APIMart $1.60" in text
        assert "next: 1 still running: apimart-batch status" in text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda tmp: str(tmp / "none.csv"), "no such ledger", id="missing"),
        pytest.param(not_ours, "not an apimart-batch ledger", id="not-ours"),
    ],
)
def test_report_on_a_bad_ledger_exits_2(tmp_path, capsys, make, message):
    """report names the problem on stderr and exits 2."""
    assert cli_main(["report", make(tmp_path)]) == 2
    assert message in capsys.readouterr().err
