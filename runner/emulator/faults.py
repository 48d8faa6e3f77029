"""The emulator's fault engine: scripted and random faults, rate limit, latency, refusals.

The routes ask it what the next request to a route does (:meth:`Faults.admit`,
:meth:`Faults.next_action`) and answer through it when they refuse or drop, so every injected
fault is counted in one place. It draws from the emulator's one seeded ``random.Random``,
shared with the task and upload stores, so a seed replays the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Literal

from aiohttp import web

from runner.emulator import contract
from runner.emulator.config import EmulatorConfig

__all__ = ["ACTIONS", "AFTER_CREATE", "Faults", "Route", "fault_name"]

Route = Literal["submit", "poll", "upload", "download"]

#: Scripted actions each route understands; a 3-digit entry answers with that status.
ACTIONS: dict[str, frozenset[str]] = {
    "submit": frozenset(
        {"ok", "fail_task", "reset_after_create", "slow_after_create", "html_200"}
        | {"401", "402", "403", "429", "500", "502", "503", "504"}
    ),
    "poll": frozenset({"ok", "reset", "401", "429", "500", "502", "503", "504"}),
    "upload": frozenset({"ok", "reset_after_create", "429", "500", "502", "503"}),
    "download": frozenset({"ok", "reset", "403", "404", "500", "503"}),
}
#: Answered after the task (or upload) exists: the client cannot know whether it was created.
AFTER_CREATE = frozenset({"500", "502", "504"})


def fault_name(route: Route, action: str) -> str:
    """The stats name of an injected fault: submit faults bare, others prefixed by route."""
    return action if route == "submit" else f"{route}_{action}"


class Faults:
    """What goes wrong, and when: the scripts, the dice, the token bucket and their counters.

    Args:
        config: the fault knobs (``submit_faults``, ``p_poll_error``, ``rate_limit_rps``, ...).
        clock: unix seconds; refills the token bucket.
        rng: the emulator's seeded generator.
    """

    def __init__(
        self, config: EmulatorConfig, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        #: Injected faults by stats name (``rate_limit``, ``429``, ``poll_reset``, ...).
        self.counts: Counter[str] = Counter()
        self._scripts: dict[str, deque[str]] = {route: deque() for route in ACTIONS}
        self._submit_faults = [(action, p) for action, p in config.submit_faults if p]
        self._tokens = max(1.0, config.rate_limit_rps or 1.0)
        self._tokens_at = clock()
        #: Set while the app shuts down: a slow answer ends at once instead of holding it up.
        self.stopping = asyncio.Event()

    def script(self, route: Route, actions: Iterable[str]) -> None:
        """Queue actions that the next requests to ``route`` take, one each, before any dice.

        ``"ok"`` answers normally; a 3-digit status answers with that error; named actions
        are listed in ``ACTIONS``.
        """
        queued = list(actions)
        unknown = [a for a in queued if a not in ACTIONS[route]]
        if unknown:
            msg = f"unknown {route} actions {unknown} (allowed: {sorted(ACTIONS[route])})"
            raise ValueError(msg)
        self._scripts[route].extend(queued)

    def scripted_left(self) -> dict[str, int]:
        """Scripted actions not taken yet, by route."""
        return {route: len(queue) for route, queue in self._scripts.items()}

    def next_action(self, route: Route) -> str:
        """The next scripted action for ``route``, else one drawn from its fault rates."""
        queue = self._scripts[route]
        if queue:
            return queue.popleft()
        cfg = self.config
        if route == "submit" and self._submit_faults:
            draw = self._rng.random()
            for action, p in self._submit_faults:
                if draw < p:
                    return action
                draw -= p
        elif route == "poll" and cfg.p_poll_error and self._rng.random() < cfg.p_poll_error:
            return self._rng.choice(("500", "502", "429"))
        elif route == "download" and cfg.p_download_reset:
            return "reset" if self._rng.random() < cfg.p_download_reset else "ok"
        return "ok"

    def admit(self, route: Route) -> str | web.Response:
        """Rate limit, then the next action: the action, or the refusal to send now.

        A scripted or drawn status is answered here, before any work, unless it is one that
        comes after the task or upload exists.
        """
        if self._rate_limited(route):
            return self.refuse(429)
        action = self.next_action(route)
        if action.isdigit() and (route == "poll" or action not in AFTER_CREATE):
            return self.refuse(int(action), fault_name(route, action))
        return action

    async def after_create(
        self, request: web.Request, route: Route, action: str
    ) -> web.Response | None:
        """The fault ``action`` brings once the task (or upload) exists, else None: answer it."""
        if action in AFTER_CREATE:
            return self.refuse(int(action), fault_name(route, action))
        if action == "reset_after_create":
            return self.drop(request, fault_name(route, action))
        if action == "html_200":
            self.counts[action] += 1
            return web.Response(text=contract.HTML_PAGE, content_type="text/html")
        if action == "slow_after_create":
            self.counts[action] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.config.slow_seconds)
        return None

    def latency(self) -> float:
        """Seconds an API answer waits: lognormal around ``latency_ms``."""
        median = self.config.latency_ms / 1000
        return self._rng.lognormvariate(math.log(median), self.config.latency_jitter)

    def _rate_limited(self, route: str) -> bool:
        """Whether the rate limit refuses this request: a token bucket, not a fixed window.

        The bucket holds one second's worth of requests (``rate_limit_rps``, at least 1),
        starts full and refills at ``rate_limit_rps`` per second; each admitted request
        takes a token, and one that finds none is refused (429, with the configured
        ``Retry-After``: a fixed value, not the time until the next token). APIMart
        documents neither its limits, nor their algorithm, nor whether it sends
        ``Retry-After`` (apimart-api.md 4.4): this is a model of a common limiter, not
        APIMart's.
        """
        rps = self.config.rate_limit_rps
        if rps is None or (self.config.rate_limit_scope == "submit" and route != "submit"):
            return False
        now = self._clock()
        self._tokens = min(max(1.0, rps), self._tokens + max(0.0, now - self._tokens_at) * rps)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return False
        self.counts["rate_limit"] += 1
        return True

    def refuse(self, status: int, fault: str | None = None) -> web.Response:
        """An error answer; counted as an injected fault when ``fault`` names it."""
        if fault:
            self.counts[fault] += 1
        if status != 429:
            return contract.error(status)
        headers = {"Retry-After": self.config.retry_after} if self.config.retry_after else None
        seconds = self.config.retry_after_body
        extra = {"retry_after": seconds} if seconds is not None else None
        return contract.error(429, headers=headers, extra=extra)

    def refuse_file(self, status: int, fault: str | None = None) -> web.Response:
        """A CDN-style error: plain XML, not the API envelope."""
        if fault:
            self.counts[fault] += 1
        code = {403: "AccessDenied", 404: "NoSuchKey"}.get(status, "InternalError")
        text = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>"
        return web.Response(status=status, text=text, content_type="application/xml")

    def drop(self, request: web.Request, fault: str) -> web.Response:
        """Close the connection without (the rest of) an answer; the client sees a disconnect."""
        self.counts[fault] += 1
        if request.transport is not None:
            request.transport.close()
        # Never sent: aiohttp finds the transport closing and gives up quietly.
        return web.Response(status=204)
