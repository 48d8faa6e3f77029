"""Helpers for tests that load a page in a real headless Chromium, and read what it made.

``--dump-dom`` prints the DOM after the page's script ran (``--virtual-time-budget``
lets timers, observers and media events run first); :func:`parse` turns it into a small
tree to query. Chromium cannot be clicked from here, so a page under test takes its state
from the URL fragment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from clihelpers import cli

from runner.ledger import ledger_path
from runner.report import default_page

#: Names Chromium is installed under (Debian, Ubuntu, Google's package).
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Set (by .ci/run, where Chromium is installed) to make a missing browser a failure.
REQUIRED = "REPORT_BROWSER_REQUIRED"
#: No network, no first-run or background work, no GPU; --no-sandbox since CI runs as root.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")
TIMEOUT = 120
JOBS = Path(__file__).resolve().parent.parent / "jobs"


def find_chromium() -> str | None:
    """The first Chromium on PATH, or None."""
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def run_chromium(binary: str, url: str, *args: str, window: str = "1200,900",
                 budget_ms: int = 5000) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``url`` with a fresh profile; returns the finished process."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
             f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
            env={**os.environ, "HOME": profile},
        )


def dump_dom(binary: str, url: str, *, window: str = "1200,900", budget_ms: int = 5000) -> str:
    """The page's DOM after its script ran, as HTML."""
    done = run_chromium(binary, url, "--dump-dom", window=window, budget_ms=budget_ms)
    if done.returncode != 0 or "<html" not in done.stdout:
        msg = f"chromium --dump-dom {url} exited {done.returncode}: {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    return done.stdout


def screenshot(binary: str, url: str, out: Path, *, window: str = "1200,900") -> None:
    """A PNG of the page's first screen at ``window`` size."""
    done = run_chromium(binary, url, f"--screenshot={out}", window=window)
    if done.returncode != 0 or not out.is_file():
        msg = f"chromium --screenshot {url} exited {done.returncode}: {done.stderr[-2000:]}"
        raise RuntimeError(msg)


def mock_run(folder: Path, manifest: str = "jobs/example.yaml") -> Path:
    """``run MANIFEST --mock --wait`` in a copy of the project's ``jobs/``; returns its ledger.

    The emulator serves real, playable MP4s, so the videos folder holds what a user gets.
    """
    shutil.copytree(JOBS, folder / "jobs", dirs_exist_ok=True)
    done = cli(folder, "run", manifest, "--mock", "--wait", key=False)
    if done.returncode != 0:
        msg = f"run {manifest} --mock --wait exited {done.returncode}: {done.stderr}"
        raise RuntimeError(msg)
    return folder / ledger_path(manifest, mock=True)


def probe(binary: str) -> str | None:
    """Why this Chromium cannot render a page with script here, or None when it can."""
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "probe.html"
        page.write_text("<!doctype html><html><body><script>"
                        "document.body.dataset.ran = 'yes'</script></body></html>")
        try:
            dom = dump_dom(binary, page.as_uri(), budget_ms=1000)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return f"{binary} cannot render a page: {exc}"
    return None if 'data-ran="yes"' in dom else f"{binary} ran no script: {dom[:300]!r}"


# -- the dumped DOM ----------------------------------------------------------------------

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "source", "track", "wbr"})


@dataclass
class Node:
    """An element of the dumped DOM: its tag, attributes, children and text."""

    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)
    parent: Node | None = None

    def iter(self) -> Iterator[Node]:
        """This element and every element below it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        """The elements below (and including) this one of that tag and class."""
        return [node for node in self.iter() if (tag is None or node.tag == tag)
                and (cls is None or cls in node.attrs.get("class", "").split())]

    def by_id(self, ident: str) -> Node:
        """The element with that id."""
        return next(node for node in self.iter() if node.attrs.get("id") == ident)

    @property
    def text(self) -> str:
        """The text content, as the DOM's ``textContent``."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def hidden(self) -> bool:
        """The element or one of its ancestors carries ``hidden``."""
        node: Node | None = self
        while node is not None:
            if "hidden" in node.attrs:
                return True
            node = node.parent
        return False


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, parent=self.open)
        self.open.children.append(node)
        if tag not in _VOID:
            self.open = node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.open
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.open = node.parent

    def handle_data(self, data: str) -> None:
        self.open.children.append(data)


def parse(markup: str) -> Node:
    """The document tree of ``markup`` (a dumped DOM is well-formed, so this is enough)."""
    builder = _Builder()
    builder.feed(markup)
    builder.close()
    return builder.root


def main(argv: list[str]) -> int:
    """``python tests/browser.py OUT.png``: the README's screenshot of the --mock example's page."""
    if len(argv) != 1:
        print("usage: python tests/browser.py OUT.png", file=sys.stderr)
        return 2
    binary = find_chromium()
    if binary is None:
        print("no Chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as folder:
        page = default_page(str(mock_run(Path(folder))))
        screenshot(binary, page.as_uri(), Path(argv[0]).absolute(), window="1200,760")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
