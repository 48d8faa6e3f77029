"""A local APIMart emulator: the documented contract of every catalog model, plus faults.

Used by the tests over loopback sockets, in-process by ``--mock`` runs, and standalone by
``apimart-batch mock-server``. Time comes from an injectable clock (unix seconds), so a test
moves tasks from pending to completed, and links past expiry, without sleeping. The request
rules, envelopes and payloads live in :mod:`runner.emulator.contract`, the knobs and their
flags in :mod:`runner.emulator.config`, what goes wrong in :mod:`runner.emulator.faults`, the
tasks and images in :mod:`runner.emulator.tasks` and :mod:`runner.emulator.uploads`, the
handlers in :mod:`runner.emulator.routes`. This module assembles them into one application.

Decisions where the contract (apimart-api.md) is silent:

- each body is checked against its model's schema in the catalog (:mod:`runner.catalog`), as a
  gateway reads it: unknown fields are ignored, a null field counts as omitted, integers must
  be integer literals; ``thumbnail: true`` is honoured for every model;
- a model outside the catalog, or retired by the ``retired_models`` knob, gets the
  model-unavailable answer (:func:`~runner.emulator.contract.model_unavailable`; its real
  shape is unknown, so both likely forms are offered) before anything else is looked at:
  no task, no charge, no Idempotency-Key record;
- a model whose catalog ``response`` is ``object`` (Grok) is answered ``data: {id, ...}`` as
  its page shows; every task query has the same shape;
- only Sora has a published price, so only Sora's completed tasks carry ``cost``;
- the same ``Idempotency-Key`` with a different body is 422 (IETF idempotency-key draft);
- 401/402/403/429/503 faults refuse a submit before any task exists; 500/502/504 are sent
  after the task was created, like a gateway that lost the upstream's answer;
- the rate limiter is a token bucket on the injected clock, burst = one second's worth;
- balance is counted in tasks: ``used_balance`` = tasks created, ``remain_balance`` = quota left;
  a missing or wrong key on ``/v1/balance`` is the documented HTTP 200 ``success: false``;
- with ``balance_usd``, ``/v1/balance`` reports USD instead: ``used_balance`` = the ``cost`` of
  every task created so far (billed at creation, whatever its outcome, never refunded; an
  unpriced model costs 0), ``remain_balance`` = ``balance_usd`` less that, never below 0,
  ``unlimited_quota: false``. It only reports: the ``quota`` knob alone refuses submits;
- ``balance_fails`` makes every ``/v1/balance`` answer the documented failure (HTTP 200,
  ``success: false`` and a message), even for a good key;
- a video link expires ``link_ttl`` after completion, and a task query keeps handing out the
  expired link. The docs do not say whether APIMart re-issues links on a later query; with
  ``fresh_links`` a query at or after expiry hands out a new link (a new name) valid
  ``link_ttl`` from then, and every link keeps its own expiry (the old one stays expired).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.emulator import contract
from runner.emulator.config import (
    DEFAULT_CONFIG,
    EmulatorConfig,
    add_arguments,
    config_from_args,
)
from runner.emulator.faults import ACTIONS, Faults, Route
from runner.emulator.routes import MediaRoutes, TaskRoutes
from runner.emulator.tasks import TaskStore
from runner.emulator.uploads import ImageStore
from runner.manifest import load_catalog

__all__ = [
    "ACTIONS",
    "Emulator",
    "EmulatorConfig",
    "RunningEmulator",
    "add_arguments",
    "config_from_args",
    "running",
    "serve_forever",
]

_API_ROUTES = frozenset({"submit", "poll", "upload", "balance"})


class Emulator:
    """The APIMart emulator: an ``aiohttp.web`` application (``app``) and its counters.

    Args:
        config: the behaviour and fault knobs.
        clock: unix seconds; drives task progress, timestamps, link expiry and the rate limiter.
    """

    def __init__(
        self, config: EmulatorConfig = DEFAULT_CONFIG, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        # One generator for every draw, so a seed replays the same run.
        rng = random.Random(config.seed)
        catalog = load_catalog(config.catalog_dir)
        self._faults = Faults(config, clock, rng)
        self._tasks = TaskStore(config, clock, rng)
        self._images = ImageStore(clock, rng)
        faults, tasks, images = self._faults, self._tasks, self._images
        self._task_routes = TaskRoutes(
            config, catalog, faults=faults, tasks=tasks, images=images, clock=clock, rng=rng
        )
        self._media = MediaRoutes(config, faults=faults, tasks=tasks, images=images, clock=clock)
        self._requests: Counter[str] = Counter()
        self._in_flight = self._peak_in_flight = 0
        self._submit_in_flight = self._peak_submit_in_flight = 0
        self.app = web.Application(middlewares=[self._track])
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.add_routes(
            [
                web.post("/v1/videos/generations", self._task_routes.submit, name="submit"),
                web.get("/v1/tasks/{task_id}", self._task_routes.poll, name="poll"),
                web.post("/v1/uploads/images", self._media.upload, name="upload"),
                web.get("/v1/balance", self._task_routes.balance, name="balance"),
                web.get("/f/video/{name}", self._media.video, name="download"),
                web.get("/f/image/{name}", self._media.image, name="image"),
                web.get("/_emulator/stats", self._stats, name="stats"),
            ]
        )

    # -- scripted faults -------------------------------------------------------------------

    def script(self, route: Route, actions: Iterable[str]) -> None:
        """Queue actions that the next requests to ``route`` take, one each, before any dice.

        ``"ok"`` answers normally; a 3-digit status answers with that error; named actions
        are listed in ``ACTIONS``.
        """
        self._faults.script(route, actions)

    def script_submit(self, actions: Iterable[str]) -> None:
        """Queue actions for the next ``POST /v1/videos/generations`` requests."""
        self.script("submit", actions)

    def script_poll(self, actions: Iterable[str]) -> None:
        """Queue actions for the next ``GET /v1/tasks/{id}`` requests."""
        self.script("poll", actions)

    def script_upload(self, actions: Iterable[str]) -> None:
        """Queue actions for the next ``POST /v1/uploads/images`` requests."""
        self.script("upload", actions)

    def script_download(self, actions: Iterable[str]) -> None:
        """Queue actions for the next video downloads."""
        self.script("download", actions)

    def _latency(self) -> float:
        """One latency draw (seconds); kept here for the test that samples it."""
        return self._faults.latency()

    # -- statistics ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start; the same document as ``GET /_emulator/stats``."""
        tasks = self._tasks
        statuses = Counter(tasks.status(task)[0] for task in tasks.tasks.values())
        return {
            "requests": dict(self._requests),
            "in_flight": self._in_flight,
            "peak_in_flight": self._peak_in_flight,
            "submit_in_flight": self._submit_in_flight,
            "peak_submit_in_flight": self._peak_submit_in_flight,
            "tasks_created": len(tasks.tasks),
            "tasks_by_status": dict(statuses),
            "tasks_per_key": dict(tasks.per_key),
            "max_tasks_per_idempotency_key": max(tasks.per_idempotency_key.values(), default=0),
            "max_tasks_per_body": max(tasks.per_body.values(), default=0),
            "idempotency_key_by_task": dict(tasks.idempotency_key_by_task),
            "replays": tasks.replays,
            "idempotency_conflicts": tasks.conflicts,
            "uploads": self._images.per_sha256.total(),
            "uploads_per_sha256": dict(self._images.per_sha256),
            "downloads": self._media.downloads,
            "unavailable_models": dict(self._task_routes.unavailable),
            "faults": dict(self._faults.counts),
            "scripted_left": self._faults.scripted_left(),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    # -- plumbing shared by the routes -----------------------------------------------------

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        self._requests[route] += 1
        submit = route == "submit"
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        if submit:
            self._submit_in_flight += 1
            self._peak_submit_in_flight = max(self._peak_submit_in_flight, self._submit_in_flight)
        try:
            if self.config.latency_ms > 0 and route in _API_ROUTES:
                await asyncio.sleep(self._faults.latency())
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status in (404, 405) and request.path.startswith("/v1/"):
                text = f"Invalid URL ({request.method} {request.path})"
                return contract.error(exc.status, text)
            raise
        finally:
            self._in_flight -= 1
            if submit:
                self._submit_in_flight -= 1

    async def _on_startup(self, app: web.Application) -> None:
        self._faults.stopping.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._faults.stopping.set()


# -- serving ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningEmulator:
    """An emulator listening on a socket: ``base_url`` is what a client uses as its API base."""

    base_url: str
    emulator: Emulator


@asynccontextmanager
async def running(
    config: EmulatorConfig = DEFAULT_CONFIG,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[RunningEmulator]:
    """Serve an emulator on ``host:port`` (0 = any free port) for the ``async with`` block."""
    emulator = Emulator(config, clock=clock)
    # Handlers are cancelled when their client goes away, so a timed-out client ends its slow
    # answer and in-flight counts stay true.
    runner = web.AppRunner(
        emulator.app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        # A wildcard bind is reached through loopback.
        shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
        netloc = f"[{shown}]:{bound_port}" if ":" in shown else f"{shown}:{bound_port}"
        yield RunningEmulator(f"http://{netloc}", emulator)
    finally:
        await runner.cleanup()


async def serve_forever(
    config: EmulatorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[str], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve until cancelled; ``on_ready(base_url)`` is called once the socket listens."""
    async with running(config, host=host, port=port, clock=clock) as server:
        on_ready(server.base_url)
        await asyncio.Event().wait()
