"""Manifest diagnostics: the true count past the printed limit, their JSON form, the jobs hint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from runner.errors import Diagnostic, ManifestError
from runner.manifest import bundled_schema, load_catalog, load_manifests
from runner.manifest.diagnostics import (
    MAX_DIAGNOSTICS,
    Truncated,
    diagnostics_document,
    diagnostics_json,
    every_problem,
    problem_count,
)

HEAD = "version: 1\ndefaults: {model: sora-2}\njobs:\n"


def write(folder: Path, text: str, name: str = "m.yaml") -> str:
    """``text`` as a manifest file in ``folder``; its path."""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def refused(*paths: str) -> list[Diagnostic]:
    """The diagnostics of manifests that must be refused."""
    with pytest.raises(ManifestError) as caught:
        load_manifests(list(paths))
    return caught.value.diagnostics


def many(folder: Path, count: int, name: str = "m.yaml") -> str:
    """A manifest with ``count`` problems, one per job (a duration sora-2 does not take)."""
    return write(folder, HEAD + "".join(f"  - {{prompt: p{i}, duration: 5}}\n"
                                        for i in range(count)), name)


# --- the cut at MAX_DIAGNOSTICS ------------------------------------------------------------


def test_the_summary_line_gives_the_true_total(tmp_path: Path) -> None:
    """Past the limit one line says how many more, and the file's true total."""
    diagnostics = refused(many(tmp_path, MAX_DIAGNOSTICS + 37))
    assert len(diagnostics) == MAX_DIAGNOSTICS + 1
    summary = diagnostics[-1]
    assert isinstance(summary, Truncated)
    assert summary.message.startswith(f"... and 37 more; {MAX_DIAGNOSTICS + 37} problems found")
    assert str(summary).startswith(f"{summary.file}:{summary.line}:{summary.col}: ... and 37")


def test_problem_count_sees_through_the_cut(tmp_path: Path) -> None:
    """The count is every problem of every file, also those not printed."""
    first = many(tmp_path, MAX_DIAGNOSTICS + 37, "a.yaml")
    second = many(tmp_path, 3, "b.yaml")
    diagnostics = refused(first, second)
    assert problem_count(diagnostics) == MAX_DIAGNOSTICS + 37 + 3
    found = every_problem(diagnostics)
    assert not any(isinstance(d, Truncated) for d in found)
    assert len(set(found)) == len(found)
    assert [d.line for d in found if d.file == first] == sorted(d.line for d in found
                                                                if d.file == first)


@pytest.mark.parametrize("count", [1, MAX_DIAGNOSTICS - 1, MAX_DIAGNOSTICS])
def test_no_cut_below_the_limit(tmp_path: Path, count: int) -> None:
    """Up to the limit every problem is printed and counted once."""
    diagnostics = refused(many(tmp_path, count))
    assert len(diagnostics) == problem_count(diagnostics) == count
    assert not any(isinstance(d, Truncated) for d in diagnostics)


# --- diagnostics_json ----------------------------------------------------------------------


def test_diagnostics_json_lists_every_problem_past_the_cut(tmp_path: Path) -> None:
    """The JSON form has no cut: each problem with its place, and the total."""
    path = many(tmp_path, MAX_DIAGNOSTICS + 37)
    doc = json.loads(diagnostics_json(refused(path)))
    assert doc["total"] == len(doc["problems"]) == MAX_DIAGNOSTICS + 37
    last = doc["problems"][-1]
    assert set(last) == {"file", "line", "col", "path", "message", "hint"}
    assert (last["file"], last["line"], last["path"]) == (path, 4 + MAX_DIAGNOSTICS + 36,
                                                          f"jobs[{MAX_DIAGNOSTICS + 36}].duration")
    assert "more" not in " ".join(p["message"] for p in doc["problems"])


def test_diagnostics_json_fields_and_nulls() -> None:
    """Every field is given; a problem of the whole file has path null, no hint is null."""
    diagnostics = [
        Diagnostic("m.yaml", 1, 1, "", "the file is empty", "start with 'version: 1'"),
        Diagnostic("m.yaml", 4, 7, "jobs[0].duration", "5 is not allowed", None),
    ]
    assert diagnostics_document(diagnostics) == {
        "total": 2,
        "problems": [
            {"file": "m.yaml", "line": 1, "col": 1, "path": None,
             "message": "the file is empty", "hint": "start with 'version: 1'"},
            {"file": "m.yaml", "line": 4, "col": 7, "path": "jobs[0].duration",
             "message": "5 is not allowed", "hint": None},
        ],
    }  # fmt: skip


def test_diagnostics_json_of_nothing() -> None:
    """No diagnostics: total 0, an empty list (what a valid run would print)."""
    assert json.loads(diagnostics_json([])) == {"total": 0, "problems": []}


def test_diagnostics_json_keeps_text_as_written(tmp_path: Path) -> None:
    """Non-ASCII prompts and paths come out as themselves, and the output parses."""
    path = write(tmp_path, HEAD + "  - {prompt: 폭포, 길이: 5}\n", "한국어.yaml")
    text = diagnostics_json(refused(path))
    assert "한국어.yaml" in text
    (problem,) = json.loads(text)["problems"]
    assert problem["path"] == 'jobs[0]["길이"]'


# --- the hint for a manifest without jobs ---------------------------------------------------


def suggested_manifest(tmp_path: Path) -> str:
    """The minimal manifest the hint for a missing ``jobs:`` suggests, as written there."""
    (problem,) = refused(write(tmp_path, "version: 1\n", "empty.yaml"))
    assert "missing required key 'jobs'" in problem.message
    assert problem.hint is not None
    match = re.search(r"a minimal manifest is: (\{.*\})$", problem.hint)
    assert match, problem.hint
    return match.group(1)


def test_the_jobs_hint_suggests_a_manifest_the_schema_accepts(tmp_path: Path) -> None:
    """The snippet validates against the bundled schema: as a document, and each job."""
    document: Any = yaml.safe_load(suggested_manifest(tmp_path))
    schema = bundled_schema(load_catalog())
    assert [e.message for e in Draft202012Validator(schema).iter_errors(document)] == []
    # The runner checks each expanded job against $defs/job (its model's schema) too.
    job = {key: schema[key] for key in ("$schema", "$id", "$defs")} | {"$ref": "#/$defs/job"}
    assert document["jobs"]
    for entry in document["jobs"]:
        assert [e.message for e in Draft202012Validator(job).iter_errors(entry)] == []


def test_the_jobs_hint_suggests_a_manifest_that_loads(tmp_path: Path) -> None:
    """Pasted as a file, the suggestion is a valid manifest of one job."""
    (manifest,) = load_manifests([write(tmp_path, suggested_manifest(tmp_path) + "\n")])
    assert len(manifest.jobs) == 1
