"""A local APIMart emulator: the documented contract of every catalog model, plus faults.

Used by the tests over loopback sockets, in-process by ``--mock`` runs, and standalone by
``apimart-batch mock-server``. Time comes from an injectable clock (unix seconds), so a test
moves tasks from pending to completed, and links past expiry, without sleeping. The request
rules, envelopes and payloads live in :mod:`runner.emulator_contract`, the knobs and their
flags in :mod:`runner.emulator_config`.

Decisions where the contract (apimart-api.md) is silent:

- each body is checked against its model's schema in the catalog (:mod:`runner.catalog`), as a
  gateway reads it: unknown fields are ignored, a null field counts as omitted, integers must
  be integer literals; ``thumbnail: true`` is honoured for every model;
- a model outside the catalog, or retired by the ``retired_models`` knob, gets the
  model-unavailable answer (:func:`~runner.emulator_contract.model_unavailable`; its real
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
  a missing or wrong key on ``/v1/balance`` is the documented HTTP 200 ``success: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from runner.emulator import contract
from runner.emulator.config import (
    DEFAULT_CONFIG,
    EmulatorConfig,
    add_arguments,
    config_from_args,
)
from runner.manifest import ModelSpec, load_catalog

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
# Answered after the task (or upload) exists: the client cannot know whether it was created.
_AFTER_CREATE = frozenset({"500", "502", "504"})
_API_ROUTES = frozenset({"submit", "poll", "upload", "balance"})
_BLOB_STORE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Task:
    id: str
    created: float
    model: str
    seconds: int
    resolution: str
    thumbnail: bool
    failure: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Upload:
    sha256: str
    content_type: str
    size: int
    created: float


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
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._catalog = load_catalog(config.catalog_dir)
        self._validators = contract.gateway_validators(self._catalog)
        self._unavailable: Counter[str] = Counter()
        self._tasks: dict[str, _Task] = {}
        self._by_idempotency_key: dict[str, tuple[str, str]] = {}
        self._scripts: dict[str, deque[str]] = {route: deque() for route in ACTIONS}
        self._submit_faults = [(action, p) for action, p in config.submit_faults if p]
        self._tokens = max(1.0, config.rate_limit_rps or 1.0)
        self._tokens_at = clock()
        self._uploads: dict[str, _Upload] = {}
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._blob_bytes = 0
        self._closing = asyncio.Event()
        self._requests: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._per_key: Counter[str] = Counter()
        self._per_idempotency_key: Counter[str] = Counter()
        self._per_body: Counter[str] = Counter()
        self._per_sha256: Counter[str] = Counter()
        self._idempotency_key_by_task: dict[str, str | None] = {}
        self._in_flight = self._peak_in_flight = 0
        self._submit_in_flight = self._peak_submit_in_flight = 0
        self._replays = self._conflicts = self._downloads = 0
        self.app = web.Application(middlewares=[self._track])
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.add_routes(
            [
                web.post("/v1/videos/generations", self._submit, name="submit"),
                web.get("/v1/tasks/{task_id}", self._poll, name="poll"),
                web.post("/v1/uploads/images", self._upload, name="upload"),
                web.get("/v1/balance", self._balance, name="balance"),
                web.get("/f/video/{name}", self._video, name="download"),
                web.get("/f/image/{name}", self._image, name="image"),
                web.get("/_emulator/stats", self._stats, name="stats"),
            ]
        )

    # -- scripted faults -------------------------------------------------------------------

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

    def _next_action(self, route: Route) -> str:
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

    # -- statistics ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start; the same document as ``GET /_emulator/stats``."""
        statuses = Counter(self._status(task)[0] for task in self._tasks.values())
        return {
            "requests": dict(self._requests),
            "in_flight": self._in_flight,
            "peak_in_flight": self._peak_in_flight,
            "submit_in_flight": self._submit_in_flight,
            "peak_submit_in_flight": self._peak_submit_in_flight,
            "tasks_created": len(self._tasks),
            "tasks_by_status": dict(statuses),
            "tasks_per_key": dict(self._per_key),
            "max_tasks_per_idempotency_key": max(self._per_idempotency_key.values(), default=0),
            "max_tasks_per_body": max(self._per_body.values(), default=0),
            # As sent, even when --no-idempotency ignores it: which job each task belongs to.
            "idempotency_key_by_task": dict(self._idempotency_key_by_task),
            "replays": self._replays,
            "idempotency_conflicts": self._conflicts,
            "uploads": self._per_sha256.total(),
            "uploads_per_sha256": dict(self._per_sha256),
            "downloads": self._downloads,
            # Submits answered model-unavailable (retired or not in the catalog), by model.
            "unavailable_models": dict(self._unavailable),
            "faults": dict(self._faults),
            "scripted_left": {route: len(queue) for route, queue in self._scripts.items()},
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
                await asyncio.sleep(self._latency())
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

    def _latency(self) -> float:
        median = self.config.latency_ms / 1000
        return self._rng.lognormvariate(math.log(median), self.config.latency_jitter)

    async def _on_startup(self, app: web.Application) -> None:
        self._closing.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    def _key(self, request: web.Request) -> str | None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        if self.config.key is not None and key != self.config.key:
            return None
        return key

    def _rate_limited(self, route: str) -> bool:
        rps = self.config.rate_limit_rps
        if rps is None or (self.config.rate_limit_scope == "submit" and route != "submit"):
            return False
        now = self._clock()
        self._tokens = min(max(1.0, rps), self._tokens + max(0.0, now - self._tokens_at) * rps)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return False
        self._faults["rate_limit"] += 1
        return True

    def _refuse(self, status: int, fault: str | None = None) -> web.Response:
        """An error answer; counted as an injected fault when ``fault`` names it."""
        if fault:
            self._faults[fault] += 1
        if status != 429:
            return contract.error(status)
        headers = {"Retry-After": self.config.retry_after} if self.config.retry_after else None
        seconds = self.config.retry_after_body
        extra = {"retry_after": seconds} if seconds is not None else None
        return contract.error(429, headers=headers, extra=extra)

    def _drop(self, request: web.Request, fault: str) -> web.Response:
        """Close the connection without (the rest of) an answer; the client sees a disconnect."""
        self._faults[fault] += 1
        if request.transport is not None:
            request.transport.close()
        # Never sent: aiohttp finds the transport closing and gives up quietly.
        return web.Response(status=204)

    def _gate(self, request: web.Request, route: Route) -> tuple[str, str] | web.Response:
        """Auth, rate limit, then the next action: (key, action), or the answer to send now.

        A scripted or drawn status is answered here, before any work, unless it is one that
        comes after the task or upload exists.
        """
        key = self._key(request)
        if key is None:
            return contract.error(401)
        if self._rate_limited(route):
            return self._refuse(429)
        action = self._next_action(route)
        if action.isdigit() and (route == "poll" or action not in _AFTER_CREATE):
            return self._refuse(int(action), _fault(route, action))
        return key, action

    # -- POST /v1/videos/generations -------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        gate = self._gate(request, "submit")
        if isinstance(gate, web.Response):
            return gate
        key, action = gate
        try:
            body = await request.json()
        except ValueError:
            return contract.error(400, "Invalid request parameters: the body is not valid JSON")
        problem = contract.routing_problem(body)
        if problem is not None:
            return contract.error(400, problem)
        model: str = body["model"]
        spec = self._catalog.get(model)
        if spec is None or model in self.config.retired_models:
            self._unavailable[model] += 1
            return contract.model_unavailable(model, self.config.unavailable_status, self._rid())
        legacy = self.config.legacy_values
        validator = self._validators[model]
        problem = contract.problem(body, spec, validator, legacy, self._image_size)
        if problem is None:
            problem = contract.idempotency_key_problem(request.headers.get("Idempotency-Key"))
        if problem is not None:
            return contract.error(400, problem)
        idem = request.headers.get("Idempotency-Key") if self.config.idempotency else None
        digest = contract.digest(body)
        prior = self._by_idempotency_key.get(idem) if idem is not None else None
        replayed = prior is not None
        if prior is not None:
            original_digest, task_id = prior
            if original_digest != digest:
                self._conflicts += 1
                text = "Idempotency-Key was already used with a different request body"
                return contract.error(422, text)
            self._replays += 1
            task = self._tasks[task_id]
        elif self.config.quota is not None and len(self._tasks) >= self.config.quota:
            return contract.quota_error(self.config.quota_status)
        else:
            task = self._create(body, spec, key, idem, digest, action == "fail_task")
            self._idempotency_key_by_task[task.id] = request.headers.get("Idempotency-Key")
        if action in _AFTER_CREATE:
            return self._refuse(int(action), _fault("submit", action))
        if action == "reset_after_create":
            return self._drop(request, action)
        if action == "html_200":
            self._faults[action] += 1
            return web.Response(text=contract.HTML_PAGE, content_type="text/html")
        if action == "slow_after_create":
            self._faults[action] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.slow_seconds)
        headers = {"Idempotency-Replayed": "true"} if replayed else {}
        if "X-APIMart-Response-Version" in request.headers:
            headers["X-APIMart-Response-Version"] = contract.RESPONSE_VERSION
            status = self._status(task)[0] if replayed else "pending"
            data = {"id": task.id, "status": status, "object": "generation.task"}
            doc: dict[str, Any] = {"data": data, "request_id": "req_" + self._ulid()}
        elif spec.response == "object":
            # Grok's page: data is one object keyed "id", not a list keyed "task_id".
            created = int(task.created)
            item = {"id": task.id, "status": "submitted", "progress": 0, "created": created}
            doc = {"code": 200, "data": {**item, "type": "video"}}
        else:
            doc = {"code": 200, "data": [{"status": "submitted", "task_id": task.id}]}
        return web.json_response(doc, headers=headers)

    def _create(
        self,
        body: dict[str, Any],
        spec: ModelSpec,
        key: str,
        idem: str | None,
        digest: str,
        fail: bool,
    ) -> _Task:
        rate = self.config.fail_rate
        failure = None
        if fail or (rate and self._rng.random() < rate):
            failure = self._rng.choice(contract.TASK_FAILURES)
        # What the API renders (and bills): the body's value, else the model's default.
        field = spec.fields.get("resolution", "resolution")
        task = _Task(
            id="task_" + self._ulid(),
            created=self._clock(),
            model=spec.id,
            seconds=body.get("duration") or spec.defaults.get("duration") or 0,
            resolution=str(body.get(field) or spec.defaults.get(field) or ""),
            thumbnail=body.get("thumbnail") is True,
            failure=failure,
        )
        self._tasks[task.id] = task
        self._per_key[contract.mask_key(key)] += 1
        self._per_body[digest] += 1
        if idem is not None:
            self._by_idempotency_key[idem] = (digest, task.id)
            self._per_idempotency_key[idem] += 1
        return task

    def _ulid(self) -> str:
        return contract.ulid(int(self._clock() * 1000), self._rng.getrandbits(80))

    def _rid(self) -> str:
        """A new-api style request id: UTC time to the second, then 8 random digits."""
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self._clock()))
        return f"{stamp}{self._rng.randrange(10**8):08d}"

    def _image_size(self, url: str) -> int | None:
        """Bytes of an image this emulator serves at ``url``, else None (unknown to us)."""
        _, ours, name = url.rpartition("/f/image/")
        upload = self._uploads.get(name) if ours else None
        return upload.size if upload is not None else None

    # -- GET /v1/tasks/{task_id} -----------------------------------------------------------

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        gate = self._gate(request, "poll")
        if isinstance(gate, web.Response):
            return gate
        _, action = gate
        if action == "reset":
            return self._drop(request, _fault("poll", action))
        task = self._task(request.match_info["task_id"])
        if task is None:
            return contract.error(400, "Invalid task ID")
        return web.json_response({"code": 200, "data": self._view(task, str(request.url.origin()))})

    def _task(self, task_id: str) -> _Task | None:
        """The task behind an id; with ``adopt_tasks``, also one an earlier process created."""
        task = self._tasks.get(task_id)
        if task is None and self.config.adopt_tasks:
            created = contract.ulid_seconds(task_id)
            if created is not None and created <= self._clock():
                task = _Task(task_id, created, "sora-2", 4, "720p", False, None)
                self._tasks[task_id] = task
        return task

    def _status(self, task: _Task) -> tuple[str, int]:
        """(status, progress) now: pending for the first 10%, then rising, then the outcome."""
        total = self.config.task_seconds
        elapsed = self._clock() - task.created
        if elapsed >= total:
            return ("failed", 99) if task.failure else ("completed", 100)
        if elapsed < 0.1 * total:
            return "pending", 0
        return "processing", min(99, 1 + int(99 * (elapsed - 0.1 * total) / (0.9 * total)))

    def _view(self, task: _Task, origin: str) -> dict[str, Any]:
        status, progress = self._status(task)
        created = int(task.created)
        data: dict[str, Any] = {
            "id": task.id,
            "status": status,
            "progress": progress,
            "created": created,
            "estimated_time": max(1, math.ceil(self.config.task_seconds)),
        }
        if status in ("pending", "processing"):
            return data
        completed = self._completed_at(task)
        data["completed"] = completed
        data["actual_time"] = completed - created
        if task.failure is not None:
            if self.config.fail_reason_field:
                data["fail_reason"] = task.failure["message"]
            else:
                data["error"] = dict(task.failure)
            return data
        url = f"{origin}/f/video/{created}-video_{task.id}.mp4"
        video: dict[str, Any] = {"url": url if self.config.url_as_string else [url]}
        video["expires_at"] = completed + self.config.link_ttl
        result: dict[str, Any] = {}
        if task.thumbnail:
            result["thumbnail_url"] = f"{origin}/f/image/{created}-thumbnail_{task.id}.jpg"
        result["videos"] = [video]
        data["result"] = result
        cost = contract.cost(task.model, task.resolution, task.seconds)
        if cost is not None:
            data["cost"] = cost
            data["credits_cost"] = round(cost * contract.CREDITS_PER_USD)
        return data

    def _completed_at(self, task: _Task) -> int:
        return int(task.created + self.config.task_seconds)

    def _finished(self, task_id: str) -> _Task | None:
        """The completed task behind a file name, while its links are valid."""
        task = self._task(task_id)
        if task is None or self._status(task)[0] != "completed":
            return None
        return task

    # -- files -----------------------------------------------------------------------------

    async def _video(self, request: web.Request) -> web.StreamResponse:
        action = self._next_action("download")
        if action.isdigit():
            return self._refuse_file(int(action), _fault("download", action))
        name = request.match_info["name"]
        task = self._finished(name.rpartition("video_")[2].removesuffix(".mp4"))
        if task is None:
            return self._refuse_file(404)
        if self._clock() >= self._completed_at(task) + self.config.link_ttl:
            return self._refuse_file(403)
        body = contract.video_bytes(task.id)
        if action == "reset":
            response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            self._drop(request, _fault("download", action))
            return response
        self._downloads += 1
        return web.Response(body=body, content_type="video/mp4")

    async def _image(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if "-thumbnail_" in name:
            task = self._finished(name.rpartition("thumbnail_")[2].removesuffix(".jpg"))
            if task is None or not task.thumbnail:
                return self._refuse_file(404)
            return web.Response(body=contract.thumbnail_bytes(task.id), content_type="image/jpeg")
        upload = self._uploads.get(name)
        blob = self._blobs.get(upload.sha256) if upload else None
        if upload is None or blob is None:
            return self._refuse_file(404)
        if self._clock() >= upload.created + contract.UPLOAD_TTL:
            return self._refuse_file(403)
        return web.Response(body=blob, content_type=upload.content_type)

    def _refuse_file(self, status: int, fault: str | None = None) -> web.Response:
        """A CDN-style error: plain XML, not the API envelope."""
        if fault:
            self._faults[fault] += 1
        code = {403: "AccessDenied", 404: "NoSuchKey"}.get(status, "InternalError")
        text = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>"
        return web.Response(status=status, text=text, content_type="application/xml")

    # -- POST /v1/uploads/images -----------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        gate = self._gate(request, "upload")
        if isinstance(gate, web.Response):
            return gate
        _, action = gate
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):
            return contract.upload_error(400, "expected multipart/form-data with a 'file' field")
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name != "file":
                continue
            content, size = await _read_capped(part, contract.UPLOAD_MAX_BYTES)
            if content is None:
                limit = contract.UPLOAD_MAX_BYTES
                return contract.upload_error(413, f"file size {size} exceeds maximum {limit} bytes")
            content_type = contract.sniff_image(content)
            if content_type is None:
                return contract.upload_error(
                    400, "unsupported file type (allowed: JPEG, PNG, WebP, GIF)"
                )
            # Clients such as aiohttp percent-quote the multipart filename.
            filename = unquote(part.filename or "image")
            answer = self._store(content, content_type, filename, str(request.url.origin()))
            if action in _AFTER_CREATE:
                return self._refuse(int(action), _fault("upload", action))
            if action == "reset_after_create":
                return self._drop(request, _fault("upload", action))
            return web.json_response(answer)
        return contract.upload_error(400, "missing multipart field 'file'")

    def _store(
        self, content: bytes, content_type: str, filename: str, origin: str
    ) -> dict[str, Any]:
        sha = hashlib.sha256(content).hexdigest()
        self._per_sha256[sha] += 1
        if sha not in self._blobs:
            self._blobs[sha] = content
            self._blob_bytes += len(content)
            # Bounded memory: the oldest images go first and then answer 404, like expired links.
            while self._blob_bytes > _BLOB_STORE_BYTES and len(self._blobs) > 1:
                self._blob_bytes -= len(self._blobs.popitem(last=False)[1])
        now = self._clock()
        safe = contract.safe_filename(filename, content_type)
        name = f"{int(now)}-{uuid.UUID(int=self._rng.getrandbits(128), version=4)}-{safe}"
        self._uploads[name] = _Upload(sha, content_type, len(content), now)
        return {
            "url": f"{origin}/f/image/{name}",
            "filename": safe,
            "content_type": content_type,
            "bytes": len(content),
            "created_at": int(now),
        }

    # -- GET /v1/balance -------------------------------------------------------------------

    async def _balance(self, request: web.Request) -> web.Response:
        if self._key(request) is None:
            failure = {"success": False, "message": "token not found: record not found"}
            return web.json_response(failure)
        used = len(self._tasks)
        quota = self.config.quota
        return web.json_response(
            {
                "success": True,
                "remain_balance": -1 if quota is None else float(max(0, quota - used)),
                "used_balance": float(used),
                "unlimited_quota": quota is None,
            }
        )


def _fault(route: Route, action: str) -> str:
    """The stats name of an injected fault: submit faults bare, others prefixed by route."""
    return action if route == "submit" else f"{route}_{action}"


async def _read_capped(part: BodyPartReader, limit: int) -> tuple[bytes | None, int]:
    """The part's bytes, or (None, total size) when it is larger than ``limit``."""
    chunks: list[bytes] | None = []
    size = 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if chunks is not None and size > limit:
            chunks = None  # keep counting for the message, stop keeping
        elif chunks is not None:
            chunks.append(chunk)
    return (None if chunks is None else b"".join(chunks)), size


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
