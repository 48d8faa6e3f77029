"""``run`` in process against the emulator: bounds, failure classes, resume, budget, ledger.

Every test drives ``runner.app.run`` end to end over a loopback socket and checks what the
emulator saw (its request and task counters) against what the ledger and summary say.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import gc
import io
import json
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from jobfactory import make_job

from runner import app
from runner.api.client import Client, Secret
from runner.api.retry import RetryPolicy
from runner.app import RunConfig
from runner.cli import build_parser
from runner.console import Console
from runner.emulator import contract as emulator_contract
from runner.engine.runtime import BUSY_GC_THRESHOLD, fewer_collections
from runner.engine.schedule import Limiter
from runner.engine.submit import Submitter, job_fields
from runner.errors import LedgerError, LedgerLockedError, ManifestError
from runner.ledger.store import Ledger, open_ledger, read_latest
from runner.manifest.loader import load_manifests

KEY = "sk-live-TESTKEY-must-never-be-printed-4242"
NO_WAIT = RetryPolicy(attempts=5, wait_initial=0.0, wait_max=0.0)
#: sora-2 at 720p, 4 s: the plan's estimate of one job (USD).
JOB_COST = 0.32


def write_manifest(tmp_path: Path, prompts: list[str], *, name: str = "batch") -> str:
    """A manifest with one sora-2 4 s job per prompt, ids ``job-0``, ``job-1`` ..."""
    doc = {
        "version": 1,
        "name": name,
        "defaults": {"model": "sora-2", "duration": 4},
        "jobs": [{"id": f"job-{i}", "prompt": p} for i, p in enumerate(prompts)],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def lake(count: int) -> list[str]:
    """``count`` distinct plain prompts."""
    return [f"A calm lake at dawn, take {i}" for i in range(count)]


@dataclass
class Result:
    """What one run returned, printed and recorded."""

    code: int
    out: str
    err: str
    summary: dict[str, Any]
    rows: dict[str, dict[str, str]]

    @property
    def statuses(self) -> dict[str, str]:
        """job_id -> latest ledger status."""
        return {job: row["status"] for job, row in self.rows.items()}


async def run_batch(srv, manifest: str, *, console: Console | None = None, **overrides) -> Result:
    """Run ``manifest`` against the emulator ``srv`` with no backoff; collect everything."""
    summary = Path(manifest).with_name("summary.json")
    summary.unlink(missing_ok=True)
    fields = {"api_key": Secret(KEY), "base_url": srv.base_url, "policy": NO_WAIT,
              "summary_json": str(summary)} | overrides
    config = RunConfig(manifests=(manifest,), **fields)
    console = console or Console(stream=io.StringIO())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await app.run(config, console)
    ledger = app.ledger_path(manifest, mock=False, override=config.ledger)
    rows = read_latest(ledger) if Path(ledger).exists() else {}
    stream = console.stream.getvalue() if isinstance(console.stream, io.StringIO) else ""
    return Result(code, out.getvalue(), stream, json.loads(summary.read_text()), rows)


def submits(srv) -> int:
    """Submit requests the emulator has received."""
    return srv.emulator.stats()["requests"].get("submit", 0)


def task_of(srv, row: dict[str, str]) -> list[str]:
    """The emulator's task ids created under the row's Idempotency-Key."""
    keys = srv.emulator.stats()["idempotency_key_by_task"]
    return [task for task, key in keys.items() if key == row["idempotency_key"]]


class SpyLimiter(Limiter):
    """A Limiter that remembers every instance and the lowest concurrency limit it reached."""

    made: ClassVar[list[SpyLimiter]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lowest = self.limit
        SpyLimiter.made.append(self)

    def throttled(self, wait: float) -> None:
        super().throttled(wait)
        self.lowest = min(self.lowest, self.limit)


@pytest.fixture
def spy_limiter(monkeypatch: pytest.MonkeyPatch) -> list[SpyLimiter]:
    """Make ``run`` build SpyLimiters; returns the list of those built."""
    SpyLimiter.made = []
    monkeypatch.setattr(app, "Limiter", SpyLimiter)
    return SpyLimiter.made


# -- scheduling ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 5])
async def test_peak_in_flight_is_the_concurrency(emulator, tmp_path, limit):
    """With slow answers, the emulator sees exactly -j submissions at once, never more."""
    srv = await emulator(latency_ms=50, latency_jitter=0)
    result = await run_batch(srv, write_manifest(tmp_path, lake(4 * limit)), concurrency=limit)
    stats = srv.emulator.stats()
    assert result.code == 0
    assert stats["peak_submit_in_flight"] == limit
    assert stats["tasks_created"] == submits(srv) == 4 * limit
    assert set(result.statuses.values()) == {"submitted"}


async def test_rate_spaces_request_starts(emulator, tmp_path, monkeypatch):
    """--rate 120/min lets one request start every 0.5 s (on an injected, frozen clock)."""
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(app, "Limiter", functools.partial(Limiter, clock=lambda: 0.0,
                                                          sleep=record))
    rate = build_parser().parse_args(["run", "m.yaml", "--rate", "120/min"]).rate
    srv = await emulator()
    result = await run_batch(srv, write_manifest(tmp_path, lake(5)), concurrency=4, rate=rate)
    assert result.code == 0
    assert submits(srv) == 5
    # Starts are reserved at 0, 0.5, 1.0, 1.5, 2.0 s: each later one waits for its tick.
    assert sorted(waits) == pytest.approx([0.5, 1.0, 1.5, 2.0])


async def test_429_slows_the_pace_never_the_concurrency(emulator, tmp_path, spy_limiter):
    """Two 429s of requests sent together cut the pace once; concurrency stays; all submitted."""
    srv = await emulator()
    srv.emulator.script_submit(["429", "429"])
    result = await run_batch(srv, write_manifest(tmp_path, lake(4)), concurrency=2)
    (limiter,) = spy_limiter
    assert result.code == 0
    assert set(result.statuses.values()) == {"submitted"}
    assert submits(srv) == 6
    assert srv.emulator.stats()["tasks_created"] == 4
    assert sum(int(row["attempts"]) for row in result.rows.values()) == 6
    assert (limiter.throttles, limiter.cuts, limiter.lowest, limiter.limit) == (2, 1, 2, 2)
    assert limiter.learned is not None


# -- failure classes -----------------------------------------------------------------------


async def test_503_retried_then_error_then_sent_next_run(emulator, tmp_path):
    """503 is retried up to --max-attempts, recorded 'error' (no task), and resent next run."""
    srv = await emulator()
    srv.emulator.script_submit(["503"] * 3)
    manifest = write_manifest(tmp_path, lake(1))
    first = await run_batch(srv, manifest, policy=NO_WAIT.with_attempts(3))
    row = first.rows["job-0"]
    assert (first.code, row["status"], row["attempts"], row["http_status"]) == (1, "error", "3",
                                                                                "503")
    assert (submits(srv), srv.emulator.stats()["tasks_created"]) == (3, 0)

    second = await run_batch(srv, manifest)
    assert (second.code, second.statuses) == (0, {"job-0": "submitted"})
    assert (submits(srv), srv.emulator.stats()["tasks_created"]) == (4, 1)


AMBIGUOUS = ["500", "502", "504", "reset_after_create", "html_200", "slow_after_create"]


@pytest.mark.parametrize("fault", AMBIGUOUS)
async def test_ambiguous_answer_is_unknown_and_not_resent(emulator, tmp_path, fault):
    """A fault after the task exists ends 'unknown' after one try; the task did get created."""
    srv = await emulator(slow_seconds=5.0)
    srv.emulator.script_submit([fault])
    result = await run_batch(srv, write_manifest(tmp_path, lake(2)), concurrency=1, timeout=0.3)
    assert result.code == 1
    assert result.statuses == {"job-0": "unknown", "job-1": "submitted"}
    assert result.rows["job-0"]["attempts"] == "1"
    assert submits(srv) == 2
    assert len(task_of(srv, result.rows["job-0"])) == 1
    assert result.summary["unknown"] == ["job-0"]


@pytest.mark.parametrize("fault", AMBIGUOUS)
async def test_retry_ambiguous_resends_same_key_and_gets_a_replay(emulator, tmp_path, fault):
    """--retry-ambiguous resends with the same key: the emulator replays, one task, recorded."""
    srv = await emulator(slow_seconds=5.0)
    srv.emulator.script_submit([fault])
    result = await run_batch(srv, write_manifest(tmp_path, lake(1)), timeout=0.3,
                             retry_ambiguous=True)
    row = result.rows["job-0"]
    stats = srv.emulator.stats()
    assert (result.code, row["status"], row["attempts"]) == (0, "submitted", "2")
    assert (submits(srv), stats["tasks_created"], stats["replays"]) == (2, 1, 1)
    assert task_of(srv, row) == [row["task_id"]]
    assert "replayed" in row["error"]


@pytest.mark.parametrize(
    ("script", "code"),
    [
        pytest.param(["502", "503", "503"], 1, id="then-refused-until-out-of-tries"),
        pytest.param(["500", "402"], 3, id="then-out-of-balance"),
        pytest.param(["504", "429", "429"], 1, id="then-rate-limited"),
    ],
)
async def test_a_job_that_may_exist_never_ends_as_error(emulator, tmp_path, script, code):
    """After one ambiguous try, a later 'not sent' answer still leaves the job 'unknown'."""
    srv = await emulator(idempotency=False)
    srv.emulator.script_submit(script)
    manifest = write_manifest(tmp_path, lake(1))
    result = await run_batch(srv, manifest, retry_ambiguous=True,
                             policy=replace(NO_WAIT, attempts=3))
    assert result.code == code
    assert result.statuses == {"job-0": "unknown"}
    assert "may have created the task" in result.rows["job-0"]["error"]
    assert srv.emulator.stats()["tasks_created"] == 1
    again = await run_batch(srv, manifest)
    assert again.statuses == {"job-0": "unknown"}
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_a_stop_during_backoff_after_an_ambiguous_try_leaves_unknown(emulator, tmp_path):
    """Ctrl-C while waiting to resend a 504 (--retry-ambiguous) records 'unknown', not 'error'."""
    srv = await emulator()
    srv.emulator.script_submit(["504"])
    stop = asyncio.Event()

    async def interrupted_sleep(_: float) -> None:
        stop.set()

    job = make_job("j", model="sora-2", prompt="a lake", manifest_name="m")
    with open_ledger(tmp_path / "l.csv", mock=False, base_url=srv.base_url) as ledger:
        async with Client(srv.base_url, Secret(KEY)) as client:
            submitter = Submitter(client=client, ledger=ledger, limiter=Limiter(1),
                                  policy=RetryPolicy(attempts=3), stop=stop,
                                  retry_ambiguous=True, sleep=interrupted_sleep)
            await submitter(job)
        assert ledger.latest["j"]["status"] == "unknown"
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_resubmitting_unknown_that_is_refused_stays_unknown(emulator, tmp_path):
    """--resubmit-unknown answered only by 503s keeps the job 'unknown': it may still exist."""
    srv = await emulator(idempotency=False)
    manifest = write_manifest(tmp_path, lake(1))
    srv.emulator.script_submit(["500"])
    assert (await run_batch(srv, manifest)).statuses == {"job-0": "unknown"}
    srv.emulator.script_submit(["503"] * 3)
    again = await run_batch(srv, manifest, resubmit_unknown=True,
                            policy=replace(NO_WAIT, attempts=3))
    assert again.statuses == {"job-0": "unknown"}
    plain = await run_batch(srv, manifest)
    assert plain.statuses == {"job-0": "unknown"}
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_400_is_rejected_not_retried_and_held(emulator, tmp_path, monkeypatch):
    """A 400 ends 'rejected' after one try, other jobs go on, and a rerun does not resend it."""
    original = emulator_contract.problem

    def refuse_marked(body: Any, *args: Any) -> str | None:
        if "REFUSE" in body.get("prompt", ""):
            return "Invalid request parameters: the prompt is not allowed"
        return original(body, *args)

    monkeypatch.setattr(emulator_contract, "problem", refuse_marked)
    srv = await emulator()
    manifest = write_manifest(tmp_path, ["A fine prompt", "REFUSE this one", "Another prompt"])
    first = await run_batch(srv, manifest)
    row = first.rows["job-1"]
    assert first.code == 1
    assert first.statuses == {"job-0": "submitted", "job-1": "rejected", "job-2": "submitted"}
    assert (row["attempts"], row["http_status"]) == ("1", "400")
    assert "prompt is not allowed" in row["error"]
    assert (submits(srv), srv.emulator.stats()["tasks_created"]) == (3, 2)

    second = await run_batch(srv, manifest)
    assert (second.code, submits(srv)) == (1, 3)
    assert second.summary["this_run"] == {"already done": 2, "already rejected": 1}


@pytest.mark.parametrize(
    ("status", "line"),
    [
        pytest.param("401", "APIMart refused the key or permission (401)", id="401-key"),
        pytest.param("402", "APIMart says the balance is insufficient", id="402-balance"),
        pytest.param("403", "APIMart refused the key or permission (403)", id="403-permission"),
    ],
)
async def test_fatal_answer_stops_new_jobs_and_lets_in_flight_finish(
    emulator, tmp_path, status, line
):
    """401/402/403: two slow in-flight jobs still finish and are recorded; nothing new starts."""
    srv = await emulator(slow_seconds=0.2)
    srv.emulator.script_submit(["slow_after_create", "slow_after_create", status])
    result = await run_batch(srv, write_manifest(tmp_path, lake(6)), concurrency=3)
    assert result.code == 3
    assert sorted(result.statuses.values()) == ["error", "submitted", "submitted"]
    fatal = next(row for row in result.rows.values() if row["status"] == "error")
    assert fatal["http_status"] == status
    assert (submits(srv), srv.emulator.stats()["tasks_created"]) == (3, 2)
    assert result.summary["not_started"] == 3
    then = "rerun after topping up" if status == "402" else "fix the key, then rerun"
    errors = [ln for ln in result.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {line}: 1 jobs refused, 3 not submitted; the 2 tasks "
                                "created before it are recorded ('apimart-batch status ")
    assert errors[0].endswith(f"; {then}")


async def never(seconds: float) -> None:
    """A sleep that only a stop (cancellation) ends."""
    await asyncio.Event().wait()


async def test_fatal_answer_cuts_the_rate_wait_short(emulator, tmp_path, monkeypatch):
    """Jobs waiting for their --rate tick when a fatal answer arrives are never sent."""
    monkeypatch.setattr(app, "Limiter", functools.partial(Limiter, clock=lambda: 0.0,
                                                          sleep=never))
    srv = await emulator()
    srv.emulator.script_submit(["403"])
    async with asyncio.timeout(10):
        result = await run_batch(srv, write_manifest(tmp_path, lake(4)), concurrency=3,
                                 rate=0.001)
    assert (result.code, submits(srv)) == (3, 1)
    assert result.statuses == {"job-0": "error"}
    assert result.summary["not_started"] == 3


async def test_fatal_answer_cuts_the_429_pause_short(emulator, tmp_path, monkeypatch):
    """A job paused by a 429 when a fatal answer arrives is not resent: 'error', one attempt."""
    monkeypatch.setattr(app, "Limiter", functools.partial(Limiter, sleep=never))
    srv = await emulator(latency_ms=30, latency_jitter=0, retry_after="1000")
    srv.emulator.script_submit(["429", "403"])
    async with asyncio.timeout(10):
        result = await run_batch(srv, write_manifest(tmp_path, lake(4)), concurrency=2)
    assert (result.code, submits(srv)) == (3, 2)
    assert sorted((row["status"], row["http_status"], row["attempts"])
                  for row in result.rows.values()) == [("error", "403", "1"),
                                                       ("error", "429", "1")]
    assert result.summary["not_started"] == 2


# -- validation, resume, limits ------------------------------------------------------------


async def test_invalid_manifest_sends_nothing(emulator, tmp_path):
    """One bad manifest among good ones: ManifestError (exit 2), no request, no ledger."""
    srv = await emulator()
    good = write_manifest(tmp_path, lake(2), name="good")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\njobs:\n  - id: x\n    prompt: hi\n    model: sora-2\n"
                   "    duration: 5\n", encoding="utf-8")
    config = RunConfig(manifests=(good, str(bad)), api_key=Secret(KEY), base_url=srv.base_url)
    with pytest.raises(ManifestError) as caught:
        await app.run(config, Console(stream=io.StringIO()))
    assert caught.value.exit_code == 2
    assert "duration" in str(caught.value)
    assert srv.emulator.stats()["requests"] == {}
    assert not list(tmp_path.glob("*.csv"))


async def test_rerun_sends_nothing_for_done_jobs(emulator, tmp_path):
    """A second run of a finished batch sends no request and exits 0."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(4))
    first = await run_batch(srv, manifest)
    second = await run_batch(srv, manifest)
    assert (first.code, second.code) == (0, 0)
    assert submits(srv) == 4
    assert second.summary["this_run"] == {"already done": 4}
    assert second.rows == first.rows


