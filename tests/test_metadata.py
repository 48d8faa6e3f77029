"""``metadata:`` tags: kept in ledger, report and plan; never sent, never part of an identity."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import app
from runner.api.client import Secret
from runner.api.retry import RetryPolicy
from runner.app import RunConfig
from runner.cli import main as cli_main
from runner.console import Console
from runner.emulator import contract as emulator_contract
from runner.errors import EXIT_USAGE, ManifestError
from runner.ledger.store import COLUMNS, open_ledger, read_latest
from runner.manifest import built_in_prices
from runner.manifest.loader import load_manifests
from runner.report import build_report, plan_json, render_csv, render_json, render_table

KEY = "sk-live-TAGKEY-must-never-be-printed-5151"
NO_WAIT = RetryPolicy(attempts=3, wait_initial=0.0, wait_max=0.0)
#: Tag values no request field holds: finding one in a body means a tag was sent.
SKU, CAMPAIGN, OWNER = "SKU-77-needle", "campaign-needle", "owner-needle"


def manifest(tmp_path: Path, *, entry_tags: dict[str, Any] | None = None,
             default_tags: dict[str, Any] | None = None) -> str:
    """Two sora-2 jobs (``tagged`` and ``plain``) and a two-prompt matrix, tags as given."""
    defaults: dict[str, Any] = {"model": "sora-2", "duration": 4}
    if default_tags is not None:
        defaults["metadata"] = default_tags
    tagged: dict[str, Any] = {"id": "tagged", "prompt": "A red kettle on a stove"}
    if entry_tags is not None:
        tagged["metadata"] = entry_tags
    doc = {"version": 1, "name": "tags", "defaults": defaults, "jobs": [
        tagged,
        {"id": "plain", "prompt": "A blue kettle on a stove", "metadata": {}},
        {"id": "grid", "matrix": {"prompt": ["A fox at dawn", "A fox at dusk"]},
         "metadata": {"sku": "grid-sku"}},
    ]}
    path = tmp_path / "tags.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(path)


TAGS = {"sku": SKU, "owner": OWNER}
DEFAULT_TAGS = {"campaign": CAMPAIGN, "owner": "nobody"}


@pytest.fixture
def bodies(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every submit body the emulator parses, as it received it."""
    seen: list[Any] = []
    original = emulator_contract.routing_problem

    def spy(body: object) -> str | None:
        seen.append(body)
        return original(body)

    monkeypatch.setattr(emulator_contract, "routing_problem", spy)
    return seen


async def run(srv: Any, path: str) -> int:
    """``run`` the manifest against the emulator, output swallowed; the exit code."""
    config = RunConfig(manifests=(path,), api_key=Secret(KEY), base_url=srv.base_url,
                       policy=NO_WAIT)
    with contextlib.redirect_stdout(io.StringIO()):
        return await app.run(config, Console(stream=io.StringIO()))


def ledger_of(path: str) -> str:
    """The ledger a real run of ``path`` writes."""
    return app.ledger_path(path, mock=False, override=None)


async def test_tags_reach_the_ledger_and_never_a_request(emulator, tmp_path, bodies) -> None:
    """Merged tags land in the ledger as sorted compact JSON; no body holds a tag or its key."""
    srv = await emulator()
    path = manifest(tmp_path, entry_tags=TAGS, default_tags=DEFAULT_TAGS)
    assert await run(srv, path) == 0
    assert len(bodies) == 4
    for body in bodies:
        text = json.dumps(body)
        assert "metadata" not in text
        assert not {SKU, CAMPAIGN, OWNER, "grid-sku"} & set(text.split('"'))
    rows = read_latest(ledger_of(path))
    assert rows["tagged"]["metadata"] == (
        f'{{"campaign":"{CAMPAIGN}","owner":"{OWNER}","sku":"{SKU}"}}')
    assert rows["plain"]["metadata"] == f'{{"campaign":"{CAMPAIGN}","owner":"nobody"}}'
    grid = [row for job, row in rows.items() if job.startswith("grid-")]
    assert len(grid) == 2
    assert all(json.loads(row["metadata"])["sku"] == "grid-sku" for row in grid)


