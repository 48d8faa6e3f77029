"""Measuring a child process, and the emulator it talks to, on Linux.

``measure`` runs one command through ``bench/spawn.py``, which reads its wall time, its CPU
seconds and its peak RSS from ``os.wait4`` (the kernel's own accounting of that child and the
children it waited for).
During the run it also reads ``/proc/stat`` and the emulator's ``/proc/PID/stat``, so each
sample says how busy the emulator was and how many cores other processes took: on a shared
machine that is what makes a slow figure explainable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["Emulator", "Sample", "cli", "measure", "python"]

_TICK = os.sysconf("SC_CLK_TCK")
SPAWN = Path(__file__).with_name("spawn.py")
#: Any string serves as the emulator's key; it is never a real one.
BENCH_KEY = "bench-key-not-a-secret"


def cli() -> list[str]:
    """The ``apimart-batch`` console script beside this Python, else ``python -m runner``."""
    script = Path(sys.executable).with_name("apimart-batch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner"]


def python() -> list[str]:
    """This Python, for the naive client, the floor and ``python -c pass``."""
    return [sys.executable]


def bench_env() -> dict[str, str]:
    """The environment of every child: ours, less any real key or target, plus the bench key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    env["APIMART_API_KEY"] = BENCH_KEY
    return env


def _busy_seconds() -> float:
    """CPU seconds every core spent busy since boot (``/proc/stat``; idle and iowait excluded)."""
    with open("/proc/stat", encoding="ascii") as f:  # noqa: PTH123 - read per sample, kept short
        cells = [int(x) for x in f.readline().split()[1:]]
    return (sum(cells[:8]) - cells[3] - cells[4]) / _TICK


def _process_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return 0.0
    # The command name may hold spaces; the fields after its closing paren are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True, slots=True)
class Sample:
    """One run of one command: wall and CPU seconds, peak RSS, and the machine around it."""

    argv: list[str]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_kb: int
    #: CPU seconds the emulator spent during the run (0 without one).
    emulator_cpu_s: float
    #: Cores other processes kept busy during the run, on average.
    others_cores: float

    @property
    def cpu_s(self) -> float:
        """User + system seconds of the child."""
        return self.user_s + self.sys_s

    def as_json(self) -> dict[str, Any]:
        """The sample as a JSON object (argv shortened to the command's name and flags)."""
        doc = asdict(self)
        doc["argv"] = [Path(a).name if a.startswith("/") else a for a in self.argv]
        doc["cpu_s"] = round(self.cpu_s, 4)
        return doc


class Failed(RuntimeError):
    """A benchmarked command ended with an exit code it should not have."""


def measure(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    emulator: Emulator | None = None,
    ok: Sequence[int] = (0,),
    stdout: Path | None = None,
    log: Path | None = None,
) -> Sample:
    """Run ``argv`` to its end and measure it; ``Failed`` (with stderr) if its code is not ``ok``.

    stdout goes to ``stdout`` (else nowhere), stderr to ``log`` (else a pipe read at the end).
    """
    out: IO[bytes] | int = stdout.open("wb") if stdout else subprocess.DEVNULL
    err: IO[bytes] | int = log.open("wb") if log else subprocess.PIPE
    fd, report_name = tempfile.mkstemp(prefix="bench-spawn-", suffix=".json")
    os.close(fd)
    report = Path(report_name)
    emu_before = _process_seconds(emulator.pid) if emulator else 0.0
    busy_before = _busy_seconds()
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Through the spawner, so the child's peak RSS is its own (see bench/spawn.py).
        spawner = [sys.executable, str(SPAWN), str(report), "--", *argv]
        proc = subprocess.Popen(
            spawner, cwd=cwd, env=dict(env or bench_env()), stdout=out, stderr=err
        )
        # A full stderr pipe would block the child; drain it while waiting when nobody logs.
        errors = proc.stderr.read() if proc.stderr is not None else b""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        busy = _busy_seconds() - busy_before
        emu = (_process_seconds(emulator.pid) - emu_before) if emulator else 0.0
        child = json.loads(report.read_text(encoding="utf-8")) if proc.returncode == 0 else None
    finally:
        report.unlink(missing_ok=True)
        for stream in (out, err):
            if not isinstance(stream, int):
                stream.close()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
    rc = child["rc"] if child else proc.returncode
    if child is None or rc not in ok:
        text = errors.decode(errors="replace") if errors else (log.read_text() if log else "")
        msg = f"{' '.join(argv[:4])} ... exited {rc}:\n{text[-2000:]}"
        raise Failed(msg)
    wall = child["wall_s"]
    # The spawner's own CPU (tens of ms) counts as ours, not as another process's.
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(
        argv=list(argv),
        rc=rc,
        wall_s=round(wall, 4),
        user_s=round(child["user_s"], 4),
        sys_s=round(child["sys_s"], 4),
        max_rss_kb=int(child["max_rss_kb"]),
        emulator_cpu_s=round(emu, 4),
        others_cores=round(max(0.0, busy - cpu - emu) / wall, 3) if wall > 0 else 0.0,
    )


class Emulator:
    """``apimart-batch mock-server --port 0 FLAGS`` in its own process, for a ``with`` block.

    ``url`` is its base URL once it listens; ``stats()`` reads ``GET /_emulator/stats``.
    """

    def __init__(self, flags: Sequence[str], *, log: Path) -> None:
        self.flags = list(flags)
        self._log = log
        self._proc: subprocess.Popen[str] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        """The emulator's process id."""
        if self._proc is None:
            msg = "the emulator is not running"
            raise RuntimeError(msg)
        return self._proc.pid

    def __enter__(self) -> Emulator:
        argv = [*cli(), "mock-server", "--port", "0", *self.flags]
        with self._log.open("w") as log:
            self._proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, env=bench_env()
            )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        found = re.search(r"--base-url (\S+)", line)
        if not found:
            self.__exit__(None, None, None)
            msg = f"mock-server did not say where it listens: {line!r}\n{self._log.read_text()}"
            raise RuntimeError(msg)
        self.url = found.group(1)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (``requests``, ``faults``, ...), less the per-task maps."""
        url = self.url + "/_emulator/stats"
        with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 - loopback emulator
            doc: dict[str, Any] = json.load(answer)
        for big in ("idempotency_key_by_task", "tasks_per_key", "uploads_per_sha256"):
            doc.pop(big, None)
        return doc
