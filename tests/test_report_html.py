"""The HTML contact sheet: its markup, and what a real headless Chromium makes of it."""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import json
import os
import re
import shutil
import stat
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from browser import REQUIRED, Node, dump_dom, find_chromium, mock_run, parse, probe

from runner.cli import main
from runner.engine import video_folder
from runner.errors import UsageError
from runner.ledger import COLUMNS, STATUSES, open_ledger, read_latest
from runner.report.html import (
    CSP,
    Entry,
    default_page,
    estimate,
    read_entries,
    render_html,
    write_html,
)

SAMPLE = Path(__file__).resolve().parent.parent / "runner" / "emulator" / "data" / "sample.mp4"
NOW = 1_800_000_000.0
#: Markup, quotes, a bidi override and mark, emoji with joiners: all must show as text.
HOSTILE = ('</p></details></article><script>document.title="pwned";'
           'document.body.insertAdjacentHTML("beforeend","<b id=pwned></b>")</script>'
           '<img src=x onerror="document.title=\'pwned\'"> "double" \'single\' & &amp; '
           '\u202eevil override\u202c \u200fmark 🦊👩‍👩‍👧 <!-- <style>*{display:none}</style>')


def row(job_id: str, status: str = "downloaded", **cells: str) -> dict[str, str]:
    """A complete ledger row (every column, '' where not given)."""
    base = dict.fromkeys(COLUMNS, "")
    base |= {"job_id": job_id, "status": status, "model": "sora-2", "duration": "4",
             "resolution": "720p", "aspect_ratio": "16:9", "prompt": f"prompt of {job_id}",
             "manifest": "jobs/batch.yaml", "mock": "0", "base_url": "https://api.apimart.ai"}
    if status not in ("submitting", "unknown", "rejected", "error"):
        base["task_id"] = f"task_{job_id}"
    return base | cells


def page_of(entries: list[Entry], page: Path) -> str:
    """Render ``entries`` for ``page`` and write it there."""
    text = render_html(entries, page=page, title="test batch", now=NOW)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return text


