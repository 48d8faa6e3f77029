"""The five scenarios of issue 15, each a function from a ``Bench`` to rows of the table.

Every scenario starts its own emulator process, writes its manifests under the bench's work
folder, and runs ``apimart-batch`` (and the naive client, where one applies) as children,
alternating which goes first so that a drift in the machine's load hits both alike.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import manifests
from bench.proc import Emulator, Sample, bench_env, cli, measure, python
from bench.table import Figure, Row

__all__ = ["SCENARIOS", "Bench"]

ROOT = Path(__file__).resolve().parents[1]
NAIVE = Path(__file__).with_name("naive.py")
FLOOR = Path(__file__).with_name("floor.py")
#: Mean added latency L of every API answer, and the lognormal spread around it.
L_MS = 100.0
JITTER = 0.3
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def latency_flags(mean_ms: float = L_MS) -> list[str]:
    """Emulator flags for a lognormal latency of mean ``mean_ms`` (the knob sets its median)."""
    median = mean_ms / math.exp(JITTER**2 / 2)
    return ["--latency-ms", f"{median:.2f}", "--latency-jitter", str(JITTER)]


@dataclass
class Bench:
    """One benchmark session: its size (``quick``), repeats, work folder and progress printer."""

    quick: bool
    repeats: int
    work: Path
    say: Callable[[str], None]
    #: Jobs per run of the throughput, rate-limit and polling scenarios (default: theirs).
    jobs: int | None = None
    _emulators: int = field(default=0)

    def path(self, name: str) -> Path:
        """A path under the work folder (its parent folders made)."""
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def emulator(self, *flags: str) -> Emulator:
        """A new emulator process with ``flags`` (start it with ``with``)."""
        self._emulators += 1
        return Emulator(
            ["--seed", "1", *flags], log=self.path(f"logs/emulator-{self._emulators}.log")
        )

    def ours(
        self,
        *args: object,
        emulator: Emulator | None = None,
        ok: Sequence[int] = (0,),
        stdout: Path | None = None,
    ) -> Sample:
        """Measure one ``apimart-batch ARGS`` run."""
        return measure(
            [*cli(), *map(str, args)], cwd=self.work, emulator=emulator, ok=ok, stdout=stdout
        )

    def naive(
        self, manifest: Path, out: Path, url: str, concurrency: int, emulator: Emulator
    ) -> Sample:
        """Measure one run of the naive client."""
        argv = [
            *python(),
            str(NAIVE),
            str(manifest),
            str(out),
            "--base-url",
            url,
            "-j",
            str(concurrency),
        ]
        return measure(argv, cwd=self.work, emulator=emulator)


# -- helpers -----------------------------------------------------------------------------------


def machine_note(samples: Sequence[Sample]) -> str:
    """How busy the machine was around ``samples``: other processes, and the emulator."""
    if not samples:
        return ""
    others = statistics.median(s.others_cores for s in samples)
    text = f"others busy {others:.2f} cores"
    if any(s.emulator_cpu_s for s in samples):
        emu = statistics.median(s.emulator_cpu_s / s.wall_s for s in samples if s.wall_s)
        text += f"; emulator {emu:.0%} of a core"
    return text


def per_run(
    a: Sequence[float], b: Sequence[float], f: Callable[[float, float], float]
) -> list[float]:
    """``f(a[i], b[i])`` for each run ``i``."""
    return [f(x, y) for x, y in zip(a, b, strict=True)]


def summary(path: Path) -> dict[str, Any]:
    """A ``--summary-json`` file."""
    import json

    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def ulid_seconds(task_id: str) -> float:
    """The creation time (unix seconds) in an emulator task id ``task_<ULID>``."""
    n = 0
    for char in task_id.removeprefix("task_")[:10]:
        n = n * 32 + _CROCKFORD.index(char)
    return n / 1000.0


def ledger_rows(path: Path) -> list[dict[str, str]]:
    """Every row of a ledger (or of the naive client's CSV)."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def iso_seconds(text: str) -> float:
    """Unix seconds of a ledger ``time`` cell (ISO-8601, UTC, ``Z``)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def delta(before: dict[str, Any], after: dict[str, Any], group: str, key: str) -> int:
    """How much the emulator counter ``group[key]`` grew."""
    return int(after.get(group, {}).get(key, 0)) - int(before.get(group, {}).get(key, 0))


def fig(
    samples: Sequence[Sample], f: Callable[[Sample], float], unit: str = "", digits: int = 2
) -> Figure:
    """A figure of ``f`` over samples."""
    return Figure.of([f(s) for s in samples], unit, digits)


def rss_mb(samples: Sequence[Sample]) -> str:
    """The peak RSS of samples in MB, as a figure's text."""
    return fig(samples, lambda x: x.max_rss_kb / 1024, digits=0).text()


# -- 1. throughput ---------------------------------------------------------------------------


def _submit_all(b: Bench, emu: Emulator, m: Path, n: int, c: int, tag: str) -> tuple[Sample, float]:
    """One measured ``run -j c`` of ``m``; the sample and the summary's submit phase (s)."""
    done = b.path(f"tp/{tag}.summary.json")
    sample = b.ours(
        "run",
        m,
        "--base-url",
        emu.url,
        "-j",
        c,
        "-q",
        "--ledger",
        b.path(f"tp/{tag}.ledger.csv"),
        "--summary-json",
        done,
        emulator=emu,
    )
    doc = summary(done)
    if doc["this_run"].get("submitted") != n:
        msg = f"{tag}: only {doc['this_run']} of {n} jobs submitted"
        raise RuntimeError(msg)
    return sample, float(doc["elapsed_s"])


def throughput(b: Bench) -> list[Row]:
    """N jobs at concurrency C against latency L: the whole process, start-up included."""
    n = b.jobs or (100 if b.quick else 5000)
    rows: list[Row] = []
    for c in (8, 64) if b.quick else (8, 64, 256):
        bound = c / (L_MS / 1000)
        ours: list[Sample] = []
        naive: list[Sample] = []
        phase: list[float] = []
        b.say(f"throughput: N={n} C={c}, {b.repeats} runs each")
        with b.emulator(*latency_flags()) as emu:
            for r in range(b.repeats):
                tag = f"tp-c{c}-r{r}"
                m = manifests.explicit(b.path(f"tp/{tag}.yaml"), n, name=tag)
                for who in ("ours", "naive") if r % 2 == 0 else ("naive", "ours"):
                    if who == "naive":
                        naive.append(b.naive(m, b.path(f"tp/{tag}.naive.csv"), emu.url, c, emu))
                        continue
                    sample, elapsed = _submit_all(b, emu, m, n, c, tag)
                    ours.append(sample)
                    phase.append(elapsed)
        case = f"N={n}, L={L_MS:.0f} ms, C={c}"
        note = machine_note(ours + naive)
        ours_rate = [n / s.wall_s for s in ours]
        naive_rate = [n / s.wall_s for s in naive]
        share = [x / bound for x in ours_rate]
        vs_naive = per_run(ours_rate, naive_rate, lambda x, y: x / y)
        need = 0.95 if c < 256 else 0.85
        rows.append(
            Row(
                "1 throughput",
                case,
                "jobs/s, whole process",
                Figure.of(ours_rate, "", 0),
                Figure.of(naive_rate, "", 0),
                bound=f"{bound:,.0f} jobs/s (C/L)",
                ratios={"bound": Figure.of(share), "naive": Figure.of(vs_naive)},
                target=f"≥{need} of bound, ≥1.0× naive",
                met=statistics.median(share) >= need and statistics.median(vs_naive) >= 1.0,
                note=note,
                extra={
                    "ours_samples": [s.as_json() for s in ours],
                    "naive_samples": [s.as_json() for s in naive],
                    "naive_share_of_bound": Figure.of([x / bound for x in naive_rate]).as_json(),
                },
            )
        )
        outside = per_run([s.wall_s for s in ours], phase, lambda w, p: w - p)
        rows.append(
            Row(
                "1 throughput",
                case,
                "jobs/s, submit phase only (summary elapsed_s)",
                Figure.of([n / p for p in phase], "", 0),
                bound=f"{bound:,.0f} jobs/s",
                ratios={"bound": Figure.of([n / p / bound for p in phase])},
                note=f"outside the phase: {Figure.of(outside).text()} s",
            )
        )
        ours_cpu = [s.cpu_s / n * 1000 for s in ours]
        naive_cpu = [s.cpu_s / n * 1000 for s in naive]
        cpu_ratio = per_run(ours_cpu, naive_cpu, lambda x, y: x / y)
        rows.append(
            Row(
                "1 throughput",
                case,
                "CPU s (user+sys) per 1,000 jobs",
                Figure.of(ours_cpu),
                Figure.of(naive_cpu),
                ratios={"naive": Figure.of(cpu_ratio)},
                target="≤1.3× naive",
                met=statistics.median(cpu_ratio) <= 1.3,
                note=note,
            )
        )
        rows.append(
            Row(
                "1 throughput",
                case,
                "peak RSS, MB",
                fig(ours, lambda s: s.max_rss_kb / 1024, digits=1),
                fig(naive, lambda s: s.max_rss_kb / 1024, digits=1),
                ratios={
                    "naive": Figure.of(
                        per_run(
                            [s.max_rss_kb for s in ours],
                            [s.max_rss_kb for s in naive],
                            lambda x, y: x / y,
                        )
                    )
                },
                note="per job: see 3 scale, memory rows",
            )
        )
    return rows


# -- 2. rate limit ---------------------------------------------------------------------------


def _server_rate(task_ids: list[str]) -> float:
    """Tasks per second between the first and the last task created, from their ULID times."""
    times = sorted(ulid_seconds(t) for t in task_ids if t)
    span = times[-1] - times[0]
    return (len(times) - 1) / span if span > 0 else float("inf")


def rate_limit(b: Bench) -> list[Row]:
    """A server limit R answered with 429, the client told nothing (and told ``--rate R``)."""
    n, rps, c = b.jobs or (200 if b.quick else 2000), 100, 64
    cases = [
        ("429 with Retry-After: 1", ["--retry-after", "1"], []),
        ("429 without Retry-After", [], []),
        ("--rate 100/s, 429 with Retry-After: 1", ["--retry-after", "1"], ["--rate", f"{rps}/s"]),
    ]
    rows: list[Row] = []
    for label, emu_flags, run_flags in cases:
        b.say(f"rate limit: {label}, N={n}, {b.repeats} runs each")
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "naive": []}
        with b.emulator(*latency_flags(), "--rate-limit-rps", str(rps), *emu_flags) as emu:
            for r in range(b.repeats):
                tag = f"rl-{len(rows)}-r{r}"
                m = manifests.explicit(b.path(f"rl/{tag}.yaml"), n, name=tag)
                order = ["ours"] if run_flags else ["ours", "naive"]
                for who in order if r % 2 == 0 else order[::-1]:
                    runs[who].append(_rate_run(b, emu, who, m, tag, run_flags, n, rps, c))
        rows += _rate_rows(label, n, rps, c, runs, told=bool(run_flags))
    return rows


