"""``report --format html``: one self-contained page to review a batch by looking at it.

One card per job of one or more ledgers (a job in two ledgers of one manifest's family is
one card, its newest row, as in ``report``; in ledgers of two families, two): the video,
linked by a path relative to the page so the folder can be zipped and shared; the job's
model and request, status, take, reported and estimated cost, task id, full prompt and
``metadata`` tags; for a job with no video, its state, the reason and the command that
moves it forward. Totals sit at the top, and a "compare" view puts the videos of one
prompt text side by side (its takes, and its matrix variants over models or images).

The page needs no server and loads nothing from outside. It never links APIMart: its
links expire in 24 to 72 hours, so only local files are named (``video_url`` and
``thumbnail_url`` are never used, and a URL inside a request shows as its file name). A
poster is used only where an image of the video's stem lies beside it. Every text is
HTML-escaped, and a Content-Security-Policy meta tag allows the page's own inline style
and script (by their SHA-256) and media and images from the page's own origin, nothing
else: no other script, no frame, no fetch. In Chromium, ``'self'`` of a ``file:`` page
matches other ``file:`` URLs, so the local videos play and the policy holds from a web
server as well.

The script (a few lines, no framework) reads its filter state from the URL fragment,
``report.html#status=failed&model=sora-2&tag=sku%3DA1&q=fox&view=compare``, and writes it
back as the filters change, so a filtered view can be shared as a link. Videos are lazy:
no ``<video>`` has a ``src`` until its card comes near the viewport, so a page of 5,000
cards fetches a screenful.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import os
import re
import shlex
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from runner.api import DEFAULT_BASE_URL
from runner.engine import expires_ts, video_folder
from runner.errors import UsageError
from runner.ledger import iter_rows
from runner.manifest import load_catalog, pricing
from runner.models import Job
from runner.shard import family_base

PAGE_NAME: Final = "report.html"
#: What ``default_page`` strips from a ledger's file name to find its manifest's stem.
_LEDGER_SUFFIX: Final = re.compile(r"(\.shard-\d+-of-\d+|\.mock)*(\.ledger)?\.csv$")
#: The order statuses are listed in: from done to stuck.
_STATUS_ORDER: Final = (
    "downloaded", "completed", "processing", "pending", "submitted", "submitting",
    "unknown", "error", "rejected", "failed", "cancelled", "expired", "not_found",
)  # fmt: skip
_THUMBNAILS: Final = (".jpg", ".jpeg", ".png", ".webp")
#: A prompt longer than this (or of more lines) is folded into a <details>.
_LONG_PROMPT: Final = 280
_LONG_LINES: Final = 4
_PREVIEW: Final = 160
#: A request value shown longer than this is cut (a data: URI, a long list).
_LONG_VALUE: Final = 200
#: Common fields the card shows from their ledger columns (resolved), not from the request.
_COLUMN_FIELDS: Final = ("duration", "resolution", "aspect_ratio")
#: Fields named on a compare item when they differ within its prompt's group.
_VARIANT_FIELDS: Final = ("model", "duration", "resolution", "aspect_ratio", "image", "take",
                          "ledger")

_STYLE: Final = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:#1d2125;background:#f3f4f6}
header,form,main{padding:8px 16px}
h1{font-size:20px;margin:8px 0}
h2{font-size:15px;margin:4px 0;overflow-wrap:anywhere}
[hidden]{display:none!important}
.totals a{display:inline-block;margin:2px 6px 2px 0;padding:1px 8px;border-radius:10px;
background:#e2e5e9;color:inherit;text-decoration:none}
.totals b{font-weight:600}
form{position:sticky;top:0;z-index:1;background:#f3f4f6ee;border-bottom:1px solid #d0d4d9;
display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card,.item{background:#fff;border:1px solid #d0d4d9;border-radius:6px;padding:8px;
content-visibility:auto;contain-intrinsic-size:auto 520px;overflow-wrap:anywhere}
.media{background:#111;border-radius:4px;min-height:120px;display:flex;
align-items:center;justify-content:center;color:#eee;flex-direction:column;padding:4px}
video{width:100%;max-height:260px;background:#000}
.none{background:#fbeaea;color:#1d2125;align-items:stretch;justify-content:flex-start}
.broken::after{content:"cannot play this file";color:#f88}
.state{font-weight:600}
code{display:block;white-space:pre-wrap;background:#f6f7f8;padding:4px;margin-top:4px;
font-size:12px;user-select:all}
.none code{background:#fff}
dl{display:grid;grid-template-columns:auto 1fr;gap:0 8px;margin:6px 0;font-size:12px}
dt{color:#5b636b}dd{margin:0}
.s{padding:0 6px;border-radius:8px;background:#e2e5e9}
.s-downloaded{background:#d3f2d9}.s-failed,.s-cancelled,.s-expired,.s-not_found,.s-rejected,
.s-error{background:#f8d3d3}.s-unknown,.s-submitting{background:#fde9b8}
.prompt-text{white-space:pre-wrap;unicode-bidi:plaintext;margin:4px 0}
bdi,.tags li{unicode-bidi:isolate}
.tags{list-style:none;padding:0;margin:4px 0;display:flex;flex-wrap:wrap;gap:4px}
.tags li{background:#e6eefc;border-radius:8px;padding:0 6px;font-size:12px}
.still{max-width:72px;max-height:72px;margin-right:4px}
.group{background:#fff;border:1px solid #d0d4d9;border-radius:6px;padding:8px;margin:0 0 12px}
.row{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(260px,1fr);gap:8px;
overflow-x:auto}
figcaption{font-size:12px}
"""

