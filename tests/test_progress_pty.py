"""The progress display under a real pseudo-terminal: one bar whose counts always add up."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

from clihelpers import BIN, write_manifest

from runner.console import PHASES, Console, Tally

#: One refresh of the bar: percentage, a 10-cell bar, done/total, then the counts.
BAR = re.compile(r"^\s*\d+%\|.{10}\| (\d+)/(\d+) ((?:[a-z]+:\d+ ?)*)\s*$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: The bar's names of the phases ``run --wait`` is not done with.
OPEN = ("q", "sub", "run", "ok")


def run_in_pty(args: list[str], cwd: Path, columns: int = 80) -> tuple[int, str]:
    """Run ``apimart-batch ARGS`` with stdout and stderr on a pty of ``columns`` columns."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    env["COLUMNS"] = str(columns)
    process = subprocess.Popen([BIN, *args], cwd=cwd, env=env, stdin=terminal, stdout=terminal,
                               stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    code = process.wait(timeout=120)
    return code, b"".join(chunks).decode("utf-8", "replace")


def refreshes(output: str) -> list[tuple[int, int, dict[str, int], str]]:
    """Every bar drawn: (done, total, counts by short name, the line as displayed)."""
    found = []
    for piece in re.split(r"[\r\n]", ANSI.sub("", output)):
        match = BAR.match(piece)
        if match:
            counts = {name: int(n) for name, n in re.findall(r"([a-z]+):(\d+)", match[3])}
            found.append((int(match[1]), int(match[2]), counts, piece.rstrip()))
    return found


def test_run_wait_bar_adds_up_at_every_refresh_and_fits_80_columns(tmp_path):
    """run --wait at 80 columns: every refresh adds up, counts done right, fits, ends at dl."""
    manifest = write_manifest(tmp_path, 40)
    code, output = run_in_pty(["run", manifest, "--mock", "--wait", "-j", "4"], tmp_path)
    assert code == 0, output
    drawn = refreshes(output)
    assert len(drawn) >= 3, output
    for done, total, counts, line in drawn:
        assert total == 40, line
        assert sum(counts.values()) == total, line
        assert done == total - sum(counts.get(name, 0) for name in OPEN), line
        assert len(line) <= 80, line
    assert drawn[-1][2] == {"dl": 40}, drawn[-1]
    assert "40 downloaded" in output


def test_rerun_counts_earlier_jobs_as_done(tmp_path):
    """A rerun with more jobs starts from what the ledger holds: the earlier videos count."""
    manifest = write_manifest(tmp_path, 3)
    assert run_in_pty(["run", manifest, "--mock", "--wait"], tmp_path)[0] == 0
    manifest = write_manifest(tmp_path, 6)
    code, output = run_in_pty(["run", manifest, "--mock", "--wait"], tmp_path)
    assert code == 0, output
    drawn = refreshes(output)
    assert drawn[0][:3] == (3, 6, {"q": 3, "dl": 3}), drawn[0]
    assert drawn[-1][:3] == (6, 6, {"dl": 6}), drawn[-1]


class Pipe(io.StringIO):
    """A stream that is not a terminal."""


def test_plain_lines_off_a_terminal_name_every_phase():
    """Off a terminal the line spells out the phases, and only when the counts changed."""
    tally = Tally({"a": "", "b": "submitted", "c": "downloaded"}, open_phases=("queued",))
    stream = Pipe()
    console = Console(stream=stream, interval=0)
    console.start_progress(tally)
    console.progress()  # nothing changed yet: no line
    tally.move("a", "failed")
    console.progress()
    console.progress()
    console.end_progress()
    assert stream.getvalue() == "progress: 3/3 done (1 submitted, 1 downloaded, 1 failed)\n"
    assert set(tally.counts) <= set(PHASES)
