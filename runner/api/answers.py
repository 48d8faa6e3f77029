"""Reading APIMart answers, which are untrusted input.

A body is read up to ``MAX_ANSWER_BYTES`` and parsed up to ``MAX_JSON_DEPTH``; each field is
checked for type, finiteness and range before use; a task id must pass :func:`valid_task_id`
and a link must be an http(s) URL. A reader (:func:`read_submitted`, :func:`read_task`,
:func:`read_uploaded`, :func:`read_balance`) returns the result of a success, None for "not a
success" (then ``runner.api.failures.classify`` decides), or raises an ``ApiError`` for a
success it cannot trust. Server text is scrubbed of the key, made printable and cut to
``MAX_TEXT``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from runner.api.secret import Secret, scrub
from runner.errors import AmbiguousError, RejectedError, RetryableError

#: The largest API answer read (uploads and task documents are a few KiB).
MAX_ANSWER_BYTES: Final = 1 << 20
#: The deepest nesting of arrays and objects accepted in an answer (documents use 4).
MAX_JSON_DEPTH: Final = 64
#: Characters of one server text kept in a message or a task's error.
MAX_TEXT: Final = 1000
TERMINAL_STATES: Final = frozenset({"completed", "failed", "cancelled"})
#: 2200-01-01T00:00:00Z: a later "unix time" from the API is nonsense, not a date.
_LATEST_UNIX: Final = 7_258_118_400
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class Balance:
    """What ``GET /v1/balance`` says about the key's balance (apimart-api.md §5).

    The unit is whatever the account is configured in (USD, CNY or tokens, per the docs).

    Attributes:
        remain: what is left; None when the quota is unlimited (``remain_balance: -1`` or
            ``unlimited_quota: true``).
        used: what has been spent; None when the answer does not say.
    """

    remain: float | None
    used: float | None


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as read: its status, its body (None: over the size bound), headers."""

    status: int
    raw: bytes | None
    headers: Mapping[str, str]


Reader = Callable[[Answer, object, str, Secret], T | None]


def valid_task_id(text: object) -> bool:
    """True for a task id safe to store and to put in a URL path.

    That is 1-128 characters of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit,
    without ``..``: APIMart's ``task_<ULID>`` and ``task-unified-<unix>-<x>`` both pass;
    CR/LF, NUL, ``/``, ``?``, ``%``, spaces and non-ASCII never do.
    """
    return isinstance(text, str) and _TASK_ID.fullmatch(text) is not None and ".." not in text


