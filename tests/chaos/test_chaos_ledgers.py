"""Ledger corruption corpus: about 50 damaged ledgers, each with its expected outcome.

Each ledger is built in code from one healthy ledger of six jobs (no large file is kept in
the repo), then ``run``, ``status`` and ``report`` run on it in-process. A ledger that is
*refused* makes all three exit 2 with a message that names the ledger and the line (or
byte), and is left byte for byte as it was. A ledger that is *accepted* lets ``run`` buy
exactly the jobs that have no task (here against a closed port, so a "buy" is a
``submitting`` row followed by ``error``), and ``status``/``report`` end normally.
"""

from __future__ import annotations

import csv
import io
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chaoshelpers import CHAOS_KEY, SecretScan

from runner.cli import main
from runner.engine.submit import job_fields
from runner.ledger.store import COLUMNS, iter_rows, write_csv
from runner.manifest.loader import load_manifests

JOBS = [f"job-{i}" for i in range(6)]
#: What a rerun of the healthy ledger sends: job-2 ended 'error', job-5 has no row.
BUYS = frozenset({"job-2", "job-5"})
# The last item of a case names the issue 8 finding it is the regression test of: 2 (bad
# ledgers accepted silently) or 3 (a complete last row without its newline taken for torn).


def closed_port_url() -> str:
    """A loopback URL where nothing listens: every request fails as 'not sent'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class World:
    """The manifest, the healthy ledger's rows and the URL they were sent to."""

    folder: Path
    url: str
    rows: list[dict[str, str]] = field(default_factory=list)

    def row(self, job: str, status: str, task: str = "", **cells: str) -> dict[str, str]:
        """A complete row for ``job`` as the runner writes it."""
        return {**self.cells[job], "time": f"2000-01-01T09:{len(self.rows):02d}:00.000Z",
                "job_id": job, "status": status, "task_id": task, "base_url": self.url,
                "mock": "0", **cells}

    def build(self) -> None:
        doc = {"version": 1, "name": "batch", "defaults": {"model": "sora-2", "duration": 4},
               "jobs": [{"id": job, "prompt": f"A paper boat, take {job}"} for job in JOBS]}
        manifest = self.folder / "batch.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        self.cells = {job.job_id: {k: "" if v is None else str(v)
                                   for k, v in job_fields(job).items()}
                      for job in load_manifests([str(manifest)])[0].jobs}
        for job, status, task, extra in [
            ("job-0", "submitting", "", {}),
            ("job-0", "submitted", "task_0", {"attempts": "1", "http_status": "200"}),
            ("job-1", "submitting", "", {}),
            ("job-1", "submitted", "task_1", {"attempts": "1", "http_status": "200"}),
            ("job-0", "downloaded", "task_0", {"file": "videos/job-0.mp4", "bytes": "10"}),
            ("job-1", "failed", "task_1", {"error": "moderation: the prompt was refused"}),
            ("job-2", "submitting", "", {}),
            ("job-2", "error", "", {"attempts": "1", "http_status": "503",
                                    "error": "service unavailable"}),
            ("job-3", "submitting", "", {}),
            ("job-3", "unknown", "", {"attempts": "1", "http_status": "500"}),
            ("job-4", "submitting", "", {}),
            ("job-4", "rejected", "", {"attempts": "1", "http_status": "400",
                                       "error": "invalid prompt"}),
        ]:
            self.rows.append(self.row(job, status, task, **extra))

    def text(self, rows: list[dict[str, str]] | None = None,
             columns: list[str] | None = None) -> str:
        """The ledger's text, as the runner writes it (``\\r\\n`` line ends, escaped cells)."""
        return write_csv(self.rows if rows is None else rows, columns or list(COLUMNS))


# -- the corruptions ---------------------------------------------------------------------
# Each takes the world, returns the ledger's bytes. Line 1 is the header; line n + 1 is
# healthy row n (line 7: job-1 'failed', line 9: job-2 'error', line 13: job-4 'rejected').

Make = Callable[[World], bytes]


def _lines(world: World) -> list[str]:
    return world.text().splitlines(keepends=True)