async def test_changed_request_is_held_and_named(emulator, tmp_path):
    """A job whose prompt changed after submission is not resent; the run names it, exits 1."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(3))
    await run_batch(srv, manifest)
    write_manifest(tmp_path, [*lake(3)[:1], "A stormy lake instead", *lake(3)[2:]])
    result = await run_batch(srv, manifest)
    assert result.code == 1
    assert submits(srv) == 3
    assert result.summary["changed"] == ["job-1"]
    assert "job 'job-1'" in result.err
    assert "give the job a new id" in result.err
    assert "1 changed (not resubmitted)" in result.out


async def test_unknown_is_held_named_and_resubmitted_with_same_key(emulator, tmp_path):
    """'unknown' is held with the exact resolving command; --resubmit-unknown replays one task."""
    srv = await emulator()
    srv.emulator.script_submit(["502"])
    manifest = write_manifest(tmp_path, lake(2))
    await run_batch(srv, manifest, concurrency=1)
    held = await run_batch(srv, manifest)
    assert (held.code, submits(srv)) == (1, 2)
    assert held.summary["unknown"] == ["job-0"]
    command = shlex.join(["apimart-batch", "run", manifest, "--base-url", srv.base_url,
                          "--resubmit-unknown"])
    assert "1 jobs are 'unknown' (the API may have created and billed them): job-0" in held.err
    assert command in held.err
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.manifests, args.resubmit_unknown) == ([manifest], True)

    resent = await run_batch(srv, manifest, resubmit_unknown=True)
    row = resent.rows["job-0"]
    stats = srv.emulator.stats()
    assert (resent.code, row["status"]) == (0, "submitted")
    assert (submits(srv), stats["tasks_created"], stats["replays"]) == (3, 2, 1)
    assert task_of(srv, row) == [row["task_id"]]


async def test_max_jobs_holds_back_the_rest_without_failing(emulator, tmp_path):
    """--max-jobs 2 sends two new jobs per run, exits 0, and says how many wait."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(5))
    first = await run_batch(srv, manifest, max_jobs=2)
    assert (first.code, submits(srv), first.summary["held_by_max_jobs"]) == (0, 2, 3)
    assert "3 held back by --max-jobs" in first.out
    second = await run_batch(srv, manifest, max_jobs=2)
    assert (second.code, submits(srv)) == (0, 4)
    assert sorted(second.statuses) == ["job-0", "job-1", "job-2", "job-3"]