def _rate_run(
    b: Bench, emu: Emulator, who: str, m: Path, tag: str, flags: list[str], n: int, rps: int, c: int
) -> dict[str, Any]:
    """One measured run of ``who`` (ours or naive) against the rate-limited emulator."""
    time.sleep(1.5)  # a full token bucket: every run gets the same one-second burst
    before = emu.stats()
    if who == "naive":
        out = b.path(f"rl/{tag}.naive.csv")
        sample = b.naive(m, out, emu.url, c, emu)
        ids = [row["task_id"] for row in ledger_rows(out)]
    else:
        out = b.path(f"rl/{tag}.ledger.csv")
        sample = b.ours(
            "run",
            m,
            "--base-url",
            emu.url,
            "-j",
            c,
            "-q",
            *flags,
            "--ledger",
            out,
            emulator=emu,
            ok=(0, 1),
        )
        ids = [row["task_id"] for row in ledger_rows(out) if row["status"] == "submitted"]
    after = emu.stats()
    submits = delta(before, after, "requests", "submit")
    limited = delta(before, after, "faults", "rate_limit")
    return {
        "sample": sample,
        "created": len([t for t in ids if t]),
        "server_rate": _server_rate(ids),
        "whole_process_share": n / sample.wall_s / rps,
        "submits": submits,
        "answered_429": limited,
        "share_429": limited / submits if submits else 0.0,
    }


