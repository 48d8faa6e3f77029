"""``run``: manifests -> resume decisions -> bounded submission -> ledger -> exit code."""

from __future__ import annotations

import asyncio
import shlex
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from runner.api import DEFAULT_BASE_URL, Client, RetryPolicy, Secret, Timeouts, is_quota
from runner.console import OPEN_WITH_WAIT, Console, Tally
from runner.engine import (
    NEEDS_ACTION,
    POLLABLE_STATES,
    Decision,
    Limiter,
    Media,
    PollTiming,
    Submitter,
    connect,
    decide_across,
    default_out,
    fewer_collections,
    interrupts,
    merged_error,
    needs_action,
    prepare_out,
    regenerate_hint,
    rerun_command,
    run_pool,
    warn_other_targets,
    warn_unforeseen,
    write_json,
)
from runner.errors import (
    EXIT_API_STOPPED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ApiError,
    LedgerError,
    RunnerError,
)
from runner.ledger import (
    Ledger,
    keep_synced,
    ledger_path,
    open_ledger,
    recorded_elsewhere,
    refuse_other_counts,
)
from runner.manifest import Manifest, load_manifests, pricing
from runner.models import HALT_SAMPLE as HALT_SAMPLE  # importers of runner.app find them here
from runner.models import HaltAfter as HaltAfter
from runner.models import Job
from runner.shard import Shard

#: The order of the summary's counts: the pipeline's order.
SUMMARY_ORDER = (
    "submitted", "rejected", "error", "unknown", "already done", "already unknown",
    "already rejected", "completed", "failed", "cancelled", "not_found", "poll errors",
    "downloaded", "fresh links", "missing files", "download errors", "file conflicts",
    "expired",
)  # fmt: skip
#: How many jobs of one state the summary names before it gives a count and a command.
_NAMED = 5
@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything ``run`` needs, parsed and checked by the CLI."""

    manifests: tuple[str, ...]
    api_key: Secret | None = None
    ledger: str | None = None
    concurrency: int = 8
    rate: float | None = None
    max_jobs: int | None = None
    budget: float | None = None
    timeout: float = 60.0
    retry_ambiguous: bool = False
    resubmit_unknown: bool = False
    resubmit_changed: bool = False
    retry_failed: bool = False
    halt_after: HaltAfter | None = field(default_factory=lambda: HaltAfter(share=0.5))
    check_balance: bool = True
    mock: bool = False
    base_url: str = DEFAULT_BASE_URL
    summary_json: str | None = None
    prices: Mapping[str, float] = field(default_factory=dict)
    allow_unknown_models: bool = False
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    wait: bool = False
    out: str | None = None
    timing: PollTiming = field(default_factory=PollTiming)
    #: ``--fail-on-held``: jobs held back by --max-jobs or --budget make the exit code 1.
    fail_on_held: bool = False
    #: Hears the summary once it is built (the --healthcheck-url ping sends it).
    on_summary: Callable[[Mapping[str, object]], None] | None = None
    shard: Shard | None = None


def _recorded_base_url(config: RunConfig) -> str:
    """What the ledger's ``base_url`` column holds for this run's rows."""
    return "mock" if config.mock else config.base_url


class Ledgers:
    """The ledgers of one run, addressed by job id (job ids are unique across manifests).

    ``on_row(job_id, status)`` hears of every row appended (the halt rule counts there).
    """

    def __init__(self, by_job: Mapping[str, Ledger], ledgers: Sequence[Ledger]) -> None:
        self._by_job = by_job
        self.all = ledgers
        self.latest: dict[str, Mapping[str, str]] = {}
        self.on_row: Callable[[str, str], None] | None = None
        #: Jobs whose newest row is in another ledger of their family: (that ledger, row).
        self.elsewhere: dict[str, tuple[str, Mapping[str, str]]] = {}
        for ledger in ledgers:
            self.latest.update(ledger.latest)

    def append(self, job_id: str, **fields: object) -> None:
        """Append a row to the job's ledger."""
        ledger = self._by_job[job_id]
        ledger.append(job_id, **fields)
        self.latest[job_id] = ledger.latest[job_id]
        self.elsewhere.pop(job_id, None)  # from now on its newest row is ours
        if self.on_row is not None:
            self.on_row(job_id, self.latest[job_id]["status"])

    def row(self, job_id: str) -> Mapping[str, str] | None:
        """The job's latest row in its own ledger."""
        return self._by_job[job_id].latest.get(job_id)

    def newest(self, job_id: str) -> Mapping[str, str] | None:
        """The job's newest row in any ledger of its family (``None``: never recorded)."""
        other = self.elsewhere.get(job_id)
        return other[1] if other is not None else self.latest.get(job_id)


