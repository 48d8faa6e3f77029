"""The ledger: round-trips, complete rows, crash repair, upgrades, locking, mode safety."""

from __future__ import annotations

import asyncio
import csv
import errno
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from clihelpers import TRY_OPEN
from hypothesis import given
from hypothesis import strategies as st

from runner.errors import EXIT_LOCKED, LedgerError, LedgerLockedError
from runner.ledger import store as ledger_module
from runner.ledger.store import (
    COLUMNS,
    Ledger,
    escape_cell,
    iter_rows,
    keep_synced,
    ledger_is_mock,
    open_ledger,
    read_latest,
    unescape_cell,
)

URL = "https://api.apimart.ai"
ROOT = Path(__file__).resolve().parent.parent
HOSTILE = [
    pytest.param("a, b, and c", id="commas"),
    pytest.param('she said "cut!"', id="quotes"),
    pytest.param("line one\nline two", id="newline"),
    pytest.param("line one\r\nline two\r", id="crlf-and-cr"),
    pytest.param("비 오는 서울의 밤, 네온사인", id="korean"),
    pytest.param("🌧️ rain 🎬 on film 👨‍👩‍👧", id="emoji"),
    pytest.param("=cmd|' /C calc'!A0", id="dde-formula"),
    pytest.param("+1", id="plus"),
    pytest.param("-1", id="minus"),
    pytest.param("@SUM(1)", id="at"),
    pytest.param("\t=1+1", id="tab"),
    pytest.param("'quoted start", id="apostrophe"),
    pytest.param("''=1", id="two-apostrophes"),
    pytest.param("", id="empty"),
]


def opened(
    path: Path,
    warnings: list[str] | None = None,
    *,
    mock: bool = False,
    base_url: str = URL,
    clock: Callable[[], float] = time.monotonic,
) -> Ledger:
    """Open ``path`` (by default as a real run against URL), collecting warnings."""
    warn = (warnings if warnings is not None else []).append
    return open_ledger(path, mock=mock, base_url=base_url, warn=warn, clock=clock)


def raw_rows(path: Path) -> list[list[str]]:
    """The file's cells as a plain CSV reader (a spreadsheet) sees them."""
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A ledger path in a fresh directory."""
    return tmp_path / "jobs.ledger.csv"


@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompt_round_trips(path: Path, prompt: str) -> None:
    """A hostile prompt comes back exactly, from the writer, a reopen and read_latest."""
    with opened(path) as ledger:
        ledger.append("job", status="submitting", prompt=prompt)
        assert ledger.latest["job"]["prompt"] == prompt
    assert read_latest(path)["job"]["prompt"] == prompt
    with opened(path) as ledger:
        assert ledger.latest["job"]["prompt"] == prompt


@pytest.mark.parametrize("prompt", HOSTILE)
def test_no_cell_is_a_live_formula(path: Path, prompt: str) -> None:
    """No cell on disk starts with a character a spreadsheet reads as a formula."""
    with opened(path) as ledger:
        ledger.append("job", status="submitting", prompt=prompt, error="-x", cost=-1.5)
    for row in raw_rows(path):
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


@given(st.text())
def test_escape_is_lossless(value: str) -> None:
    """Escaping then unescaping any text gives it back."""
    assert unescape_cell(escape_cell(value)) == value


def test_huge_cell_round_trips(path: Path) -> None:
    """A cell larger than the csv module's default limit still reads back."""
    with opened(path) as ledger:
        ledger.append("a", status="error", error="x" * 300_000)
    assert len(read_latest(path)["a"]["error"]) == 300_000


