"""After submission: poll tasks and download videos, as one pipeline or as commands.

``Media`` runs pollers and downloaders side by side: a task that completes is
queued for download at once, links that expire soonest first. ``run --wait`` feeds
it while submitting; ``status`` and ``download`` run it on a ledger alone. Only tasks
submitted to the API this command talks to are touched: another API does not know
their ids, and would answer that the (paid) tasks do not exist.

A poll or a download that fails in a way nobody foresaw ends that task's turn only (it
stays pollable, or ``completed`` for a later ``download``), reported through
``on_error``. At ``timing.deadline`` both stages end: polls and downloads in flight are
cut, and the tasks left are counted in ``poller.waiting`` (the summary's "still running").
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from runner.api import DEFAULT_BASE_URL, Client, RetryPolicy, Secret
from runner.console import Console, Tally
from runner.engine.download import Downloader, expires_ts
from runner.engine.poll import NO_VIDEO_STATES, POLLABLE_STATES, Poller, PollTiming
from runner.engine.resume import REGENERABLE
from runner.engine.runtime import connect, interrupts, merged_error
from runner.engine.schedule import Limiter, describe
from runner.errors import (
    EXIT_API_STOPPED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    FatalApiError,
    RunnerError,
    UsageError,
)
from runner.ledger import Recorder, keep_synced, ledger_is_mock, ledger_path, open_ledger
from runner.shard import Shard, family_base, ledger_shard

#: Queued after every real item (which all have priority 0): "no more downloads".
_LAST = (1, 0.0, "")
#: Last states that a person has to act on; every command exits 1 while a job is in one.
NEEDS_ACTION = frozenset({"rejected", "error", "unknown", "expired"}) | NO_VIDEO_STATES


class MediaConfig(Protocol):
    """The settings ``Media`` reads (``RunConfig`` and ``LedgerConfig`` have them)."""

    @property
    def concurrency(self) -> int: ...
    @property
    def policy(self) -> RetryPolicy: ...
    @property
    def timing(self) -> PollTiming: ...


@dataclass
class Media:
    """Pollers and downloaders for one ledger (or a run's set of ledgers).

    ``base_url`` is what this command's rows record in the ``base_url`` column (the API's
    URL, or ``mock``): tasks recorded against another are neither polled nor downloaded.
    ``on_error(job_id, exc)`` hears of every poll or download that failed in a way nobody
    foresaw (it must not raise); the others carry on. ``refresh``: an expired link may be
    asked for again (the client has a key); ``verify``: downloaded files are re-hashed.
    """

    poller: Poller
    downloader: Downloader | None
    workers: int
    _queue: asyncio.PriorityQueue[tuple[int, float, str]]

    def __init__(
        self,
        client: Client,
        ledger: Recorder,
        config: MediaConfig,
        stop: asyncio.Event,
        limiter: Limiter,
        *,
        base_url: str,
        out: Path | None,
        poll: bool = True,
        repeat: bool = True,
        origin: str | None = None,
        on_error: Callable[[str, Exception], None] | None = None,
        refresh: bool = True,
        verify: bool = False,
        jobs: int | None = None,
    ) -> None:
        # Never more workers than jobs (``jobs``: how many this command may touch): a large
        # -j costs nothing up front.
        self.workers = max(1, min(config.concurrency, jobs if jobs is not None
                                  else config.concurrency))
        self._queue = asyncio.PriorityQueue()
        self._poll = poll
        self._base_url = base_url.rstrip("/")
        self.downloader = None
        if out is not None:
            self.downloader = Downloader(client, ledger, out, Limiter(config.concurrency),
                                         config.policy, stop, origin=origin,
                                         deadline=config.timing.deadline, on_error=on_error,
                                         refresh=client.get_task if refresh else None,
                                         base_url=self._base_url, verify=verify)
        self.poller = Poller(client, ledger, limiter, config.policy, stop, config.timing,
                             on_completed=self._completed if out else None,
                             on_error=on_error, repeat=repeat)
        self._ledger = ledger

    def _completed(self, job_id: str) -> None:
        row = self._ledger.latest.get(job_id, {})
        self._queue.put_nowait((0, expires_ts(row) or float("inf"), job_id))

    def resume(self, job_ids: Iterable[str]) -> Counter[str]:
        """Pick up these jobs where the ledger left them: poll running ones, fetch done ones.

        Returns the jobs left alone because their task belongs to another API, counted by
        that API's ``base_url``.
        """
        skipped: Counter[str] = Counter()
        for job_id in job_ids:
            row = self._ledger.latest.get(job_id)
            if row is None:
                continue
            poll = self._poll and row.get("status") in POLLABLE_STATES and bool(row.get("task_id"))
            fetch = self.downloader is not None and self.downloader.needs_download(row)
            if not (poll or fetch):
                continue
            # An empty cell is a ledger of an older version: its target is unknown, so try.
            # Video links are absolute and need no key: only polling is bound to one API.
            target = row.get("base_url", "").rstrip("/")
            if poll and target and target != self._base_url:
                skipped[row["base_url"]] += 1
            elif poll:
                self.poller.add(job_id, row["task_id"], delay=0.0)
            else:
                self._completed(job_id)
        return skipped

    async def run(self) -> None:
        """Poll until every task is terminal (or the deadline), downloading as they complete."""
        async with asyncio.TaskGroup() as group:
            downloads = [group.create_task(self._download_worker()) for _ in range(self.workers)]
            if self._poll:
                # Tasks of the group: if one poller fails, the others are cancelled with it.
                await asyncio.wait([group.create_task(self.poller.work())
                                    for _ in range(self.workers)])
            for _ in downloads:
                self._queue.put_nowait(_LAST)

    async def _download_worker(self) -> None:
        while True:
            item = await self._queue.get()
            if item == _LAST:
                return
            job_id = item[2]
            if self.downloader is not None and not self.poller.stop.is_set():
                await self.downloader(job_id)

    def counts(self) -> Counter[str]:
        """What polling and downloading did."""
        counts = Counter(self.poller.counts)
        if self.downloader is not None:
            counts.update(self.downloader.counts)
        return counts

    def fatal(self) -> FatalApiError | None:
        """The first fatal answer polling got, if any."""
        return self.poller.fatal


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Settings of ``status`` and ``download``, which work on a ledger alone."""

    ledger: str
    api_key: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = 8
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timing: PollTiming = field(default_factory=PollTiming)
    out: str | None = None
    wait: bool = False
    #: ``--summary-json PATH``: also write the summary there.
    summary_json: str | None = None
    #: Hears the summary once it is built (the --healthcheck-url ping sends it).
    on_summary: Callable[[Mapping[str, object]], None] | None = None
    #: Only the jobs whose id it accepts (``--shard``); None: every job of the ledger.
    select: Callable[[str], bool] | None = None


