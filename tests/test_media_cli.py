"""``status``, ``download`` and ``report`` as a user runs them: subprocesses against the emulator.

Covers what only a real process shows: exit codes (0, 1, 2, 75, 143), stdout and stderr, and
``run --mock --wait`` producing real files from one command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from clihelpers import (
    KEY,
    REPO,
    assert_key_nowhere,
    cli,
    statuses,
    write_manifest,
)

from runner.emulator.contract import video_bytes
from runner.ledger.store import open_ledger, read_latest

pytestmark = pytest.mark.slow



def assert_videos(folder: Path, ledger: Path) -> None:
    """Every job of the ledger is downloaded into ``folder``, byte for byte."""
    rows = read_latest(ledger)
    stems = {Path(row["manifest"]).stem for row in rows.values()}
    assert {p.name for p in folder.iterdir()} == stems
    for job, row in rows.items():
        assert row["status"] == "downloaded"
        path = folder / Path(row["manifest"]).stem / f"{job}.mp4"
        assert path.read_bytes() == video_bytes(row["task_id"])


def test_status_download_report_exit_0_and_reruns_are_no_ops(mock_server, tmp_path):
    """run, status, download and report each exit 0; status and download again change nothing."""
    server = mock_server("--task-seconds", "0")
    manifest = write_manifest(tmp_path, 3)
    ledger = tmp_path / "batch.ledger.csv"
    assert cli(tmp_path, "run", manifest, "--base-url", server.url).returncode == 0
    polled = cli(tmp_path, "status", ledger.name, "--base-url", server.url)
    assert (polled.returncode, polled.stderr) == (0, "")
    assert polled.stdout.startswith("batch.ledger.csv: 3 completed")
    # Video links are signed URLs: downloading needs no API key.
    fetched = cli(tmp_path, "download", ledger.name, "--base-url", server.url, "--out", "v",
                  key=False)
    assert (fetched.returncode, fetched.stderr) == (0, "")
    assert "3 downloaded" in fetched.stdout
    assert_videos(tmp_path / "v", ledger)
    requests = server.api_requests()
    rows = ledger.read_bytes()
    for command, extra in (("status", []), ("download", ["--out", "v"])):
        again = cli(tmp_path, command, ledger.name, "--base-url", server.url, *extra)
        assert again.returncode == 0, again.stderr
    assert server.api_requests() == requests
    assert ledger.read_bytes() == rows
    shown = cli(tmp_path, "report", ledger.name)
    assert shown.returncode == 0
    assert "3 jobs: 3 downloaded" in shown.stdout
    assert "next:" not in shown.stdout
    doc = json.loads(cli(tmp_path, "report", ledger.name, "--format", "json").stdout)
    assert (doc["totals"], doc["next"]) == ({"downloaded": 3}, [])
    assert_key_nowhere(tmp_path)


def test_failed_tasks_exit_1_and_report_says_what_to_do(mock_server, tmp_path):
    """status --wait exits 1 when tasks failed; report names the failure and the next step."""
    server = mock_server("--task-seconds", "0", "--fail-rate", "1")
    manifest = write_manifest(tmp_path, 2)
    assert cli(tmp_path, "run", manifest, "--base-url", server.url).returncode == 0
    polled = cli(tmp_path, "status", "batch.ledger.csv", "--wait", "--base-url", server.url)
    assert polled.returncode == 1
    assert statuses(tmp_path / "batch.ledger.csv") == {"failed": 2}
    shown = cli(tmp_path, "report", "batch.ledger.csv")
    assert shown.returncode == 0
    assert "next: 2 failed, cancelled or expired (no video" in shown.stdout
    assert "--retry-failed" in shown.stdout


def test_status_wait_ends_at_the_deadline_and_on_sigterm(mock_server, spawn, tmp_path):
    """--deadline ends --wait with exit 1; a SIGTERM ends it at once with exit 143."""
    server = mock_server("--task-seconds", "3600")
    manifest = write_manifest(tmp_path, 2)
    ledger = tmp_path / "batch.ledger.csv"
    assert cli(tmp_path, "run", manifest, "--base-url", server.url).returncode == 0
    timed = cli(tmp_path, "status", ledger.name, "--wait", "--deadline", "0.5",
                "--base-url", server.url)
    assert timed.returncode == 1
    # A loaded machine may reach the deadline before the first poll: still running either way.
    assert statuses(ledger)["submitted"] + statuses(ledger)["pending"] == 2
    polls = server.api_requests()["poll"]
    waiting = spawn("status", ledger.name, "--wait", "--interval", "600", "--base-url",
                    server.url)
    # Its first polls come after its signal handlers (the rows are already 'pending').
    deadline = time.monotonic() + 15
    while server.api_requests()["poll"] < polls + 2:
        assert waiting.poll() is None, waiting.communicate()
        assert time.monotonic() < deadline, "status --wait never polled"
        time.sleep(0.01)
    waiting.send_signal(signal.SIGTERM)
    # Only a hang guard: tasks take an hour, so without the stop it would poll on and on.
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 143, err
    assert "Traceback" not in err


def not_ours(folder: Path) -> str:
    """A CSV file that is not a ledger."""
    (folder / "sales.csv").write_text("region,total\nnorth,3\n")
    return "sales.csv"


@pytest.mark.parametrize("command", ["status", "download", "report"])
@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda folder: "none.ledger.csv", "none.ledger.csv:", id="missing"),
        pytest.param(not_ours, "not an apimart-batch ledger", id="not-ours"),
    ],
)
def test_bad_ledger_exits_2_with_a_clear_message(tmp_path, command, make, message):
    """A missing or foreign ledger: one message on stderr naming the file, exit 2."""
    ledger = make(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    done = cli(tmp_path, command, ledger, *([] if command == "report" else
                                            ["--base-url", "http://127.0.0.1:9"]))
    assert done.returncode == 2
    assert done.stderr.startswith("apimart-batch: ")
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("command", ["status", "download"])
def test_ledger_held_by_another_process_exits_75(mock_server, tmp_path, command):
    """status/download on a ledger another process holds: exit 75 naming it, nothing sent."""
    server = mock_server("--task-seconds", "0")
    manifest = write_manifest(tmp_path, 1)
    assert cli(tmp_path, "run", manifest, "--base-url", server.url).returncode == 0
    assert cli(tmp_path, "status", "batch.ledger.csv", "--base-url", server.url).returncode == 0
    requests = server.api_requests()
    with open_ledger(tmp_path / "batch.ledger.csv", mock=False, base_url=server.url):
        done = cli(tmp_path, command, "batch.ledger.csv", "--base-url", server.url)
    assert done.returncode == 75
    assert f"in use by pid {os.getpid()}" in done.stderr
    assert server.api_requests() == requests
    assert statuses(tmp_path / "batch.ledger.csv") == {"completed": 1}


def test_mock_run_wait_end_to_end_produces_the_videos(tmp_path):
    """run --mock --wait on the example: five real files, then status/download/report agree."""
    shutil.copy(REPO / "jobs" / "example.yaml", tmp_path / "example.yaml")
    done = cli(tmp_path, "run", "example.yaml", "--mock", "--wait", key=False)
    assert done.returncode == 0, done.stderr
    ledger = tmp_path / "example.mock.ledger.csv"
    assert_videos(tmp_path / "videos", ledger)
    page = tmp_path / "videos" / "example" / "report.mock.html"
    assert done.stdout.splitlines()[-1] == "review page: videos/example/report.mock.html"
    assert page.is_file() and page.read_text(encoding="utf-8").count("<article") == 5
    page.unlink()
    for command in ("status", "download"):
        again = cli(tmp_path, command, ledger.name, "--no-html" if command == "download" else "-q",
                    key=False)
        assert again.returncode == 0, again.stderr
        assert not page.exists() and "review page" not in again.stdout
        again = cli(tmp_path, command, ledger.name, key=False)
        assert again.returncode == 0, again.stderr
        assert "example.mock.ledger.csv: 5 downloaded" in again.stdout
    assert "review page: videos/example/report.mock.html" in again.stdout and page.is_file()
    shown = cli(tmp_path, "report", ledger.name, key=False)
    assert "5 jobs: 5 downloaded" in shown.stdout
    assert KEY not in done.stdout + done.stderr
