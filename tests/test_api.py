"""The APIMart client over real loopback sockets: one exact failure class per outcome.

Two servers: the emulator (the contract plus scripted faults, on the frozen fake clock) and
``Echo``, a tiny app that records what the client sent and answers whatever a test sets.
Every expected failure goes through ``expect``, which also checks that the API key appears
nowhere in the exception, its chain or its traceback; an autouse fixture checks the logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import io
import json
import math
import random
import re
import socket
import time
import traceback
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import aiohttp.abc
import pytest
from aiohttp import web
from jobfactory import edit, make_job
from keyguard import key_guards
from multidict import CIMultiDict

from runner.api.answers import Submitted, TaskState, parse_task
from runner.api.client import Client, Timeouts
from runner.api.failures import classify, is_quota
from runner.api.retry import NO_WAIT, RetryPolicy
from runner.api.secret import Secret, api_key_from_env, key_file_warning
from runner.emulator.contract import (
    ERRORS,
    RESPONSE_VERSION,
    TASK_FAILURES,
    UPLOAD_MAX_BYTES,
    video_bytes,
)
from runner.emulator.server import RunningEmulator
from runner.errors import (
    AmbiguousError,
    FatalApiError,
    ModelUnavailableError,
    RejectedError,
    RetryableError,
)

pytestmark = pytest.mark.usefixtures("no_key_in_logs")
KEY = "sk-test-SECRET-1234567890"
JOB = make_job(
    "fox-snow",
    model="sora-2",
    prompt="a red fox crossing fresh snow",
    duration=8,
    manifest="jobs/nightly.yaml",
    manifest_name="nightly",
)
SUBMIT = "POST /v1/videos/generations"
TASK_ID = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,191}")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)
LEGACY_OK = {"code": 200, "data": [{"status": "submitted", "task_id": "task_legacy"}]}
FAILURE_MESSAGES = {failure["message"] for failure in TASK_FAILURES}

Start = Callable[..., Awaitable[tuple[RunningEmulator, Client]]]


# -- secrecy checks used by every test -------------------------------------------------------


assert_no_key, expect = key_guards(KEY)


# -- servers and clients ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the echo server received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    raw: bytes


@dataclass
class Echo:
    """A loopback server that records each request and answers with what the test set."""

    base_url: str = ""
    seen: list[Seen] = field(default_factory=list)
    status: int = 200
    body: bytes = json.dumps(LEGACY_OK).encode()
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def answer(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        """Answer from now on with ``status`` and ``body`` (JSON unless bytes)."""
        self.status, self.headers = status, headers or {}
        if isinstance(body, bytes):
            self.body, self.content_type = body, "text/html"
        else:
            self.body, self.content_type = json.dumps(body).encode(), "application/json"

    async def handle(self, request: web.Request) -> web.Response:
        """Record the request, then answer (late, when ``delay`` is set)."""
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers), raw))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(
            status=self.status, body=self.body, headers=self.headers, content_type=self.content_type
        )


@pytest.fixture
async def echo(aiohttp_server: Any) -> Echo:
    """An ``Echo`` server on 127.0.0.1, answering the legacy submit success by default."""
    server = Echo()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    # aiohttp's test server cancels a handler when its client hangs up: a late answer ends
    # as soon as the timed-out client is gone.
    running = await aiohttp_server(app)
    server.base_url = str(running.make_url("")).rstrip("/")
    return server


@pytest.fixture
def start(emulator, connect) -> Start:
    """Start an emulator that requires ``KEY`` and a client for it: ``srv, api = await start()``.

    ``options`` go to the ``Client``; other keywords are emulator knobs.
    """

    async def go(options: dict[str, Any] | None = None, **knobs: Any):
        srv = await emulator(key=KEY, **knobs)
        return srv, await connect(srv.base_url, **(options or {}))

    return go


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def created(srv: RunningEmulator) -> int:
    """Tasks the emulator created so far."""
    return int(srv.emulator.stats()["tasks_created"])


async def finished_task(api: Client) -> TaskState:
    """Submit ``JOB`` on an emulator with ``task_seconds=0`` and return its completed state."""
    state = await api.get_task((await api.submit(JOB)).task_id)
    assert state.status == "completed", state
    return state


# -- submit: success ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    [pytest.param(None, id="legacy-envelope"), pytest.param(RESPONSE_VERSION, id="versioned")],
)
async def test_submit_returns_the_created_task(start, version):
    """Both envelopes (``data`` as array or object) yield the id of the one task created."""
    srv, api = await start({"response_version": version})
    done = await api.submit(JOB)
    assert TASK_ID.fullmatch(done.task_id)
    assert (done.http_status, done.replayed) == (200, False)
    assert (await api.get_task(done.task_id)).status == "pending"
    assert created(srv) == 1


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        pytest.param(LEGACY_OK, {}, Submitted("task_legacy", 200), id="legacy"),
        pytest.param(
            {"data": {"id": "task_v", "status": "pending", "object": "generation.task"}},
            {"X-APIMart-Response-Version": RESPONSE_VERSION},
            Submitted("task_v", 200),
            id="versioned",
        ),
        pytest.param(
            {"data": {"id": "task_v", "status": "completed", "object": "generation.result"}},
            {"Idempotency-Replayed": "true"},
            Submitted("task_v", 200, replayed=True),
            id="versioned-replayed",
        ),
        pytest.param(
            LEGACY_OK,
            {"Idempotency-Replayed": "TRUE"},
            Submitted("task_legacy", 200, replayed=True),
            id="legacy-replayed-any-case",
        ),
        pytest.param(
            LEGACY_OK,
            {"Idempotency-Replayed": "false"},
            Submitted("task_legacy", 200),
            id="replayed-false",
        ),
    ],
)
async def test_submit_reads_both_envelopes_and_the_replay_header(
    echo, connect, body, headers, expected
):
    """The id comes from ``data[0].task_id`` or ``data.id``; the replay flag from its header."""
    echo.answer(200, body, headers)
    api = await connect(echo.base_url)
    assert await api.submit(JOB) == expected


async def test_grok_answers_data_as_an_object_and_the_task_is_read(start):
    """Grok's submit answer (``data: {id, ...}``, no version header) yields its one task."""
    srv, api = await start()
    grok = make_job("dog", model="grok-imagine-1.0-video-apimart", prompt="a dog", size="16:9")
    done = await api.submit(grok)
    assert TASK_ID.fullmatch(done.task_id)
    assert (await api.get_task(done.task_id)).status == "pending"
    assert created(srv) == 1


