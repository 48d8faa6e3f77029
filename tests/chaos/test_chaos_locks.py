"""Alias locks: two runs on two names of one ledger file; one proceeds, the other exits 75."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chaoshelpers import SecretScan, run, start
from clihelpers import MockServer, wait_for_rows, write_manifest

from runner.ledger.store import COLUMNS, open_ledger, read_latest, write_csv

pytestmark = pytest.mark.slow


def _symlink(tmp: Path) -> tuple[str, str]:
    (tmp / "alias.csv").symlink_to("batch.ledger.csv")
    return "batch.ledger.csv", "alias.csv"


def _hardlink(tmp: Path) -> tuple[str, str]:
    (tmp / "alias.csv").hardlink_to(tmp / "batch.ledger.csv")
    return "batch.ledger.csv", "alias.csv"


def _relative_absolute(tmp: Path) -> tuple[str, str]:
    return "batch.ledger.csv", str(tmp / "batch.ledger.csv")


def _dot_dot(tmp: Path) -> tuple[str, str]:
    (tmp / "sub").mkdir()
    return "batch.ledger.csv", "sub/../batch.ledger.csv"


def _symlinked_dir(tmp: Path) -> tuple[str, str]:
    (tmp / "linked").symlink_to(tmp, target_is_directory=True)
    return "batch.ledger.csv", "linked/batch.ledger.csv"


def _bind_mount(tmp: Path) -> tuple[str, str]:
    (tmp / "mnt").mkdir()
    done = subprocess.run(["mount", "--bind", str(tmp), str(tmp / "mnt")],  # noqa: S607
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"mount --bind is not possible here: {done.stderr.strip() or done.returncode}")
    return "batch.ledger.csv", "mnt/batch.ledger.csv"


ALIASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "symlink": _symlink,
    "hard-link": _hardlink,
    "relative-vs-absolute": _relative_absolute,
    "dot-dot": _dot_dot,
    "symlinked-directory": _symlinked_dir,
    "bind-mount": _bind_mount,
}
# symlink and hard-link got a lock of their own before issue 8 (finding 1).


@pytest.fixture
def unmount(tmp_path: Path) -> Iterator[None]:
    """Undo a bind mount of the test, if one was made."""
    yield
    if os.path.ismount(tmp_path / "mnt"):
        subprocess.run(["umount", str(tmp_path / "mnt")], check=False)  # noqa: S607


@pytest.mark.parametrize("alias", list(ALIASES))
def test_two_runs_on_aliases_of_one_ledger(mock_server, tmp_path: Path, unmount: None,
                                           alias: str) -> None:
    """While a run holds the ledger under one name, a run under another name exits 75."""
    server: MockServer = mock_server("--latency-ms", "30000", "--latency-jitter", "0")
    manifest = write_manifest(tmp_path, 2)
    (tmp_path / "batch.ledger.csv").write_text(write_csv([], COLUMNS), encoding="utf-8")
    first, second = ALIASES[alias](tmp_path)
    args = ["run", manifest, "--base-url", server.url, "-j", "1", "--timeout", "2",
            "--no-balance-check"]
    holder = start(tmp_path, *args, "--ledger", first)
    try:
        wait_for_rows(tmp_path / "batch.ledger.csv", "submitting", 1, holder)
        other = run(tmp_path, *args, "--ledger", second, timeout=60)
    finally:
        holder.kill()
        out, err = holder.communicate(timeout=10)
    scan = SecretScan()
    scan.process("holder", out, err)
    scan.process("other", other.stdout, other.stderr)
    scan.tree(tmp_path)
    assert other.returncode == 75, other.stdout + other.stderr
    assert "in use" in other.stderr
    assert "Traceback" not in other.stderr
    assert server.submits() == 1
    assert not scan.leaks


@pytest.mark.parametrize("alias", list(ALIASES))
def test_a_held_alias_locks_the_real_name(tmp_path: Path, unmount: None, alias: str) -> None:
    """The other way round: the ledger opened under its alias; a run on its real name exits 75."""
    manifest = write_manifest(tmp_path, 2)
    (tmp_path / "batch.ledger.csv").write_text(write_csv([], COLUMNS), encoding="utf-8")
    real, alias_path = ALIASES[alias](tmp_path)
    url = "http://127.0.0.1:9"  # never reached: the run must stop at the lock
    with open_ledger(tmp_path / alias_path, mock=False, base_url=url):
        other = run(tmp_path, "run", manifest, "--base-url", url, "--max-attempts", "1",
                    "--ledger", real)
    assert other.returncode == 75, other.stdout + other.stderr
    assert "Traceback" not in other.stderr


# "empty": the creating rewrite replaced the link by a file before issue 8 (finding 1).
@pytest.mark.parametrize("target", ["header-only", "empty"])
def test_a_symlinked_ledger_stays_a_symlink(mock_server, tmp_path: Path, target: str) -> None:
    """A run through a symlink writes its rows into the target and leaves the link a link."""
    server = mock_server()
    manifest = write_manifest(tmp_path, 2)
    header = write_csv([], COLUMNS) if target == "header-only" else ""
    (tmp_path / "real.csv").write_text(header, encoding="utf-8")
    (tmp_path / "link.csv").symlink_to("real.csv")
    done = run(tmp_path, "run", manifest, "--base-url", server.url, "--ledger", "link.csv")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "link.csv").is_symlink()
    assert {row["status"] for row in read_latest(tmp_path / "real.csv").values()} == {"submitted"}