@dataclass
class Halt:
    """The ``--halt-after`` rule: counts this run's sent jobs and bad ends, and says when."""

    rule: HaltAfter
    stop: asyncio.Event
    sent: set[str] = field(default_factory=set)
    bad: int = 0
    reason: str | None = None

    def on_row(self, job_id: str, status: str) -> None:
        """Count one row (``Ledgers.on_row``); set ``stop`` once the rule is met."""
        if status in ("submitted", "rejected"):
            self.sent.add(job_id)
        if status in ("rejected", "failed", "cancelled") and job_id in self.sent:
            self.bad += 1
        if self.reason is None and self._met():
            self.reason = (f"{self.bad} of the {len(self.sent)} jobs sent this run failed or "
                           f"were rejected (--halt-after {self.rule})")
            self.stop.set()

    def _met(self) -> bool:
        if self.rule.count is not None:
            return self.bad >= self.rule.count
        share = self.rule.share or 0.0
        return len(self.sent) >= HALT_SAMPLE and share > 0 and self.bad >= share * len(self.sent)


@dataclass
class Outcome:
    """What happened to the run's jobs, for the summary and the exit code."""

    total: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    changed: list[Decision] = field(default_factory=list)
    held_by_max_jobs: int = 0
    held_by_budget: int = 0
    held_by_deadline: int = 0
    not_started: int = 0
    still_running: int = 0
    other_target: int = 0
    estimate: float = 0.0
    unpriced: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    signal: int | None = None
    fatal: str | None = None
    refused: int = 0
    held_by_balance: int = 0
    halted: str | None = None


async def run(config: RunConfig, console: Console) -> int:
    """Submit every job of the manifests that is not done yet; return the exit code."""
    manifests = load_manifests(config.manifests, allow_unknown_models=config.allow_unknown_models)
    prices = pricing.merged_prices(manifests, config.prices)
    jobs = [job for manifest in manifests for job in manifest.jobs
            if config.shard is None or config.shard.holds(job.job_id)]
    with ExitStack() as stack:
        ledgers = _open_ledgers(stack, manifests, config, console)
        decisions = [_decide(job, ledgers, config) for job in jobs]
        _say_elsewhere(decisions, ledgers, config, console)
        outcome = Outcome(total=len(jobs))
        selected = _select(decisions, config, prices, outcome, console)
        if not selected and not config.wait:
            return _finish(outcome, ledgers, jobs, config, console)
        # Checked before any request: an unusable folder must not cost a purchase.
        out = prepare_out(config.out or default_out(str(ledgers.all[0].path))) \
            if config.wait else None
        async with AsyncExitStack() as astack:
            base_url, key = await connect(astack, mock=config.mock, config_key=config.api_key,
                                          base_url=config.base_url, console=console)
            client = await astack.enter_async_context(
                Client(base_url, key, pool=min(config.concurrency, max(1, len(jobs))),
                       timeouts=Timeouts(submit=config.timeout))
            )
            if selected and config.check_balance:
                selected = await _check_balance(client, selected, prices, config, outcome,
                                                console)
            with fewer_collections():
                await _submit_all(selected, client, ledgers, config, console, outcome,
                                  every=[job.job_id for job in jobs], out=out)
        # Only what reached the API may cost money: submitted, or unknown (maybe billed).
        sent = [job for job in selected if ledgers.latest.get(job.job_id, {}).get("status")
                not in (None, "error", "rejected")]
        costs = [pricing.estimate(job, prices) for job in sent]
        outcome.estimate = sum(cost for cost in costs if cost is not None)
        outcome.unpriced = sum(1 for cost in costs if cost is None)
        return _finish(outcome, ledgers, jobs, config, console)