@pytest.mark.parametrize("status", [503, 404])
async def test_a_retired_model_is_unavailable_and_nothing_is_created(start, status):
    """Either assumed retired-model answer is ModelUnavailableError naming the model, never 503."""
    srv, api = await start(retired_models={"sora-2"}, unavailable_status=status)
    exc = await expect(ModelUnavailableError, api.submit(JOB))
    assert (exc.model, exc.status, exc.code) == ("sora-2", status, "model_not_found")
    assert "hint: APIMart does not serve model 'sora-2'" in exc.message
    assert created(srv) == 0


async def test_resubmitting_the_same_job_replays_its_task(start):
    """The same job twice (or an equal copy) sends one key, and the emulator creates one task."""
    srv, api = await start()
    first = await api.submit(JOB)
    again = await api.submit(replace(JOB))
    assert (again.task_id, again.replayed) == (first.task_id, True)
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["replays"]) == (1, 1)
    assert stats["max_tasks_per_idempotency_key"] == 1


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(edit(JOB, prompt="a grey wolf crossing fresh snow"), id="edited-prompt"),
        pytest.param(edit(JOB, duration=12), id="edited-duration"),
        pytest.param(edit(JOB, aspect_ratio="portrait"), id="added-field"),
        pytest.param(edit(JOB, manifest_name="weekly"), id="other-manifest"),
        pytest.param(edit(JOB, job_id="fox-snow-2"), id="other-job-id"),
    ],
)
async def test_an_edited_job_or_another_manifest_gets_a_new_key_and_task(
    start, echo, connect, other
):
    """Any change to the request, the job id or the manifest name changes the Idempotency-Key."""
    srv, api = await start()
    await api.submit(JOB)
    assert not (await api.submit(other)).replayed
    assert (created(srv), srv.emulator.stats()["replays"]) == (2, 0)
    recorder = await connect(echo.base_url)
    for job in (JOB, other, replace(JOB)):
        await recorder.submit(job)
    first, second, third = (seen.headers["Idempotency-Key"] for seen in echo.seen)
    assert first == third == JOB.idempotency_key
    assert second == other.idempotency_key != first


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(JOB, id="ascii"),
        pytest.param(
            edit(JOB, job_id="여우-눈", prompt="눈 위의 여우 🦊", manifest_name="야간 배치"),
            id="non-ascii",
        ),
        pytest.param(edit(JOB, job_id="x" * 5000, manifest_name="m" * 5000), id="very-long"),
    ],
)
def test_idempotency_key_is_1_to_191_visible_ascii(job):
    """Whatever the job's text, its key is a header the API accepts (1-191 of ``!``..``~``)."""
    assert IDEMPOTENCY_KEY.fullmatch(job.idempotency_key)


@pytest.mark.parametrize(
    ("job", "image_url", "version", "body"),
    [
        pytest.param(
            JOB,
            None,
            None,
            {"model": "sora-2", "prompt": JOB.prompt, "duration": 8},
            id="text-to-video",
        ),
        pytest.param(
            edit(JOB, duration=None, resolution="720p", image_url="https://img.test/own.png"),
            "https://img.test/uploaded.png",
            RESPONSE_VERSION,
            {
                "model": "sora-2",
                "prompt": JOB.prompt,
                "resolution": "720p",
                "image_urls": ["https://img.test/uploaded.png"],
            },
            id="image-to-video-versioned",
        ),
    ],
)
async def test_submit_sends_the_key_the_headers_and_a_minimal_body(
    echo, connect, job, image_url, version, body
):
    """One POST: Bearer key, Idempotency-Key, optional version; None fields absent, ints as ints."""
    api = await connect(echo.base_url, response_version=version)
    await api.submit(job, None if image_url is None else {**job.body(), "image_urls": [image_url]})
    [seen] = echo.seen
    assert (seen.method, seen.path_qs) == ("POST", "/v1/videos/generations")
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Idempotency-Key"] == job.idempotency_key
    assert seen.headers["Content-Type"].startswith("application/json")
    assert seen.headers.get("X-APIMart-Response-Version") == version
    sent = json.loads(seen.raw)
    assert sent == body
    assert all(value is not None for value in sent.values())
    if "duration" in body:
        assert type(sent["duration"]) is int
        assert b'"duration": 8' in seen.raw


