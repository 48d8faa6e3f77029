"""Kill loops: SIGKILL, SIGTERM and SIGINT at random moments of ``run --wait``, start-up included.

The server is ``mock-server --no-idempotency`` with mixed faults, so any resend of a job
that may exist creates a second task. After every round the invariants of
:func:`chaoshelpers.check_ledger` are checked; each episode ends with runs to completion.
The fast subset runs by default; ``pytest -m chaos tests/chaos`` runs the long one
(``CHAOS_KILLS`` kills, seed ``CHAOS_SEED``; ``CHAOS_FIGURES=path.json`` saves the figures).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chaoshelpers import Check, SecretScan, check_ledger, start
from clihelpers import MockServer

from runner.manifest.loader import load_manifests

pytestmark = pytest.mark.slow

JOBS_PER_EPISODE = 40
KILLS_PER_EPISODE = 8
CONCURRENCY = 4
#: Faults of every kind the emulator has, submit and poll and download, at small rates.
FAULTS = (
    "--no-idempotency", "--latency-ms", "30", "--task-seconds", "2",
    "--p-500", "0.03", "--p-502", "0.02", "--p-503", "0.05", "--p-504", "0.02",
    "--p-reset-after-create", "0.02", "--p-html-200", "0.02",
    "--p-slow-after-create", "0.01", "--slow-seconds", "3",
    "--p-poll-error", "0.1", "--p-download-reset", "0.05",
)  # fmt: skip
SIGNALS = (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
#: Exit codes of a run that ended by itself (0, 1) or by the signal it was sent.
GRACEFUL = {signal.SIGINT: {0, 1, 130}, signal.SIGTERM: {0, 1, 143}}


@dataclass
class Figures:
    """What a kill loop did and found; ``violations`` is empty when every invariant held."""

    seed: int
    kills: Counter[str] = field(default_factory=Counter)
    rounds: int = 0
    jobs: int = 0
    tasks: int = 0
    unknown: int = 0
    duplicates: int = 0
    lost: int = 0
    wrongly_unknown: int = 0
    write_ahead_unknown: int = 0
    tracebacks: int = 0
    hangs: int = 0
    startup_deaths: int = 0
    leaks: int = 0
    scanned: int = 0
    violations: list[str] = field(default_factory=list)


def write_chaos_manifest(folder: Path, name: str, count: int) -> Path:
    """A manifest of ``count`` sora-2 4 s jobs whose prompts are unique to ``name``."""
    doc = {
        "version": 1,
        "name": name,
        "defaults": {"model": "sora-2", "duration": 4},
        "jobs": [{"id": f"job-{i}", "prompt": f"{name}: a paper boat, take {i}"}
                 for i in range(count)],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def handled(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` right now (SigCgt in /proc)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    caught = next(line.split()[1] for line in lines if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signum - 1)))


def settled_stats(server: MockServer) -> dict:
    """The emulator's stats once no submit is in flight (a killed client's last POST)."""
    deadline = time.monotonic() + 10
    stats = server.stats()
    while stats["submit_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = server.stats()
    return stats


class Episode:
    """One manifest and ledger, attacked round after round, then run to completion."""

    def __init__(self, server: MockServer, folder: Path, name: str, figures: Figures,
                 scan: SecretScan) -> None:
        folder.mkdir()
        self.server, self.folder, self.figures, self.scan = server, folder, figures, scan
        manifest = write_chaos_manifest(folder, name, JOBS_PER_EPISODE)
        self.keys = {job.idempotency_key: job.job_id
                     for job in load_manifests([str(manifest)])[0].jobs}
        self.ledger = folder / f"{name}.ledger.csv"
        self.args = ["run", manifest.name, "--base-url", server.url, "-j", str(CONCURRENCY),
                     "--max-attempts", "1", "--timeout", "1", "--interval", "0.5",
                     "--summary-json", "summary.json"]
        self.ambiguous: set[str] = set()
        self.seen: set[str] = set()
        self.handled = False
        self.submitting: set[tuple[str, str]] = set()
        self.duplicated: set[str] = set()
        self.lost: set[str] = set()

    def violation(self, text: str) -> None:
        if text not in self.seen:
            self.seen.add(text)
            self.figures.violations.append(f"{self.folder.name} round {self.figures.rounds}: "
                                           f"{text}")

    def size(self) -> int:
        """The ledger's size in bytes (0 before it exists)."""
        return self.ledger.stat().st_size if self.ledger.exists() else 0

    def attack(self, rng: random.Random) -> None:
        """One round: start ``run --wait``, signal it at a random moment, check everything."""
        self.figures.rounds += 1
        signum = rng.choice(SIGNALS)
        early = rng.random() < 0.3  # during start-up: imports, manifest load, ledger open
        before = self.size()
        process = start(self.folder, *self.args, "--wait")
        if early:
            time.sleep(rng.uniform(0.0, 0.45))
        else:
            deadline = time.monotonic() + 15
            while process.poll() is None and time.monotonic() < deadline:
                if self.size() > before:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        signalled = process.poll() is None
        if signalled:
            self.handled = handled(process.pid, signum)
            process.send_signal(signum)
            self.figures.kills[signal.Signals(signum).name] += 1
        moment = ("early" if early else "late") if signalled else "unsignalled"
        self.end(process, signum if signalled else None, moment=moment, before=before)

    def end(self, process: subprocess.Popen[str], signum: int | None, moment: str,
            before: int = -1) -> Check:
        """Collect a process, judge its exit, and check the invariants after it."""
        what = f"{signal.Signals(signum).name} ({moment})" if signum else f"a {moment} run"
        hung = False
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            hung = True
            process.kill()
            out, err = process.communicate(timeout=10)
            self.figures.hangs += 1
            self.violation(f"{what}: still running 30 s later (hang)")
        code = process.returncode
        self.scan.process(f"{self.folder.name} round {self.figures.rounds}", out, err)
        if "Traceback" in err:
            self.figures.tracebacks += 1
            self.violation(f"{what}: exit {code} with a traceback: {err.strip().splitlines()[-1]}")
        outright = hung or signum == signal.SIGKILL or code < 0
        quiet = not err and self.size() == before and not self.handled
        if signum in GRACEFUL and code == -signum and quiet:
            # Killed by the default action, having written nothing: the signal came while
            # the interpreter itself started, before any code of ours could handle it.
            self.figures.startup_deaths += 1
        elif signum in GRACEFUL and code not in GRACEFUL[signum] and not hung:
            self.violation(f"{what}: exit {code}, expected one of {sorted(GRACEFUL[signum])}")
        elif signum is None and code not in (0, 1):
            self.violation(f"{what}: exit {code}: {err.strip()[-300:]}")
        return self.check(what, outright=outright, graceful_exit=code in (130, 143))

    def check(self, what: str, *, outright: bool, graceful_exit: bool = False) -> Check:
        """Check the invariants; new ambiguous jobs without a task are judged by ``outright``."""
        check = check_ledger(self.ledger, settled_stats(self.server), self.keys)
        for text in check.violations():
            self.violation(f"after {what}: {text}")
        self.duplicated |= set(check.duplicates)
        self.lost |= set(check.lost)
        unsent = (check.ambiguous - self.ambiguous) & check.unsent_ambiguous
        if outright:
            # The submitting row is written before the POST: a kill may leave a few.
            self.figures.write_ahead_unknown += len(unsent)
            if len(unsent) > CONCURRENCY:
                self.violation(f"after {what}: {len(unsent)} jobs unknown without a POST, "
                               f"more than -j {CONCURRENCY}")
        elif unsent:
            self.figures.wrongly_unknown += len(unsent)
            self.violation(f"after {what}: unknown, yet never created on the server: "
                           f"{', '.join(sorted(unsent))}")
        submitting = {(job, row["time"]) for job, row in check.latest.items()
                      if row["status"] == "submitting"}
        # Rows of an earlier, killed run stay 'submitting' until a run opens the ledger.
        if graceful_exit and (left := sorted(job for job, _ in submitting - self.submitting)):
            self.violation(f"after {what}: a graceful exit left its 'submitting' rows: {left}")
        self.ambiguous, self.submitting = check.ambiguous, submitting
        return check

    def finish(self) -> None:
        """Run to completion: submit until nothing is 'error', then --wait for every video."""
        for _ in range(3):
            check = self.end(start(self.folder, *self.args), None, moment="final")
            if not {row["status"] for row in check.latest.values()} & {"error", "submitting"}:
                break
        for _ in range(4):
            check = self.end(start(self.folder, *self.args, "--wait"), None, moment="final --wait")
            if {row["status"] for row in check.latest.values()} <= {"downloaded", "unknown"}:
                break
        states = Counter(row["status"] for row in check.latest.values())
        if len(check.latest) != JOBS_PER_EPISODE or set(states) - {"downloaded", "unknown"}:
            self.violation(f"never finished: {dict(states)} of {JOBS_PER_EPISODE} jobs")
        stats = self.server.stats()["idempotency_key_by_task"]
        self.figures.jobs += len(check.latest)
        self.figures.tasks += sum(1 for key in stats.values() if key in self.keys)
        self.figures.unknown += states["unknown"]
        self.figures.duplicates += len(self.duplicated)
        self.figures.lost += len(self.lost)
        self.scan.tree(self.folder)


