"""Shards under SIGKILL (issue 14): a killed shard rerun with the same index, or under another N.

Four ``run --wait --shard I/4`` processes share one ``mock-server --no-idempotency`` (so
any resend of a job that may exist creates a second task). One of them is killed with
SIGKILL at a random moment, then the batch is finished by reruns. Afterwards: no request
body made two tasks, no job is recorded in two ledgers, and every job ended downloaded or
(cut mid-POST) unknown.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaoshelpers import run, start
from clihelpers import MockServer

from runner.ledger.store import read_latest

pytestmark = pytest.mark.slow

ROUNDS = 2
JOBS = 32


def manifest(folder: Path) -> str:
    """``JOBS`` sora-2 4 s jobs named job-0 ... in ``folder/batch.yaml``."""
    doc = {"version": 1, "name": "batch", "defaults": {"model": "sora-2", "duration": 4},
           "jobs": [{"id": f"job-{i}", "prompt": f"a paper boat, take {i}"} for i in range(JOBS)]}
    (folder / "batch.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return "batch.yaml"


def four_shards_one_killed(folder: Path, rng: random.Random, flags: list[str]) -> int:
    """Start shards 0-3 of 4, SIGKILL a random one at a random moment; return its index."""
    victim = rng.randrange(4)
    processes = [start(folder, "run", "batch.yaml", *flags, "--shard", f"{i}/4")
                 for i in range(4)]
    time.sleep(rng.uniform(0.05, 1.0))
    if processes[victim].poll() is None:
        processes[victim].send_signal(signal.SIGKILL)
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert "Traceback" not in err, err
    return victim


def settle(folder: Path, *args: str) -> None:
    """Rerun until the command ends by itself (0, or 1 for jobs left 'unknown')."""
    for _ in range(4):
        done = run(folder, *args)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode in (0, 1):
            return
    pytest.fail(f"{args} did not settle: exit {done.returncode}: {done.stderr[-500:]}")


def assert_created_once(server: MockServer, folder: Path) -> None:
    """One task per body; each job in one ledger only; each ended downloaded or unknown."""
    stats = server.stats()
    assert stats["max_tasks_per_body"] <= 1, stats
    owners: Counter[str] = Counter()
    states: Counter[str] = Counter()
    for ledger in folder.glob("batch.shard-*-of-*.ledger.csv"):
        for job_id, row in read_latest(ledger).items():
            owners[job_id] += 1
            states[row["status"]] += 1
    assert max(owners.values()) == 1, owners.most_common(3)
    assert sorted(owners) == sorted(f"job-{i}" for i in range(JOBS))
    assert set(states) <= {"downloaded", "unknown"}, states
    # Every job but those cut mid-POST made a task; those may have made one, never two.
    assert JOBS - states["unknown"] <= stats["tasks_created"] <= JOBS


def killed_batch(mock_server: Any, folder: Path, seed: int) -> tuple[Any, list[str], int]:
    """The batch run as four shards against a non-idempotent emulator, one of them
    SIGKILLed mid-run; returns the server, the run flags and the killed shard's index."""
    server = mock_server("--no-idempotency", "--task-seconds", "0.3", "--latency-ms", "20")
    manifest(folder)
    flags = ["--base-url", server.url, "-j", "2", "--wait", "--interval", "0.2"]
    return server, flags, four_shards_one_killed(folder, random.Random(seed), flags)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_a_killed_shard_rerun_with_its_index_creates_no_duplicate(mock_server, tmp_path: Path,
                                                                  seed: int) -> None:
    """SIGKILL one of four shards mid-run; rerun the same index: every job created once."""
    server, flags, victim = killed_batch(mock_server, tmp_path, seed)
    settle(tmp_path, "run", "batch.yaml", *flags, "--shard", f"{victim}/4")
    assert_created_once(server, tmp_path)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_a_killed_shard_finished_under_another_n_creates_no_duplicate(mock_server,
                                                                      tmp_path: Path,
                                                                      seed: int) -> None:
    """SIGKILL one of four shards; finish the batch with N=3: nothing recorded is sent again."""
    server, flags, victim = killed_batch(mock_server, tmp_path, seed)
    for index in range(3):
        settle(tmp_path, "run", "batch.yaml", *flags, "--shard", f"{index}/3")
    # What the N=3 runs left to the killed shard's ledger (running tasks, videos) it collects.
    settle(tmp_path, "run", "batch.yaml", *flags, "--shard", f"{victim}/4")
    assert_created_once(server, tmp_path)