def _with_line(line: int, new: Callable[[str], str]) -> Make:
    def make(world: World) -> bytes:
        lines = _lines(world)
        lines[line - 1] = new(lines[line - 1])
        return "".join(lines).encode()
    return make


def _insert(line: int, text: str | Callable[[World], str]) -> Make:
    def make(world: World) -> bytes:
        lines = _lines(world)
        lines.insert(line - 1, text(world) if callable(text) else text)
        return "".join(lines).encode()
    return make


def _cell(line: int, column: str, value: str) -> Make:
    def make(world: World) -> bytes:
        rows = [dict(r) for r in world.rows]
        rows[line - 2][column] = value
        return world.text(rows).encode()
    return make


def _header(change: Callable[[list[str]], list[str]]) -> Make:
    def make(world: World) -> bytes:
        lines = _lines(world)
        lines[0] = ",".join(change(list(COLUMNS))) + "\r\n"
        return "".join(lines).encode()
    return make


def _swap(a: str, b: str) -> Callable[[list[str]], list[str]]:
    def change(names: list[str]) -> list[str]:
        i, j = names.index(a), names.index(b)
        names[i], names[j] = names[j], names[i]
        return names
    return change


def _append(text: Callable[[World], bytes]) -> Make:
    return lambda world: world.text().encode() + text(world)


def _last_row(world: World, status: str, task: str = "", *, end: str = "") -> bytes:
    """A complete row for job-5 without its final newline (or with ``end``)."""
    return write_csv([world.row("job-5", status, task)], COLUMNS).split("\n", 1)[1].rstrip(
        "\r\n").encode() + end.encode()


def _quote_all(world: World) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
    for record in csv.reader(io.StringIO(world.text(), newline="")):
        writer.writerow(record)
    return buffer.getvalue().encode()


def _columns(order: list[str]) -> Make:
    return lambda world: world.text(columns=order).encode()


def _delimited(delimiter: str) -> Make:
    def make(world: World) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter)
        for record in csv.reader(io.StringIO(world.text(), newline="")):
            writer.writerow(record)
        return buffer.getvalue().encode()
    return make


def _reencode(encoding: str) -> Make:
    def make(world: World) -> bytes:
        rows = [dict(r) for r in world.rows]
        rows[5]["error"] = "modération refusée"
        return world.text(rows).encode(encoding)
    return make


def _history_drops_task(world: World) -> bytes:
    """job-1 had task_1; a later 'error' row without it would make a rerun buy it again."""
    return world.text().encode() + write_csv(
        [world.row("job-1", "error", "", http_status="503")], COLUMNS).split("\n", 1)[1].encode()


def _junk_100mb(world: World) -> bytes:
    lines = _lines(world)
    lines.insert(6, "J" * (100 * 1024 * 1024) + "\r\n")
    return "".join(lines).encode()


@dataclass(frozen=True)
class Refused:
    """The commands exit 2 naming ``line`` (any location when None; none if False).

    ``report`` only reads: it may show a ledger that ``run`` refuses to add to.
    """

    line: int | bool | None = None
    report: bool = True


@dataclass(frozen=True)
class Accepted:
    """``run`` buys exactly ``buys``; ``torn``: a cut last row is set aside in ``.torn``."""

    buys: frozenset[str] = BUYS
    torn: bool = False


@dataclass(frozen=True)
class RefusedOrSetAside:
    """Either outcome is safe: refused as in ``Refused``, or the row repaired as torn."""

    line: int
    buys: frozenset[str] = BUYS


Outcome = Refused | Accepted | RefusedOrSetAside
ALL = frozenset(JOBS)