async def _check_balance(
    client: Client,
    selected: list[Job],
    prices: Mapping[str, float | None],
    config: RunConfig,
    outcome: Outcome,
    console: Console,
) -> list[Job]:
    """The jobs to send after the balance check: all, or none when they cannot be paid.

    A lookup that fails never blocks the run: it only says the check was skipped.
    """
    costs = [pricing.estimate(job, prices) for job in selected]
    estimate = sum(cost for cost in costs if cost is not None)
    unpriced = sum(1 for cost in costs if cost is None)
    deadline = config.timing.deadline
    try:
        async with asyncio.timeout(None if deadline is None
                                   else max(0.0, deadline - time.monotonic())):
            balance = await client.balance()
    except (ApiError, TimeoutError) as exc:
        why = exc.message.splitlines()[0] if isinstance(exc, ApiError) else "--deadline reached"
        console.warn(f"balance check skipped: {why}")
        return selected
    if balance.remain is None or estimate <= balance.remain + 1e-9:
        return selected
    if config.budget is not None and config.budget <= balance.remain + 1e-9:
        return selected  # --budget already keeps this run within the balance
    more = f" + {unpriced} jobs of unknown price" if unpriced else ""
    outcome.fatal = (
        f"balance: the API reports {balance.remain:.2f} left, and the {len(selected)} jobs "
        f"about to be sent are estimated at ${estimate:.2f}{more}; nothing new was sent\n"
        f"  hint: top up, or cap the run with --budget {balance.remain:.2f} or --max-jobs N; "
        "if the balance is not in USD, pass --no-balance-check"
    )
    outcome.held_by_balance = len(selected)
    return []


def _open_ledgers(
    stack: ExitStack, manifests: Sequence[Manifest], config: RunConfig, console: Console
) -> Ledgers:
    paths = {m.path: ledger_path(m.path, mock=config.mock, override=config.ledger,
                                 shard=config.shard) for m in manifests}
    opened: dict[str, Ledger] = {}
    base_url = _recorded_base_url(config)
    for path in sorted(set(paths.values())):
        opened[path] = stack.enter_context(
            open_ledger(path, mock=config.mock, base_url=base_url, warn=console.warn)
        )
    for ledger in opened.values():
        for job_id, row in list(ledger.latest.items()):
            if row.get("status") == "submitting":
                ledger.append(job_id, status="unknown",
                              error="an earlier run stopped while submitting; the task may exist")
                console.warn(f"{ledger.path}: job '{job_id}' was being submitted when an earlier "
                             "run stopped; it is now 'unknown' (it may exist and be billed)")
    by_job = {job.job_id: opened[paths[m.path]] for m in manifests for job in m.jobs}
    ledgers = Ledgers(by_job, list(opened.values()))
    for path, ledger in opened.items():
        # Our ledgers are locked by now: a run of another shard count that starts later
        # sees them, and one that started earlier is seen here.
        refuse_other_counts(path, config.shard)
        ledgers.elsewhere.update(recorded_elsewhere(path, ledger.latest, mock=config.mock))
    return ledgers


def _decide(job: Job, ledgers: Ledgers, config: RunConfig) -> Decision:
    return decide_across(job, ledgers.row(job.job_id), ledgers.elsewhere.get(job.job_id),
                         resubmit_unknown=config.resubmit_unknown,
                         resubmit_changed=config.resubmit_changed,
                         retry_failed=config.retry_failed)


