"""Command line: flags -> frozen config -> command -> exit code.

Each ``cmd_*`` function turns parsed flags into a config and calls one stage;
``main`` maps a ``RunnerError`` to its message on stderr and its exit code, so
bad input never ends in a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from runner import __version__, emulator
from runner.api import DEFAULT_BASE_URL, RetryPolicy, Secret, api_key_from_env, key_file_warning
from runner.errors import (
    EXIT_API_STOPPED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ApiError,
    LedgerError,
    ManifestError,
    RunnerError,
    UsageError,
)
from runner.models import HALT_SAMPLE, HaltAfter
from runner.shard import INDEX_VARIABLE, Shard, parse_shard

# Each command imports the stages it uses, so that --help, validate, plan and report never
# load aiohttp, and --help no jsonschema (tests/test_layout.py checks it).
if TYPE_CHECKING:
    from runner.console import Console
    from runner.engine import LedgerConfig, PollTiming
    from runner.healthcheck import Summary

#: The manifest schema with only file-local $refs: what editors can load.
EDITOR_SCHEMA = "manifest.editor.schema.json"

EXIT_CODES = """\
exit codes:
  0    every job submitted or already done (jobs held back by --max-jobs or
       --budget are fine, unless --fail-on-held)
  1    some jobs need action: rejected, error, unknown, changed, failed,
       cancelled, not_found or expired; a model the API does not serve; halted
       (--halt-after); jobs not started before --deadline; tasks of another API
       left alone; or (with --wait, and for download) videos not on disk yet
  2    invalid usage, manifest or ledger: nothing was sent (or, if the ledger
       became unwritable mid-run, nothing more; the message names any task id)
  3    stopped by the API: key, permission or balance (or the balance check)
  75   the ledger is in use by another run (with --shard: or a sibling ledger,
       by a run of another shard count)
  130  interrupted (SIGINT); 143: terminated (SIGTERM). In-flight requests
       finish and are recorded; a second signal aborts at once
  141  stdout was closed early (e.g. '| head'); what was recorded stays recorded
"""
#: Each command's own exit codes, for its --help.
_OFFLINE_CODES = """\
exit codes:
  0    done
  2    invalid usage, manifest or ledger
  141  stdout was closed early (e.g. '| head')
"""
_LEDGER_CODES = """\
exit codes:
  0    nothing needs action
  1    jobs need action: rejected, error, unknown, failed, cancelled, not_found
       or expired; tasks of another API left alone;
       {more}
  2    invalid usage or ledger
  3    the API refused the key or permission
  75   the ledger is in use by another run
  130  interrupted (SIGINT); 143: terminated (SIGTERM)
  141  stdout was closed early (e.g. '| head')
