"""A task's life after its video: the key's balance, links past expiry, and the video file.

Over real loopback sockets: the emulator on the frozen fake clock, and a ``Canned`` server
that answers ``GET /v1/balance`` with whatever a test sets (``@KEY@`` becomes the key the
request carried, like a server that echoes it). Every failure is checked for the key.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from jobfactory import make_job
from keyguard import key_guards

from runner.api import Balance, Client, TaskState
from runner.emulator.config import EmulatorConfig, add_arguments, config_from_args
from runner.emulator.contract import video_bytes
from runner.emulator.server import RunningEmulator
from runner.errors import FatalApiError, RejectedError, RetryableError

pytestmark = pytest.mark.usefixtures("no_key_in_logs")
KEY = "sk-test-LIFECYCLE-0123456789"
#: sora-2 at 720p costs $0.08 a second: 8 s is $0.64, 4 s is $0.32.
EIGHT = make_job("eight", model="sora-2", prompt="a fox in snow", duration=8)
FOUR = make_job("four", model="sora-2", prompt="a heron at dawn", duration=4)

Connect = Callable[..., Awaitable[Client]]


assert_no_key, expect = key_guards(KEY)


async def start(emulator: Any, connect: Connect, **knobs: Any) -> tuple[RunningEmulator, Client]:
    """An emulator that wants ``KEY``, and a client holding it."""
    srv = await emulator(key=KEY, **knobs)
    return srv, await connect(srv.base_url)


# -- balance: the emulator ------------------------------------------------------------------------


async def test_balance_without_quota_or_usd_is_unlimited(emulator, connect):
    """No quota and no ``balance_usd``: ``remain_balance`` -1 reads as unlimited (None)."""
    _, api = await start(emulator, connect)
    assert await api.balance() == Balance(remain=None, used=0.0)


async def test_balance_with_a_quota_counts_tasks(emulator, connect):
    """Without ``balance_usd`` the balance stays counted in tasks, as before."""
    _, api = await start(emulator, connect, quota=3)
    await api.submit(EIGHT)
    assert await api.balance() == Balance(remain=2.0, used=1.0)


async def test_usd_balance_decreases_by_the_cost_of_each_task_created(emulator, connect):
    """``balance_usd``: remain = balance less the cost of the tasks created, used = that cost."""
    srv, api = await start(emulator, connect, balance_usd=2.0)
    assert await api.balance() == Balance(remain=2.0, used=0.0)
    await api.submit(EIGHT)
    assert await api.balance() == Balance(remain=1.36, used=0.64)
    await api.submit(FOUR)
    assert await api.balance() == Balance(remain=1.04, used=0.96)
    await api.submit(EIGHT)  # a replay of the same Idempotency-Key is not billed again
    assert await api.balance() == Balance(remain=1.04, used=0.96)
    assert srv.emulator.stats()["tasks_created"] == 2


async def test_usd_balance_never_goes_below_zero_and_does_not_refuse(emulator, connect):
    """Spending past ``balance_usd`` reports 0 left; submits still pass (only ``quota`` refuses)."""
    _, api = await start(emulator, connect, balance_usd=0.5)
    await api.submit(EIGHT)
    await api.submit(FOUR)
    assert await api.balance() == Balance(remain=0.0, used=0.96)


async def test_usd_balance_answer_says_not_unlimited(emulator, session):
    """The raw answer with ``balance_usd``: numbers, ``unlimited_quota: false``."""
    srv = await emulator(balance_usd=1.5)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with session.get(srv.base_url + "/v1/balance", headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"success": True, "remain_balance": 1.5, "used_balance": 0,
                    "unlimited_quota": False}


async def test_balance_fails_knob_is_the_documented_failure_and_raises(emulator, connect):
    """``balance_fails``: HTTP 200 ``success: false``; the client raises with the message."""
    _, api = await start(emulator, connect, balance_fails=True)
    exc = await expect(RejectedError, api.balance())
    assert exc.status == 200
    assert "GET /v1/balance" in exc.message
    assert "record not found" in exc.message


async def test_balance_with_a_wrong_key_raises_with_the_servers_message(emulator, connect):
    """A key the emulator does not know gets ``success: false``, not a balance."""
    srv = await emulator(key="sk-another-key-entirely")
    api = await connect(srv.base_url)
    exc = await expect(RejectedError, api.balance())
    assert "token not found" in exc.message


# -- balance: any answer --------------------------------------------------------------------------


@dataclass
class Canned:
    """Answers ``GET /v1/balance`` with ``status`` and ``body``; counts what it was sent."""

    base_url: str = ""
    status: int = 200
    body: bytes = b""
    requests: int = 0
    authorization: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        """The canned answer, with ``@KEY@`` replaced by the request's Bearer token."""
        self.requests += 1
        self.authorization = request.headers.get("Authorization")
        token = (self.authorization or "").removeprefix("Bearer ")
        body = self.body.replace(b"@KEY@", token.encode())
        return web.Response(status=self.status, body=body, content_type="application/json")