_SCRIPT: Final = """
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var keys = ["status", "model", "tag", "q", "view"];
  var grid = $("grid"), compare = $("compare"), shown = $("shown");
  var items = Array.prototype.map.call(document.querySelectorAll("[data-status]"),
    function (el) {
      var text = (el.closest(".group") || el).querySelector(".prompt-text");
      return {el: el, card: el.classList.contains("card"), s: el.dataset.status,
              m: el.dataset.model, t: JSON.parse(el.dataset.tags || "[]"),
              p: text ? text.textContent.toLowerCase() : ""};
    });
  var groups = document.querySelectorAll(".group");
  function load(box) {
    box.querySelectorAll("[data-src]").forEach(function (el) {
      if (el.tagName === "VIDEO") {
        el.addEventListener("loadedmetadata", function () { el.dataset.state = "ready"; });
        el.addEventListener("error", function () {
          el.dataset.state = "error"; el.parentNode.classList.add("broken");
        });
        if (el.dataset.poster) { el.poster = el.dataset.poster; }
        el.preload = "metadata";
      }
      el.src = el.dataset.src;
    });
  }
  function take(it) {
    if (!it.done) { it.done = true; if (io) { io.unobserve(it.el); } load(it.el); }
  }
  var io = window.IntersectionObserver ? new IntersectionObserver(function (seen) {
    seen.forEach(function (e) { if (e.isIntersecting) { take(e.target.item); } });
  }, {rootMargin: "400px"}) : null;
  items.forEach(function (it) { it.el.item = it; if (io) { io.observe(it.el); } });
  if (!io) { window.addEventListener("scroll", function () { sweep(); }, {passive: true}); }
  // The observer reports only at the next frame; what is on screen now loads at once.
  function sweep() {
    var h = window.innerHeight + 400;
    items.filter(function (it) {
      if (it.done || it.el.hidden) { return false; }
      var r = it.el.getBoundingClientRect();
      return r.width > 0 && r.bottom > -400 && r.top < h;
    }).forEach(take);
  }
  function state() {
    var p = new URLSearchParams(location.hash.slice(1)), s = {};
    keys.forEach(function (k) { s[k] = p.get(k) || ""; });
    return s;
  }
  function apply(s) {
    var q = s.q.toLowerCase(), n = 0, cards = 0, g = 0;
    items.forEach(function (it) {
      var ok = (!s.status || it.s === s.status) && (!s.model || it.m === s.model) &&
        (!s.tag || it.t.indexOf(s.tag) >= 0) && (!q || it.p.indexOf(q) >= 0);
      it.el.hidden = !ok;
      if (it.card) { cards++; if (ok) { n++; } }
    });
    groups.forEach(function (group) {
      group.hidden = !group.querySelector(".item:not([hidden])");
      if (!group.hidden) { g++; }
    });
    grid.hidden = s.view === "compare";
    compare.hidden = !grid.hidden;
    shown.textContent = grid.hidden ? g + " of " + groups.length + " prompts shown"
      : n + " of " + cards + " jobs shown";
    keys.forEach(function (k) { if ($("f-" + k).value !== s[k]) { $("f-" + k).value = s[k]; } });
    sweep();
  }
  function changed() {
    var p = new URLSearchParams();
    keys.forEach(function (k) { if ($("f-" + k).value) { p.set(k, $("f-" + k).value); } });
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* file: quirks */ }
    var s = {};
    keys.forEach(function (k) { s[k] = $("f-" + k).value; });
    apply(s);
  }
  $("filters").addEventListener("input", changed);
  $("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  window.addEventListener("hashchange", function () { apply(state()); });
  apply(state());
  document.documentElement.dataset.ready = "1";
}());
"""


