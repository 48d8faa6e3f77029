"""Every cron and systemd line of README's "## Cron" runs as written, under ``env -i``.

The lines are read from README.md itself (and the unit files it shows from
examples/systemd/), so the docs and this test cannot drift apart. Only the paths are
moved into a temporary folder and the real API is swapped for the emulator (or --mock).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from clihelpers import BIN, KEY, REPO, statuses

pytestmark = pytest.mark.slow

README = REPO / "README.md"
UNITS = REPO / "examples" / "systemd"
#: What cron gives a command: a search path and a home, nothing else.
PATH = "/usr/local/bin:/usr/bin:/bin"
ENV = shutil.which("env") or "/usr/bin/env"
ANALYZE = shutil.which("systemd-analyze")


def cron_section() -> str:
    """README's "## Cron" section."""
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Cron\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    """The fenced code blocks of that language in the Cron section."""
    return re.findall(rf"```{language}\n(.*?)```", cron_section(), flags=re.DOTALL)


def cron_lines() -> list[str]:
    """The command of every crontab line (the five time fields dropped)."""
    lines = [line for block in blocks("cron") for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
    return [line.split(None, 5)[5] for line in lines]


def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    """Each shipped unit file: section -> key -> values (a key may repeat, as in systemd)."""
    parsed: dict[str, dict[str, dict[str, list[str]]]] = {}
    for path in sorted(UNITS.iterdir()):
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
        parsed[path.name] = sections
    return parsed


def place(tmp_path: Path, text: str, *, target: str) -> str:
    """A README command with its paths under ``tmp_path`` and ``target`` for the real API."""
    text = re.sub(r"(?<![\w/])/tmp/", f"{tmp_path}/", text)  # the README's lock file
    text = text.replace("/srv/videos", str(tmp_path / "srv"))
    text = text.replace("/var/log/apimart", str(tmp_path / "log"))
    return re.sub(r"(apimart-batch run \S+)", rf"\1 {target}", text) if target else text


def setting_up(tmp_path: Path, jobs: dict[str, int]) -> Path:
    """/srv/videos as the README assumes it: a virtualenv, the key file, the manifests."""
    srv = tmp_path / "srv"
    (srv / ".venv" / "bin").mkdir(parents=True)
    (srv / ".venv" / "bin" / "apimart-batch").symlink_to(BIN)
    (srv / "apimart.key").write_text(KEY + "\n", encoding="utf-8")
    (srv / "apimart.key").chmod(0o600)
    (tmp_path / "log").mkdir()
    (srv / "jobs").mkdir()
    for name, count in jobs.items():
        doc = {"version": 1, "name": name, "defaults": {"model": "sora-2", "duration": 4},
               "jobs": [{"id": f"{name}-{i}", "prompt": f"A quiet harbour, take {i}"}
                        for i in range(count)]}
        (srv / "jobs" / f"{name}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return srv


def under_env_i(command: list[str], tmp_path: Path, cwd: Path | None = None,
                **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with only PATH, HOME (and ``env``) set, as cron and systemd do."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    extra = [f"{k}={v}" for k, v in env.items()]
    done = subprocess.run([ENV, "-i", f"PATH={PATH}", f"HOME={home}", *extra, *command],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert KEY not in done.stdout + done.stderr
    return done


def test_readme_has_the_nightly_and_trickle_lines():
    """The Cron section shows two crontab lines: the nightly run and the hourly trickle."""
    lines = cron_lines()
    assert len(lines) == 2
    assert "nightly.yaml" in lines[0] and "--wait" in lines[0]
    assert "--max-jobs" in lines[1] and "--wait" in lines[1]
    for line in lines:
        assert "APIMART_API_KEY_FILE=" in line or "--key-file" in line  # cron has no key


def test_nightly_cron_line_runs_as_written(tmp_path, mock_server):
    """The nightly line under env -i against the emulator: exit 0, silent, videos, summary."""
    server = mock_server("--key", KEY)
    srv = setting_up(tmp_path, {"nightly": 3})
    command = place(tmp_path, cron_lines()[0], target=f"--base-url {server.url}")
    done = under_env_i(["/bin/sh", "-c", command], tmp_path)
    assert done.returncode == 0, (command, done.stderr)
    assert (tmp_path / "log" / "nightly.log").read_text() == ""  # -q and all well
    summary = json.loads((tmp_path / "log" / "nightly.json").read_text())
    assert summary["exit_code"] == 0 and summary["needs_action"] == []
    assert statuses(srv / "jobs" / "nightly.ledger.csv") == {"downloaded": 3}
    assert len(list((srv / "jobs" / "videos").rglob("*.mp4"))) == 3


def test_trickle_cron_line_holds_back_then_polls_and_downloads(tmp_path, mock_server):
    """The trickle line twice on 55 jobs: 50 then 5, each exits 0, every video on disk."""
    server = mock_server("--key", KEY)
    srv = setting_up(tmp_path, {"backlog": 55})
    command = place(tmp_path, cron_lines()[1], target=f"--base-url {server.url}")
    first = under_env_i(["/bin/sh", "-c", command], tmp_path)
    assert first.returncode == 0, (command, first.stderr)
    ledger = srv / "jobs" / "backlog.ledger.csv"
    assert statuses(ledger) == {"downloaded": 50}
    second = under_env_i(["/bin/sh", "-c", command], tmp_path)
    assert second.returncode == 0, second.stderr
    assert statuses(ledger) == {"downloaded": 55}
    assert server.submits() == 55
    assert first.stdout == second.stdout == ""


def test_readme_shows_the_shipped_unit_files():
    """README's systemd blocks are the files of examples/systemd/, word for word."""
    shipped = {path.read_text(encoding="utf-8") for path in UNITS.iterdir()}
    assert set(blocks("ini")) == shipped
    assert {p.name for p in UNITS.iterdir()} == {"apimart-batch.service", "apimart-batch.timer"}


def test_units_say_what_a_timer_needs():
    """A oneshot service; a timer with OnCalendar, Persistent and a randomized delay."""
    parsed = units()
    service = parsed["apimart-batch.service"]["Service"]
    timer = parsed["apimart-batch.timer"]["Timer"]
    assert service["Type"] == ["oneshot"]
    assert len(service["ExecStart"]) == 1
    assert timer["OnCalendar"] and timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"]
    assert parsed["apimart-batch.timer"]["Install"]["WantedBy"] == ["timers.target"]
    if ANALYZE:
        calendar = subprocess.run([ANALYZE, "calendar", timer["OnCalendar"][0]],
                                  capture_output=True, text=True, check=False)
        assert calendar.returncode == 0, calendar.stderr


def test_service_execstart_runs_as_written(tmp_path):
    """The service's ExecStart (its folder and Environment) runs under env -i; units verify."""
    srv = setting_up(tmp_path, {"nightly": 3})
    service = units()["apimart-batch.service"]["Service"]
    command = shlex.split(place(tmp_path, service["ExecStart"][0], target="--mock"))
    cwd = Path(place(tmp_path, service["WorkingDirectory"][0], target=""))
    env = dict(shlex.split(place(tmp_path, value, target=""))[0].split("=", 1)
               for value in service.get("Environment", []))
    done = under_env_i(command, tmp_path, cwd=cwd, **env)
    assert done.returncode == 0, (command, done.stderr)
    assert json.loads((srv / "nightly.json").read_text())["exit_code"] == 0
    assert statuses(srv / "jobs" / "nightly.mock.ledger.csv") == {"downloaded": 3}
    if ANALYZE:
        folder = tmp_path / "units"
        folder.mkdir()
        for path in UNITS.iterdir():
            (folder / path.name).write_text(place(tmp_path, path.read_text(), target=""))
        verify = subprocess.run([ANALYZE, "verify", *sorted(map(str, folder.iterdir()))],
                                capture_output=True, text=True, check=False)
        assert verify.returncode == 0, verify.stderr