"""
COMMAND_CODES = {
    "run": EXIT_CODES,
    "status": _LEDGER_CODES.format(more="with --wait, tasks still running"),
    "download": _LEDGER_CODES.format(more="videos not on disk yet, or a file in the way that "
                                          "was not replaced"),
    "mock-server": "exit codes:\n  0    stopped by Ctrl-C\n  2    invalid usage, or the "
                   "port is in use\n",
}
#: The most requests in flight -j accepts: far beyond any per-key rate limit, and small
#: enough that the pools it sizes stay a few MB.
MAX_CONCURRENCY = 512


def main(argv: Sequence[str] | None = None) -> int:
    """Run the apimart-batch CLI and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ManifestError as exc:
        from runner.manifest import problem_count

        for d in exc.diagnostics:
            _fail(args, str(d), file=d.file, line=d.line, col=d.col)
        count = problem_count(exc.diagnostics)
        _fail(args, f"{count} problem{'s' if count != 1 else ''} found; nothing was sent")
        return exc.exit_code
    except RunnerError as exc:
        _fail(args, f"apimart-batch: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


def _fail(args: argparse.Namespace, text: str, **fields: object) -> None:
    """Why a command failed, on stderr: as text, or one JSON object with --log-format json."""
    if getattr(args, "log_format", "text") == "json":
        text = json.dumps({"level": "error", "msg": text, **fields}, ensure_ascii=False)
    print(text, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="apimart-batch",
        description="Validate, submit, record, poll and download APIMart video batches\n"
                    "(every model of the catalog: 'apimart-batch models').",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text,
                              epilog=COMMAND_CODES.get(name, _OFFLINE_CODES),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("validate", "Check manifests against the schema; send nothing.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    _add_unknown_model_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout: every problem (file, line, col, "
                        "path, message, hint) and the total, or the valid manifests")
    p.set_defaults(func=cmd_validate)

    p = command("plan", "Show the expanded jobs and an estimated cost; send nothing.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    _add_unknown_model_flag(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_price_flag(p)
    p.add_argument("--ledger", metavar="PATH",
                   help="ledger to compare with (default: beside the manifest)")
    p.add_argument("--mock", action="store_true", help="compare with the --mock ledger")
    _add_retry_failed_flag(p)
    _add_shard_flag(p)
    p.add_argument("--balance", action="store_true",
                   help="also read the account balance (GET /v1/balance; needs the key) and "
                        "compare it with the estimate")
    _add_target_flags(p, mock=False)
    p.set_defaults(func=cmd_plan)

    p = command("schema", "Print the manifest JSON Schema (self-contained), or one model's.")
    p.add_argument("--model", metavar="ID",
                   help="print the request schema of one catalog model instead")
    p.add_argument("--path", action="store_true",
                   help="print where the installed editor schema lives (for a "
                        "'# yaml-language-server: $schema=' line or editor settings)")
    p.set_defaults(func=cmd_schema)

    p = command("models", "List the model catalog: what each model takes, its values, its price.")
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.set_defaults(func=cmd_models)

    p = command("run", "Submit every job not done yet, recording each in the ledger.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST")
    _add_unknown_model_flag(p)
    p.add_argument("--ledger", metavar="PATH",
                   help="ledger CSV (default: <manifest stem>.ledger.csv beside it; "
                        "<stem>.mock.ledger.csv with --mock)")
    p.add_argument("-j", "--concurrency", type=_concurrency, default=8, metavar="N",
                   help="API requests in flight at most: submissions, polls and uploads "
                        "(default 8; --wait downloads get as many again)")
    p.add_argument("--rate", type=_rate, metavar="N/s",
                   help="at most this many requests, e.g. 2/s or 30/min")
    p.add_argument("--max-jobs", type=_positive_int, metavar="N",
                   help="submit at most N new jobs this run")
    p.add_argument("--budget", type=_money, metavar="USD",
                   help="estimated USD this run may spend at most")
    p.add_argument("--fail-on-held", action="store_true",
                   help="exit 1 when --max-jobs or --budget held jobs back (default: exit 0, "
                        "as for a cron trickle)")
    p.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                   help="seconds to wait for one submission's answer (default 60)")
    p.add_argument("--max-attempts", type=_positive_int, default=5, metavar="N",
                   help="tries per job for answers that are safe to retry (default 5)")
    p.add_argument("--retry-ambiguous", action="store_true",
                   help="retry timeouts and 5xx within the run, with the same Idempotency-Key")
    p.add_argument("--resubmit-unknown", action="store_true",
                   help="resend 'unknown' jobs (same Idempotency-Key; may pay twice if the "
                        "server ignores keys)")
    p.add_argument("--resubmit-changed", action="store_true",
                   help="resend jobs whose request changed since they were submitted (a new "
                        "take, once the earlier task's video is safe or lost)")
    _add_retry_failed_flag(p)
    p.add_argument("--halt-after", type=_halt_after, default=HaltAfter(share=0.5),
                   metavar="N|P%",
                   help="stop submitting once N jobs of this run failed or were rejected, or "
                        f"P%% of those sent (after {HALT_SAMPLE}); in-flight work is recorded, "
                        "exit 1 (default 50%%; 'off' never halts)")
    p.add_argument("--no-balance-check", action="store_true",
                   help="do not read the balance before sending (by default a run whose "
                        "estimate exceeds it is refused; a failed lookup only warns)")
    _add_price_flag(p)
    _add_shard_flag(p)
    _add_target_flags(p)
    _add_output_flags(p)
    _add_summary_flags(p)
    p.add_argument("--wait", action="store_true",
                   help="also poll every task to the end and download the videos (to --out)")
    _add_media_flags(p)
    p.set_defaults(func=cmd_run)

    p = command("status", "Poll unfinished tasks of ledgers and record their state.")
    _add_ledgers_argument(p)
    _add_shard_flag(p, ledger=True)
    p.add_argument("--wait", action="store_true", help="keep polling until every task ends")
    p.add_argument("-j", "--concurrency", type=_concurrency, default=8, metavar="N",
                   help="requests in flight at most (default 8)")
    _add_media_flags(p, out=False)
    _add_target_flags(p, mock=False)
    _add_output_flags(p)
    _add_summary_flags(p)
    p.set_defaults(func=cmd_status)

    p = command("download", "Download every completed video of ledgers not yet on disk.")
    _add_ledgers_argument(p)
    _add_shard_flag(p, ledger=True)
    p.add_argument("-j", "--concurrency", type=_concurrency, default=4, metavar="N",
                   help="downloads at once (default 4)")
    _add_media_flags(p, poll=False)
    _add_target_flags(p, mock=False, key_use="optional: asks expired tasks for a fresh link")
    _add_output_flags(p)
    _add_summary_flags(p)
    p.set_defaults(func=cmd_download)

    p = command("report", "Summarise ledgers: one row per job, totals, costs, next steps.")
    _add_ledgers_argument(p)
    p.add_argument("--format", choices=("table", "csv", "json", "html"), default="table",
                   help="a table for people (default), CSV / JSON for programs, or html: a "
                        "self-contained page to review the videos in a browser")
    p.add_argument("--out", metavar="FILE",
                   help="with --format html: where the page goes (an existing folder means "
                        "report.html in it; default: beside the videos, e.g. jobs/videos/"
                        "example/report.html)")
    p.set_defaults(func=cmd_report)

    p = command("mock-server", "Run the APIMart emulator on 127.0.0.1 (for tests and demos).")
    p.add_argument("--port", type=_port, default=8765,
                   help="port on 127.0.0.1 (default 8765; 0 = any free port)")
    emulator.add_arguments(p)
    p.set_defaults(func=cmd_mock_server)
    return parser


def _add_retry_failed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-failed", action="store_true",
                   help="buy again the jobs whose task failed or was cancelled, or whose link "
                        "expired before download: a new take, a new Idempotency-Key")


def _add_shard_flag(p: argparse.ArgumentParser, *, ledger: bool = False) -> None:
    what = ("only the jobs of shard I of N (by a stable hash of the job id) of these ledgers"
            if ledger else
            "only the jobs of shard I of N (by a stable hash of the job id), recorded in "
            "<stem>.shard-I-of-N.ledger.csv; jobs recorded in another ledger of the manifest "
            "are never sent again")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help=f"{what}; auto/N takes I from ${INDEX_VARIABLE} (Kubernetes Indexed "
                        "Jobs)")


