"""What a run would do, without the network: the expanded jobs, totals and estimated cost."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from runner.manifest import (
    COMMON_FIELDS,
    Catalog,
    Manifest,
    built_in_labels,
    built_in_prices,
    estimate,
    rate_and_key,
    valid_resolutions,
)
from runner.models import Job
from runner.report.jsonout import Later, materialized

_NO_SKIPS: Mapping[str, str] = {}
_PROMPT_WIDTH = 48
_IMAGE_WIDTH = 20
_ID_WIDTH = 36
_ACTION_WIDTH = 36
_NO_TAKES: Mapping[str, int] = {}
#: What every cost figure is, said wherever one is shown.
NOTE = "an estimate, not a quote: APIMart publishes no price table and bills per second"


def render_plan(
    manifests: Sequence[Manifest],
    prices: Mapping[str, float | None],
    skipped: Mapping[str, str] = _NO_SKIPS,
    *,
    takes: Mapping[str, int] = _NO_TAKES,
) -> str:
    """A human table of every job, totals per model and the estimated cost.

    Args:
        manifests: loaded manifests, in the order given.
        prices: USD per second by price key (``pricing.merged_prices``).
        skipped: job_id -> why a run would not send it (from the ledger).
        takes: job_id -> the take a run would buy, for jobs bought again (2, 3, ...).
    """
    jobs = [job for manifest in manifests for job in manifest.jobs]
    counts = f"{_count(len(manifests), 'manifest')}, {_count(len(jobs), 'job')}"
    lines = [f"Plan (nothing is sent): {counts}"]
    for manifest in manifests:
        lines += ["", f"{manifest.path} ({manifest.name}): {_count(len(manifest.jobs), 'job')}"]
        lines += _table(manifest.jobs, skipped, takes)
    document = plan_document(manifests, prices, skipped, takes=takes)
    for _ in document["jobs"]:  # the totals, without a list of every job's JSON
        pass
    data = materialized(document)
    totals = data["totals"]
    lines += ["", "Totals (jobs to send)"]
    rows = [["MODEL", "JOBS", "SECONDS", "EST. USD"]]
    for model, row in totals["by_model"].items():
        rows.append([model, str(row["jobs"]), str(row["seconds"]), _usd(row)])
    rows.append(["all", str(totals["jobs"]), str(totals["seconds"]), _usd(totals)])
    lines += _columns(rows, right={1, 2, 3})
    if totals["skipped"]:
        lines.append(f"  {_count(totals['skipped'], 'job')} skipped (see ACTION)")
    if totals["bought_again"]:
        lines.append(f"  {_count(totals['bought_again'], 'job')} bought again: a new purchase "
                     "each (--retry-failed)")
    lines += ["", f"Estimated cost: ${_usd(totals)} ({NOTE})."]
    if totals["unpriced"]:
        lines.append(
            f"{_count(totals['unpriced'], 'job')} with no known price "
            f"({', '.join(data['unpriced'])}) are not in that figure: "
            "give a price with --price KEY=USD or a 'prices:' block."
        )
    used = ", ".join(
        f"{key} {price['usd_per_second']:g} ({price['source']})"
        for key, price in data["prices"].items()
        if price["usd_per_second"] is not None
    )
    if used:
        lines.append(f"Prices used, USD per second: {used}.")
    lines.append("Override these prices with --price MODEL/RESOLUTION=USD or a 'prices:' block.")
    lines.append("* = the API's default (the field is left out of the request).")
    if any(not job.catalogued for job in jobs):
        lines.append("! = a model outside the catalog: sent as written; model and prompt checked.")
    return "\n".join(lines)


def _usd(row: Mapping[str, Any]) -> str:
    """A money cell: the known part, with '+ ?' when some jobs have no known price."""
    known = f"{row['estimated_usd']:.2f}"
    if not row.get("unpriced"):
        return known
    return f"{known} + ?" if row["jobs"] > row["unpriced"] else "unknown"


def plan_json(
    manifests: Sequence[Manifest],
    prices: Mapping[str, float | None],
    skipped: Mapping[str, str] = _NO_SKIPS,
    *,
    takes: Mapping[str, int] = _NO_TAKES,
) -> dict[str, Any]:
    """The plan as plain data with stable keys (for ``plan --json``).

    A job whose price is unknown has ``estimated_usd: null`` and counts in ``unpriced``;
    the totals' ``estimated_usd`` is then the known part only.
    """
    return materialized(plan_document(manifests, prices, skipped, takes=takes))


def plan_document(
    manifests: Sequence[Manifest],
    prices: Mapping[str, float | None],
    skipped: Mapping[str, str] = _NO_SKIPS,
    *,
    takes: Mapping[str, int] = _NO_TAKES,
) -> dict[str, Any]:
    """:func:`plan_json` for :func:`~runner.report.write_json`: the jobs as an iterator and
    the totals computed once they have been written, so no list of jobs is built."""
    by_model: dict[str, dict[str, Any]] = {}
    used: dict[str, dict[str, Any]] = {}
    unpriced: dict[str, None] = {}
    skips = [0]

    def jobs() -> Iterator[dict[str, Any]]:
        for job in (job for manifest in manifests for job in manifest.jobs):
            usd_per_second, key = rate_and_key(job, prices)
            cost = estimate(job, prices)
            skip = skipped.get(job.job_id)
            yield _job_json(job, cost, key, skip) | {"take": takes.get(job.job_id, 1)}
            if skip is not None:
                skips[0] += 1
                continue
            used[key] = {"usd_per_second": usd_per_second, "source": _source(prices, key)}
            row = by_model.setdefault(
                job.model, {"jobs": 0, "seconds": 0, "estimated_usd": 0.0, "unpriced": 0}
            )
            row["jobs"] += 1
            row["seconds"] += job.seconds or 0
            if cost is None:
                row["unpriced"] += 1
                unpriced[key] = None
            else:
                row["estimated_usd"] = round(row["estimated_usd"] + cost, 6)

    def totals() -> dict[str, Any]:
        return {
            "jobs": sum(row["jobs"] for row in by_model.values()),
            "bought_again": len(takes),
            "skipped": skips[0],
            "seconds": sum(row["seconds"] for row in by_model.values()),
            "estimated_usd": round(sum(row["estimated_usd"] for row in by_model.values()), 6),
            "unpriced": sum(row["unpriced"] for row in by_model.values()),
            "by_model": dict(sorted(by_model.items())),
        }

    return {
        "estimate": True,
        "currency": "USD",
        "note": NOTE,
        "manifests": [
            {"path": m.path, "name": m.name, "jobs": len(m.jobs), "prices": dict(m.prices)}
            for m in manifests
        ],
        "jobs": jobs(),
        "totals": Later(totals),
        "prices": Later(lambda: dict(sorted(used.items()))),
        "unpriced": Later(lambda: list(unpriced)),
    }


def _source(prices: Mapping[str, float | None], key: str) -> str:
    """Where a price came from: a PriceTable knows; else it is built-in, given or unknown."""
    sources: Mapping[str, str] = getattr(prices, "sources", {})
    if key in sources:
        return sources[key]
    if key in prices and prices[key] != built_in_prices().get(key):
        return "given"
    return built_in_labels().get(key, "unknown")


def _job_json(job: Job, cost: float | None, key: str, skip: str | None) -> dict[str, Any]:
    """A job as the plan shows it: its request, resolved defaults, identity, cost, skip."""
    return {
        "job_id": job.job_id,
        "model": job.model,
        "prompt": job.prompt,
        "request": dict(job.request),
        "duration": job.duration,
        "resolution": job.resolution,
        "aspect_ratio": job.aspect_ratio,
        "resolved": {name: job.resolved(name) for name in COMMON_FIELDS},
        "image_url": job.image_url,
        "image_file": job.image_file,
        "image_sha256": job.image_sha256,
        "uploads": [
            {"field": ".".join(map(str, u.pointer)), "file": u.file, "sha256": u.sha256}
            for u in job.uploads
        ],
        "manifest": job.manifest,
        "manifest_name": job.manifest_name,
        "line": job.line,
        "catalogued": job.catalogued,
        "metadata": dict(job.metadata),
        "seconds": job.seconds,
        "fingerprint": job.fingerprint,
        "price_key": key,
        "estimated_usd": None if cost is None else round(cost, 6),
        "skip": skip,
    }


def _table(
    jobs: Sequence[Job], skipped: Mapping[str, str], takes: Mapping[str, int]
) -> list[str]:
    """One row per job; an ACTION column ("run" / "skip: why" / "buy take N") when needed."""
    acting = bool(skipped or takes)
    head = ["ACTION"] if acting else []
    head += ["ID", "MODEL", "SECS", "RES", "ASPECT", "IMAGE", "PROMPT"]
    rows = [head]
    for job in jobs:
        reason = skipped.get(job.job_id)
        # The cell keeps the reason's first clause; --json carries the whole of it.
        short = reason.split(" (")[0].split(";")[0] if reason else ""
        take = takes.get(job.job_id)
        what = f"skip: {short}" if reason else f"buy take {take}" if take else "run"
        action = [_fit(what, _ACTION_WIDTH)] if acting else []
        rows.append([
            *action,
            _fit(job.job_id, _ID_WIDTH),
            job.model if job.catalogued else f"{job.model}!",
            _cell(job, "duration"),
            _cell(job, "resolution"),
            _cell(job, "aspect_ratio"),
            _fit(_image(job), _IMAGE_WIDTH),
            _fit(" ".join(job.prompt.split()), _PROMPT_WIDTH),
        ])  # fmt: skip
    return _columns(rows, right={head.index("SECS")})


def _cell(job: Job, name: str) -> str:
    """A common field: as written, the API's default with '*', or '-' when it has none."""
    written = job.written(name)
    if written is not None:
        return str(written)
    resolved = job.resolved(name)
    return "-" if resolved is None else f"{resolved}*"