@pytest.fixture
async def canned(aiohttp_server: Any) -> Canned:
    """A ``Canned`` server on 127.0.0.1, stopped after the test."""
    server = Canned()
    app = web.Application()
    app.router.add_get("/v1/balance", server.handle)
    running = await aiohttp_server(app)
    server.base_url = str(running.make_url("")).rstrip("/")
    return server


def js(value: object) -> bytes:
    """``value`` as JSON, NaN and Infinity allowed (a server may send them)."""
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"success": True, "remain_balance": 10.5, "used_balance": 2.3,
                      "unlimited_quota": False}, Balance(10.5, 2.3), id="doc-example"),
        pytest.param({"success": True, "remain_balance": -1, "used_balance": 7,
                      "unlimited_quota": False}, Balance(None, 7.0), id="minus-one-unlimited"),
        pytest.param({"success": True, "remain_balance": 0, "used_balance": 1,
                      "unlimited_quota": True}, Balance(None, 1.0), id="unlimited-quota-true"),
        pytest.param({"success": True, "unlimited_quota": True}, Balance(None, None),
                     id="unlimited-without-numbers"),
        pytest.param({"remain_balance": 3}, Balance(3.0, None), id="no-success-no-used"),
        pytest.param({"success": True, "remain_balance": 0, "used_balance": None},
                     Balance(0.0, None), id="zero-left-used-null"),
        pytest.param({"success": True, "remain_balance": -2.5, "used_balance": 12.5},
                     Balance(-2.5, 12.5), id="overdrawn"),
        pytest.param({"code": 200, "success": True, "remain_balance": 1, "error": None},
                     Balance(1.0, None), id="gateway-ok-fields"),
    ],
)
async def test_balance_answers_are_parsed(canned, connect, body, expected):
    """Each well-formed balance answer reads as its ``Balance``; the key is sent as Bearer."""
    canned.body = js(body)
    api = await connect(canned.base_url)
    assert await api.balance() == expected
    assert canned.authorization == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("status", "body", "cls", "words"),
    [
        pytest.param(200, js({"success": False, "message": "record not found"}), RejectedError,
                     "the balance lookup failed: record not found", id="success-false"),
        pytest.param(200, js({"success": False}), RejectedError, "no message",
                     id="success-false-no-message"),
        pytest.param(200, b"<html>upstream</html>", RetryableError, "unreadable body",
                     id="not-json"),
        pytest.param(200, b"", RetryableError, "empty body", id="empty"),
        pytest.param(200, js([1, 2]), RetryableError, "", id="a-list"),
        pytest.param(200, js({"success": True}), RetryableError, "no remain_balance",
                     id="no-remain"),
        pytest.param(200, js({"success": True, "remain_balance": "10.5"}), RetryableError,
                     "remain_balance = '10.5'", id="remain-a-string"),
        pytest.param(200, js({"success": True, "remain_balance": True}), RetryableError,
                     "remain_balance", id="remain-a-bool"),
        pytest.param(200, js({"success": True, "remain_balance": math.nan}), RetryableError,
                     "remain_balance", id="remain-nan"),
        pytest.param(200, b'{"success": true, "remain_balance": 1e400}', RetryableError,
                     "remain_balance", id="remain-overflows"),
        pytest.param(200, js({"success": True, "remain_balance": 1, "used_balance": "x"}),
                     RetryableError, "used_balance", id="used-a-string"),
        pytest.param(200, js({"success": "true", "remain_balance": 1}), RetryableError,
                     "success = 'true'", id="success-a-string"),
        pytest.param(200, js({"remain_balance": 1, "unlimited_quota": "no"}), RetryableError,
                     "unlimited_quota", id="unlimited-a-string"),
        pytest.param(200, b'{"a":' * 100 + b"1" + b"}" * 100, RetryableError, "",
                     id="too-deep"),
        pytest.param(401, js({"error": {"code": 401, "message": "Invalid authentication "
                     "credentials", "type": "authentication_error"}}), FatalApiError,
                     "APIMART_API_KEY", id="http-401"),
        pytest.param(404, js({"error": {"message": "Invalid URL (GET /v1/balance)"}}),
                     RejectedError, "404", id="http-404"),
        pytest.param(500, b"oops", RetryableError, "500", id="http-500"),
        pytest.param(200, js({"code": 500, "message": "upstream"}), RetryableError, "upstream",
                     id="code-500-in-200"),
    ],
)
async def test_every_failed_balance_answer_is_one_api_error(canned, connect, status, body, cls,
                                                            words):
    """A failure, a malformed body or an HTTP error is an ``ApiError``, after one GET."""
    canned.status, canned.body = status, body
    api = await connect(canned.base_url)
    exc = await expect(cls, api.balance())
    assert exc.message.startswith(f"APIMart answered {status}")
    assert "GET /v1/balance" in exc.message
    assert words in exc.message
    assert canned.requests == 1


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        pytest.param({"success": False, "message": "no token @KEY@ (Bearer @KEY@)"},
                     RejectedError, id="in-the-failure-message"),
        pytest.param({"success": True, "remain_balance": "@KEY@"}, RetryableError,
                     id="in-a-malformed-field"),
        pytest.param({"success": True, "remain_balance": 1, "unlimited_quota": "@KEY@"},
                     RetryableError, id="in-unlimited-quota"),
        pytest.param({"error": {"code": 401, "message": "key @KEY@ refused", "type": "@KEY@"}},
                     FatalApiError, id="in-an-error-envelope"),
    ],
)
async def test_a_key_the_server_echoes_never_reaches_the_error(canned, connect, body, cls):
    """The server quotes the key back; the error says ``[REDACTED]`` and never the key."""
    canned.body = js(body)
    api = await connect(canned.base_url)
    exc = await expect(cls, api.balance())
    assert "[REDACTED]" in exc.message
    assert KEY not in (exc.code or "")