async def test_report_shows_tags_in_every_format(emulator, tmp_path, bodies) -> None:
    """report: JSON gives an object, CSV the ledger's cell, the table a tags column."""
    srv = await emulator()
    path = manifest(tmp_path, entry_tags=TAGS)
    assert await run(srv, path) == 0
    report = build_report(ledger_of(path))
    jobs = {job["job_id"]: job for job in json.loads(render_json(report))["jobs"]}
    assert jobs["tagged"]["metadata"] == {"owner": OWNER, "sku": SKU}
    assert jobs["plain"]["metadata"] == {}
    shown = {row["job_id"]: row for row in csv.DictReader(io.StringIO(render_csv(report)))}
    assert json.loads(shown["tagged"]["metadata"]) == TAGS
    assert shown["plain"]["metadata"] == ""
    table = render_table(report, width=200).splitlines()
    column = table[0].index("tags")
    (row,) = [line for line in table if line.startswith("tagged ")]
    assert row[column:].startswith(f"owner={OWNER}")


def test_the_table_has_no_tags_column_without_tags(tmp_path: Path) -> None:
    """A ledger whose jobs carry no tags keeps the table as it was."""
    path = tmp_path / "L.csv"
    with open_ledger(path, mock=False, base_url="https://api.apimart.ai") as ledger:
        ledger.append("a", status="submitting")
    assert "tags" not in render_table(build_report(str(path)), width=200).splitlines()[0]


@pytest.mark.parametrize("tags", [
    pytest.param({"sku": "B-2"}, id="changed-value"),
    pytest.param({}, id="removed"),
    pytest.param({"sku": SKU, "owner": OWNER, "new": "x"}, id="added-key"),
])
def test_changing_tags_changes_no_identity(tmp_path: Path, tags: dict[str, str]) -> None:
    """Job id, fingerprint and Idempotency-Key ignore the tags: nothing counts as changed."""
    def identities(path: str) -> dict[str, tuple[str, str]]:
        (loaded,) = load_manifests([path])
        return {job.job_id: (job.fingerprint, job.idempotency_key) for job in loaded.jobs}

    before = identities(manifest(tmp_path, entry_tags=TAGS, default_tags=DEFAULT_TAGS))
    assert identities(manifest(tmp_path, entry_tags=tags)) == before
    assert identities(manifest(tmp_path)) == before


async def test_rerun_after_a_tag_change_buys_nothing(emulator, tmp_path, bodies) -> None:
    """Editing only tags after a run leaves every job done: no second submission."""
    srv = await emulator()
    assert await run(srv, manifest(tmp_path, entry_tags=TAGS)) == 0
    sent = len(bodies)
    path = manifest(tmp_path, entry_tags={"sku": "other"}, default_tags={"campaign": "new"})
    assert await run(srv, path) == 0
    assert len(bodies) == sent


def test_plan_json_lists_the_merged_tags(tmp_path: Path) -> None:
    """plan --json: each job's tags as an object (entry over defaults), none in its request."""
    (loaded,) = load_manifests([manifest(tmp_path, entry_tags=TAGS, default_tags=DEFAULT_TAGS)])
    jobs = {job["job_id"]: job for job in plan_json([loaded], built_in_prices())["jobs"]}
    assert jobs["tagged"]["metadata"] == {"campaign": CAMPAIGN, "owner": OWNER, "sku": SKU}
    assert jobs["plain"]["metadata"] == {"campaign": CAMPAIGN, "owner": "nobody"}
    assert all("metadata" not in job["request"] for job in jobs.values())


