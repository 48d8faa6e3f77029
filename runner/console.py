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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
        self._last_refresh = 0.0
        self._tally: Tally | None = None
        self._shown: tuple[int, ...] | None = None
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

    def start_progress(self, tally: Tally) -> None:
        """Begin showing ``tally``; ``progress`` shows it again after each change."""
        self._tally = tally
        self._shown = self._snapshot(tally)
        self._last_line = self._last_refresh = self._clock()
        if not self.quiet and not self.json_lines and self.stream.isatty():
            # A fixed bar and short counts: at 80 columns the bar keeps its 10 cells.
            self._bar = tqdm(total=tally.total, initial=tally.done, desc=self._short(),
                             file=self.stream, leave=False, bar_format=BAR_FORMAT)

    def progress(self, *, force: bool = False) -> None:
        """Show the tally again if it changed: the bar at most 10 times a second, the
        plain line (no terminal) at most every ``interval`` seconds."""
        tally = self._tally
        if tally is None or self.quiet:
            return
        # Called for every ledger row: the clock is read before the counts are.
        now = self._clock()
        if self._bar is not None:
            if not force and now - self._last_refresh < _REFRESH:
                return
        elif now - self._last_line < self.interval:
            return
        snapshot = self._snapshot(tally)
        if snapshot == self._shown:
            return
        if self._bar is not None:
            self._shown, self._last_refresh = snapshot, now
            self._bar.n = tally.done
            self._bar.set_description_str(self._short(), refresh=True)
            return
        self._shown, self._last_line = snapshot, now
        if self.json_lines:
            self._emit("info", "progress", {"done": tally.done, "total": tally.total,
                                            **{p: tally.counts[p] for p in PHASES}})
        else:
            detail = ", ".join(f"{tally.counts[p]} {p}" for p in PHASES if tally.counts[p])
            self._emit("info", f"progress: {tally.done}/{tally.total} done ({detail})", {})

    @staticmethod
    def _snapshot(tally: Tally) -> tuple[int, ...]:
        return (tally.done, *(tally.counts[p] for p in PHASES))

    def _short(self) -> str:
        tally = self._tally
        assert tally is not None
        return " ".join(f"{_SHORT[p]}:{tally.counts[p]}" for p in PHASES if tally.counts[p])

    def end_progress(self) -> None:
        """Show the last counts, then remove the bar (the summary follows on stdout)."""
        if self._bar is not None:
            self.progress(force=True)
        self._tally = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


#: Where a ledger status stands in the progress display (no row yet: ``queued``, as a
#: job being submitted is); every other status is a job that ended badly: ``failed``.
_PHASE_OF = {"": "queued", "submitting": "queued", "submitted": "submitted",
             "pending": "running", "processing": "running", "completed": "completed",
             "downloaded": "downloaded"}
#: The phases, in the pipeline's order; each job is in exactly one.
PHASES = ("queued", "submitted", "running", "completed", "downloaded", "failed")
#: The phases ``run --wait`` and ``status --wait`` are not done with (a video to come).
OPEN_WITH_WAIT = ("queued", "submitted", "running", "completed")
#: How the bar names them, to fit 80 columns.
_SHORT = {"queued": "q", "submitted": "sub", "running": "run", "completed": "ok",
          "downloaded": "dl", "failed": "fail"}
#: Fixed-width bar, then done/total and the counts: nothing squeezes the bar.
BAR_FORMAT = "{percentage:3.0f}%|{bar:10}| {n}/{total} {desc}"
#: Seconds between two refreshes of the bar.
_REFRESH = 0.1


def phase_of(status: str) -> str:
    """The progress phase of a job whose latest ledger status is ``status``."""
    return _PHASE_OF.get(status, "failed")


class Tally:
    """Where each job of one command stands, by phase; the counts always add up to ``total``.

    Args:
        statuses: every job of the command and its latest status ("" if none yet).
        open_phases: phases whose jobs this command has not finished with; ``done`` counts
            the others (e.g. ``run`` alone is done with a job once it is submitted).
    """

    def __init__(self, statuses: Mapping[str, str], *, open_phases: Iterable[str]) -> None:
        self._phase = {job: phase_of(status) for job, status in statuses.items()}
        self.counts: Counter[str] = Counter(self._phase.values())
        self.total = len(self._phase)
        self._open = frozenset(open_phases)

    def move(self, job_id: str, status: str) -> bool:
        """Record a job's new status; False if the job is not one of this command's."""
        old = self._phase.get(job_id)
        if old is None:
            return False
        new = phase_of(status)
        if new != old:
            self.counts[old] -= 1
            self.counts[new] += 1
            self._phase[job_id] = new
        return True

    @property
    def done(self) -> int:
        """Jobs this command is finished with."""
        return self.total - sum(self.counts[p] for p in self._open)