async def run_status(config: LedgerConfig, console: Console) -> int:
    """``status``: poll every unfinished task once, or with --wait until all are terminal."""
    return await _on_ledger(config, console, poll=True, download=False)


async def run_download(config: LedgerConfig, console: Console) -> int:
    """``download``: fetch every completed video not yet on disk."""
    return await _on_ledger(config, console, poll=False, download=True)


async def _on_ledger(config: LedgerConfig, console: Console, *, poll: bool, download: bool) -> int:
    mock = ledger_is_mock(config.ledger)
    out = prepare_out(config.out or default_out(config.ledger)) if download else None
    target = "mock" if mock else config.base_url
    with open_ledger(config.ledger, mock=mock, base_url=target,
                     warn=console.warn, create=False) as ledger:
        stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            base_url, key = await connect(stack, mock=mock, config_key=config.api_key,
                                          base_url=config.base_url, console=console)
            pool = min(config.concurrency, max(1, len(ledger.latest)))
            client = await stack.enter_async_context(Client(base_url, key, pool=pool))
            tally = Tally({job: row.get("status", "") for job, row in ledger.latest.items()},
                          open_phases=("queued", "submitted", "running") if poll
                          else ("completed",))
            media = Media(client, Watched(ledger, tally, console), config, stop,
                          Limiter(config.concurrency), base_url=target, out=out, poll=poll,
                          repeat=config.wait, origin=base_url if mock else None,
                          on_error=partial(warn_unforeseen, console),
                          refresh=mock or bool(key.reveal()), verify=download,
                          jobs=len(ledger.latest))
            chosen = [job_id for job_id in ledger.latest
                      if config.select is None or config.select(job_id)]
            skipped = media.resume(chosen)
            warn_other_targets(skipped, target, console, "polled" if poll else "downloaded")
            media.poller.close()  # nothing else will be added: the pollers end when it drains
            console.start_progress(tally)
            try:
                async with interrupts(stop) as caught, asyncio.TaskGroup() as group:
                    syncing = group.create_task(keep_synced([ledger]))
                    await media.run()
                    syncing.cancel()
            except* RunnerError as errors:
                # e.g. the ledger cannot be written: say so plainly, not as an ExceptionGroup.
                console.end_progress()
                raise merged_error(errors) from None
            console.end_progress()
        counts = media.counts()
        ledger.sync()
        rows = [ledger.latest[job_id] for job_id in chosen]
        states = Counter(row.get("status", "") for row in rows)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    if not console.quiet:
        print(f"{config.ledger}: {summary or 'no jobs'}"
              + (f" (this run: {_fmt(counts)})" if counts else ""))
    hint = regenerate_hint(rows, ledger=config.ledger, mock=mock, base_url=config.base_url)
    if hint:
        console.warn(hint)
    if media.fatal() is not None:
        console.error(str(media.fatal()))
    # The same rule as 'run': a job that needs action, or (download, status --wait) a
    # video that is not on disk or a task not finished yet, is exit 1.
    bad = NEEDS_ACTION | ({"completed"} if download else set())
    if config.wait and poll:
        bad |= POLLABLE_STATES
    if caught:
        code = EXIT_SIGTERM if caught[0] == signal.SIGTERM else EXIT_SIGINT
    elif media.fatal() is not None:
        code = EXIT_API_STOPPED
    elif skipped or any(states.get(s) for s in bad):
        code = EXIT_JOBS_FAILED
    else:
        code = EXIT_OK
    document = {
        "exit_code": code,
        "ledger": config.ledger,
        "jobs": len(rows),
        "this_run": dict(counts),
        "ledger_states": dict(states),
        "needs_action": needs_action(rows),
        "other_target": skipped.total(),
        "mock": mock,
    }
    if config.summary_json:
        write_json(config.summary_json, document, console)
    if config.on_summary is not None:
        config.on_summary(document)
    return code