INVALID = [
    pytest.param("metadata: {sku: 1042}", "jobs[0].metadata.sku: expected text, got integer",
                 "put the value in quotes", id="number-value"),
    pytest.param("metadata: {sku: [a, b]}", "jobs[0].metadata.sku: expected text, got a list",
                 None, id="list-value"),
    pytest.param("metadata: {sku: {a: b}}", "jobs[0].metadata.sku: expected text, got a mapping",
                 None, id="mapping-value"),
    pytest.param("metadata: [sku, a]", "jobs[0].metadata: expected a mapping", None,
                 id="list"),
    pytest.param("metadata: {sku: null}", "jobs[0].metadata.sku: expected text, but the value",
                 None, id="empty-value"),
    pytest.param('metadata: {"bad key": x}', "'bad key' is not allowed here",
                 "a metadata key is 1-64 characters", id="key-with-space"),
    pytest.param("metadata: {sku: " + "x" * 1001 + "}", "is 1001 characters long; at most 1000",
                 None, id="value-too-long"),
    pytest.param('metadata: {sku: "A\\0B"}', "jobs[0].metadata.sku:", None, id="nul-in-value"),
    pytest.param('metadata: {sku: "A\\nB"}', "jobs[0].metadata.sku:", None, id="line-break"),
    pytest.param("metadata: {" + ", ".join(f"k{i}: v" for i in range(51)) + "}",
                 "jobs[0].metadata: at most 50 keys allowed, got 51", None, id="too-many-keys"),
]


@pytest.mark.parametrize(("line", "message", "hint"), INVALID)
def test_invalid_tags_are_refused_at_their_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str, hint: str | None
) -> None:
    """validate exits 2 naming file:line:col and the field; nothing loads."""
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ndefaults: {model: sora-2}\njobs:\n"
                    f"  - prompt: A cat\n    {line}\n", encoding="utf-8")
    assert cli_main(["validate", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{path}:5:" in err
    assert message in err
    assert hint is None or f"hint: {hint}" in err


@pytest.mark.parametrize("where", ["beside-prompt", "alone"])
def test_tags_cannot_be_a_matrix_axis(tmp_path: Path, where: str) -> None:
    """metadata inside a matrix is refused: tags are the entry's, for every combination."""
    path = tmp_path / "m.yaml"
    beside = "  - matrix: {prompt: [a, b], metadata: [{x: y}]}\n"
    alone = "  - matrix: {prompt: [a, b]}\n    metadata: {x: y}\n  - matrix: {metadata: [x]}\n"
    jobs = beside if where == "beside-prompt" else alone
    path.write_text(f"version: 1\ndefaults: {{model: sora-2}}\njobs:\n{jobs}", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifests([str(path)])
    assert "'metadata' is not allowed here" in str(info.value)
    assert "id, repeat and metadata belong on the entry" in str(info.value)


def test_an_older_ledger_gains_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    """A ledger written before ``metadata`` reads as before and is upgraded once, kept as .bak."""
    path = tmp_path / "old.csv"
    old = [name for name in COLUMNS if name != "metadata"]
    with open_ledger(path, mock=False, base_url="https://api.apimart.ai") as ledger:
        ledger.append("a", status="submitting", fingerprint="0123456789abcdef")
        ledger.append("a", status="submitted", task_id="task_1")
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, old, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    assert read_latest(path)["a"]["metadata"] == ""
    warnings: list[str] = []
    with open_ledger(path, mock=False, base_url="https://api.apimart.ai",
                     warn=warnings.append) as ledger:
        assert ledger.latest["a"]["task_id"] == "task_1"
        ledger.append("a", status="completed", metadata='{"sku":"x"}')
    assert any("added the columns metadata" in w for w in warnings)
    assert len(list(tmp_path.glob("old.csv.bak-*"))) == 1
    assert read_latest(path)["a"]["metadata"] == '{"sku":"x"}'


@pytest.mark.parametrize("key", ["tags", "labels"])
def test_a_tags_key_points_at_metadata(tmp_path: Path, key: str) -> None:
    """A job field named like tags is refused with the hint to write metadata instead."""
    path = tmp_path / "t.yaml"
    path.write_text(f"version: 1\ndefaults: {{model: sora-2}}\njobs:\n  - prompt: A cat\n"
                    f"    {key}: {{sku: x}}\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifests([str(path)])
    assert f"{path}:5:5: jobs[0].{key}: unknown key '{key}'" in str(info.value)
    assert "hint: for your own tags, write 'metadata: {key: value}'" in str(info.value)
