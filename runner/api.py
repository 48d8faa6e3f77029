"""The APIMart client: the only module that talks HTTP to the API.

Every outcome of a request maps to exactly one class (see ``runner.errors``):
success, ``RetryableError`` (refused before processing: safe to resend),
``AmbiguousError`` (the task may exist: never resent blindly), ``RejectedError``
(the request is wrong) or ``FatalApiError`` (auth, permission, balance: stop).
Retries are not done here; the submit stage decides with a ``RetryPolicy``.

The API key travels only in the ``Authorization`` header. It is kept in a
:class:`Secret`, whose repr and str hide it, and no message built here includes
request headers.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, Final

import aiohttp

from runner.errors import (
    AmbiguousError,
    ApiError,
    FatalApiError,
    RejectedError,
    RetryableError,
)
from runner.models import Job

DEFAULT_BASE_URL: Final = "https://api.apimart.ai"
SUBMIT_PATH: Final = "/v1/videos/generations"
USER_AGENT: Final = "apimart-batch/0.1"

_RETRYABLE = frozenset({408, 429, 503})
_FATAL = frozenset({401, 402, 403})
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
_QUOTA_WORDS = ("quota", "balance", "额度", "insufficient")
TERMINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})


class Secret:
    """A string that never shows itself in a repr, str, log line or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Submitted:
    """A task the API created (or replayed for the same Idempotency-Key)."""

    task_id: str
    http_status: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class TaskState:
    """What ``GET /v1/tasks/{id}`` says about a task, normalised."""

    task_id: str
    status: str
    progress: int | None = None
    video_urls: tuple[str, ...] = ()
    expires_at: int | None = None
    thumbnail_url: str | None = None
    cost: float | None = None
    error: str | None = None

    @property
    def terminal(self) -> bool:
        """True once the task will not change any more."""
        return self.status in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class Uploaded:
    """An image uploaded with ``POST /v1/uploads/images``."""

    url: str
    created_at: float


@dataclass(slots=True)
class Timeouts:
    """Seconds allowed per request kind (connect time included)."""

    submit: float = 60.0
    poll: float = 15.0
    upload: float = 120.0
    download: float = 600.0
    connect: float = 10.0