# -- submit: every failure class ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "cls", "status", "task_exists"),
    [
        pytest.param("429", RetryableError, 429, False, id="429"),
        pytest.param("503", RetryableError, 503, False, id="503"),
        pytest.param("500", AmbiguousError, 500, True, id="500-after-create"),
        pytest.param("502", AmbiguousError, 502, True, id="502-after-create"),
        pytest.param("504", AmbiguousError, 504, True, id="504-after-create"),
        pytest.param("reset_after_create", AmbiguousError, None, True, id="reset-after-create"),
        pytest.param("html_200", AmbiguousError, 200, True, id="html-200"),
        pytest.param("401", FatalApiError, 401, False, id="401"),
        pytest.param("402", FatalApiError, 402, False, id="402"),
        pytest.param("403", FatalApiError, 403, False, id="403"),
    ],
)
async def test_each_scripted_submit_fault_has_its_exact_class(
    start, action, cls, status, task_exists
):
    """Faults before creation are retryable or fatal; after it, ambiguous: the task exists."""
    srv, api = await start()
    srv.emulator.script_submit([action])
    exc = await expect(cls, api.submit(JOB))
    assert exc.status == status
    assert SUBMIT in exc.message
    assert created(srv) == (1 if task_exists else 0)
    if task_exists:
        # The ambiguity is real: resending the same key finds the task the fault hid.
        assert (await api.submit(JOB)).replayed


async def test_a_submit_read_timeout_is_ambiguous_and_the_task_exists(start):
    """A slow answer past ``Timeouts.submit`` (0.2 s of real time) may hide a created task."""
    srv, api = await start({"timeouts": Timeouts(submit=0.2)}, slow_seconds=30)
    srv.emulator.script_submit(["slow_after_create"])
    began = time.monotonic()
    exc = await expect(AmbiguousError, api.submit(JOB))
    assert time.monotonic() - began < 5
    assert exc.status is None
    assert "no answer in time" in exc.message
    assert created(srv) == 1


class _NoDns(aiohttp.abc.AbstractResolver):
    """A resolver that knows no names, so a DNS failure needs no real lookup."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> Any:
        raise OSError(-2, "Name or service not known")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "failure", ["refused", "dns", "tls"], ids=["connection-refused", "dns-failure", "tls-failure"]
)
async def test_submit_that_never_reached_the_server_is_retryable(
    start, connect, monkeypatch, failure
):
    """Refused connection, unknown host, failed TLS handshake: nothing was sent, resend freely."""
    srv, _ = await start()
    port = srv.base_url.rpartition(":")[2]
    if failure == "dns":
        monkeypatch.setattr("aiohttp.connector.DefaultResolver", _NoDns)
    base_url = {
        "refused": f"http://127.0.0.1:{closed_port()}",
        "dns": "http://api.apimart.invalid",
        "tls": f"https://127.0.0.1:{port}",  # TLS spoken to a plain-HTTP server
    }[failure]
    api = await connect(base_url)
    exc = await expect(RetryableError, api.submit(JOB))
    assert exc.status is None
    assert exc.message.startswith(f"could not connect for {SUBMIT}")
    assert created(srv) == 0


@pytest.mark.parametrize("operation", ["submit", "get_task", "upload_image", "download"])
async def test_connection_refused_is_retryable_for_every_operation(connect, operation):
    """A closed port on 127.0.0.1 is a RetryableError whichever request was being made."""
    base_url = f"http://127.0.0.1:{closed_port()}"
    api = await connect(base_url)
    call = {
        "submit": lambda: api.submit(JOB),
        "get_task": lambda: api.get_task("task_x"),
        "upload_image": lambda: api.upload_image(PNG, "ref.png"),
        "download": lambda: api.download(base_url + "/f/video/x.mp4", io.BytesIO()),
    }[operation]
    exc = await expect(RetryableError, call())
    assert exc.status is None


def http_date(offset: float) -> str:
    """An HTTP-date ``offset`` seconds from the real now."""
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        pytest.param({"retry_after": "7"}, 7.0, id="header-seconds"),
        pytest.param(
            {"retry_after": lambda: http_date(120)},
            pytest.approx(120, abs=5),
            id="header-http-date",
        ),
        pytest.param({"retry_after": lambda: http_date(-3600)}, 0.0, id="header-date-in-the-past"),
        pytest.param({"retry_after_body": 12.0}, 12.0, id="body-retry-after"),
        pytest.param({"retry_after": "3", "retry_after_body": 12.0}, 3.0, id="header-over-body"),
        pytest.param({"retry_after": "soon"}, None, id="header-unreadable"),
        pytest.param({"retry_after": "inf"}, None, id="header-infinite"),
        pytest.param({}, None, id="no-advice"),
    ],
)
async def test_429_carries_the_servers_retry_after(start, knobs, expected):
    """Retry-After (seconds or HTTP-date), else the body's ``retry_after``, is ``.retry_after``."""
    # HTTP-dates are made here, not at collection, so they are relative to this moment.
    srv, api = await start(**{k: v() if callable(v) else v for k, v in knobs.items()})
    srv.emulator.script_submit(["429"])
    exc = await expect(RetryableError, api.submit(JOB))
    assert exc.retry_after == expected
    assert exc.code == "429"


@pytest.mark.parametrize(
    ("knobs", "script", "status", "quota"),
    [
        pytest.param({"quota": 0}, [], 402, True, id="402-balance"),
        pytest.param(
            {"quota": 0, "quota_status": 403}, [], 403, True, id="403-insufficient-user-quota"
        ),
        pytest.param({}, ["403"], 403, False, id="403-permission"),
        pytest.param({}, ["401"], 401, False, id="401-authentication"),
    ],
)
async def test_fatal_answers_tell_quota_from_auth(start, knobs, script, status, quota):
    """402 and 403 insufficient_user_quota are 'out of balance'; 401 and 403 permission are not."""
    srv, api = await start(**knobs)
    srv.emulator.script_submit(script)
    exc = await expect(FatalApiError, api.submit(JOB))
    assert exc.status == status
    assert is_quota(exc) is quota
    assert ("balance is insufficient" in exc.message) is quota
    assert created(srv) == 0