CASES: list[tuple[str, Make, Outcome, int | None]] = [
    # harmless oddities: accepted
    ("pristine", lambda w: w.text().encode(), Accepted(), None),
    ("bom", lambda w: b"\xef\xbb\xbf" + w.text().encode(), Accepted(), None),
    ("lf-line-ends", lambda w: w.text().replace("\r\n", "\n").encode(), Accepted(), None),
    ("blank-lines", _insert(7, "\r\n\n"), Accepted(), None),
    ("trailing-blank-lines", _append(lambda w: b"\r\n\r\n\n"), Accepted(), None),
    ("every-cell-quoted", _quote_all, Accepted(), None),
    # free text may hold any character the API sent, NUL included
    ("nul-in-error-text", _cell(7, "error", "mod\0eration"), Accepted(), None),
    ("columns-reordered", _columns(list(reversed(COLUMNS))), Accepted(), None),
    ("extra-unknown-column", _columns([*COLUMNS, "notes"]), Accepted(), None),
    ("older-version-columns",
     _columns([c for c in COLUMNS if c not in ("thumbnail_url", "cost", "file", "bytes")]),
     Accepted(), None),
    ("header-only", lambda w: w.text([]).encode(), Accepted(buys=ALL), None),
    ("empty-file", lambda w: b"", Accepted(buys=ALL), None),
    ("complete-submitting-row-with-newline",
     _append(lambda w: _last_row(w, "submitting", end="\r\n")),
     Accepted(buys=frozenset({"job-2"})), None),
    # a last row cut short by a crash: set aside, the rest accepted
    ("torn-mid-row", _append(lambda w: _last_row(w, "submitting")[:40]),
     Accepted(torn=True), None),
    ("torn-open-quote", _append(lambda w: b'2000-01-01T10:00:00.000Z,job-5,submitting,,0,,"cut'),
     Accepted(torn=True), None),
    ("torn-nul-tail", _append(lambda w: b"\0" * 4096), Accepted(torn=True), None),
    ("torn-half-utf8-char", _append(lambda w: _last_row(w, "submitting")[:-2] + "바".encode()[:2]),
     Accepted(torn=True), None),
    # a complete last row that only lacks its newline: kept
    ("complete-submitting-row-no-newline", _append(lambda w: _last_row(w, "submitting")),
     Accepted(buys=frozenset({"job-2"})), 3),
    ("complete-failed-row-no-newline", _append(lambda w: _last_row(w, "failed", "task_5")),
     Accepted(buys=frozenset({"job-2"})), 3),
    ("complete-row-cr-without-lf", _append(lambda w: _last_row(w, "failed", "task_5", end="\r")),
     Accepted(buys=frozenset({"job-2"})), 3),
    # headers that lie: refused
    ("swapped-job_id-status", _header(_swap("job_id", "status")), Refused(), 2),
    ("swapped-task_id-error", _header(_swap("task_id", "error")), Refused(), 2),
    ("swapped-status-error", _header(_swap("status", "error")), Refused(), 2),
    ("duplicated-header", _insert(2, ",".join(COLUMNS) + "\r\n"), Refused(2), 2),
    ("header-in-the-middle", _insert(8, ",".join(COLUMNS) + "\r\n"), Refused(8), 2),
    ("duplicate-column-name", _header(lambda n: [("task_id" if c == "error" else c) for c in n]),
     Refused(1), 2),
    ("missing-status-column", _columns([c for c in COLUMNS if c != "status"]), Refused(1), None),
    ("missing-job_id-column", _columns([c for c in COLUMNS if c != "job_id"]), Refused(1), None),
    ("padded-header-names", _header(lambda n: [f" {c}" for c in n]), Refused(1), None),
    ("semicolon-separated", _delimited(";"), Refused(1), None),
    ("tab-separated", _delimited("\t"), Refused(1), None),
    # rows whose cells cannot be trusted: refused, naming the line
    ("unknown-status", _cell(7, "status", "done"), Refused(7), 2),
    ("status-capitalised", _cell(7, "status", "Failed"), Refused(7), 2),
    ("status-padded", _cell(7, "status", " failed"), Refused(7), 2),
    ("status-empty", _cell(7, "status", ""), Refused(7), 2),
    ("job_id-empty", _cell(9, "job_id", ""), Refused(9), 2),
    ("task-id-on-error-row", _cell(9, "task_id", "task_2"), Refused(9), 2),
    ("task-id-on-rejected-row", _cell(13, "task_id", "task_4"), Refused(13), 2),
    ("task-id-on-submitting-row", _cell(8, "task_id", "task_2"), Refused(8), 2),
    ("junk-line", _insert(7, "this is not a ledger row\r\n"), Refused(7), 2),
    ("junk-line-100-MB", _junk_100mb, Refused(7), 2),
    ("row-with-extra-cells", _with_line(7, lambda s: s.rstrip("\r\n") + ",x,y\r\n"), Refused(7),
     2),
    ("row-cut-mid-file", _with_line(7, lambda s: s[:60] + "\r\n"), Refused(7), 2),
    ("nul-in-a-task-id", _cell(7, "task_id", "task\0_1"), Refused(7), 2),
    ("nul-in-a-status", _cell(7, "status", "fail\0ed"), Refused(7), 2),
    ("open-quote-mid-file", _with_line(7, lambda s: s.replace(",failed,", ',"failed,')),
     Refused(), None),
    ("invalid-utf8", lambda w: w.text().encode().replace(b"moderation", b"mod\xffration"),
     Refused(), None),
    ("latin-1-file", _reencode("latin-1"), Refused(), None),
    ("utf-16-file", _reencode("utf-16"), Refused(), None),
    ("mock-rows-in-a-real-ledger", _cell(7, "mock", "1"), Refused(False, report=False), None),
    ("last-row-cut-with-newline", _with_line(13, lambda s: s[:50] + "\r\n"),
     RefusedOrSetAside(13), 2),
    # beyond the list: a later row that forgets the task of an earlier one
    ("history-drops-a-task-id", _history_drops_task, Refused(14),
     None),
]