async def test_budget_refuses_to_start(emulator, tmp_path):
    """A --budget below the first job's estimate sends nothing and exits 0, saying so."""
    srv = await emulator()
    result = await run_batch(srv, write_manifest(tmp_path, lake(3)), budget=JOB_COST - 0.01)
    assert (result.code, submits(srv), result.rows) == (0, 0, {})
    assert result.summary["held_by_budget"] == 3
    assert "refusing to start; 3 jobs held back" in result.err


async def test_budget_stops_before_the_job_that_would_exceed_it(emulator, tmp_path):
    """--budget 1.00 at $0.32 a job sends three jobs, holds two, exits 0, saying so."""
    srv = await emulator()
    result = await run_batch(srv, write_manifest(tmp_path, lake(5)), budget=1.0)
    assert (result.code, submits(srv)) == (0, 3)
    assert sorted(result.statuses) == ["job-0", "job-1", "job-2"]
    assert result.summary["held_by_budget"] == 2
    assert "job 'job-3' would bring the estimated spend to $1.28; stopping before it" in result.err


@pytest.mark.parametrize("cap", [{"budget": 0.7}, {"max_jobs": 2}], ids=["budget", "max-jobs"])
async def test_fail_on_held_makes_a_held_run_exit_1(emulator, tmp_path, cap):
    """Held back by --budget or --max-jobs: exit 0 by default, 1 with --fail-on-held."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(6))
    assert (await run_batch(srv, manifest, **cap)).code == 0
    strict = await run_batch(srv, manifest, fail_on_held=True, **cap)
    assert strict.code == 1 and submits(srv) == 4


async def test_crash_left_submitting_becomes_unknown(emulator, tmp_path):
    """A 'submitting' row left by a crash turns 'unknown' with a warning and is not resent."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(3))
    job = load_manifests([manifest])[0].jobs[1]
    with open_ledger(app.ledger_path(manifest, mock=False), mock=False,
                     base_url=srv.base_url) as ledger:
        ledger.append(job.job_id, status="submitting", attempts=0, **job_fields(job))
    result = await run_batch(srv, manifest)
    assert result.code == 1
    assert result.statuses == {"job-0": "submitted", "job-1": "unknown", "job-2": "submitted"}
    assert submits(srv) == 2
    assert "job 'job-1' was being submitted when an earlier run stopped" in result.err