def _image(job: Job) -> str:
    count = len(job.uploads)
    more = f" +{count - 1}" if count > 1 else ""
    if job.image_file:
        return "file:" + job.image_file.replace("\\", "/").rsplit("/", 1)[-1] + more
    if job.image_url:
        return "url:" + job.image_url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return "-"


def models_listing(catalog: Catalog) -> list[dict[str, Any]]:
    """Every catalog model as plain data (what ``models --json`` prints)."""
    entries = []
    built_in = built_in_prices()
    for model, spec in catalog.items():
        resolution = spec.fields.get("resolution")
        duration = spec.schema.get("properties", {}).get(spec.fields.get("duration", ""), {})
        prices = {key: usd for key, usd in built_in.items()
                  if key == model or key.startswith(model + "/")}
        entries.append({
            "id": model,
            "family": spec.family,
            "title": spec.title,
            "takes": list(spec.takes),
            "durations": list(duration.get("enum", [])),
            "duration_range": [duration["minimum"], duration["maximum"]]
            if {"minimum", "maximum"} <= set(duration) else None,
            "default_duration": spec.defaults.get(spec.fields.get("duration", "")),
            "resolution_field": resolution,
            "resolutions": valid_resolutions(spec),
            "default_resolution": spec.defaults.get(resolution) if resolution else None,
            "aspect_field": spec.fields.get("aspect_ratio"),
            "usd_per_second": prices,
            "response": spec.response,
            "source": spec.source,
            "read": spec.read,
            "schema": spec.file,
        })  # fmt: skip
    return entries


