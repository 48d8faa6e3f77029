"""The money paths under SIGKILL: regeneration, shared folders, a 402 and a halt (issue 11).

Each scenario runs ``run --wait`` against ``mock-server --no-idempotency`` (so any resend
of a job that may exist creates a second task), is killed with SIGKILL at a random moment,
then rerun to completion. Afterwards: no Idempotency-Key created two tasks, every take the
ledger records was bought once, and every video on disk is byte for byte its task's, with
nothing replaced that another job or the user wrote.
"""

from __future__ import annotations

import hashlib
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from chaoshelpers import run, start
from clihelpers import MockServer

from runner.emulator.contract import video_bytes
from runner.ledger.store import iter_rows, read_latest

pytestmark = pytest.mark.slow

ROUNDS = 3
JOBS = 12


def manifest(folder: Path, name: str, prompt: str = "a paper boat") -> str:
    """``JOBS`` sora-2 4 s jobs named job-0 ... in ``folder/name.yaml``."""
    doc = {"version": 1, "name": name, "defaults": {"model": "sora-2", "duration": 4},
           "jobs": [{"id": f"job-{i}", "prompt": f"{prompt}, take {i}"} for i in range(JOBS)]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return f"{name}.yaml"


def killed(folder: Path, rng: random.Random, *args: str) -> None:
    """Start ``apimart-batch ARGS...``, SIGKILL it at a random moment, collect it."""
    process = start(folder, *args)
    time.sleep(rng.uniform(0.05, 1.2))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=30)
    assert "Traceback" not in err, err


def settle(folder: Path, *args: str) -> None:
    """Rerun until the command ends by itself with no job left half done."""
    for _ in range(4):
        done = run(folder, *args)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode in (0, 1, 3):
            return
    pytest.fail(f"{args} did not settle: exit {done.returncode}: {done.stderr[-500:]}")


def assert_paid_once_and_intact(server: MockServer, ledgers: list[Path]) -> None:
    """Each key made at most one task; each take one key; each video its own task's bytes."""
    stats = server.stats()
    per_key = Counter(stats["idempotency_key_by_task"].values())
    assert max(per_key.values(), default=0) <= 1, per_key.most_common(3)
    for ledger in ledgers:
        keys: dict[tuple[str, str], set[str]] = {}
        for row in iter_rows(ledger):
            keys.setdefault((row["job_id"], row["take"] or "1"), set()).add(
                row["idempotency_key"])
        assert all(len(found) == 1 for found in keys.values()), keys
        for row in read_latest(ledger).values():
            if row["status"] == "downloaded":
                body = Path(row["file"]).read_bytes()
                assert body == video_bytes(row["task_id"])
                assert hashlib.sha256(body).hexdigest() == row["file_sha256"]


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_retry_failed_survives_a_kill(mock_server, tmp_path: Path, seed: int) -> None:
    """Half the tasks fail; --retry-failed is killed, rerun: one task per take, never two."""
    rng = random.Random(seed)
    server = mock_server("--no-idempotency", "--task-seconds", "0.3", "--fail-rate", "0.5",
                         "--seed", str(seed))
    flags = ["--base-url", server.url, "--interval", "0.2", "-j", "4", "--halt-after", "off",
             "--wait"]
    name = manifest(tmp_path, "boats")
    settle(tmp_path, "run", name, *flags)
    killed(tmp_path, rng, "run", name, *flags, "--retry-failed")
    settle(tmp_path, "run", name, *flags, "--retry-failed")
    assert_paid_once_and_intact(server, [tmp_path / "boats.ledger.csv"])


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_two_manifests_sharing_out_survive_a_kill(mock_server, tmp_path: Path,
                                                  seed: int) -> None:
    """Same job ids, one --out, a kill mid-batch: both sets of videos, none overwritten."""
    rng = random.Random(seed)
    server = mock_server("--no-idempotency", "--task-seconds", "0.2")
    flags = ["--base-url", server.url, "--interval", "0.2", "-j", "4", "--wait", "--out", "v"]
    spring, winter = manifest(tmp_path, "spring"), manifest(tmp_path, "winter", "snow")
    killed(tmp_path, rng, "run", spring, *flags)
    killed(tmp_path, rng, "run", winter, *flags)
    settle(tmp_path, "run", spring, *flags)
    settle(tmp_path, "run", winter, *flags)
    ledgers = [tmp_path / "spring.ledger.csv", tmp_path / "winter.ledger.csv"]
    assert_paid_once_and_intact(server, ledgers)
    for ledger in ledgers:
        assert {row["status"] for row in read_latest(ledger).values()} <= {"downloaded",
                                                                           "unknown"}


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_a_402_mid_batch_survives_a_kill(mock_server, tmp_path: Path, seed: int) -> None:
    """The balance runs out after 5 tasks; killed, rerun: the 5 paid videos all arrive."""
    rng = random.Random(seed)
    server = mock_server("--no-idempotency", "--task-seconds", "0.2", "--quota", "5")
    flags = ["--base-url", server.url, "--interval", "0.2", "-j", "2", "--wait"]
    name = manifest(tmp_path, "boats")
    killed(tmp_path, rng, "run", name, *flags)
    settle(tmp_path, "run", name, *flags)
    settle(tmp_path, "download", "boats.ledger.csv", "--base-url", server.url)
    ledger = tmp_path / "boats.ledger.csv"
    assert_paid_once_and_intact(server, [ledger])
    created = {row["task_id"] for row in iter_rows(ledger) if row["task_id"]}
    downloaded = [r for r in read_latest(ledger).values() if r["status"] == "downloaded"]
    assert len(downloaded) == len(created) <= 5


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_a_halt_survives_a_kill(mock_server, tmp_path: Path, seed: int) -> None:
    """Every task fails; killed, rerun: the halt still comes, nothing was bought twice."""
    rng = random.Random(seed)
    server = mock_server("--no-idempotency", "--task-seconds", "0", "--fail-rate", "1",
                         "--latency-ms", "20", "--latency-jitter", "0")
    flags = ["--base-url", server.url, "--interval", "0.1", "-j", "1", "--wait"]
    name = manifest(tmp_path, "boats")
    killed(tmp_path, rng, "run", name, *flags)
    done = run(tmp_path, "run", name, *flags)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert_paid_once_and_intact(server, [tmp_path / "boats.ledger.csv"])