def video(folder: Path, name: str) -> Path:
    """A real, playable MP4 (the emulator's sample) at ``folder/name``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    shutil.copyfile(SAMPLE, path)
    return path


def cards_of(markup: str) -> list[Node]:
    """The job cards of a page or a dumped DOM."""
    return parse(markup).find_all("article", "card")


# -- the markup ---------------------------------------------------------------------------


def test_a_hostile_prompt_and_fields_render_as_escaped_text(tmp_path: Path) -> None:
    """Markup in a prompt, job id, tag, error or manifest is escaped; only our script is there."""
    hostile = row("<b>id</b>\"'", "failed", prompt=HOSTILE, error=HOSTILE, manifest=HOSTILE,
                  metadata=json.dumps({"<i>k</i>": HOSTILE}))
    text = render_html([Entry("l.csv", hostile)], page=tmp_path / "r.html", title=HOSTILE,
                       now=NOW)
    assert text.count("<script") == 1
    assert "<img" not in text and "<i>" not in text and "<b>id" not in text
    assert [n.attrs for n in parse(text).iter() if "onerror" in n.attrs or n.tag == "i"] == []
    assert html.escape(HOSTILE) in text
    [card] = cards_of(text)
    assert card.find_all("p", "prompt-text")[0].text == HOSTILE
    assert card.find_all("h2")[0].text == "<b>id</b>\"'"
    assert card.find_all("ul", "tags")[0].text == f"<i>k</i>: {HOSTILE}"


def test_a_long_prompt_is_folded_but_kept_whole(tmp_path: Path) -> None:
    """A long prompt sits in a <details>, with a short summary and the full text inside."""
    prompt = "A very long prompt. " * 40
    text = render_html([Entry("l.csv", row("a", prompt=prompt))], page=tmp_path / "r.html",
                       title="t", now=NOW)
    [details] = parse(text).find_all("details")
    assert len(details.find_all("summary")[0].text) < 200
    assert details.find_all("p", "prompt-text")[0].text == prompt


def test_video_links_are_relative_and_percent_encoded(tmp_path: Path) -> None:
    """Each video is linked relative to the page, with spaces, '#', '%', ':' and UTF-8 encoded."""
    page = tmp_path / "out" / "videos" / "report.html"
    inside = video(tmp_path / "out" / "videos" / "batch", "a b#c%d:e.mp4")
    outside = video(tmp_path / "elsewhere", "füchse 🦊.mp4")
    poster = inside.with_suffix(".jpg")
    poster.write_bytes(b"\xff\xd8\xff")
    text = render_html([Entry("l.csv", row("in", file=str(inside))),
                        Entry("l.csv", row("out", file=str(outside)))], page=page, title="t",
                       now=NOW)
    videos = parse(text).find_all("video")
    assert [v.attrs["data-src"] for v in videos] == [
        "batch/a%20b%23c%25d%3Ae.mp4", "../../elsewhere/f%C3%BCchse%20%F0%9F%A6%8A.mp4"]
    for node, target in zip(videos, (inside, outside), strict=True):
        assert (page.parent / urllib.parse.unquote(node.attrs["data-src"])).resolve() == target
        assert "src" not in node.attrs and node.attrs["preload"] == "none"
    assert videos[0].attrs["data-poster"] == "batch/a%20b%23c%25d%3Ae.jpg"
    assert "data-poster" not in videos[1].attrs


def test_a_relative_file_cell_is_read_from_the_ledgers_folder(tmp_path: Path) -> None:
    """An older ledger's relative ``file`` is found beside the ledger, wherever the page goes."""
    video(tmp_path / "jobs" / "videos", "a.mp4")
    entry = Entry(str(tmp_path / "jobs" / "b.ledger.csv"), row("a", file="videos/a.mp4"))
    text = render_html([entry], page=tmp_path / "site" / "r.html", title="t", now=NOW)
    assert parse(text).find_all("video")[0].attrs["data-src"] == "../jobs/videos/a.mp4"


#: Each status of a job without a video: what the card must say, and the command it gives.
NEXT_STEPS = {
    "submitting": ("dashboard", "apimart-batch run jobs/batch.yaml --resubmit-unknown"),
    "unknown": ("dashboard", "apimart-batch run jobs/batch.yaml --resubmit-unknown"),
    "submitted": ("still running", "apimart-batch status jobs/batch.ledger.csv --wait"),
    "pending": ("still running", "apimart-batch status jobs/batch.ledger.csv --wait"),
    "processing": ("still running", "apimart-batch status jobs/batch.ledger.csv --wait"),
    "completed": ("not downloaded", "apimart-batch download jobs/batch.ledger.csv"),
    "downloaded": ("missing", "apimart-batch download jobs/batch.ledger.csv"),
    "failed": ("failed", "apimart-batch run jobs/batch.yaml --retry-failed"),
    "cancelled": ("cancelled", "apimart-batch run jobs/batch.yaml --retry-failed"),
    "expired": ("expired", "apimart-batch run jobs/batch.yaml --retry-failed"),
    "not_found": ("new id", "apimart-batch run jobs/batch.yaml"),
    "error": ("not created", "apimart-batch run jobs/batch.yaml"),
    "rejected": ("fix the job in jobs/batch.yaml", "apimart-batch run jobs/batch.yaml"),
}


def test_every_status_is_covered_by_the_next_steps_table() -> None:
    """A status the ledger may hold and this table lacks fails here, not on a user's page."""
    assert set(NEXT_STEPS) == set(STATUSES)