def kill_loop(server: MockServer, root: Path, *, kills: int, seed: int) -> Figures:
    """Attack episode after episode until ``kills`` signals were sent; return the figures."""
    rng = random.Random(seed)
    figures = Figures(seed=seed)
    scan = SecretScan()
    episode_number = 0
    while figures.kills.total() < kills:
        episode = Episode(server, root / f"ep{episode_number}", f"chaos-{seed}-{episode_number}",
                          figures, scan)
        episode_number += 1
        goal = min(kills, figures.kills.total() + KILLS_PER_EPISODE)
        # A round that ends before its signal (nothing left to do) counts no kill.
        for _ in range(3 * KILLS_PER_EPISODE):
            if figures.kills.total() >= goal:
                break
            episode.attack(rng)
        episode.finish()
    figures.leaks, figures.scanned = len(scan.leaks), scan.texts
    figures.violations += scan.leaks
    return figures


def report(figures: Figures) -> str:
    """The figures as one JSON document; saved to ``$CHAOS_FIGURES`` when that is set."""
    doc = dict(vars(figures), kills=dict(figures.kills), kills_total=figures.kills.total())
    text = json.dumps(doc, indent=2)
    if path := os.environ.get("CHAOS_FIGURES"):
        Path(path).write_text(text + "\n", encoding="utf-8")
    print(text)
    return text


def test_kill_loop_fast(mock_server, tmp_path: Path) -> None:
    """16 random signals (start-up included) against a key-ignoring server break no invariant."""
    server = mock_server(*FAULTS, "--seed", "8")
    figures = kill_loop(server, tmp_path, kills=16, seed=8)
    report(figures)
    assert figures.kills.total() == 16
    assert figures.jobs == 2 * JOBS_PER_EPISODE
    assert not figures.violations, "\n".join(figures.violations[:40])


@pytest.mark.chaos
def test_kill_loop_long(mock_server, tmp_path: Path) -> None:
    """CHAOS_KILLS (default 300) random signals, seed CHAOS_SEED: no invariant breaks."""
    kills = int(os.environ.get("CHAOS_KILLS", "300"))
    seed = int(os.environ.get("CHAOS_SEED", "1"))
    server = mock_server(*FAULTS, "--seed", str(seed))
    figures = kill_loop(server, tmp_path, kills=kills, seed=seed)
    report(figures)
    assert figures.kills.total() == kills
    assert not figures.violations, "\n".join(figures.violations[:60])