async def test_balance_with_nothing_listening_is_an_api_error(connect, unused_tcp_port):
    """No server: a ``RetryableError`` (not sent), not a raw aiohttp exception."""
    api = await connect(f"http://127.0.0.1:{unused_tcp_port}")
    exc = await expect(RetryableError, api.balance())
    assert "GET /v1/balance" in exc.message


# -- links past expiry ----------------------------------------------------------------------------


async def completed(emulator: Any, connect: Connect, **knobs: Any) -> tuple[Client, TaskState]:
    """A client, and the completed state of a new task (``task_seconds=0``, links last 60 s)."""
    _, api = await start(emulator, connect, task_seconds=0, link_ttl=60, **knobs)
    state = await api.get_task((await api.submit(EIGHT)).task_id)
    assert state.status == "completed"
    assert state.expires_at is not None and len(state.video_urls) == 1
    return api, state


async def download(api: Client, url: str) -> bytes:
    """The file behind ``url``, through the client."""
    out = io.BytesIO()
    await api.download(url, out)
    return out.getvalue()


async def test_without_fresh_links_an_expired_link_is_handed_out_again_and_refused(
    emulator, connect, fake_clock
):
    """Default: a query after expiry repeats the old link and expiry; the file answers 403."""
    api, first = await completed(emulator, connect)
    assert await download(api, first.video_urls[0]) == video_bytes(first.task_id)
    fake_clock.now = first.expires_at
    again = await api.get_task(first.task_id)
    assert (again.video_urls, again.expires_at) == (first.video_urls, first.expires_at)
    exc = await expect(RejectedError, api.download(first.video_urls[0], io.BytesIO()))
    assert exc.status == 403


