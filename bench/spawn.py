"""Run one command from a small process and write its wall time and rusage to a JSON file.

Why a separate process: the kernel keeps a process's peak RSS across ``exec``, so a child
forked from the harness starts with the harness's size as its ``ru_maxrss``. The harness grows
as it reads emulator stats and ledgers (to 150 MB), which would then be reported as the peak
of ``python -c pass``. This spawner is exec'd fresh (about 10 MB), so a command it forks
inherits only that floor. It keeps stdin, stdout, stderr, the working folder and the
environment it was given.
Usage: ``python bench/spawn.py REPORT.json -- ARGV...``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    """Run ``argv[2:]`` (after ``--``) and write its figures to ``argv[0]``."""
    report, command = argv[0], argv[2:]
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    doc = {
        "rc": proc.returncode,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
    }
    with open(report, "w", encoding="utf-8") as f:  # noqa: PTH123 - kept to the lightest imports
        json.dump(doc, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