@pytest.mark.parametrize(
    ("exc", "quota"),
    [
        pytest.param(FatalApiError("APIMart answered 402", status=402), True, id="402"),
        pytest.param(
            FatalApiError("x", status=403, code="insufficient_user_quota"), True, id="403-code"
        ),
        pytest.param(FatalApiError("403: 用户额度不足", status=403), True, id="403-chinese-text"),
        pytest.param(
            FatalApiError("403: Access forbidden", status=403, code="permission_error"),
            False,
            id="403-permission",
        ),
        pytest.param(FatalApiError("401: Invalid", status=401, code="401"), False, id="401"),
    ],
)
def test_is_quota_reads_the_status_the_code_and_the_text(exc, quota):
    """402, or a quota word in the code or message, means 'out of balance'."""
    assert is_quota(exc) is quota


async def test_a_wrong_key_is_fatal_and_never_shown(start, connect):
    """The emulator refuses another key with 401; neither key appears in the error."""
    srv, _ = await start()
    wrong = "sk-test-WRONG-0987654321"
    api = await connect(srv.base_url, key=wrong)
    exc = await expect(FatalApiError, api.submit(JOB))
    assert exc.status == 401
    assert "hint: check APIMART_API_KEY" in exc.message
    assert wrong not in "".join(traceback.format_exception(exc)) + repr(exc)


async def test_a_validation_error_is_rejected_with_the_servers_message(start):
    """400 invalid_request_error is RejectedError and keeps the emulator's explanation."""
    srv, api = await start()
    exc = await expect(RejectedError, api.submit(edit(JOB, duration=7)))
    assert (exc.status, exc.code) == (400, "400")
    assert "'duration': 7 is not one of [4, 8, 12, 16, 20]" in exc.message
    assert created(srv) == 0


async def test_the_same_key_with_another_body_is_rejected(start):
    """The key ignores the uploaded URL in the body, so a new upload URL for a sent job is a 422."""
    srv, api = await start()
    await api.submit(JOB, {**JOB.body(), "image_urls": ["https://img.test/first.png"]})
    second = {**JOB.body(), "image_urls": ["https://img.test/second.png"]}
    exc = await expect(RejectedError, api.submit(JOB, second))
    assert exc.status == 422
    assert "different request body" in exc.message
    assert srv.emulator.stats()["idempotency_conflicts"] == 1


# -- every status, through the wire --------------------------------------------------------------


def envelope(status: int) -> dict[str, Any]:
    """The documented error body (§4.1) for ``status``."""
    kind, message = ERRORS.get(status, ("invalid_request_error", f"Request failed ({status})"))
    return {"error": {"code": status, "message": message, "type": kind}}


@pytest.mark.parametrize(
    ("status", "on_submit", "on_get"),
    [
        pytest.param(400, RejectedError, RejectedError, id="400"),
        pytest.param(404, RejectedError, RejectedError, id="404"),
        pytest.param(413, RejectedError, RejectedError, id="413"),
        pytest.param(422, RejectedError, RejectedError, id="422"),
        pytest.param(408, RetryableError, RetryableError, id="408"),
        pytest.param(429, RetryableError, RetryableError, id="429"),
        pytest.param(503, RetryableError, RetryableError, id="503"),
        pytest.param(500, AmbiguousError, RetryableError, id="500"),
        pytest.param(502, AmbiguousError, RetryableError, id="502"),
        pytest.param(504, AmbiguousError, RetryableError, id="504"),
        pytest.param(401, FatalApiError, FatalApiError, id="401"),
        pytest.param(402, FatalApiError, FatalApiError, id="402"),
        pytest.param(403, FatalApiError, FatalApiError, id="403"),
    ],
)
@pytest.mark.parametrize("operation", ["submit", "get_task"])
async def test_every_error_status_maps_to_one_class(
    echo, connect, status, on_submit, on_get, operation
):
    """5xx other than 503 is ambiguous for a POST but merely retryable for a GET."""
    echo.answer(status, envelope(status))
    api = await connect(echo.base_url)
    if operation == "submit":
        exc = await expect(on_submit, api.submit(JOB))
        assert SUBMIT in exc.message
    else:
        exc = await expect(on_get, api.get_task("task_x"))
        assert "GET /v1/tasks/task_x" in exc.message
    assert (exc.status, exc.code) == (status, str(status))
    assert envelope(status)["error"]["message"] in exc.message


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        pytest.param({"code": 402, "message": "no credit"}, FatalApiError, id="body-code-402"),
        pytest.param({"code": 500, "message": "upstream"}, AmbiguousError, id="body-code-500"),
        pytest.param({"code": 429, "message": "slow down"}, RetryableError, id="body-code-429"),
        pytest.param(
            {**LEGACY_OK, "error": {"message": "odd", "type": "server_error"}},
            AmbiguousError,
            id="error-object-beside-data",
        ),
        pytest.param(envelope(401), FatalApiError, id="error-envelope-401"),
        pytest.param({"code": 200, "data": []}, AmbiguousError, id="no-task-id"),
        pytest.param({"code": 200, "data": [{"status": "submitted"}]}, AmbiguousError, id="no-id"),
        pytest.param({"code": 200}, AmbiguousError, id="no-data"),
        pytest.param(["task_x"], AmbiguousError, id="json-array"),
        pytest.param(b"<html><body>OK</body></html>", AmbiguousError, id="html"),
        pytest.param(b"", AmbiguousError, id="empty"),
    ],
)
async def test_a_200_that_is_not_a_success_never_returns_a_task(echo, connect, body, cls):
    """HTTP 200 with a failing body ``code``, an ``error``, no task id or no JSON is a failure."""
    echo.answer(200, body)
    api = await connect(echo.base_url)
    exc = await expect(cls, api.submit(JOB))
    assert exc.status == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({**LEGACY_OK, "error": None}, id="error-null"),
        pytest.param({**LEGACY_OK, "error": {}}, id="error-empty"),
        pytest.param({**LEGACY_OK, "code": "200"}, id="code-as-text"),
    ],
)
async def test_gateway_spellings_of_success_are_successes(echo, connect, body):
    """``"error": null`` or ``"code": "200"`` beside a task id is a success, not 'unknown'."""
    echo.answer(200, body)
    api = await connect(echo.base_url)
    assert (await api.submit(JOB)).task_id == LEGACY_OK["data"][0]["task_id"]


