"""The APIMart client: the only module that talks HTTP to the API.

Every outcome of a request maps to exactly one class (see ``runner.errors``):
success, ``RetryableError`` (refused before processing: safe to resend),
``AmbiguousError`` (the task may exist: never resent blindly), ``RejectedError``
(the request is wrong; ``ModelUnavailableError`` when the model is not served) or
``FatalApiError`` (auth, permission, balance: stop).
Retries are not done here; the submit stage decides with a ``RetryPolicy``.

Answers are untrusted input. A body is read up to ``MAX_ANSWER_BYTES`` and parsed up to
``MAX_JSON_DEPTH``; each field is checked for type, finiteness and range before use; a
task id must pass :func:`valid_task_id` and a link must be an http(s) URL. An answer that
fails a check is a bad answer like any other (ambiguous for a POST, retryable for a GET):
``Client._read`` is the one place answers are parsed, and no parsing exception leaves a
``Client`` method. Redirects are followed only by downloads, which send no key.

The API key travels only in the ``Authorization`` header. It is kept in a
:class:`Secret`, whose repr and str hide it. A server may echo it back: every string
taken from an answer, and every error message the client raises, goes through
:func:`scrub`, which writes ``[REDACTED]`` over the key, any ``Bearer`` token and any
``Authorization`` value.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, Final, TypeVar
from urllib.parse import urlsplit

import aiohttp

from runner.api.retry import MAX_SERVER_WAIT
from runner.errors import (
    AmbiguousError,
    ApiError,
    FatalApiError,
    ModelUnavailableError,
    RejectedError,
    RetryableError,
)
from runner.models import Job

DEFAULT_BASE_URL: Final = "https://api.apimart.ai"
SUBMIT_PATH: Final = "/v1/videos/generations"
USER_AGENT: Final = "apimart-batch/0.1"

#: The largest API answer read (uploads and task documents are a few KiB).
MAX_ANSWER_BYTES: Final = 1 << 20
#: The deepest nesting of arrays and objects accepted in an answer (documents use 4).
MAX_JSON_DEPTH: Final = 64
#: Characters of one server text kept in a message or a task's error.
MAX_TEXT: Final = 1000
REDACTED: Final = "[REDACTED]"

_RETRYABLE = frozenset({408, 429, 503})
_FATAL = frozenset({401, 402, 403})
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
#: What a bug in reading an answer can raise; the guard turns each into a bad answer.
_PARSE_ERRORS = (TypeError, ValueError, LookupError, ArithmeticError, RecursionError,
                 AttributeError)  # fmt: skip
_QUOTA_WORDS = ("quota", "balance", "额度", "insufficient")
TERMINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})
#: 2200-01-01T00:00:00Z: a later "unix time" from the API is nonsense, not a date.
_LATEST_UNIX: Final = 7_258_118_400
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_BEARER = re.compile(r"\b(bearer\s+)(?!\[REDACTED\])[^\s'\",;}\]]+", re.IGNORECASE)
_AUTHORIZATION = re.compile(r"(\bauthorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,;}]+",
                            re.IGNORECASE)  # fmt: skip

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class _Answer:
    """An HTTP answer as read: its status, its body (None: over the size bound), headers."""

    status: int
    raw: bytes | None
    headers: Mapping[str, str]


Reader = Callable[[_Answer, object, str, Secret], T | None]


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

    async def submit(
        self, job: Job, body: Mapping[str, Any] | str | None = None
    ) -> Submitted:
        """Create the job's task; raises an ``ApiError`` subclass for every failure.

        ``body`` is what to send (local images already uploaded); default ``job.body()``.
        A string is the uploaded URL of the job's first local image, sent as
        ``job.body(url)``. Only ``job.body`` and ``job.idempotency_key`` are read.
        """
        what = f"POST {SUBMIT_PATH}"
        sent = dict(job.body(body) if body is None or isinstance(body, str) else body)
        try:
            payload = json.dumps(sent, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            msg = f"{what}: the request body is not JSON ({type(exc).__name__}); nothing was sent"
            raise RejectedError(msg) from None
        model = sent.get("model")
        headers = {"Idempotency-Key": job.idempotency_key, "Content-Type": "application/json"}
        answer = await self._send(
            "POST", self.base_url + SUBMIT_PATH, what, sent=True, seconds=self.timeouts.submit,
            data=payload, headers=self._headers(headers),
        )
        return self._read(answer, what, _submitted, mutating=True,
                          model=model if isinstance(model, str) else None)

    async def get_task(self, task_id: str) -> TaskState:
        """Fetch a task's state; 400 (unknown id) raises ``RejectedError``.

        An id that :func:`valid_task_id` refuses is never put in a URL: ``RejectedError``
        with ``code="invalid_task_id"`` and no status, and nothing is sent.
        """
        if not valid_task_id(task_id) or scrub(task_id, self.api_key) != task_id:
            msg = (f"GET /v1/tasks/{{id}}: refused to send: {_shown(task_id, self.api_key)} "
                   "is not a task id (1-128 letters, digits and _ . : -)\n  hint: the "
                   "ledger's task_id cell is damaged or came from a bad answer; fix it by hand")
            raise RejectedError(msg, code="invalid_task_id")
        what = f"GET /v1/tasks/{task_id}"
        answer = await self._send(
            "GET", f"{self.base_url}/v1/tasks/{task_id}", what, sent=False,
            seconds=self.timeouts.poll, params={"language": "en"}, headers=self._headers(),
        )
        return self._read(answer, what, partial(_task, task_id), mutating=False)

    async def upload_image(self, data: bytes, filename: str) -> Uploaded:
        """Upload an image's bytes; the caller must not retry an ``AmbiguousError``."""
        what = "POST /v1/uploads/images"
        form = aiohttp.FormData()
        # A BytesIO part is streamed; raw bytes over 1 MiB make aiohttp warn (ResourceWarning)
        # that it may block the event loop, which is an error wherever warnings are.
        form.add_field("file", io.BytesIO(data), filename=filename)
        answer = await self._send(
            "POST", f"{self.base_url}/v1/uploads/images", what, sent=True,
            seconds=self.timeouts.upload, data=form, headers=self._headers(),
        )
        return self._read(answer, what, _uploaded, mutating=True)

    async def download(self, url: str, out: IO[bytes]) -> int:
        """Stream ``url`` into ``out``; returns the byte count, checked against Content-Length.

        The URL is a signed CDN link: no Authorization header is sent with it, so
        following the CDN's redirects (to any origin) cannot carry the key away.
        """
        what = "GET video"
        if not _is_url(url, self.api_key):
            msg = f"{what}: not an http(s) URL: {_shown(url, self.api_key)}; nothing was sent"
            raise RejectedError(msg)
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
        except (*_TRANSPORT_ERRORS, *_PARSE_ERRORS) as exc:
            error, cause = self._failed(exc, what, sent=False)
        else:
            if expected is not None and size != expected:
                msg = f"{what}: got {size} of {expected} bytes; the connection ended early"
                raise RetryableError(msg)
            return size
        raise error from cause

    async def _send(
        self, method: str, url: str, what: str, *, sent: bool, seconds: float, **kwargs: Any
    ) -> _Answer:
        """One API request; no redirect is followed (a POST is never re-sent elsewhere)."""
        try:
            async with self.session.request(
                method, url, allow_redirects=False, timeout=self._timeout(seconds), **kwargs
            ) as resp:
                return _Answer(resp.status, await _read_body(resp), resp.headers)
        except (*_TRANSPORT_ERRORS, *_PARSE_ERRORS) as exc:
            error, cause = self._failed(exc, what, sent=sent)
        raise error from cause

    def _read(
        self,
        answer: _Answer,
        what: str,
        reader: Reader[T],
        *,
        mutating: bool,
        model: str | None = None,
    ) -> T:
        """The one place an answer is parsed: a result, else exactly one scrubbed ``ApiError``.

        ``reader`` returns the result of a success, None for "not a success" (then
        ``classify`` decides), or raises an ``ApiError`` for a success it cannot trust.
        Anything else it raises, from a bug or an answer nobody foresaw, is a bad answer.
        """
        error: ApiError
        try:
            body = _json(answer.raw)
            result = reader(answer, body, what, self.api_key)
            if result is not None:
                return result
            error = self._classify(answer, body, what, mutating=mutating, model=model)
        except ApiError as exc:
            error = exc
        except _PARSE_ERRORS as exc:
            text = f"{_head(answer.status, what)}: unreadable answer ({type(exc).__name__})"
            error = _bad_answer(text, answer.status, mutating=mutating)
        # Raised outside the handler, so that no exception holding server text is chained.
        raise self._redact(error)

    def _classify(
        self, answer: _Answer, body: object, what: str, *, mutating: bool, model: str | None
    ) -> ApiError:
        note = None
        if answer.raw is None:
            note = f"the answer was larger than {MAX_ANSWER_BYTES} bytes (not read)"
        elif 300 <= answer.status < 400:
            where = answer.headers.get("Location")
            to = f" to {_clip(_printable(scrub(where, self.api_key)), 200)}" if where else ""
            note = f"a redirect{to}, not followed"
        return classify(
            answer.status, body, answer.raw or b"", what,
            retry_after=_retry_after_header(answer.headers.get("Retry-After")),
            mutating=mutating, model=model, secret=self.api_key, note=note,
        )

    def _failed(
        self, exc: BaseException, what: str, *, sent: bool
    ) -> tuple[ApiError, BaseException | None]:
        """A failure without a usable answer, and the cause to chain (None if it shows the key).

        aiohttp's ``ClientResponseError`` repr holds the request headers, and its message
        may quote the bytes the server sent: such a cause is left off.
        """
        error = self._redact(_transport_error(exc, what, sent=sent, secret=self.api_key))
        key = self.api_key.reveal()
        texts = ["".join(traceback.format_exception(exc))]
        link: BaseException | None = exc
        while link is not None and len(texts) < 50:
            texts += [str(link), repr(link)]
            link = link.__cause__ or link.__context__
        return error, None if key and any(key in text for text in texts) else exc

    def _redact(self, error: ApiError) -> ApiError:
        """``error`` with the key and any credential scrubbed from its message and code."""
        error.message = scrub(error.message, self.api_key)
        error.args = (error.message,)
        if error.code is not None:
            error.code = scrub(error.code, self.api_key)
        return error