@pytest.mark.parametrize("status", sorted(NEXT_STEPS))
def test_a_job_without_a_video_shows_its_state_reason_and_next_command(
    tmp_path: Path, status: str
) -> None:
    """No video: the card names the status, the error text and the command that moves it."""
    job = row("j", status, error="the reason given", file=str(tmp_path / "gone.mp4"))
    text = render_html([Entry("jobs/batch.ledger.csv", job)], page=tmp_path / "r.html",
                       title="t", now=NOW)
    [card] = cards_of(text)
    assert card.find_all("video") == []
    assert card.find_all("p", "state")[0].text == status
    assert card.find_all("p", "why")[0].text == "the reason given"
    what, command = NEXT_STEPS[status]
    assert what in card.find_all("p", "next")[0].text
    assert card.find_all("code", "command")[0].text == command


@pytest.mark.parametrize(("ledger", "cells", "command"), [
    pytest.param("jobs/batch.mock.ledger.csv", {"mock": "1", "base_url": "mock"},
                 "apimart-batch run jobs/batch.yaml --mock --retry-failed", id="mock"),
    pytest.param("elsewhere.csv", {}, "apimart-batch run jobs/batch.yaml --ledger elsewhere.csv"
                 " --retry-failed", id="other-ledger"),
    pytest.param("jobs/batch.ledger.csv", {"base_url": "http://127.0.0.1:9"},
                 "apimart-batch run jobs/batch.yaml --base-url http://127.0.0.1:9"
                 " --retry-failed", id="other-api"),
    pytest.param("jobs/b.csv", {"manifest": "my jobs.yaml"},
                 "apimart-batch run 'my jobs.yaml' --ledger jobs/b.csv --retry-failed",
                 id="quoted"),
    pytest.param("jobs/batch.shard-1-of-4.ledger.csv", {},
                 "apimart-batch run jobs/batch.yaml --shard 1/4 --retry-failed", id="shard"),
    pytest.param("/data/b.mock.shard-0-of-2.ledger.csv", {"mock": "1", "base_url": "mock"},
                 "apimart-batch run jobs/batch.yaml --mock --ledger /data/b.mock.ledger.csv "
                 "--shard 0/2 --retry-failed", id="shard-elsewhere"),
])
def test_the_next_command_targets_the_same_ledger_and_api(
    tmp_path: Path, ledger: str, cells: dict[str, str], command: str
) -> None:
    """--mock, --ledger and --base-url are added when the rows say so, and words are quoted."""
    text = render_html([Entry(ledger, row("j", "failed", **cells))], page=tmp_path / "r.html",
                       title="t", now=NOW)
    assert parse(text).find_all("code", "command")[0].text == command


def test_no_remote_link_reaches_the_page(tmp_path: Path) -> None:
    """video_url, thumbnail_url, image URLs and upload links never appear, not even as text."""
    link = "https://upload.apimart.ai/f/image/abc-dawn.png"
    job = row("a", file=str(video(tmp_path, "a.mp4")), image_url=link,
              video_url="https://cdn.apimart.ai/v/a.mp4",
              thumbnail_url="https://cdn.apimart.ai/t/a.jpg",
              request=json.dumps({"model": "sora-2", "prompt": "p", "duration": 4,
                                  "image_urls": [link], "ref": "data:image/png;base64,AAAA"}))
    text = render_html([Entry("l.csv", job), Entry("l.csv", row("b", "completed", prompt="p"))],
                       page=tmp_path / "r.html", title="t", now=NOW)
    assert re.search("https?:", text) is None
    assert "apimart.ai" not in text
    dl = parse(text).find_all("dl")[0].text
    assert "‹link: abc-dawn.png›" in dl and "‹data: 26 characters›" in dl


def test_the_csp_meta_allows_exactly_the_pages_own_blocks(tmp_path: Path) -> None:
    """A strict CSP is the first thing after the charset, and its hashes are of our blocks."""
    text = render_html([Entry("l.csv", row("a"))], page=tmp_path / "r.html", title="t", now=NOW)
    head = text[: text.index("</head>")]
    metas = parse(head).find_all("meta")
    assert metas[0].attrs == {"charset": "utf-8"}
    assert metas[1].attrs["http-equiv"] == "Content-Security-Policy"
    policy = dict(part.strip().split(" ", 1) for part in metas[1].attrs["content"].split(";"))
    assert metas[1].attrs["content"] == CSP
    assert policy["default-src"] == "'none'"
    assert policy["media-src"] == policy["img-src"] == "'self'"
    assert "unsafe" not in CSP and "http" not in CSP and "*" not in CSP
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        [block] = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"
    assert re.search(r"\son[a-z]+=", text) is None  # no inline handler: the CSP would block it


