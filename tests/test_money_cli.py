"""The money flags as a user types them: plan --retry-failed, plan --balance, --halt-after,
and ``validate --json``; subprocesses against ``apimart-batch mock-server``."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from clihelpers import BIN, cli, statuses, write_manifest

pytestmark = pytest.mark.slow


def test_plan_retry_failed_shows_what_it_would_buy(mock_server, tmp_path: Path) -> None:
    """After a failed task, plan --retry-failed names take 2 and counts it in the estimate."""
    server = mock_server("--task-seconds", "0", "--fail-rate", "1")
    manifest = write_manifest(tmp_path, 1)
    done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--wait", "--interval", "0.1")
    assert done.returncode == 1 and statuses(tmp_path / "batch.ledger.csv") == {"failed": 1}
    assert "--retry-failed" in done.stderr
    plain = cli(tmp_path, "plan", manifest)
    assert "Estimated cost: $0.00" in plain.stdout and "skip: already failed" in plain.stdout
    again = cli(tmp_path, "plan", manifest, "--retry-failed")
    assert "buy take 2" in again.stdout and "Estimated cost: $0.32" in again.stdout
    data = json.loads(cli(tmp_path, "plan", manifest, "--retry-failed", "--json").stdout)
    assert data["jobs"][0]["take"] == 2 and data["totals"]["bought_again"] == 1


def test_plan_balance_reads_the_balance_only_when_asked(mock_server, tmp_path: Path) -> None:
    """plan stays offline; plan --balance makes one GET /v1/balance and prints what is left."""
    server = mock_server("--balance", "0.5")
    manifest = write_manifest(tmp_path, 2)
    assert "Balance" not in cli(tmp_path, "plan", manifest, "--base-url", server.url).stdout
    assert server.api_requests() == {}
    shown = cli(tmp_path, "plan", manifest, "--balance", "--base-url", server.url)
    assert shown.returncode == 0 and "Balance: 0.50 left" in shown.stdout
    assert server.api_requests() == {"balance": 1}


@pytest.mark.parametrize("bad", ["x", "0.5", "150%", "-3", "%"])
def test_a_malformed_halt_after_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    """--halt-after takes N, P% or off: anything else is exit 2 before any work."""
    done = cli(tmp_path, "run", write_manifest(tmp_path, 1), "--mock", "--halt-after", bad)
    assert done.returncode == 2 and "--halt-after" in done.stderr
    assert not (tmp_path / "batch.mock.ledger.csv").exists()


def test_validate_json_lists_every_problem_and_survives_a_closed_pipe(tmp_path: Path) -> None:
    """validate --json: all problems with file/line/col/path/hint, exit 2; '| head' is 141."""
    jobs = "".join(f"  - {{model: sora-2, prompt: p{i}, duration: 5}}\n" for i in range(150))
    (tmp_path / "bad.yaml").write_text(f"version: 1\njobs:\n{jobs}", encoding="utf-8")
    done = cli(tmp_path, "validate", "--json", "bad.yaml")
    assert done.returncode == 2
    doc = json.loads(done.stdout)
    assert doc["total"] == len(doc["problems"]) == 150
    assert doc["problems"][0] | {"message": ""} == {
        "file": "bad.yaml", "line": 3, "col": 43, "path": "jobs[0].duration", "message": "",
        "hint": None}
    shell = f"set -o pipefail; {shlex.quote(BIN)} validate --json bad.yaml | head -1"
    piped = subprocess.run(["/bin/bash", "-c", shell], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, check=False)
    assert piped.returncode in (2, 141) and "Traceback" not in piped.stderr


# -- rough edges of issue 12 -------------------------------------------------------------------


@pytest.mark.parametrize(("command", "says", "never"), [
    ("run", "3    stopped by the API", None),
    ("status", "with --wait, tasks still running", "--max-jobs"),
    ("download", "videos not on disk yet", "--max-jobs"),
    ("plan", "0    done", "3    "),
    ("report", "0    done", "3    "),
])
def test_each_command_help_lists_its_own_exit_codes(tmp_path: Path, command: str, says: str,
                                                    never: str | None) -> None:
    """`COMMAND --help` ends with that command's exit codes, not run's."""
    done = cli(tmp_path, command, "--help")
    assert done.returncode == 0 and says in done.stdout
    assert never is None or never not in done.stdout


def test_a_huge_concurrency_is_refused_before_any_work(tmp_path: Path) -> None:
    """-j beyond the documented bound is exit 2 at once (it once grew to 23 GB)."""
    done = cli(tmp_path, "run", write_manifest(tmp_path, 1), "--mock", "-j", "1000000000")
    assert done.returncode == 2 and "at most 512" in done.stderr
    assert not (tmp_path / "batch.mock.ledger.csv").exists()


def test_an_empty_key_file_says_so(tmp_path: Path) -> None:
    """--key-file naming an empty file: the message is about that file, not 'pass --key-file'."""
    (tmp_path / "k").write_text("\n", encoding="utf-8")
    (tmp_path / "k").chmod(0o600)
    done = cli(tmp_path, "run", write_manifest(tmp_path, 1), "--key-file", "k", key=False)
    assert done.returncode == 2
    assert "k: the key file is empty" in done.stderr and "pass --key-file" not in done.stderr


def test_schema_path_points_at_the_schema_the_modelines_name(tmp_path: Path) -> None:
    """`schema --path` is the installed editor schema: the file each example's modeline names."""
    done = cli(tmp_path, "schema", "--path")
    assert done.returncode == 0
    path = Path(done.stdout.strip())
    assert path.is_file() and path.name == "manifest.editor.schema.json"
    modeline = (Path(__file__).parent.parent / "jobs" / "example.yaml").read_text().splitlines()[0]
    assert modeline.endswith("$schema=../schemas/" + path.name)
    assert json.loads(path.read_text(encoding="utf-8"))["$schema"]