async def test_fresh_links_hand_out_a_new_link_that_downloads_while_the_old_stays_expired(
    emulator, connect, fake_clock
):
    """``fresh_links``: after expiry a query gives a new URL, valid ``link_ttl`` from now."""
    api, first = await completed(emulator, connect, fresh_links=True)
    assert first.expires_at is not None
    fake_clock.now = first.expires_at - 1
    assert (await api.get_task(first.task_id)).video_urls == first.video_urls  # not yet
    fake_clock.now = first.expires_at + 30
    fresh = await api.get_task(first.task_id)
    assert fresh.video_urls[0] != first.video_urls[0]
    assert fresh.expires_at == int(fake_clock.now) + 60
    assert await download(api, fresh.video_urls[0]) == video_bytes(first.task_id)
    exc = await expect(RejectedError, api.download(first.video_urls[0], io.BytesIO()))
    assert exc.status == 403
    assert (await api.get_task(first.task_id)).video_urls == fresh.video_urls  # kept until expiry


async def test_fresh_links_expire_in_turn_and_each_expiry_issues_another(
    emulator, connect, fake_clock
):
    """The re-issued link expires at its own ``expires_at``; the next query issues a third."""
    api, first = await completed(emulator, connect, fresh_links=True)
    assert first.expires_at is not None
    fake_clock.now = first.expires_at
    second = await api.get_task(first.task_id)
    assert second.expires_at == first.expires_at + 60
    fake_clock.now = second.expires_at
    exc = await expect(RejectedError, api.download(second.video_urls[0], io.BytesIO()))
    assert exc.status == 403
    third = await api.get_task(first.task_id)
    assert len({first.video_urls[0], second.video_urls[0], third.video_urls[0]}) == 3
    assert await download(api, third.video_urls[0]) == video_bytes(first.task_id)
    for old in (first, second):
        exc = await expect(RejectedError, api.download(old.video_urls[0], io.BytesIO()))
        assert exc.status == 403


async def test_fresh_links_keep_the_url_as_string_shape(emulator, connect, fake_clock, session):
    """With ``url_as_string`` the re-issued link is a string too, as the first one was."""
    srv, api = await start(emulator, connect, task_seconds=0, link_ttl=60, fresh_links=True,
                           url_as_string=True)
    task_id = (await api.submit(EIGHT)).task_id
    fake_clock.advance(60)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with session.get(f"{srv.base_url}/v1/tasks/{task_id}", headers=headers) as resp:
        video = (await resp.json())["data"]["result"]["videos"][0]
    assert isinstance(video["url"], str) and "-1-video_" in video["url"]
    assert await download(api, video["url"]) == video_bytes(task_id)


# -- the knobs on the command line ---------------------------------------------------------------


