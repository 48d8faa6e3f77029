"""Money-safety in the unhappy paths, in process against the emulator (issue 11).

Regenerating failed jobs on purpose (takes), never overwriting a video, collecting what was
paid for after a fatal answer, the balance check, fresh links for expired ones, and halting
a run whose jobs all fail. The emulator runs on the fake clock moved to the real time, as
in ``test_media``, whose helpers these tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from jobfactory import make_job
from test_media import (
    BRISK,
    HANG,
    KEY,
    NO_WAIT,
    download,
    history,
    ledger_of,
    prompts,
    quiet,
    stat,
    status,
    statuses,
    write_manifest,
)

from runner import app
from runner.api import Secret
from runner.app import Halt, HaltAfter, RunConfig
from runner.console import Console
from runner.emulator.contract import video_bytes
from runner.engine.resume import decide
from runner.errors import EXIT_API_STOPPED, EXIT_JOBS_FAILED, EXIT_OK
from runner.ledger.store import iter_rows, read_latest


@pytest.fixture(autouse=True)
def _real_epoch(fake_clock: Any) -> None:
    """Start the emulator's frozen clock at the real time (links are judged by time.time)."""
    fake_clock.now = time.time()


async def run(srv: Any, *manifests: str, console: Console | None = None, **overrides: Any) -> int:
    """``run`` of these manifests against ``srv``: no backoff, brisk polls, --wait by default."""
    fields = {"api_key": KEY, "base_url": srv.base_url, "policy": NO_WAIT, "timing": BRISK,
              "wait": True} | overrides
    with contextlib.redirect_stdout(io.StringIO()):
        return await asyncio.wait_for(app.run(RunConfig(manifests, **fields),
                                              console or quiet()), HANG)


def talking() -> tuple[Console, io.StringIO]:
    """A console whose warnings and errors the test reads."""
    stream = io.StringIO()
    return Console(stream=stream), stream


def keys_by_task(srv: Any) -> dict[str, str | None]:
    """task id -> the Idempotency-Key that created it."""
    return dict(stat(srv, "idempotency_key_by_task"))


# -- takes: regenerating on purpose -------------------------------------------------------------


def test_take_one_keeps_the_key_of_earlier_versions():
    """Take 1 hashes exactly what 0.2 hashed, so existing ledgers keep their keys."""
    job = make_job("hero", model="sora-2", prompt="a fox", duration=4, manifest_name="ads")
    seed = "\0".join(("ads", "hero", job.fingerprint))
    assert job.idempotency_key == "apimart-batch-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
    later = {replace(job, take=n).idempotency_key for n in (2, 3)}
    assert len(later | {job.idempotency_key}) == 3


def test_only_retry_failed_buys_a_failed_job_again():
    """A failed, cancelled or expired job is done unless --retry-failed, then take N+1."""
    job = make_job("hero", model="sora-2", prompt="a fox", duration=4, manifest_name="ads")
    for state in ("failed", "cancelled", "expired"):
        row = {"status": state, "task_id": "task_1", "fingerprint": job.fingerprint,
               "idempotency_key": job.idempotency_key, "take": ""}
        assert decide(job, row).verdict == "done"
        again = decide(job, row, retry_failed=True)
        assert (again.verdict, again.job.take) == ("submit", 2)
        assert decide(job, row | {"take": "2", "idempotency_key": again.job.idempotency_key},
                      retry_failed=True).job.take == 3
    completed = {"status": "completed", "task_id": "task_1", "fingerprint": job.fingerprint}
    assert decide(job, completed, retry_failed=True).verdict == "done"