def render_models(entries: Sequence[Mapping[str, Any]]) -> str:
    """The catalog as a table for people."""
    rows = [["MODEL", "TAKES", "SECONDS", "RESOLUTIONS (DEFAULT)", "USD/S", "READ"]]
    for entry in entries:
        span = entry["duration_range"]
        seconds = f"{span[0]}-{span[1]}" if span else ",".join(map(str, entry["durations"])) or "-"
        default = entry["default_resolution"]
        resolutions = "/".join(entry["resolutions"]) + (f" ({default})" if default else "")
        prices = [usd for usd in entry["usd_per_second"].values() if usd is not None]
        usd = "unknown" if not prices else (
            f"{min(prices):g}" if min(prices) == max(prices) else f"{min(prices):g}-{max(prices):g}"
        )
        rows.append([entry["id"], ",".join(entry["takes"]), seconds, resolutions or "-",
                     usd, entry["read"]])
    lines = _columns(rows, right=set())
    lines.append("")
    lines.append("Field names differ by model: 'apimart-batch schema --model ID' prints one's "
                 "schema. USD/S: the built-in estimate (see 'plan'), 'unknown' where no price "
                 "is known.")
    return "\n".join(lines)


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows as aligned text; widths count wide (e.g. Hangul) characters as two columns."""
    widths = [max(_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - _width(cell))
            cells.append(pad + cell if i in right else cell + pad)
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def _width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Cf", "Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` display columns, ending in '…' when cut."""
    if _width(text) <= width:
        return text
    out, used = "", 0
    for char in text:
        if used + _char_width(char) > width - 1:
            break
        out += char
        used += _char_width(char)
    return out + "…"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
