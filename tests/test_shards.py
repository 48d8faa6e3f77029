"""Deterministic shards (issue 14): ``--shard I/N``, per-shard ledgers, changing N, merged views.

The end-to-end tests run ``apimart-batch`` processes against ``mock-server
--no-idempotency``, so any second submission of a job creates a second task, which the
emulator's counters show.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from clihelpers import BIN, REPO, cli, write_manifest

from runner.engine import rerun_command
from runner.ledger import expand_ledgers, family, ledger_path, open_ledger, read_latest
from runner.shard import Shard, ledger_shard, parse_shard, shard_index

JOBS = 24
IDS = [f"job-{i}" for i in range(JOBS)]


def shard_ids(index: int, count: int, ids: list[str] = IDS) -> set[str]:
    """The ids of ``ids`` that shard ``index`` of ``count`` takes."""
    return {job_id for job_id in ids if Shard(index, count).holds(job_id)}


def created_once(server) -> dict[str, int]:
    """The emulator's creation counters; asserts that no request body made two tasks."""
    stats = server.stats()
    assert stats["max_tasks_per_body"] <= 1, stats
    return stats


# -- the hash and the partition -----------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_shards_partition_the_jobs_exactly(count: int) -> None:
    """Every job id is in exactly one of the N shards, and the hash is sha256's first 8 bytes."""
    ids = [f"job-{i}" for i in range(500)] + ["ünïcode-ジョブ", "", "a" * 300]
    owners = {job_id: [i for i in range(count) if Shard(i, count).holds(job_id)] for job_id in ids}
    assert all(len(found) == 1 for found in owners.values())
    for job_id, (index,) in owners.items():
        digest = hashlib.sha256(job_id.encode("utf-8")).digest()
        assert index == int.from_bytes(digest[:8], "big") % count
    sizes = Counter(found[0] for found in owners.values())
    assert sum(sizes.values()) == len(ids)
    assert len(sizes) == count  # 503 ids leave no shard of 16 empty


def test_the_assignment_is_pinned() -> None:
    """Known ids keep their shards across versions (a change here would reshuffle ledgers)."""
    assert [shard_index(f"job-{i}", 4) for i in range(8)] == [0, 2, 1, 3, 3, 0, 3, 2]
    assert shard_index("job-0", 1) == 0


@pytest.mark.parametrize("seed", ["0", "1", "4242"])
def test_same_assignment_in_other_processes_and_hash_seeds(tmp_path: Path, seed: str) -> None:
    """Two processes with different PYTHONHASHSEED, and plan --json, give the same shards."""
    code = ("import json; from runner.shard import shard_index; "
            "print(json.dumps([shard_index(f'job-{i}', 5) for i in range(200)]))")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True)
    assert json.loads(child.stdout) == [shard_index(f"job-{i}", 5) for i in range(200)]
    manifest = write_manifest(tmp_path, JOBS)
    plan = subprocess.run([BIN, "plan", manifest, "--shard", "2/5", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=True)
    assert {job["job_id"] for job in json.loads(plan.stdout)["jobs"]} == shard_ids(2, 5)


# -- the flag ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [pytest.param("0/4", {}, Shard(0, 4), id="first"),
     pytest.param(" 3 / 4 ", {}, Shard(3, 4), id="spaces"),
     pytest.param("0/1", {}, Shard(0, 1), id="one-shard"),
     pytest.param("auto/3", {"JOB_COMPLETION_INDEX": "2"}, Shard(2, 3), id="auto")],
)
def test_shard_values_that_parse(text: str, environ: dict[str, str], expected: Shard) -> None:
    """I/N and auto/N (index from JOB_COMPLETION_INDEX) give the shard."""
    assert parse_shard(text, environ) == expected