async def test_retry_failed_creates_one_new_task_with_a_new_key(emulator, tmp_path):
    """A failed task regenerated: exactly one new task, a new key, its own file; then a no-op."""
    srv = await emulator(task_seconds=0)
    srv.emulator.script_submit(["fail_task"])
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    out = tmp_path / "videos"
    assert await run(srv, manifest, out=str(out)) == EXIT_JOBS_FAILED
    assert sorted(statuses(ledger).values()) == ["downloaded", "failed"]
    failed = next(job for job, s in statuses(ledger).items() if s == "failed")
    assert await run(srv, manifest, out=str(out)) == EXIT_JOBS_FAILED  # nothing resent
    assert stat(srv, "tasks_created") == 2
    console, said = talking()
    assert await status(srv, ledger, console=console) == EXIT_JOBS_FAILED
    assert "--retry-failed" in said.getvalue() and failed in said.getvalue()

    assert await run(srv, manifest, out=str(out), retry_failed=True) == EXIT_OK
    assert stat(srv, "tasks_created") == 3
    keys = keys_by_task(srv)
    assert len(set(keys.values())) == 3  # the new take was not replayed from the old key
    row = read_latest(ledger)[failed]
    assert (row["status"], row["take"]) == ("downloaded", "2")
    assert Path(row["file"]) == (out / "media" / f"{failed}.take2.mp4").absolute()
    assert Path(row["file"]).read_bytes() == video_bytes(row["task_id"])
    assert history(ledger, failed)[:3] == ["submitting", "submitted", "failed"]  # kept

    assert await run(srv, manifest, out=str(out), retry_failed=True) == EXIT_OK
    assert stat(srv, "tasks_created") == 3


# -- never overwrite a video --------------------------------------------------------------------


async def test_two_manifests_with_one_job_id_keep_both_videos(emulator, tmp_path):
    """spring.yaml and winter.yaml both have 'hero' and one --out: both videos survive."""
    srv = await emulator(task_seconds=0)
    out = tmp_path / "videos"
    spring = write_manifest(tmp_path, [{"id": "hero", "prompt": "Cherry trees"}], name="spring")
    winter = write_manifest(tmp_path, [{"id": "hero", "prompt": "Snow on pines"}], name="winter")
    assert await run(srv, spring, out=str(out)) == EXIT_OK
    assert await run(srv, winter, out=str(out)) == EXIT_OK
    for manifest, folder in ((spring, "spring"), (winter, "winter")):
        row = read_latest(ledger_of(manifest))["hero"]
        assert Path(row["file"]) == (out / folder / "hero.mp4").absolute()
        assert Path(row["file"]).read_bytes() == video_bytes(row["task_id"])
    assert (out / "spring" / "hero.mp4").read_bytes() != (out / "winter" / "hero.mp4").read_bytes()