def _say_elsewhere(
    decisions: Sequence[Decision], ledgers: Ledgers, config: RunConfig, console: Console
) -> None:
    """Name the other ledgers (another shard count) that hold jobs this run leaves alone."""
    held = Counter(ledgers.elsewhere[d.job.job_id][0] for d in decisions
                   if d.verdict != "submit" and d.job.job_id in ledgers.elsewhere)
    if held:
        where = ", ".join(f"{path} ({n})" for path, n in sorted(held.items()))
        paths = shlex.join(sorted(held))
        if not config.mock and config.base_url.rstrip("/") != DEFAULT_BASE_URL:
            paths += " --base-url " + shlex.quote(config.base_url)
        console.info(f"{held.total()} jobs are recorded in other ledgers of their manifest and "
                     f"are left to them: {where}\n  hint: 'apimart-batch status {paths} --wait' "
                     f"and 'apimart-batch download {paths}' collect their videos")


def _select(
    decisions: Sequence[Decision],
    config: RunConfig,
    prices: Mapping[str, float | None],
    outcome: Outcome,
    console: Console,
) -> list[Job]:
    """The jobs to send, in manifest order, after --max-jobs and --budget."""
    selected: list[Job] = []
    for decision in decisions:
        if decision.verdict == "submit":
            selected.append(decision.job)
        elif decision.verdict == "changed":
            outcome.changed.append(decision)
            console.warn(f"job '{decision.job.job_id}' ({decision.job.manifest}:"
                         f"{decision.job.line}): {decision.reason}")
        else:
            outcome.counts["already " + decision.verdict] += 1
    if config.max_jobs is not None and len(selected) > config.max_jobs:
        outcome.held_by_max_jobs = len(selected) - config.max_jobs
        selected = selected[: config.max_jobs]
    if config.budget is not None:
        spend = 0.0
        for index, job in enumerate(selected):
            cost = pricing.estimate(job, prices)
            if cost is None:
                # A budget cannot bound what has no price: never start such a job under it.
                keys = sorted({pricing.rate_and_key(j, prices)[1] for j in selected[index:]
                               if pricing.estimate(j, prices) is None})
                outcome.held_by_budget = len(selected) - index
                console.warn(
                    f"--budget ${config.budget:.2f}: job '{job.job_id}' has no known price "
                    f"({job.model}); {outcome.held_by_budget} jobs held back\n"
                    f"  hint: give a price for {', '.join(keys)} with --price KEY=USD or a "
                    "'prices:' block (USD per second), then rerun"
                )
                selected = selected[:index]
                break
            if spend + cost > config.budget + 1e-9:
                outcome.held_by_budget = len(selected) - index
                how = "refusing to start" if index == 0 else "stopping before it"
                console.warn(
                    f"--budget ${config.budget:.2f}: job '{job.job_id}' would bring the estimated "
                    f"spend to ${spend + cost:.2f}; {how}; {outcome.held_by_budget} jobs held back"
                )
                selected = selected[:index]
                break
            spend += cost
    return selected