@dataclass(slots=True)
class Client:
    """An APIMart client bound to one base URL and key; use ``async with``.

    Args:
        base_url: e.g. ``https://api.apimart.ai`` (no trailing ``/v1``).
        api_key: the Bearer key.
        pool: connections kept open; size it to the run's concurrency.
        timeouts: per-request-kind time limits.
        response_version: sent as ``X-APIMart-Response-Version`` when set.
    """

    base_url: str
    api_key: Secret
    pool: int = 8
    timeouts: Timeouts = field(default_factory=Timeouts)
    response_version: str | None = None
    _session: aiohttp.ClientSession | None = None
    _files: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        # Downloads get a pool of their own: a POST must never wait behind a slow video
        # for a connection, time out unsent, and be taken for an ambiguous submission.
        self._session, self._files = self._new_session(), self._new_session()
        return self

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool, limit_per_host=self.pool),
            headers={"User-Agent": USER_AGENT},
            # aiohttp would otherwise read proxies/credentials from the environment.
            trust_env=False,
        )

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._session, self._files):
            if session is not None:
                await session.close()
        self._session = self._files = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open API session; raises if used outside ``async with``."""
        return _opened(self._session)

    @property
    def _files_session(self) -> aiohttp.ClientSession:
        return _opened(self._files)

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key.reveal()}"}
        if self.response_version:
            headers["X-APIMart-Response-Version"] = self.response_version
        headers.update(extra or {})
        return headers

    def _timeout(self, total: float) -> aiohttp.ClientTimeout:
        # ``connect`` bounds the wait for a pooled connection too; aiohttp then raises
        # ConnectionTimeoutError, which is "not sent" (retryable), never ambiguous.
        return aiohttp.ClientTimeout(total=total, connect=self.timeouts.connect,
                                     sock_connect=self.timeouts.connect)

    async def submit(self, job: Job, body: Mapping[str, Any] | None = None) -> Submitted:
        """Create the job's task; raises an ``ApiError`` subclass for every failure.

        ``body`` is what to send (local images already uploaded); default ``job.body()``.
        """
        what = f"POST {SUBMIT_PATH}"
        headers = self._headers({"Idempotency-Key": job.idempotency_key})
        try:
            async with self.session.post(
                self.base_url + SUBMIT_PATH,
                json=job.body() if body is None else body,
                headers=headers,
                timeout=self._timeout(self.timeouts.submit),
            ) as resp:
                raw = await resp.read()
                status = resp.status
                replayed = resp.headers.get("Idempotency-Replayed", "").lower() == "true"
                retry_after = _retry_after_header(resp.headers.get("Retry-After"))
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, what, sent=True) from exc
        answer = _json(raw)
        if 200 <= status < 300 and _says_ok(answer):
            assert isinstance(answer, dict)
            task_id = _task_id(answer)
            if task_id:
                return Submitted(task_id=task_id, http_status=status, replayed=replayed)
        raise classify(status, answer, raw, what, retry_after=retry_after, mutating=True)

    async def get_task(self, task_id: str) -> TaskState:
        """Fetch a task's state; 400 (unknown id) raises ``RejectedError``."""
        what = f"GET /v1/tasks/{task_id}"
        try:
            async with self.session.get(
                f"{self.base_url}/v1/tasks/{task_id}",
                params={"language": "en"},
                headers=self._headers(),
                timeout=self._timeout(self.timeouts.poll),
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after_header(resp.headers.get("Retry-After"))
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, what, sent=False) from exc
        body = _json(raw)
        if status == 200 and _says_ok(body):
            assert isinstance(body, dict)
            data = body.get("data")
            if isinstance(data, dict) and isinstance(data.get("status"), str):
                return parse_task(task_id, data)
        raise classify(status, body, raw, what, retry_after=retry_after, mutating=False)

    async def upload_image(self, data: bytes, filename: str) -> Uploaded:
        """Upload an image's bytes; the caller must not retry an ``AmbiguousError``."""
        what = "POST /v1/uploads/images"
        form = aiohttp.FormData()
        # A BytesIO part is streamed; raw bytes over 1 MiB make aiohttp warn (ResourceWarning)
        # that it may block the event loop, which is an error wherever warnings are.
        form.add_field("file", io.BytesIO(data), filename=filename)
        try:
            async with self.session.post(
                f"{self.base_url}/v1/uploads/images",
                data=form,
                headers=self._headers(),
                timeout=self._timeout(self.timeouts.upload),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, what, sent=True) from exc
        body = _json(raw)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("url"), str):
            created = body.get("created_at")
            when = float(created) if isinstance(created, int | float) else time.time()
            return Uploaded(url=body["url"], created_at=when)
        raise classify(status, body, raw, what, retry_after=None, mutating=True)

    async def download(self, url: str, out: IO[bytes]) -> int:
        """Stream ``url`` into ``out``; returns the byte count, checked against Content-Length.

        The URL is a signed CDN link: no Authorization header is sent with it.
        """
        what = "GET video"
        try:
            async with self._files_session.get(
                url, timeout=self._timeout(self.timeouts.download)
            ) as resp:
                if resp.status in (403, 404, 410):
                    msg = f"{what}: the link was refused ({resp.status}); it has probably expired"
                    raise RejectedError(msg, status=resp.status)
                if resp.status != 200:
                    msg = f"{what}: the file server answered {resp.status}"
                    raise RetryableError(msg, status=resp.status)
                # Content-Length counts the bytes on the wire; aiohttp undoes a gzip or
                # deflate encoding, so the count is only comparable without one.
                encoding = resp.headers.get("Content-Encoding", "").strip().lower()
                encoded = encoding not in ("", "identity")
                expected = None if encoded else resp.content_length
                size = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    out.write(chunk)
                    size += len(chunk)
        except ApiError:
            raise
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, what, sent=False) from exc
        if expected is not None and size != expected:
            msg = f"{what}: got {size} of {expected} bytes; the connection ended early"
            raise RetryableError(msg)
        return size


