"""Classifying failures: every request that does not succeed raises exactly one ``ApiError``.

``RetryableError`` (refused before processing: safe to resend), ``AmbiguousError`` (the task
may exist: never resent blindly), ``RejectedError`` (the request is wrong;
``ModelUnavailableError`` when the model is not served) or ``FatalApiError`` (auth,
permission, balance: stop). A failure without an answer is classified by whether the
request may have reached the server. Every message is scrubbed of the key.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
import traceback
from typing import Any

import aiohttp

from runner.api.answers import (
    MAX_ANSWER_BYTES,
    Answer,
    clip,
    error_text,
    finite,
    headline,
    printable,
    quoted,
    task_ids,
)
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

_RETRYABLE = frozenset({408, 429, 503})
_FATAL = frozenset({401, 402, 403})
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
#: What a bug in reading an answer can raise; the guard turns each into a bad answer.
PARSE_ERRORS = (TypeError, ValueError, LookupError, ArithmeticError, RecursionError,
                AttributeError)  # fmt: skip
_QUOTA_WORDS = ("quota", "balance", "额度", "insufficient")


def bad_answer(message: str, status: int | None, *, mutating: bool) -> ApiError:
    """An answer that cannot be read: a POST may have acted on it, a GET is asked again."""
    if mutating:
        return AmbiguousError(message, status=status)
    return RetryableError(message, status=status)


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
    detail = note or (error_text(body, secret) if isinstance(body, dict) else None)
    if detail is None:
        detail = "unreadable body" if raw else "empty body"
    message = f"{headline(status, what)}: {detail}"
    named = task_ids(body)[:1] if isinstance(body, dict) else []
    if named and named[0] is not None:
        # Kept in the ledger's error cell: the key to reconciling an 'unknown' job by hand.
        message += f" (the answer names task {quoted(named[0], secret)})"
    kwargs: dict[str, Any] = {"status": status, "code": code, "retry_after": retry_after}
    quota = effective == 402 or any(w in f"{code or ''} {detail}".lower() for w in _QUOTA_WORDS)
    gone = (code or "").lower() in _MODEL_CODES or _MODEL_GONE.search(detail) is not None
    if model is not None and effective in _MODEL_STATUSES and gone and not quota:
        shown = clip(printable(model), 100)
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
    return clip(printable(scrub(str(exc), secret)), 200)


def _error_code(body: object, secret: Secret | None = None) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = err.get("code") or err.get("type")
        if isinstance(code, str | int) and not isinstance(code, bool):
            return clip(printable(scrub(str(code), secret)), 64)
    return None


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
        seconds = finite(value)
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


def classify_answer(
    answer: Answer, body: object, what: str, *, mutating: bool, model: str | None,
    secret: Secret,
) -> ApiError:
    """:func:`classify` for an answer as read, noting a redirect or an oversized body."""
    note = None
    if answer.raw is None:
        note = f"the answer was larger than {MAX_ANSWER_BYTES} bytes (not read)"
    elif 300 <= answer.status < 400:
        where = answer.headers.get("Location")
        to = f" to {clip(printable(scrub(where, secret)), 200)}" if where else ""
        note = f"a redirect{to}, not followed"
    return classify(
        answer.status, body, answer.raw or b"", what,
        retry_after=_retry_after_header(answer.headers.get("Retry-After")),
        mutating=mutating, model=model, secret=secret, note=note,
    )


def unanswered(
    exc: BaseException, what: str, *, sent: bool, secret: Secret
) -> tuple[ApiError, BaseException | None]:
    """A failure without a usable answer, and the cause to chain (None if it shows the key).

    aiohttp's ``ClientResponseError`` repr holds the request headers, and its message
    may quote the bytes the server sent: such a cause is left off.
    """
    error = redact(_transport_error(exc, what, sent=sent, secret=secret), secret)
    key = secret.reveal()
    texts = ["".join(traceback.format_exception(exc))]
    link: BaseException | None = exc
    while link is not None and len(texts) < 50:
        texts += [str(link), repr(link)]
        link = link.__cause__ or link.__context__
    return error, None if key and any(key in text for text in texts) else exc


def redact(error: ApiError, secret: Secret) -> ApiError:
    """``error`` with the key and any credential scrubbed from its message and code."""
    error.message = scrub(error.message, secret)
    error.args = (error.message,)
    if error.code is not None:
        error.code = scrub(error.code, secret)
    return error
