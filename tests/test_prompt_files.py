"""Prompt files: ``matrix: {prompt: {file: ...}}`` and ``{csv: ..., column: ...}``.

Prompts read from a file expand like a listed matrix axis, keep their job ids when lines
move, and every problem is named at its file and line plus the manifest line reading it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from clihelpers import MockServer, cli

from runner.cli import main as cli_main
from runner.errors import EXIT_USAGE, ManifestError
from runner.manifest.loader import load_manifests
from runner.models import Job

#: With this head, the manifest's line 7 holds the prompt source.
HEAD = "version: 1\nname: pf\ndefaults: {model: wan2.7}\njobs:\n  - id: k\n"


def write(tmp_path: Path, source: str, files: dict[str, bytes | str], *, head: str = HEAD,
          rest: str = "") -> str:
    """``x.yaml`` whose first entry's matrix prompt is ``source`` (line 7), plus ``files``."""
    for name, content in files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
    path = tmp_path / "x.yaml"
    path.write_text(f"{head}    matrix:\n      prompt: {source}\n{rest}", encoding="utf-8")
    return str(path)


def jobs(path: str) -> list[Job]:
    """The jobs the manifest at ``path`` expands to."""
    (manifest,) = load_manifests([path])
    return list(manifest.jobs)


def refused(path: str) -> ManifestError:
    """The ManifestError loading ``path`` raises."""
    with pytest.raises(ManifestError) as info:
        load_manifests([path])
    assert info.value.exit_code == EXIT_USAGE
    return info.value


TEXT = "# a comment\nA fox at dawn\n\n   A fox at dusk  \r\n\t\n  # indented\nA fox at night"
TXT, CSV_SOURCE = "{file: p.txt}", "{csv: p.csv, column: prompt}"
#: Six good lines: what follows them is line 7.
SIX = "a\nb\nc\nd\ne\nf\n"


def test_a_text_file_gives_one_job_a_line(tmp_path: Path) -> None:
    """Blank lines and # comments are skipped, whitespace around a prompt is removed."""
    path = write(tmp_path, TXT, {"p.txt": TEXT})
    assert [job.prompt for job in jobs(path)] == [
        "A fox at dawn", "A fox at dusk", "A fox at night"]
    assert {job.line for job in jobs(path)} == {5}


def test_a_file_reads_like_the_same_list(tmp_path: Path) -> None:
    """A file and the list of its prompts give the same jobs, ids and requests."""
    from_file = jobs(write(tmp_path, TXT, {"p.txt": TEXT}))
    listed = jobs(write(tmp_path, "[A fox at dawn, A fox at dusk, A fox at night]", {}))
    assert [(j.job_id, j.fingerprint) for j in from_file] == [
        (j.job_id, j.fingerprint) for j in listed]


@pytest.mark.parametrize("head", [HEAD, HEAD.replace("  - id: k\n", "  - duration: 5\n")],
                         ids=["with-id", "without-id"])
def test_ids_stay_when_lines_move(tmp_path: Path, head: str) -> None:
    """Inserting, reordering and appending lines renames no job: ids come from the text."""
    before = {j.prompt: j.job_id for j in jobs(write(tmp_path, TXT,
                                                     {"p.txt": "one fox\ntwo foxes\n"}, head=head))}
    edited = "# new first line\nthree foxes\ntwo foxes\n\none fox\nfour foxes\n"
    after = {j.prompt: j.job_id for j in jobs(write(tmp_path, TXT,
                                                    {"p.txt": edited}, head=head))}
    assert {p: after[p] for p in before} == before
    assert len(set(after.values())) == 4


def test_a_file_combines_with_other_axes_and_repeat(tmp_path: Path) -> None:
    """Prompts from a file times another list times repeat, as for a list."""
    path = write(tmp_path, TXT, {"p.txt": "a fox\nan owl\n"},
                 rest="      size: ['16:9', '9:16']\n    repeat: 2\n")
    assert len(jobs(path)) == 8