def test_tags_show_and_are_offered_as_filters_and_bad_metadata_is_ignored(
    tmp_path: Path,
) -> None:
    """Metadata tags show on the card and in the tag filter; bad or absent JSON shows none."""
    tagged = row("a", metadata=json.dumps({"sku": "A1", "campaign": "spring", "n": 3}))
    broken = row("b", metadata="{not json")
    listed = row("c", metadata='["a list"]')
    bare = {k: v for k, v in row("d").items() if k != "metadata"}
    text = render_html([Entry("l.csv", r) for r in (tagged, broken, listed, bare)],
                       page=tmp_path / "r.html", title="t", now=NOW)
    cards = cards_of(text)
    assert [[li.text for li in c.find_all("li")] for c in cards] == [
        ["sku: A1", "campaign: spring", "n: 3"], [], [], []]
    assert json.loads(cards[0].attrs["data-tags"]) == ["sku=A1", "campaign=spring", "n=3"]
    options = parse(text).by_id("f-tag").find_all("option")
    assert [o.attrs["value"] for o in options] == ["", "campaign=spring", "n=3", "sku=A1"]


def test_totals_count_statuses_models_and_spend(tmp_path: Path) -> None:
    """The header counts jobs per status and model, links each to its filter, and sums costs."""
    rows = [row("a", cost="0.40"), row("b", "failed", cost="0.10"),
            row("c", "error", model="sora-2-pro"), row("d", "downloaded", model="ghost-model")]
    text = render_html([Entry("l.csv", r) for r in rows], page=tmp_path / "r.html", title="t",
                       now=NOW)
    totals = parse(text).find_all("div", "totals")[0]
    links = {a.attrs["href"]: a.text for a in totals.find_all("a")}
    assert links["#status=downloaded"] == "downloaded 2"
    assert links["#status=failed"] == "failed 1"
    assert links["#model=sora-2"] == "sora-2 2"
    assert links["#model=sora-2-pro"] == "sora-2-pro 1"
    spend = totals.find_all("p", "spend")[0].text
    # Created tasks: two sora-2 4 s ones (a, b) and one of a model the price table lacks.
    each = estimate(row("a"))
    assert each is not None and estimate(rows[3]) is None
    assert "reported by APIMart $0.50" in spend
    assert f"estimated ${2 * each:.2f}" in spend and "1 of unknown price" in spend


def test_the_compare_view_groups_takes_and_variants_of_one_prompt(tmp_path: Path) -> None:
    """Jobs sharing a prompt, and a job's earlier take, sit in one group, named by what differs."""
    one = video(tmp_path, "one.mp4")
    rows = [row("m1", prompt="same", file=str(one)),
            row("m2", prompt="same", model="sora-2-pro", file=str(one)),
            row("alone", prompt="unique")]
    earlier = row("m1", prompt="same", file=str(video(tmp_path, "one.take1.mp4")))
    entries = [Entry("l.csv", rows[0] | {"take": "2"}, (earlier,)),
               *(Entry("l.csv", r) for r in rows[1:])]
    text = render_html(entries, page=tmp_path / "r.html", title="t", now=NOW)
    [group] = parse(text).find_all("section", "group")
    assert group.find_all("p", "prompt-text")[0].text == "same"
    assert "differing in model, take" in group.text
    captions = [f.text for f in group.find_all("figcaption")]
    assert captions == ["m1 · sora-2 · take 1 · downloaded", "m1 · sora-2 · take 2 · downloaded",
                        "m2 · sora-2-pro · take 1 · downloaded"]
    assert [v.attrs["data-src"] for v in group.find_all("video")] == [
        "one.take1.mp4", "one.mp4", "one.mp4"]
    assert [a.text for a in cards_of(text)[0].find_all("a")] == ["take 1", "video file"]