def parse_json(raw: bytes | None) -> object:
    """The JSON value of a body; None when there is none, or it is not JSON or too deep."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    # Each level opens with a bracket: a body with few of them cannot nest too deep.
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return value
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


def read_submitted(answer: Answer, body: object, what: str, secret: Secret) -> Submitted | None:
    """The task of a submit answer; raises AmbiguousError for one whose task id is unusable."""
    if not 200 <= answer.status < 300 or not _says_ok(body):
        return None
    assert isinstance(body, dict)
    found = task_ids(body)
    task_id = found[0] if found else None
    if not found:
        problem = "the answer names no task id"
    elif any(other != task_id for other in found[1:]):
        names = ", ".join(quoted(each, secret) for each in found[:5])
        problem = f"the answer names {len(found)} tasks ({names}) for one request"
    elif not valid_task_id(task_id) or scrub(str(task_id), secret) != task_id:
        problem = f"the answer's task id is not one: {quoted(task_id, secret)}"
    else:
        assert isinstance(task_id, str)
        replayed = answer.headers.get("Idempotency-Replayed", "").lower() == "true"
        return Submitted(task_id=task_id, http_status=answer.status, replayed=replayed)
    # Built only for a failure: a success never formats the message.
    hint = "\n  hint: the task may exist; check the APIMart console before sending the job again"
    msg = f"{headline(answer.status, what)}: {problem}{hint}"
    raise AmbiguousError(msg, status=answer.status)


def read_task(
    task_id: str, answer: Answer, body: object, what: str, secret: Secret
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
        msg = f"{headline(200, what)}: the answer is about task {quoted(named, secret)}"
        raise RetryableError(msg, status=200)
    return parse_task(task_id, data, secret=secret)


def read_uploaded(answer: Answer, body: object, what: str, secret: Secret) -> Uploaded | None:
    """The URL an upload answer gives; raises AmbiguousError for one that is no http(s) URL."""
    if answer.status != 200 or not isinstance(body, dict) or body.get("url") is None:
        return None
    url = body["url"]
    if not is_url(url, secret):
        msg = (f"{headline(200, what)}: the answer's url is not an http(s) URL: "
               f"{quoted(url, secret)}")
        raise AmbiguousError(msg, status=200)
    created = finite(body.get("created_at"))
    when = created if created is not None and 0 < created < _LATEST_UNIX else time.time()
    return Uploaded(url=url, created_at=when)


def read_balance(answer: Answer, body: object, what: str, secret: Secret) -> Balance | None:
    """The balance a ``GET /v1/balance`` answer gives.

    An answer that is not a 200 JSON success is left to ``classify``. The documented failure,
    HTTP 200 with ``success: false``, raises ``RejectedError`` with the server's message;
    a 200 whose fields are missing or of the wrong type raises ``RetryableError``.
    ``remain_balance`` may be negative (an overdraft) but for -1, which means unlimited.
    """
    if answer.status != 200 or not _says_ok(body):
        return None
    assert isinstance(body, dict)
    head = headline(200, what)
    success = body.get("success", True)
    if success is False:
        text = _server_text(body.get("message"), secret) or "no message"
        msg = f"{head}: the balance lookup failed: {text}"
        raise RejectedError(msg, status=200)
    unlimited = body.get("unlimited_quota", False)
    remain = finite(body.get("remain_balance"))
    used = finite(body.get("used_balance"))
    wrong = [
        name for name, bad in (
            ("success", success is not True),
            ("unlimited_quota", not isinstance(unlimited, bool)),
            ("remain_balance", remain is None and unlimited is not True),
            ("used_balance", used is None and body.get("used_balance") is not None),
        ) if bad
    ]  # fmt: skip
    if wrong:
        shown = ", ".join(f"{name} = {_typed(body[name], secret)}" if name in body
                          else f"no {name}" for name in wrong)
        msg = f"{head}: not a balance ({shown})"
        raise RetryableError(msg, status=200)
    return Balance(remain=None if unlimited is True or remain == -1 else remain, used=used)


def _typed(value: object, secret: Secret | None) -> str:
    """A value fit to quote where its type matters: a string always in quotes."""
    if isinstance(value, str):
        return f"'{clip(printable(scrub(value, secret)), 80)}'"
    return quoted(value, secret)


def task_ids(body: Mapping[str, Any]) -> list[object]:
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
        urls.extend(u for u in candidates if is_url(u, secret))
        exp = finite(video.get("expires_at"))
        if exp is not None and 0 < exp < _LATEST_UNIX:
            expires = int(exp) if expires is None else min(expires, int(exp))
        thumbnail = thumbnail or _link_text(video.get("thumbnail_url"), secret)
    status = data.get("status")
    progress = finite(data.get("progress"))
    cost = finite(data.get("cost"))
    return TaskState(
        task_id=task_id,
        status=normal_status(status if isinstance(status, str) else ""),
        progress=int(progress) if progress is not None and 0 <= progress <= 100 else None,
        video_urls=tuple(urls),
        expires_at=expires,
        thumbnail_url=thumbnail,
        cost=cost if cost is not None and cost >= 0 else None,
        error=error_text(data, secret),
    )


def finite(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else (bools, strings, NaN, 1e400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def is_url(value: object, secret: Secret | None) -> bool:
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
    return clip(printable(scrub(value, secret)), MAX_TEXT)


def printable(text: str) -> str:
    """``text`` with each non-printable character (CR, ESC, NUL, bidi, surrogates) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def quoted(value: object, secret: Secret | None) -> str:
    """A value from an answer, fit to quote in a message: itself if a task id, else escaped."""
    if valid_task_id(value) and scrub(str(value), secret) == value:
        return str(value)
    if isinstance(value, str):
        return f"'{clip(printable(scrub(value, secret)), 80)}'"
    return clip(printable(scrub(repr(value), secret)), 80)


def headline(status: int, what: str) -> str:
    return f"APIMart answered {status}{_reason(status)} for {what}"


def _says_ok(body: object) -> bool:
    """A JSON object whose ``code`` (if any) is 200 and whose ``error`` (if any) is empty.

    Gateways send ``"error": null`` or ``"code": "200"`` on success; neither is a failure.
    """
    if not isinstance(body, dict) or body.get("error"):
        return False
    code = body.get("code", 200)
    return code in (200, "200")


def error_text(body: Mapping[str, Any], secret: Secret | None = None) -> str | None:
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