#: Spellings other gateways and older revisions use (apimart-api.md §3, §7), by ours.
_STATUS_ALIASES: Final = {
    "success": "completed", "succeeded": "completed", "complete": "completed",
    "failure": "failed", "error": "failed", "canceled": "cancelled",
    "queued": "pending", "submitted": "pending", "in_progress": "processing",
    "running": "processing",
}  # fmt: skip
_STATUSES: Final = frozenset({"pending", "processing", *TERMINAL_STATES})


def normal_status(status: str) -> str:
    """The documented status for ``status``; an unheard-of one counts as still processing.

    Treating the unknown as running keeps the task polled (bounded by --deadline) instead of
    recording a state that no later command would poll or download again.
    """
    status = status.strip().lower()
    status = _STATUS_ALIASES.get(status, status)
    return status if status in _STATUSES else "processing"


def _opened(session: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
    if session is None:
        msg = "Client used outside 'async with'"
        raise RuntimeError(msg)
    return session


def parse_task(task_id: str, data: Mapping[str, Any]) -> TaskState:
    """Normalise a task document: ``url`` as list or string, ``error`` or ``fail_reason``."""
    result = data.get("result")
    if not isinstance(result, dict):
        result = {}
    urls: list[str] = []
    expires: int | None = None
    thumbnail = result.get("thumbnail_url")
    for video in result.get("videos") or []:
        if not isinstance(video, dict):
            continue
        url = video.get("url")
        urls.extend([url] if isinstance(url, str) else [u for u in url or [] if isinstance(u, str)])
        if isinstance(video.get("expires_at"), int | float):
            exp = int(video["expires_at"])
            expires = exp if expires is None else min(expires, exp)
        thumbnail = thumbnail or video.get("thumbnail_url")
    progress = data.get("progress")
    cost = data.get("cost")
    return TaskState(
        task_id=task_id,
        status=normal_status(str(data["status"])),
        progress=int(progress) if isinstance(progress, int | float) else None,
        video_urls=tuple(urls),
        expires_at=expires,
        thumbnail_url=thumbnail if isinstance(thumbnail, str) else None,
        cost=float(cost) if isinstance(cost, int | float) else None,
        error=_error_text(data),
    )


def classify(
    status: int,
    body: object,
    raw: bytes,
    what: str,
    *,
    retry_after: float | None,
    mutating: bool,
) -> ApiError:
    """Map a non-success answer to exactly one ``ApiError`` class.

    A 200 that is not a success takes its class from the body's ``code`` (or its
    ``error.code``) when that is an HTTP-like number, else it is ambiguous: the server
    may have acted on it.
    ``mutating`` requests treat 500/502/504 as ambiguous; reads may simply retry them.
    """
    code = _error_code(body)
    effective = _body_status(body) if status == 200 else status
    retry_after = retry_after if retry_after is not None else _retry_after_body(body)
    detail = _error_text(body) if isinstance(body, dict) else None
    if detail is None:
        detail = "unreadable body" if raw else "empty body"
    reason = _reason(status)
    message = f"APIMart answered {status}{reason} for {what}: {detail}"
    named = _task_id(body) if isinstance(body, dict) else None
    if named:
        # Kept in the ledger's error cell: the key to reconciling an 'unknown' job by hand.
        message += f" (the answer names task {named})"
    kwargs: dict[str, Any] = {"status": status, "code": code, "retry_after": retry_after}
    if effective in _FATAL:
        return FatalApiError(message + _fatal_hint(effective, code, detail), **kwargs)
    if effective in _RETRYABLE:
        return RetryableError(message, **kwargs)
    if 400 <= effective < 500:
        return RejectedError(message, **kwargs)
    # 500/502/504, other 5xx and an unreadable 200: a POST may have been acted on.
    if mutating:
        return AmbiguousError(message, **kwargs)
    return RetryableError(message, **kwargs)


def _body_status(body: object) -> int:
    """The HTTP-like status a 200 body claims (top-level ``code``, else ``error.code``), or 0."""
    if not isinstance(body, dict):
        return 0
    error = body.get("error")
    for code in (body.get("code"), error.get("code") if isinstance(error, dict) else None):
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            return code
    return 0


def _fatal_hint(status: int, code: str | None, detail: str) -> str:
    text = f"{code or ''} {detail}".lower()
    if status == 402 or any(word in text for word in _QUOTA_WORDS):
        return "\n  hint: the balance is insufficient; top up, then rerun (nothing is sent twice)"
    if status == 401:
        return "\n  hint: check APIMART_API_KEY (or --key-file); the key was refused"
    return "\n  hint: this key may not use this model or endpoint"


def is_quota(error: ApiError) -> bool:
    """True when a fatal answer means 'out of balance' rather than auth or permission."""
    text = f"{error.code or ''} {error.message}".lower()
    return error.status == 402 or any(word in text for word in _QUOTA_WORDS)


def _transport_error(exc: Exception, what: str, *, sent: bool) -> ApiError:
    """Classify a failure without an HTTP answer.

    Connection and connect-timeout failures mean nothing reached the server. Anything
    later (read timeout, reset, a torn response) means a POST may have been processed.
    """
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return RetryableError(f"could not connect for {what}: {name}: {_safe(exc)}")
    if isinstance(exc, aiohttp.InvalidURL):
        return RejectedError(f"invalid URL for {what}: {_safe(exc)}")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        text = f"no answer in time for {what} ({name})"
    else:
        text = f"the connection failed during {what}: {name}: {_safe(exc)}"
    return AmbiguousError(text) if sent else RetryableError(text)


def _safe(exc: BaseException) -> str:
    # aiohttp messages name host and URL, never headers; keep them short anyway.
    return str(exc)[:200]


def _says_ok(body: object) -> bool:
    """A JSON object whose ``code`` (if any) is 200 and whose ``error`` (if any) is empty.

    Gateways send ``"error": null`` or ``"code": "200"`` on success; neither is a failure.
    """
    if not isinstance(body, dict) or body.get("error"):
        return False
    code = body.get("code", 200)
    return code in (200, "200")


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _task_id(body: Mapping[str, Any]) -> str | None:
    data = body.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        task_id = data.get("task_id") or data.get("id")
        if isinstance(task_id, str) and task_id:
            return task_id
    return None


def _error_code(body: object) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = err.get("code") or err.get("type")
        return None if code is None else str(code)
    return None


def _error_text(body: Mapping[str, Any]) -> str | None:
    err = body.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    for key in ("fail_reason", "message"):
        if isinstance(body.get(key), str) and body[key]:
            return str(body[key])
    return None


def _reason(status: int) -> str:
    try:
        return " " + HTTPStatus(status).phrase
    except ValueError:
        return ""


def _retry_after_header(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retry_after_body(body: object) -> float | None:
    if isinstance(body, dict):
        value = body.get("retry_after")
        if value is None and isinstance(body.get("error"), dict):
            value = body["error"].get("retry_after")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _seconds(float(value))
    return None


def _seconds(value: float) -> float | None:
    # "inf" and "nan" parse as floats (and json.loads accepts Infinity/NaN): a wait of
    # infinity would hang the run, so such a value counts as no advice at all.
    return max(0.0, value) if math.isfinite(value) else None


def key_file_warning(path: str) -> str | None:
    """A warning when a key file can be read by other users, else None."""
    mode = Path(path).stat().st_mode
    if mode & 0o077:
        perms = f"{mode & 0o777:o}"
        return f"{path}: key file is readable by others (mode {perms})\n  hint: chmod 600 {path}"
    return None


def api_key_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from ``APIMART_API_KEY``, stripped; None when unset or blank."""
    key = environ.get("APIMART_API_KEY", "").strip()
    return key or None