async def test_torn_submitted_row_leaves_the_job_unknown(emulator, tmp_path):
    """A 'submitted' row cut short by a crash is set aside; its job is held as 'unknown'."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(2))
    first = await run_batch(srv, manifest, concurrency=1)
    ledger = Path(app.ledger_path(manifest, mock=False))
    task = first.rows["job-1"]["task_id"]
    data = ledger.read_bytes()
    # Cut the last row (job-1 'submitted') just after its task id, as a crash mid-write would.
    ledger.write_bytes(data[: data.rindex(task.encode()) + len(task) + 1])
    second = await run_batch(srv, manifest)
    assert second.code == 1
    assert second.statuses == {"job-0": "submitted", "job-1": "unknown"}
    assert submits(srv) == 2
    assert "removed a last row cut short by a crash" in second.err
    assert task in ledger.with_name(ledger.name + ".torn").read_text()


async def test_ledger_write_failure_is_a_plain_ledger_error(emulator, tmp_path, monkeypatch):
    """A row that cannot be written (disk full) ends the run with LedgerError, not a group."""
    real_append = Ledger.append
    calls = 0

    def append(self: Ledger, job_id: str, **changes: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            msg = f"{self.path}: cannot append a row (No space left on device)"
            raise LedgerError(msg)
        real_append(self, job_id, **changes)

    monkeypatch.setattr(Ledger, "append", append)
    srv = await emulator()
    with pytest.raises(LedgerError, match="No space left on device"):
        await run_batch(srv, write_manifest(tmp_path, lake(4)), concurrency=1)
    assert submits(srv) == 1


async def test_unrecordable_task_id_is_named_in_the_error(emulator, tmp_path, monkeypatch):
    """If 'submitted' rows cannot be written, in-flight requests finish and each task is named."""
    real_append = Ledger.append

    def append(self: Ledger, job_id: str, **changes: object) -> None:
        if changes.get("status") == "submitted":
            msg = f"{self.path}: cannot append a row (No space left on device)"
            raise LedgerError(msg)
        real_append(self, job_id, **changes)

    monkeypatch.setattr(Ledger, "append", append)
    srv = await emulator(latency_ms=50, latency_jitter=0)
    with pytest.raises(LedgerError) as caught:
        await run_batch(srv, write_manifest(tmp_path, lake(4)), concurrency=2)
    tasks = list(srv.emulator.stats()["idempotency_key_by_task"])
    assert len(tasks) == 2  # both were in flight; the failure started nothing new
    for task in tasks:
        assert str(caught.value).count(f"WAS created as task {task}") == 1


async def test_locked_ledger_exits_75_before_sending(emulator, tmp_path):
    """While another holder has the ledger locked, a run fails at once naming that pid."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, lake(2))
    path = app.ledger_path(manifest, mock=False)
    with open_ledger(path, mock=False, base_url=srv.base_url), pytest.raises(
        LedgerLockedError
    ) as caught:
        await run_batch(srv, manifest)
    assert caught.value.exit_code == 75
    assert f"ledger is in use by pid {os.getpid()}" in str(caught.value)
    assert srv.emulator.stats()["requests"] == {}


