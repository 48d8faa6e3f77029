"""runner.plan: the human plan table and its JSON twin."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from jobfactory import make_job

from runner.cli import main
from runner.manifest.loader import Manifest, load_manifests
from runner.manifest.pricing import built_in_prices, merged_prices
from runner.models import Job
from runner.report.plan import plan_json, render_plan


def job(job_id: str, **fields: object) -> Job:
    values: dict[str, object] = {"model": "sora-2", "prompt": "A cat surfing at dawn"}
    values.update(fields)
    return make_job(job_id, manifest="jobs/x.yaml", manifest_name="x", line=3, **values)


JOBS = (
    job("cat", duration=8),
    job("falls", prompt="폭포가 흘러내려 무지개를 형성하다 " * 4, aspect_ratio="9:16"),
    job("pro", model="sora-2-pro", resolution="1080p", duration=12,
        image_file="/data/stills/고양이.png", image_sha256="0" * 64),
    job("url", image_url="https://example.com/a/cat.webp?sig=1", prompt="🎬 emoji\nand lines"),
)  # fmt: skip
MANIFESTS = [Manifest(path="jobs/x.yaml", name="x", jobs=JOBS)]


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_plan_lists_every_job_with_its_fields() -> None:
    """Each job is a row: id, model, seconds, resolution, aspect, image, prompt excerpt."""
    text = render_plan(MANIFESTS, built_in_prices())
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert rows["cat"].split()[:5] == ["cat", "sora-2", "8", "720p*", "16:9*"]
    pro = ["pro", "sora-2-pro", "12", "1080p", "16:9*", "file:고양이.png"]
    assert rows["pro"].split()[:6] == pro
    assert "url:cat.webp" in rows["url"]
    assert "🎬 emoji and lines" in rows["url"]
    assert "4*" in rows["falls"] and "9:16" in rows["falls"]


def test_wide_characters_do_not_break_the_columns() -> None:
    """Hangul in a column before PROMPT still lines up the PROMPT column."""
    text = render_plan(MANIFESTS, built_in_prices()).splitlines()
    lines = [line for line in text if line.startswith(("  ID ", "  cat ", "  pro ", "  url "))]
    starts = set()
    for line in lines:
        marker = next(w for w in ("PROMPT", "A cat", "🎬") if w in line)
        starts.add(display_width(line[: line.index(marker)]))
    assert len(starts) == 1


def test_long_prompts_are_cut_with_an_ellipsis() -> None:
    """A prompt excerpt is at most 48 display columns and says it was cut."""
    text = render_plan(MANIFESTS, built_in_prices())
    (falls,) = [line for line in text.splitlines() if "falls" in line]
    excerpt = falls[falls.index("폭포") :]
    assert excerpt.endswith("…")
    assert display_width(excerpt) <= 48


def test_totals_and_estimate_are_labelled() -> None:
    """Totals per model, and a cost that says it is an estimate and where prices came from."""
    text = render_plan(MANIFESTS, merged_prices([], {"sora-2-pro/1080p": 0.6}))
    totals = text[text.index("Totals") :]
    assert "sora-2         3       16      1.28" in totals
    assert "sora-2-pro     1       12      7.20" in totals
    assert "all            4       28      8.48" in totals
    assert "Estimated cost: $8.48 (an estimate, not a quote" in text
    assert "sora-2-pro/1080p 0.6 (from --price)" in text
    assert "sora-2/720p 0.08 (public figure)" in text


def test_skipped_jobs_show_why_and_cost_nothing() -> None:
    """With a ledger, skipped jobs are marked with their reason and left out of the totals."""
    skipped = {"pro": "done (task_01K8)"}
    text = render_plan(MANIFESTS, built_in_prices(), skipped)
    (pro,) = [line for line in text.splitlines() if " pro " in line]
    assert pro.lstrip().startswith("skip: done ")
    assert "run " in next(line for line in text.splitlines() if " cat " in line)
    assert "1 job skipped" in text
    assert "Estimated cost: $1.28" in text


def test_no_action_column_without_a_ledger() -> None:
    """Without skips the table has no ACTION column."""
    assert "ACTION" not in render_plan(MANIFESTS, built_in_prices())


def test_plan_json_has_stable_keys_and_matches_the_text() -> None:
    """plan --json: documented keys, JSON-serialisable, same totals as the table."""
    data = plan_json(MANIFESTS, built_in_prices(), {"url": "done"})
    json.dumps(data)
    assert set(data) == {
        "estimate", "currency", "note", "manifests", "jobs", "totals", "prices", "unpriced"
    }
    assert data["estimate"] is True and data["currency"] == "USD"
    assert set(data["jobs"][0]) == {
        "job_id", "manifest", "manifest_name", "line", "model", "prompt", "duration", "seconds",
        "resolution", "aspect_ratio", "image_url", "image_file", "image_sha256", "fingerprint",
        "estimated_usd", "skip", "request", "resolved", "uploads", "catalogued", "price_key",
        "take", "metadata",
    }  # fmt: skip
    assert [j["skip"] for j in data["jobs"]] == [None, None, None, "done"]
    assert data["totals"]["jobs"] == 3
    assert data["totals"]["skipped"] == 1
    assert data["totals"]["by_model"]["sora-2"] == {
        "jobs": 2, "seconds": 12, "estimated_usd": 0.96, "unpriced": 0
    }
    assert data["totals"]["estimated_usd"] == pytest.approx(0.96 + 12 * 0.56)
    assert data["manifests"] == [{"path": "jobs/x.yaml", "name": "x", "jobs": 4, "prices": {}}]


def test_plan_of_nothing_is_still_a_plan() -> None:
    """No jobs: zero totals, no crash."""
    empty = [Manifest(path="e.yaml", name="e", jobs=())]
    assert "Estimated cost: $0.00" in render_plan(empty, built_in_prices())
    assert plan_json(empty, built_in_prices())["totals"]["jobs"] == 0


def test_a_plain_price_dict_is_labelled_honestly() -> None:
    """Without a PriceTable, a price that differs from the built-in one is 'given'."""
    text = render_plan(MANIFESTS, {"sora-2/720p": 0.1})
    assert "sora-2/720p 0.1 (given)" in text
    assert "sora-2-pro/1080p 0.56 (assumed)" in text


def test_plan_json_streams_the_same_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``plan --json`` writes, job by job, exactly the text of ``plan_json``, then a newline."""
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ndefaults: {model: sora-2}\njobs:\n"
                    "  - {id: a, prompt: \"a cat, \\\"quoted\\\" \u00e9\"}\n"
                    "  - {id: b, prompt: a dog, duration: 8}\n", encoding="utf-8")
    assert main(["plan", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    manifests = load_manifests([str(path)])
    expected = plan_json(manifests, merged_prices(manifests, {}))
    assert out == json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
    assert expected["totals"]["jobs"] == 2 and len(expected["jobs"]) == 2
