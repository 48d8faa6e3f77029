"""A reader that goes away early (``| head``) ends a command quietly: exit 141, no traceback.

Each command writes far more than a pipe holds (64 KiB on Linux), so it is still writing
when the reader closes its end, and must meet the closed pipe.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from clihelpers import BIN, _env

from runner.ledger.store import open_ledger

#: More than a Linux pipe buffers (64 KiB), with margin.
PIPE_BUFFER = 64 * 1024
#: 128 + SIGPIPE, as a shell reports a command killed by its closed pipe.
EXIT_BROKEN_PIPE = 141


def big_manifest(tmp_path: Path, *, valid: bool = True) -> str:
    """A manifest of 1500 sora-2 jobs (each with a duration sora-2 refuses unless ``valid``)."""
    duration = 4 if valid else 5
    doc = {"version": 1, "name": "pipes", "defaults": {"model": "sora-2"}, "jobs": [
        {"id": f"job-{i}", "prompt": f"A paper boat number {i} drifting on a still lake",
         "duration": duration, "metadata": {"sku": f"SKU-{i}"}}
        for i in range(1500)
    ]}
    path = tmp_path / "pipes.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path.name


def big_ledger(tmp_path: Path) -> str:
    """A ledger of 1500 submitted jobs, as a run writes it."""
    path = tmp_path / "pipes.ledger.csv"
    with open_ledger(path, mock=False, base_url="https://api.apimart.ai") as ledger:
        for i in range(1500):
            ledger.append(f"job-{i}", status="submitting", prompt=f"A paper boat number {i}",
                          fingerprint="0123456789abcdef", metadata='{"sku":"SKU"}')
            ledger.append(f"job-{i}", status="submitted", task_id=f"task_{i:06d}")
    return path.name


COMMANDS: list[tuple[str, Callable[[Path], list[str]], int]] = [
    ("plan-json", lambda tmp: ["plan", "--json", big_manifest(tmp)], 0),
    ("plan", lambda tmp: ["plan", big_manifest(tmp)], 0),
    ("validate-json", lambda tmp: ["validate", "--json", big_manifest(tmp, valid=False)], 2),
    ("report", lambda tmp: ["report", big_ledger(tmp)], 0),
    ("report-csv", lambda tmp: ["report", big_ledger(tmp), "--format", "csv"], 0),
    ("report-json", lambda tmp: ["report", big_ledger(tmp), "--format", "json"], 0),
]


def run(tmp_path: Path, args: list[str], keep: int | None) -> tuple[int, bytes, str]:
    """Run ``apimart-batch ARGS``; read ``keep`` bytes of stdout and close it (None: read all).

    Returns the exit code, the bytes read and stderr.
    """
    with subprocess.Popen([BIN, *args], cwd=tmp_path, env=_env(key=False),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            head = process.stdout.read() if keep is None else process.stdout.read(keep)
            process.stdout.close()
            err = process.stderr.read().decode(errors="replace")
            return process.wait(timeout=60), head, err
        finally:
            if process.poll() is None:
                process.kill()


@pytest.mark.parametrize(("make", "code"), [pytest.param(m, c, id=n) for n, m, c in COMMANDS])
def test_a_closed_pipe_ends_quietly(
    tmp_path: Path, make: Callable[[Path], list[str]], code: int
) -> None:
    """The output outgrows the pipe; closed early, the command exits 141 and says nothing."""
    args = make(tmp_path)
    whole_code, whole, _ = run(tmp_path, args, None)
    assert whole_code == code
    # The reader buffers up to 8 KiB: only far more than a pipe holds is sure to meet it closed.
    assert len(whole) > 2 * PIPE_BUFFER
    for keep in (10, 0):  # `| head -c 10`, and a reader that takes nothing
        exit_code, head, err = run(tmp_path, args, keep)
        assert exit_code == EXIT_BROKEN_PIPE, err
        assert head == whole[:keep]
        for sign in ("Traceback", "BrokenPipe", "Exception ignored", "Errno 32"):
            assert sign not in err, err
