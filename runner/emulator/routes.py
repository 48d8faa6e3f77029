"""The emulator's routes: tasks (submit, poll, balance), and media (uploads in, files out).

Each handler reads the request, asks :class:`~runner.emulator.faults.Faults` what goes wrong,
keeps what it creates in the task or image store, and answers as apimart-api.md shows.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import BodyPartReader, web

from runner.emulator import contract
from runner.emulator.config import EmulatorConfig
from runner.emulator.faults import Faults, Route, fault_name
from runner.emulator.tasks import Task, TaskStore
from runner.emulator.uploads import ImageStore
from runner.manifest import Catalog, ModelSpec

__all__ = ["MediaRoutes", "TaskRoutes"]


class TaskRoutes:
    """The task side of the API: ``POST /v1/videos/generations``, ``GET /v1/tasks/{id}``, balance.

    Args:
        config: the behaviour knobs (key, quota, idempotency, retired models, ...).
        catalog: the models the gateway serves, by id.
        faults: decides and counts what goes wrong.
        tasks: the task store.
        images: the image store (sizes of the images a body names).
        clock: unix seconds (request ids).
        rng: the emulator's seeded generator (request ids).
    """

    def __init__(
        self,
        config: EmulatorConfig,
        catalog: Catalog,
        *,
        faults: Faults,
        tasks: TaskStore,
        images: ImageStore,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.config = config
        self._catalog = catalog
        self._validators = contract.gateway_validators(catalog)
        self._faults = faults
        self._tasks = tasks
        self._images = images
        self._clock = clock
        self._rng = rng
        #: Submits answered model-unavailable (retired or not in the catalog), by model.
        self.unavailable: Counter[str] = Counter()

    def _rid(self) -> str:
        """A new-api style request id: UTC time to the second, then 8 random digits."""
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self._clock()))
        return f"{stamp}{self._rng.randrange(10**8):08d}"

    async def submit(self, request: web.Request) -> web.StreamResponse:
        """Validate a generation request, create (or replay) its task, answer the task id."""
        gate = _gate(request, "submit", self.config, self._faults)
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
            self.unavailable[model] += 1
            return contract.model_unavailable(model, self.config.unavailable_status, self._rid())
        legacy, image_size = self.config.legacy_values, self._images.image_size
        problem = contract.problem(body, spec, self._validators[model], legacy, image_size)
        sent = request.headers.get("Idempotency-Key")
        if problem is None:
            problem = contract.idempotency_key_problem(sent)
        if problem is not None:
            return contract.error(400, problem)
        idem = sent if self.config.idempotency else None
        digest = contract.digest(body)
        prior = self._tasks.prior(idem, digest)
        if prior == "conflict":
            text = "Idempotency-Key was already used with a different request body"
            return contract.error(422, text)
        quota = self.config.quota
        if prior is None and quota is not None and len(self._tasks.tasks) >= quota:
            return contract.quota_error(self.config.quota_status)
        fail = action == "fail_task"
        task = prior or self._tasks.create(body, spec, key, idem, digest, fail, sent)
        fault = await self._faults.after_create(request, "submit", action)
        if fault is not None:
            return fault
        return self._submitted(request, task, spec, replayed=prior is not None)

    def _submitted(
        self, request: web.Request, task: Task, spec: ModelSpec, *, replayed: bool
    ) -> web.Response:
        """The submit answer in the shape the request (and the model's page) asks for."""
        headers = {"Idempotency-Replayed": "true"} if replayed else {}
        if "X-APIMart-Response-Version" in request.headers:
            headers["X-APIMart-Response-Version"] = contract.RESPONSE_VERSION
            status = self._tasks.status(task)[0] if replayed else "pending"
            data = {"id": task.id, "status": status, "object": "generation.task"}
            doc: dict[str, Any] = {"data": data, "request_id": "req_" + self._tasks.ulid()}
        elif spec.response == "object":
            # Grok's page: data is one object keyed "id", not a list keyed "task_id".
            created = int(task.created)
            item = {"id": task.id, "status": "submitted", "progress": 0, "created": created}
            doc = {"code": 200, "data": {**item, "type": "video"}}
        else:
            doc = {"code": 200, "data": [{"status": "submitted", "task_id": task.id}]}
        return web.json_response(doc, headers=headers)

    async def poll(self, request: web.Request) -> web.StreamResponse:
        """A task's status, progress and, once completed, its links."""
        gate = _gate(request, "poll", self.config, self._faults)
        if isinstance(gate, web.Response):
            return gate
        _, action = gate
        if action == "reset":
            return self._faults.drop(request, fault_name("poll", action))
        task = self._tasks.get(request.match_info["task_id"])
        if task is None:
            return contract.error(400, "Invalid task ID")
        view = self._tasks.view(task, str(request.url.origin()))
        return web.json_response({"code": 200, "data": view})

    async def balance(self, request: web.Request) -> web.Response:
        """The key's balance: USD with ``balance_usd``, else tasks left in the quota.

        A bad key, or ``balance_fails``, is the documented HTTP 200 ``success: false``.
        """
        if _bearer_key(request, self.config) is None:
            failure = {"success": False, "message": "token not found: record not found"}
            return web.json_response(failure)
        if self.config.balance_fails:
            failure = {"success": False, "message": "failed to get the balance: record not found"}
            return web.json_response(failure)
        if self.config.balance_usd is not None:
            spent = round(sum(self._tasks.billed(task) for task in self._tasks.tasks.values()), 4)
            return web.json_response(
                {
                    "success": True,
                    "remain_balance": round(max(0.0, self.config.balance_usd - spent), 4),
                    "used_balance": spent,
                    "unlimited_quota": False,
                }
            )
        used = len(self._tasks.tasks)
        quota = self.config.quota
        return web.json_response(
            {
                "success": True,
                "remain_balance": -1 if quota is None else float(max(0, quota - used)),
                "used_balance": float(used),
                "unlimited_quota": quota is None,
            }
        )


class MediaRoutes:
    """The images and videos: ``POST /v1/uploads/images`` in, ``/f/video`` and ``/f/image`` out.

    The files under ``/f/`` answer like a CDN (plain XML errors, no key, no rate limit).
    """

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        faults: Faults,
        tasks: TaskStore,
        images: ImageStore,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._faults = faults
        self._tasks = tasks
        self._images = images
        self._clock = clock
        self.downloads = 0

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """Keep the multipart ``file`` image and answer its link."""
        gate = _gate(request, "upload", self.config, self._faults)
        if isinstance(gate, web.Response):
            return gate
        image = await _image_part(request)
        if isinstance(image, web.Response):
            return image
        content, content_type, filename = image
        answer = self._images.store(content, content_type, filename, str(request.url.origin()))
        fault = await self._faults.after_create(request, "upload", gate[1])
        return fault if fault is not None else web.json_response(answer)

    async def video(self, request: web.Request) -> web.StreamResponse:
        """A completed task's video while its link is valid; ``reset`` stops half way."""
        action = self._faults.next_action("download")
        if action.isdigit():
            return self._faults.refuse_file(int(action), fault_name("download", action))
        name = request.match_info["name"]
        task = self._tasks.finished(name.rpartition("video_")[2].removesuffix(".mp4"))
        if task is None:
            return self._faults.refuse_file(404)
        if self._clock() >= self._tasks.link_expiry(task, name):
            return self._faults.refuse_file(403)
        body = contract.video_bytes(task.id)
        if action == "reset":
            response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            self._faults.drop(request, fault_name("download", action))
            return response
        self.downloads += 1
        return web.Response(body=body, content_type="video/mp4")

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A completed task's thumbnail, or an uploaded image until it expires."""
        name = request.match_info["name"]
        if "-thumbnail_" in name:
            task = self._tasks.finished(name.rpartition("thumbnail_")[2].removesuffix(".jpg"))
            if task is None or not task.thumbnail:
                return self._faults.refuse_file(404)
            return web.Response(body=contract.thumbnail_bytes(task.id), content_type="image/jpeg")
        found = self._images.get(name)
        if found is None:
            return self._faults.refuse_file(404)
        upload, blob = found
        if self._clock() >= upload.created + contract.UPLOAD_TTL:
            return self._faults.refuse_file(403)
        return web.Response(body=blob, content_type=upload.content_type)


def _bearer_key(request: web.Request, config: EmulatorConfig) -> str | None:
    """The request's API key, or None when it is missing or not the one ``config`` wants."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    if config.key is not None and key != config.key:
        return None
    return key


def _gate(
    request: web.Request, route: Route, config: EmulatorConfig, faults: Faults
) -> tuple[str, str] | web.Response:
    """Auth, then the fault engine's word: (key, action), or the answer to send now."""
    key = _bearer_key(request, config)
    if key is None:
        return contract.error(401)
    action = faults.admit(route)
    return action if isinstance(action, web.Response) else (key, action)


async def _image_part(request: web.Request) -> tuple[bytes, str, str] | web.Response:
    """(bytes, content type, file name) of the multipart ``file`` image, or the 4xx answer."""
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
            text = "unsupported file type (allowed: JPEG, PNG, WebP, GIF)"
            return contract.upload_error(400, text)
        # Clients such as aiohttp percent-quote the multipart filename.
        return content, content_type, unquote(part.filename or "image")
    return contract.upload_error(400, "missing multipart field 'file'")


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