def _digest(block: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


#: Only the page's own blocks run or style; media and images only from the page's origin.
CSP: Final = "; ".join((
    "default-src 'none'", f"script-src {_digest(_SCRIPT)}", f"style-src {_digest(_STYLE)}",
    "img-src 'self'", "media-src 'self'", "base-uri 'none'", "form-action 'none'",
))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Entry:
    """One job of one ledger: its latest row, and the rows of its earlier takes on disk."""

    ledger: str
    row: Mapping[str, str]
    earlier: tuple[Mapping[str, str], ...] = ()


def read_entries(ledgers: Iterable[str], warn: Callable[[str], None] | None = None
                 ) -> list[Entry]:
    """Every job of every ledger, in ledger order, read without locking.

    Ledgers of one manifest's family (the unsharded one and its shards) are one view, as
    in ``report``: a job recorded in several (it moved when N changed) is one card, its
    newest row. A job id in ledgers of different families is a card for each.

    ``warn`` receives the ledgers' harmless oddities (hand edits that change no decision).

    ``earlier`` holds the last ``downloaded`` row of each earlier take of the job (an
    earlier purchase whose video was downloaded), by take.
    """
    latest: dict[tuple[Path, str], tuple[str, Mapping[str, str]]] = {}
    takes: dict[tuple[Path, str], dict[int, Mapping[str, str]]] = {}
    for ledger in ledgers:
        kin = Path(family_base(ledger)).resolve()
        for row in iter_rows(ledger, warn):
            key = (kin, row["job_id"])
            if key not in latest or latest[key][0] == ledger or \
                    row.get("time", "") >= latest[key][1].get("time", ""):
                latest[key] = (ledger, row)
            if row.get("status") == "downloaded":
                takes.setdefault(key, {})[_take(row)] = row
    entries = []
    for key, (ledger, last) in latest.items():
        kept = takes.get(key, {})
        earlier = tuple(kept[n] for n in sorted(kept) if n != _take(last))
        entries.append(Entry(ledger, last, earlier))
    return entries


def write_html(ledgers: Sequence[str], out: Path | None = None, *,
               title: str | None = None, warn: Callable[[str], None] | None = None) -> Path:
    """Read ``ledgers`` and write their page atomically; returns where it went.

    ``out`` defaults to ``default_page`` of the first ledger (its folder is created if
    needed); a folder means ``report.html`` inside it.

    Raises:
        LedgerError: a ledger is missing or is not a ledger.
        UsageError: the page cannot be written there.
    """
    if not ledgers:
        msg = "write_html: 'ledgers' must name at least one ledger"
        raise ValueError(msg)
    page = default_page(ledgers[0]) if out is None else out
    if page.is_dir():
        page /= PAGE_NAME
    refuse_special_file(page, "the report page")
    refuse_ledger(page, ledgers, "the report page")
    text = render_html(read_entries(ledgers, warn), page=page, title=title or _title(ledgers),
                       ledgers=ledgers)
    tmp = page.with_name(f".{page.name}.{os.getpid()}.tmp")
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8", errors="replace", newline="\n") as file:
            file.write(text)
        tmp.replace(page)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        msg = (f"{page}: cannot write the report page ({exc.strerror})\n"
               "  hint: pass another --out, or check that folder's permissions")
        raise UsageError(msg) from exc
    return page


def refuse_special_file(path: Path, what: str) -> None:
    """Refuse to write ``what`` over ``path`` when that is there and not a regular file.

    Output goes to a temporary file renamed over the target, which would replace a device
    (``/dev/null``), a FIFO or a socket with a regular file rather than write into it.

    Raises:
        UsageError: ``path`` exists and is neither a regular file nor a symlink to one.
    """
    if path.exists() and not path.is_file():
        msg = (f"{path}: not a regular file, so {what} is not written there\n"
               "  hint: name a file (it is replaced whole), or leave the option out")
        raise UsageError(msg)


def refuse_ledger(path: Path, ledgers: Iterable[str], what: str) -> None:
    """Refuse to write ``what`` over one of ``ledgers`` (a slip of the argument order).

    Raises:
        UsageError: ``path`` is one of ``ledgers`` (under any name).
    """
    if any(path.resolve() == Path(ledger).resolve() for ledger in ledgers):
        msg = (f"{path}: that is a ledger, so {what} is not written there (it would replace "
               "the record of what was bought)\n  hint: name another file")
        raise UsageError(msg)


def default_page(ledger: str, videos: str | None = None) -> Path:
    """Where a ledger's page goes by default: beside the videos its runs download.

    That is the folder of its manifest's videos, ``<videos>/<manifest stem>/report.html``,
    ``videos`` being the download folder (by default ``videos`` beside the ledger): for
    ``jobs/example.ledger.csv``, ``jobs/videos/example/report.html``. The manifest is the
    one the ledger's rows name; for a ledger of several manifests (or none on disk yet) it
    is the ledger's name without ``.ledger.csv``, ``.mock`` or a shard suffix. A ``--mock``
    ledger's page is ``report.mock.html``, so a demo never replaces the page of real
    purchases.
    """
    from runner.engine import default_out  # its module loads the network code

    name = Path(ledger).name
    mock = ".mock." in name
    manifests: set[str] = set()
    if Path(ledger).is_file():
        for row in iter_rows(ledger):
            manifests.add(row.get("manifest", ""))
            mock = mock or row.get("mock") == "1"
    stem = _LEDGER_SUFFIX.sub("", name) or name
    manifest = next(iter(manifests)) if len(manifests) == 1 else stem
    folder = video_folder(Path(videos if videos is not None else default_out(ledger)), manifest)
    return folder / ("report.mock.html" if mock else PAGE_NAME)


def _title(ledgers: Sequence[str]) -> str:
    return "apimart-batch: " + ", ".join(Path(ledger).name for ledger in ledgers)


def render_html(entries: Sequence[Entry], *, page: Path, title: str,
                ledgers: Sequence[str] = (), now: float | None = None) -> str:
    """The page for ``entries``, its links relative to where it will be written (``page``).

    ``ledgers`` are named in the header (default: those of the entries).
    """
    now = time.time() if now is None else now
    here = page.absolute().parent
    ledgers = list(ledgers) or list(dict.fromkeys(entry.ledger for entry in entries))
    cards = [_Card(entry, i, here=here, now=now, several=len(ledgers) > 1)
             for i, entry in enumerate(entries)]
    written = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join((
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        "<header>", f"<h1>{_e(title)}</h1>",
        f"<p>{len(entries)} jobs from {_e(', '.join(ledgers))}; written {written}</p>",
        _totals(cards), "</header>", _filters(cards),
        "<main>", '<div id="grid">', *(card.html() for card in cards), "</div>",
        '<div id="compare" hidden>', _compare(cards, several=len(ledgers) > 1), "</div>",
        "</main>", f"<script>{_SCRIPT}</script>", "</body>", "</html>", "",
    ))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _take(row: Mapping[str, str]) -> int:
    cell = row.get("take", "")
    return int(cell) if cell.isdigit() and int(cell) > 0 else 1


def _href(target: Path, here: Path) -> str:
    """A URL of ``target`` relative to the folder ``here``, every unsafe character encoded."""
    try:
        relative = os.path.relpath(target, here)
    except ValueError:  # another drive (Windows): no relative path exists
        return target.as_uri()
    # ':' is encoded too, so a first segment never reads as a URL scheme.
    return urllib.parse.quote(relative.replace(os.sep, "/"), safe="/")


def _local(cell: str, ledger: str) -> Path | None:
    """The existing local file a ledger cell names (relative: to the ledger's folder)."""
    if not cell:
        return None
    path = Path(cell)
    path = path if path.is_absolute() else Path(ledger).parent / path
    return path.absolute() if path.is_file() else None


def estimate(row: Mapping[str, str]) -> float | None:
    """The price table's estimate of a recorded job, from its common columns (None: unknown).

    The same rule as ``report``'s estimate: the model, duration and resolution columns.
    """
    model = row.get("model", "")
    spec = load_catalog().get(model)
    fields = spec.fields if spec is not None else {}
    request: dict[str, object] = {"model": model}
    if row.get("duration", "").isdecimal() and "duration" in fields:
        request[fields["duration"]] = int(row["duration"])
    if row.get("resolution") and "resolution" in fields:
        request[fields["resolution"]] = row["resolution"]
    job = Job(job_id=row.get("job_id", ""), request=request,
              defaults=spec.defaults if spec is not None else {}, fields=fields)
    return pricing.estimate(job)


def _reported(row: Mapping[str, str]) -> float | None:
    try:
        return float(row.get("cost", ""))
    except ValueError:
        return None


def tags(row: Mapping[str, str]) -> dict[str, str]:
    """The row's ``metadata`` tags; none when the cell is missing, empty or not a JSON object."""
    try:
        data = json.loads(row.get("metadata", "") or "{}")
    except (ValueError, RecursionError):  # a hand-edited cell must not crash a report
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for k, v in data.items()}