# -- reading ledgers and writing the page -------------------------------------------------


def downloaded(ledger: Path, job_id: str, file: Path, *, take: int = 1, **cells: str) -> None:
    """Append the rows of one job bought, finished and downloaded to ``ledger``."""
    with open_ledger(ledger, mock=False, base_url="https://api.apimart.ai") as book:
        book.append(job_id, status="submitting", model="sora-2", duration="4",
                    manifest="jobs/batch.yaml", take=str(take), task_id=None, **cells)
        book.append(job_id, status="submitted", task_id=f"task_{job_id}_{take}")
        book.append(job_id, status="downloaded", file=str(file), bytes=str(file.stat().st_size))


def test_write_html_goes_beside_the_videos_and_merges_ledgers(tmp_path: Path) -> None:
    """Default: videos/<stem>/report.html by the first ledger; a job in two ledgers shows twice."""
    first, second = tmp_path / "a.ledger.csv", tmp_path / "other" / "b.ledger.csv"
    second.parent.mkdir()
    downloaded(first, "same-id", video(tmp_path / "videos" / "batch", "same-id.mp4"),
               prompt="one")
    downloaded(second, "same-id", video(second.parent / "videos" / "b", "x.mp4"), prompt="two")
    page = write_html([str(first), str(second)])
    assert page == tmp_path / "videos" / "batch" / "report.html"  # its rows' jobs/batch.yaml
    cards = cards_of(page.read_text(encoding="utf-8"))
    assert [c.find_all("p", "prompt-text")[0].text for c in cards] == ["one", "two"]
    assert [c.find_all("video")[0].attrs["data-src"] for c in cards] == [
        "same-id.mp4", "../../other/videos/b/x.mp4"]
    assert str(second) in cards[1].text  # each card names its ledger when there are several
    assert sorted(p.name for p in page.parent.iterdir()) == ["report.html", "same-id.mp4"]


def test_a_job_that_moved_between_shard_ledgers_is_one_card_its_newest_row(
    tmp_path: Path,
) -> None:
    """Failed in b.shard-0-of-2, bought again under N=3: one card, the download, as report."""
    old, new = tmp_path / "b.shard-0-of-2.ledger.csv", tmp_path / "b.shard-2-of-3.ledger.csv"
    with open_ledger(old, mock=False, base_url="https://api.apimart.ai") as book:
        book.append("j", status="submitting", model="sora-2", manifest="jobs/batch.yaml",
                    task_id=None)
        book.append("j", status="submitted", task_id="task_j_1")
        book.append("j", status="failed", error="content policy")
    downloaded(new, "j", video(tmp_path / "videos" / "batch", "j.take2.mp4"), take=2)
    for ledgers in ([old, new], [new, old]):
        [entry] = read_entries([str(ledger) for ledger in ledgers])
        assert (entry.ledger, entry.row["status"]) == (str(new), "downloaded")
    cards = cards_of(write_html([str(old), str(new)]).read_text(encoding="utf-8"))
    assert len(cards) == 1 and cards[0].find_all("code", "command") == []


@pytest.mark.parametrize(("ledger", "page"), [
    ("jobs/example.ledger.csv", "jobs/videos/example/report.html"),
    ("jobs/example.mock.ledger.csv", "jobs/videos/example/report.mock.html"),
    ("jobs/example.shard-2-of-4.ledger.csv", "jobs/videos/example/report.html"),
    ("jobs/example.mock.shard-0-of-2.ledger.csv", "jobs/videos/example/report.mock.html"),
    ("runs/custom.csv", "runs/videos/custom/report.html"),
])
def test_default_page_sits_with_its_manifests_videos(ledger: str, page: str) -> None:
    """The page lands in its manifest's video folder; a mock page never takes a real name."""
    assert default_page(ledger) == Path(page)
    assert default_page(ledger, "/srv/out").parent == Path("/srv/out") / Path(page).parent.name


