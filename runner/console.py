"""Everything a run says to people: diagnostics and progress on stderr.

Progress is a tqdm bar when stderr is a terminal; otherwise (cron) a plain line
every ``interval`` seconds. ``-q`` keeps only warnings and errors. With
``--log-format json`` every line is one JSON object (``level``, ``msg`` and fields).
The final summary is printed to stdout by the command itself.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Never, TextIO

from tqdm import tqdm


class Console:
    """Levelled messages and a progress display for one command.

    Args:
        quiet: keep only warnings and errors (no progress, no info).
        json_lines: print JSON objects instead of text.
        stream: where messages go (stderr).
        interval: seconds between plain progress lines when there is no terminal.
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        json_lines: bool = False,
        stream: TextIO | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet = quiet
        self.json_lines = json_lines
        self.stream = stream or sys.stderr
        self.interval = interval
        self._clock = clock
        self._bar: tqdm[Never] | None = None
        self._last_line = 0.0
        self.problems = 0

    def info(self, msg: str, **fields: object) -> None:
        """Say something a person running by hand wants to see; silent with -q."""
        if not self.quiet:
            self._emit("info", msg, fields)

    def warn(self, msg: str, **fields: object) -> None:
        """Say something that needs attention; always shown."""
        self.problems += 1
        self._emit("warning", msg, fields)

    def error(self, msg: str, **fields: object) -> None:
        """Say why something failed; always shown."""
        self.problems += 1
        self._emit("error", msg, fields)

    def _emit(self, level: str, msg: str, fields: Mapping[str, object]) -> None:
        if self.json_lines:
            line = json.dumps({"level": level, "msg": msg, **fields}, ensure_ascii=False)
        else:
            line = msg if level == "info" else f"{level}: {msg}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def start_progress(self, total: int, what: str) -> None:
        """Begin showing progress towards ``total`` items."""
        self._last_line = self._clock()
        if not self.quiet and not self.json_lines and self.stream.isatty():
            self._bar = tqdm(total=total, desc=what, unit="job", file=self.stream, leave=False)

    def progress(self, done: int, total: int, counts: Mapping[str, int]) -> None:
        """Report that ``done`` of ``total`` items are finished."""
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n)
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(detail, refresh=True)
            return
        now = self._clock()
        if self.quiet or now - self._last_line < self.interval:
            return
        self._last_line = now
        if self.json_lines:
            self._emit("info", "progress", {"done": done, "total": total, **counts})
        else:
            self._emit("info", f"progress: {done}/{total} ({detail or 'starting'})", {})

    def end_progress(self) -> None:
        """Remove the bar (the summary follows on stdout)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