def needs_action(rows: Iterable[Mapping[str, str]],
                 lines: Mapping[str, int] | None = None) -> list[dict[str, object]]:
    """``--summary-json``'s ``needs_action``: each job in a state a person must act on,
    with its status, reason, manifest and manifest line (None when unknown)."""
    return [{"job_id": row["job_id"], "status": row["status"],
             "reason": row.get("error") or None, "manifest": row.get("manifest") or None,
             "line": (lines or {}).get(row["job_id"])}
            for row in rows if row.get("status") in NEEDS_ACTION]


def write_json(path: str, data: Mapping[str, object], console: Console) -> None:
    """Write ``data`` to ``path`` as JSON, atomically; a failure only warns (``--summary-json``:
    the command is over and recorded by then)."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        console.warn(f"--summary-json {path}: cannot write the summary ({exc.strerror})")


def rerun_command(manifests: Sequence[str], *flags: str, ledger: str | None, mock: bool,
                  base_url: str, shard: Shard | None = None) -> str:
    """The ``run`` command line that acts again on these manifests' jobs, with ``flags``.

    ``ledger`` is where the jobs are recorded, as written or as ``--ledger`` names it
    (None: beside the manifest); it is left out when that is the manifest's own ledger. A
    shard's ledger (``m.shard-1-of-4.ledger.csv``, or ``shard`` given) gives
    ``--shard 1/4`` and its family's base name as ``--ledger``: without them a rerun
    would be a run of every job of the manifest, into that ledger.
    """
    if shard is None and ledger is not None:
        shard = ledger_shard(ledger)
    manifests = list(manifests) or ["MANIFEST"]
    words = ["apimart-batch", "run", *manifests]
    if mock:
        words.append("--mock")
    if ledger is not None and not (len(manifests) == 1 and _same_file(
            ledger_path(manifests[0], mock=mock, shard=shard),
            ledger_path(manifests[0], mock=mock, override=ledger, shard=shard))):
        words += ["--ledger", ledger if shard is None else family_base(ledger)]
    if shard is not None:
        words += ["--shard", str(shard)]
    if not mock and base_url and base_url.rstrip("/") != DEFAULT_BASE_URL:
        words += ["--base-url", base_url]
    return shlex.join([*words, *flags])


def _same_file(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def regenerate_hint(rows: Iterable[Mapping[str, str]], *, ledger: str | None, mock: bool,
                    base_url: str, shard: Shard | None = None) -> str | None:
    """Which jobs ended with no video to keep, and the command that buys them again."""
    ended = [row for row in rows if row.get("status") in REGENERABLE]
    if not ended:
        return None
    states = Counter(row["status"] for row in ended)
    manifests = sorted({row.get("manifest") or "MANIFEST" for row in ended})
    names = ", ".join(row["job_id"] for row in ended[:10])
    more = f" and {len(ended) - 10} more" if len(ended) > 10 else ""
    command = rerun_command(manifests, "--retry-failed", ledger=ledger, mock=mock,
                            base_url=base_url, shard=shard)
    return (f"{len(ended)} jobs have no video ({_fmt(states)}): {names}{more}\n"
            f"  hint: to buy them again (a new purchase each, a new take): {command}")


class Watched:
    """A ledger whose appended rows also move a progress ``Tally`` (and refresh the display)."""

    def __init__(self, ledger: Recorder, tally: Tally, console: Console) -> None:
        self._ledger, self._tally, self._console = ledger, tally, console

    @property
    def latest(self) -> Mapping[str, Mapping[str, str]]:
        """The wrapped ledger's latest rows."""
        return self._ledger.latest

    def append(self, job_id: str, **fields: object) -> None:
        """Append to the wrapped ledger, then show the job's new phase."""
        self._ledger.append(job_id, **fields)
        if self._tally.move(job_id, self._ledger.latest[job_id].get("status", "")):
            self._console.progress()


