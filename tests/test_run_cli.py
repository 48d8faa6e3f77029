"""``apimart-batch run`` as a user runs it: a subprocess against ``apimart-batch mock-server``.

Covers what only a real process shows: exit codes, stdout/stderr, signals, the --mock
target, and the crash loop (SIGKILL at random points, then rerun: nothing paid twice).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from clihelpers import (
    KEY,
    REPO,
    assert_key_nowhere,
    cli,
    statuses,
    wait_for_rows,
    write_manifest,
)

from runner.ledger.store import open_ledger, read_latest

pytestmark = pytest.mark.slow

def test_exit_0_then_rerun_sends_nothing(mock_server, tmp_path):
    """A clean run exits 0 with a stdout summary, no stderr, the ledger beside the manifest."""
    server = mock_server()
    manifest = write_manifest(tmp_path, 3)
    first = cli(tmp_path, "run", manifest, "--base-url", server.url, "--summary-json", "s.json")
    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.startswith("3 jobs: 3 submitted in ")
    assert json.loads((tmp_path / "s.json").read_text())["exit_code"] == 0
    assert statuses(tmp_path / "batch.ledger.csv") == {"submitted": 3}

    again = cli(tmp_path, "run", manifest, "--base-url", server.url)
    assert again.returncode == 0
    assert again.stdout.startswith("3 jobs: 3 already done in ")
    assert server.submits() == 3
    assert_key_nowhere(tmp_path)


def test_quiet_success_prints_nothing(mock_server, tmp_path):
    """-q on a clean run prints nothing at all, on either stream."""
    server = mock_server()
    done = cli(tmp_path, "run", write_manifest(tmp_path, 2), "--base-url", server.url, "-q")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert server.submits() == 2


def test_exit_1_unknown_with_json_logs_and_summary(mock_server, tmp_path):
    """Ambiguous answers: exit 1, JSON stderr lines naming each job and the resolving command."""
    server = mock_server("--p-500", "1")
    manifest = write_manifest(tmp_path, 2)
    done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--log-format", "json",
               "--summary-json", "s.json")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    (warning,) = [line for line in lines if line["level"] == "warning"]
    assert "job-0, job-1" in warning["msg"]
    assert f"apimart-batch run {manifest} --base-url {server.url} --resubmit-unknown" in (
        warning["msg"])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["exit_code"], summary["unknown"]) == (1, ["job-0", "job-1"])
    assert server.stats()["tasks_created"] == 2
    assert_key_nowhere(tmp_path)


def test_exit_2_invalid_manifest_sends_nothing(mock_server, tmp_path):
    """An invalid manifest exits 2, says nothing was sent (as JSON too), and nothing was sent."""
    server = mock_server()
    (tmp_path / "bad.yaml").write_text("version: 1\njobs:\n  - prompt: hi\n    model: sora-3\n",
                                       encoding="utf-8")
    args = ["run", write_manifest(tmp_path, 2), "bad.yaml", "--base-url", server.url]
    done = cli(tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.startswith("bad.yaml:4:")
    assert done.stderr.endswith("1 problem found; nothing was sent\n")

    logged = cli(tmp_path, *args, "--log-format", "json")
    lines = [json.loads(line) for line in logged.stderr.splitlines()]
    assert logged.returncode == 2
    assert (lines[0]["file"], lines[0]["line"]) == ("bad.yaml", 4)
    assert lines[-1] == {"level": "error", "msg": "1 problem found; nothing was sent"}
    assert server.api_requests() == {}
    assert not list(tmp_path.glob("*.csv"))


def test_exit_2_without_a_key(mock_server, tmp_path):
    """A real run with no API key exits 2 with a hint, before touching ledger or network."""
    server = mock_server()
    done = cli(tmp_path, "run", write_manifest(tmp_path, 1), "--base-url", server.url, key=False)
    assert done.returncode == 2
    assert "no API key: set APIMART_API_KEY" in done.stderr
    assert "hint: add --mock" in done.stderr
    assert server.api_requests() == {}


def test_exit_3_on_insufficient_balance(mock_server, tmp_path):
    """A 402 once the quota is used: exit 3, one clear error line, the rest not sent."""
    server = mock_server("--quota", "2")
    done = cli(tmp_path, "run", write_manifest(tmp_path, 5), "-j", "1", "--base-url", server.url)
    assert done.returncode == 3
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "is error: " in done.stderr  # the refused job is named, with the API's words
    assert line.startswith("error: APIMart says the balance is insufficient: 1 jobs refused, "
                           "2 not submitted; the 2 tasks created before it are recorded")
    assert line.endswith("; rerun after topping up")
    assert statuses(tmp_path / "batch.ledger.csv") == {"submitted": 2, "error": 1}
    assert server.submits() == 3


def test_exit_75_when_the_ledger_is_locked(mock_server, tmp_path):
    """A second run on a held ledger exits 75 at once, naming the holder's pid."""
    server = mock_server()
    manifest = write_manifest(tmp_path, 2)
    with open_ledger(tmp_path / "batch.ledger.csv", mock=False, base_url=server.url):
        done = cli(tmp_path, "run", manifest, "--base-url", server.url)
    assert done.returncode == 75
    assert f"batch.ledger.csv: ledger is in use by pid {os.getpid()}" in done.stderr
    assert server.api_requests() == {}


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGINT, 130, id="SIGINT-130"),
     pytest.param(signal.SIGTERM, 143, id="SIGTERM-143")],
)
def test_signal_lets_in_flight_finish_and_records_them(mock_server, spawn, tmp_path, signum,
                                                       code):
    """A signal mid-run: nothing new starts, in-flight jobs finish and are recorded; 130/143."""
    server = mock_server("--latency-ms", "300", "--latency-jitter", "0")
    ledger = tmp_path / "batch.ledger.csv"
    run = spawn("run", write_manifest(tmp_path, 30), "-j", "3", "--base-url", server.url)
    wait_for_rows(ledger, "submitting", 3, run)
    run.send_signal(signum)
    out, err = run.communicate(timeout=15)
    states = statuses(ledger)
    assert run.returncode == code
    assert "submitting" not in states
    assert 3 <= states["submitted"] < 30
    assert states["submitted"] == server.stats()["tasks_created"] == server.submits()
    assert f"interrupted: {30 - states['submitted']} jobs not submitted" in err
    assert KEY not in out + err