async def test_a_foreign_file_at_the_target_is_never_replaced(emulator, tmp_path):
    """A file the ledger does not know is left as it is; the job waits, named, exit 1."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 1)
    out = tmp_path / "videos"
    (out / "media").mkdir(parents=True)
    mine = out / "media" / "job-0.mp4"
    mine.write_bytes(b"my own edit")
    assert await run(srv, manifest, out=str(out)) == EXIT_JOBS_FAILED
    assert mine.read_bytes() == b"my own edit"
    row = read_latest(ledger_of(manifest))["job-0"]
    assert row["status"] == "completed" and "not replaced" in row["error"]
    assert stat(srv, "downloads") == 0  # known to be foreign before a byte was fetched
    mine.rename(tmp_path / "kept.mp4")
    assert await download(srv, ledger_of(manifest), out) == EXIT_OK
    assert mine.read_bytes() == video_bytes(read_latest(ledger_of(manifest))["job-0"]["task_id"])


async def test_download_fetches_missing_and_changed_files_and_keeps_the_changed_one(
        emulator, tmp_path):
    """'download' re-checks: a deleted video comes back; a changed one is kept aside, named."""
    srv = await emulator(task_seconds=0)
    manifest = prompts(tmp_path, 2)
    ledger = ledger_of(manifest)
    out = tmp_path / "videos"
    assert await run(srv, manifest, out=str(out)) == EXIT_OK
    rows = read_latest(ledger)
    gone, edited = (Path(rows[job]["file"]) for job in ("job-0", "job-1"))
    gone.unlink()
    body = bytearray(edited.read_bytes())
    body[-1] ^= 0xFF  # same size: only the recorded SHA-256 tells
    edited.write_bytes(bytes(body))
    assert await run(srv, manifest, out=str(out)) == EXIT_OK  # 'run' checks sizes only
    assert edited.read_bytes() == bytes(body)
    assert await download(srv, ledger, out) == EXIT_OK
    assert gone.read_bytes() == video_bytes(rows["job-0"]["task_id"])
    assert edited.read_bytes() == video_bytes(rows["job-1"]["task_id"])
    [aside] = edited.parent.glob("job-1.changed-*.mp4")
    assert aside.read_bytes() == bytes(body)
    after = read_latest(ledger)
    assert after["job-1"]["status"] == "downloaded" and aside.name in after["job-1"]["error"]


# -- a fatal answer stops submission only -------------------------------------------------------


async def test_402_mid_batch_still_downloads_what_was_paid_for(emulator, tmp_path):
    """After K paid submissions a 402: the K videos are still fetched, then exit 3, counted."""
    srv = await emulator(task_seconds=0, quota=3)
    manifest = prompts(tmp_path, 8)
    console, said = talking()
    code = await run(srv, manifest, out=str(tmp_path / "videos"), concurrency=1,
                     console=console)
    assert code == EXIT_API_STOPPED
    states = statuses(ledger_of(manifest))
    assert sorted(states.values()) == ["downloaded"] * 3 + ["error"]
    assert len(list((tmp_path / "videos" / "media").glob("*.mp4"))) == 3
    text = said.getvalue()
    assert "1 jobs refused, 4 not submitted" in text
    assert "still collected (3 downloaded, 0 still running)" in text


async def test_balance_check_refuses_a_run_it_cannot_pay(emulator, tmp_path):
    """5 sora-2 4 s jobs (~$1.60) against $0.50: refused before any POST, exit 3."""
    srv = await emulator(task_seconds=0, balance_usd=0.5)
    manifest = prompts(tmp_path, 5)
    console, said = talking()
    assert await run(srv, manifest, wait=False, console=console) == EXIT_API_STOPPED
    assert stat(srv, "tasks_created") == 0
    assert "balance" in said.getvalue() and "--budget 0.50" in said.getvalue()
    # A --budget within the balance is its own cap: the run goes ahead, within it.
    assert await run(srv, manifest, wait=False, budget=0.4) == 0  # held back: fine
    assert stat(srv, "tasks_created") == 1


async def test_a_failed_balance_lookup_never_blocks_the_run(emulator, tmp_path):
    """The balance endpoint fails: the run says the check was skipped and goes on."""
    srv = await emulator(task_seconds=0, balance_fails=True)
    manifest = prompts(tmp_path, 2)
    console, said = talking()
    assert await run(srv, manifest, wait=False, console=console) == EXIT_OK
    assert stat(srv, "tasks_created") == 2
    assert "balance check skipped" in said.getvalue()


# -- expired links ------------------------------------------------------------------------------


async def expired_batch(emulator: Any, fake_clock: Any, tmp_path: Path,
                        **knobs: Any) -> tuple[Any, str]:
    """One completed job whose link has expired before anything downloaded it.

    The task completes an hour ago on the emulator's clock; then that clock comes back to
    the real time, which the runner judges expiry by.
    """
    fake_clock.now = time.time() - 3600
    srv = await emulator(task_seconds=0, link_ttl=60, **knobs)
    manifest = prompts(tmp_path, 1)
    assert await run(srv, manifest, wait=False) == EXIT_OK
    assert await status(srv, ledger_of(manifest)) == EXIT_OK
    assert statuses(ledger_of(manifest)) == {"job-0": "completed"}
    fake_clock.now = time.time()
    return srv, manifest


async def test_an_expired_link_is_refreshed_when_the_api_offers_one(emulator, fake_clock,
                                                                     tmp_path):
    """Past expires_at, download asks the task again and fetches its fresh link."""
    srv, manifest = await expired_batch(emulator, fake_clock, tmp_path, fresh_links=True)
    old = read_latest(ledger_of(manifest))["job-0"]["video_url"]
    assert await download(srv, ledger_of(manifest), tmp_path / "videos") == EXIT_OK
    row = read_latest(ledger_of(manifest))["job-0"]
    assert row["status"] == "downloaded" and row["video_url"] != old


async def test_without_a_fresh_link_the_job_is_expired_and_retry_failed_buys_it(
        emulator, fake_clock, tmp_path):
    """No fresh link: 'expired' (exit 1, the way forward named); --retry-failed is take 2."""
    srv, manifest = await expired_batch(emulator, fake_clock, tmp_path)
    ledger = ledger_of(manifest)
    assert await download(srv, ledger, tmp_path / "videos") == EXIT_JOBS_FAILED
    row = read_latest(ledger)["job-0"]
    assert row["status"] == "expired" and "--retry-failed" in row["error"]
    assert await download(srv, ledger, tmp_path / "videos") == EXIT_JOBS_FAILED
    assert history(ledger, "job-0").count("expired") == 1  # a rerun adds nothing
    assert await run(srv, manifest, out=str(tmp_path / "videos"), retry_failed=True) == EXIT_OK
    assert read_latest(ledger)["job-0"]["take"] == "2"


async def test_download_without_a_key_says_the_refresh_was_skipped(emulator, fake_clock,
                                                                  tmp_path):
    """No key: nothing is declared lost; the job stays completed and the row says why."""
    srv, manifest = await expired_batch(emulator, fake_clock, tmp_path, fresh_links=True)
    ledger = ledger_of(manifest)
    assert await download(srv, ledger, tmp_path / "videos", api_key=Secret("")) == 1
    row = read_latest(ledger)["job-0"]
    assert row["status"] == "completed" and "skipped (no API key)" in row["error"]


# -- halting a run whose jobs all fail ----------------------------------------------------------


def test_halt_counts_only_this_runs_jobs_and_waits_for_a_sample():
    """A share needs HALT_SAMPLE jobs sent; failures of earlier runs' tasks do not count."""
    stop = asyncio.Event()
    halt = Halt(HaltAfter(share=0.5), stop)
    halt.on_row("old", "failed")  # an earlier run's task
    for i in range(4):
        halt.on_row(f"j{i}", "rejected")
    assert not stop.is_set()  # 4 of 4, but below the sample
    for i in range(4, app.HALT_SAMPLE):
        halt.on_row(f"j{i}", "submitted")
    assert not stop.is_set()
    halt.on_row("j4", "failed")
    assert stop.is_set() and halt.reason is not None and "5 of the 10" in halt.reason
    counted = Halt(HaltAfter(count=2), asyncio.Event())
    counted.on_row("a", "rejected")
    counted.on_row("b", "rejected")
    assert counted.stop.is_set()


