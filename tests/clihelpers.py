"""Helpers for tests that run ``apimart-batch`` as a subprocess against ``mock-server``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.ledger.store import read_latest

BIN = str(Path(sys.executable).with_name("apimart-batch"))
KEY = "sk-live-CLIKEY-must-never-leak-9876"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class MockServer:
    """A running ``apimart-batch mock-server`` subprocess."""

    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (``GET /_emulator/stats``)."""
        with urllib.request.urlopen(self.url + "/_emulator/stats", timeout=5) as answer:  # noqa: S310
            return json.loads(answer.read())

    def submits(self) -> int:
        """Submit requests received so far."""
        return self.stats()["requests"].get("submit", 0)

    def api_requests(self) -> dict[str, int]:
        """Requests received so far by route, leaving out our own stats calls."""
        return {k: n for k, n in self.stats()["requests"].items() if k != "stats"}


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


@pytest.fixture
def mock_server() -> Iterator[Callable[..., MockServer]]:
    """Start ``mock-server --port 0 FLAGS...``; every server is killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> MockServer:
        process = subprocess.Popen(
            [BIN, "mock-server", "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"--base-url (http://\S+)", line)
        assert match, f"mock-server did not start: {line!r}"
        return MockServer(match[1], process)

    yield start
    for process in started:
        _end(process)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``apimart-batch ARGS...`` in ``tmp_path`` without waiting; killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, key: bool = True) -> subprocess.Popen[str]:
        process = subprocess.Popen([BIN, *args], cwd=tmp_path, env=_env(key=key),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        _end(process)


def _env(*, key: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    if key:
        env["APIMART_API_KEY"] = KEY
    return env


def cli(tmp_path: Path, *args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``apimart-batch ARGS...`` in ``tmp_path`` to the end; assert the key stayed secret."""
    done = subprocess.run([BIN, *args], cwd=tmp_path, env=_env(key=key), capture_output=True,
                          text=True, timeout=60, check=False)
    assert KEY not in done.stdout + done.stderr
    return done


def write_manifest(tmp_path: Path, count: int, *, name: str = "batch") -> str:
    """A manifest of ``count`` sora-2 4 s jobs ``job-0`` ...; returns its file name."""
    doc = {
        "version": 1,
        "name": name,
        "defaults": {"model": "sora-2", "duration": 4},
        "jobs": [{"id": f"job-{i}", "prompt": f"A paper boat, take {i}"} for i in range(count)],
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return f"{name}.yaml"


def statuses(ledger: Path) -> Counter[str]:
    """How many jobs the ledger holds in each status."""
    return Counter(row["status"] for row in read_latest(ledger).values())


def assert_key_nowhere(tmp_path: Path) -> None:
    """The API key is in no file name and no file content under ``tmp_path``."""
    for path in tmp_path.rglob("*"):
        assert KEY not in path.name
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def wait_for_rows(ledger: Path, status: str, count: int, process: subprocess.Popen[str]) -> None:
    """Poll until ``count`` jobs of the ledger are in ``status`` (the run is mid-flight)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        if ledger.exists() and statuses(ledger)[status] >= count:
            return
        time.sleep(0.01)
    pytest.fail(f"{ledger} never held {count} '{status}' rows")


# -- exit codes and output -----------------------------------------------------------------


#: A child process that opens the ledger at argv[1] and closes it: prints the holder's pid
#: and exits 75 when another process holds the lock.
TRY_OPEN = """
import sys
from runner.errors import LedgerLockedError
from runner.ledger.store import open_ledger
try:
    open_ledger(sys.argv[1], mock=False, base_url="u").close()
except LedgerLockedError as exc:
    print(exc.pid)
    raise SystemExit(exc.exit_code)
"""