async def _submit_all(
    jobs: list[Job],
    client: Client,
    ledgers: Ledgers,
    config: RunConfig,
    console: Console,
    outcome: Outcome,
    *,
    every: Sequence[str],
    out: Path | None,
) -> None:
    """Submit ``jobs``; with --wait, poll and download ``every`` job's task meanwhile.

    Two stops: ``stop`` (a signal, a broken ledger, a fatal answer to a poll) ends every
    stage; ``halt`` (a fatal answer to a submission, --halt-after) ends submission only,
    and with --wait the tasks already created are still polled and downloaded.
    """
    stop, halt = asyncio.Event(), asyncio.Event()
    limiter = Limiter(config.concurrency, rate=config.rate)
    submitter = Submitter(client=client, ledger=ledgers, limiter=limiter,
                          policy=config.policy, stop=halt,
                          retry_ambiguous=config.retry_ambiguous)
    halting = Halt(config.halt_after, halt) if config.halt_after is not None else None
    media = None
    if out is not None:
        # A --mock rerun serves earlier runs' video links from this process's emulator.
        media = Media(client, ledgers, config, stop, limiter, out=out,
                      base_url=_recorded_base_url(config),
                      origin=client.base_url if config.mock else None,
                      on_error=partial(warn_unforeseen, console), jobs=len(every))
    started = time.monotonic()
    done = 0
    # One display for every phase: each of the manifests' jobs, by its latest ledger row.
    tally = Tally({job_id: ledgers.latest.get(job_id, {}).get("status", "") for job_id in every},
                  open_phases=("queued",) if out is None else OPEN_WITH_WAIT)

    def on_row(job_id: str, status: str) -> None:
        if halting is not None:
            halting.on_row(job_id, status)
        if tally.move(job_id, status):
            console.progress()

    ledgers.on_row = on_row
    console.start_progress(tally)

    deadline = config.timing.deadline

    async def work(job: Job) -> None:
        nonlocal done
        if deadline is not None and time.monotonic() >= deadline:
            # --deadline bounds the command: no new purchase starts after it (a POST in
            # flight is never cut, since a cut POST is 'unknown').
            outcome.held_by_deadline += 1
            done += 1
            return
        if not await submitter(job):
            return  # the run stopped while it waited for its turn: not sent, no row
        done += 1
        row = ledgers.latest.get(job.job_id, {})
        if media is not None and row.get("status") == "submitted":
            media.poller.add(job.job_id, row["task_id"])

    async def submit_phase() -> None:
        await run_pool(jobs, work, workers=config.concurrency, stop=halt)
        if media is not None:
            media.poller.close()

    async def relay() -> None:
        await stop.wait()  # whatever stops the run stops submission too
        halt.set()

    failures: list[LedgerError] = []

    async def guarded(step: Coroutine[object, object, None]) -> None:
        # A failing ledger stops the run, but lets submissions in flight finish and report.
        try:
            await step
        except LedgerError as exc:
            failures.append(exc)
            stop.set()

    try:
        async with interrupts(stop) as caught, asyncio.TaskGroup() as group:
            syncing = group.create_task(guarded(keep_synced(ledgers.all)))
            relaying = group.create_task(relay())
            phases = [group.create_task(submit_phase())]
            if media is not None:
                # Every job of the manifests: earlier runs' tasks are polled and fetched too.
                skipped = media.resume(every)
                warn_other_targets(skipped, _recorded_base_url(config), console, "polled")
                outcome.other_target = skipped.total()
                phases.append(group.create_task(guarded(media.run())))
            await asyncio.wait(phases)
            syncing.cancel()
            relaying.cancel()
    except* RunnerError as errors:
        console.end_progress()
        raise merged_error(errors) from None
    console.end_progress()
    if failures or submitter.ledger_errors:
        raise merged_error([*submitter.ledger_errors, *failures])
    outcome.elapsed = time.monotonic() - started
    outcome.counts.update(submitter.counts)
    outcome.unavailable.update(submitter.unavailable)
    outcome.refused = submitter.refused
    if media is not None:
        outcome.counts.update(media.counts())
        outcome.still_running = media.poller.waiting
    outcome.signal = caught[0] if caught else None
    if len(caught) > 1:
        # A second signal cut the requests in flight short: they may have created tasks.
        for job in jobs:
            if ledgers.latest.get(job.job_id, {}).get("status") == "submitting":
                ledgers.append(job.job_id, status="unknown",
                               error="cut off by a second interrupt; the task may exist")
                outcome.counts["unknown"] += 1
                done += 1
    outcome.not_started = len(jobs) - done
    if halting is not None and halting.reason is not None and submitter.fatal is None:
        outcome.halted = halting.reason
    fatal = submitter.fatal or (media.fatal() if media is not None else None)
    if fatal is not None and outcome.fatal is None:
        if is_quota(fatal):
            what, then = "APIMart says the balance is insufficient", "rerun after topping up"
        elif fatal.status in (401, 403):
            what = f"APIMart refused the key or permission ({fatal.status})"
            then = "fix the key, then rerun"
        else:
            what, then = fatal.message.splitlines()[0], "check --base-url, then rerun"
        when = "to a poll" if submitter.fatal is None else f"{outcome.refused} jobs refused"
        outcome.fatal = f"{what}: {when}, {outcome.not_started} not submitted"
        created = outcome.counts["submitted"]
        if submitter.fatal is not None and media is not None and media.poller.fatal is None:
            got = outcome.counts["downloaded"]
            if created or got or outcome.still_running:
                outcome.fatal += (f"; the tasks already created were still collected ({got} "
                                  f"downloaded, {outcome.still_running} still running)")
        elif submitter.fatal is not None and created:
            ledger = shlex.quote(str(ledgers.all[0].path))
            outcome.fatal += (f"; the {created} tasks created before it are recorded "
                              f"('apimart-batch status {ledger} --wait', then 'apimart-batch "
                              f"download {ledger}' collect them)")
        outcome.fatal += f"; {then}"