def _rate_rows(
    label: str, n: int, rps: int, c: int, runs: dict[str, list[dict[str, Any]]], *, told: bool
) -> list[Row]:
    ours, naive = runs["ours"], runs["naive"]
    case = f"R={rps}/s, N={n}, C={c}, L={L_MS:.0f} ms; {label}"
    note = machine_note([r["sample"] for r in ours + naive])
    o_rate = [r["server_rate"] for r in ours]
    share = [x / rps for x in o_rate]
    ratios = {"R": Figure.of(share)}
    naive_fig = None
    if naive:
        n_rate = [r["server_rate"] for r in naive]
        naive_fig = Figure.of(n_rate, "", 1)
        ratios["naive"] = Figure.of(per_run(o_rate, n_rate, lambda x, y: x / y))
    need = 0.97 if told else 0.9
    lost = [n - r["created"] for r in ours]
    extra = {
        "ours_runs": [
            {**{k: v for k, v in r.items() if k != "sample"}, "sample": r["sample"].as_json()}
            for r in ours
        ],
        "naive_runs": [
            {**{k: v for k, v in r.items() if k != "sample"}, "sample": r["sample"].as_json()}
            for r in naive
        ],
        "whole_process_share_of_R": Figure.of([r["whole_process_share"] for r in ours]).as_json(),
    }
    rows = [
        Row(
            "2 rate limit",
            case,
            "submits/s as the server saw them (first to last task created)",
            Figure.of(o_rate, "", 1),
            naive_fig,
            bound=f"R = {rps}/s (+ a 1 s burst)",
            ratios=ratios,
            target=f"≥{need} of R",
            met=statistics.median(share) >= need,
            note=note + (f"; jobs left unsubmitted: {max(lost)}" if any(lost) else ""),
            extra=extra,
        )
    ]
    o_429 = [100 * r["share_429"] for r in ours]
    rows.append(
        Row(
            "2 rate limit",
            case,
            "% of submits answered 429",
            Figure.of(o_429, "%", 1),
            Figure.of([100 * r["share_429"] for r in naive], "%", 1) if naive else None,
            bound="0 %",
            target="≤3 %" if not told else "—",
            met=statistics.median(o_429) <= 3 if not told else None,
            note=note,
        )
    )
    return rows


