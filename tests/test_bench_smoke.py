"""Smoke test of the benchmark harness (bench/): a tiny quick run, figures never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: bench.proc.BENCH_KEY: the harness's stand-in key, which must not leak into its output.
BENCH_KEY = "bench-key-not-a-secret"


@pytest.mark.slow
def test_quick_harness_writes_the_table_and_its_json(tmp_path):
    """`python -m bench --quick` runs ours and naive against its emulator and writes both files."""
    argv = [sys.executable, "-m", "bench", "--quick", "--only", "throughput", "--jobs", "20",
            "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "BENCHMARKS.json").read_text(encoding="utf-8"))
    whole = [row for row in doc["rows"] if row["metric"] == "jobs/s, whole process"]
    assert [row["case"] for row in whole] == ["N=20, L=100 ms, C=8", "N=20, L=100 ms, C=64"]
    for row in whole:
        assert row["ours"]["median"] > 0 and row["naive"]["median"] > 0
        assert row["bound"].startswith(("80 ", "640 "))
        assert {s["rc"] for s in row["ours_samples"] + row["naive_samples"]} == {0}
    md = (tmp_path / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "| 1 throughput | N=20, L=100 ms, C=8 | jobs/s, whole process |" in md
    assert BENCH_KEY not in md + json.dumps(doc) + done.stdout + done.stderr