async def test_an_ambiguous_answer_names_the_task_it_mentions(echo, connect):
    """A failing body that still carries a task id keeps that id in the message."""
    echo.answer(200, {**LEGACY_OK, "code": 500})
    api = await connect(echo.base_url)
    exc = await expect(AmbiguousError, api.submit(JOB))
    assert f"names task {LEGACY_OK['data'][0]['task_id']}" in exc.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"code": 500, "message": "busy"}, id="body-code-500"),
        pytest.param({"code": 200, "data": {"id": "task_x"}}, id="no-status"),
        pytest.param({"code": 200, "data": [{"status": "completed"}]}, id="data-array"),
        pytest.param(b"<html>gateway</html>", id="html"),
    ],
)
async def test_an_unreadable_task_answer_is_retryable(echo, connect, body):
    """A GET changes nothing, so a 200 the client cannot read is simply asked again."""
    echo.answer(200, body)
    api = await connect(echo.base_url)
    await expect(RetryableError, api.get_task("task_x"))
    assert echo.seen[0].path_qs == "/v1/tasks/task_x?language=en"


async def test_a_task_query_read_timeout_is_retryable(echo, connect):
    """A GET that times out after sending (0.2 s) is retryable, unlike a POST."""
    echo.delay = 5.0
    api = await connect(echo.base_url, timeouts=Timeouts(poll=0.2))
    exc = await expect(RetryableError, api.get_task("task_x"))
    assert "no answer in time" in exc.message


# -- classify, directly ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "raw", "mutating", "cls"),
    [
        pytest.param(200, {"code": 402}, b"{}", True, FatalApiError, id="200-code-402"),
        pytest.param(200, {"code": 500}, b"{}", True, AmbiguousError, id="200-code-500-post"),
        pytest.param(200, {"code": 500}, b"{}", False, RetryableError, id="200-code-500-get"),
        pytest.param(
            200, {"error": {"message": "x"}}, b"{}", True, AmbiguousError, id="200-error-object"
        ),
        pytest.param(
            200,
            {"code": 200, "error": {"code": 402, "message": "Insufficient balance"}},
            b"{}",
            True,
            FatalApiError,
            id="200-error-code-402",
        ),
        pytest.param(
            200, {"code": 200, "data": [{}]}, b"{}", True, AmbiguousError, id="200-no-task-id"
        ),
        pytest.param(200, None, b"<html>", True, AmbiguousError, id="200-not-json"),
        pytest.param(200, {"code": True}, b"{}", True, AmbiguousError, id="200-code-bool"),
        pytest.param(500, None, b"", False, RetryableError, id="get-500"),
        pytest.param(502, None, b"", False, RetryableError, id="get-502"),
        pytest.param(504, None, b"", False, RetryableError, id="get-504"),
        pytest.param(599, None, b"", True, AmbiguousError, id="post-599"),
        pytest.param(418, None, b"", True, RejectedError, id="other-4xx"),
    ],
)
def test_classify_maps_each_answer_to_one_class(status, body, raw, mutating, cls):
    """No combination of status and body is a success, and each has exactly one class."""
    exc = classify(status, body, raw, "POST /x", retry_after=None, mutating=mutating)
    assert type(exc) is cls
    assert exc.status == status
    assert exc.message.startswith(f"APIMart answered {status}")


def test_classify_names_what_it_could_not_read():
    """The message says the body was unreadable or empty when there is no error text."""
    unreadable = classify(200, None, b"<html>", "POST /x", retry_after=None, mutating=True)
    empty = classify(502, None, b"", "POST /x", retry_after=None, mutating=True)
    assert unreadable.message == "APIMart answered 200 OK for POST /x: unreadable body"
    assert empty.message == "APIMart answered 502 Bad Gateway for POST /x: empty body"


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        pytest.param({"retry_after": 9}, None, 9.0, id="top-level"),
        pytest.param({"error": {"retry_after": 4.5}}, None, 4.5, id="in-error"),
        pytest.param({"retry_after": 9}, 2.0, 2.0, id="header-first"),
        pytest.param({"retry_after": -3}, None, 0.0, id="negative"),
        pytest.param({"retry_after": math.inf}, None, None, id="infinite"),
        pytest.param({"retry_after": math.nan}, None, None, id="nan"),
        pytest.param({"retry_after": "9"}, None, None, id="string"),
        pytest.param({"retry_after": True}, None, None, id="bool"),
    ],
)
def test_classify_reads_retry_after_from_the_body(body, header, expected):
    """The header wins; a body value counts only when it is a finite number."""
    exc = classify(429, body, b"{}", "POST /x", retry_after=header, mutating=True)
    assert type(exc) is RetryableError
    assert exc.retry_after == expected


# -- get_task ----------------------------------------------------------------------------------