@pytest.mark.parametrize(("manifest", "ledger", "mock"), [
    pytest.param("jobs/Spring Sale.yaml", "Spring Sale.ledger.csv", False, id="unsafe-stem"),
    pytest.param("jobs/spring.yaml", "runs.csv", True, id="other-ledger-name"),
])
def test_the_default_page_lands_in_the_folder_of_the_videos(tmp_path: Path, manifest: str,
                                                            ledger: str, mock: bool) -> None:
    """The page's folder is the one downloads use for the rows' manifest (made safe the same
    way), and a --mock ledger under any name gets report.mock.html."""
    path = tmp_path / ledger
    with open_ledger(path, mock=mock, base_url="mock" if mock else "https://api.apimart.ai") \
            as book:
        book.append("j", status="submitting", model="sora-2", manifest=manifest, task_id=None)
    folder = video_folder(tmp_path / "videos", manifest)
    assert default_page(str(path)) == folder / ("report.mock.html" if mock else "report.html")


def test_write_html_takes_out_as_given_and_a_folder_means_report_html_inside(
    tmp_path: Path,
) -> None:
    """--out FILE is the page; --out FOLDER puts report.html in it; the old page is replaced."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    assert write_html([str(ledger)], tmp_path / "new" / "sheet.html") == \
        tmp_path / "new" / "sheet.html"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "report.html").write_text("old")
    assert write_html([str(ledger)], tmp_path / "site") == tmp_path / "site" / "report.html"
    assert "<article" in (tmp_path / "site" / "report.html").read_text(encoding="utf-8")


def test_write_html_names_the_page_it_cannot_write(tmp_path: Path) -> None:
    """An out path under a file is a UsageError naming the path, with a hint."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(UsageError, match=r"blocker/report\.html: cannot write.*\n  hint: "):
        write_html([str(ledger)], tmp_path / "blocker" / "report.html")


def test_write_html_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    """An out path that is a FIFO (or /dev/null) is a UsageError; the FIFO stays a FIFO."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"pipe: not a regular file.*\n  hint: "):
        write_html([str(ledger)], fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_report_out_naming_a_ledger_is_refused_and_the_ledger_kept(tmp_path: Path,
                                                                    capsys) -> None:
    """report --format html --out LEDGER is exit 2; the ledger stays as it was."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    before = ledger.read_bytes()
    assert main(["report", str(ledger), "--format", "html", "--out", str(ledger)]) == 2
    assert "that is a ledger" in capsys.readouterr().err
    assert ledger.read_bytes() == before


def test_report_html_warns_of_hand_edits_as_the_other_formats_do(tmp_path: Path, capsys) -> None:
    """report --format html names a harmless hand edit (a blank line) at FILE:LINE on stderr."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    with ledger.open("a", encoding="utf-8") as file:
        file.write("\n")
    assert main(["report", str(ledger), "--format", "html"]) == 0
    assert f"{ledger}:5: " in capsys.readouterr().err


def test_report_out_into_a_missing_folder_is_exit_2(tmp_path: Path, capsys) -> None:
    """report --format html --out /no/such/dir/x.html is a usage error; no folder is made."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"))
    out = tmp_path / "no" / "such" / "x.html"
    assert main(["report", str(ledger), "--format", "html", "--out", str(out)]) == 2
    assert "the folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_earlier_takes_on_disk_are_kept_with_their_job(tmp_path: Path) -> None:
    """A job bought again keeps its take-1 video: read_entries lists it as an earlier take."""
    ledger = tmp_path / "a.ledger.csv"
    downloaded(ledger, "j", video(tmp_path / "videos", "j.mp4"), prompt="p")
    downloaded(ledger, "j", video(tmp_path / "videos", "j.take2.mp4"), take=2)
    [entry] = read_entries([str(ledger)])
    assert entry.row["take"] == "2" and entry.row["file"].endswith("j.take2.mp4")
    assert [r["file"] for r in entry.earlier] == [str(tmp_path / "videos" / "j.mp4")]
    assert read_latest(ledger)["j"]["take"] == "2"