def _add_ledgers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledgers", nargs="+", metavar="LEDGER",
                   help="ledger CSV files, or quoted glob patterns ('m.*ledger.csv'): "
                        "one merged view")


def _add_unknown_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unknown-model", action="store_true",
                   help="accept models outside the catalog: check model and prompt only and "
                        "send every other field as written (as 'unknown_models: allow')")


def _add_price_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--price", action="append", default=[], metavar="KEY=USD",
                   help="a per-second price estimate for MODEL/RESOLUTION or a whole MODEL, "
                        "e.g. wan2.7/1080P=0.1 or kling-v3=0.08 (repeatable; 'models' shows "
                        "which prices are unknown)")


def _add_media_flags(p: argparse.ArgumentParser, *, out: bool = True, poll: bool = True) -> None:
    if out:
        p.add_argument("--no-html", action="store_true",
                       help="do not write the review page (report.html beside the videos) at "
                            "the end")
        p.add_argument("--out", metavar="DIR",
                       help="folder for downloaded videos (default: 'videos' beside the ledger)")
    if poll:
        p.add_argument("--interval", type=_positive_float, metavar="S",
                       help="longest pause between two polls of a task (default 30; 2 for "
                            "--mock tasks; the first poll comes 10 s after submission, then the "
                            "pause grows)")
        p.add_argument("--deadline", type=_positive_float, metavar="S",
                       help="end after S seconds: no wait, poll or download goes past it, no "
                            "new job is submitted after it (a POST already sent is answered); "
                            "unfinished tasks stay recorded for a later run")