def _shown_value(value: object) -> str:
    """A request value as compact text, with no URL in it: a link shows as its file name."""
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            name = urllib.parse.unquote(urllib.parse.urlsplit(value).path.rsplit("/", 1)[-1])
            return f"‹link: {name or '…'}›"
        if value.startswith("data:"):
            return f"‹data: {len(value)} characters›"
        return value
    if isinstance(value, list):
        return "[" + ", ".join(_shown_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _request_fields(row: Mapping[str, str]) -> list[tuple[str, str]]:
    """The request's other fields, as sent; none for a ledger without them.

    Model, prompt, duration, resolution and aspect ratio are left out: the card shows them
    from their own columns, which hold the resolved values (the API's defaults filled in).
    """
    try:
        body = json.loads(row.get("request", "") or "{}")
    except ValueError:
        return []
    if not isinstance(body, dict):
        return []
    spec = load_catalog().get(row.get("model", ""))
    shown = {"model", "prompt"} | {spec.fields[name] for name in _COLUMN_FIELDS
                                   if spec is not None and name in spec.fields}
    fields = []
    for key in sorted(body):
        if key not in shown:
            text = _shown_value(body[key])
            fields.append((key, text if len(text) <= _LONG_VALUE else text[:_LONG_VALUE] + "…"))
    return fields


def next_step(ledger: str, row: Mapping[str, str], *, now: float) -> tuple[str, str | None]:
    """What a job with no video is waiting for, and the command that moves it (None: none)."""
    status = row.get("status", "")
    manifest = row.get("manifest") or "MANIFEST"
    run = _run_command(ledger, manifest, row)
    media = shlex.quote(ledger) + _base_url_flag(row)
    if status in ("failed", "cancelled", "expired"):
        what = {"failed": "the task failed, with no video (refunded per APIMart)",
                "cancelled": "the task was cancelled, with no video (refunded per APIMart)",
                "expired": "the link expired before the download: the video is lost"}[status]
        return (f"{what}; to buy it again (a new take):",
                _run_command(ledger, manifest, row, "--retry-failed"))
    if status == "not_found":
        return (f"APIMart no longer knows this task; give the job a new id in {manifest}, "
                "then:", run)
    if status == "completed":
        expires = expires_ts(row)
        when = "" if expires is None else (
            " (its link expired: the download asks for a fresh one)" if expires <= now
            else f" (its link expires {row.get('expires_at')})")
        return f"done at APIMart, not downloaded yet{when}:", f"apimart-batch download {media}"
    if status == "downloaded":
        return "the downloaded file is missing:", f"apimart-batch download {media}"
    if status in ("submitted", "pending", "processing"):
        return "still running at APIMart:", f"apimart-batch status {media} --wait"
    if status in ("unknown", "submitting"):
        return ("it may have been created (and billed): check the APIMart dashboard, "
                "then:", _run_command(ledger, manifest, row, "--resubmit-unknown"))
    if status == "error":
        return "not created; send it again:", run
    if status == "rejected":
        return f"APIMart refused the request: fix the job in {manifest}, then:", run
    return f"status {status!r}", None


def _base_url_flag(row: Mapping[str, str]) -> str:
    url = row.get("base_url", "")
    if row.get("mock") == "1" or not url or url == "mock" or url.rstrip("/") == DEFAULT_BASE_URL:
        return ""
    return " --base-url " + shlex.quote(url)


def _run_command(ledger: str, manifest: str, row: Mapping[str, str], *flags: str) -> str:
    """``apimart-batch run`` of the job's manifest with ``flags``, writing to this ledger."""
    from runner.engine import rerun_command  # its module loads the network code

    url = row.get("base_url", "")
    return rerun_command([] if manifest == "MANIFEST" else [manifest], *flags, ledger=ledger,
                         mock=row.get("mock") == "1", base_url="" if url == "mock" else url)


def _prompt(text: str) -> str:
    """The full prompt, folded into a <details> when long."""
    full = f'<p class="prompt-text" dir="auto">{_e(text)}</p>'
    if len(text) <= _LONG_PROMPT and text.count("\n") < _LONG_LINES:
        return full
    preview = " ".join(text[:_PREVIEW].split()) + "…"
    return f'<details><summary dir="auto">{_e(preview)}</summary>{full}</details>'


class _Card:
    """One entry, and what its card and compare items show."""

    def __init__(self, entry: Entry, index: int, *, here: Path, now: float,
                 several: bool) -> None:
        self.entry, self.row, self.index = entry, entry.row, index
        self.here, self.now, self.several = here, now, several
        self.tags = tags(self.row)
        self.estimate = estimate(self.row)
        self.reported = _reported(self.row)

    def video(self, row: Mapping[str, str]) -> Path | None:
        """The video file of a row, if it was downloaded and is on disk."""
        if row.get("status") != "downloaded":
            return None
        return _local(row.get("file", ""), self.entry.ledger)

    def images(self) -> list[Path]:
        """The job's local input images that are still on disk."""
        found = (_local(cell, self.entry.ledger)
                 for cell in self.row.get("image_file", "").splitlines())
        return [path for path in found if path is not None]

    def attributes(self, row: Mapping[str, str]) -> str:
        """The data attributes the filters read, for one of this job's rows."""
        labels = json.dumps([f"{k}={v}" for k, v in self.tags.items()], ensure_ascii=False)
        return (f'data-status="{_e(row.get("status", ""))}" '
                f'data-model="{_e(row.get("model", ""))}" data-tags="{_e(labels)}"')

    def media(self, row: Mapping[str, str]) -> str:
        """The lazy video of a row, or its state, reason and next step."""
        video = self.video(row)
        if video is not None:
            src = _href(video, self.here)
            poster = next((p for p in (video.with_suffix(s) for s in _THUMBNAILS)
                           if p.is_file()), None)
            extra = f' data-poster="{_e(_href(poster, self.here))}"' if poster else ""
            return (f'<div class="media"><video controls preload="none" playsinline '
                    f'data-src="{_e(src)}"{extra}></video></div>')
        status = row.get("status", "")
        what, command = next_step(self.entry.ledger, row, now=self.now)
        reason = row.get("error", "")
        return "".join((
            '<div class="media none">', f'<p class="state">{_e(status or "no status")}</p>',
            f'<p class="why" dir="auto">{_e(reason)}</p>' if reason else "",
            f'<p class="next">{_e(what)}</p>',
            f'<code class="command">{_e(command)}</code>' if command else "", "</div>",
        ))

    def html(self) -> str:
        """The card."""
        row = self.row
        status = row.get("status", "")
        facts = [("model", row.get("model", "")),
                 ("duration", f"{row['duration']} s" if row.get("duration") else ""),
                 ("resolution", row.get("resolution", "")),
                 ("aspect ratio", row.get("aspect_ratio", "")),
                 *((f"request {k}", v) for k, v in _request_fields(row)),
                 ("cost", _cost(self.estimate, self.reported)),
                 ("task", row.get("task_id", "")), ("manifest", row.get("manifest", ""))]
        if self.several:
            facts.append(("ledger", self.entry.ledger))
        earlier = [f'<a href="{_e(_href(path, self.here))}">take {_take(old)}</a>'
                   for old in self.entry.earlier if (path := self.video(old)) is not None]
        video = self.video(row)
        stills = "".join(f'<img class="still" alt="{_e(p.name)}" title="{_e(p.name)}" '
                         f'data-src="{_e(_href(p, self.here))}">' for p in self.images())
        return "".join((
            f'<article class="card" id="job-{self.index}" {self.attributes(row)}>',
            self.media(row),
            f'<h2><bdi>{_e(row.get("job_id", ""))}</bdi></h2>',
            f'<p><span class="s s-{_e(status)}">{_e(status)}</span> · take {_take(row)}',
            f" · earlier: {' '.join(earlier)}" if earlier else "", "</p>",
            _prompt(row.get("prompt", "")), _tag_list(self.tags),
            f'<p class="stills">{stills}</p>' if stills else "",
            "<dl>", *(f"<dt>{_e(k)}</dt><dd><bdi>{_e(v)}</bdi></dd>" for k, v in facts if v),
            "</dl>",
            f'<p class="files"><a href="{_e(_href(video, self.here))}">video file</a></p>'
            if video else "",
            "</article>",
        ))

    def variants(self) -> list[tuple[Mapping[str, str], dict[str, str]]]:
        """Each take of this job on the page (earlier ones first), with its variant fields."""
        out = []
        for row in (*self.entry.earlier, self.row):
            images = ", ".join(Path(line).name for line in row.get("image_file", "").splitlines())
            out.append((row, {
                "model": row.get("model", ""), "duration": row.get("duration", ""),
                "resolution": row.get("resolution", ""),
                "aspect_ratio": row.get("aspect_ratio", ""),
                "image": images or _remote_images(row), "take": f"take {_take(row)}",
                "ledger": self.entry.ledger,
            }))
        return out


def _remote_images(row: Mapping[str, str]) -> str:
    """The file names of the images a request gave by URL (never the URLs)."""
    return ", ".join(_shown_value(line) for line in row.get("image_url", "").splitlines())


def _cost(estimated: float | None, reported: float | None) -> str:
    text = "price unknown" if estimated is None else f"estimated ${estimated:.2f}"
    return text + ("" if reported is None else f" · reported ${reported:.2f}")


def _tag_list(tags: Mapping[str, str]) -> str:
    if not tags:
        return ""
    return ('<ul class="tags">' + "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in tags.items())
            + "</ul>")


def _ordered(counts: Counter[str]) -> list[str]:
    known = [s for s in _STATUS_ORDER if s in counts]
    return known + sorted(set(counts) - set(known))


def _totals(cards: Sequence[_Card]) -> str:
    """Jobs per status and per model (each a link to that filter), and the spend."""
    statuses = Counter(card.row.get("status", "") for card in cards)
    models = Counter(card.row.get("model", "") for card in cards)
    created = [card for card in cards if card.row.get("task_id")]
    estimated = sum(card.estimate or 0.0 for card in created)
    unpriced = sum(1 for card in created if card.estimate is None)
    reported = sum(card.reported or 0.0 for card in cards)
    earlier = [old for card in cards for old in card.entry.earlier]
    estimated += sum(e for old in earlier if (e := estimate(old)) is not None)
    reported += sum(r for old in earlier if (r := _reported(old)) is not None)

    def links(key: str, counts: Counter[str], order: list[str]) -> str:
        return "".join(
            f'<a href="#{_e(urllib.parse.urlencode({key: name}))}">{_e(name or "none")} '
            f"<b>{counts[name]}</b></a>" for name in order)

    spend = (f"spend: reported by APIMart ${reported:.2f}; estimated ${estimated:.2f} from the "
             "price table, for the tasks created"
             + (" (earlier takes included)" if earlier else "")
             + (f", and {unpriced} of unknown price" if unpriced else ""))
    return "".join((
        '<div class="totals">',
        f'<p><a href="#">all <b>{len(cards)}</b></a> '
        f'{links("status", statuses, _ordered(statuses))}</p>',
        f'<p>{links("model", models, sorted(models))}</p>',
        f'<p class="spend">{_e(spend)}</p>', "</div>",
    ))


def _options(counts: Counter[str], order: Iterable[str]) -> str:
    return "".join(f'<option value="{_e(v)}">{_e(v or "none")} ({counts[v]})</option>'
                   for v in order)


def _filters(cards: Sequence[_Card]) -> str:
    statuses = Counter(card.row.get("status", "") for card in cards)
    models = Counter(card.row.get("model", "") for card in cards)
    labels = Counter(f"{k}={v}" for card in cards for k, v in card.tags.items())
    return "".join((
        '<form id="filters" role="search">',
        '<label>status <select id="f-status"><option value="">all</option>',
        _options(statuses, _ordered(statuses)), "</select></label>",
        '<label>model <select id="f-model"><option value="">all</option>',
        _options(models, sorted(models)), "</select></label>",
        '<label>tag <select id="f-tag"><option value="">all</option>',
        _options(labels, sorted(labels)), "</select></label>",
        '<label>prompt <input id="f-q" type="search" placeholder="search the prompts"></label>',
        '<label>view <select id="f-view"><option value="">grid</option>',
        '<option value="compare">compare</option></select></label>',
        f'<output id="shown">{len(cards)} jobs</output>', "</form>",
    ))


def _compare(cards: Sequence[_Card], *, several: bool) -> str:
    """Groups of the takes and variants that share a prompt text, side by side."""
    groups: dict[str, list[tuple[_Card, Mapping[str, str], dict[str, str]]]] = {}
    for card in cards:
        for row, fields in card.variants():
            groups.setdefault(row.get("prompt", ""), []).append((card, row, fields))
    parts = []
    for prompt, members in groups.items():
        if len(members) < 2:
            continue
        differ = [name for name in _VARIANT_FIELDS
                  if len({fields[name] for _, _, fields in members}) > 1
                  and (name != "ledger" or several)]
        items = []
        for card, row, fields in members:
            label = " · ".join(fields[name] or "—" for name in differ)
            items.append("".join((
                f'<figure class="item" {card.attributes(row)}>', card.media(row),
                f'<figcaption><bdi>{_e(row.get("job_id", ""))}</bdi>'
                + (f" · {_e(label)}" if label else "")
                + f' · <span class="s s-{_e(row.get("status", ""))}">'
                f'{_e(row.get("status", ""))}</span></figcaption></figure>',
            )))
        parts.append("".join((
            '<section class="group">', _prompt(prompt),
            f'<p>{len(members)} videos'
            + (f", differing in {_e(', '.join(differ))}" if differ else "") + "</p>",
            '<div class="row">', *items, "</div></section>",
        )))
    return "".join(parts) or "<p>No prompt has more than one job or take here.</p>"