def test_paths_are_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest loaded from another directory still finds its prompt file beside it."""
    write(tmp_path / "m", "{file: prompts/p.txt}", {"prompts/p.txt": "a fox\n"})
    monkeypatch.chdir(tmp_path)
    assert [job.prompt for job in jobs("m/x.yaml")] == ["a fox"]


CSV = ("sku,prompt,notes\r\n"
       'A1,"A kettle, steaming",hero\r\n'
       "\r\n"
       'A2,"A kettle\non two lines",\r\n'
       "A3, A cup of tea ,x\r\n")


def test_a_csv_column_gives_one_job_a_row(tmp_path: Path) -> None:
    """The named column, quoted cells (commas, newlines) kept; blank lines skipped; BOM ok."""
    path = write(tmp_path, CSV_SOURCE, {"p.csv": b"\xef\xbb\xbf" + CSV.encode()})
    assert [job.prompt for job in jobs(path)] == [
        "A kettle, steaming", "A kettle\non two lines", "A cup of tea"]


#: (manifest source, files, the file:line expected, a fragment of the message).
PROBLEMS = [
    pytest.param(TXT, {"p.txt": SIX + "x" * 5001 + "\n"},
                 "p.txt:7:1", "is 5001 characters long; at most 5000 for model wan2.7",
                 id="too-long"),
    pytest.param(TXT, {"p.txt": SIX.encode() + b"caf\xe9\n"}, "p.txt:7:1",
                 "not UTF-8 (byte 0xe9", id="not-utf8"),
    pytest.param(TXT, {"p.txt": SIX + "bin\x00ary\n"}, "p.txt:7:1",
                 "a control character (U+0000)", id="control-character"),
    pytest.param(TXT, {"p.txt": SIX.encode() + b"a fox\rb cat\r"}, "p.txt:7:1",
                 "a carriage return (CR) inside the line", id="old-mac-line-ends"),
    pytest.param(TXT, {"p.txt": "a fox\n\n# c\nb\nc\nd\na fox\n"}, "p.txt:7:1",
                 "the same prompt as line 1", id="repeated-line"),
    pytest.param(TXT, {"p.txt": "\ufeffa\n".encode("utf-16")}, "p.txt:1:1",
                 "UTF-16", id="utf-16"),
    pytest.param(CSV_SOURCE, {"p.csv": "id,prompt\n1,a\n2,b\n3,c\n4,d\n5,e\n6,\n"},
                 "p.csv:7:1", "the 'prompt' cell is empty", id="csv-empty-cell"),
    pytest.param(CSV_SOURCE, {"p.csv": "id,prompt\n1,a\n2,b\n3,c\n4,d\n5,e\n6\n"},
                 "p.csv:7:1", "no 'prompt' cell: the row has 1, the header 2", id="csv-short-row"),
    pytest.param(CSV_SOURCE,
                 {"p.csv": 'id,prompt\n1,"a\nb"\n2,b\n3,c\n4,d\n6,\n'},
                 "p.csv:7:1", "the 'prompt' cell is empty", id="csv-line-after-a-multiline-cell"),
    pytest.param("{csv: p.csv, column: Prompt}", {"p.csv": "id,prompt\n1,a\n"},
                 "p.csv:1:1", "no column 'Prompt' in the header", id="csv-missing-column"),
    pytest.param(CSV_SOURCE, {"p.csv": "prompt,prompt\n1,a\n"},
                 "p.csv:1:1", "column 'prompt' appears twice", id="csv-column-twice"),
    pytest.param(CSV_SOURCE, {"p.csv": 'id,prompt\n1,a\n2,"b\n3,c\n'},
                 "p.csv:", "malformed CSV", id="csv-open-quote"),
    pytest.param(CSV_SOURCE, {"p.csv": ""}, "p.csv:1:1",
                 "the CSV file is empty", id="csv-empty"),
]


@pytest.mark.parametrize(("source", "files", "where", "message"), PROBLEMS)
def test_a_bad_line_is_named_with_the_manifest_line_reading_it(
    tmp_path: Path, source: str, files: dict[str, bytes | str], where: str, message: str
) -> None:
    """Each problem names FILE:LINE of the prompt file and the manifest's line 7."""
    path = write(tmp_path, source, files)
    text = str(refused(path))
    (name,) = files
    assert f"{tmp_path / name}:{where.split(':', 1)[1]}" in text
    assert message in text
    assert f"(in the file read at {path}:7)" in text


