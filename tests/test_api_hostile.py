"""A hostile APIMart: every answer, however malformed, ends in one documented outcome.

Each submit mode and each poll mode is one answer a loopback server gives: wrong types,
missing fields, bad task ids, huge or deep bodies, non-JSON, broken HTTP framing, redirects,
a key echoed back, absurd waits, a retired model. Each must end in exactly the documented
class (``RetryableError`` / ``AmbiguousError`` / ``RejectedError`` / ``FatalApiError``, or
``ModelUnavailableError``) or in an exact ``Submitted`` / ``TaskState``; nothing else may
escape, the key may show nowhere, and no request may reach another origin.

Answers may hold ``@AUTH@`` and ``@KEY@``: the server replaces them with the Authorization
header it received and its token, so an echo is what a real server would echo.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from keyguard import key_guards

from runner.api.answers import MAX_ANSWER_BYTES, Submitted, TaskState, valid_task_id
from runner.api.retry import MAX_SERVER_WAIT
from runner.api.secret import Secret, scrub
from runner.errors import (
    AmbiguousError,
    ApiError,
    FatalApiError,
    ModelUnavailableError,
    RejectedError,
    RetryableError,
)

pytestmark = pytest.mark.usefixtures("no_key_in_logs")
KEY = "sk-hostile-7f3a9c1e5b2d4680aa"
TID = "task_01K8SGYNNNVBQTXNR4MM964S7K"
VIDEO = "https://upload.apimart.ai/f/video/1-video_task.mp4"
THUMB = "https://upload.apimart.ai/f/image/1-thumbnail_task.jpg"


@dataclass(frozen=True)
class StubJob:
    """What ``Client.submit`` reads of a job: its body and its Idempotency-Key, nothing else."""

    request: Mapping[str, Any]
    idempotency_key: str = "apimart-batch-hostile-0001"

    def body(self, uploaded: object = None) -> dict[str, Any]:
        """The request body to send."""
        return dict(self.request)


JOB = StubJob({"model": "sora-2", "prompt": "a red fox crossing fresh snow", "duration": 8})


# -- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One well-framed HTTP answer, served by aiohttp.web."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"
    chunked: bool = False


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are on the socket after the request was read, then a close."""

    data: bytes


def js(value: object, status: int = 200, **headers: str) -> Reply:
    """A JSON answer (NaN and Infinity written as the literals Python's json writes)."""
    return Reply(status, json.dumps(value).encode(), headers)


def text(body: bytes, status: int = 200, content_type: str = "text/html", **hdrs: str) -> Reply:
    """A non-JSON answer."""
    return Reply(status, body, hdrs, content_type)


def legacy(task_id: object = TID, **extra: object) -> dict[str, object]:
    """The documented submit success with ``task_id`` (apimart-api.md §1.2)."""
    return {"code": 200, "data": [{"status": "submitted", "task_id": task_id}], **extra}


def envelope(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, object]:
    """The documented error envelope (apimart-api.md §4.1)."""
    return {"error": {"code": status, "message": message, "type": kind}}


def nested(depth: int) -> str:
    """JSON text of ``depth`` nested arrays."""
    return "[" * depth + "]" * depth


def http(status_line: bytes, body: bytes = b"", *headers: bytes) -> Raw:
    """A raw answer with a Content-Length that matches ``body``."""
    head = b"\r\n".join((status_line, *headers, b"Content-Length: %d" % len(body)))
    return Raw(head + b"\r\n\r\n" + body)


OK_BODY = json.dumps(legacy()).encode()


@dataclass(frozen=True)
class Fail:
    """The expected failure: its exact class, and optionally its status, wait and words."""

    cls: type[ApiError]
    status: object = ...
    retry_after: object = ...
    contains: str = ""


# -- the hostile server ---------------------------------------------------------------------------