# -- 3. scale --------------------------------------------------------------------------------


def scale(b: Bench) -> list[Row]:
    """Manifest load and ledger work at 10k and 100k jobs, explicit and matrix, beside the floor."""
    sizes = (400, 800) if b.quick else (10_000, 100_000)
    rows: list[Row] = []
    runs: dict[tuple[str, int, str], list[Sample]] = {}
    with b.emulator() as emu:
        for kind in ("explicit", "matrix"):
            for size in sizes:
                b.say(f"scale: {kind} {size:,} jobs, {b.repeats} runs each")
                runs.update(_scale_one(b, emu, kind, size))
                rows += _scale_rows(kind, size, runs, big=size == sizes[-1])
            rows += _memory_rows(kind, sizes, runs)
        rows.append(_size_limit(b, sizes[-1]))
    return rows


def _scale_one(
    b: Bench, emu: Emulator, kind: str, size: int
) -> dict[tuple[str, int, str], list[Sample]]:
    tag = f"{kind}-{size}"
    path = b.path(f"scale/{tag}.yaml")
    if kind == "explicit":
        # 21-character prompts, as in the first run (they fit the former 5 MiB file limit;
        # _size_limit checks 200-character ones against today's).
        m = manifests.explicit(path, size, name=tag, prompt_chars=21)
    else:
        m = manifests.matrix(path, size, name=tag)
    ledger = b.path(f"scale/ledgers/{tag}.ledger.csv")
    got: dict[tuple[str, int, str], list[Sample]] = {}

    def add(name: str, s: Sample) -> None:
        got.setdefault((kind, size, name), []).append(s)

    for _ in range(b.repeats):
        add("floor", measure([*python(), str(FLOOR), str(m)], cwd=b.work))
        add("validate", b.ours("validate", m))
        add("plan --json", b.ours("plan", "--json", m))
    # The ledger the reruns read: one real run, measured once (its peak RSS gives run's memory).
    done = b.path(f"scale/{tag}.summary.json")
    add(
        "run (fills the ledger)",
        b.ours(
            "run",
            m,
            "--base-url",
            emu.url,
            "-j",
            256,
            "-q",
            "--ledger",
            ledger,
            "--summary-json",
            done,
            emulator=emu,
        ),
    )
    if summary(done)["this_run"].get("submitted") != size:
        msg = f"{tag}: not every job was submitted: {summary(done)['this_run']}"
        raise RuntimeError(msg)
    if kind == "explicit":
        add("naive run", b.naive(m, b.path(f"scale/{tag}.naive.csv"), emu.url, 256, emu))
    for _ in range(b.repeats):
        before = emu.stats()
        add(
            "no-op rerun",
            b.ours("run", m, "--base-url", emu.url, "-q", "--ledger", ledger, emulator=emu),
        )
        if delta(before, emu.stats(), "requests", "submit"):
            msg = f"{tag}: the rerun submitted jobs; it should have had nothing to do"
            raise RuntimeError(msg)
        add("plan --json --ledger", b.ours("plan", "--json", m, "--ledger", ledger))
        for form in ("table", "csv", "json"):
            add(f"report --format {form}", b.ours("report", ledger, "--format", form, ok=(0, 1)))
    return got


