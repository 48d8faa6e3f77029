"""The wheel carries what a non-editable install needs; the public surface is small."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import runner

ROOT = Path(__file__).resolve().parent.parent


def test_public_names():
    """`import runner` exposes a short, sorted list of names."""
    assert runner.__all__ == sorted(runner.__all__)
    assert set(runner.__all__) == {"Job", "RunnerError", "__version__"}


@pytest.mark.slow
def test_wheel_validates_manifests_from_another_directory(tmp_path):
    """A wheel built offline, unpacked elsewhere, validates a manifest and prints the schema."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("apimart_batch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "runner/_schemas/manifest.schema.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\njobs:\n  - model: sora-2\n    prompt: a cat\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import runner, sys; from runner.cli import main; "
        "assert runner.__file__.startswith(sys.argv[1]), runner.__file__; "
        "sys.exit(main(['validate', sys.argv[2]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(site), str(manifest)],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 job valid" in done.stdout
    schema = subprocess.run(
        [sys.executable, "-c", "from runner.cli import main; main(['schema'])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    assert '"$id"' in schema.stdout