async def test_halt_after_stops_a_run_where_every_task_fails(emulator, tmp_path):
    """Every task fails: the run stops submitting long before the end and exits 1, saying so."""
    srv = await emulator(task_seconds=0, fail_rate=1.0, latency_ms=20, latency_jitter=0.0)
    manifest = prompts(tmp_path, 40)
    console, said = talking()
    code = await run(srv, manifest, out=str(tmp_path / "videos"), concurrency=1,
                     console=console)
    assert code == EXIT_JOBS_FAILED
    assert app.HALT_SAMPLE <= stat(srv, "tasks_created") < 40
    assert "halted:" in said.getvalue() and "--halt-after 50%" in said.getvalue()
    rows = list(iter_rows(ledger_of(manifest)))
    assert not [r for r in rows if r["status"] == "submitting" and r is rows[-1]]
    # Off: the same batch goes to the end.
    assert await run(srv, manifest, out=str(tmp_path / "videos"), halt_after=None) == 1
    assert stat(srv, "tasks_created") == 40


async def test_failed_jobs_are_named_with_reasons_under_quiet_too(emulator, tmp_path):
    """-q hides progress, never problems: each error job is named with its reason in full,
    and --summary-json lists every job that needs action."""
    srv = await emulator(p_503=1.0)
    manifest = prompts(tmp_path, 7)
    stream = io.StringIO()
    summary = tmp_path / "summary.json"
    code = await run(srv, manifest, wait=False, console=Console(quiet=True, stream=stream),
                     summary_json=str(summary), check_balance=False)
    assert code == EXIT_JOBS_FAILED
    said = stream.getvalue()
    assert said.count("is error: ") == 5 and "... and 2 more error jobs" in said
    assert "apimart-batch report" in said
    needs = json.loads(summary.read_text())["needs_action"]
    assert [entry["job_id"] for entry in needs] == [f"job-{i}" for i in range(7)]
    assert all(entry["status"] == "error" and "503" in entry["reason"] for entry in needs)