# -- in a real browser --------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """A working headless Chromium, else a skip (a failure where .ci/run installed one)."""
    binary = find_chromium()
    problem = probe(binary) if binary else "no chromium, chromium-browser or google-chrome " \
        "on PATH (Debian: apt-get install chromium)"
    if problem is None:
        assert binary is not None
        return binary
    if os.environ.get(REQUIRED):
        pytest.fail(f"{REQUIRED} is set, but {problem}")
    pytest.skip(f"browser tests need Chromium: {problem}")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server that records every path asked of it: (port, paths)."""
    seen: list[str] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()
    thread.join()


def view(binary: str, page: Path, fragment: Mapping[str, str] | None = None) -> Node:
    """The page's DOM in Chromium, opened with ``fragment`` as its URL fragment."""
    url = page.as_uri() + ("#" + urllib.parse.urlencode(fragment) if fragment else "")
    return parse(dump_dom(binary, url))


def shown(dom: Node) -> list[str]:
    """The job ids of the cards on view."""
    return [c.find_all("h2")[0].text for c in dom.find_all("article", "card") if not c.hidden]


def resolved(page: Path, src: str) -> Path:
    """The file a relative URL in the page points to, as the browser resolves it."""
    url = urllib.parse.urljoin(page.as_uri(), src)
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


@pytest.mark.slow
def test_a_mock_run_page_shows_every_video_playable(tmp_path: Path, chromium: str) -> None:
    """run --wait wrote the page: the five example videos, each a file, each one playable."""
    ledger = mock_run(tmp_path)
    page = default_page(str(ledger))
    assert page.is_file()
    dom = view(chromium, page)
    assert dom.find_all("html")[0].attrs.get("data-ready") == "1"  # our script ran (CSP hash)
    assert sorted(shown(dom)) == sorted(read_latest(ledger))
    videos = dom.find_all("video")
    assert len(videos) == 5
    for node in videos:
        assert node.attrs["src"] == node.attrs["data-src"]
        assert resolved(page, node.attrs["src"]).is_file()
        assert node.attrs.get("data-state") == "ready", node.attrs  # metadata loaded: it plays
    assert dom.by_id("shown").text == "5 of 5 jobs shown"
    assert shown(view(chromium, page, {"q": "FOX"})) == ["fox-snow"]
    assert shown(view(chromium, page, {"status": "failed"})) == []


@pytest.fixture
def review(tmp_path: Path, listener: tuple[int, list[str]]) -> tuple[Path, list[str]]:
    """A page of every status, tags, shared prompts and a hostile prompt with a network probe."""
    port, _ = listener
    clip = str(video(tmp_path / "videos", "clip.mp4"))
    probe_prompt = HOSTILE + f'<img src="http://127.0.0.1:{port}/from-prompt.png">'
    rows = [row("fox-a", prompt="A red fox in snow", file=clip,
                metadata=json.dumps({"sku": "A1"})),
            row("fox-b", prompt="A red fox in snow", model="sora-2-pro", file=clip,
                metadata=json.dumps({"sku": "B2"})),
            row("hostile", prompt=probe_prompt, file=clip, metadata=json.dumps({"sku": "A1"})),
            *(row(f"job-{s}", s, error=f"why {s}") for s in sorted(STATUSES - {"downloaded"}))]
    page = tmp_path / "videos" / "report.html"
    page_of([Entry("jobs/batch.ledger.csv", r) for r in rows], page)
    return page, [r["job_id"] for r in rows]