def _finish(
    outcome: Outcome,
    ledgers: Ledgers,
    jobs: Sequence[Job],
    config: RunConfig,
    console: Console,
) -> int:
    for ledger in ledgers.all:
        ledger.sync()
    states = Counter((ledgers.newest(job.job_id) or {}).get("status", "not sent") for job in jobs)
    unknown = sorted({j.job_id for j in jobs
                      if (ledgers.newest(j.job_id) or {}).get("status") == "unknown"})
    # --wait promises the videos of this run's own jobs: those another ledger holds are
    # collected through it ('status' and 'download' on that ledger).
    own = Counter((ledgers.latest.get(job.job_id) or {}).get("status", "not sent")
                  for job in jobs if job.job_id not in ledgers.elsewhere)
    code = _exit_code(outcome, states, wait=config.wait, own=own,
                      fail_on_held=config.fail_on_held)
    summary = {
        "exit_code": code,
        "jobs": outcome.total,
        "this_run": dict(outcome.counts),
        "ledger_states": dict(states),
        "changed": [d.job.job_id for d in outcome.changed],
        "unknown": unknown,
        "needs_action": needs_action(
            # Only the rows it keeps are copied, not every job's.
            [{**row, "manifest": job.manifest} for job in jobs
             if (row := ledgers.newest(job.job_id)) is not None
             and row.get("status") in NEEDS_ACTION],
            {job.job_id: job.line for job in jobs},
        ),
        "held_by_max_jobs": outcome.held_by_max_jobs,
        "held_by_budget": outcome.held_by_budget,
        "held_by_deadline": outcome.held_by_deadline,
        "not_started": outcome.not_started,
        "refused": outcome.refused,
        "held_by_balance": outcome.held_by_balance,
        "halted": outcome.halted,
        "estimated_cost_usd": round(outcome.estimate, 2),
        "unpriced_jobs": outcome.unpriced,
        "unavailable_models": dict(outcome.unavailable),
        "elapsed_s": round(outcome.elapsed, 3),
        "ledgers": [str(lg.path) for lg in ledgers.all],
        "mock": config.mock,
    }
    _print_summary(summary, outcome, ledgers, jobs, config, console)
    if config.summary_json:
        write_json(config.summary_json, summary, console)
    if config.on_summary is not None:
        config.on_summary(summary)
    return code


def _exit_code(outcome: Outcome, states: Mapping[str, int], *, wait: bool,
               fail_on_held: bool, own: Mapping[str, int] | None = None) -> int:
    if outcome.signal is not None:
        return EXIT_SIGTERM if outcome.signal == signal.SIGTERM else EXIT_SIGINT
    if outcome.fatal:
        return EXIT_API_STOPPED
    # With --wait, the run promised videos on disk: anything short of that needs a rerun.
    unfinished = (POLLABLE_STATES | {"completed"}) if wait else frozenset()
    # Held back on purpose (a cron trickle, a spending cap) is fine unless asked otherwise;
    # the deadline is not a choice of how much to send, so what it left is unfinished.
    held = outcome.held_by_deadline or (
        fail_on_held and (outcome.held_by_budget or outcome.held_by_max_jobs))
    mine = states if own is None else own
    if held or outcome.halted or outcome.changed or outcome.other_target or any(
        states.get(s) for s in NEEDS_ACTION) or any(mine.get(s) for s in unfinished):
        return EXIT_JOBS_FAILED
    return EXIT_OK


