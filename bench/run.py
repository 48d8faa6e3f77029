"""``python -m bench [--quick] [--only NAMES] [--repeats N] [--out DIR]``: measure, write the table.

The full set writes ``BENCHMARKS.md`` and ``BENCHMARKS.json`` at the repository root; ``--quick``
(small N, one run each) writes them to a temporary folder unless ``--out`` names one, so a smoke
run never replaces the measured table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.proc import bench_env, cli
from bench.scenarios import JITTER, L_MS, ROOT, SCENARIOS, Bench
from bench.table import Row, write

__all__ = ["main"]

NOTES = [
    "How to read it:",
    "",
    f"- Latency: every API answer of the emulator (its own process) waits a lognormal time with "
    f"mean L = {L_MS:.0f} ms (sigma {JITTER}; the knob `--latency-ms` is the median, set to "
    f"L / exp(sigma²/2)).",
    "- Throughput bound = C / L jobs per second; `ours` is N over the wall time of the whole "
    "`apimart-batch run` process, start-up and exit included. The *submit phase* row uses the "
    "summary's `elapsed_s` instead, to separate start-up and teardown from sending.",
    "- Naive = `bench/naive.py`: aiohttp, a semaphore and a connection pool of C, "
    "`yaml.safe_load`, a csv writer, a 429 waits `Retry-After` (else 1 s) and tries again.",
    "- CPU = user + system seconds of the child (`os.wait4`); peak RSS = its `ru_maxrss`.",
    "- Rate limit: the emulator's token bucket (burst one second's worth) answers 429 past R "
    "submits per second. The rate is what the server saw: tasks created from first to last, "
    "from the ULID times in the task ids; the burst lets a client exceed R by up to R/N.",
    "- Scale: the floor (`bench/floor.py`) is CSafeLoader + defaults and matrix expansion + a "
    "SHA-256 of each job's canonical JSON, as its own process. Memory per job is the slope of "
    "peak RSS between the two sizes, so the fixed base drops out. Explicit manifests keep the "
    "21-character prompts of the first run (made to fit the former 5 MiB file limit, now "
    "32 MiB), so the figures compare; the last scale row checks 200-character prompts.",
    "- Polling: `status LEDGER --wait` over tasks that take `--task-seconds`; lag = time of a "
    "job's first `completed` ledger row minus its task's completion (created + task seconds).",
    "- Machine note: cores kept busy by *other* processes during the runs (from /proc/stat, "
    "less the child and the emulator) and the emulator's CPU share of one core; near 100 % "
    "the emulator, not the client, is the limit.",
]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args],  # noqa: S607 - git from PATH
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except OSError:
        return ""
    return done.stdout.strip()


def _machine(started_load: tuple[float, float, float]) -> str:
    model = ""
    try:
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({model or platform.machine()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {started_load[0]:.2f} at the start, "
        f"{load[0]:.2f} at the end. The machine may be shared: each row's note says how many "
        "cores other processes kept busy; absolute times move with that, ratios of runs made "
        "side by side much less"
    )


def _measured(commit: str, dirty: bool, origin: str) -> str:
    """Which code was measured: this checkout's commit, or the other tree PYTHONPATH named."""
    if Path(origin).parent != ROOT:
        return f"the code in `{Path(origin).parent}` (harness at commit `{commit}`)"
    return f"commit `{commit}`" + (" + uncommitted changes in runner/" if dirty else "")


def _runner_origin(cwd: Path) -> str:
    """Where the children import ``runner`` from (PYTHONPATH may point at another checkout)."""
    probe = [sys.executable, "-c", "import runner; print(runner.__file__)"]
    done = subprocess.run(
        probe, cwd=cwd, env=bench_env(), capture_output=True, text=True, check=False
    )
    return str(Path(done.stdout.strip()).parent) if done.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and write BENCHMARKS.md and BENCHMARKS.json."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, one run each (a smoke test)")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated scenarios (default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--repeats", type=int, help="runs of each figure (default 3; --quick 1)")
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="jobs per run of throughput, ratelimit and polling "
        "(default 5000, 2000, 5000; --quick 100, 200, 100)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for BENCHMARKS.md and .json "
        "(default: the repository root; --quick: a temporary folder)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (manifests, ledgers, logs)"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown} (choose from {', '.join(SCENARIOS)})")
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="apimart-bench-"))
    out = args.out or (work / "out" if args.quick else ROOT)
    started, load = time.monotonic(), os.getloadavg()
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "runner", "schemas"))
    origin = _runner_origin(work)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {text}", file=sys.stderr, flush=True)

    say(f"work folder {work}; running {', '.join(names)} with {' '.join(cli())}")
    bench = Bench(quick=args.quick, repeats=repeats, work=work, say=say, jobs=args.jobs)
    rows: list[Row] = []
    durations: dict[str, float] = {}
    try:
        for name in names:
            t0 = time.monotonic()
            rows += SCENARIOS[name](bench)
            durations[name] = round(time.monotonic() - t0, 1)
            say(f"{name} done in {durations[name]:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta: dict[str, Any] = {
        "command": "python -m bench"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _measured(commit, dirty, origin),
        "runner_imported_from": origin,
        "machine": _machine(load),
        "quick": args.quick,
        "repeats": repeats,
        "scenario_seconds": durations,
        "notes": NOTES,
    }
    md, js = write(rows, meta, out)
    say(f"wrote {md} and {js}")
    print(md.read_text(encoding="utf-8").split("\n\n", 3)[-1].split("How to read it")[0])
    return 0