@pytest.mark.slow
def test_filters_and_search_change_what_is_shown(
    review: tuple[Path, list[str]], chromium: str
) -> None:
    """status, model, tag, prompt search and the compare view, each set from the URL."""
    page, jobs = review
    assert shown(view(chromium, page)) == jobs
    assert shown(view(chromium, page, {"status": "failed"})) == ["job-failed"]
    assert shown(view(chromium, page, {"model": "sora-2-pro"})) == ["fox-b"]
    assert shown(view(chromium, page, {"tag": "sku=A1"})) == ["fox-a", "hostile"]
    dom = view(chromium, page, {"q": "red FOX", "tag": "sku=A1"})
    assert shown(dom) == ["fox-a"]
    assert dom.by_id("shown").text == f"1 of {len(jobs)} jobs shown"
    compare = view(chromium, page, {"view": "compare"})
    assert compare.by_id("grid").hidden and not compare.by_id("compare").hidden
    groups = [g for g in compare.find_all("section", "group") if not g.hidden]
    assert [g.find_all("p", "prompt-text")[0].text for g in groups] == ["A red fox in snow"]
    assert all(v.attrs["src"] for v in groups[0].find_all("video"))  # shown: loaded
    assert compare.by_id("shown").text == "1 of 1 prompts shown"


@pytest.mark.slow
def test_a_hostile_prompt_does_not_run_and_nothing_is_fetched(
    review: tuple[Path, list[str]], listener: tuple[int, list[str]], chromium: str
) -> None:
    """The prompt's script and handlers never run, its text is intact, no request leaves."""
    page, _ = review
    _, seen = listener
    dom = view(chromium, page, {"q": "override"})
    assert dom.find_all("title")[0].text == "test batch"
    assert [n for n in dom.iter() if n.attrs.get("id") == "pwned"] == []
    assert shown(dom) == ["hostile"]
    [card] = [c for c in dom.find_all("article", "card") if not c.hidden]
    assert card.find_all("p", "prompt-text")[0].text.startswith(HOSTILE)
    assert len(dom.find_all("img")) == 0
    assert seen == []


@pytest.mark.slow
def test_the_csp_blocks_what_an_escaping_bug_would_let_in(
    review: tuple[Path, list[str]], listener: tuple[int, list[str]], chromium: str
) -> None:
    """Markup injected past the escaping fetches nothing under our CSP; without it, it does."""
    page, _ = review
    port, seen = listener
    base = f"http://127.0.0.1:{port}"
    injected = (f'<img src="{base}/img"><video src="{base}/video" preload="auto"></video>'
                f'<link rel="stylesheet" href="{base}/css"><script src="{base}/js"></script>'
                f'<iframe src="{base}/frame"></iframe><script>fetch("{base}/fetch");'
                f'document.title = "pwned"</script>')
    text = page.read_text(encoding="utf-8").replace("</body>", injected + "</body>")
    page.write_text(text, encoding="utf-8")
    dom = view(chromium, page)
    assert seen == []
    assert dom.find_all("title")[0].text == "test batch"
    assert dom.find_all("html")[0].attrs.get("data-ready") == "1"  # our own script still runs
    open_page = page.with_name("no-csp.html")
    open_page.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text),
                         encoding="utf-8")
    view(chromium, open_page)
    assert "/img" in seen  # the probe works: without the policy the same page does fetch


@pytest.mark.slow
def test_five_thousand_cards_load_only_the_videos_in_view(tmp_path: Path, chromium: str) -> None:
    """All 5,000 cards are in the DOM, but only the few videos near the viewport got a src."""
    clip = str(video(tmp_path / "videos", "clip.mp4"))
    entries = [Entry("l.csv", row(f"job-{i:04}", file=clip, prompt=f"prompt {i}"))
               for i in range(5000)]
    page = tmp_path / "videos" / "report.html"
    page_of(entries, page)
    dom = view(chromium, page)
    videos = dom.find_all("video")
    assert len(dom.find_all("article", "card")) == len(videos) == 5000
    loaded = [v for v in videos if "src" in v.attrs]
    assert 0 < len(loaded) <= 30, len(loaded)
    assert all(v.attrs["preload"] == "none" for v in videos if "src" not in v.attrs)
    assert dom.by_id("shown").text == "5000 of 5000 jobs shown"
