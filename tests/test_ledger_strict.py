"""The ledger, strictly (issue 8): one lock per file, bad ledgers refused, torn rows proven."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from clihelpers import TRY_OPEN

from runner.api import client as api
from runner.engine import poll, resume
from runner.errors import EXIT_LOCKED, EXIT_USAGE, LedgerError, LedgerLockedError
from runner.ledger.store import (
    COLUMNS,
    MAX_ROW,
    STATUSES,
    Ledger,
    iter_rows,
    open_ledger,
    read_latest,
    row_crc,
    write_csv,
)

URL = "https://api.apimart.ai"
ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT = "0123456789abcdef"
KEY = "apimart-batch-" + "ab" * 20


def opened(path: Path, warnings: list[str] | None = None) -> Ledger:
    """Open ``path`` as a real run against URL, collecting warnings."""
    warn = (warnings if warnings is not None else []).append
    return open_ledger(path, mock=False, base_url=URL, warn=warn)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A ledger path in a fresh directory."""
    return tmp_path / "L.csv"


def healthy(path: Path) -> bytes:
    """Write a five-row ledger as the runner does and return its bytes.

    Line 2: a submitting, 3: a submitted task_a, 4: b submitting, 5: b error, 6: a completed.
    """
    with opened(path) as ledger:
        ledger.append("a", status="submitting", fingerprint=FINGERPRINT, idempotency_key=KEY,
                      request='{"prompt":"rain"}', attempts=0)
        ledger.append("a", status="submitted", task_id="task_a", attempts=1, http_status=200)
        ledger.append("b", status="submitting", fingerprint=FINGERPRINT, attempts=0)
        ledger.append("b", status="error", attempts=1, http_status=503, error="busy")
        ledger.append("a", status="completed", progress=100)
    return path.read_bytes()