def _timing(args: argparse.Namespace, *, mock: bool) -> PollTiming:
    from runner.engine import PollTiming

    # The emulator's tasks take seconds, not minutes: poll it briskly.
    interval = args.interval or (2.0 if mock else 30.0)
    deadline = time.monotonic() + args.deadline if args.deadline else None
    return PollTiming(first=min(10.0, interval / 2 if mock else 10.0), interval=interval,
                      deadline=deadline)


def _add_target_flags(
    p: argparse.ArgumentParser, *, mock: bool = True, key_use: str | None = None
) -> None:
    if mock:
        p.add_argument("--mock", action="store_true",
                       help="use the built-in emulator: no API key, nothing real sent or billed")
    p.add_argument("--base-url", metavar="URL",
                   default=os.environ.get("APIMART_BASE_URL", DEFAULT_BASE_URL),
                   help="API base URL (env APIMART_BASE_URL; default %(default)s)")
    p.add_argument("--key-file", metavar="FILE",
                   default=os.environ.get("APIMART_API_KEY_FILE"),
                   help="read the API key from this file (env APIMART_API_KEY_FILE); "
                        "default: env APIMART_API_KEY" + (f"; {key_use}" if key_use else ""))


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="stderr lines as text or JSON objects (default text)")


def _add_summary_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary-json", metavar="PATH",
                   help="also write the summary as JSON (needs_action lists every job to act "
                        "on, with its status and reason)")
    p.add_argument("--healthcheck-url", metavar="URL", type=_http_url,
                   help="ping URL/start at the beginning and URL/<exit code> with the summary "
                        "at the end (healthchecks.io style; never the key; a failed ping only "
                        "warns)")


def _summary_path(args: argparse.Namespace) -> str | None:
    """--summary-json, checked before anything is sent: a summary must have somewhere to go."""
    if args.summary_json and not Path(args.summary_json).absolute().parent.is_dir():
        msg = f"--summary-json {args.summary_json}: the folder does not exist"
        raise UsageError(msg)
    if args.summary_json:
        from runner import report
        from runner.ledger import expand_ledgers, ledger_path

        report.refuse_special_file(Path(args.summary_json), "--summary-json")
        ledgers = (expand_ledgers(args.ledgers) if hasattr(args, "ledgers") else
                   [ledger_path(m, mock=args.mock, override=args.ledger, shard=args.shard)
                    for m in args.manifests])
        report.refuse_ledger(Path(args.summary_json), ledgers, "--summary-json")
    return str(args.summary_json) if args.summary_json else None


