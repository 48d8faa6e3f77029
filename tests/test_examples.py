"""Example files: every jobs/*.yaml validates; every tests/data/invalid/*.yaml fails as it says.

An invalid case states what it must produce in its first lines, one or more of
``# expect: LINE: fragment``: some diagnostic on LINE contains the fragment (message or
hint). Dropping a new file into the folder adds a case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner.errors import EXIT_USAGE, ManifestError
from runner.manifest.loader import load_manifests

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "data" / "invalid").glob("*.yaml"))
EXPECT = re.compile(rb"^# expect: (\d+): (.+?)\r?$", re.MULTILINE)


def _expectations(path: Path) -> list[tuple[int, str]]:
    found = EXPECT.findall(path.read_bytes())
    return [(int(line), fragment.decode("utf-8")) for line, fragment in found]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    """Each shipped example is a valid manifest with at least one job."""
    (manifest,) = load_manifests([str(path)])
    assert manifest.jobs
    assert manifest.name == path.stem


def test_examples_cover_the_documented_kinds() -> None:
    """The README's examples exist: text, image, matrix and Korean batches."""
    names = {path.name for path in EXAMPLES}
    assert {"example.yaml", "image-to-video.yaml", "matrix.yaml", "korean.yaml"} <= names


def test_examples_run_together() -> None:
    """All examples load in one call: no job_id is used by two of them."""
    manifests = load_manifests([str(path) for path in EXAMPLES])
    ids = [job.job_id for manifest in manifests for job in manifest.jobs]
    assert len(ids) == len(set(ids))


def test_example_is_small_enough_for_the_quick_start() -> None:
    """jobs/example.yaml stays a quick, cheap text-to-video demo (4-6 jobs, no images)."""
    (manifest,) = load_manifests([str(ROOT / "jobs" / "example.yaml")])
    assert 4 <= len(manifest.jobs) <= 6
    assert not any(job.image_url or job.image_file for job in manifest.jobs)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_fails_where_it_says(path: Path) -> None:
    """The file is refused (exit 2) with each expected fragment on its expected line."""
    expectations = _expectations(path)
    assert expectations, f"{path.name}: start it with '# expect: LINE: fragment'"
    with pytest.raises(ManifestError) as caught:
        load_manifests([str(path)])
    diagnostics = caught.value.diagnostics
    assert caught.value.exit_code == EXIT_USAGE
    assert {d.file for d in diagnostics} == {str(path)}
    for line, fragment in expectations:
        assert any(d.line == line and fragment in str(d) for d in diagnostics), (
            f"expected line {line}: {fragment!r}\ngot:\n{caught.value}"
        )