def records(data: bytes) -> list[list[str]]:
    """The file's records, as a spreadsheet reads them."""
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def rebuild(rows: list[list[str]]) -> bytes:
    """Records back to bytes, CRLF line ends (crc cells left as they were)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def set_cell(line: int, column: str, value: str) -> Callable[[bytes], bytes]:
    """An edit: put ``value`` into ``column`` on ``line`` (1 is the header)."""
    def edit(data: bytes) -> bytes:
        rows = records(data)
        rows[line - 1][rows[0].index(column)] = value
        return rebuild(rows)
    return edit


def rename(old: str, new: str) -> Callable[[bytes], bytes]:
    """An edit of the header: the column ``old`` is called ``new``."""
    return set_cell(1, old, new)


def swap(a: str, b: str) -> Callable[[bytes], bytes]:
    """An edit of the header: the names of columns ``a`` and ``b`` trade places."""
    def edit(data: bytes) -> bytes:
        rows = records(data)
        i, j = rows[0].index(a), rows[0].index(b)
        rows[0][i], rows[0][j] = b, a
        return rebuild(rows)
    return edit


def insert(line: int, text: bytes | Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """An edit: ``text`` becomes line ``line`` (a function gets the file's header line)."""
    def edit(data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        lines.insert(line - 1, text(lines[0]) if callable(text) else text)
        return b"".join(lines)
    return edit


def on_line(line: int, change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """An edit of line ``line``'s bytes."""
    def edit(data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        lines[line - 1] = change(lines[line - 1])
        return b"".join(lines)
    return edit


REFUSED = [
    pytest.param(swap("job_id", "status"), 2, "status 'a' is not a status apimart-batch writes",
                 id="swapped-job_id-status"),
    pytest.param(swap("task_id", "error"), 5, "status 'error' with task id 'busy', but",
                 id="swapped-task_id-error"),
    pytest.param(swap("fingerprint", "idempotency_key"), 2, "fingerprint 'apimart-batch-",
                 id="swapped-fingerprint-key"),
    pytest.param(rename("error", "task_id"), 1, "column 'task_id' appears twice",
                 id="duplicated-column"),
    pytest.param(rename("cost", " Cost"), 1, "column ' Cost' is not one of ours, but looks like",
                 id="look-alike-column"),
    pytest.param(insert(4, lambda header: header), 4, "a header row in the middle",
                 id="header-in-the-middle"),
    pytest.param(set_cell(3, "status", "queued"), 3, "status 'queued' is not a status",
                 id="unknown-status"),
    pytest.param(set_cell(3, "status", "Submitted"), 3, "status 'Submitted' is not",
                 id="capitalised-status"),
    pytest.param(set_cell(3, "status", ""), 3, "status '' is not", id="empty-status"),
    pytest.param(set_cell(3, "status", " "), 3, "status ' ' is not", id="blank-status"),
    pytest.param(set_cell(3, "status", "submitted "), 3, "remove the spaces around 'submitted'",
                 id="status-with-a-space"),
    pytest.param(set_cell(4, "job_id", "b "), 4, "job id 'b ' has spaces around it: a rerun",
                 id="job-id-with-a-space"),
    pytest.param(set_cell(4, "job_id", ""), 4, "job id '' is not one", id="empty-job-id"),
    pytest.param(set_cell(5, "task_id", "task_b"), 5, "but no earlier row of the job has a task",
                 id="task-id-on-error-row"),
    pytest.param(set_cell(4, "task_id", "task_b"), 4, "but that status says no task exists",
                 id="task-id-on-submitting-row"),
    pytest.param(
        lambda data: set_cell(5, "task_id", "task_b")(set_cell(5, "status", "rejected")(data)),
        5, "status 'rejected' with task id 'task_b', but", id="task-id-on-rejected-row"),
    pytest.param(set_cell(6, "task_id", ""), 6, "this 'completed' row drops it, so a rerun",
                 id="row-drops-the-task-id"),
    pytest.param(set_cell(6, "task_id", "task_z"), 6, "this 'completed' row names 'task_z'",
                 id="row-changes-the-task-id"),
    pytest.param(set_cell(3, "task_id", "../../v1/balance"), 3, "'../../v1/balance' is not a task",
                 id="task-id-with-a-path"),
    pytest.param(set_cell(3, "task_id", "t" * 200), 3, "is not a task id", id="task-id-too-long"),
    pytest.param(set_cell(3, "task_id", "task\r\na"), 3, "is not a task id", id="task-id-crlf"),
    pytest.param(set_cell(5, "attempts", "busy"), 5, "attempts 'busy' is not a number",
                 id="shifted-attempts"),
    pytest.param(set_cell(2, "mock", "yes"), 2, "mock 'yes' is not 0 or 1", id="mock-not-0-or-1"),
    pytest.param(set_cell(2, "request", "rain"), 2, "request 'rain' is not a JSON object",
                 id="request-not-json"),
    pytest.param(on_line(3, lambda line: line.rstrip(b"\r\n") + b",x,y\r\n"), 3,
                 "cells, but the header has", id="extra-cells"),
    pytest.param(insert(3, b"this is not a ledger row\r\n"), 3, "1 cells, but the header has",
                 id="junk-line"),
    pytest.param(insert(3, b"J" * (2 * MAX_ROW) + b"\r\n"), 3, "a row longer than 1024 KiB",
                 id="junk-line-2-MiB"),
    pytest.param(on_line(3, lambda line: line.replace(b",submitted,", b',"submitted,')), 3,
                 "a quoted cell opened on this line runs to the end", id="open-quote-mid-file"),
    pytest.param(lambda data: data + b"x" * (MAX_ROW + 1), 7, "a row longer than",
                 id="huge-unterminated-tail"),
]


@pytest.mark.parametrize(("edit", "line", "message"), REFUSED)
def test_a_ledger_that_does_not_look_like_ours_is_refused_untouched(
    path: Path, edit: Callable[[bytes], bytes], line: int, message: str
) -> None:
    """Writers and readers refuse it with exit 2, FILE:LINE, what and a hint; no byte changes."""
    data = edit(healthy(path))
    path.write_bytes(data)
    for attempt in (lambda: opened(path), lambda: read_latest(path)):
        with pytest.raises(LedgerError) as info:
            attempt()
        text = str(info.value)
        assert text.startswith(f"{path}:{line}: "), text
        assert message in text
        assert "\n  hint: " in text
        assert info.value.exit_code == EXIT_USAGE
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["L.csv", "L.csv.lock"]


def test_harmless_oddities_are_accepted_and_extra_columns_kept(path: Path) -> None:
    """BOM, LF line ends, blank lines, every cell quoted and a column of our own all load.

    BOM, line ends and quoting pass silently; blank lines and the extra column warn once
    each, at their first line.
    """
    rows = records(healthy(path))
    rows[0].append("notes")
    for row in rows[1:]:
        row.append("mine")
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    lines = buffer.getvalue().splitlines(keepends=True)
    text = "".join([*lines[:3], "\n", "\r\n", *lines[3:]])  # blank lines 4 and 5
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    warnings: list[str] = []
    with opened(path, warnings) as ledger:
        assert (ledger.latest["a"]["status"], ledger.latest["a"]["task_id"]) == (
            "completed", "task_a")
        ledger.append("b", status="submitting")
    assert warnings == [
        f"{path}:1: columns apimart-batch does not write: 'notes'; they are kept as they are",
        f"{path}:4: a blank line; it is skipped (2 blank lines like this; this is the first)",
    ]
    assert read_latest(path)["b"]["notes"] == "mine"
    assert records(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))[0][-1] == "notes"


def test_a_ledger_as_written_warns_of_nothing(path: Path) -> None:
    """The runner's own rows (spreadsheet-escaped cells, tags, downloads) raise no warning."""
    healthy(path)
    with opened(path) as ledger:
        ledger.append("a", status="downloaded", file="/v/a.mp4", bytes=4096, file_sha256="ab" * 32,
                      metadata='{"sku":"=1+1"}', error="kept the old file aside")
        ledger.append("c", status="submitting", prompt="-a cat", metadata="")
    warnings: list[str] = []
    opened(path, warnings).close()
    read_latest(path, warnings.append)
    assert warnings == []


#: (an edit of the healthy ledger, the warning's line, its text, the count shown).
ODDITIES = [
    pytest.param(set_cell(5, "error", "the server was busy"), 5,
                 "a row changed since apimart-batch wrote it (its crc no longer matches", None,
                 id="edited-note"),
    pytest.param(lambda d: set_cell(3, "attempts", "7")(set_cell(6, "progress", "99")(d)), 3,
                 "a row changed since apimart-batch wrote it", 2, id="two-edited-rows"),
    pytest.param(set_cell(6, "progress", "100 "), 6, "spaces around the value of column "
                 "'progress'", None, id="trailing-space"),
    pytest.param(set_cell(2, "model", " sora-2"), 2, "spaces around the value of column 'model'",
                 None, id="leading-space"),
    pytest.param(set_cell(6, "metadata", "[1, 2]"), 6, "a metadata cell that is not a JSON "
                 "object", None, id="metadata-not-an-object"),
    pytest.param(set_cell(6, "metadata", '{"sku": 12}'), 6, "a metadata cell that is not",
                 None, id="metadata-number"),
    pytest.param(insert(3, b"\r\n"), 3, "a blank line; it is skipped", None, id="blank-line"),
    pytest.param(rename("cost", "price"), 1, "columns apimart-batch does not write: 'price'",
                 None, id="unknown-column"),
]


@pytest.mark.parametrize(("edit", "line", "message", "count"), ODDITIES)
def test_a_harmless_hand_edit_warns_once_naming_its_line(
    path: Path, edit: Callable[[bytes], bytes], line: int, message: str, count: int | None
) -> None:
    """Opening and reading both warn, once per kind, at ``FILE:LINE``, and keep every row."""
    path.write_bytes(edit(healthy(path)))
    for read in ("open", "read"):
        warnings: list[str] = []
        if read == "open":
            with opened(path, warnings) as ledger:
                latest = dict(ledger.latest)
        else:
            latest = read_latest(path, warnings.append)
        odd = [w for w in warnings if message in w]
        assert len(odd) == 1, warnings
        assert odd[0].startswith(f"{path}:{line}: ")
        assert (f"({count} " in odd[0]) if count else "like this" not in odd[0]
        assert latest["a"]["task_id"] == "task_a" and set(latest) == {"a", "b"}


def test_report_refuses_a_made_up_status_naming_its_line(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report`` never counts a status it does not know: exit 2, ``FILE:LINE``, no table."""
    from runner.cli import main as cli_main

    path.write_bytes(set_cell(6, "status", "done")(healthy(path)))
    assert cli_main(["report", str(path)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert f"{path}:6: status 'done' is not a status apimart-batch writes" in err
    assert out == ""


def test_report_names_a_hand_edit_on_stderr(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report`` prints the warning on stderr and the report as usual on stdout."""
    from runner.cli import main as cli_main

    path.write_bytes(set_cell(6, "progress", "99")(healthy(path)))
    assert cli_main(["report", str(path), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {path}:6: a row changed since apimart-batch wrote it" in err
    assert '"task_a"' in out


def test_rows_changed_in_a_spreadsheet_are_judged_by_their_cells(path: Path) -> None:
    """Mid-file, a crc that no longer matches (an edited note) is no reason to refuse."""
    path.write_bytes(set_cell(5, "error", "the server was busy")(healthy(path)))
    assert read_latest(path)["b"]["error"] == "the server was busy"
    warnings: list[str] = []
    opened(path, warnings).close()
    assert len(warnings) == 1 and "crc no longer matches" in warnings[0]


def test_every_row_written_carries_its_crc(path: Path) -> None:
    """Each row's last cell is ``c`` and the CRC-32 of its cells: a spreadsheet sees text."""
    healthy(path)
    rows = records(path.read_bytes())
    assert rows[0][-1] == "crc"
    for cells, row in zip(rows[1:], iter_rows(path), strict=True):
        assert re.fullmatch(r"c[0-9a-f]{8}", cells[-1])
        assert cells[-1] == row_crc(row) == row["crc"]


# -- the last row: kept when complete, removed only when provably cut ----------------------


def test_a_complete_row_without_its_newline_is_kept(path: Path) -> None:
    """A whole 'submitting' row lacking only its newline stays; the next row gets its own line."""
    data = healthy(path).removesuffix(b"\r\n")
    path.write_bytes(data)
    warnings: list[str] = []
    with opened(path, warnings) as ledger:
        assert ledger.latest["a"]["status"] == "completed"
        ledger.append("c", status="submitting")
    assert warnings == []
    assert path.read_bytes().startswith(data + b"\r\n")
    assert [r["job_id"] for r in iter_rows(path)] == ["a", "a", "b", "b", "a", "c"]
    assert not path.with_name("L.csv.torn").exists()


def test_a_complete_submitting_row_without_newline_is_not_bought_again(path: Path) -> None:
    """The row issue 8 saw removed: kept, so its job stays 'submitting' (then 'unknown')."""
    healthy(path)
    with opened(path) as ledger:
        ledger.append("c", status="submitting", fingerprint=FINGERPRINT, idempotency_key=KEY)
    path.write_bytes(path.read_bytes().removesuffix(b"\r\n"))
    assert read_latest(path)["c"]["status"] == "submitting"
    with opened(path) as ledger:
        assert ledger.latest["c"]["status"] == "submitting"


def test_a_row_ending_in_cr_only_gets_just_its_lf(path: Path) -> None:
    """A last row cut between CR and LF is whole: LF is added, not a second CR."""
    data = healthy(path).removesuffix(b"\n")
    path.write_bytes(data)
    with opened(path) as ledger:
        ledger.append("c", status="submitting")
    assert path.read_bytes().startswith(data + b"\n2")


def test_a_row_cut_just_after_its_last_comma_is_kept(path: Path) -> None:
    """Cut before the crc's first character, every other cell is whole: the row stays."""
    data = healthy(path)
    path.write_bytes(data[: data.rindex(b",") + 1])
    with opened(path) as ledger:
        assert ledger.latest["a"]["status"] == "completed"
    assert not path.with_name("L.csv.torn").exists()


@pytest.mark.parametrize("keep", [pytest.param(3, id="in-the-crc"),
                                  pytest.param(12, id="before-the-crc")])
def test_a_row_cut_short_is_set_aside(path: Path, keep: int) -> None:
    """A last row whose crc is cut (or missing) is removed, kept in .torn, with a warning."""
    data = healthy(path)
    start = data.rstrip(b"\r\n").rindex(b"\n") + 1
    cut = data[: len(data) - keep]
    path.write_bytes(cut)
    warnings: list[str] = []
    with opened(path, warnings) as ledger:
        assert ledger.latest["a"]["status"] == "submitted"
    assert path.read_bytes() == data[:start]
    assert path.with_name("L.csv.torn").read_bytes() == cut[start:]
    assert len(warnings) == 1
    assert "cut short" in warnings[0]


def test_a_cut_that_closes_a_quote_early_is_not_taken_for_a_row(path: Path) -> None:
    """Cut between a doubled quote, a request cell still parses: its row is still torn."""
    data = healthy(path)
    cut = data[: data.rindex(b'""prompt""') + len(b'""prompt"')]
    assert records(cut)[-1][COLUMNS.index("request")] == '{"prompt'
    path.write_bytes(cut)
    with opened(path) as ledger:
        assert ledger.latest["a"]["status"] == "submitted"
    assert path.with_name("L.csv.torn").exists()


def test_an_old_ledger_with_the_request_last_tells_a_cut_request_too(path: Path) -> None:
    """Without a crc column, a request cell cut at a doubled quote fails the JSON check."""
    header = [c for c in COLUMNS if c not in ("request", "crc")] + ["request"]
    row = {"job_id": "a", "status": "submitted", "task_id": "task_a",
           "request": '{"prompt":"rain"}'}
    text = write_csv([row], header).encode()
    cut = text[: text.rindex(b'""prompt""') + len(b'""prompt"')]
    path.write_bytes(cut)
    assert read_latest(path) == {}
    with opened(path):
        pass
    assert path.with_name("L.csv.torn").exists()


def test_an_old_ledger_keeps_its_complete_last_row_without_newline(path: Path) -> None:
    """A ledger of an older version (no crc): a whole last row lacking its newline stays."""
    path.write_bytes(b"job_id,status,task_id\r\na,submitted,task_a\r\nb,submitted,task_b")
    with opened(path) as ledger:
        assert set(ledger.latest) == {"a", "b"}
    assert set(read_latest(path)) == {"a", "b"}


def test_a_cut_task_id_is_caught_by_the_crc_wherever_the_column_is(path: Path) -> None:
    """In a ledger whose last column is task_id, a cut inside the id does not pass for a row."""
    header = [c for c in COLUMNS if c != "task_id"] + ["task_id"]
    rows = [{"job_id": "a", "status": "submitting"},
            {"job_id": "a", "status": "submitted", "task_id": "task_0123456789"}]
    path.write_bytes(write_csv(rows, header).encode().removesuffix(b"6789\r\n"))
    with opened(path) as ledger:
        assert ledger.latest["a"]["status"] == "submitting"
    assert path.with_name("L.csv.torn").read_bytes().endswith(b"task_012345")


# -- the writer ---------------------------------------------------------------------------


def test_the_writer_refuses_a_row_it_could_not_read_back(path: Path) -> None:
    """An unknown status, or a task id on an 'error' row of a job without one, is not written."""
    with opened(path) as ledger:
        with pytest.raises(LedgerError, match="status 'queued' is not a status"):
            ledger.append("a", status="queued")
        with pytest.raises(LedgerError, match="no earlier row of the job has a task"):
            ledger.append("a", status="error", task_id="task_a")
        assert ledger.latest == {}
    assert records(path.read_bytes()) == [list(COLUMNS)]


def test_a_huge_error_text_is_cut_to_fit_a_row(path: Path) -> None:
    """A server message longer than a row may be is cut, and the row reads back."""
    with opened(path) as ledger:
        ledger.append("a", status="error", error="x" * (2 * MAX_ROW))
        kept = ledger.latest["a"]["error"]
    assert kept.endswith("bytes]")
    assert len(path.read_bytes()) < MAX_ROW + 1000
    assert read_latest(path)["a"]["error"] == kept


def test_statuses_hold_every_status_a_module_writes() -> None:
    """STATUSES covers each status literal the stages write and each set they test."""
    written: set[str] = set()
    for source in (ROOT / "runner").rglob("*.py"):
        if "emulator" in source.parts:
            continue  # the server's words, not the ledger's
        text = source.read_text(encoding="utf-8")
        written |= set(re.findall(r'\bstatus="([a-z_]+)"', text))
        written |= set(re.findall(r'_(?:fail|record)\(job, "([a-z_]+)"', text))
    written |= {api.normal_status(s) for s in ("queued", "running", "success", "canceled", "?")}
    written |= poll.POLLABLE_STATES | poll.NO_VIDEO_STATES | api.TERMINAL_STATES
    written |= resume.NOT_CREATED | resume.UNSECURED | resume.AMBIGUOUS
    assert {"submitting", "rejected", "not_found", "downloaded", "cancelled"} <= written
    assert written <= STATUSES


@pytest.mark.parametrize("task", ["task_01J9", "a", "t.1:2-3", "../x", "a/b", "a..b", "-a",
                                  "x" * 128, "x" * 129, "a b", "\u00e9", ""])
def test_the_task_id_rule_is_the_api_s(path: Path, task: str) -> None:
    """A task id the API client would not send is a task id the ledger does not accept."""
    path.write_text(write_csv([{"job_id": "a", "status": "submitted", "task_id": task}], COLUMNS))
    try:
        read_latest(path)
    except LedgerError:
        accepted = False
    else:
        accepted = True
    assert accepted == (api.valid_task_id(task) or task == "")


# -- upgrades: a backup first, never through a link ---------------------------------------

OLD = b"job_id,status,task_id,legacy_note\r\na,submitted,task_1,keep me\r\n"


def test_an_upgrade_keeps_the_file_as_it_was(path: Path) -> None:
    """Adding columns rewrites the ledger only after keeping its bytes in .bak-<time>."""
    path.write_bytes(OLD)
    warnings: list[str] = []
    opened(path, warnings).close()
    (kept,) = path.parent.glob("L.csv.bak-*")
    assert kept.read_bytes() == OLD
    assert any(str(kept) in warning for warning in warnings)
    assert records(path.read_bytes())[0] == [*COLUMNS, "legacy_note"]


def test_an_upgrade_through_a_symlink_rewrites_the_target(path: Path) -> None:
    """A ledger reached through a symlink is upgraded in place of its target; the link stays."""
    path.write_bytes(OLD)
    link = path.with_name("link.csv")
    link.symlink_to(path.name)
    with opened(link) as ledger:
        ledger.append("b", status="submitting")
    assert link.is_symlink()
    assert set(read_latest(path)) == {"a", "b"}


def test_a_hard_linked_ledger_is_not_split_by_an_upgrade(path: Path) -> None:
    """A rewrite would leave the other name on the old file: refused, both names untouched."""
    path.write_bytes(OLD)
    other = path.with_name("other.csv")
    other.hardlink_to(path)
    with pytest.raises(LedgerError, match="has 2 hard links; adding the columns") as info:
        opened(other)
    assert str(info.value).startswith(f"{other}: ")
    assert path.read_bytes() == OLD
    assert path.samefile(other)


# -- one lock per file --------------------------------------------------------------------


def _same(tmp: Path, path: Path) -> Path:
    return path


def _symlink(tmp: Path, path: Path) -> Path:
    (tmp / "alias.csv").symlink_to(path.name)
    return tmp / "alias.csv"


def _hard_link(tmp: Path, path: Path) -> Path:
    (tmp / "alias.csv").hardlink_to(path)
    return tmp / "alias.csv"


def _relative(tmp: Path, path: Path) -> Path:
    return Path(os.path.relpath(path))


def _dot_dot(tmp: Path, path: Path) -> Path:
    (tmp / "sub").mkdir()
    return tmp / "sub" / ".." / path.name


def _symlinked_directory(tmp: Path, path: Path) -> Path:
    (tmp / "linked").symlink_to(tmp, target_is_directory=True)
    return tmp / "linked" / path.name


ALIASES = {"same-path": _same, "symlink": _symlink, "hard-link": _hard_link,
           "relative-vs-absolute": _relative, "dot-dot": _dot_dot,
           "symlinked-directory": _symlinked_directory}


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("alias_first", [False, True], ids=["alias-second", "alias-first"])
def test_every_name_of_a_ledger_shares_one_lock(
    path: Path, monkeypatch: pytest.MonkeyPatch, alias: str, alias_first: bool
) -> None:
    """While one open holds the ledger under one name, an open under another exits 75."""
    monkeypatch.chdir(path.parent)
    healthy(path)
    other = ALIASES[alias](path.parent, path)
    first, second = (other, path) if alias_first else (path, other)
    with opened(first) as ledger:
        with pytest.raises(LedgerLockedError) as info:
            opened(second)
        assert info.value.exit_code == EXIT_LOCKED
        assert "in use by" in str(info.value)
        ledger.append("c", status="submitting")
    with opened(second) as ledger:  # released: the other name may go on
        assert "c" in ledger.latest



@pytest.mark.slow
@pytest.mark.parametrize("alias", ["symlink", "hard-link"])
def test_another_process_on_an_alias_is_locked_out(path: Path, alias: str) -> None:
    """Another process opening a held ledger through a link exits 75 and names our pid."""
    healthy(path)
    other = ALIASES[alias](path.parent, path)
    with opened(path):
        done = subprocess.run([sys.executable, "-c", TRY_OPEN, str(other)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == EXIT_LOCKED, done.stderr
    # A hard link has a sidecar of its own: the pid then comes from /proc/locks (Linux).
    if alias == "symlink" or Path("/proc/locks").exists():
        assert done.stdout.strip() == str(os.getpid())


def test_the_lock_holds_the_new_file_after_a_header_upgrade(path: Path) -> None:
    """The rewrite's new file is locked before it takes the name: a new link to it is locked."""
    path.write_bytes(OLD)
    with opened(path):
        alias = path.with_name("alias.csv")
        alias.hardlink_to(path)  # a name with a sidecar of its own, on the rewritten file
        with pytest.raises(LedgerLockedError):
            opened(alias)
        path.with_name("L.csv.lock").unlink()  # and without the sidecar, the file still is
        with pytest.raises(LedgerLockedError):
            opened(path)


def test_a_file_replaced_while_being_locked_is_locked_again(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another run's rewrite lands between open and lock, the lock moves to the new file."""
    with opened(path) as ledger:
        ledger.append("old", status="submitting")
    fresh = path.with_name("fresh.csv")
    with opened(fresh) as ledger:
        ledger.append("new", status="submitting")
    replaced = path.stat().st_ino
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if os.fstat(fd).st_ino == replaced and fresh.exists():
            fresh.replace(path)  # the other run's atomic rewrite, right now
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with opened(path) as ledger:
        assert set(ledger.latest) == {"new"}
        ledger.append("mine", status="submitting")
    assert set(read_latest(path)) == {"new", "mine"}


def test_an_empty_file_being_created_reads_as_no_rows(tmp_path: Path) -> None:
    """A reader racing a run that has created, but not yet written, the ledger sees no rows."""
    path = tmp_path / "l.csv"
    path.write_bytes(b"")
    assert read_latest(path) == {}
