"""``report``: the append-only ledger collapsed to one row per job, with what to do next."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from runner.api import DEFAULT_BASE_URL
from runner.engine import REGENERABLE, expires_ts, needs_download
from runner.ledger import COLUMNS, read_latest, write_csv
from runner.report.html import estimate, tags
from runner.report.jsonout import materialized

EXPIRING_WITHIN = 24 * 3600.0
#: The table's fixed columns (name, width); each job's error follows them in full.
_TABLE = (("job_id", 28), ("status", 11), ("task_id", 32), ("progress", 8), ("expires_at", 20),
          ("cost", 7), ("takes", 5))
#: The tags column, shown when some job has ``metadata`` tags.
_TAGS = ("tags", 24)
#: The fewest columns the error may have beside the others; with fewer it goes below the row.
_MIN_ERROR_WIDTH = 30
_ERROR_BELOW = "    error: "
#: Columns the report always carries, also for a ledger written before they existed.
_ADDED_COLUMNS = ("take", "file_sha256", "metadata")
#: Ledger columns holding numbers: JSON gives them as numbers (a cell that is not one stays text).
_NUMERIC = frozenset({"attempts", "http_status", "duration", "progress", "cost", "bytes", "take"})
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?([eE][-+]?[0-9]{1,3})?")


@dataclass(frozen=True, slots=True)
class Report:
    """The collapsed ledger (or ledgers, merged) and what it means.

    ``ledger`` is the one ledger read, or None when ``ledgers`` holds several.
    """

    ledger: str | None
    rows: Sequence[Mapping[str, str]]
    totals: Mapping[str, int]
    estimated_usd: float
    reported_usd: float
    expiring: Sequence[str]
    next_steps: Sequence[str]
    unpriced: int = 0
    ledgers: Sequence[str] = ()


def build_report(
    ledger: str | Sequence[str], *, now: float | None = None,
    warn: Callable[[str], None] | None = None,
) -> Report:
    """Read ``ledger`` (or several, merged; without locking them) and summarise it.

    Merged, a job (a job id of a manifest) is its newest row in any of the ledgers, as a
    run of another shard count sees it; the next steps are given per ledger. ``warn``
    receives the ledgers' harmless oddities (hand edits that change no decision).
    """
    now = time.time() if now is None else now
    if not isinstance(ledger, str) and len(ledger) == 1:
        ledger = ledger[0]
    if isinstance(ledger, str):
        return _report(ledger, list(read_latest(ledger, warn).values()), now)
    newest: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for path in ledger:
        for job_id, row in read_latest(path, warn).items():
            key = (row.get("manifest", ""), job_id)
            if key not in newest or row.get("time", "") > newest[key][1].get("time", ""):
                newest[key] = (path, row)
    rows = [row for _, row in newest.values()]
    merged = _report(None, rows, now, ledgers=ledger)
    steps = []
    for path in ledger:
        mine = [row for where, row in newest.values() if where == path]
        mine_totals = Counter(row.get("status", "") for row in mine)
        steps += [f"{path}: {step}" for step in _next_steps(path, mine, mine_totals, now)]
    return replace(merged, next_steps=steps)


def _report(ledger: str | None, rows: list[dict[str, str]], now: float, *,
            ledgers: Sequence[str] = ()) -> Report:
    totals = Counter(row.get("status", "") for row in rows)
    estimates = [estimate(row) for row in rows if row.get("task_id")]
    estimated = sum(cost for cost in estimates if cost is not None)
    unpriced = sum(1 for cost in estimates if cost is None)
    reported = sum(_float(row.get("cost", "")) for row in rows)
    expiring = [row["job_id"] for row in rows if row.get("status") == "completed"
                and (exp := expires_ts(row)) is not None and now < exp <= now + EXPIRING_WITHIN]
    steps = _next_steps(ledger, rows, totals, now) if ledger is not None else []
    return Report(ledger, rows, dict(totals), estimated, reported, expiring, steps, unpriced,
                  ledgers=(ledger,) if ledger is not None else tuple(ledgers))


def _next_steps(
    ledger: str, rows: Sequence[Mapping[str, str]], totals: Mapping[str, int], now: float
) -> list[str]:
    from runner.engine import rerun_command  # its module loads the network code

    steps = []
    mock = any(row.get("mock") == "1" for row in rows)
    url = _target_url(rows)
    own_api = mock or url.rstrip("/") == DEFAULT_BASE_URL
    target = "" if own_api else " --base-url " + shlex.quote(url)
    manifests = sorted({row.get("manifest", "") for row in rows if row.get("manifest")})
    run = rerun_command(manifests, ledger=ledger, mock=mock, base_url=url)
    media = shlex.quote(ledger) + target
    unknown = totals.get("unknown", 0) + totals.get("submitting", 0)
    if unknown:
        steps.append(f"{unknown} unknown (may be billed): check the APIMart dashboard, "
                     f"then: {run} --resubmit-unknown")
    if totals.get("error"):
        steps.append(f"{totals['error']} not created (error): {run}")
    if totals.get("rejected"):
        steps.append(f"{totals['rejected']} rejected: fix those jobs in {' '.join(manifests)} "
                     f"(see the error column), then: {run}")
    running = sum(totals.get(s, 0) for s in ("submitted", "pending", "processing"))
    if running:
        steps.append(f"{running} still running: apimart-batch status {media} --wait")
    expired = [r for r in rows if r.get("status") == "completed"
               and (exp := expires_ts(r)) is not None and exp <= now]
    fetchable = totals.get("completed", 0) - len(expired)
    if fetchable > 0:
        steps.append(f"{fetchable} completed, not downloaded: apimart-batch download {media}")
    missing = sum(1 for r in rows if r.get("status") == "downloaded" and needs_download(r))
    if missing:
        steps.append(f"{missing} downloaded files missing or damaged: "
                     f"apimart-batch download {media}")
    if expired:
        steps.append(f"{len(expired)} links past expires_at, not downloaded: 'download' asks "
                     f"each task for a fresh link (needs the key): apimart-batch download {media}")
    ended = sum(totals.get(status, 0) for status in REGENERABLE)
    if ended:
        steps.append(f"{ended} failed, cancelled or expired (no video; APIMart refunds failed "
                     f"tasks): to buy them again, a new take each: {run} --retry-failed")
    if totals.get("not_found"):
        steps.append(f"{totals['not_found']} not found by the API: check --base-url and the "
                     "key are the ones that created them (the tasks may still exist)")
    return steps


def _target_url(rows: Sequence[Mapping[str, str]]) -> str:
    """The API the ledger's tasks live on: its last row's ``base_url`` (default: APIMart)."""
    urls = [row["base_url"] for row in rows if row.get("base_url")]
    return urls[-1] if urls else DEFAULT_BASE_URL


def _float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _take(row: Mapping[str, str]) -> int:
    """The row's ``take`` (its job id's purchases so far); an empty or missing cell is 1."""
    text = row.get("take", "")
    return int(text) if _INTEGER.fullmatch(text) and int(text) >= 1 else 1


def render_table(report: Report, *, width: int | None = None) -> str:
    """A human table, totals, costs, expiring links and next steps.

    Each job's error is shown in full, wrapped to ``width`` (default: the terminal's):
    beside the other columns when there is room, else on lines of its own below the row.
    When some job has ``metadata`` tags, a ``tags`` column shows them as ``key=value``.
    """
    width = shutil.get_terminal_size().columns if width is None else width
    table = (*_TABLE, _TAGS) if any(tags(row) for row in report.rows) else _TABLE
    fixed = sum(w for _, w in table) + 2 * len(table)
    beside = width - fixed >= _MIN_ERROR_WIDTH
    header = "  ".join(name.ljust(w) for name, w in table) + ("  error" if beside else "")
    lines = [header.rstrip()]
    for row in report.rows:
        cells = []
        for name, w in table:
            value = _cell_text(row, name)
            cells.append((value[: w - 1] + "…" if len(value) > w else value).ljust(w))
        head = "  ".join(cells)
        error = _one_line(row.get("error", ""))
        if not error:
            lines.append(head.rstrip())
        elif beside:
            wrapped = textwrap.wrap(error, width - fixed, break_on_hyphens=False) or [""]
            lines.append(head + "  " + wrapped[0])
            lines += [" " * fixed + part for part in wrapped[1:]]
        else:
            lines.append(head.rstrip())
            lines += textwrap.wrap(error, max(width, 40), initial_indent=_ERROR_BELOW,
                                   subsequent_indent=" " * len(_ERROR_BELOW),
                                   break_on_hyphens=False)
    totals = ", ".join(f"{n} {s}" for s, n in sorted(report.totals.items()))
    lines += ["", f"{len(report.rows)} jobs: {totals or 'none'}",
              f"cost: estimated ${report.estimated_usd:.2f} (an estimate from the price table)"
              + (f" + {report.unpriced} jobs of unknown price" if report.unpriced else "")
              + f", reported by APIMart ${report.reported_usd:.2f}"]
    if report.expiring:
        lines.append(f"links expiring within 24 h: {', '.join(report.expiring)}")
    lines += [f"next: {step}" for step in report.next_steps]
    return "\n".join(lines)


def _cell_text(row: Mapping[str, str], name: str) -> str:
    """What the table shows in column ``name`` of ``row``."""
    if name == "takes":
        return str(_take(row))
    if name == "tags":
        return _one_line(", ".join(f"{key}={value}" for key, value in tags(row).items()))
    return _one_line(row.get(name, ""))


def _one_line(text: str) -> str:
    """``text`` on one line, fit for a terminal: whitespace runs as one space, controls escaped."""
    text = " ".join(text.split())
    return text if text.isprintable() else "".join(
        ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text
    )


def render_json(report: Report) -> str:
    """The report as one JSON document.

    Each job is its ledger row, typed: numeric columns (cost, bytes, duration, attempts,
    http_status, progress, take) as numbers, ``mock`` as true or false, ``metadata`` as an
    object of the job's tags (``{}`` without tags), an empty cell as null, every other cell
    as text (a job id of digits stays text). ``take`` is always there (1 when the ledger has
    no such cell).
    """
    return json.dumps(materialized(json_document(report)), indent=2, ensure_ascii=False,
                      allow_nan=False)


def json_document(report: Report) -> dict[str, Any]:
    """:func:`render_json` for :func:`~runner.report.write_json`: the jobs one at a time."""
    return {
        "ledger": report.ledger, "ledgers": list(report.ledgers),
        "jobs": (_typed(row) for row in report.rows),
        "totals": report.totals,
        "estimated_usd": round(report.estimated_usd, 2),
        "unpriced_jobs": report.unpriced,
        "reported_usd": round(report.reported_usd, 2),
        "expiring_within_24h": list(report.expiring), "next": list(report.next_steps),
    }


def _typed(row: Mapping[str, str]) -> dict[str, object]:
    """A ledger row as JSON values (see :func:`render_json`)."""
    typed = {name: _json_value(name, text) for name, text in _with_added(row).items()}
    typed["take"] = _take(row)
    typed["metadata"] = tags(row)
    return typed


def _json_value(name: str, text: str) -> object:
    if not text:
        return None
    if name == "mock" and text in ("0", "1"):
        return text == "1"
    if name in _NUMERIC:
        if _INTEGER.fullmatch(text):
            return int(text)
        if _DECIMAL.fullmatch(text) and math.isfinite(number := float(text)):
            return number
    return text


def _with_added(row: Mapping[str, str]) -> dict[str, str]:
    """``row`` with every column of :data:`_ADDED_COLUMNS` (empty where the ledger had none)."""
    return dict(row) | {name: row.get(name, "") for name in _ADDED_COLUMNS}


def _csv_columns() -> list[str]:
    """The ledger's columns, with :data:`_ADDED_COLUMNS` before ``crc`` if it lacks them."""
    names = [name for name in COLUMNS if name != "crc"]
    names += [name for name in _ADDED_COLUMNS if name not in names]
    return [*names, "crc"]


def render_csv(report: Report) -> str:
    """One CSV row per job: the latest state, in ledger columns (``take`` 1 when empty)."""
    rows = [_with_added(row) | {"take": str(_take(row))} for row in report.rows]
    return write_csv(rows, _csv_columns())
