"""Small frozen records shared by the pipeline stages."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: What the API assumes when a field is omitted (apimart-api.md §1.1).
API_DEFAULT_DURATION = 4
API_DEFAULT_RESOLUTION = "720p"


@dataclass(frozen=True, slots=True)
class Job:
    """One video to generate: an expanded, validated manifest entry (one take).

    Attributes:
        job_id: the identity that resume and de-duplication key on.
        model, prompt, duration, resolution, aspect_ratio: request fields; None = omitted.
        image_url: a public http(s) URL sent as ``image_urls[0]``.
        image_file: a local image (absolute path) uploaded before submission.
        image_sha256: hex digest of ``image_file``'s content (identity of the upload).
        manifest: the manifest path as given on the command line.
        manifest_name: the manifest's ``name``, else its file stem (namespaces the
            Idempotency-Key, so two manifests never share keys).
        line: the manifest line the job came from (1-based), for messages.
    """

    job_id: str
    model: str
    prompt: str
    duration: int | None = None
    resolution: str | None = None
    aspect_ratio: str | None = None
    image_url: str | None = None
    image_file: str | None = None
    image_sha256: str | None = None
    manifest: str = ""
    manifest_name: str = ""
    line: int = 0

    def body(self, image_url: str | None = None) -> dict[str, Any]:
        """The JSON body of ``POST /v1/videos/generations``; omitted fields are absent.

        ``image_url`` replaces the job's own image (the URL a local file was uploaded to).
        """
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt}
        for key in ("duration", "resolution", "aspect_ratio"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        url = image_url or self.image_url
        if url:
            body["image_urls"] = [url]
        return body

    @property
    def fingerprint(self) -> str:
        """A stable hash of the effective request (a local image counts by content)."""
        request = self.body()
        if self.image_file:
            request["image_sha256"] = self.image_sha256
        canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def idempotency_key(self) -> str:
        """The Idempotency-Key: same manifest name + job id + request, same key, always."""
        seed = "\0".join((self.manifest_name, self.job_id, self.fingerprint))
        return "apimart-batch-" + hashlib.sha256(seed.encode()).hexdigest()[:40]

    @property
    def seconds(self) -> int:
        """Seconds of video the API will bill for."""
        return self.duration if self.duration is not None else API_DEFAULT_DURATION

    @property
    def effective_resolution(self) -> str:
        """The resolution the API will render at."""
        return self.resolution or API_DEFAULT_RESOLUTION


def iso_utc(ts: float) -> str:
    """A unix time as ``2026-11-25T07:30:00Z`` (how the ledger writes instants)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_iso(text: str) -> float | None:
    """An ISO-8601 instant as a unix time; None when empty or malformed."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None
    except ValueError:
        return None
