"""``--healthcheck-url``: a dead man's switch, pinged as healthchecks.io expects.

``URL/start`` when the command begins, then ``URL/<exit code>`` with the summary as the
body when it ends, so a monitor notices a run that failed, hung or never started. The
request carries no API key (its own session: no Authorization header; the summary holds
none), has a short timeout, and a ping that fails only warns: it never changes the exit
code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from runner import __version__
from runner.console import Console
from runner.errors import RunnerError

#: Seconds one ping may take, connection included.
PING_TIMEOUT = 10.0
#: The most body bytes a ping sends (healthchecks.io keeps 100 kB of it).
MAX_BODY = 100_000

Summary = Callable[[Mapping[str, object]], None]


def ping_url(url: str, what: str) -> str:
    """``url`` with ``/what`` appended to its path (its query string kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + what))


class Healthcheck:
    """Pings one check URL; ``summary`` is kept for the final ping's body.

    Args:
        url: the check's ping URL (``https://hc-ping.com/<uuid>``).
        console: where a failed ping is warned about.
        timeout: seconds one ping may take.
    """

    def __init__(self, url: str, console: Console, *, timeout: float = PING_TIMEOUT) -> None:
        self.url = url
        self.console = console
        self.timeout = timeout
        self.summary: Mapping[str, object] | None = None

    def keep(self, summary: Mapping[str, object]) -> None:
        """Keep the command's summary for the final ping."""
        self.summary = summary

    def ping(self, what: str, body: str = "") -> bool:
        """POST ``body`` to ``URL/what``; False (and a warning) if that failed."""
        try:
            target = ping_url(self.url, what)
            status = asyncio.run(self._post(target, body.encode()[:MAX_BODY]))
        except Exception as exc:  # noqa: BLE001 - a ping, whatever breaks it, never fails a run
            why = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.console.warn(f"--healthcheck-url: the '{what}' ping failed ({why}); the "
                              "command's exit code is not affected")
            return False
        if not 200 <= status < 300:
            self.console.warn(f"--healthcheck-url: the '{what}' ping was answered HTTP "
                              f"{status}; the command's exit code is not affected")
            return False
        return True

    async def _post(self, url: str, body: bytes) -> int:
        import aiohttp  # loaded only when a ping is asked for

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        # A session of its own, not the API client's: no Authorization header, no env proxies.
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                         headers={"User-Agent": f"apimart-batch/{__version__}"}
                                         ) as session, session.post(url, data=body) as answer:
            await answer.read()
            return answer.status

    def finish(self, code: int) -> None:
        """The final ping: the exit code, with the summary (JSON) as the body."""
        body = json.dumps(self.summary, ensure_ascii=False) if self.summary is not None else ""
        self.ping(str(code), body)


def pinged(url: str | None, console: Console, command: Callable[[Summary | None], int]) -> int:
    """Run ``command`` (given where to hand its summary), pinging ``url`` around it if set.

    A ``RunnerError`` (exit 2, 3, 75) is pinged with its exit code and message, then raised.
    """
    if url is None:
        return command(None)
    check = Healthcheck(url, console)
    check.ping("start")
    try:
        code = command(check.keep)
    except RunnerError as exc:
        check.ping(str(exc.exit_code), str(exc))
        raise
    check.finish(code)
    return code