@given(prompt=st.text(), error=st.text())
def test_any_text_round_trips(prompt: str, error: str) -> None:
    """Any text round-trips through the file."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "l.csv"
        with opened(path) as ledger:
            ledger.append("job", status="error", prompt=prompt, error=error)
        row = read_latest(path)["job"]
        assert (row["prompt"], row["error"]) == (prompt, error)


def test_new_ledger_has_header_only(path: Path) -> None:
    """Opening a missing ledger creates it with our header row."""
    opened(path).close()
    assert path.read_bytes() == (",".join(COLUMNS) + "\r\n").encode()


def test_new_ledger_is_fsynced_with_its_directory(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a ledger fsyncs the file and its directory before any row is written."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    ledger = opened(path)
    assert len(synced) == 2
    ledger.close()


def test_empty_file_gets_a_header(path: Path) -> None:
    """An empty file (a crash right after creating it) becomes a new ledger."""
    path.touch()
    opened(path).close()
    assert raw_rows(path) == [list(COLUMNS)]


def test_last_row_wins(path: Path) -> None:
    """The last row of a job is its state, in memory and when read back."""
    with opened(path) as ledger:
        ledger.append("a", status="submitting")
        ledger.append("b", status="submitting")
        ledger.append("a", status="submitted", task_id="task_1")
    latest = read_latest(path)
    assert (latest["a"]["status"], latest["a"]["task_id"]) == ("submitted", "task_1")
    assert latest["b"]["status"] == "submitting"
    assert [row["job_id"] for row in iter_rows(path)] == ["a", "b", "a"]


def test_rows_carry_the_previous_row_forward(path: Path) -> None:
    """Each row stands alone: the last one still holds the prompt and task id."""
    with opened(path) as ledger:
        ledger.append("a", status="submitting", prompt="rain", model="sora-2", duration=10)
        ledger.append("a", status="submitted", task_id="task_1", attempts=1)
        ledger.append("a", status="completed", progress=100, error=None)
    last = list(iter_rows(path))[-1]
    assert last["prompt"] == "rain"
    assert (last["task_id"], last["duration"], last["attempts"]) == ("task_1", "10", "1")
    assert (last["status"], last["progress"], last["error"]) == ("completed", "100", "")


def test_ledger_fills_time_mode_and_base_url(path: Path) -> None:
    """time (UTC, milliseconds, Z), mock and base_url are set by the ledger."""
    with opened(path, mock=True, base_url="http://127.0.0.1:8765") as ledger:
        ledger.append("a", status="submitting")
        row = ledger.latest["a"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["time"])
    assert (row["mock"], row["base_url"]) == ("1", "http://127.0.0.1:8765")


@pytest.mark.parametrize(
    "field", [pytest.param("bogus", id="unknown"), pytest.param("mock", id="set-by-ledger")]
)
def test_append_refuses_columns_it_owns_or_does_not_know(path: Path, field: str) -> None:
    """A typo or a ledger-owned column is a programming error."""
    with opened(path) as ledger, pytest.raises(ValueError, match=field):
        ledger.append("a", **{field: "x"})


def test_latest_is_read_only(path: Path) -> None:
    """Callers cannot change the ledger's memory behind its back."""
    with opened(path) as ledger:
        ledger.append("a", status="submitting")
        with pytest.raises(TypeError):
            ledger.latest["b"] = {}  # type: ignore[index]


def test_append_after_close_fails(path: Path) -> None:
    """A closed ledger refuses rows instead of losing them."""
    ledger = opened(path)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.append("a", status="submitting")


def test_each_row_reaches_the_os_before_append_returns(path: Path) -> None:
    """Another file handle sees the row before the ledger is closed or synced."""
    with opened(path) as ledger:
        ledger.append("a", status="submitted", task_id="task_1")
        assert read_latest(path)["a"]["task_id"] == "task_1"
        ledger.append("a", status="completed")
        assert read_latest(path)["a"]["status"] == "completed"