def wait_until_delivered(process: subprocess.Popen[str], signum: int) -> None:
    """Poll /proc until ``signum`` is no longer pending for ``process``: its handler has it."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if not (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & bit:
            return
        time.sleep(0.01)
    pytest.fail(f"signal {signum} never reached pid {process.pid}")


def test_second_sigint_aborts_at_once(mock_server, spawn, tmp_path):
    """Ctrl-C twice: the run stops without waiting for answers; cut-off jobs become 'unknown'."""
    # Answers take 30 s: 'unknown' rows, not 'submitted' ones, prove the requests were cut off.
    server = mock_server("--latency-ms", "30000", "--latency-jitter", "0")
    ledger = tmp_path / "batch.ledger.csv"
    manifest = write_manifest(tmp_path, 10)
    run = spawn("run", manifest, "-j", "2", "--base-url", server.url, "--no-balance-check")
    wait_for_rows(ledger, "submitting", 2, run)
    run.send_signal(signal.SIGINT)
    wait_until_delivered(run, signal.SIGINT)  # else the kernel may merge the two into one
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=20)  # a hang guard, shorter than the answers
    assert run.returncode == 130
    assert "Traceback" not in err
    assert statuses(ledger) == {"unknown": 2}
    assert "--resubmit-unknown" in err
    assert KEY not in out + err


def test_mock_run_end_to_end_and_ledger_modes_do_not_mix(mock_server, tmp_path):
    """--mock needs no key, writes <stem>.mock.ledger.csv; mock and real ledgers never mix."""
    shutil.copy(REPO / "jobs" / "example.yaml", tmp_path / "example.yaml")
    mocked = cli(tmp_path, "run", "example.yaml", "--mock", key=False)
    assert mocked.returncode == 0, mocked.stderr
    assert statuses(tmp_path / "example.mock.ledger.csv") == {"submitted": 5}
    assert not (tmp_path / "example.ledger.csv").exists()

    server = mock_server()
    real_on_mock = cli(tmp_path, "run", "example.yaml", "--ledger", "example.mock.ledger.csv",
                       "--base-url", server.url)
    assert real_on_mock.returncode == 2
    assert "written by --mock runs" in real_on_mock.stderr
    assert cli(tmp_path, "run", "example.yaml", "--base-url", server.url).returncode == 0
    mock_on_real = cli(tmp_path, "run", "example.yaml", "--mock", "--ledger",
                       "example.ledger.csv", key=False)
    assert mock_on_real.returncode == 2
    assert "written by real runs" in mock_on_real.stderr
    assert server.submits() == 5
    assert_key_nowhere(tmp_path)


# -- crash loop ----------------------------------------------------------------------------

JOBS = 80
KILLS = 6


@pytest.mark.parametrize(
    ("server_flags", "finish"),
    [
        pytest.param(["--no-idempotency"], [], id="server-ignores-keys"),
        pytest.param([], ["--resubmit-unknown"], id="server-honours-keys-then-resubmit"),
    ],
)
def test_crash_loop_never_pays_twice(mock_server, spawn, tmp_path, server_flags, finish):
    """SIGKILL runs at random points, rerun to the end: no job has two tasks, every task is known.

    Against a server that ignores Idempotency-Key, any resend of a job that may exist would
    create a second task; against one that honours it, --resubmit-unknown recovers them all.
    """
    server = mock_server("--latency-ms", "40", "--p-500", "0.03", "--p-503", "0.05",
                         "--seed", "11", *server_flags)
    manifest = write_manifest(tmp_path, JOBS)
    ledger = tmp_path / "batch.ledger.csv"
    rng = random.Random(2024)
    run_args = ["run", manifest, "-j", "4", "--max-attempts", "1", "--base-url", server.url]
    killed = 0
    for _ in range(KILLS):
        before = ledger.stat().st_size if ledger.exists() else 0
        run = spawn(*run_args)
        deadline = time.monotonic() + 15
        while run.poll() is None and time.monotonic() < deadline:
            if ledger.exists() and ledger.stat().st_size > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        if run.poll() is None:
            run.kill()
            killed += 1
        run.communicate(timeout=10)
    # 503s end 'error' (known not created), which the next run sends again; with
    # --resubmit-unknown, so do 'unknown' jobs (a resend may meet another 500).
    again = {"error", "unknown"} if finish else {"error"}
    for _ in range(5):
        final = cli(tmp_path, *run_args, *finish)
        assert final.returncode in (0, 1), final.stderr
        if not again & set(statuses(ledger)):
            break

    stats = server.stats()
    rows = read_latest(ledger)
    by_key = {row["idempotency_key"]: row for row in rows.values()}
    states = Counter(row["status"] for row in rows.values())
    assert killed >= KILLS // 2
    assert len(rows) == JOBS
    assert set(states) <= {"submitted", "unknown"}
    assert stats["max_tasks_per_body"] == 1
    assert stats["max_tasks_per_idempotency_key"] <= 1
    for task, key in stats["idempotency_key_by_task"].items():
        row = by_key[key]
        assert row["status"] == "unknown" or row["task_id"] == task, (task, row)
    recorded = {row["task_id"] for row in rows.values() if row["task_id"]}
    assert recorded <= set(stats["idempotency_key_by_task"])
    if finish:
        assert states == {"submitted": JOBS}
        assert stats["tasks_created"] == JOBS
    print(f"crash loop {server_flags or finish}: {killed} kills, {stats['tasks_created']} tasks, "
          f"{states['unknown']} unknown, {stats['replays']} replays")