# -- ledger content and output -------------------------------------------------------------

HOSTILE = [
    'commas, "quotes", and more, "',
    "two\nlines\r\nand a CR",
    "폭포가 흘러내려 무지개를 형성하다",
    "emoji 🎬🌊👩‍🚀 in a prompt",
    "=cmd|' /C calc'!A0",
    "+1",
    "-1",
    "@x",
    "'already quoted",
    "tab\tinside",
]


async def test_hostile_prompts_round_trip_through_a_run(emulator, tmp_path):
    """Every prompt comes back from the ledger as written, inert to spreadsheets; rerun is idle."""
    srv = await emulator()
    manifest = write_manifest(tmp_path, HOSTILE)
    first = await run_batch(srv, manifest)
    assert first.code == 0
    assert {job: row["prompt"] for job, row in first.rows.items()} == {
        f"job-{i}": prompt for i, prompt in enumerate(HOSTILE)
    }
    with open(app.ledger_path(manifest, mock=False), newline="", encoding="utf-8") as file:
        cells = [cell for row in csv.reader(file) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    second = await run_batch(srv, manifest)
    assert (second.code, submits(srv)) == (0, len(HOSTILE))


async def test_api_key_never_written_or_printed(emulator, tmp_path):
    """The key appears in no output, summary, ledger or other file, even on failures."""
    srv = await emulator()
    srv.emulator.script_submit(["503", "500", "ok", "401"])
    result = await run_batch(srv, write_manifest(tmp_path, lake(5)), concurrency=1,
                             policy=NO_WAIT.with_attempts(1))
    assert result.code == 3
    assert {"error", "unknown", "submitted"} <= set(result.statuses.values())
    assert KEY not in result.out + result.err
    for path in tmp_path.iterdir():
        assert KEY not in path.name
        assert KEY.encode() not in path.read_bytes(), path


async def test_json_log_lines_and_quiet(emulator, tmp_path):
    """--log-format json prints only JSON lines (progress included); -q prints only problems."""
    srv = await emulator()
    srv.emulator.script_submit(["500"])
    manifest = write_manifest(tmp_path, lake(3))
    stream = io.StringIO()
    loud = await run_batch(srv, manifest, concurrency=1,
                           console=Console(json_lines=True, stream=stream, interval=0))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["done"] for line in lines if line["msg"] == "progress"] == [1, 2, 3]
    assert [line["level"] for line in lines if line["msg"] != "progress"] == ["warning"]
    assert loud.out.startswith("3 jobs: 2 submitted, 1 unknown in ")

    quiet_stream = io.StringIO()
    quiet = await run_batch(srv, manifest, console=Console(quiet=True, stream=quiet_stream))
    assert quiet.out == ""
    assert quiet_stream.getvalue().startswith("warning: 1 jobs are 'unknown'")


def test_the_submit_phase_collects_the_young_generation_less_often_then_restores_it():
    """fewer_collections raises only the first threshold, restores all three, and keeps a
    collector switched off (threshold 0) off."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        with fewer_collections():
            assert gc.get_threshold() == (BUSY_GC_THRESHOLD, 11, 12)
        assert gc.get_threshold() == (700, 11, 12)
        gc.set_threshold(0, 11, 12)
        with fewer_collections():
            assert gc.get_threshold() == (0, 11, 12)
    finally:
        gc.set_threshold(*before)