async def test_get_task_follows_the_task_on_the_fake_clock(start, fake_clock):
    """pending, then processing with rising progress, then completed with links; no sleeping."""
    srv, api = await start(task_seconds=10)
    task_id = (await api.submit(JOB)).task_id
    pending = await api.get_task(task_id)
    assert (pending.status, pending.progress, pending.terminal) == ("pending", 0, False)
    fake_clock.advance(5)
    processing = await api.get_task(task_id)
    assert processing.status == "processing"
    assert 0 < (processing.progress or 0) < 100
    assert (processing.video_urls, processing.terminal) == ((), False)
    fake_clock.advance(5)
    done = await api.get_task(task_id)
    assert (done.status, done.progress, done.terminal) == ("completed", 100, True)
    [url] = done.video_urls
    assert url.startswith(f"{srv.base_url}/f/video/") and task_id in url
    assert done.expires_at == int(fake_clock.now) + 86400
    assert (done.cost, done.error) == (pytest.approx(0.64), None)


@pytest.mark.parametrize(
    "fail_reason_field",
    [pytest.param(False, id="error-object"), pytest.param(True, id="fail-reason")],
)
async def test_a_failed_task_carries_its_reason(start, fail_reason_field):
    """The failure text comes from ``error.message`` or, on some gateways, ``fail_reason``."""
    srv, api = await start(task_seconds=0, fail_reason_field=fail_reason_field)
    srv.emulator.script_submit(["fail_task"])
    state = await api.get_task((await api.submit(JOB)).task_id)
    assert (state.status, state.terminal, state.video_urls) == ("failed", True, ())
    assert state.error in FAILURE_MESSAGES


async def test_a_url_given_as_a_string_is_one_link(start):
    """``url_as_string``: the single string is one URL, not a sequence of characters."""
    srv, api = await start(task_seconds=0, url_as_string=True)
    state = await finished_task(api)
    [url] = state.video_urls
    assert url.startswith(srv.base_url + "/f/video/")


async def test_an_unknown_task_id_is_rejected(start):
    """The API answers 400 'Invalid task ID' for an id it does not know."""
    _, api = await start()
    exc = await expect(RejectedError, api.get_task("task_00000000000000000000000000"))
    assert exc.status == 400
    assert "Invalid task ID" in exc.message


@pytest.mark.parametrize(
    ("actions", "cls", "status"),
    [
        pytest.param(["500"], RetryableError, 500, id="500"),
        pytest.param(["502"], RetryableError, 502, id="502"),
        pytest.param(["504"], RetryableError, 504, id="504"),
        pytest.param(["503"], RetryableError, 503, id="503"),
        pytest.param(["429"], RetryableError, 429, id="429"),
        # aiohttp itself resends a GET once when a reused keep-alive connection drops.
        pytest.param(["reset", "reset"], RetryableError, None, id="reset"),
        pytest.param(["401"], FatalApiError, 401, id="401"),
    ],
)
async def test_each_scripted_poll_fault_has_its_exact_class(start, actions, cls, status):
    """Polling changes nothing: server errors and drops are retryable, a refused key is fatal."""
    srv, api = await start()
    task_id = (await api.submit(JOB)).task_id
    srv.emulator.script_poll(actions)
    exc = await expect(cls, api.get_task(task_id))
    assert exc.status == status
    assert (await api.get_task(task_id)).status == "pending"


DOC_TASK = {
    "id": "task_01K9S419324DREZFBWNSVXYR6H",
    "status": "completed",
    "progress": 100,
    "result": {
        "thumbnail_url": "https://upload.apimart.ai/f/image/...-thumbnail_task_....jpg",
        "videos": [
            {
                "url": ["https://upload.apimart.ai/f/video/...-video_task_....mp4"],
                "expires_at": 1762940095,
            }
        ],
    },
    "created": 1762853430,
    "completed": 1762853695,
    "estimated_time": 600,
    "actual_time": 265,
}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            DOC_TASK,
            TaskState(
                task_id="task_doc",
                status="completed",
                progress=100,
                video_urls=("https://upload.apimart.ai/f/video/...-video_task_....mp4",),
                expires_at=1762940095,
                thumbnail_url="https://upload.apimart.ai/f/image/...-thumbnail_task_....jpg",
            ),
            id="doc-example",
        ),
        pytest.param(
            {
                "status": "completed",
                "cost": 0.32,
                "result": {
                    "videos": [
                        {"url": "https://v.test/a.mp4", "expires_at": 200, "thumbnail_url": "t"},
                        {"url": ["https://v.test/b.mp4", 7], "expires_at": 100},
                        "junk",
                    ]
                },
            },
            TaskState(
                task_id="task_doc",
                status="completed",
                video_urls=("https://v.test/a.mp4", "https://v.test/b.mp4"),
                expires_at=100,
                thumbnail_url="t",
                cost=0.32,
            ),
            id="mixed-videos",
        ),
        pytest.param(
            {"status": "failed", "progress": 99, "fail_reason": "moderation"},
            TaskState("task_doc", "failed", progress=99, error="moderation"),
            id="fail-reason",
        ),
        pytest.param(
            {"status": "failed", "error": {"code": "x", "message": "blocked", "type": "t"}},
            TaskState("task_doc", "failed", error="blocked"),
            id="error-object",
        ),
        pytest.param(
            {"status": "processing", "progress": 42.0, "result": None},
            TaskState("task_doc", "processing", progress=42),
            id="processing",
        ),
    ],
)
def test_parse_task_normalises_the_documented_shapes(data, expected):
    """The §3 example and its real-world variants parse into the same ``TaskState``."""
    assert parse_task("task_doc", data) == expected


# -- upload_image --------------------------------------------------------------------------------


