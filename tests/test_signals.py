"""SIGINT and SIGTERM at any moment of a real process: the documented code, never a traceback.

Signals go out once the process's own handler is installed (its first act, before the
heavy imports), which ``/proc`` shows: Python itself never catches SIGTERM. Before that
moment only the interpreter's start-up runs, which no Python code can guard. The long
loops of random moments are ``slow``; each process is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from clihelpers import BIN, KEY, statuses, write_manifest

from runner import entry

#: What a clean end may never print: tracebacks, and asyncio's own complaints.
NOISE = ("Traceback", "Exception ignored", "never retrieved", "was destroyed but it is pending")
#: A hang guard for one process.
BOUND = 60


def handler_installed(process: subprocess.Popen[str]) -> bool:
    """True once ``process`` catches SIGTERM, i.e. runner.entry has installed its handler."""
    try:
        lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    except OSError:
        return False
    caught = next(line for line in lines if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def delivered(process: subprocess.Popen[str], signum: int) -> None:
    """Wait until ``signum`` is no longer pending for ``process``: its handler has it."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        except OSError:
            return  # it has ended
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if not (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & bit:
            return
        time.sleep(0.0005)
    pytest.fail(f"signal {signum} never reached pid {process.pid}")


def start(tmp_path: Path, *args: str, module: bool = False) -> subprocess.Popen[str]:
    """Run the CLI (or ``python -m runner``) in ``tmp_path``; return once it handles signals."""
    argv = [sys.executable, "-m", "runner", *args] if module else [BIN, *args]
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not handler_installed(process):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{argv} never installed its handler: {process.communicate()}")
        time.sleep(0.0005)
    return process


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for the end (bounded); fail the test on a hang, a traceback or the key."""
    try:
        out, err = process.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"hung after a signal: {err[-2000:]}")
    assert process.returncode >= 0, f"killed by signal {-process.returncode}: {err[-2000:]}"
    for noise in NOISE:
        assert noise not in err, err[-4000:]
    assert KEY not in out + err
    return out, err


def test_exit_codes_follow_the_documented_list():
    """128 + the signal's number is what the CLI's exit-code list says: 130 and 143."""
    assert (entry.exit_code(signal.SIGINT), entry.exit_code(signal.SIGTERM)) == (130, 143)


def test_import_runner_loads_nothing_heavy():
    """The console script imports runner first: it must not pull in asyncio, yaml, aiohttp."""
    code = ("import runner.entry, sys; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'aiohttp', 'asyncio', 'jsonschema', 'yaml', 'dataclasses'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=BOUND)
    assert done.stdout.strip() == "[]"
    import runner
    from runner.errors import RunnerError
    from runner.models import Job

    assert (runner.Job, runner.RunnerError) == (Job, RunnerError)


@pytest.mark.parametrize("module", [False, True], ids=["apimart-batch", "python-m-runner"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_during_the_imports_ends_quietly_with_its_code(tmp_path, signum, module):
    """At once after the handler: the imports are cut; exit 130/143 and one line, no traceback."""
    manifest = write_manifest(tmp_path, 1)
    process = start(tmp_path, "validate", manifest, module=module)
    process.send_signal(signum)
    out, err = finish(process)
    assert process.returncode == entry.exit_code(signum)
    assert (out, err) == ("", f"apimart-batch: interrupted by {signal.Signals(signum).name}\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_mock_server_ends_on_a_signal_with_its_code(tmp_path, signum):
    """The emulator serves until a signal, then shuts down cleanly: 130 or 143."""
    process = start(tmp_path, "mock-server", "--port", "0")
    assert process.stdout is not None
    assert "listening" in process.stdout.readline()
    process.send_signal(signum)
    finish(process)
    assert process.returncode == entry.exit_code(signum)


def test_two_signals_during_start_up_end_it_once(tmp_path):
    """SIGTERM and SIGINT together while importing: one line, the code of one of them."""
    process = start(tmp_path, "validate", write_manifest(tmp_path, 1))
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    _, err = finish(process)
    # Python runs the handlers of signals caught between two instructions by number, so
    # which came "first" is not for the sender to say.
    name = {130: "SIGINT", 143: "SIGTERM"}[process.returncode]
    assert err == f"apimart-batch: interrupted by {name}\n"


async def test_routed_hands_each_signal_to_the_phase_then_gives_the_handlers_back():
    """In-process: inside the block a signal reaches the route; after it, the old handler."""
    before = signal.getsignal(signal.SIGTERM)
    got: list[int] = []
    with entry.routed(got.append):
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.001)
    assert got == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


# -- random moments --------------------------------------------------------------------------


def big_manifest(folder: Path) -> str:
    """3,000 jobs: ``validate`` takes about a second, so signals land inside it."""
    doc = {"version": 1, "name": "big", "defaults": {"model": "sora-2", "duration": 4},
           "jobs": [{"id": f"job-{i}", "prompt": f"A paper boat, take {i}"}
                    for i in range(3000)]}
    (folder / "big.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return "big.yaml"


Scenario = Callable[[Path], list[str]]
SCENARIOS: dict[str, tuple[Scenario, float]] = {
    # name: (argv for a fresh folder, the span of moments to aim at, in seconds)
    "validate-big": (lambda folder: ["validate", big_manifest(folder)], 1.5),
    "run-mock": (lambda folder: ["run", write_manifest(folder, 20), "--mock", "-j", "4"], 1.0),
    "run-mock-wait": (lambda folder: ["run", write_manifest(folder, 4), "--mock", "--wait",
                                      "--interval", "0.5"], 5.0),
}
#: Rounds per scenario; SIGNAL_ROUNDS=100 for a longer run.
ROUNDS = int(os.environ.get("SIGNAL_ROUNDS", "25"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_signals_at_random_moments_give_the_documented_code(tmp_path, scenario):
    """One or two signals at random moments: 0 if it finished, else 130/143 by the first signal.

    Never a traceback, never death by the signal itself; a run names the interrupt, and after
    a single signal no job is left 'submitting' or 'unknown' (in-flight requests finished).
    """
    make, span = SCENARIOS[scenario]
    rng = random.Random(f"signals-{scenario}")
    outcomes: Counter[tuple[str, int]] = Counter()
    sent = 0
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round-{round_}"
        folder.mkdir()
        argv = make(folder)
        process = start(folder, *argv)
        time.sleep(rng.uniform(0.0, span))
        first = rng.choice([signal.SIGINT, signal.SIGTERM])
        process.send_signal(first)
        sent += 1
        codes = {0, entry.exit_code(first)}
        twice = rng.random() < 0.3
        if twice:
            delivered(process, first)
            time.sleep(rng.uniform(0.0, 0.2))
            if process.poll() is None:
                second = rng.choice([signal.SIGINT, signal.SIGTERM])
                process.send_signal(second)
                sent += 1
                # Both may be pending when Python runs its handlers, which go by number.
                codes.add(entry.exit_code(second))
        _, err = finish(process)
        outcomes[(signal.Signals(first).name, process.returncode)] += 1
        assert process.returncode in codes, err
        if argv[0] != "run":
            continue
        if process.returncode:
            assert "interrupted" in err, err
        ledgers = list(folder.glob("*.ledger.csv"))
        if ledgers and not twice:
            assert not {"submitting", "unknown"} & set(statuses(ledgers[0])), err
    # Both ends are reached: some runs were cut, and (for short ones) some finished first.
    assert sum(n for (_, code), n in outcomes.items() if code) > 0, outcomes
    print(f"{scenario}: {ROUNDS} rounds, {sent} signals, exit codes {dict(outcomes)}")


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_quietly_with_141(tmp_path: Path) -> None:
    """`plan | head -1` on a plan larger than a pipe holds: no traceback, exit 141."""
    manifest = write_manifest(tmp_path, 2000)
    shell = f"set -o pipefail; {shlex.quote(BIN)} plan {shlex.quote(manifest)} | head -1"
    done = subprocess.run(["/bin/bash", "-c", shell], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert done.stdout.startswith("Plan (nothing is sent)")