def _print_summary(
    summary: Mapping[str, object],
    outcome: Outcome,
    ledgers: Ledgers,
    jobs: Sequence[Job],
    config: RunConfig,
    console: Console,
) -> None:
    runs = outcome.counts
    order = {name: i for i, name in enumerate(SUMMARY_ORDER)}
    rate = runs["submitted"] / outcome.elapsed if outcome.elapsed > 0 else 0.0
    parts = [f"{n} {k}" for k, n in sorted(runs.items(), key=lambda kv: order.get(kv[0], 99))
             if n]
    if outcome.held_by_max_jobs:
        parts.append(f"{outcome.held_by_max_jobs} held back by --max-jobs")
    if outcome.held_by_budget:
        parts.append(f"{outcome.held_by_budget} held back by --budget")
    if outcome.held_by_deadline:
        parts.append(f"{outcome.held_by_deadline} not started before --deadline")
    if outcome.changed:
        parts.append(f"{len(outcome.changed)} changed (not resubmitted)")
    if outcome.still_running:
        parts.append(f"{outcome.still_running} still running (see 'apimart-batch status')")
    unpriced = f" + {outcome.unpriced} jobs of unknown price" if outcome.unpriced else ""
    line = (f"{outcome.total} jobs: " + (", ".join(parts) or "nothing to do")
            + f" in {outcome.elapsed:.1f}s ({rate:.1f}/s); estimated cost of what was sent "
            f"${outcome.estimate:.2f}{unpriced}")
    if not console.quiet:
        print(line, flush=True)
    if outcome.fatal:
        console.error(outcome.fatal)
    for model, words in outcome.unavailable.items():
        console.error(
            f"model {model}: the API does not serve it ({words}); its jobs were not sent "
            "and are 'error' (nothing was created)\n  hint: move them to another model "
            "('apimart-batch models' lists the catalog), or rerun later if the model returns"
        )
    if outcome.signal is not None:
        console.error(f"interrupted: {outcome.not_started} jobs not submitted; rerun to continue")
    if outcome.halted:
        console.error(
            f"halted: {outcome.halted}; stopped submitting, {outcome.not_started} jobs not "
            "submitted; what was in flight is recorded\n  hint: look at why they failed "
            "('apimart-batch report LEDGER'), fix the manifest, then rerun (--halt-after off "
            "never halts)"
        )
    needs = summary["needs_action"]
    assert isinstance(needs, list)
    # Named always, -q or not, on stderr (cron mails it): the first few of each state, in full.
    for state in ("rejected", "error"):
        named = [entry for entry in needs if entry["status"] == state]
        for entry in named[:_NAMED]:
            console.warn(f"{entry['manifest']}:{entry['line']}: job '{entry['job_id']}' is "
                         f"{state}: {entry['reason'] or 'no reason recorded'}")
        if len(named) > _NAMED:
            ledger = shlex.quote(str(ledgers.all[0].path))
            console.warn(f"... and {len(named) - _NAMED} more {state} jobs: "
                         f"apimart-batch report {ledger} lists them all")
    rows = [row for job in jobs if (row := ledgers.newest(job.job_id)) is not None]
    hint = regenerate_hint(rows, ledger=config.ledger, mock=config.mock,
                           base_url=config.base_url, shard=config.shard)
    if hint:
        console.warn(hint)
    unknown = summary["unknown"]
    assert isinstance(unknown, list)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20
                                           else "")
        console.warn(
            f"{len(unknown)} jobs are 'unknown' (the API may have created and billed them): "
            f"{shown}\n  hint: check your APIMart dashboard; to resend them with the same "
            f"Idempotency-Key run: {resubmit_command(config)}"
        )


def resubmit_command(config: RunConfig) -> str:
    """The command that resends this run's 'unknown' jobs: same manifests, ledger and target."""
    return rerun_command(config.manifests, "--resubmit-unknown", ledger=config.ledger,
                         mock=config.mock, base_url=config.base_url, shard=config.shard)