_SCALE_TARGETS = {"validate": "≤2.5× floor", "no-op rerun": "≤2 s"}


def _scale_rows(
    kind: str, size: int, runs: dict[tuple[str, int, str], list[Sample]], *, big: bool
) -> list[Row]:
    rows = []
    floor = runs[(kind, size, "floor")]
    for (k, s, name), samples in runs.items():
        if (k, s) != (kind, size) or name in ("floor", "naive run"):
            continue
        wall = [x.wall_s for x in samples]
        ratios, bound, target, met = {}, "—", "—", None
        if name in ("validate", "plan --json"):
            ratios["floor"] = Figure.of(
                per_run(wall, [f.wall_s for f in floor], lambda x, y: x / y)
            )
            bound = f"floor {fig(floor, lambda x: x.wall_s).text()} s, {rss_mb(floor)} MB"
        if big and name in _SCALE_TARGETS:
            target = _SCALE_TARGETS[name]
            met = (
                (ratios["floor"].median <= 2.5)
                if name == "validate"
                else statistics.median(wall) <= 2.0
            )
        rows.append(
            Row(
                "3 scale",
                f"{kind}, {size:,} jobs",
                f"{name}: s; peak RSS {rss_mb(samples)} MB",
                Figure.of(wall),
                bound=bound,
                ratios=ratios,
                target=target,
                met=met,
                note=machine_note(samples),
                extra={"samples": [x.as_json() for x in samples]},
            )
        )
    return rows


#: Per-job memory targets, KB: 1.5 over a fixed base; "flat in N" taken as at most 0.25.
_MEMORY_TARGETS = {
    "validate": 1.5,
    "no-op rerun": 1.5,
    "run (fills the ledger)": 1.5,
    "plan --json": 0.25,
    "report --format json": 0.25,
}


def _slope(
    runs: dict[tuple[str, int, str], list[Sample]], kind: str, sizes: tuple[int, int], name: str
) -> list[float] | None:
    """KB of peak RSS per job between the two sizes, run by run; None if not measured at both."""
    (small, big), a, z = sizes, runs.get((kind, sizes[0], name)), runs.get((kind, sizes[1], name))
    if not a or not z:
        return None
    return [(y.max_rss_kb - x.max_rss_kb) / (big - small) for x, y in zip(a, z, strict=False)]