# -- reading answers -------------------------------------------------------------------------


def valid_task_id(text: object) -> bool:
    """True for a task id safe to store and to put in a URL path.

    That is 1-128 characters of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit,
    without ``..``: APIMart's ``task_<ULID>`` and ``task-unified-<unix>-<x>`` both pass;
    CR/LF, NUL, ``/``, ``?``, ``%``, spaces and non-ASCII never do.
    """
    return isinstance(text, str) and _TASK_ID.fullmatch(text) is not None and ".." not in text


def scrub(text: str, secret: Secret | None = None) -> str:
    """``text`` with the key, any ``Bearer`` token and any ``Authorization`` value redacted.

    Covers the key verbatim anywhere, ``Bearer <token>`` in any case, and the value after
    ``Authorization:`` or ``"Authorization": "`` (header lines, JSON and Python reprs).
    Idempotent: scrubbed text scrubs to itself.
    """
    key = secret.reveal() if secret is not None else ""
    if key:
        text = text.replace(key, REDACTED)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)


async def _read_body(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None when it is over ``MAX_ANSWER_BYTES`` (the rest is left unread)."""
    if (resp.content_length or 0) > MAX_ANSWER_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json(raw: bytes | None) -> object:
    """The JSON value of a body; None when there is none, or it is not JSON or too deep."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return None if _too_deep(value, MAX_JSON_DEPTH) else value


def _too_deep(value: object, limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` deep (checked without recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        assert isinstance(children, Iterable)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _submitted(answer: _Answer, body: object, what: str, secret: Secret) -> Submitted | None:
    """The task of a submit answer; raises AmbiguousError for one whose task id is unusable."""
    if not 200 <= answer.status < 300 or not _says_ok(body):
        return None
    assert isinstance(body, dict)
    found = _task_ids(body)
    head = _head(answer.status, what)
    hint = "\n  hint: the task may exist; check the APIMart console before sending the job again"
    if not found:
        msg = f"{head}: the answer names no task id{hint}"
        raise AmbiguousError(msg, status=answer.status)
    if any(other != found[0] for other in found[1:]):
        names = ", ".join(_shown(task_id, secret) for task_id in found[:5])
        msg = f"{head}: the answer names {len(found)} tasks ({names}) for one request{hint}"
        raise AmbiguousError(msg, status=answer.status)
    task_id = found[0]
    if not valid_task_id(task_id) or scrub(str(task_id), secret) != task_id:
        msg = f"{head}: the answer's task id is not one: {_shown(task_id, secret)}{hint}"
        raise AmbiguousError(msg, status=answer.status)
    assert isinstance(task_id, str)
    replayed = answer.headers.get("Idempotency-Replayed", "").lower() == "true"
    return Submitted(task_id=task_id, http_status=answer.status, replayed=replayed)


def _task(
    task_id: str, answer: _Answer, body: object, what: str, secret: Secret
) -> TaskState | None:
    """The state a task answer gives, if it is about ``task_id``."""
    if answer.status != 200 or not _says_ok(body):
        return None
    assert isinstance(body, dict)
    data = body.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        return None
    named = data.get("id") or data.get("task_id")
    if isinstance(named, str) and named != task_id:
        msg = f"{_head(200, what)}: the answer is about task {_shown(named, secret)}"
        raise RetryableError(msg, status=200)
    return parse_task(task_id, data, secret=secret)


def _uploaded(answer: _Answer, body: object, what: str, secret: Secret) -> Uploaded | None:
    """The URL an upload answer gives; raises AmbiguousError for one that is no http(s) URL."""
    if answer.status != 200 or not isinstance(body, dict) or body.get("url") is None:
        return None
    url = body["url"]
    if not _is_url(url, secret):
        msg = f"{_head(200, what)}: the answer's url is not an http(s) URL: {_shown(url, secret)}"
        raise AmbiguousError(msg, status=200)
    created = _finite(body.get("created_at"))
    when = created if created is not None and 0 < created < _LATEST_UNIX else time.time()
    return Uploaded(url=url, created_at=when)


def _task_ids(body: Mapping[str, Any]) -> list[object]:
    """The ids ``data`` names: one object, or an array of objects; [] if any entry has none."""
    data = body.get("data")
    found: list[object] = []
    for entry in data if isinstance(data, list) else [data]:
        value = (entry.get("task_id") or entry.get("id")) if isinstance(entry, dict) else None
        if value is None:
            return []
        found.append(value)
    return found


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


def parse_task(task_id: str, data: Mapping[str, Any], *, secret: Secret | None = None) -> TaskState:
    """Normalise a task document: ``url`` as list or string, ``error`` or ``fail_reason``.

    Each field is kept only when it makes sense, else left out: an http(s) URL without the
    key, ``progress`` in 0..100, ``expires_at`` a unix time before 2200, ``cost`` finite
    and >= 0; server text is scrubbed, made printable and cut to ``MAX_TEXT``.
    """
    result = data.get("result")
    if not isinstance(result, dict):
        result = {}
    urls: list[str] = []
    expires: int | None = None
    thumbnail = _link_text(result.get("thumbnail_url"), secret)
    videos = result.get("videos")
    for video in videos if isinstance(videos, list) else []:
        if not isinstance(video, dict):
            continue
        url = video.get("url")
        candidates = [url] if isinstance(url, str) else url if isinstance(url, list) else []
        urls.extend(u for u in candidates if _is_url(u, secret))
        exp = _finite(video.get("expires_at"))
        if exp is not None and 0 < exp < _LATEST_UNIX:
            expires = int(exp) if expires is None else min(expires, int(exp))
        thumbnail = thumbnail or _link_text(video.get("thumbnail_url"), secret)
    status = data.get("status")
    progress = _finite(data.get("progress"))
    cost = _finite(data.get("cost"))
    return TaskState(
        task_id=task_id,
        status=normal_status(status if isinstance(status, str) else ""),
        progress=int(progress) if progress is not None and 0 <= progress <= 100 else None,
        video_urls=tuple(urls),
        expires_at=expires,
        thumbnail_url=thumbnail,
        cost=cost if cost is not None and cost >= 0 else None,
        error=_error_text(data, secret),
    )


def _finite(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (bools, strings, NaN, 1e400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_url(value: object, secret: Secret | None) -> bool:
    """True for a printable http(s) URL with a host, no spaces, and no credential in it."""
    if not isinstance(value, str) or len(value) > 8192 or not value.isprintable() or " " in value:
        return False
    if scrub(value, secret) != value:
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _link_text(value: object, secret: Secret | None) -> str | None:
    """A thumbnail link: kept as given when printable, bounded and free of credentials."""
    if not isinstance(value, str) or not value or len(value) > 8192 or not value.isprintable():
        return None
    return value if scrub(value, secret) == value else None


def _server_text(value: object, secret: Secret | None) -> str | None:
    """Server text fit for a message: scrubbed, non-printables escaped, cut to MAX_TEXT."""
    if not isinstance(value, str) or not value:
        return None
    return _clip(_printable(scrub(value, secret)), MAX_TEXT)


def _printable(text: str) -> str:
    """``text`` with each non-printable character (CR, ESC, NUL, bidi, surrogates) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _shown(value: object, secret: Secret | None) -> str:
    """A value from an answer, fit to quote in a message: itself if a task id, else escaped."""
    if valid_task_id(value) and scrub(str(value), secret) == value:
        return str(value)
    if isinstance(value, str):
        return f"'{_clip(_printable(scrub(value, secret)), 80)}'"
    return _clip(_printable(scrub(repr(value), secret)), 80)


def _head(status: int, what: str) -> str:
    return f"APIMart answered {status}{_reason(status)} for {what}"


def _bad_answer(message: str, status: int | None, *, mutating: bool) -> ApiError:
    """An answer that cannot be read: a POST may have acted on it, a GET is asked again."""
    if mutating:
        return AmbiguousError(message, status=status)
    return RetryableError(message, status=status)


# -- classifying failures ----------------------------------------------------------------------

#: Answers that may mean "the model is not served" (new-api style gateways; see classify).
_MODEL_STATUSES = frozenset({400, 403, 404, 503})
_MODEL_CODES = frozenset({"model_not_found"})
_MODEL_GONE = re.compile(
    r"\bmodel\b\W{0,3}[\w.:/-]*\W{0,3}\s*(?:is\s+)?(?:currently\s+)?"
    r"(?:not\s+found|does\s+not\s+exist|doesn't\s+exist|not\s+exists?|not\s+available"
    r"|no\s+longer\s+available|unavailable|retired|discontinued)"
    r"|\bno\s+available\s+channels?\b|无可用渠道|模型\s*\S{0,64}?\s*(?:不存在|不可用|已下线)",
    re.IGNORECASE,
)


def classify(
    status: int,
    body: object,
    raw: bytes,
    what: str,
    *,
    retry_after: float | None,
    mutating: bool,
    model: str | None = None,
    secret: Secret | None = None,
    note: str | None = None,
) -> ApiError:
    """Map a non-success answer to exactly one ``ApiError`` class.

    A 200 that is not a success takes its class from the body's ``code`` (or its
    ``error.code``) when that is an HTTP-like number, else it is ambiguous: the server
    may have acted on it. ``mutating`` requests treat 500/502/504 (and 3xx: a redirect is
    never followed) as ambiguous; reads may simply retry them.

    ``model`` (submissions only): a 400/403/404/503 whose ``error.code`` is
    ``model_not_found`` or whose message says the model is not found, does not exist, is
    unavailable, or has no available channel (e.g. "no available channel for model X under
    group default", "当前分组 default 下对于模型 X 无可用渠道") is ``ModelUnavailableError``:
    refused, so nothing was created, and not retried even as a 503. ASSUMPTION: APIMart's
    real answer is unknown (apimart-models.md §4); these are new-api's and OpenAI's shapes,
    matched conservatively (the word "model" right before the phrase). A quota answer stays
    fatal. ``note`` replaces the body's text (a redirect, an oversized body).
    """
    code = _error_code(body, secret)
    effective = _body_status(body) if status == 200 else status
    retry_after = retry_after if retry_after is not None else _retry_after_body(body)
    detail = note or (_error_text(body, secret) if isinstance(body, dict) else None)
    if detail is None:
        detail = "unreadable body" if raw else "empty body"
    message = f"{_head(status, what)}: {detail}"
    named = _task_ids(body)[:1] if isinstance(body, dict) else []
    if named and named[0] is not None:
        # Kept in the ledger's error cell: the key to reconciling an 'unknown' job by hand.
        message += f" (the answer names task {_shown(named[0], secret)})"
    kwargs: dict[str, Any] = {"status": status, "code": code, "retry_after": retry_after}
    quota = effective == 402 or any(w in f"{code or ''} {detail}".lower() for w in _QUOTA_WORDS)
    gone = (code or "").lower() in _MODEL_CODES or _MODEL_GONE.search(detail) is not None
    if model is not None and effective in _MODEL_STATUSES and gone and not quota:
        shown = _clip(_printable(model), 100)
        hint = (f"\n  hint: APIMart does not serve model '{shown}' now (nothing was created);"
                " use another model, or try this one again later")
        return ModelUnavailableError(message + hint, model=model, status=status, code=code)
    if effective in _FATAL:
        return FatalApiError(message + _fatal_hint(effective, code, detail), **kwargs)
    if effective in _RETRYABLE:
        return RetryableError(message, **kwargs)
    if 400 <= effective < 500:
        return RejectedError(message, **kwargs)
    # 500/502/504, other 5xx, 3xx and an unreadable 200: a POST may have been acted on.
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


def _transport_error(
    exc: BaseException, what: str, *, sent: bool, secret: Secret | None = None
) -> ApiError:
    """Classify a failure without an HTTP answer.

    Connection and connect-timeout failures mean nothing reached the server. Anything
    later (read timeout, reset, a torn response, one aiohttp cannot parse) means a POST
    may have been processed.
    """
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return RetryableError(f"could not connect for {what}: {name}: {_safe(exc, secret)}")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return RejectedError(f"invalid URL for {what}: {_safe(exc, secret)}")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        text = f"no answer in time for {what} ({name})"
    else:
        text = f"the connection failed during {what}: {name}: {_safe(exc, secret)}"
    return AmbiguousError(text) if sent else RetryableError(text)


def _safe(exc: BaseException, secret: Secret | None) -> str:
    # aiohttp messages name host and URL, and may quote bytes the server sent.
    return _clip(_printable(scrub(str(exc), secret)), 200)


def _says_ok(body: object) -> bool:
    """A JSON object whose ``code`` (if any) is 200 and whose ``error`` (if any) is empty.

    Gateways send ``"error": null`` or ``"code": "200"`` on success; neither is a failure.
    """
    if not isinstance(body, dict) or body.get("error"):
        return False
    code = body.get("code", 200)
    return code in (200, "200")


def _error_code(body: object, secret: Secret | None = None) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = err.get("code") or err.get("type")
        if isinstance(code, str | int) and not isinstance(code, bool):
            return _clip(_printable(scrub(str(code), secret)), 64)
    return None


def _error_text(body: Mapping[str, Any], secret: Secret | None = None) -> str | None:
    err = body.get("error")
    candidates = [err.get("message") if isinstance(err, dict) else err]
    candidates += [body.get("fail_reason"), body.get("message")]
    for value in candidates:
        text = _server_text(value, secret)
        if text:
            return text
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
        return _seconds(max(0.0, when.timestamp() - time.time()))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _retry_after_body(body: object) -> float | None:
    if isinstance(body, dict):
        value = body.get("retry_after")
        if value is None and isinstance(body.get("error"), dict):
            value = body["error"].get("retry_after")
        seconds = _finite(value)
        if seconds is not None:
            return _seconds(seconds)
        if isinstance(value, int) and not isinstance(value, bool):  # past float range: capped
            return MAX_SERVER_WAIT if value > 0 else 0.0
    return None


def _seconds(value: float) -> float | None:
    # "inf" and "nan" parse as floats (and json.loads accepts Infinity/NaN): a wait of
    # infinity would hang the run, so such a value counts as no advice at all; any
    # other is capped, since a server asking for days would stall the run as surely.
    return min(max(0.0, value), MAX_SERVER_WAIT) if math.isfinite(value) else None


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
