"""``report`` formats: typed JSON, takes in every format, full error texts in the table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from runner.cli import main as cli_main
from runner.report import build_report, render_csv, render_json, render_table

SHA = "ab" * 32
LONG_ERROR = ("the moderation service refused the prompt because it names a public person; "
              "rewrite the prompt without the name and run again, or ask APIMart support "
              "for an exception quoting request req_0123456789abcdef (code MOD_4031) "
              "end-of-error-marker")
HEADER = ("time,job_id,status,task_id,attempts,http_status,error,model,duration,prompt,"
          "manifest,mock,progress,cost,bytes,take,file_sha256")


def ledger(tmp_path: Path, *rows: str, header: str = HEADER) -> str:
    """A ledger file of ``rows`` under ``header`` (no crc column: an older ledger's shape)."""
    path = tmp_path / "r.ledger.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def report_json(path: str) -> dict[str, Any]:
    """``render_json`` of the ledger, parsed strictly (NaN or Infinity would be refused)."""
    def refuse(constant: str) -> None:
        msg = f"not JSON: {constant}"
        raise AssertionError(msg)

    doc: dict[str, Any] = json.loads(render_json(build_report(path)), parse_constant=refuse)
    return doc


def jobs_by_id(path: str) -> dict[str, dict[str, Any]]:
    """The JSON report's jobs by job id."""
    return {job["job_id"]: job for job in report_json(path)["jobs"]}


T = "2026-01-01T00:00:00.000Z"


# --- json ----------------------------------------------------------------------------------


def test_json_numbers_are_numbers_and_empty_cells_null(tmp_path: Path) -> None:
    """Numeric columns come out as JSON numbers, empty cells as null, text as text."""
    path = ledger(tmp_path, f"{T},done,downloaded,task_1,2,200,,sora-2,8,a cat,m.yaml,0,100,"
                            f"0.32,1048576,3,{SHA}")
    job = jobs_by_id(path)["done"]
    assert job["attempts"] == 2 and isinstance(job["attempts"], int)
    assert job["http_status"] == 200
    assert job["duration"] == 8
    assert job["progress"] == 100
    assert job["cost"] == pytest.approx(0.32) and isinstance(job["cost"], float)
    assert job["bytes"] == 1048576
    assert job["take"] == 3
    assert job["mock"] is False
    assert job["error"] is None
    assert job["video_url"] is None  # a column of today the old ledger lacks
    assert job["file_sha256"] == SHA
    assert (job["status"], job["task_id"], job["model"]) == ("downloaded", "task_1", "sora-2")


def test_json_ids_and_prompts_of_digits_stay_text(tmp_path: Path) -> None:
    """Only numeric columns are converted: a job id or prompt of digits stays a string."""
    path = ledger(tmp_path, f"{T},123,completed,456,1,200,,sora-2,4,42,m.yaml,1,,,,,")
    job = jobs_by_id(path)["123"]
    assert (job["job_id"], job["task_id"], job["prompt"]) == ("123", "456", "42")
    assert job["mock"] is True
    assert (job["cost"], job["bytes"], job["progress"], job["file_sha256"]) == (None,) * 4


def test_json_never_has_a_number_as_text_in_a_numeric_column(tmp_path: Path) -> None:
    """Across every state of a run's ledger, numeric cells are numbers or null."""
    path = ledger(tmp_path,
                  f"{T},a,submitting,,0,,,sora-2,4,p,m.yaml,0,,,,,",
                  f"{T},b,error,,5,503,Service Unavailable,sora-2,12,p,m.yaml,0,,,,2,",
                  f"{T},c,processing,task_c,1,200,,sora-2,4,p,m.yaml,0,40,,,,",
                  f"{T},d,completed,task_d,1,200,,sora-2,4,p,m.yaml,0,100,1,,1,")
    for job in report_json(path)["jobs"]:
        for name in ("attempts", "http_status", "duration", "progress", "cost", "bytes", "take"):
            assert job[name] is None or isinstance(job[name], int | float), (job["job_id"], name)
    assert jobs_by_id(path)["d"]["cost"] == 1


def test_json_keeps_text_that_is_not_a_number(tmp_path: Path) -> None:
    """A numeric column holding other text (a hand edit) stays text; NaN never leaks out."""
    path = ledger(tmp_path, f"{T},odd,completed,task_1,1,200,,veo3,8s,p,m.yaml,0,,nan,,,")
    job = jobs_by_id(path)["odd"]
    assert (job["duration"], job["cost"]) == ("8s", "nan")


@pytest.mark.parametrize(
    ("header", "cell", "take"),
    [
        pytest.param(HEADER, "", 1, id="empty-cell"),
        pytest.param(HEADER, "2", 2, id="second-take"),
        pytest.param(HEADER.removesuffix(",take,file_sha256"), None, 1, id="no-column"),
    ],
)
def test_take_defaults_to_1(tmp_path: Path, header: str, cell: str | None, take: int) -> None:
    """An empty take cell, or a ledger without the column, is take 1 in every format."""
    cells = f"{T},j,completed,task_1,1,200,,sora-2,4,p,m.yaml,0,,,"
    row = cells if cell is None else f"{cells},{cell},"
    path = ledger(tmp_path, row, header=header)
    built = build_report(path)
    assert jobs_by_id(path)["j"]["take"] == take
    (shown,) = csv.DictReader(io.StringIO(render_csv(built)))
    assert shown["take"] == str(take)
    assert "file_sha256" in shown
    table = render_table(built, width=200).splitlines()
    column = table[0].index("takes")
    assert table[1][column : column + 5].strip() == str(take)


def test_cli_report_json_is_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``report --format json`` prints the typed document."""
    path = ledger(tmp_path, f"{T},j,completed,task_1,3,200,,sora-2,4,p,m.yaml,0,100,0.5,,2,")
    assert cli_main(["report", path, "--format", "json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)["jobs"]
    assert (job["attempts"], job["cost"], job["take"], job["progress"]) == (3, 0.5, 2, 100)


# --- csv -----------------------------------------------------------------------------------


def test_csv_stays_text_with_take_and_file_sha256(tmp_path: Path) -> None:
    """CSV keeps the ledger's text, adds take, file_sha256 and metadata before crc."""
    path = ledger(tmp_path, f"{T},007,downloaded,task_1,2,200,,sora-2,8,42,m.yaml,0,100,"
                            f"0.32,4096,,{SHA}")
    text = render_csv(build_report(path))
    header = text.splitlines()[0].split(",")
    assert header[-4:] == ["take", "file_sha256", "metadata", "crc"]
    (row,) = csv.DictReader(io.StringIO(text))
    assert (row["job_id"], row["prompt"], row["cost"], row["bytes"]) == ("007", "42", "0.32",
                                                                        "4096")
    assert (row["take"], row["file_sha256"]) == ("1", SHA)


# --- table ---------------------------------------------------------------------------------


def error_ledger(tmp_path: Path, error: str = LONG_ERROR) -> str:
    """One rejected job with ``error``, one completed job without an error."""
    quoted = '"' + error.replace('"', '""') + '"'
    return ledger(tmp_path, f"{T},bad,rejected,,1,400,{quoted},sora-2,4,p,m.yaml,0,,,,,",
                  f"{T},good,completed,task_1,1,200,,sora-2,4,p,m.yaml,0,100,0.32,,2,")


@pytest.mark.parametrize("width", [60, 80, 120, 160, 220])
def test_table_shows_the_whole_error_wrapped_to_the_width(tmp_path: Path, width: int) -> None:
    """Every word of a long error is shown, in order, on lines no wider than the terminal."""
    lines = render_table(build_report(error_ledger(tmp_path)), width=width).splitlines()
    first = next(n for n, line in enumerate(lines) if "the moderation" in line)
    last = next(n for n, line in enumerate(lines) if "end-of-error-marker" in line)
    assert last > first  # wrapped, not one long line
    head = lines[first][lines[first].index("the moderation") :]
    shown = " ".join([head, *(line.strip() for line in lines[first + 1 : last + 1])])
    assert shown == LONG_ERROR
    assert all(len(line) <= width for line in lines[first + 1 : last + 1])
    if width >= 80:
        assert len(lines[first]) <= width


def test_table_puts_the_error_beside_the_row_when_there_is_room(tmp_path: Path) -> None:
    """On a wide terminal the error is a column, its later lines aligned under it."""
    lines = render_table(build_report(error_ledger(tmp_path)), width=200).splitlines()
    assert lines[0].split()[-1] == "error"
    row = next(line for line in lines if line.startswith("bad "))
    column = lines[0].index("error")
    assert row.index("the moderation") == column
    following = lines[lines.index(row) + 1]
    assert following[:column].strip() == "" and following[column] != " "


def test_table_puts_the_error_below_the_row_on_a_narrow_terminal(tmp_path: Path) -> None:
    """On an 80-column terminal the error follows its row on indented lines of its own."""
    lines = render_table(build_report(error_ledger(tmp_path)), width=80).splitlines()
    assert "error" not in lines[0].split()
    row = next(n for n, line in enumerate(lines) if line.startswith("bad "))
    assert "moderation" not in lines[row]
    assert lines[row + 1].startswith("    error: the moderation")
    assert all(line.startswith(" " * 11) for line in lines[row + 2 : row + 4])
    good = next(line for line in lines if line.startswith("good "))
    assert lines[lines.index(good) + 1] == "" or not lines[lines.index(good) + 1].startswith(" ")


def test_table_escapes_control_characters_in_errors(tmp_path: Path) -> None:
    """An error cell cannot send escape sequences to the terminal."""
    lines = render_table(build_report(error_ledger(tmp_path, "bad \x1b[2J thing")), width=200)
    assert "\x1b" not in lines
    assert "\\x1b[2J" in lines


def test_cli_table_wraps_to_the_terminal_width(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``report`` without --format wraps errors to $COLUMNS (the terminal's width)."""
    monkeypatch.setenv("COLUMNS", "90")
    assert cli_main(["report", error_ledger(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(n for n, line in enumerate(lines) if line.startswith("bad "))
    error = lines[row + 1 : next(n for n, line in enumerate(lines) if "end-of-error" in line) + 1]
    assert error[0].startswith("    error: ")
    assert all(len(line) <= 90 for line in error)
    assert " ".join(" ".join(error).split()).removeprefix("error: ") == LONG_ERROR


def test_json_is_written_job_by_job_as_one_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report --format json`` streams exactly the text of ``render_json``, then a newline."""
    path = ledger(tmp_path, f"{T},a,completed,task_1,1,200,,sora-2,8,a cat,m.yaml,0,100,,,,",
                  f"{T},b,rejected,,1,400,\"bad, \"\"really\"\"\",sora-2,4,\"x\ny\",m.yaml,0,,,,,")
    assert cli_main(["report", path, "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert out == render_json(build_report(path)) + "\n"
    assert [job["job_id"] for job in json.loads(out)["jobs"]] == ["a", "b"]