def _memory_rows(
    kind: str, sizes: tuple[int, int], runs: dict[tuple[str, int, str], list[Sample]]
) -> list[Row]:
    small, big = sizes
    floor = _slope(runs, kind, sizes, "floor") or [0.0]
    naive = _slope(runs, kind, sizes, "naive run")
    rows = []
    for name in _MEMORY_NAMES:
        slope = _slope(runs, kind, sizes, name)
        if slope is None:
            continue
        limit = _MEMORY_TARGETS.get(name)
        target = "—"
        if limit is not None:
            target = f"≤{limit} KB/job" if limit >= 1 else f"flat in N (≤{limit} KB/job)"
        theirs = naive if name == "run (fills the ledger)" else None
        mb = [statistics.median(x.max_rss_kb for x in runs[(kind, n, name)]) / 1024 for n in sizes]
        rows.append(
            Row(
                "3 scale",
                f"{kind}, {small:,} → {big:,} jobs",
                f"memory per job: {name} (slope of peak RSS)",
                Figure.of(slope, "KB", 2),
                Figure.of(theirs, "KB", 2) if theirs else None,
                bound=f"floor {Figure.of(floor, 'KB', 2).text()}",
                ratios={"naive": Figure.of([slope[0] / theirs[0]])}
                if theirs and theirs[0] > 0
                else {},
                target=target,
                met=None if limit is None else statistics.median(slope) <= limit,
                note=f"peak RSS {mb[0]:.0f} → {mb[1]:.0f} MB",
            )
        )
    return rows


_MEMORY_NAMES = (
    "validate",
    "plan --json",
    "no-op rerun",
    "plan --json --ledger",
    "report --format table",
    "report --format csv",
    "report --format json",
    "run (fills the ledger)",
)


def _size_limit(b: Bench, size: int) -> Row:
    """Does ``validate`` accept ``size`` jobs with realistic 200-character prompts?"""
    m = manifests.explicit(b.path(f"scale/limit-{size}.yaml"), size, name="limit", prompt_chars=200)
    log = b.path("logs/size-limit.stderr")
    s = measure([*cli(), "validate", str(m)], cwd=b.work, ok=(0, 2), log=log)
    said = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    megabytes = m.stat().st_size / 2**20
    return Row(
        "3 scale",
        f"explicit, {size:,} jobs × 200-char prompts ({megabytes:.1f} MiB)",
        "validate accepts it (exit code)",
        Figure.of([s.rc], "", 0),
        bound="exit 0",
        target="accepted",
        met=s.rc == 0,
        note=(
            said[0].replace(str(m), m.name)[:160] if said and s.rc else f"validate {s.wall_s:.1f} s"
        ),
        extra={"stderr": said[:3], "sample": s.as_json()},
    )


# -- 4. polling ------------------------------------------------------------------------------


def polling(b: Bench) -> list[Row]:
    """N running tasks polled to completion by ``status --wait``: requests and lag per task."""
    n, task_s, c = b.jobs or (100 if b.quick else 5000), (3.0 if b.quick else 20.0), 64
    variants = (
        [("--interval 1", ["--interval", "1"])]
        if b.quick
        else [("default --interval (30 s)", []), ("--interval 5", ["--interval", "5"])]
    )
    rows: list[Row] = []
    with b.emulator(*latency_flags(), "--task-seconds", str(task_s)) as emu:
        for label, flags in variants:
            b.say(f"polling: {n} tasks of {task_s:.0f} s, {label}, {b.repeats} runs")
            samples: list[Sample] = []
            per_task: list[float] = []
            lag_mid: list[float] = []
            lag_p95: list[float] = []
            for r in range(b.repeats):
                tag = f"poll-{len(rows)}-r{r}"
                m = manifests.explicit(b.path(f"poll/{tag}.yaml"), n, name=tag)
                ledger = b.path(f"poll/{tag}.ledger.csv")
                b.ours(
                    "run", m, "--base-url", emu.url, "-j", c, "-q", "--ledger", ledger, emulator=emu
                )
                before = emu.stats()
                samples.append(
                    b.ours(
                        "status",
                        ledger,
                        "--wait",
                        "-j",
                        c,
                        "--base-url",
                        emu.url,
                        "-q",
                        *flags,
                        emulator=emu,
                    )
                )
                polls = delta(before, emu.stats(), "requests", "poll")
                per_task.append(polls / n)
                lags = _lags(ledger, task_s)
                if len(lags) != n:
                    msg = f"{tag}: {len(lags)} of {n} tasks seen completed"
                    raise RuntimeError(msg)
                lag_mid.append(statistics.median(lags))
                lag_p95.append(statistics.quantiles(lags, n=20)[-1])
            case = f"N={n}, task {task_s:.0f} s, L={L_MS:.0f} ms, -j {c}; {label}"
            note = machine_note(samples)
            rows.append(
                Row(
                    "4 polling",
                    case,
                    "poll requests per task",
                    Figure.of(per_task),
                    bound="1 (one poll, at completion)",
                    ratios={"bound": Figure.of(per_task)},
                    note=note,
                    extra={"samples": [s.as_json() for s in samples]},
                )
            )
            rows.append(
                Row(
                    "4 polling",
                    case,
                    "lag, completion → ledger row, median s",
                    Figure.of(lag_mid),
                    bound=f"≈L ({L_MS / 1000:.1f} s)",
                    note=note,
                )
            )
            rows.append(
                Row(
                    "4 polling",
                    case,
                    "lag, completion → ledger row, p95 s",
                    Figure.of(lag_p95),
                    bound=f"≈L ({L_MS / 1000:.1f} s)",
                    note=note,
                )
            )
    return rows