def cmd_validate(args: argparse.Namespace) -> int:
    """``validate``: one line per valid file (or JSON); ManifestError otherwise."""
    from runner.manifest import diagnostics_document, load_manifests

    try:
        manifests = load_manifests(args.manifests,
                                   allow_unknown_models=args.allow_unknown_model)
    except ManifestError as exc:
        if not args.json:
            raise
        print(json.dumps(diagnostics_document(exc.diagnostics), indent=2, ensure_ascii=False))
        return exc.exit_code
    if args.json:
        valid = [{"file": m.path, "jobs": len(m.jobs)} for m in manifests]
        print(json.dumps({"total": 0, "problems": [], "manifests": valid}, indent=2,
                         ensure_ascii=False))
        return 0
    for manifest in manifests:
        count = len(manifest.jobs)
        print(f"{manifest.path}: {count} job{'s' if count != 1 else ''} valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``plan``: the expanded jobs, totals and the estimated cost; no network but --balance."""
    from runner import report
    from runner.engine import decide_across
    from runner.ledger import ledger_path, read_latest, recorded_elsewhere
    from runner.manifest import load_manifests, pricing

    manifests = load_manifests(args.manifests, allow_unknown_models=args.allow_unknown_model)
    prices = pricing.merged_prices(manifests, _prices(args.price))
    if args.shard is not None:
        manifests = [replace(m, jobs=tuple(j for j in m.jobs if args.shard.holds(j.job_id)))
                     for m in manifests]
    skipped: dict[str, str] = {}
    takes: dict[str, int] = {}
    for manifest in manifests:
        path = ledger_path(manifest.path, mock=args.mock, override=args.ledger, shard=args.shard)
        latest = read_latest(path) if Path(path).exists() else {}
        elsewhere = recorded_elsewhere(path, latest, mock=args.mock)
        for job in manifest.jobs:
            found = elsewhere.get(job.job_id)
            if found is None and job.job_id not in latest:
                continue
            decision = decide_across(job, latest.get(job.job_id), found,
                                     retry_failed=args.retry_failed)
            if decision.verdict != "submit":
                skipped[job.job_id] = decision.reason
            elif decision.job.take > 1:
                takes[job.job_id] = decision.job.take
    balance = _plan_balance(args) if args.balance else None
    if args.json:
        data = report.plan_document(manifests, prices, skipped, takes=takes)
        if args.balance:
            data["balance"] = balance
        report.write_json(sys.stdout, data)  # job by job: memory stays flat in the jobs
    else:
        print(report.render_plan(manifests, prices, skipped, takes=takes))
        if isinstance(balance, str):
            print(f"Balance: {balance}.")
        elif balance is not None:
            left = balance["remain"]
            print("Balance: unlimited." if left is None else
                  f"Balance: {left:.2f} left (compared as USD with the estimate above).")
    return 0


def _plan_balance(args: argparse.Namespace) -> dict[str, float | None] | str:
    """The balance for ``plan --balance``, or why it could not be read (never an error)."""
    import asyncio

    from runner.console import Console

    console = Console(quiet=True)
    key = _api_key(args, console)
    from runner.api import Client  # aiohttp loads only when a command uses the network

    async def read() -> dict[str, float | None] | str:
        async with Client(_base_url(args.base_url), key, pool=1) as client:
            try:
                found = await client.balance()
            except ApiError as exc:
                return f"not read ({exc.message.splitlines()[0]})"
        return {"remain": found.remain, "used": found.used}

    return asyncio.run(read())


def cmd_schema(args: argparse.Namespace) -> int:
    """``schema``: the manifest schema with the catalog embedded, or one model's schema."""
    from runner.manifest import bundled_schema, load_catalog, schema_dir

    if args.path:
        path = schema_dir() / EDITOR_SCHEMA
        if not path.is_file():
            msg = f"{path}: the editor schema is missing from this installation"
            raise UsageError(msg)
        print(path)
        return 0
    catalog = load_catalog()
    if args.model is None:
        document = bundled_schema(catalog)
    elif args.model in catalog:
        document = dict(catalog[args.model].schema)
    else:
        close = catalog.nearest(args.model)
        listing = "'apimart-batch models' lists them"
        hint = f"did you mean {' or '.join(close)}?" if close else listing
        msg = f"--model {args.model}: not a model of the catalog\n  hint: {hint}"
        raise UsageError(msg)
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: the catalog, one line per model id (or JSON)."""
    from runner.manifest import load_catalog
    from runner.report import models_listing, render_models

    entries = models_listing(load_catalog())
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        print(render_models(entries))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``run``: submit what is not done yet."""
    from runner.console import Console
    from runner.healthcheck import pinged

    console = Console(quiet=args.quiet, json_lines=args.log_format == "json")
    return pinged(args.healthcheck_url, console, lambda keep: _run(args, console, keep))


def _run(args: argparse.Namespace, console: Console, keep: Summary | None) -> int:
    import asyncio

    from runner.app import RunConfig
    from runner.app import run as run_jobs
    from runner.ledger import ledger_path

    config = RunConfig(
        manifests=tuple(args.manifests),
        api_key=None if args.mock else _api_key(args, console),
        ledger=args.ledger,
        concurrency=args.concurrency,
        rate=args.rate,
        max_jobs=args.max_jobs,
        budget=args.budget,
        timeout=args.timeout,
        retry_ambiguous=args.retry_ambiguous,
        resubmit_unknown=args.resubmit_unknown,
        resubmit_changed=args.resubmit_changed,
        retry_failed=args.retry_failed,
        halt_after=args.halt_after,
        check_balance=not args.no_balance_check,
        mock=args.mock,
        base_url=_base_url(args.base_url),
        summary_json=_summary_path(args),
        prices=_prices(args.price),
        allow_unknown_models=args.allow_unknown_model,
        policy=RetryPolicy(attempts=args.max_attempts),
        wait=args.wait,
        out=args.out,
        timing=_timing(args, mock=args.mock),
        fail_on_held=args.fail_on_held,
        on_summary=keep,
        shard=args.shard,
    )
    code = asyncio.run(run_jobs(config, console))
    if args.wait:
        ledgers = {ledger_path(m, mock=args.mock, override=args.ledger) for m in args.manifests}
        _review_page(args, sorted(ledgers), console)
    return code


def _review_page(args: argparse.Namespace, ledgers: Sequence[str], console: Console) -> None:
    """Write or refresh each ledger's review page (``report --format html``) after the media.

    The run is over and recorded by then: a page that cannot be written is a warning.
    """
    if args.no_html:
        return
    from runner import report
    from runner.ledger import family

    # One page per manifest: a shard's page shows every ledger of its family.
    pages: dict[Path, list[str]] = {}
    for ledger in ledgers:
        kin = pages.setdefault(report.default_page(ledger, args.out), [])
        kin += [member for member in family(ledger) or [ledger] if member not in kin]
    for page, kin in pages.items():
        if not kin or not Path(kin[0]).is_file():
            continue
        try:
            page = report.write_html(kin, page)
        except RunnerError as exc:
            console.warn(str(exc))
            continue
        if not console.quiet:
            print(f"review page: {page}")


def _ledger_configs(args: argparse.Namespace, console: Console) -> list[LedgerConfig]:
    """One ``LedgerConfig`` per ledger argument (globs expanded), sharing one key and clock."""
    # A --mock ledger needs no key: its tasks live in the built-in emulator. Downloads need
    # none either (video links are signed URLs, fetched without an Authorization header),
    # but with one, an expired link can be asked for again.
    from runner.engine import LedgerConfig, PollTiming
    from runner.ledger import expand_ledgers, ledger_is_mock

    ledgers = expand_ledgers(args.ledgers)
    mocks = {ledger: ledger_is_mock(ledger) for ledger in ledgers}
    polls = hasattr(args, "interval")
    key = _api_key(args, console, required=polls) if not all(mocks.values()) else None
    timings = {mock: _timing(args, mock=mock) if polls else PollTiming() for mock in (False, True)}
    base = LedgerConfig(
        ledger="",
        base_url=_base_url(args.base_url),
        concurrency=args.concurrency,
        out=getattr(args, "out", "videos"),
        wait=getattr(args, "wait", False),
        select=args.shard.holds if args.shard is not None else None,
    )
    return [replace(base, ledger=ledger, api_key=None if mocks[ledger] else key,
                    timing=timings[mocks[ledger]]) for ledger in ledgers]


def _each_ledger(
    args: argparse.Namespace,
    command: Callable[[LedgerConfig, Console], Coroutine[object, object, int]],
) -> int:
    """Run ``status`` or ``download`` on each ledger in turn; the gravest exit code wins.

    Around them: the --healthcheck-url pings, one --summary-json (each ledger's summary, and
    with several ledgers a merged one) and, after ``download``, each ledger's review page.
    """
    import asyncio

    from runner.console import Console
    from runner.engine import run_download, write_json
    from runner.healthcheck import pinged
    from runner.ledger import read_latest

    console = Console(quiet=args.quiet, json_lines=args.log_format == "json")

    def each(keep: Summary | None) -> int:
        configs = _ledger_configs(args, console)
        documents: list[Mapping[str, object]] = []
        path = _summary_path(args)
        one = len(configs) == 1
        codes = []
        for config in configs:
            config = replace(config, summary_json=path if one else None,
                             on_summary=keep if one else documents.append)
            code = asyncio.run(command(config, console))
            if code in (EXIT_SIGINT, EXIT_SIGTERM):
                return code  # interrupted: the ledgers after this one are left for a rerun
            codes.append(code)
        worst = max(codes, key=_GRAVITY.index)
        if not one:
            needs: list[object] = []
            for document in documents:
                found = document.get("needs_action")
                needs += found if isinstance(found, list) else []
            merged = {"exit_code": worst, "ledgers": documents, "needs_action": needs}
            if path:
                write_json(path, merged, console)
            if keep is not None:
                keep(merged)
        if not one and not args.quiet:
            states = Counter(row.get("status", "") for config in configs
                             for job_id, row in read_latest(config.ledger).items()
                             if config.select is None or config.select(job_id))
            summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
            print(f"{len(configs)} ledgers: {summary or 'no jobs'}")
        if command is run_download:
            _review_page(args, [config.ledger for config in configs], console)
        return worst

    return pinged(args.healthcheck_url, console, each)


#: Exit codes of ``status`` and ``download`` from the least to the most grave.
_GRAVITY = (EXIT_OK, EXIT_JOBS_FAILED, EXIT_API_STOPPED)


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: poll the ledgers' unfinished tasks."""
    from runner.engine import run_status

    return _each_ledger(args, run_status)


def cmd_download(args: argparse.Namespace) -> int:
    """``download``: fetch completed videos."""
    from runner.engine import run_download

    return _each_ledger(args, run_download)


def cmd_report(args: argparse.Namespace) -> int:
    """``report``: the collapsed ledgers (merged into one view) and next steps."""
    from runner import report
    from runner.console import Console
    from runner.ledger import expand_ledgers

    ledgers = expand_ledgers(args.ledgers)
    for ledger in ledgers:
        if not Path(ledger).is_file():
            msg = f"{ledger}: no such ledger"
            raise LedgerError(msg)
    if args.format == "html":
        if args.out and not Path(args.out).absolute().parent.is_dir():
            msg = f"--out {args.out}: the folder does not exist\n  hint: create it first"
            raise UsageError(msg)
        page = report.write_html(ledgers, Path(args.out) if args.out else None,
                                 warn=Console(quiet=True).warn)
        print(page)
        return 0
    if args.out:
        msg = "report: --out goes with --format html (the other formats print to stdout)"
        raise UsageError(msg)
    built = report.build_report(ledgers[0] if len(ledgers) == 1 else ledgers,
                                warn=Console(quiet=True).warn)
    if args.format == "json":  # job by job, not one string of every job
        report.write_json(sys.stdout, report.json_document(built), allow_nan=False)
        return 0
    render = {"table": report.render_table, "csv": report.render_csv}
    print(render[args.format](built))
    return 0


def cmd_mock_server(args: argparse.Namespace) -> int:
    """``mock-server``: serve the emulator until interrupted."""
    import asyncio

    config = emulator.config_from_args(args)

    def ready(url: str) -> None:
        print(f"APIMart emulator listening; use --base-url {url}", flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(emulator.serve_forever(config, port=args.port, on_ready=ready))
    except OSError as exc:
        msg = f"mock-server: cannot listen on 127.0.0.1:{args.port} ({exc.strerror})"
        raise UsageError(msg) from exc
    return 0


def _api_key(args: argparse.Namespace, console: Console, *, required: bool = True) -> Secret:
    """The API key from --key-file or the environment; ``Secret("")`` if none and not required."""
    if args.key_file:
        path = args.key_file
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"{path}: cannot read the key file ({exc.__class__.__name__})"
            raise UsageError(msg) from None
        warning = key_file_warning(path)
        if warning:
            console.warn(warning)
    else:
        key = api_key_from_env() or ""
    if not key and not required and not args.key_file:
        return Secret("")
    if not key and args.key_file:
        msg = (f"{args.key_file}: the key file is empty\n"
               "  hint: put the API key in it, alone on one line")
        raise UsageError(msg)
    if not key:
        hint = ("add --mock to try the whole run against the built-in emulator"
                if args.command == "run" else "only the key can ask APIMart about its tasks")
        msg = f"no API key: set APIMART_API_KEY or pass --key-file FILE\n  hint: {hint}"
        raise UsageError(msg)
    if not (key.isascii() and key.isprintable()) or " " in key:
        where = args.key_file or "APIMART_API_KEY"
        msg = (f"{where}: the API key contains spaces or control characters\n"
               "  hint: the file or variable should hold the key alone, on one line")
        raise UsageError(msg)
    return Secret(key)


def _is_http_url(text: str) -> bool:
    """True for an http(s) URL with a host and, if any, a port from 1 to 65535."""
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        return False
    try:  # urlsplit refuses a broken IPv6 host ('http://[::1'); .port one out of range
        parts = urllib.parse.urlsplit(text)
        return bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def _base_url(url: str) -> str:
    if not _is_http_url(url):
        msg = f"--base-url: '{url}' is not an http(s) URL, e.g. {DEFAULT_BASE_URL}"
        raise UsageError(msg)
    return url.rstrip("/").removesuffix("/v1")


def _http_url(text: str) -> str:
    if not _is_http_url(text):
        msg = f"must be an http(s) URL, e.g. https://hc-ping.com/UUID, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return text


def _prices(values: Sequence[str]) -> dict[str, float]:
    from runner.manifest import pricing

    prices: dict[str, float] = {}
    for value in values:
        prices.update(pricing.parse_price_override(value))
    return prices


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a whole number > 0, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return value


def _concurrency(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_CONCURRENCY:
        msg = f"must be at most {MAX_CONCURRENCY} (requests in flight), got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        msg = f"must be a port number from 0 to 65535, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        msg = f"must be a number > 0, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return value


def _halt_after(text: str) -> HaltAfter | None:
    if text.strip().lower() in ("off", "0", "0%"):
        return None
    share = text.strip().endswith("%")
    number = text.strip().removesuffix("%")
    try:
        value = float(number) if share else int(number)
    except ValueError:
        value = -1
    if not (0 < value <= 100 if share else value > 0):
        msg = f"must be a number of jobs (e.g. 20), a share (e.g. 50%) or 'off', got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return HaltAfter(share=value / 100) if share else HaltAfter(count=int(value))


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _money(text: str) -> float:
    return _positive_float(text.removeprefix("$"))


def _rate(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        msg = f"must be a positive rate like 2/s or 30/min, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    per_minute = (match.group(2) or "s").startswith("m")
    return float(match.group(1)) / (60.0 if per_minute else 1.0)