@pytest.mark.parametrize(("source", "files", "message"), [
    pytest.param("{file: missing.txt}", {}, "cannot read the prompt file", id="missing"),
    pytest.param("{file: d}", {"d/x": ""}, "cannot read the prompt file", id="a-directory"),
    pytest.param(TXT, {"p.txt": "# only a comment\n\n"}, "no prompts in it",
                 id="no-prompts"),
    pytest.param(CSV_SOURCE, {"p.csv": "prompt\n\n"}, "no rows in its",
                 id="csv-no-rows"),
    pytest.param("{csv: p.csv}", {}, "missing required key 'column'", id="no-column"),
    pytest.param("{file: a, csv: b, column: c}", {}, "give either file", id="file-and-csv"),
    pytest.param("{files: p.txt}", {}, "unknown key 'files'", id="misspelt-key"),
    pytest.param("{}", {}, "must not be empty", id="empty-mapping"),
    pytest.param("A fox", {}, "expected a list or a mapping", id="a-bare-prompt"),
])
def test_a_bad_source_is_named_at_the_manifest_line(
    tmp_path: Path, source: str, files: dict[str, str], message: str
) -> None:
    """A file that cannot be used, or a malformed source, is an error at the manifest's line."""
    path = write(tmp_path, source, files)
    text = str(refused(path))
    assert text.startswith(f"{path}:7:"), text
    assert message in text


def test_a_fifo_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A named pipe would block the load forever: refused at the manifest's line."""
    os.mkfifo(tmp_path / "p.txt")
    text = str(refused(write(tmp_path, TXT, {})))
    assert "is not a regular file" in text


def test_an_unreadable_file_says_where_paths_start(tmp_path: Path) -> None:
    """The hint of a missing file names the manifest's folder, where paths are resolved."""
    error = refused(write(tmp_path, "{file: nope.txt}", {}))
    assert f"hint: the path is relative to the manifest's folder ({tmp_path})" in str(error)


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    """Two lines too long and a repeated one: three problems, in one pass."""
    files = {"p.txt": "ok\n" + "x" * 5001 + "\nok\n" + "y" * 5002 + "\n"}
    error = refused(write(tmp_path, TXT, files))
    assert {(d.file, d.line) for d in error.diagnostics} == {
        (str(tmp_path / "p.txt"), 2), (str(tmp_path / "p.txt"), 3), (str(tmp_path / "p.txt"), 4)}


def test_a_prompt_file_problem_sends_nothing(
    tmp_path: Path, mock_server: Callable[..., MockServer]
) -> None:
    """``run`` exits 2 on a bad prompt file before any request, and writes no ledger."""
    server = mock_server()
    write(tmp_path, TXT, {"p.txt": SIX + "x" * 5001 + "\n"})
    done = cli(tmp_path, "run", "x.yaml", "--base-url", server.url)
    assert done.returncode == EXIT_USAGE
    assert "p.txt:7:1: jobs[0].matrix.prompt: is 5001 characters long" in done.stderr
    assert "(in the file read at x.yaml:7)" in done.stderr
    assert "Traceback" not in done.stderr
    assert server.api_requests() == {}
    assert not list(tmp_path.glob("*.ledger.csv"))


def test_validate_json_points_at_the_prompt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate --json gives the prompt file and its line as the problem's place."""
    path = write(tmp_path, TXT, {"p.txt": SIX + "x" * 5001 + "\n"})
    assert cli_main(["validate", "--json", path]) == EXIT_USAGE
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert (problem["file"], problem["line"], problem["path"]) == (
        str(tmp_path / "p.txt"), 7, "jobs[0].matrix.prompt")
    assert problem["message"].endswith(f"(in the file read at {path}:7)")