def _lags(ledger: Path, task_s: float) -> list[float]:
    """Seconds from each task's completion (created + task_s) to its first ``completed`` row."""
    seen: dict[str, float] = {}
    for row in ledger_rows(ledger):
        if row["status"] == "completed" and row["job_id"] not in seen:
            seen[row["job_id"]] = iso_seconds(row["time"]) - (ulid_seconds(row["task_id"]) + task_s)
    return list(seen.values())


# -- 5. start-up -----------------------------------------------------------------------------


def startup(b: Bench) -> list[Row]:
    """``--help`` and ``validate`` of a small file beside ``python -c pass``."""
    k = 3 if b.quick else max(10, b.repeats)
    example = ROOT / "jobs" / "example.yaml"
    commands = {
        "python -c pass": [*python(), "-c", "pass"],
        "python -c 'import aiohttp'": [*python(), "-c", "import aiohttp"],
        "apimart-batch --help": [*cli(), "--help"],
        "apimart-batch validate jobs/example.yaml": [*cli(), "validate", str(example)],
    }
    b.say(f"start-up: {k} runs each")
    got: dict[str, list[Sample]] = {name: [] for name in commands}
    for _ in range(k):
        for name, argv in commands.items():
            got[name].append(measure(argv, cwd=b.work))
    base = got["python -c pass"]
    rows = []
    for name, samples in got.items():
        ours = name.startswith("apimart-batch")
        imports = _imports(commands[name], b) if ours else {}
        rows.append(
            Row(
                "5 start-up",
                name,
                f"wall s; peak RSS {rss_mb(samples)} MB",
                Figure.of([s.wall_s for s in samples], "", 3),
                bound=f"python -c pass {fig(base, lambda x: x.wall_s, digits=3).text()} s",
                ratios={
                    "python -c pass": Figure.of(
                        per_run(
                            [s.wall_s for s in samples],
                            [s.wall_s for s in base],
                            lambda x, y: x / y,
                        ),
                        "",
                        1,
                    )
                },
                target="≤0.15 s" if ours else "—",
                met=statistics.median(s.wall_s for s in samples) <= 0.15 if ours else None,
                note=machine_note(samples)
                + (
                    f"; imports aiohttp: {'yes' if imports.get('aiohttp') else 'no'}"
                    if ours
                    else ""
                ),
                extra={"samples": [s.as_json() for s in samples], "slowest_imports_ms": imports},
            )
        )
    return rows


#: Imports worth naming in the start-up rows: what a command that sends nothing should skip.
_WATCHED = ("runner.cli", "aiohttp", "jsonschema", "referencing", "yaml", "tqdm", "asyncio")


def _imports(argv: list[str], b: Bench) -> dict[str, float]:
    """Cumulative milliseconds of the watched imports in one run (``PYTHONPROFILEIMPORTTIME``)."""
    import subprocess

    env = {**bench_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(argv, cwd=b.work, env=env, capture_output=True, text=True, check=False)
    found: dict[str, float] = {}
    for line in done.stderr.splitlines():
        cells = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(cells) != 3 or not cells[1].strip().isdigit():
            continue
        name = cells[2].strip()
        # The first line of a module is where it really loaded; later ones are cache hits.
        if name in _WATCHED and name not in found:
            found[name] = round(int(cells[1]) / 1000, 1)
    return found


SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "throughput": throughput,
    "ratelimit": rate_limit,
    "scale": scale,
    "polling": polling,
    "startup": startup,
}
