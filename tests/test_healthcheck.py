"""--healthcheck-url: /start, then /<exit code> with the summary; never the key; never fatal."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from clihelpers import KEY, cli, write_manifest

from runner.healthcheck import ping_url


@dataclass
class Ping:
    """One request the check server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Check:
    """A healthchecks.io stand-in on 127.0.0.1 that records every request."""

    url: str
    status: int = 200
    pings: list[Ping] = field(default_factory=list)

    def paths(self) -> list[str]:
        """The paths pinged, in order."""
        return [ping.path for ping in self.pings]

    def assert_no_key(self) -> None:
        """The API key is in no path, header or body."""
        for ping in self.pings:
            assert KEY not in ping.path
            assert KEY not in json.dumps(ping.headers)
            assert KEY.encode() not in ping.body


@pytest.fixture
def check() -> Iterator[Check]:
    """A recording check server, served from a thread (the CLI runs as a subprocess)."""
    loop = asyncio.new_event_loop()
    found = Check(url="")

    async def handle(request: web.Request) -> web.Response:
        found.pings.append(Ping(request.method, request.path_qs, dict(request.headers),
                                await request.read()))
        return web.Response(status=found.status, text="OK")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start_server(), loop).result(10)
    found.url = str(server.make_url("/ping/abc"))
    yield found
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_run_pings_start_then_its_exit_code_with_the_summary(tmp_path, check, mock_server):
    """A real-key run against the emulator: POST /start, then POST /0 with the summary JSON."""
    server = mock_server()
    manifest = write_manifest(tmp_path, 3)
    done = cli(tmp_path, "run", manifest, "--base-url", server.url, "-q",
               "--healthcheck-url", check.url)
    assert done.returncode == 0, done.stderr
    assert check.paths() == ["/ping/abc/start", "/ping/abc/0"]
    assert {ping.method for ping in check.pings} == {"POST"}
    summary = json.loads(check.pings[1].body)
    assert (summary["exit_code"], summary["jobs"], summary["needs_action"]) == (0, 3, [])
    check.assert_no_key()
    assert "Authorization" not in check.pings[0].headers


def test_failed_jobs_ping_1_with_the_jobs_named(tmp_path, check, mock_server):
    """Jobs in error: the final ping is /1 and its body names them with their reason."""
    server = mock_server("--retire-model", "sora-2")
    manifest = write_manifest(tmp_path, 2)
    done = cli(tmp_path, "run", manifest, "--base-url", server.url, "--healthcheck-url",
               check.url, "--halt-after", "off")
    assert done.returncode == 1, done.stderr
    assert check.paths()[-1] == "/ping/abc/1"
    needs = json.loads(check.pings[-1].body)["needs_action"]
    assert [(n["job_id"], n["status"]) for n in needs] == [("job-0", "error"),
                                                           ("job-1", "error")]
    assert all(n["reason"] for n in needs)
    check.assert_no_key()


def test_bad_manifest_pings_2_with_the_message(tmp_path, check):
    """A command that fails before sending still ends its check: /2, the message as body."""
    (tmp_path / "bad.yaml").write_text("version: 1\njobs: []\n", encoding="utf-8")
    done = cli(tmp_path, "run", "bad.yaml", "--mock", "--healthcheck-url", check.url)
    assert done.returncode == 2
    assert check.paths() == ["/ping/abc/start", "/ping/abc/2"]
    assert b"bad.yaml" in check.pings[1].body


@pytest.mark.parametrize("answer", ["500", "unreachable"])
def test_a_failed_ping_only_warns(tmp_path, check, answer):
    """A check that answers 500, or nothing at all, warns on stderr; the exit code stays 0."""
    check.status = 500
    url = check.url if answer == "500" else "http://127.0.0.1:9/ping/abc"
    manifest = write_manifest(tmp_path, 2)
    done = cli(tmp_path, "run", manifest, "--mock", "--healthcheck-url", url)
    assert done.returncode == 0
    assert done.stderr.count("--healthcheck-url: the ") == 2
    assert "exit code is not affected" in done.stderr


def test_status_and_download_ping_and_write_summary_json(tmp_path, check):
    """status and download take --healthcheck-url and --summary-json too."""
    manifest = write_manifest(tmp_path, 2)
    assert cli(tmp_path, "run", manifest, "--mock", "-q").returncode == 0
    ledger = "batch.mock.ledger.csv"
    for command in ("status", "download"):
        summary = tmp_path / f"{command}.json"
        extra = ["--wait"] if command == "status" else []
        done = cli(tmp_path, command, ledger, *extra, "--summary-json", str(summary),
                   "--healthcheck-url", check.url)
        assert done.returncode == 0, done.stderr
        written = json.loads(summary.read_text())
        assert written["exit_code"] == 0 and written["needs_action"] == []
        assert json.loads(check.pings[-1].body) == written
    assert check.paths() == ["/ping/abc/start", "/ping/abc/0"] * 2
    check.assert_no_key()


def test_ping_url_keeps_the_query_string():
    """A ping URL with a query (healthchecks.io's ?rid=) gets the suffix on its path."""
    assert ping_url("https://hc-ping.com/u/?rid=7", "start") == "https://hc-ping.com/u/start?rid=7"
    assert ping_url("https://hc-ping.com/u", "0") == "https://hc-ping.com/u/0"