def test_fsync_at_most_once_a_second_and_at_close(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends fsync once a second or more has passed since the last fsync, and close fsyncs."""
    now = [100.0]
    synced: list[int] = []
    ledger = opened(path, clock=lambda: now[0])
    monkeypatch.setattr(os, "fsync", synced.append)
    for at, fsyncs in [(100.2, 0), (100.9, 0), (101.0, 1), (101.5, 1), (102.5, 2)]:
        now[0] = at
        ledger.append("a", status="processing", progress=int(at))
        assert len(synced) == fsyncs, at
    ledger.sync()
    ledger.close()
    assert len(synced) == 4


async def test_keep_synced_fsyncs_new_rows_while_idle_and_nothing_else(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that append did not fsync is fsynced by keep_synced; an unchanged ledger is not."""
    ledger = opened(path, clock=lambda: 100.0)
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    syncing = asyncio.create_task(keep_synced([ledger], interval=0))
    try:
        ledger.append("a", status="submitted")
        assert (synced, ledger.unsynced) == ([], True)
        for _ in range(20):
            await asyncio.sleep(0)
        assert (len(synced), ledger.unsynced) == (1, False)
    finally:
        syncing.cancel()
    ledger.close()


def test_failed_fsync_is_a_ledger_error_and_ends_appends(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync error is a LedgerError naming the ledger; no row is accepted after it."""
    ledger = opened(path)
    ledger.append("a", status="submitted", task_id="task_1")

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(LedgerError, match=r"cannot save the ledger to disk \(fsync: Input/output"):
        ledger.sync()
    with pytest.raises(LedgerError, match="write or fsync failed earlier"):
        ledger.append("a", status="pending")
    ledger.close()  # the failure was raised once already
    assert read_latest(path)["a"]["status"] == "submitted"


def append_by_hand(path: Path, data: bytes) -> None:
    """Append raw bytes, as a crash mid-write leaves them."""
    with path.open("ab") as file:
        file.write(data)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"2026-11-25T07:30:00.123Z,c,submi", id="no-newline"),
        pytest.param(
            b'2026-11-25T07:30:00.123Z,c,submitting,,,,,,,,,,,,,,,,"rain\r\n', id="open-quote"
        ),
        pytest.param('2026-11-25T07:30:00.123Z,c,"비'.encode()[:-1], id="cut-utf8"),
    ],
)
def test_torn_last_row_is_repaired(path: Path, tail: bytes) -> None:
    """A row cut short is removed with a warning; complete rows stay; the next row lands cleanly."""
    with opened(path) as ledger:
        ledger.append("a", status="submitted", task_id="task_1", prompt="line\nbreak")
        ledger.append("b", status="submitting")
    complete = path.read_bytes()
    append_by_hand(path, tail)
    warnings: list[str] = []
    with opened(path, warnings) as ledger:
        assert set(ledger.latest) == {"a", "b"}
        assert path.read_bytes() == complete
        ledger.append("c", status="submitting")
    assert len(warnings) == 1
    assert "cut short" in warnings[0]
    assert str(path) in warnings[0]
    assert path.with_name(path.name + ".torn").read_bytes() == tail
    latest = read_latest(path)
    assert (latest["a"]["task_id"], latest["a"]["prompt"]) == ("task_1", "line\nbreak")
    assert latest["c"]["status"] == "submitting"


def test_readers_skip_a_torn_tail_without_touching_the_file(path: Path) -> None:
    """read_latest and iter_rows ignore a row being written and change nothing."""
    with opened(path) as ledger:
        ledger.append("a", status="submitting")
    append_by_hand(path, b'2026-11-25T07:30:00.123Z,b,submitting,"half')
    before = path.read_bytes()
    assert set(read_latest(path)) == {"a"}
    assert len(list(iter_rows(path))) == 1
    assert path.read_bytes() == before


def test_older_header_is_upgraded_keeping_rows_and_unknown_columns(path: Path) -> None:
    """A ledger with fewer columns and a column we do not know is rewritten once, keeping all."""
    path.write_text(
        "job_id,status,task_id,legacy_note\r\n"
        "a,submitted,task_1,keep me\r\n"
        "b,failed,task_2,'=also kept\r\n",
        encoding="utf-8",
    )
    warnings: list[str] = []
    with opened(path, warnings) as ledger:
        assert ledger.latest["a"]["task_id"] == "task_1"
        ledger.append("a", status="completed")
    assert raw_rows(path)[0] == [*COLUMNS, "legacy_note"]
    rows = list(iter_rows(path))
    assert [(r["job_id"], r["legacy_note"]) for r in rows] == [
        ("a", "keep me"),
        ("b", "=also kept"),
        ("a", "keep me"),
    ]
    assert (rows[-1]["status"], rows[-1]["task_id"]) == ("completed", "task_1")
    assert any("added the columns" in w for w in warnings)
    opened(path, warnings).close()
    assert sum("added the columns" in w for w in warnings) == 1  # upgraded once


def test_other_column_order_is_read_by_name(path: Path) -> None:
    """A header with our columns in another order is used as it is, without a rewrite."""
    header = ["status", "job_id", *[c for c in COLUMNS if c not in ("status", "job_id")]]
    path.write_text(",".join(header) + "\r\nsubmitted,a" + "," * (len(header) - 2) + "\r\n")
    with opened(path) as ledger:
        ledger.append("b", status="submitting")
    assert raw_rows(path)[0] == header
    assert {k: v["status"] for k, v in read_latest(path).items()} == {
        "a": "submitted",
        "b": "submitting",
    }


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"name,age\r\nbob,3\r\n", id="other-csv"),
        pytest.param(b"job_id,task\r\n", id="no-status"),
        pytest.param(b"just some words", id="one-torn-line"),
    ],
)
def test_not_a_ledger_is_refused_untouched(path: Path, content: bytes) -> None:
    """A file without job_id and status columns is refused and left exactly as it was."""
    path.write_bytes(content)
    with pytest.raises(LedgerError, match="not an apimart-batch ledger \\(missing columns"):
        opened(path)
    with pytest.raises(LedgerError, match="not an apimart-batch ledger"):
        read_latest(path)
    assert path.read_bytes() == content


def test_spreadsheet_bom_is_accepted(path: Path) -> None:
    """A ledger saved by a spreadsheet as UTF-8 with BOM still reads."""
    path.write_bytes(b"\xef\xbb\xbfjob_id,status\r\na,submitted\r\n")
    assert read_latest(path)["a"]["status"] == "submitted"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(
            lambda p: p.write_bytes(b"job_id,status\r\n\xff\xfe,x\r\n"), "not UTF-8", id="not-utf8"
        ),
        pytest.param(lambda p: p.mkdir(), "is a directory", id="directory"),
        pytest.param(
            lambda p: p.write_bytes(b'job_id,status\r\n"a"b,x\r\nc,d\r\n'),
            "malformed CSV",
            id="malformed",
        ),
    ],
)
def test_unusable_file_is_a_clear_error(
    path: Path, setup: Callable[[Path], object], message: str
) -> None:
    """An unusable ledger is a LedgerError naming the path."""
    setup(path)
    with pytest.raises(LedgerError, match=message) as info:
        opened(path)
    assert str(path) in str(info.value)


def test_fifo_is_refused_by_writers_and_readers(path: Path) -> None:
    """A FIFO as the ledger is a LedgerError naming it, for every entry point; it stays a FIFO."""
    os.mkfifo(path)
    attempts = (
        lambda: opened(path),
        lambda: open_ledger(path, mock=False, base_url=URL, create=False),
        lambda: read_latest(path),
        lambda: list(iter_rows(path)),
    )
    for attempt in attempts:
        with pytest.raises(LedgerError, match="is a FIFO, not a regular file") as info:
            attempt()
        assert str(path) in str(info.value)
    assert stat.S_ISFIFO(path.stat().st_mode)
    assert not path.with_name(path.name + ".lock").exists()


def test_unreadable_file_is_a_clear_error(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger we may not read is a LedgerError with a hint, for writers and readers."""
    path.write_text("job_id,status\r\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    for attempt in (lambda: opened(path), lambda: read_latest(path)):
        with pytest.raises(LedgerError, match=r"cannot (read|open) \(Permission denied\)\n  hint:"):
            attempt()


def test_missing_ledger_is_an_error_for_readers(path: Path) -> None:
    """read_latest of a ledger that does not exist says so (plan checks existence first)."""
    with pytest.raises(LedgerError, match="No such file"):
        read_latest(path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    """An explicit ledger path in a missing directory is refused, not created."""
    path = tmp_path / "nope" / "l.csv"
    with pytest.raises(LedgerError, match="does not exist"):
        opened(path)
    assert not path.parent.exists()


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        pytest.param(True, False, "written by --mock runs", id="real-on-mock-ledger"),
        pytest.param(False, True, "written by real runs", id="mock-on-real-ledger"),
    ],
)
def test_other_mode_is_refused(path: Path, first: bool, second: bool, message: str) -> None:
    """A mock ledger never feeds a real run, and the other way round."""
    with opened(path, mock=first) as ledger:
        ledger.append("a", status="submitted", task_id="task_1")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=message) as info:
        opened(path, mock=second)
    assert "hint: use another --ledger" in str(info.value)
    assert path.read_bytes() == before
    opened(path, mock=first).close()


def test_base_url_change_warns(path: Path) -> None:
    """A run against another API than the ledger's last row warns, naming both."""
    with opened(path) as ledger:
        ledger.append("a", status="submitted")
    warnings: list[str] = []
    opened(path, warnings, base_url="https://other.example").close()
    assert len(warnings) == 1
    assert URL in warnings[0]
    assert "https://other.example" in warnings[0]
    opened(path, warnings, base_url=URL + "/").close()
    assert len(warnings) == 1


def test_mock_runs_do_not_warn_about_the_emulator_port(path: Path) -> None:
    """The emulator listens on a new port each run: no base URL warning for mock ledgers."""
    with opened(path, mock=True, base_url="http://127.0.0.1:1111") as ledger:
        ledger.append("a", status="submitted")
    warnings: list[str] = []
    opened(path, warnings, mock=True, base_url="http://127.0.0.1:2222").close()
    assert warnings == []


@pytest.mark.parametrize("mock", [pytest.param(True, id="mock"), pytest.param(False, id="real")])
def test_ledger_is_mock_reads_the_mode(path: Path, mock: bool) -> None:
    """ledger_is_mock tells status/download which API a ledger belongs to."""
    with opened(path, mock=mock) as ledger:
        ledger.append("a", status="submitted")
    assert ledger_is_mock(path) is mock


def test_create_false_refuses_a_missing_ledger(path: Path) -> None:
    """status/download on a ledger that does not exist fail without creating anything."""
    with pytest.raises(LedgerError, match="no such ledger"):
        open_ledger(path, mock=False, base_url=URL, create=False)
    assert list(path.parent.iterdir()) == []


def test_second_open_in_process_is_locked_out(path: Path) -> None:
    """A second open of a held ledger fails at once with our pid and exit code 75."""
    with opened(path):
        with pytest.raises(LedgerLockedError) as info:
            opened(path)
        assert info.value.pid == os.getpid()
        assert info.value.exit_code == EXIT_LOCKED
        assert f"in use by pid {os.getpid()}" in str(info.value)
    opened(path).close()


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``python -c code args`` in the repository root."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE
    )