@dataclass
class Hostile:
    """A web server and a raw-socket server on 127.0.0.1 answering whatever ``reply`` says."""

    reply: Reply | Raw = field(default_factory=Reply)
    web_url: str = ""
    raw_url: str = ""
    seen: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    elsewhere_auth: list[str | None] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """Where the client should send its requests for the current ``reply``."""
        return self.raw_url if isinstance(self.reply, Raw) else self.web_url

    @property
    def other_origin(self) -> str:
        """The same web server under another origin (``localhost``, not ``127.0.0.1``)."""
        return self.web_url.replace("127.0.0.1", "localhost") + "/elsewhere"

    @staticmethod
    def _fill(data: bytes, auth: str) -> bytes:
        token = auth.removeprefix("Bearer ")
        return data.replace(b"@AUTH@", auth.encode()).replace(b"@KEY@", token.encode())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer with ``reply``; a request to ``/elsewhere`` is only counted."""
        await request.read()
        if request.path.startswith("/elsewhere"):
            self.elsewhere.append(f"{request.method} {request.path_qs}")
            self.elsewhere_auth.append(request.headers.get("Authorization"))
            return web.Response(status=200, body=OK_BODY, content_type="application/json")
        self.seen.append(f"{request.method} {request.path_qs}")
        reply = self.reply
        assert isinstance(reply, Reply)
        auth = request.headers.get("Authorization", "")
        headers = {
            name: self._fill(value.replace("@ELSEWHERE@", self.other_origin).encode(), auth)
            .decode()
            for name, value in reply.headers.items()
        }
        body = self._fill(reply.body, auth)
        if reply.chunked:
            stream = web.StreamResponse(status=reply.status, headers=headers)
            stream.enable_chunked_encoding()
            await stream.prepare(request)
            for start in range(0, len(body), 1 << 16):
                await stream.write(body[start : start + (1 << 16)])
            await stream.write_eof()
            return stream
        return web.Response(
            status=reply.status, body=body, headers=headers, content_type=reply.content_type
        )

    async def handle_raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request, write the raw answer, close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.seen.append(" ".join(lines[0].split(" ")[:2]))
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(fields.get("Content-Length", "0"))
            if length:
                await reader.readexactly(length)
            reply = self.reply
            assert isinstance(reply, Raw)
            writer.write(self._fill(reply.data, fields.get("Authorization", "")))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def hostile(aiohttp_server: Any) -> AsyncIterator[Hostile]:
    """Both hostile servers, started on 127.0.0.1 and stopped after the test."""
    server = Hostile()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    running = await aiohttp_server(app)  # its handlers are cancelled when a client hangs up
    server.web_url = str(running.make_url("")).rstrip("/")
    raw = await asyncio.start_server(server.handle_raw, "127.0.0.1", 0)
    server.raw_url = f"http://127.0.0.1:{raw.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        raw.close()
        await raw.wait_closed()


assert_no_key = key_guards(KEY)[0]


def assert_printable(message: str) -> None:
    """Every line of a message is printable: server text cannot move a cursor or forge a line."""
    lines = message.split("\n")
    assert lines[0].isprintable(), lines[0][:200]
    assert all(line.startswith("  hint: ") and line.isprintable() for line in lines[1:]), message


async def outcome(call: Awaitable[object], expected: object) -> object:
    """Await ``call`` and check it ends as ``expected`` (a value, or a ``Fail``)."""
    if not isinstance(expected, Fail):
        value = await call
        assert value == expected
        assert KEY not in repr(value)
        return value
    try:
        await call
    except ApiError as exc:
        assert type(exc) is expected.cls, f"expected {expected.cls.__name__}, got {exc!r}"
        assert_no_key(exc)
        assert_printable(exc.message)
        assert len(exc.message) < 3000
        assert expected.status is ... or exc.status == expected.status
        assert expected.retry_after is ... or exc.retry_after == expected.retry_after
        assert expected.contains in exc.message
        return exc
    pytest.fail(f"expected {expected.cls.__name__}, got a result")


AMBIGUOUS, REJECTED, RETRYABLE, FATAL = (Fail(c) for c in (
    AmbiguousError, RejectedError, RetryableError, FatalApiError))  # fmt: skip
GONE = Fail(ModelUnavailableError, contains="sora-2")
CREATED = Submitted(TID, 200)


def data_is(value: object) -> dict[str, object]:
    """A submit answer whose ``data`` is ``value``."""
    return {"code": 200, "data": value}


# -- submit: at least 60 modes ---------------------------------------------------------------------

SUBMIT_MODES = [
    # Successes in every shape a gateway uses.
    pytest.param(js(legacy()), CREATED, id="legacy-data-array"),
    pytest.param(js(data_is({"id": TID, "status": "submitted"})), CREATED, id="grok-data-object"),
    pytest.param(
        js({"data": {"id": TID, "status": "pending", "object": "generation.task"},
            "request_id": "req_1"}), CREATED, id="versioned-data-object"),
    pytest.param(js(data_is({"task_id": TID})), CREATED, id="data-object-task-id"),
    pytest.param(js({**legacy(), "code": "200"}), CREATED, id="code-as-text"),
    pytest.param(js(legacy(), 201), Submitted(TID, 201), id="201-created"),
    pytest.param(js(legacy("task-unified-1762853430-ab12cd34")),
                 Submitted("task-unified-1762853430-ab12cd34", 200), id="old-style-id"),
    pytest.param(js(legacy("t" * 128)), Submitted("t" * 128, 200), id="id-128-chars"),
    pytest.param(js(data_is([{"task_id": TID}, {"task_id": TID}])), CREATED, id="same-task-twice"),
    pytest.param(text(OK_BODY), CREATED, id="json-as-text-html"),
    pytest.param(text(b"\xef\xbb\xbf" + OK_BODY), CREATED, id="utf8-bom"),
    pytest.param(js(legacy(cost=float("nan"))), CREATED, id="nan-in-other-field"),
    pytest.param(text(OK_BODY[:-1] + b', "x": 1e400}'), CREATED, id="1e400-in-other-field"),
    pytest.param(text(OK_BODY[:-1] + b', "x": ' + nested(60).encode() + b"}"), CREATED,
                 id="depth-61-in-other-field"),
    pytest.param(Raw(b"HTTP/1.0 200 OK\r\n\r\n" + OK_BODY), CREATED, id="http10-until-close"),
    pytest.param(Raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                     % len(OK_BODY) + OK_BODY), CREATED, id="100-continue-first"),
    # The task id has the wrong type.
    pytest.param(js(legacy(5)), AMBIGUOUS, id="id-int"),
    pytest.param(js(legacy(5.5)), AMBIGUOUS, id="id-float"),
    pytest.param(js(legacy([TID])), AMBIGUOUS, id="id-list"),
    pytest.param(js(legacy({TID: TID})), AMBIGUOUS, id="id-dict"),
    pytest.param(js(legacy(None)), AMBIGUOUS, id="id-null"),
    pytest.param(js(legacy(True)), AMBIGUOUS, id="id-bool"),
    pytest.param(js(legacy("")), AMBIGUOUS, id="id-empty"),
    pytest.param(js(legacy(float("nan"))), AMBIGUOUS, id="id-nan"),
    # The task id is a string, but not a token we may store and put in a URL.
    pytest.param(js(legacy("t" * 1_000_000)), Fail(AmbiguousError, contains="1000000 chars"),
                 id="id-1mb"),
    pytest.param(js(legacy("task_1\r\nSet-Cookie: x=1")), AMBIGUOUS, id="id-crlf"),
    pytest.param(js(legacy("task_1\x00")), AMBIGUOUS, id="id-nul"),
    pytest.param(js(legacy("../../v1/balance")), Fail(AmbiguousError, contains="../../v1/balance"),
                 id="id-path-traversal"),
    pytest.param(js(legacy("task/1")), AMBIGUOUS, id="id-slash"),
    pytest.param(js(legacy("task_1?language=zh")), AMBIGUOUS, id="id-query"),
    pytest.param(js(legacy("task_1#x")), AMBIGUOUS, id="id-fragment"),
    pytest.param(js(legacy("task 1")), AMBIGUOUS, id="id-space"),
    pytest.param(js(legacy("task_ü")), AMBIGUOUS, id="id-non-ascii"),
    pytest.param(js(legacy("task..1")), AMBIGUOUS, id="id-dotdot"),
    pytest.param(js(legacy("-task")), AMBIGUOUS, id="id-leading-dash"),
    pytest.param(js(legacy("t" * 129)), AMBIGUOUS, id="id-129-chars"),
    pytest.param(js(legacy("task%2F..%2Fx")), AMBIGUOUS, id="id-percent-encoded"),
    pytest.param(js(legacy("task_\ud800")), AMBIGUOUS, id="id-lone-surrogate"),
    pytest.param(js(legacy("\x1b[2Jtask")), AMBIGUOUS, id="id-ansi-escape"),
    pytest.param(js(legacy("@KEY@")), Fail(AmbiguousError, contains="[REDACTED]"),
                 id="id-is-the-key"),
    # ``data`` in every wrong shape.
    pytest.param(js(data_is(None)), AMBIGUOUS, id="data-null"),
    pytest.param(js(data_is(TID)), AMBIGUOUS, id="data-string"),
    pytest.param(js(data_is(5)), AMBIGUOUS, id="data-number"),
    pytest.param(js(data_is([])), AMBIGUOUS, id="data-empty-array"),
    pytest.param(js(data_is([TID])), AMBIGUOUS, id="data-array-of-strings"),
    pytest.param(js(data_is([None, {"task_id": TID}])), AMBIGUOUS, id="data-first-entry-null"),
    pytest.param(js(data_is([{"task_id": TID}, {"task_id": "task_OTHER"}])),
                 Fail(AmbiguousError, contains="task_OTHER"), id="data-two-tasks"),
    pytest.param(js(data_is({})), AMBIGUOUS, id="data-empty-object"),
    pytest.param(js(data_is({"status": "submitted"})), AMBIGUOUS, id="data-object-without-id"),
    # The envelope is wrong, or claims a failure.
    pytest.param(js([{"task_id": TID}]), AMBIGUOUS, id="body-json-array"),
    pytest.param(js(TID), AMBIGUOUS, id="body-json-string"),
    pytest.param(js(200), AMBIGUOUS, id="body-json-number"),
    pytest.param(js(None), AMBIGUOUS, id="body-json-null"),
    pytest.param(js({"code": 200}), AMBIGUOUS, id="no-data"),
    pytest.param(js({**legacy(), "code": 500}), Fail(AmbiguousError, contains=f"names task {TID}"),
                 id="200-with-code-500"),
    pytest.param(js({"code": 400, "message": "bad"}), REJECTED, id="200-with-code-400"),
    pytest.param(js({"code": 401, "message": "who"}), FATAL, id="200-with-code-401"),
    pytest.param(js({"code": 429, "message": "slow"}), RETRYABLE, id="200-with-code-429"),
    pytest.param(js({**legacy(), "code": "500"}), AMBIGUOUS, id="200-with-code-text-500"),
    pytest.param(js({**legacy(), "code": float("nan")}), AMBIGUOUS, id="200-with-code-nan"),
    pytest.param(js({**legacy(), "code": 10**30}), AMBIGUOUS, id="200-with-huge-code"),
    pytest.param(js({**legacy(), "error": {"message": "odd"}}), AMBIGUOUS,
                 id="200-error-beside-data"),
    pytest.param(js({**legacy(), "error": "odd"}), AMBIGUOUS, id="200-error-as-string"),
    pytest.param(js({"code": 200, "error": {"code": 402, "message": "Insufficient balance"}}),
                 FATAL, id="200-with-error-code-402"),
    # Not JSON, not whole, or not bounded.
    pytest.param(text(b"<html><body>OK</body></html>"), AMBIGUOUS, id="html-200"),
    pytest.param(text(b"<html>Internal Server Error</html>", 500), AMBIGUOUS, id="html-500"),
    pytest.param(text(b"<html><h1>502 Bad Gateway</h1></html>", 502), AMBIGUOUS, id="html-502"),
    pytest.param(text(b"<html>Bad Request</html>", 400), REJECTED, id="html-400"),
    pytest.param(text(b"<html>Too Many Requests</html>", 429), RETRYABLE, id="html-429"),
    pytest.param(text(b"OK", content_type="text/plain"), AMBIGUOUS, id="text-plain-ok"),
    pytest.param(text(b""), Fail(AmbiguousError, contains="empty body"), id="empty-200"),
    pytest.param(text(b"", 201), AMBIGUOUS, id="empty-201"),
    pytest.param(Reply(204, content_type=None), AMBIGUOUS, id="204-no-content"),
    pytest.param(text(OK_BODY[:30]), AMBIGUOUS, id="truncated-json"),
    pytest.param(text(OK_BODY + b"garbage"), AMBIGUOUS, id="trailing-garbage"),
    pytest.param(text(b'{"code":200,"data":[{"task_id":"task_\xff\xfe"}]}'), AMBIGUOUS,
                 id="invalid-utf8"),
    pytest.param(text(b"\x00" * 64), AMBIGUOUS, id="nul-bytes"),
    pytest.param(text(nested(100_000).encode()), AMBIGUOUS, id="deep-nesting-100k"),
    pytest.param(text(OK_BODY[:-1] + b', "x": ' + nested(100).encode() + b"}"), AMBIGUOUS,
                 id="deep-nesting-100"),
    pytest.param(text(OK_BODY[:-1] + b', "x": ' + b"9" * 5000 + b"}"), AMBIGUOUS,
                 id="int-of-5000-digits"),
    pytest.param(text(OK_BODY[:-1] + b', "pad": "' + b"x" * (2 * MAX_ANSWER_BYTES) + b'"}'),
                 Fail(AmbiguousError, contains="larger than"), id="body-over-1mib"),
    pytest.param(Reply(200, OK_BODY[:-1] + b', "pad": "' + b"x" * (2 * MAX_ANSWER_BYTES) + b'"}',
                       chunked=True),
                 AMBIGUOUS, id="chunked-body-over-1mib"),
    pytest.param(js(envelope(400, "x" * (2 * MAX_ANSWER_BYTES)), 400), REJECTED,
                 id="400-over-1mib"),
    pytest.param(js(envelope(400, "\x1b[31mred\x1b[0m \u202eevil\r\nforged: line\ud800"), 400),
                 REJECTED, id="400-unicode-garbage"),
    # Status codes the client must not follow or trust.
    *(pytest.param(Reply(code, b"", {"Location": "@ELSEWHERE@"}), AMBIGUOUS, id=f"{code}-redirect")
      for code in (300, 301, 302, 303, 307, 308)),
    pytest.param(Reply(304, content_type=None), AMBIGUOUS, id="304-not-modified"),
    pytest.param(js(envelope(418, "teapot"), 418), REJECTED, id="418"),
    pytest.param(js(envelope(451, "legal"), 451), REJECTED, id="451"),
    pytest.param(js(envelope(599, "odd"), 599), AMBIGUOUS, id="599"),
    # Broken HTTP framing.
    pytest.param(Raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), AMBIGUOUS, id="101-only"),
    pytest.param(Raw(b"HTTP/1.1 102 Processing\r\n\r\n"), AMBIGUOUS, id="102-then-close"),
    pytest.param(http(b"HTTP/1.1 999 Weird", OK_BODY), AMBIGUOUS, id="status-999"),
    pytest.param(Raw(b"GARBAGE @KEY@\r\n\r\n"), AMBIGUOUS, id="garbage-status-line"),
    pytest.param(Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + OK_BODY[:20]),
                 AMBIGUOUS, id="truncated-content-length"),
    pytest.param(Raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"code\":200,"),
                 AMBIGUOUS, id="truncated-chunked"),
    pytest.param(Raw(b""), AMBIGUOUS, id="close-without-answer"),
    pytest.param(http(b"HTTP/1.1 200 OK", OK_BODY, b"X-Pad: " + b"a" * 70_000), AMBIGUOUS,
                 id="huge-header"),
    pytest.param(Raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}"), AMBIGUOUS,
                 id="bad-content-length"),
    pytest.param(http(b"HTTP/1.1 200 OK", OK_BODY, b"@AUTH@"), AMBIGUOUS, id="echo-as-header-line"),
    pytest.param(http(b"HTTP/1.1 500 @AUTH@"), AMBIGUOUS, id="echo-in-reason-phrase"),
    pytest.param(http(b"HTTP/1.1 200 OK", b"abcd", b"Content-Encoding: gzip"), AMBIGUOUS,
                 id="bad-gzip"),
    # The server echoes the key.
    pytest.param(js(envelope(401, "bad credentials: @AUTH@", "authentication_error"), 401),
                 FATAL, id="401-echoes-authorization"),
    pytest.param(js(envelope(500, "upstream said Authorization: @AUTH@", "server_error"), 500),
                 Fail(AmbiguousError, contains="[REDACTED]"), id="500-echoes-authorization"),
    pytest.param(js(envelope(400, "key @KEY@ is not valid for this request"), 400),
                 Fail(RejectedError, contains="key [REDACTED] is"), id="400-echoes-key"),
    pytest.param(js({"error": {"code": "@KEY@", "message": "no", "type": "permission_error"}}, 403),
                 FATAL, id="403-echoes-key-as-code"),
    pytest.param(js(envelope(429, '{"Authorization": "@AUTH@"}', "rate_limit_error"), 429),
                 RETRYABLE, id="429-echoes-headers-as-json"),
    pytest.param(text(b"<pre>Authorization: @AUTH@</pre>", 502), AMBIGUOUS, id="502-html-echo"),
    pytest.param(Reply(307, b"", {"Location": "https://evil.test/?k=@KEY@"}), AMBIGUOUS,
                 id="307-echoes-key-in-location"),
    pytest.param(js({**legacy(), "code": 500, "message": "bearer @KEY@"}), AMBIGUOUS,
                 id="200-code-500-echoes-bearer"),
    # Waits the server asks for.
    pytest.param(js(envelope(429, "slow"), 429, **{"Retry-After": "99999999"}),
                 Fail(RetryableError, retry_after=MAX_SERVER_WAIT), id="retry-after-99999999"),
    pytest.param(text(b'{"error": {"code": 429, "message": "slow"}, "retry_after": 1e300}', 429),
                 Fail(RetryableError, retry_after=MAX_SERVER_WAIT), id="retry-after-body-1e300"),
    pytest.param(js(envelope(429, "slow"), 429, **{"Retry-After": "nan"}),
                 Fail(RetryableError, retry_after=None), id="retry-after-nan"),
    pytest.param(js(envelope(429, "slow"), 429, **{"Retry-After": "-30"}),
                 Fail(RetryableError, retry_after=0.0), id="retry-after-negative"),
    pytest.param(js(envelope(503, "busy"), 503, **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
                 Fail(RetryableError, retry_after=0.0), id="retry-after-date-in-the-past"),
    pytest.param(js(envelope(503, "busy"), 503, **{"Retry-After": "Sun, 99 Foo 99999 99:99:99"}),
                 Fail(RetryableError, retry_after=None), id="retry-after-garbage-date"),
    pytest.param(text(b'{"error": {"code": 429, "message": "x", "retry_after": Infinity}}', 429),
                 Fail(RetryableError, retry_after=None), id="retry-after-body-infinity"),
    # A retired or unserved model (the exact APIMart answer is unknown: new-api shapes).
    pytest.param(js(envelope(404, "model not found", "model_not_found"), 404), GONE,
                 id="model-404-code-model-not-found"),
    pytest.param(js(envelope(400, "The model `sora-2` does not exist"), 400), GONE,
                 id="model-400-does-not-exist"),
    pytest.param(js({"error": {"code": "model_not_found", "type": "new_api_error", "message":
                    "no available channel for model sora-2 under group default"}}, 503),
                 GONE, id="model-503-no-available-channel"),
    pytest.param(js(envelope(503, "当前分组 default 下对于模型 sora-2 无可用渠道", "new_api_error"),
                    503), GONE, id="model-503-chinese-no-channel"),
    pytest.param(js({"error": {"code": "model_not_found", "message": "x", "type": "x"}}, 403), GONE,
                 id="model-403-code"),
    pytest.param(js({"code": 404, "message": "Model sora-2 is not available"}), GONE,
                 id="model-in-200-with-code-404"),
    pytest.param(js(envelope(400, "'duration' must be one of 4, 8, 12 for model sora-2"), 400),
                 REJECTED, id="not-model-400-validation-naming-it"),
    pytest.param(js(envelope(503, "Service temporarily unavailable", "service_unavailable"), 503),
                 RETRYABLE, id="not-model-503-plain"),
    pytest.param(js({"error": {"code": "insufficient_user_quota", "message": "model sora-2: quota",
                               "type": "x"}}, 403), FATAL, id="not-model-403-quota"),
    pytest.param(js(envelope(500, "model not found", "server_error"), 500), AMBIGUOUS,
                 id="not-model-500-says-model-not-found"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "expected"), SUBMIT_MODES)
async def test_every_submit_answer_has_one_documented_outcome(hostile, connect, reply, expected):
    """A hostile POST answer ends in its exact class or task, never elsewhere, never the key."""
    hostile.reply = reply
    api = await connect(hostile.base_url)
    result = await outcome(api.submit(JOB), expected)  # type: ignore[arg-type]
    assert hostile.seen == ["POST /v1/videos/generations"]
    assert hostile.elsewhere == []
    if isinstance(result, ModelUnavailableError):
        assert result.model == "sora-2"


def test_there_are_at_least_60_submit_and_25_poll_modes():
    """The suite keeps the breadth issue 8 asks for."""
    assert len(SUBMIT_MODES) >= 60
    assert len(POLL_MODES) >= 25


# -- poll: at least 25 modes -----------------------------------------------------------------------


def task(**data: object) -> dict[str, object]:
    """A task answer for ``TID``; ``data`` replaces fields of a completed task."""
    base: dict[str, object] = {"id": TID, "status": "completed", "progress": 100,
                               "result": {"videos": [{"url": [VIDEO], "expires_at": 1762940095}]}}
    return {"code": 200, "data": {**base, **data}}


def videos(*entries: object, **result: object) -> dict[str, object]:
    """A completed task whose ``result.videos`` is ``entries``."""
    return task(result={"videos": list(entries), **result})


DONE = TaskState(TID, "completed", progress=100, video_urls=(VIDEO,), expires_at=1762940095)
NO_VIDEO = TaskState(TID, "completed", progress=100)


def done(**changes: Any) -> TaskState:
    """``DONE`` with some fields changed."""
    return replace(DONE, **changes)


POLL_MODES = [
    pytest.param(js(task(result={"videos": [{"url": [VIDEO], "expires_at": 1762940095}],
                                 "thumbnail_url": THUMB})),
                 done(thumbnail_url=THUMB), id="doc-shape"),
    pytest.param(js(task(status="processing", progress=42.7, result=None)),
                 TaskState(TID, "processing", progress=42), id="progress-float"),
    pytest.param(js(task(result={"videos": 5})), NO_VIDEO, id="videos-int"),
    pytest.param(js(task(result={"videos": {"url": VIDEO}})), NO_VIDEO, id="videos-object"),
    pytest.param(js(task(result=[VIDEO])), NO_VIDEO, id="result-list"),
    pytest.param(js(videos({"url": 5})), NO_VIDEO, id="url-int"),
    pytest.param(js(videos({"url": {VIDEO: VIDEO}})), NO_VIDEO, id="url-dict-key-is-no-url"),
    pytest.param(js(videos({"url": [5, None, VIDEO, ["x"], {"u": VIDEO}]})),
                 done(expires_at=None), id="url-list-mixed"),
    pytest.param(js(videos({"url": ["javascript:alert(1)", "ftp://h/v.mp4", "/f/v.mp4", "https://",
                                    "file:///etc/passwd", "https://h/a b.mp4", "https://h/\x00"]})),
                 NO_VIDEO, id="url-not-http"),
    pytest.param(js(videos({"url": "https://cdn.test/v.mp4?sig=@KEY@"})), NO_VIDEO,
                 id="url-echoes-key"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": 1e300})), done(expires_at=None),
                 id="expires-1e300"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": -1e18})), done(expires_at=None),
                 id="expires-negative"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": float("nan")})), done(expires_at=None),
                 id="expires-nan"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": "1762940095"})), done(expires_at=None),
                 id="expires-string"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": True})), done(expires_at=None),
                 id="expires-bool"),
    pytest.param(js(videos({"url": VIDEO, "expires_at": 7_000_000_000})),
                 done(expires_at=7_000_000_000), id="expires-year-2191-kept"),
    *(pytest.param(js(task(progress=value)), done(progress=None), id=f"progress-{name}")
      for name, value in (("nan", float("nan")), ("150", 150), ("negative", -5),
                          ("string", "50"), ("bool", True), ("infinity", float("inf")))),
    *(pytest.param(js(task(cost=value)), done(), id=f"cost-{name}")
      for name, value in (("nan", float("nan")), ("negative", -0.3), ("infinity", float("inf")),
                          ("string", "0.32"), ("bool", True))),
    pytest.param(js(task(cost=0.32)), done(cost=0.32), id="cost-kept"),
    pytest.param(js(task(result={"videos": [{"url": VIDEO}], "thumbnail_url": 7})),
                 done(expires_at=None), id="thumbnail-int"),
    pytest.param(js(task(status=5)), RETRYABLE, id="status-int"),
    pytest.param(js({"code": 200, "data": {"id": TID, "progress": 5}}), RETRYABLE,
                 id="status-missing"),
    pytest.param(js(task(status="x" * 100_000)), done(status="processing"), id="status-huge"),
    pytest.param(js(task(status="完成\u202e")), done(status="processing"), id="status-unicode"),
    pytest.param(js(data_is(None)), RETRYABLE, id="data-null"),
    pytest.param(js(data_is([task()["data"]])), RETRYABLE, id="data-array"),
    pytest.param(js(data_is(TID)), RETRYABLE, id="data-string"),
    pytest.param(js(task(id="task_OTHER")), Fail(RetryableError, contains="task_OTHER"),
                 id="data-about-another-task"),
    pytest.param(js(task(status="failed", result=None, error={"message": {"deep": [1]}})),
                 TaskState(TID, "failed", progress=100), id="error-message-object"),
    pytest.param(js(task(status="failed", result=None, fail_reason="echo: @AUTH@")),
                 TaskState(TID, "failed", progress=100, error="echo: Bearer [REDACTED]"),
                 id="fail-reason-echoes-authorization"),
    pytest.param(js(task(status="failed", result=None,
                         error={"code": 1, "message": "key @KEY@ refused", "type": "x"})),
                 TaskState(TID, "failed", progress=100, error="key [REDACTED] refused"),
                 id="error-message-echoes-key"),
    pytest.param(js(task(status="failed", result=None, fail_reason="line1\r\n\x1b[2Jline2\x00")),
                 TaskState(TID, "failed", progress=100, error="line1\\r\\n\\x1b[2Jline2\\x00"),
                 id="fail-reason-control-chars"),
    pytest.param(js(task(status="failed", result=None, fail_reason="é" * 150_000)),
                 TaskState(TID, "failed", progress=100,
                           error="é" * 1000 + "… (150000 chars)"), id="fail-reason-150k"),
    pytest.param(text(json.dumps(task(cost=float("nan"), progress=float("nan"))).encode()),
                 done(progress=None), id="nan-literals"),
    pytest.param(text(b'{"code":200,"data":' + nested(5000).encode() + b"}"), RETRYABLE,
                 id="deep-nesting"),
    pytest.param(text(json.dumps(task(pad="x" * (2 * MAX_ANSWER_BYTES))).encode()), RETRYABLE,
                 id="body-over-1mib"),
    pytest.param(text(b"<html>OK</html>"), RETRYABLE, id="html-200"),
    pytest.param(text(b""), RETRYABLE, id="empty-200"),
    pytest.param(text(b'{"code":200,"data":{"id":"task_\xff"}}'), RETRYABLE, id="invalid-utf8"),
    pytest.param(js({"code": 500, "message": "busy"}), RETRYABLE, id="200-with-code-500"),
    *(pytest.param(Reply(code, b"", {"Location": "@ELSEWHERE@"}), RETRYABLE, id=f"{code}-redirect")
      for code in (301, 302, 307)),
    pytest.param(js(envelope(400, "Invalid task ID"), 400), REJECTED, id="400-invalid-task-id"),
    pytest.param(js(envelope(404, "model not found", "model_not_found"), 404), REJECTED,
                 id="404-model-words-on-a-poll"),
    pytest.param(js(envelope(401, "no: @AUTH@", "authentication_error"), 401), FATAL,
                 id="401-echoes-authorization"),
    pytest.param(js(envelope(500, "echo @AUTH@", "server_error"), 500), RETRYABLE,
                 id="500-echoes-authorization"),
    pytest.param(Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{\"code\":200,"), RETRYABLE,
                 id="truncated"),
    pytest.param(Raw(b""), RETRYABLE, id="close-without-answer"),
    pytest.param(http(b"HTTP/1.1 200 OK", b"{}", b"@AUTH@"), RETRYABLE, id="echo-as-header-line"),
    pytest.param(js(envelope(429, "slow"), 429, **{"Retry-After": "99999999"}),
                 Fail(RetryableError, retry_after=MAX_SERVER_WAIT), id="429-retry-after-huge"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "expected"), POLL_MODES)
async def test_every_poll_answer_has_one_documented_outcome(hostile, connect, reply, expected):
    """A hostile task answer gives its exact state or class; redirects are not followed."""
    hostile.reply = reply
    api = await connect(hostile.base_url)
    await outcome(api.get_task(TID), expected)
    # aiohttp itself resends an idempotent GET once when the server drops the connection.
    assert hostile.seen in ([f"GET /v1/tasks/{TID}?language=en"] * n for n in (1, 2))
    assert hostile.elsewhere == []


# -- task ids --------------------------------------------------------------------------------------

BAD_IDS = ["", "../../v1/balance", "task_1\r\nX: y", "task_1\x00", "t" * 129, "task/1",
           "task?x=1", "task 1", "..", "task..1", "-task", "task_ü", ".task"]  # fmt: skip


@pytest.mark.parametrize("task_id", [*BAD_IDS, KEY], ids=[*(repr(i)[:24] for i in BAD_IDS), "key"])
async def test_get_task_refuses_a_bad_id_without_sending(hostile, connect, task_id):
    """An id that is no token is refused before any URL is built from it."""
    api = await connect(hostile.base_url)
    exc = await outcome(api.get_task(task_id), REJECTED)
    assert isinstance(exc, RejectedError)
    assert (exc.status, exc.code) == (None, "invalid_task_id")
    assert hostile.seen == []


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TID, True), ("task-unified-1762853430-ab12cd34", True), ("a", True), ("A1:b.c_d-e", True),
        ("t" * 128, True), ("t" * 129, False), ("", False), (".x", False), ("_x", False),
        ("x..y", False), ("x/y", False), ("x\n", False), ("x y", False), ("ü", False),
        (5, False), (None, False), (b"task_1", False),
    ],
)  # fmt: skip
def test_valid_task_id(value, ok):
    """A task id is 1-128 of letters, digits and ``_ . : -``, starting alnum, without ``..``."""
    assert valid_task_id(value) is ok


# -- redirects and Authorization ---------------------------------------------------------------


async def test_a_download_follows_a_redirect_to_another_origin_without_authorization(
    hostile, connect
):
    """Video CDNs redirect; the file is fetched from the other origin, with no key sent."""
    hostile.reply = Reply(302, b"", {"Location": hostile.other_origin + "/v.mp4"})
    api = await connect(hostile.base_url)
    out = io.BytesIO()
    size = await api.download(hostile.web_url + "/f/video/x.mp4", out)
    assert (size, out.getvalue()) == (len(OK_BODY), OK_BODY)
    assert hostile.seen == ["GET /f/video/x.mp4"]
    assert hostile.elsewhere == ["GET /elsewhere/v.mp4"]
    assert hostile.elsewhere_auth == [None]


async def test_aiohttp_drops_a_custom_authorization_header_on_a_cross_origin_redirect(hostile):
    """The library guarantee the client relies on: a header ``Authorization`` is not forwarded."""
    received: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        received.append(request.headers.get("Authorization"))
        if request.path == "/start":
            raise web.HTTPFound(request.url.with_host("localhost").with_path("/next"))
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {KEY}"}
            async with session.get(f"http://127.0.0.1:{port}/start", headers=headers) as resp:
                assert (resp.status, await resp.read()) == (200, b"ok")
    finally:
        await runner.cleanup()
    assert received == [f"Bearer {KEY}", None]


async def test_a_download_to_a_non_http_url_is_refused_without_sending(hostile, connect):
    """A link that is not http(s) is rejected before any connection."""
    api = await connect(hostile.base_url)
    await outcome(api.download("file:///etc/passwd", io.BytesIO()), REJECTED)
    assert hostile.seen == []


# -- upload answers ----------------------------------------------------------------------------

UPLOAD = "https://upload.apimart.ai/f/image/1-uuid-ref.png"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(js({"url": UPLOAD, "created_at": 1762853430}), ..., id="ok"),
        pytest.param(js({"url": UPLOAD, "created_at": 1e300}), ..., id="created-at-1e300"),
        pytest.param(js({"url": UPLOAD, "created_at": float("nan")}), ..., id="created-at-nan"),
        pytest.param(js({"url": 5}), AMBIGUOUS, id="url-int"),
        pytest.param(js({"url": {UPLOAD: 1}}), AMBIGUOUS, id="url-dict"),
        pytest.param(js({"url": "javascript:alert(1)"}), AMBIGUOUS, id="url-not-http"),
        pytest.param(js({"url": "https://u.test/@KEY@.png"}), AMBIGUOUS, id="url-echoes-key"),
        pytest.param(text(nested(100_000).encode()), AMBIGUOUS, id="deep-nesting"),
        pytest.param(Reply(307, b"", {"Location": "@ELSEWHERE@"}), AMBIGUOUS, id="307"),
        pytest.param(js(envelope(413, "too big @AUTH@"), 413), REJECTED, id="413-echo"),
    ],
)
async def test_every_upload_answer_has_one_documented_outcome(hostile, connect, reply, expected):
    """An upload answer is a checked http(s) URL and a sane time, or ambiguous (no key)."""
    hostile.reply = reply
    api = await connect(hostile.base_url)
    if expected is ...:
        uploaded = await api.upload_image(b"\x89PNG\r\n\x1a\n", "ref.png")
        assert uploaded.url == UPLOAD
        assert 0 < uploaded.created_at < 7_258_118_400
    else:
        await outcome(api.upload_image(b"\x89PNG\r\n\x1a\n", "ref.png"), expected)
    assert hostile.elsewhere == []


# -- the one guard and the scrubber ------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "target", "cls"),
    [
        pytest.param("submit", "runner.api.client.read_submitted", AmbiguousError, id="submit"),
        pytest.param("get_task", "runner.api.answers.parse_task", RetryableError,
                     id="get-task"),
        pytest.param("upload_image", "runner.api.client.read_uploaded", AmbiguousError,
                     id="upload"),
    ],
)
@pytest.mark.parametrize("error", [TypeError, KeyError, ValueError, RecursionError, UnicodeError])
async def test_an_unforeseen_parse_failure_still_classifies(
    hostile, connect, monkeypatch, operation, target, cls, error
):
    """Whatever a reader raises becomes the method's 'bad answer' class, not a traceback."""

    def explode(*args: object, **kwargs: object) -> object:
        msg = f"boom {KEY}"
        raise error(msg)

    hostile.reply = js(task()) if operation == "get_task" else js({**legacy(), "url": UPLOAD})
    monkeypatch.setattr(target, explode)
    api = await connect(hostile.base_url)
    call = {
        "submit": lambda: api.submit(JOB),
        "get_task": lambda: api.get_task(TID),
        "upload_image": lambda: api.upload_image(b"png", "ref.png"),
    }[operation]
    exc = await outcome(call(), Fail(cls))
    assert error.__name__ in str(exc)