def _located(err: str, name: str, line: int | bool | None) -> bool:
    if line is False:
        return name in err
    number = r"\d+" if line is None or line is True else str(line)
    # A problem of the header (line 1) may also be named as one of the file's columns.
    header = r"|header|columns" if line in (None, 1) else ""
    return bool(re.search(rf"{re.escape(name)}:{number}\b|line {number}\b|byte \d+{header}",
                          err))


def _params() -> list[object]:
    return [pytest.param(make, outcome, id=name) for name, make, outcome, _ in CASES]


@pytest.mark.parametrize(("make", "outcome"), _params())
def test_damaged_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str], make: Make, outcome: Outcome) -> None:
    """run, status and report on a damaged ledger: refused with its line, or safely accepted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APIMART_API_KEY", CHAOS_KEY)
    world = World(tmp_path, closed_port_url())
    world.build()
    ledger = tmp_path / "batch.ledger.csv"
    data = make(world)
    ledger.write_bytes(data)
    scan = SecretScan()
    target = ["--base-url", world.url]
    results = {}
    for command in (["run", "batch.yaml", "--max-attempts", "1", "-j", "1", *target],
                    ["status", ledger.name, *target],
                    ["report", ledger.name]):
        code = main(command)
        out, err = capsys.readouterr()
        scan.process(command[0], out, err)
        results[command[0]] = (code, err)
    scan.tree(tmp_path)
    assert not scan.leaks
    name = ledger.name
    if isinstance(outcome, Refused) and not outcome.report:
        del results["report"]
    refused = all(code == 2 and _located(err, name, getattr(outcome, "line", None))
                  for code, err in results.values())
    if isinstance(outcome, Refused) or (isinstance(outcome, RefusedOrSetAside) and refused):
        assert refused, results
        assert ledger.read_bytes() == data
        return
    assert results["run"][0] in (0, 1), results
    assert results["status"][0] in (0, 1), results
    assert results["report"][0] == 0, results
    rows = list(iter_rows(ledger))
    bought = {row["job_id"] for row in rows if row["status"] == "submitting"
              and not row["time"].startswith("2000-")}
    assert bought == outcome.buys
    torn = tmp_path / (name + ".torn")
    if getattr(outcome, "torn", True):
        assert torn.exists() and torn.read_bytes()
        assert "cut short" in results["run"][1] or "torn" in results["run"][1]
    else:
        assert not torn.exists()