async def test_upload_returns_a_url_that_serves_the_image(start, fake_clock):
    """The answer's ``url`` and ``created_at`` come back, and the link serves the same bytes."""
    srv, api = await start()
    uploaded = await api.upload_image(PNG, "ref image.png")
    assert uploaded.url.startswith(srv.base_url + "/f/image/")
    assert uploaded.url.endswith(".png")
    assert uploaded.created_at == fake_clock.now
    out = io.BytesIO()
    assert await api.download(uploaded.url, out) == len(PNG)
    assert out.getvalue() == PNG


@pytest.mark.parametrize(
    ("content", "status", "text"),
    [
        pytest.param(
            PNG + bytes(UPLOAD_MAX_BYTES), 413, f"exceeds maximum {UPLOAD_MAX_BYTES}", id="413-big"
        ),
        pytest.param(b"plain text", 400, "unsupported file type", id="400-not-an-image"),
    ],
)
async def test_an_unacceptable_upload_is_rejected(start, content, status, text):
    """Over 20 MB is 413 and a non-image is 400: both RejectedError with the server's words."""
    srv, api = await start()
    exc = await expect(RejectedError, api.upload_image(content, "big.png"))
    assert (exc.status, exc.code) == (status, "invalid_request_error")
    assert text in exc.message
    assert srv.emulator.stats()["uploads"] == 0


@pytest.mark.parametrize(
    ("action", "cls", "stored"),
    [
        pytest.param("429", RetryableError, 0, id="429"),
        pytest.param("503", RetryableError, 0, id="503"),
        pytest.param("500", AmbiguousError, 1, id="500-after-store"),
        pytest.param("502", AmbiguousError, 1, id="502-after-store"),
        pytest.param("reset_after_create", AmbiguousError, 1, id="reset-after-store"),
    ],
)
async def test_each_scripted_upload_fault_has_its_exact_class(start, action, cls, stored):
    """An upload has no idempotency key, so a failure after the server stored it is ambiguous."""
    srv, api = await start()
    srv.emulator.script_upload([action])
    await expect(cls, api.upload_image(PNG, "ref.png"))
    assert srv.emulator.stats()["uploads"] == stored


# -- download ------------------------------------------------------------------------------------


async def test_download_is_byte_identical(start):
    """The streamed file equals the emulator's video for the task, and its size is returned."""
    _, api = await start(task_seconds=0)
    state = await finished_task(api)
    out = io.BytesIO()
    size = await api.download(state.video_urls[0], out)
    assert out.getvalue() == video_bytes(state.task_id)
    assert size == len(video_bytes(state.task_id))


@pytest.mark.parametrize(
    ("action", "cls", "status"),
    [
        pytest.param("reset", RetryableError, None, id="reset-mid-stream"),
        pytest.param("500", RetryableError, 500, id="500"),
        pytest.param("503", RetryableError, 503, id="503"),
        pytest.param("403", RejectedError, 403, id="403"),
        pytest.param("404", RejectedError, 404, id="404"),
    ],
)
async def test_each_scripted_download_fault_has_its_exact_class(start, action, cls, status):
    """A torn or failed transfer is retryable; a refused link is rejected."""
    srv, api = await start(task_seconds=0)
    state = await finished_task(api)
    srv.emulator.script_download([action])
    exc = await expect(cls, api.download(state.video_urls[0], io.BytesIO()))
    assert exc.status == status


async def test_an_expired_link_is_rejected(start, fake_clock):
    """Past ``expires_at`` the link that worked before answers 403: RejectedError, no retry."""
    _, api = await start(task_seconds=0)
    state = await finished_task(api)
    await api.download(state.video_urls[0], io.BytesIO())
    fake_clock.advance((state.expires_at or 0) - fake_clock.now)
    exc = await expect(RejectedError, api.download(state.video_urls[0], io.BytesIO()))
    assert exc.status == 403
    assert "expired" in exc.message


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_download_is_not_mistaken_for_a_short_one(echo, connect, encoding):
    """Content-Length counts encoded bytes; the decoded file is complete, not 'ended early'."""
    video = video_bytes("task_x", size=50_000)
    packed = gzip.compress(video) if encoding == "gzip" else zlib.compress(video)
    echo.answer(200, packed, {"Content-Encoding": encoding})
    api = await connect(echo.base_url)
    out = io.BytesIO()
    assert await api.download(echo.base_url + "/f/video/x.mp4", out) == len(video)
    assert out.getvalue() == video


async def test_download_sends_no_authorization(echo, connect):
    """A signed CDN link gets no Bearer key: the key never leaves for the file host."""
    echo.answer(200, b"video")
    api = await connect(echo.base_url)
    assert await api.download(echo.base_url + "/f/video/x.mp4", io.BytesIO()) == 5
    assert "Authorization" not in echo.seen[0].headers


# -- secrecy and small helpers -------------------------------------------------------------------


async def test_the_key_shows_in_no_repr(start):
    """``Secret`` and ``Client`` reprs hide the key, though the key is what authenticates."""
    _, api = await start()
    await api.submit(JOB)  # the emulator requires KEY: it was sent
    secret = Secret(KEY)
    shown = [repr(api), str(api), repr(secret), str(secret), f"{secret}", f"{secret!r}"]
    assert not [text for text in shown if KEY in text]
    assert secret.reveal() == KEY


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(RetryableError(f"boom {KEY}"), id="in-message"),
        pytest.param(RuntimeError("x", {"Authorization": f"Bearer {KEY}"}), id="in-args"),
    ],
)
def test_the_key_check_catches_a_leak(exc):
    """``assert_no_key`` fails when the key is in a message or an argument."""
    with pytest.raises(AssertionError, match="leaked"):
        assert_no_key(exc)


