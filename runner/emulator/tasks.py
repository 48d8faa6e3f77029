"""The emulator's task store: tasks, their Idempotency-Key records, ids and how they look.

A task's status is computed from the injected clock on every read (pending for the first
10% of ``task_seconds``, then processing, then its outcome), so nothing here runs by itself.
The one change a read makes: with ``fresh_links``, a task query after the video link expired
issues the task a new link (:meth:`TaskStore.current_link`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from runner.emulator import contract
from runner.emulator.config import EmulatorConfig
from runner.manifest import ModelSpec

__all__ = ["Task", "TaskStore"]


@dataclass(slots=True)
class Task:
    """One generation task as the emulator keeps it."""

    id: str
    created: float
    model: str
    seconds: int
    resolution: str
    thumbnail: bool
    failure: dict[str, Any] | None
    #: Video links issued after the first expired (``fresh_links``): (file name, expires_at).
    reissued: list[tuple[str, int]] = field(default_factory=list)


class TaskStore:
    """Every task created since start, who asked for it, and the replays of its key.

    Args:
        config: the task knobs (``task_seconds``, ``fail_rate``, ``adopt_tasks``, ...).
        clock: unix seconds; stamps tasks and drives their status.
        rng: the emulator's seeded generator (ids, drawn failures).
    """

    def __init__(
        self, config: EmulatorConfig, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        self.tasks: dict[str, Task] = {}
        self._by_idempotency_key: dict[str, tuple[str, str]] = {}
        self.per_key: Counter[str] = Counter()
        self.per_idempotency_key: Counter[str] = Counter()
        self.per_body: Counter[str] = Counter()
        #: As sent, even when --no-idempotency ignores it: which job each task belongs to.
        self.idempotency_key_by_task: dict[str, str | None] = {}
        self.replays = self.conflicts = 0

    def ulid(self) -> str:
        """A new ULID stamped with the clock's time."""
        return contract.ulid(int(self._clock() * 1000), self._rng.getrandbits(80))

    def prior(self, idem: str | None, digest: str) -> Task | Literal["conflict"] | None:
        """The task an earlier submit with key ``idem`` created; "conflict" if its body differed."""
        prior = self._by_idempotency_key.get(idem) if idem is not None else None
        if prior is None:
            return None
        original_digest, task_id = prior
        if original_digest != digest:
            self.conflicts += 1
            return "conflict"
        self.replays += 1
        return self.tasks[task_id]

    def create(
        self,
        body: dict[str, Any],
        spec: ModelSpec,
        key: str,
        idem: str | None,
        digest: str,
        fail: bool,
        sent_key: str | None,
    ) -> Task:
        """A new task for ``body``; it fails when ``fail`` or when ``fail_rate``'s dice say so.

        ``idem`` is the Idempotency-Key the store honours (None with ``--no-idempotency``),
        ``sent_key`` the one the request carried.
        """
        rate = self.config.fail_rate
        failure = None
        if fail or (rate and self._rng.random() < rate):
            failure = self._rng.choice(contract.TASK_FAILURES)
        # What the API renders (and bills): the body's value, else the model's default.
        field = spec.fields.get("resolution", "resolution")
        task = Task(
            id="task_" + self.ulid(),
            created=self._clock(),
            model=spec.id,
            seconds=body.get("duration") or spec.defaults.get("duration") or 0,
            resolution=str(body.get(field) or spec.defaults.get(field) or ""),
            thumbnail=body.get("thumbnail") is True,
            failure=failure,
        )
        self.tasks[task.id] = task
        self.per_key[contract.mask_key(key)] += 1
        self.per_body[digest] += 1
        if idem is not None:
            self._by_idempotency_key[idem] = (digest, task.id)
            self.per_idempotency_key[idem] += 1
        self.idempotency_key_by_task[task.id] = sent_key
        return task

    def billed(self, task: Task) -> float:
        """USD the task costs (``cost`` of its completed query); 0 for an unpriced model."""
        return contract.cost(task.model, task.resolution, task.seconds) or 0.0

    def get(self, task_id: str) -> Task | None:
        """The task behind an id; with ``adopt_tasks``, also one an earlier process created."""
        task = self.tasks.get(task_id)
        if task is None and self.config.adopt_tasks:
            created = contract.ulid_seconds(task_id)
            if created is not None and created <= self._clock():
                task = Task(task_id, created, "sora-2", 4, "720p", False, None)
                self.tasks[task_id] = task
        return task

    def status(self, task: Task) -> tuple[str, int]:
        """(status, progress) now: pending for the first 10%, then rising, then the outcome."""
        total = self.config.task_seconds
        elapsed = self._clock() - task.created
        if elapsed >= total:
            return ("failed", 99) if task.failure else ("completed", 100)
        if elapsed < 0.1 * total:
            return "pending", 0
        return "processing", min(99, 1 + int(99 * (elapsed - 0.1 * total) / (0.9 * total)))

    def completed_at(self, task: Task) -> int:
        """The unix second the task finishes (or finished)."""
        return int(task.created + self.config.task_seconds)

    def current_link(self, task: Task) -> tuple[str, int]:
        """The file name and ``expires_at`` a task query hands out for a completed task's video.

        The first link lasts ``link_ttl`` from completion. With ``fresh_links``, a query at or
        after the current link's expiry issues a new name, valid ``link_ttl`` from now; the
        names issued before keep their own expiry. ASSUMPTION: the docs (apimart-api.md §1.3,
        §3) are silent on whether APIMart re-issues links on a later query; off by default.
        """
        name, expires = task.reissued[-1] if task.reissued else self._first_link(task)
        now = self._clock()
        if self.config.fresh_links and now >= expires:
            # The generation number keeps two links issued in one second apart.
            name = f"{int(now)}-{len(task.reissued) + 1}-video_{task.id}.mp4"
            expires = int(now) + self.config.link_ttl
            task.reissued.append((name, expires))
        return name, expires

    def link_expiry(self, task: Task, name: str) -> int:
        """When the video file ``name`` of ``task`` stops being served.

        A re-issued name has its own expiry; any other name (the first link) expires
        ``link_ttl`` after completion.
        """
        for issued, expires in task.reissued:
            if issued == name:
                return expires
        return self._first_link(task)[1]

    def _first_link(self, task: Task) -> tuple[str, int]:
        name = f"{int(task.created)}-video_{task.id}.mp4"
        return name, self.completed_at(task) + self.config.link_ttl

    def finished(self, task_id: str) -> Task | None:
        """The completed task behind a file name, while its links are valid."""
        task = self.get(task_id)
        if task is None or self.status(task)[0] != "completed":
            return None
        return task

    def view(self, task: Task, origin: str) -> dict[str, Any]:
        """The ``data`` of a task query, with links under ``origin``."""
        status, progress = self.status(task)
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
        completed = self.completed_at(task)
        data["completed"] = completed
        data["actual_time"] = completed - created
        if task.failure is not None:
            if self.config.fail_reason_field:
                data["fail_reason"] = task.failure["message"]
            else:
                data["error"] = dict(task.failure)
            return data
        name, expires = self.current_link(task)
        url = f"{origin}/f/video/{name}"
        video: dict[str, Any] = {"url": url if self.config.url_as_string else [url]}
        video["expires_at"] = expires
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