def test_the_new_knobs_have_flags():
    """``--balance USD``, ``--balance-fails`` and ``--fresh-links`` reach the config."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--balance USD" in parser.format_help()
    ns = parser.parse_args(["--balance", "12.5", "--balance-fails", "--fresh-links"])
    assert config_from_args(ns) == EmulatorConfig(
        balance_usd=12.5, balance_fails=True, fresh_links=True
    )
    assert config_from_args(parser.parse_args([])).balance_usd is None


@pytest.mark.parametrize("usd", [-0.01, math.nan, math.inf])
def test_a_bad_balance_is_refused(usd):
    """A negative or non-finite ``balance_usd`` raises ValueError naming the knob."""
    with pytest.raises(ValueError, match="balance_usd"):
        EmulatorConfig(balance_usd=usd)


# -- the video file -----------------------------------------------------------------------------


def boxes(data: bytes) -> list[tuple[bytes, int]]:
    """The top-level MP4 boxes of ``data`` as (type, size); fails unless they tile the file."""
    found: list[tuple[bytes, int]] = []
    at = 0
    while at < len(data):
        assert at + 8 <= len(data), f"a box header is cut at byte {at}"
        size = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        assert size >= 8, f"box {kind!r} at byte {at} has size {size}"
        found.append((kind, size))
        at += size
    assert at == len(data), f"the boxes end at byte {at}, the file at {len(data)}"
    return found


@pytest.mark.parametrize("size", [None, 50_000])
def test_the_video_is_an_mp4_whose_boxes_add_up(size):
    """ftyp first, then moov before mdat (fast start); the box sizes sum to the file length."""
    data = video_bytes("task_01K9S419324DREZFBWNSVXYR6H", size=size)
    kinds = [kind for kind, _ in boxes(data)]
    assert kinds[0] == b"ftyp"
    assert kinds.count(b"moov") == 1 and kinds.count(b"mdat") == 1
    assert kinds.index(b"moov") < kinds.index(b"mdat")
    assert set(kinds) <= {b"ftyp", b"moov", b"mdat", b"free"}
    assert size is None or len(data) == size


def test_each_task_gets_its_own_bytes_and_always_the_same():
    """Deterministic per task id, and no two ids share a file (nor its hash)."""
    ids = [f"task_{n:026d}" for n in range(20)] + ["task-unified-1762853430-abcd1234"]
    hashes = {hashlib.sha256(video_bytes(task_id)).hexdigest() for task_id in ids}
    assert len(hashes) == len(ids)
    assert video_bytes(ids[0]) == video_bytes(ids[0])
    assert video_bytes(ids[0], size=9000) != video_bytes(ids[1], size=9000)


def test_a_size_too_small_for_the_video_is_refused():
    """``size`` below the sample plus its task note is a ValueError, not a broken file."""
    smallest = len(video_bytes("task_x"))
    assert len(video_bytes("task_x", size=smallest)) == smallest
    with pytest.raises(ValueError, match="size"):
        video_bytes("task_x", size=smallest - 1)


async def test_the_downloaded_video_is_the_mp4(emulator, connect):
    """What the emulator serves is ``video_bytes`` of the task, a well-formed MP4."""
    api, state = await completed(emulator, connect)
    data = await download(api, state.video_urls[0])
    assert data == video_bytes(state.task_id)
    assert boxes(data)[0][0] == b"ftyp"


@pytest.mark.parametrize("size", [None, 50_000])
def test_ffprobe_reads_the_video(tmp_path, size):
    """ffprobe finds a video stream and a positive duration (skipped without ffprobe)."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        pytest.skip("ffprobe is not on PATH (install ffmpeg to check the video plays)")
    path = tmp_path / "video.mp4"
    path.write_bytes(video_bytes("task_01K9S419324DREZFBWNSVXYR6H", size=size))
    done = subprocess.run(
        [ffprobe, "-v", "error", "-show_entries", "format=duration:stream=codec_type,codec_name",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    found = json.loads(done.stdout)
    assert float(found["format"]["duration"]) > 0
    assert {"codec_type": "video", "codec_name": "h264"} in found["streams"]