def test_a_leak_through_the_cause_chain_is_caught():
    """``assert_no_key`` follows ``__cause__`` too."""
    try:
        try:
            raise ValueError(KEY)
        except ValueError as inner:
            raise RetryableError("outer") from inner
    except RetryableError as exc:
        with pytest.raises(AssertionError, match="leaked"):
            assert_no_key(exc)


async def test_a_client_outside_async_with_refuses_to_work():
    """Using the client before ``async with`` is a clear RuntimeError, not an AttributeError."""
    api = Client("http://127.0.0.1:9", Secret(KEY))
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        await api.submit(JOB)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"APIMART_API_KEY": f"  {KEY}\n"}, KEY, id="stripped"),
        pytest.param({"APIMART_API_KEY": "  "}, None, id="blank"),
        pytest.param({}, None, id="unset"),
    ],
)
def test_api_key_from_env(environ, expected):
    """The key is read from APIMART_API_KEY, stripped; blank or unset is None."""
    assert api_key_from_env(environ) == expected


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, True), (0o644, True)])
def test_key_file_warning_flags_readable_files(tmp_path, mode, warned):
    """A key file others can read gets a warning with the chmod fix; 600 gets none."""
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(mode)
    warning = key_file_warning(str(path))
    assert (warning is not None) is warned
    if warning:
        assert f"mode {mode:o}" in warning and "hint: chmod 600" in warning
        assert KEY not in warning


# -- RetryPolicy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0), (5000, 60.0)],
)
def test_wait_ceiling_grows_exponentially_up_to_wait_max(monkeypatch, attempt, ceiling):
    """Full jitter draws from [0, ceiling]; huge attempt numbers stay at ``wait_max``."""
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr("runner.api.retry.random.uniform", uniform)
    assert RetryPolicy().wait(attempt) == ceiling
    assert bounds == [(0.0, ceiling)]


def test_wait_is_spread_over_the_whole_range(monkeypatch):
    """Real draws cover [0, ceiling], so workers that failed together do not retry together."""
    monkeypatch.setattr("runner.api.retry.random", random.Random(20261111))
    waits = [RetryPolicy().wait(4) for _ in range(400)]
    assert all(0.0 <= w <= 8.0 for w in waits)
    assert min(waits) < 0.5 and max(waits) > 7.5
    assert sum(waits) / len(waits) == pytest.approx(4.0, abs=0.5)


@pytest.mark.parametrize(
    ("policy", "attempt", "retry_after", "expected"),
    [
        pytest.param(RetryPolicy(), 1, 30.0, 30.0, id="server-asks-longer"),
        pytest.param(RetryPolicy(), 7, 5.0, 60.0, id="backoff-longer"),
        pytest.param(RetryPolicy(), 1, None, 1.0, id="no-advice"),
        pytest.param(NO_WAIT, 3, None, 0.0, id="no-wait"),
        pytest.param(NO_WAIT, 3, 2.5, 2.5, id="no-wait-still-honours-retry-after"),
    ],
)
def test_retry_after_is_a_floor(monkeypatch, policy, attempt, retry_after, expected):
    """The wait is the larger of our jittered backoff and the server's Retry-After."""
    monkeypatch.setattr("runner.api.retry.random.uniform", lambda low, high: high)
    assert policy.wait(attempt, retry_after) == expected


@pytest.mark.parametrize(
    ("make", "name"),
    [
        pytest.param(lambda: RetryPolicy(attempts=0), "'attempts'", id="attempts-0"),
        pytest.param(lambda: RetryPolicy(attempts=-2), "'attempts'", id="attempts-negative"),
        pytest.param(lambda: RetryPolicy().with_attempts(0), "'attempts'", id="with-attempts-0"),
        pytest.param(lambda: RetryPolicy(timeout=0), "'timeout'", id="timeout-0"),
        pytest.param(lambda: RetryPolicy(timeout=-1.0), "'timeout'", id="timeout-negative"),
        pytest.param(lambda: RetryPolicy(timeout=math.nan), "'timeout'", id="timeout-nan"),
    ],
)
def test_bad_bounds_raise_valueerror_naming_the_parameter(make, name):
    """``attempts`` must be >= 1 and ``timeout`` > 0; the message names the parameter."""
    with pytest.raises(ValueError, match=name):
        make()


async def test_a_slow_download_never_holds_up_a_submission(echo, connect):
    """Downloads have their own connections: with pool=1, a hung download leaves POSTs free."""
    api = await connect(echo.base_url, pool=1, timeouts=Timeouts(submit=2.0, connect=1.0))
    echo.delay = 5.0  # the first request (the download) hangs
    download = asyncio.create_task(api.download(echo.base_url + "/video.mp4", io.BytesIO()))
    while not echo.seen:
        await asyncio.sleep(0.01)
    echo.delay = 0.0
    done = await api.submit(JOB)
    assert done.task_id == LEGACY_OK["data"][0]["task_id"]
    download.cancel()
    with pytest.raises(asyncio.CancelledError):
        await download


@pytest.mark.parametrize(
    ("given", "status"),
    [
        pytest.param("completed", "completed", id="documented"),
        pytest.param("SUCCEEDED", "completed", id="succeeded"),
        pytest.param("failure", "failed", id="failure"),
        pytest.param("canceled", "cancelled", id="us-spelling"),
        pytest.param("queued", "pending", id="queued"),
        pytest.param("in_progress", "processing", id="in-progress"),
        pytest.param("mystery", "processing", id="unheard-of"),
    ],
)
def test_task_statuses_are_normalised(given, status):
    """Other spellings map to the documented statuses; an unknown one keeps the task polled."""
    state = parse_task("task_x", {"status": given, "progress": 5})
    assert state.status == status
    assert state.terminal == (status in ("completed", "failed", "cancelled"))
