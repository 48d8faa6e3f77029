"""Local images -> URLs the API can fetch: each content uploaded once, reused while it lives.

A job's local images (any field its model marks for upload) are uploaded with
``POST /v1/uploads/images`` before the job is sent; concurrent jobs of one content share
one upload, and later runs reuse a recorded URL while enough of its 72 h is left. Uploads
carry no idempotency key, so only "not sent" failures are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from runner.api import Client, RetryPolicy, Uploaded
from runner.engine.resume import AMBIGUOUS
from runner.engine.schedule import Clock, Limiter, Sleep, Stopped, retrying
from runner.errors import ApiError, RejectedError
from runner.models import Job, Pointer, canonical_json, iso_utc, parse_iso

#: Uploaded image URLs live 72 h (apimart-api.md §5); reuse one only while it has
#: this much life left, so the API can still fetch it while the task runs.
UPLOAD_LIFETIME = 72 * 3600.0
UPLOAD_REUSE_MARGIN = 12 * 3600.0


class Uploads:
    """The run's uploads by content hash; shared by every submission worker."""

    def __init__(
        self,
        client: Client,
        limiter: Limiter,
        policy: RetryPolicy,
        stop: asyncio.Event,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.client, self.limiter, self.policy, self.stop = client, limiter, policy, stop
        self.clock, self.sleep = clock, sleep
        self._by_sha: dict[str, asyncio.Future[Uploaded]] = {}

    def reuse(self, rows: Iterable[Mapping[str, str]], *, now: float) -> None:
        """Seed the cache with earlier runs' uploads (ledger rows) that still have life left."""
        for row in rows:
            shas, urls = row.get("image_sha256", ""), row.get("image_url", "")
            created = parse_iso(row.get("uploaded_at", ""))
            if not (shas and urls) or created is None:
                continue
            if not now < created + UPLOAD_LIFETIME - UPLOAD_REUSE_MARGIN:
                continue
            for sha, url in zip(shas.split("\n"), urls.split("\n"), strict=False):
                if sha and url and sha not in self._by_sha:
                    future: asyncio.Future[Uploaded] = asyncio.get_running_loop().create_future()
                    future.set_result(Uploaded(url=url, created_at=created))
                    self._by_sha[sha] = future

    async def prepare(
        self, job: Job, row: Mapping[str, str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body to send (local images uploaded) and the ledger cells it adds.

        ``row`` is the job's latest ledger row: a job resent after an ambiguous try sends
        its recorded body again, byte for byte, or a server that honours Idempotency-Key
        answers 422 instead of replaying.
        """
        ambiguous = row.get("status") in AMBIGUOUS
        recorded = row.get("request", "")
        if ambiguous and recorded and row.get("fingerprint") == job.fingerprint:
            with contextlib.suppress(ValueError):
                body = json.loads(recorded)
                if isinstance(body, dict):
                    return body, {"request": recorded}
        urls: dict[Pointer, str] = {}
        when: list[float] = []
        reused = _recorded_uploads(job, row) if ambiguous else {}
        for upload in job.uploads:
            if upload.pointer in reused:
                urls[upload.pointer] = reused[upload.pointer]
                continue
            done = await self.upload(upload.file, upload.sha256)
            urls[upload.pointer] = done.url
            when.append(done.created_at)
        body = job.body(urls)
        cells: dict[str, Any] = {"request": canonical_json(body)}
        if job.uploads:
            cells["image_url"] = "\n".join(urls[u.pointer] for u in job.uploads)
        if when:
            cells["uploaded_at"] = iso_utc(min(when))
        return body, cells

    async def upload(self, path: str, sha: str) -> Uploaded:
        """Upload one image once per content per run; concurrent jobs share one upload."""
        pending = self._by_sha.get(sha)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._by_sha[sha] = pending
            try:
                pending.set_result(await self._upload_now(path, sha))
            except (ApiError, Stopped) as exc:
                pending.set_exception(exc)
                # The waiting jobs see it through the future; mark it retrieved for asyncio.
                pending.exception()
        return await pending

    async def _upload_now(self, path: str, sha: str) -> Uploaded:
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as exc:
            msg = f"{path}: cannot read the image: {exc.strerror}"
            raise RejectedError(msg) from exc
        if hashlib.sha256(data).hexdigest() != sha:
            msg = f"{path}: the image changed since the manifest was validated; rerun"
            raise RejectedError(msg)
        return await retrying(
            partial(self.client.upload_image, data, Path(path).name), limiter=self.limiter,
            policy=self.policy, stop=self.stop, clock=self.clock, sleep=self.sleep,
        )


def _recorded_uploads(job: Job, row: Mapping[str, str]) -> dict[Pointer, str]:
    """The URLs an earlier try of this job sent its local images as (0.1 ledgers)."""
    shas = row.get("image_sha256", "").split("\n")
    urls = row.get("image_url", "").split("\n")
    if [u.sha256 for u in job.uploads] != shas or len(urls) != len(shas) or not all(urls):
        return {}
    return {u.pointer: url for u, url in zip(job.uploads, urls, strict=True)}
