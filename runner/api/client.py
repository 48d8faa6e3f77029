"""The APIMart client: the only module that talks HTTP to the API.

Every outcome of a request maps to exactly one class (see ``runner.errors``):
success, ``RetryableError`` (refused before processing: safe to resend),
``AmbiguousError`` (the task may exist: never resent blindly), ``RejectedError``
(the request is wrong; ``ModelUnavailableError`` when the model is not served) or
``FatalApiError`` (auth, permission, balance: stop).
Retries are not done here; the submit stage decides with a ``RetryPolicy``.

The client is the transport; its neighbours hold the rest. ``runner.api.answers`` reads
answers (untrusted input, checked field by field), ``runner.api.failures`` classifies
what is not a success, ``runner.api.secret`` keeps the key and scrubs it from every
message, and ``runner.api.download`` streams files. ``_settle`` is the one place
answers are parsed, and no parsing exception leaves a ``Client`` method. Redirects are
followed only by downloads, which send no key.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any, Final, TypeVar

import aiohttp

from runner.api.answers import (
    MAX_ANSWER_BYTES,
    TERMINAL_STATES,
    Answer,
    Balance,
    Reader,
    Submitted,
    TaskState,
    Uploaded,
    headline,
    normal_status,
    parse_json,
    quoted,
    read_balance,
    read_submitted,
    read_task,
    read_uploaded,
    valid_task_id,
)
from runner.api.base import DEFAULT_BASE_URL
from runner.api.download import fetch, opened
from runner.api.failures import (
    PARSE_ERRORS,
    TRANSPORT_ERRORS,
    bad_answer,
    classify_answer,
    redact,
    unanswered,
)
from runner.api.secret import Secret, scrub
from runner.errors import ApiError, RejectedError
from runner.models import Job

# Importers from before the split (tests among them) find these names here too.
__all__ = [
    "DEFAULT_BASE_URL",
    "TERMINAL_STATES",
    "Balance",
    "Client",
    "Secret",
    "Submitted",
    "TaskState",
    "Timeouts",
    "Uploaded",
    "normal_status",
    "valid_task_id",
]

SUBMIT_PATH: Final = "/v1/videos/generations"
BALANCE_PATH: Final = "/v1/balance"
USER_AGENT: Final = "apimart-batch/0.1"

T = TypeVar("T")


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
    #: Built once per client, not per request: the key's header and each time limit.
    _auth: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _limits: dict[float, aiohttp.ClientTimeout] = field(
        default_factory=dict, init=False, repr=False
    )

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
        return opened(self._session)

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        if not self._auth:
            self._auth["Authorization"] = f"Bearer {self.api_key.reveal()}"
            if self.response_version:
                self._auth["X-APIMart-Response-Version"] = self.response_version
        headers = self._auth.copy()
        if extra:
            headers.update(extra)
        return headers

    def _timeout(self, total: float) -> aiohttp.ClientTimeout:
        limits = self._limits.get(total)
        if limits is None or limits.connect != self.timeouts.connect:
            # ``connect`` bounds the wait for a pooled connection too; aiohttp then raises
            # ConnectionTimeoutError, which is "not sent" (retryable), never ambiguous.
            limits = self._limits[total] = aiohttp.ClientTimeout(
                total=total, connect=self.timeouts.connect, sock_connect=self.timeouts.connect
            )
        return limits

    async def submit(self, job: Job, body: Mapping[str, Any] | None = None) -> Submitted:
        """Create the job's task; raises an ``ApiError`` subclass for every failure.

        ``body`` is what to send (local images already uploaded); default ``job.body()``.
        Only ``job.body`` and ``job.idempotency_key`` are read.
        """
        what = f"POST {SUBMIT_PATH}"
        sent = dict(job.body() if body is None else body)
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
        return _settle(answer, what, read_submitted, secret=self.api_key, mutating=True,
                       model=model if isinstance(model, str) else None)

    async def get_task(self, task_id: str) -> TaskState:
        """Fetch a task's state; 400 (unknown id) raises ``RejectedError``.

        An id that :func:`valid_task_id` refuses is never put in a URL: ``RejectedError``
        with ``code="invalid_task_id"`` and no status, and nothing is sent.
        """
        if not valid_task_id(task_id) or scrub(task_id, self.api_key) != task_id:
            msg = (f"GET /v1/tasks/{{id}}: refused to send: {quoted(task_id, self.api_key)} "
                   "is not a task id (1-128 letters, digits and _ . : -)\n  hint: the "
                   "ledger's task_id cell is damaged or came from a bad answer; fix it by hand")
            raise RejectedError(msg, code="invalid_task_id")
        what = f"GET /v1/tasks/{task_id}"
        answer = await self._send(
            "GET", f"{self.base_url}/v1/tasks/{task_id}", what, sent=False,
            seconds=self.timeouts.poll, params={"language": "en"}, headers=self._headers(),
        )
        return _settle(answer, what, partial(read_task, task_id), secret=self.api_key,
                       mutating=False)

    async def balance(self) -> Balance:
        """The key's balance: one ``GET /v1/balance``, no retry, the poll time limit.

        Every failure raises an ``ApiError`` scrubbed of the key: an HTTP error is
        classified as any other answer; the documented HTTP 200 ``success: false`` is a
        ``RejectedError`` carrying the server's message; a body that is not a balance is a
        ``RetryableError``.
        """
        what = f"GET {BALANCE_PATH}"
        answer = await self._send(
            "GET", self.base_url + BALANCE_PATH, what, sent=False, seconds=self.timeouts.poll,
            headers=self._headers(),
        )
        return _settle(answer, what, read_balance, secret=self.api_key, mutating=False)

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
        return _settle(answer, what, read_uploaded, secret=self.api_key, mutating=True)

    async def download(self, url: str, out: IO[bytes]) -> int:
        """Stream ``url`` into ``out``; returns the byte count, checked against Content-Length.

        The URL is a signed CDN link: no Authorization header is sent with it, so
        following the CDN's redirects (to any origin) cannot carry the key away.
        """
        limits = self._timeout(self.timeouts.download)
        return await fetch(self._files, url, out, limits=limits, secret=self.api_key)

    async def _send(
        self, method: str, url: str, what: str, *, sent: bool, seconds: float, **kwargs: Any
    ) -> Answer:
        """One API request; no redirect is followed (a POST is never re-sent elsewhere)."""
        try:
            async with self.session.request(
                method, url, allow_redirects=False, timeout=self._timeout(seconds), **kwargs
            ) as resp:
                return Answer(resp.status, await _read_body(resp), resp.headers)
        except (*TRANSPORT_ERRORS, *PARSE_ERRORS) as exc:
            error, cause = unanswered(exc, what, sent=sent, secret=self.api_key)
        raise error from cause


def _settle(
    answer: Answer,
    what: str,
    reader: Reader[T],
    *,
    secret: Secret,
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
        body = parse_json(answer.raw)
        result = reader(answer, body, what, secret)
        if result is not None:
            return result
        error = classify_answer(answer, body, what, mutating=mutating, model=model, secret=secret)
    except ApiError as exc:
        error = exc
    except PARSE_ERRORS as exc:
        text = f"{headline(answer.status, what)}: unreadable answer ({type(exc).__name__})"
        error = bad_answer(text, answer.status, mutating=mutating)
    # Raised outside the handler, so that no exception holding server text is chained.
    raise redact(error, secret)


async def _read_body(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None when it is over ``MAX_ANSWER_BYTES`` (the rest is left unread)."""
    length = resp.content_length
    if (length or 0) > MAX_ANSWER_BYTES:
        return None
    if length is not None and "Content-Encoding" not in resp.headers:
        # Within the bound and not decompressed: aiohttp reads exactly that many bytes.
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