async def test_a_body_that_is_not_json_is_refused_before_sending(hostile, connect):
    """A job body with NaN (not JSON) is rejected without a request: nothing was created."""
    api = await connect(hostile.base_url)
    await outcome(api.submit(StubJob({"model": "sora-2", "duration": float("nan")})), REJECTED)
    assert hostile.seen == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(f"key {KEY} end", "key [REDACTED] end", id="bare-key"),
        pytest.param(f"x{KEY}{KEY}y", "x[REDACTED][REDACTED]y", id="twice"),
        pytest.param("Bearer sk-other-token", "Bearer [REDACTED]", id="other-bearer"),
        pytest.param("bearer\tabc.def", "bearer\t[REDACTED]", id="bearer-any-case"),
        pytest.param("Authorization: Basic dXNlcjpwYXNz", "Authorization: [REDACTED]",
                     id="authorization-line"),
        pytest.param("{'authorization': 'Token zzz', 'x': 1}",
                     "{'authorization': '[REDACTED]', 'x': 1}",
                     id="authorization-in-a-repr"),
        pytest.param('"Authorization":"Bearer q"', '"Authorization":"[REDACTED]"',
                     id="authorization-in-json"),
        pytest.param("model sora-2 is busy", "model sora-2 is busy", id="clean-text-unchanged"),
    ],
)  # fmt: skip
def test_scrub_removes_the_key_and_any_credential(given, expected):
    """The scrubber removes the key, any Bearer token and any Authorization value."""
    assert scrub(given, Secret(KEY)) == expected