@pytest.mark.parametrize(
    ("value", "environ", "message"),
    [pytest.param("3/3", {}, "the shard index must be from 0 to 2 for N=3, got 3", id="I=N"),
     pytest.param("-1/3", {}, "the shard index must be from 0 to 2 for N=3, got -1", id="neg"),
     pytest.param("x/3", {}, "must be I/N (0 <= I < N, e.g. 0/4) or auto/N, got 'x/3'", id="x"),
     pytest.param("2", {}, "must be I/N", id="no-slash"),
     pytest.param("0/0", {}, "the shard count N must be at least 1", id="N=0"),
     pytest.param("0/100001", {}, "the shard count N must be at most 100000", id="N-big"),
     pytest.param("0/" + "9" * 5000, {}, "the shard count N must be at most 100000",
                  id="N-huge"),
     pytest.param("1" * 5000 + "/3", {}, "the shard index must be from 0 to 2 for N=3",
                  id="I-huge"),
     pytest.param("auto/3", {}, "takes the index from JOB_COMPLETION_INDEX, which is not set",
                  id="auto-unset"),
     pytest.param("auto/3", {"JOB_COMPLETION_INDEX": "3"}, "got 3 (JOB_COMPLETION_INDEX=3)",
                  id="auto-out-of-range"),
     pytest.param("auto/3", {"JOB_COMPLETION_INDEX": "one"},
                  "JOB_COMPLETION_INDEX must be a whole number, got 'one'", id="auto-junk")],
)
@pytest.mark.parametrize("command", ["run", "plan", "status", "download"])
def test_a_malformed_shard_is_a_usage_error(tmp_path: Path, value: str, environ: dict[str, str],
                                            message: str, command: str) -> None:
    """Each command refuses a bad --shard with exit 2 and the rule, before doing anything."""
    target = write_manifest(tmp_path, 2) if command in ("run", "plan") else "x.ledger.csv"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("APIMART_") and k != "JOB_COMPLETION_INDEX"} | environ
    done = subprocess.run([BIN, command, target, f"--shard={value}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"apimart-batch {command}: error: argument --shard: ")
    assert message in error
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["batch.yaml"] if command in ("run", "plan") else [])


def test_help_names_the_shard_flag() -> None:
    """run --help documents --shard and auto/N."""
    done = subprocess.run([BIN, "run", "--help"], capture_output=True, text=True, check=True)
    assert "--shard I/N" in done.stdout
    assert "JOB_COMPLETION_INDEX" in done.stdout


# -- ledger names --------------------------------------------------------------------------


def test_shard_ledger_names() -> None:
    """The shard's tag goes before .ledger.csv, beside the manifest or in --ledger's name."""
    assert ledger_path("d/m.yaml", mock=False, shard=Shard(1, 4)) == "d/m.shard-1-of-4.ledger.csv"
    assert ledger_path("d/m.yaml", mock=True, shard=Shard(0, 2)) == \
        "d/m.mock.shard-0-of-2.ledger.csv"
    assert ledger_path("m.yaml", mock=False, override="/l/b.ledger.csv", shard=Shard(2, 3)) == \
        "/l/b.shard-2-of-3.ledger.csv"
    assert ledger_path("m.yaml", mock=False, override="l.csv", shard=Shard(0, 2)) == \
        "l.shard-0-of-2.csv"
    assert ledger_path("m.yaml", mock=False, override="m.shard-0-of-4.ledger.csv",
                       shard=Shard(1, 3)) == "m.shard-1-of-3.ledger.csv"
    assert ledger_path("d/m.yaml", mock=False) == "d/m.ledger.csv"
    assert ledger_shard("d/m.shard-1-of-4.ledger.csv") == Shard(1, 4)
    assert ledger_shard("d/m.ledger.csv") is None


def test_a_family_is_the_unsharded_ledger_and_its_shards_only(tmp_path: Path) -> None:
    """m.ledger.csv and m.shard-*-of-* are one family; mock, locks and other stems are not."""
    names = ["m.ledger.csv", "m.shard-0-of-2.ledger.csv", "m.shard-1-of-3.ledger.csv",
             "m.mock.ledger.csv", "m.mock.shard-0-of-2.ledger.csv", "mm.shard-0-of-2.ledger.csv",
             "m.shard-0-of-2.ledger.csv.lock", "m.shard-x-of-2.ledger.csv"]
    for name in names:
        (tmp_path / name).write_text("")
    expected = [str(tmp_path / n) for n in names[:3]]
    assert sorted(family(str(tmp_path / "m.shard-1-of-3.ledger.csv"))) == sorted(expected)
    assert sorted(family(str(tmp_path / "m.ledger.csv"))) == sorted(expected)
    mock = family(str(tmp_path / "m.mock.ledger.csv"))
    assert sorted(mock) == sorted(str(tmp_path / n) for n in names[3:5])


def test_globs_expand_to_ledgers_only(tmp_path: Path) -> None:
    """A quoted glob matches the ledgers, not their lock files; matching nothing is an error."""
    from runner.errors import LedgerError

    for name in ["m.shard-0-of-2.ledger.csv", "m.shard-1-of-2.ledger.csv",
                 "m.shard-0-of-2.ledger.csv.lock", "m.shard-1-of-2.ledger.csv.torn"]:
        (tmp_path / name).write_text("")
    found = expand_ledgers([str(tmp_path / "m.shard-*"),
                            str(tmp_path / "m.shard-0-of-2.ledger.csv")])
    assert found == [str(tmp_path / "m.shard-0-of-2.ledger.csv"),
                     str(tmp_path / "m.shard-1-of-2.ledger.csv")]
    with pytest.raises(LedgerError, match="no ledger matches"):
        expand_ledgers([str(tmp_path / "nothing-*.csv")])
    other_name = os.path.join(str(tmp_path), ".", "m.shard-1-of-2.ledger.csv")
    assert expand_ledgers([found[1], other_name]) == [found[1]]  # one file, read once


# -- runs ----------------------------------------------------------------------------------


def test_each_shard_writes_its_own_ledger_with_its_jobs(mock_server, tmp_path: Path) -> None:
    """run --shard I/3 sends exactly shard I's jobs and records them in its own ledger."""
    server = mock_server("--no-idempotency")
    manifest = write_manifest(tmp_path, JOBS)
    for index in range(3):
        done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", f"{index}/3")
        assert done.returncode == 0, done.stderr
        ledger = tmp_path / f"batch.shard-{index}-of-3.ledger.csv"
        assert set(read_latest(ledger)) == shard_ids(index, 3)
        assert f"{len(shard_ids(index, 3))} jobs: {len(shard_ids(index, 3))} submitted" in \
            done.stdout
    assert created_once(server)["tasks_created"] == JOBS
    assert not (tmp_path / "batch.ledger.csv").exists()


def test_an_empty_shard_is_a_clean_no_op(mock_server, tmp_path: Path) -> None:
    """N larger than the jobs: a shard with no job exits 0 and sends nothing."""
    server = mock_server()
    manifest = write_manifest(tmp_path, 2)
    empty = next(i for i in range(40) if not shard_ids(i, 40, IDS[:2]))
    done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", f"{empty}/40")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("0 jobs: nothing to do")
    assert server.api_requests() == {}
    plan = cli(tmp_path, "plan", manifest, "--shard", f"{empty}/40", "--json")
    assert (plan.returncode, json.loads(plan.stdout)["jobs"]) == (0, [])


def test_status_and_download_of_an_empty_shard_exit_0(tmp_path: Path) -> None:
    """status and download --shard I/N selecting no job of the ledger: exit 0, 'no jobs'."""
    manifest = write_manifest(tmp_path, 2)
    assert cli(tmp_path, "run", manifest, "--mock", "-q", key=False).returncode == 0
    empty = next(i for i in range(40) if not shard_ids(i, 40, IDS[:2]))
    for command in ("status", "download"):
        done = cli(tmp_path, command, "batch.mock.ledger.csv", "--shard", f"{empty}/40",
                   key=False)
        assert done.returncode == 0, done.stderr
        assert "batch.mock.ledger.csv: no jobs" in done.stdout


def test_changing_n_never_sends_a_job_twice(mock_server, tmp_path: Path) -> None:
    """Shards of N=3 (one never run), then N=2, then unsharded: each job created once."""
    server = mock_server("--no-idempotency")
    manifest = write_manifest(tmp_path, JOBS)
    flags = ["--base-url", server.url]
    for index in (0, 1):  # shard 2 of 3 never runs
        assert cli(tmp_path, "run", manifest, *flags, "--shard", f"{index}/3").returncode == 0
    sent_by_three = shard_ids(0, 3) | shard_ids(1, 3)
    plan = cli(tmp_path, "plan", manifest, "--shard", "0/2", "--json")
    skips = {job["job_id"]: job["skip"] for job in json.loads(plan.stdout)["jobs"]}
    for job_id in shard_ids(0, 2):
        if job_id in sent_by_three:
            assert skips[job_id].startswith("recorded in other ledger batch.shard-")
            assert "already submitted" in skips[job_id]
        else:
            assert skips[job_id] is None
    for index in (0, 1):
        done = cli(tmp_path, "run", manifest, *flags, "--shard", f"{index}/2")
        assert done.returncode == 0, done.stderr
        mine = set(read_latest(tmp_path / f"batch.shard-{index}-of-2.ledger.csv"))
        assert mine == shard_ids(index, 2) - sent_by_three
        if shard_ids(index, 2) & sent_by_three:
            assert "are recorded in other ledgers of their manifest" in done.stderr
    done = cli(tmp_path, "run", manifest, *flags)
    assert done.returncode == 0
    assert done.stdout.startswith(f"{JOBS} jobs: {JOBS} already done")
    assert read_latest(tmp_path / "batch.ledger.csv") == {}
    assert created_once(server)["tasks_created"] == JOBS


def test_wait_under_a_new_n_promises_only_its_own_videos(tmp_path: Path) -> None:
    """run --wait after a change of N: exit 0 once its own videos are on disk; it names the
    command that collects the jobs another ledger holds."""
    manifest = write_manifest(tmp_path, JOBS)
    assert cli(tmp_path, "run", manifest, "--mock", "--shard", "0/3").returncode == 0
    done = cli(tmp_path, "run", manifest, "--mock", "--shard", "0/2", "--wait",
               "--interval", "0.2")
    assert done.returncode == 0, done.stderr
    mine = read_latest(tmp_path / "batch.mock.shard-0-of-2.ledger.csv")
    assert set(mine) == shard_ids(0, 2) - shard_ids(0, 3)
    assert {row["status"] for row in mine.values()} == {"downloaded"}
    left = len(shard_ids(0, 2) & shard_ids(0, 3))
    assert f"{left} jobs are recorded in other ledgers of their manifest and are left to " \
           "them: batch.mock.shard-0-of-3.ledger.csv" in done.stderr
    assert "hint: 'apimart-batch status batch.mock.shard-0-of-3.ledger.csv --wait'" in done.stderr
    again = cli(tmp_path, "status", "batch.mock.shard-0-of-3.ledger.csv", "--wait",
                "--interval", "0.2")
    assert again.returncode == 0, again.stderr


def test_a_job_retried_under_another_n_is_not_sent_again_by_the_first(mock_server,
                                                                       tmp_path: Path) -> None:
    """An 'error' job of N=2, sent by N=3: rerunning N=2 sees the newer row and sends nothing."""
    refusing = mock_server("--p-503", "1")
    server = mock_server("--no-idempotency")
    manifest = write_manifest(tmp_path, JOBS)
    first = cli(tmp_path, "run", manifest, "--base-url", refusing.url, "--shard", "0/2",
                "--max-attempts", "1", "--halt-after", "off")
    assert first.returncode == 1
    assert {row["status"] for row in read_latest(tmp_path / "batch.shard-0-of-2.ledger.csv")
            .values()} == {"error"}
    for index in range(3):
        done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", f"{index}/3")
        assert done.returncode == 0, done.stderr
    assert created_once(server)["tasks_created"] == JOBS
    again = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", "0/2")
    assert again.returncode == 0, again.stderr
    assert server.stats()["tasks_created"] == JOBS
    merged = cli(tmp_path, "report", "batch.shard-*", "--format", "json")
    jobs = json.loads(merged.stdout)["jobs"]
    assert sorted(job["job_id"] for job in jobs) == sorted(IDS)
    assert {job["status"] for job in jobs} == {"submitted"}


def test_a_run_of_another_n_in_progress_is_refused(mock_server, tmp_path: Path) -> None:
    """While a shard of N=3 holds its ledger, N=2 exits 75 naming it; N=3 shards go ahead."""
    server = mock_server()
    manifest = write_manifest(tmp_path, JOBS)
    held = tmp_path / "batch.shard-1-of-3.ledger.csv"
    with open_ledger(held, mock=False, base_url=server.url):
        other = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", "0/2")
        unsharded = cli(tmp_path, "run", manifest, "--base-url", server.url)
        same = cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", "0/3")
    assert other.returncode == 75
    assert f"batch.shard-1-of-3.ledger.csv: in use by pid {os.getpid()}, a run with another " \
           "shard count than this one (--shard 0/2)" in other.stderr
    assert unsharded.returncode == 75
    assert same.returncode == 0, same.stderr
    assert server.submits() == len(shard_ids(0, 3))


def test_four_concurrent_shards_create_every_job_once(mock_server, spawn, tmp_path: Path) -> None:
    """Four shard processes at once against one emulator: each job once; the merged view whole."""
    server = mock_server("--no-idempotency", "--task-seconds", "0.3")
    manifest = write_manifest(tmp_path, 40)
    ids = [f"job-{i}" for i in range(40)]
    flags = ["--base-url", server.url, "-j", "4", "--wait", "--interval", "0.2"]
    processes = [spawn("run", manifest, *flags, "--shard", f"{i}/4") for i in range(4)]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    stats = created_once(server)
    assert stats["tasks_created"] == 40
    report = cli(tmp_path, "report", "batch.shard-*-of-4.ledger.csv", "--format", "json")
    data = json.loads(report.stdout)
    assert sorted(job["job_id"] for job in data["jobs"]) == sorted(ids)
    assert data["totals"] == {"downloaded": 40}
    assert len(data["ledgers"]) == 4
    assert len(list((tmp_path / "videos").rglob("*.mp4"))) == 40
    assert [p.name for p in (tmp_path / "videos").rglob("*.html")] == ["report.html"]  # one page
    status = cli(tmp_path, "status", "batch.shard-*-of-4.ledger.csv", "--base-url", server.url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == "4 ledgers: 40 downloaded"


def test_status_and_download_take_several_ledgers_and_a_shard(mock_server, tmp_path: Path) -> None:
    """status --wait on two ledgers merges them; download --shard fetches only that shard."""
    server = mock_server("--task-seconds", "0.2")
    manifest = write_manifest(tmp_path, JOBS)
    for index in range(2):
        assert cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard",
                   f"{index}/2").returncode == 0
    ledgers = [f"batch.shard-{i}-of-2.ledger.csv" for i in range(2)]
    done = cli(tmp_path, "status", *ledgers, "--base-url", server.url, "--wait",
               "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"2 ledgers: {JOBS} completed"
    fetch = cli(tmp_path, "download", "batch.shard-*", "--shard", "1/3", "--base-url", server.url)
    assert fetch.returncode == 0, fetch.stderr  # the shard's videos are all on disk
    assert fetch.stdout.splitlines()[-2:] == [f"2 ledgers: {len(shard_ids(1, 3))} downloaded",
                                              "review page: videos/batch/report.html"]
    fetched = {row["job_id"] for ledger in ledgers
               for row in read_latest(tmp_path / ledger).values()
               if row["status"] == "downloaded"}
    assert fetched == shard_ids(1, 3)
    report = cli(tmp_path, "report", *ledgers)
    assert report.returncode == 0
    assert f"{JOBS} jobs: " in report.stdout
    assert "apimart-batch download batch.shard-0-of-2.ledger.csv" in report.stdout


def test_next_steps_of_a_shard_ledger_rerun_its_shard(mock_server, tmp_path: Path) -> None:
    """report on a shard ledger names the run command with --shard, not another ledger."""
    server = mock_server("--p-503", "1")
    manifest = write_manifest(tmp_path, 6)
    cli(tmp_path, "run", manifest, "--base-url", server.url, "--shard", "1/2",
        "--max-attempts", "1", "--halt-after", "off")
    report = cli(tmp_path, "report", "batch.shard-1-of-2.ledger.csv")
    assert f"apimart-batch run batch.yaml --shard 1/2 --base-url {server.url}" in report.stdout


@pytest.mark.parametrize(("manifests", "ledger", "shard", "mock", "command"), [
    pytest.param(["batch.yaml"], "batch.shard-1-of-2.ledger.csv", None, False,
                 "apimart-batch run batch.yaml --shard 1/2 --retry-failed", id="beside"),
    pytest.param(["batch.yaml"], "/data/b.shard-2-of-4.ledger.csv", None, False,
                 "apimart-batch run batch.yaml --ledger /data/b.ledger.csv --shard 2/4 "
                 "--retry-failed", id="elsewhere"),
    pytest.param(["a.yaml", "b.yaml"], None, Shard(0, 3), True,
                 "apimart-batch run a.yaml b.yaml --mock --shard 0/3 --retry-failed",
                 id="run-flags"),
    pytest.param(["batch.yaml"], "/data/b.ledger.csv", Shard(1, 2), False,
                 "apimart-batch run batch.yaml --ledger /data/b.ledger.csv --shard 1/2 "
                 "--retry-failed", id="run-ledger-flag"),
])
def test_rerun_commands_of_a_shard_keep_its_shard(manifests: list[str], ledger: str | None,
                                                 shard: Shard | None, mock: bool,
                                                 command: str) -> None:
    """A shard's hint reruns that shard (a bare run would take every job of the manifest)."""
    assert rerun_command(manifests, "--retry-failed", ledger=ledger, mock=mock,
                         base_url="https://api.apimart.ai", shard=shard) == command


def test_status_on_a_shard_ledger_hints_a_rerun_of_that_shard(tmp_path: Path) -> None:
    """status on a shard ledger with a failed job names 'run ... --shard I/N --retry-failed'."""
    url = "http://127.0.0.1:9"
    with open_ledger(tmp_path / "batch.shard-1-of-2.ledger.csv", mock=False,
                     base_url=url) as book:
        book.append("job-1", status="submitting", model="sora-2", manifest="batch.yaml")
        book.append("job-1", status="submitted", task_id="task_01J0000000000000000000000A")
        book.append("job-1", status="failed", error="content policy")
    done = cli(tmp_path, "status", "batch.shard-1-of-2.ledger.csv", "--base-url", url)
    assert done.returncode == 1, done.stderr
    assert f"apimart-batch run batch.yaml --shard 1/2 --base-url {url} --retry-failed" in \
        done.stderr


# -- recipes -------------------------------------------------------------------------------

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_parallel_line() -> str:
    """The GNU parallel line of the README's "Scaling out" section."""
    section = README.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith("parallel ")]
    return line


@pytest.mark.skipif(shutil.which("parallel") is None,
                    reason="GNU parallel is not installed (apt-get install parallel)")
def test_the_readme_parallel_line_runs(mock_server, tmp_path: Path) -> None:
    """The README's parallel line, verbatim: four shards, a key each, every video, once."""
    parallel = shutil.which("parallel")
    assert parallel is not None
    version = subprocess.run([parallel, "--version"], capture_output=True, text=True,
                             check=False)
    if "GNU parallel" not in version.stdout:
        pytest.skip("'parallel' on PATH is not GNU parallel (moreutils has one too)")
    server = mock_server("--no-idempotency", "--task-seconds", "0.3")
    line = readme_parallel_line()
    manifest = re.search(r"run (\S+\.yaml)", line)
    assert manifest is not None
    doc = {"version": 1, "name": "batch", "defaults": {"model": "sora-2", "duration": 4},
           "jobs": [{"id": f"job-{i}", "prompt": f"A paper boat, take {i}"} for i in range(16)]}
    (tmp_path / manifest[1]).write_text(yaml.safe_dump(doc), encoding="utf-8")
    (tmp_path / "keys").mkdir()
    for index in range(4):
        key = tmp_path / "keys" / f"{index}.key"
        key.write_text(f"sk-shard-test-key-{index:04d}\n")
        key.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    env |= {"APIMART_BASE_URL": server.url, "PATH": f"{Path(BIN).parent}:{env['PATH']}"}
    done = subprocess.run(["/bin/sh", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = created_once(server)
    assert stats["tasks_created"] == 16
    ids = [f"job-{i}" for i in range(16)]
    assert stats["tasks_per_key"] == {  # each shard paid with its own key (masked in stats)
        f"sk-s…{index:04d}": len(shard_ids(index, 4, ids)) for index in range(4)}
    ledgers = sorted(tmp_path.glob("batch.shard-*-of-4.ledger.csv"))
    assert len(ledgers) == 4
    rows = [row for ledger in ledgers for row in read_latest(ledger).values()]
    assert sorted(row["job_id"] for row in rows) == sorted(ids)
    assert {row["status"] for row in rows} == {"downloaded"}
    assert "sk-shard-" not in done.stdout + done.stderr


K8S = REPO / "examples" / "k8s" / "indexed-job.yaml"
#: The JobSpec and pod failure policy fields the example relies on (batch/v1).
JOB_SPEC_FIELDS = {"completionMode", "completions", "parallelism", "backoffLimitPerIndex",
                   "maxFailedIndexes", "podReplacementPolicy", "podFailurePolicy", "template",
                   "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"}
RULE_FIELDS = {"action", "onExitCodes", "onPodConditions"}
ACTIONS = {"FailJob", "FailIndex", "Ignore", "Count"}


def readme_policy() -> dict[int, str]:
    """Exit code -> podFailurePolicy action, from the README's "Scaling out" table."""
    section = README.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    policy = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[2] in ACTIONS:
            for code in cells[0].split(","):
                policy[int(code)] = cells[2]
    return policy


def test_the_kubernetes_example_is_an_indexed_job_with_our_policy() -> None:
    """The Job parses and has what we rely on; its exit-code rules are the README's table."""
    from runner.cli import build_parser
    from runner.errors import (
        EXIT_API_STOPPED,
        EXIT_JOBS_FAILED,
        EXIT_LOCKED,
        EXIT_SIGINT,
        EXIT_SIGTERM,
        EXIT_USAGE,
    )

    job = yaml.safe_load(K8S.read_text(encoding="utf-8"))
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert set(spec) <= JOB_SPEC_FIELDS
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1  # FailIndex needs it
    assert spec["podReplacementPolicy"] == "Failed"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    (container,) = pod["containers"]
    rules = spec["podFailurePolicy"]["rules"]
    policy: dict[int, str] = {}
    for rule in rules:
        assert set(rule) <= RULE_FIELDS and rule["action"] in ACTIONS
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["containerName"] == container["name"]
            assert codes["operator"] == "In" and 0 not in codes["values"]
            policy |= dict.fromkeys(codes["values"], rule["action"])
        else:
            assert rule["onPodConditions"] == [{"type": "DisruptionTarget"}]
            assert rule["action"] == "Ignore"
    assert policy == {EXIT_USAGE: "FailIndex", EXIT_API_STOPPED: "FailIndex",
                      EXIT_SIGINT: "Ignore", EXIT_SIGTERM: "Ignore",
                      EXIT_JOBS_FAILED: "Count", EXIT_LOCKED: "Count"}
    assert readme_policy() == policy

    # The container's arguments are ours: they parse, shard by the Job's index and count,
    # and put the ledgers and videos on the PersistentVolume, the key on the Secret.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    args = [arg.replace("$(JOB_COMPLETION_INDEX)", "1") for arg in container["args"]]
    os.environ["JOB_COMPLETION_INDEX"] = "1"
    try:
        parsed = build_parser().parse_args(args)
    finally:
        del os.environ["JOB_COMPLETION_INDEX"]
    assert parsed.command == "run"
    assert parsed.shard == Shard(1, spec["completions"])
    assert "auto/" in " ".join(container["args"])
    claim = next(name for name, v in volumes.items() if "persistentVolumeClaim" in v)
    assert Path(parsed.ledger).parent == Path(mounts[claim])
    assert Path(parsed.out).parent == Path(mounts[claim])
    secret = next(name for name, v in volumes.items() if "secret" in v)
    assert Path(parsed.key_file).parent == Path(mounts[secret])
    assert volumes[secret]["secret"]["defaultMode"] & 0o077 == 0  # no key_file_warning
    config = next(name for name, v in volumes.items() if "configMap" in v)
    assert Path(parsed.manifests[0]).parent == Path(mounts[config])
