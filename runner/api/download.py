"""Downloads: a signed CDN link streamed into a file, without the key.

No Authorization header is sent with the link, so following the CDN's redirects (to any
origin) cannot carry the key away; the key is used here only to scrub messages.
"""

from __future__ import annotations

from typing import IO

import aiohttp

from runner.api.answers import is_url, quoted
from runner.api.failures import PARSE_ERRORS, TRANSPORT_ERRORS, unanswered
from runner.api.secret import Secret
from runner.errors import ApiError, RejectedError, RetryableError


async def fetch(
    session: aiohttp.ClientSession | None,
    url: str,
    out: IO[bytes],
    *,
    limits: aiohttp.ClientTimeout,
    secret: Secret,
) -> int:
    """Stream ``url`` into ``out``; returns the byte count, checked against Content-Length.

    ``session`` is the client's download pool (None: the client is not open, which
    raises once the URL has passed its check); ``limits`` bound the request's time.
    """
    what = "GET video"
    if not is_url(url, secret):
        msg = f"{what}: not an http(s) URL: {quoted(url, secret)}; nothing was sent"
        raise RejectedError(msg)
    try:
        async with opened(session).get(url, timeout=limits) as resp:
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
    except (*TRANSPORT_ERRORS, *PARSE_ERRORS) as exc:
        error, cause = unanswered(exc, what, sent=False, secret=secret)
    else:
        if expected is not None and size != expected:
            msg = f"{what}: got {size} of {expected} bytes; the connection ended early"
            raise RetryableError(msg)
        return size
    raise error from cause


def opened(session: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
    """``session``, or RuntimeError when the client is used outside ``async with``."""
    if session is None:
        msg = "Client used outside 'async with'"
        raise RuntimeError(msg)
    return session