def warn_unforeseen(console: Console, job_id: str, exc: Exception) -> None:
    """Say that one job's poll or download failed in a way nobody foresaw, and what now."""
    console.warn(f"job '{job_id}': unexpected error ({describe(exc)}); the job keeps its "
                 "recorded state and is tried again later\n"
                 "  hint: if it persists, report this line; 'apimart-batch status' or "
                 "'download' retries it")


def warn_other_targets(skipped: Counter[str], target: str, console: Console, verb: str) -> None:
    """Say which tasks were left alone because another API created them, and the fix."""
    for url, n in sorted(skipped.items()):
        tasks = "1 task was" if n == 1 else f"{n} tasks were"
        console.warn(f"{tasks} submitted to {url}, not {target}: not {verb}; pass --base-url "
                     f"{shlex.quote(url)}")


def _fmt(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n)


def default_out(ledger: str) -> str:
    """Where videos go without --out: a ``videos`` folder beside the ledger."""
    return str(Path(ledger).parent / "videos")


def prepare_out(out: str) -> Path:
    """Create the download folder if needed; a clear UsageError if it cannot be used."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"--out {out}: cannot create the folder: {exc.strerror}"
        raise UsageError(msg) from exc
    if not os.access(path, os.W_OK):
        msg = f"--out {out}: the folder is not writable"
        raise UsageError(msg)
    return path
