"""Shared parts of the chaos suite: the chaos key, a secret scan and the invariant checker.

The invariants (issue 8) are checked by :func:`check_ledger` after every round of a kill
loop, from two sources only: the ledger on disk, and the emulator's ``/_emulator/stats``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clihelpers import BIN, KEY

from runner.ledger.store import COLUMNS, iter_rows

#: A key no real account has, long and distinctive, so that any copy of it is found.
CHAOS_KEY = "sk-chaos-5f3e9a1c7b2d48e6a0c4f9b1d3e7a2c8"
#: Any 16 characters in a row of the key's random part count as a leak too.
_KEY_PARTS = tuple(CHAOS_KEY[i : i + 16] for i in range(len("sk-chaos-"), len(CHAOS_KEY) - 15))
#: ``Bearer`` followed by something token-like that is not an obvious redaction.
_BEARER = re.compile(r"Bearer\s+(?![*•x.…<\[(]|redacted|REDACTED|hidden|\*\*\*)\S{6,}")

#: Every status a ledger row may have (README, "Statuses").
KNOWN_STATUSES = frozenset({
    "submitting", "submitted", "rejected", "error", "unknown", "pending", "processing",
    "completed", "failed", "cancelled", "not_found", "downloaded", "expired",
})  # fmt: skip
#: Statuses that say no task was created (yet): a task id on such a row cannot be trusted.
NO_TASK = frozenset({"submitting", "error", "rejected"})
#: Statuses that exist only once a task was created: they must carry its id.
WITH_TASK = frozenset({
    "submitted", "pending", "processing", "completed", "failed", "cancelled", "not_found",
    "downloaded", "expired",
})  # fmt: skip
AMBIGUOUS = frozenset({"submitting", "unknown"})


def chaos_env() -> dict[str, str]:
    """The environment of every chaos subprocess: ours, minus APIMART_*, plus the chaos key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIMART_")}
    env["APIMART_API_KEY"] = CHAOS_KEY
    return env


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``apimart-batch ARGS...`` in ``cwd`` with the chaos key; the caller ends it."""
    return subprocess.Popen([BIN, *args], cwd=cwd, env=chaos_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``apimart-batch ARGS...`` in ``cwd`` with the chaos key, to the end."""
    return subprocess.run([BIN, *args], cwd=cwd, env=chaos_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


# -- secret scan ---------------------------------------------------------------------------


@dataclass
class SecretScan:
    """Collects every place where a key (or a ``Bearer`` token) was found."""

    leaks: list[str] = field(default_factory=list)
    texts: int = 0
    files: int = 0

    def text(self, where: str, text: str | bytes) -> None:
        """Scan one captured output or file content."""
        self.texts += 1
        data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for secret in (CHAOS_KEY, KEY, *_KEY_PARTS):
            if secret in data:
                self.leaks.append(f"{where}: holds {secret[:12]}...")
                break
        if found := _BEARER.search(data):
            self.leaks.append(f"{where}: holds {found[0][:16]!r}...")

    def tree(self, root: Path) -> None:
        """Scan every file name and every file's content under ``root``."""
        for path in sorted(root.rglob("*")):
            self.files += 1
            self.text(f"file name {path.relative_to(root)}", path.name)
            if path.is_file() and not path.is_symlink():
                self.text(str(path.relative_to(root)), path.read_bytes())

    def process(self, where: str, out: str | None, err: str | None) -> None:
        """Scan a process's stdout and stderr."""
        self.text(f"{where} stdout", out or "")
        self.text(f"{where} stderr", err or "")


# -- the ledger, strictly ------------------------------------------------------------------


def strict_problems(path: Path, *, header: Iterable[str] = COLUMNS) -> list[str]:
    """What makes the ledger at ``path`` not strictly valid; ``[]`` when it is.

    Strict: UTF-8, exactly ``header``, every row with as many cells as the header, a known
    status, a job id, and a task id exactly where the status says a task exists. The
    runner's own reader must also accept it. A last row cut short by a SIGKILL (no
    newline at the end) is not a problem: the next open repairs it.
    """
    problems: list[str] = []
    try:
        rows = list(iter_rows(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the reader is the finding
        return [f"{path.name}: the runner's reader fails: {type(exc).__name__}: {exc}"]
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [f"{path.name}: not UTF-8 ({exc})"]
    records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    expected = list(header)
    if not records or records[0] != expected:
        return [f"{path.name}:1: header is {records[:1]}, not the ledger's columns"]
    for line, record in enumerate(records[1:], start=2):
        if len(record) != len(expected):
            problems.append(f"{path.name}:{line}: {len(record)} cells, header has "
                            f"{len(expected)}")
            continue
        row = dict(zip(expected, record, strict=True))
        status, task = row["status"], row["task_id"]
        if not row["job_id"]:
            problems.append(f"{path.name}:{line}: empty job_id")
        if status not in KNOWN_STATUSES:
            problems.append(f"{path.name}:{line}: unknown status {status!r}")
        elif status in NO_TASK and task:
            problems.append(f"{path.name}:{line}: task id {task!r} on a {status!r} row")
        elif status in WITH_TASK and not task:
            problems.append(f"{path.name}:{line}: no task id on a {status!r} row")
    if len(rows) != len(records) - 1:
        problems.append(f"{path.name}: the runner read {len(rows)} rows, csv {len(records) - 1}")
    return problems


# -- the invariants ------------------------------------------------------------------------


@dataclass
class Check:
    """The invariants of one ledger against the emulator, at one moment.

    ``unsent_ambiguous`` are jobs held as ``unknown`` (or ``submitting``) for which the
    server never created a task. Every answer this emulator can give that leaves a POST's
    fate unknown (500/502/504, reset, slow, HTML 200) comes after the task is created, so
    a POST that reached it and was answered ambiguously always shows up as a task. Such a
    job is therefore wrongly ``unknown`` unless the run that wrote its row was killed
    outright (SIGKILL): the ``submitting`` row is written before the POST, by design.
    """

    duplicates: dict[str, int] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    unsent_ambiguous: set[str] = field(default_factory=set)
    ambiguous: set[str] = field(default_factory=set)
    invalid: list[str] = field(default_factory=list)
    latest: dict[str, dict[str, str]] = field(default_factory=dict)

    def violations(self) -> list[str]:
        """The broken invariants, in words (the write-ahead ``unknown`` case is judged by
        the caller, who knows how the round ended)."""
        found = [f"job {job} has {n} tasks" for job, n in sorted(self.duplicates.items())]
        return found + list(self.lost.values()) + self.invalid


def check_ledger(ledger: Path, stats: Mapping[str, Any], keys: Mapping[str, str]) -> Check:
    """Check the invariants of ``ledger`` (jobs ``keys``: Idempotency-Key -> job id).

    - no job has two tasks (tasks counted per Idempotency-Key as sent, and per body);
    - every task the server created for these jobs is the task id of its job's last row,
      or that job is ``unknown``/``submitting``;
    - the ledger is strictly valid (:func:`strict_problems`).
    """
    check = Check()
    if not ledger.exists():
        return check
    check.invalid = strict_problems(ledger)
    try:
        check.latest = {row["job_id"]: row for row in iter_rows(ledger)}
    except Exception as exc:  # noqa: BLE001 - reported by strict_problems already
        check.invalid.append(f"{ledger.name}: unreadable ({type(exc).__name__})")
        return check
    by_task: dict[str, str | None] = stats["idempotency_key_by_task"]
    per_key = Counter(key for key in by_task.values() if key in keys)
    check.duplicates = {keys[key]: n for key, n in per_key.items() if n > 1}
    if stats["max_tasks_per_body"] > 1:
        check.duplicates["(some body)"] = stats["max_tasks_per_body"]
    created = {key for key in per_key}
    for task, key in by_task.items():
        if key not in keys:
            continue
        job = keys[key]
        row = check.latest.get(job)
        if row is None:
            check.lost[task] = f"task {task} of job {job}: the job has no row at all"
        elif row["task_id"] != task and row["status"] not in AMBIGUOUS:
            check.lost[task] = (f"task {task} of job {job}: its last row is "
                                f"{row['status']!r} with task id {row['task_id']!r}")
    for job, row in check.latest.items():
        if row["status"] in AMBIGUOUS:
            check.ambiguous.add(job)
            if row["idempotency_key"] not in created:
                check.unsent_ambiguous.add(job)
    return check