HOLD = """
import sys, time
from runner.ledger.store import open_ledger
ledger = open_ledger(sys.argv[1], mock=False, base_url="u")
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_other_process_is_locked_out(path: Path) -> None:
    """Another process trying to open a held ledger exits 75 and names our pid."""
    with opened(path):
        proc = run_python(TRY_OPEN, str(path))
        out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip()) == (EXIT_LOCKED, str(os.getpid()))


@pytest.mark.slow
def test_lock_is_released_when_the_holder_is_killed(path: Path) -> None:
    """kill -9 of the holder frees the ledger: the kernel drops the lock."""
    proc = run_python(HOLD, str(path))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LedgerLockedError) as info:
            opened(path)
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    opened(path).close()


def test_lock_file_is_a_sidecar(path: Path) -> None:
    """The lock lives in <ledger>.lock, holds our pid while open, and the ledger stays pure CSV."""
    lock = path.with_name(path.name + ".lock")
    with opened(path):
        assert lock.read_text().strip() == str(os.getpid())
    assert lock.read_text() == ""
    assert ledger_module.read_latest(path) == {}


CRASH = """
import sys
from runner.ledger.store import open_ledger
ledger = open_ledger(sys.argv[1], mock=False, base_url="u")
for n in range(10**9):
    prompt = PROMPT * (n % 20)
    ledger.append(f"job-{n % 7}", status="submitted", task_id=f"task_{n}", prompt=prompt)
    if n == 300:
        print("written", flush=True)
"""
CRASH_PROMPT = '비,"\r\n='


@pytest.mark.slow
def test_rows_survive_kill_9_mid_run(path: Path) -> None:
    """Every row appended before a kill -9 is in the file and reads back whole."""
    proc = run_python(f"PROMPT = {CRASH_PROMPT!r}\n{CRASH}", str(path))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "written"
    proc.kill()
    proc.communicate(timeout=30)
    with opened(path, base_url="u") as ledger:
        assert len(list(iter_rows(path))) > 300
        for job_id, row in ledger.latest.items():
            n = int(row["task_id"].removeprefix("task_"))
            assert (job_id, row["prompt"]) == (f"job-{n % 7}", CRASH_PROMPT * (n % 20))
