"""Small frozen records shared by the pipeline stages."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

#: A place in a request body: keys and list indexes, e.g. ``("image_urls", 0)``.
Pointer = tuple[str | int, ...]


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, UTF-8 text (what hashes cover)."""
    return _CANONICAL.encode(value)


# json.dumps builds a new encoder per call when given options: once per job, that showed.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


#: No ``metadata`` tags (shared, read-only: most jobs have none).
NO_TAGS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Upload:
    """A local image a job sends: where it goes in the body, the file, its content hash."""

    pointer: Pointer
    file: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Job:
    """One video to generate: an expanded, validated manifest entry.

    Attributes:
        job_id: the identity that resume and de-duplication key on.
        request: the body of ``POST /v1/videos/generations`` in the model's own field
            names, as the manifest wrote it (omitted fields are absent). At each
            :class:`Upload`'s pointer it holds the local file's path.
        uploads: the local images to upload before sending, in body order.
        defaults: what the API renders for omitted fields (the catalog's ``defaults``).
        fields: which field of this model holds ``duration``, ``resolution`` and
            ``aspect_ratio`` (e.g. ``{"resolution": "mode"}``); see ``runner.catalog``.
        manifest: the manifest path as given on the command line.
        manifest_name: the manifest's ``name``, else its file stem (namespaces the
            Idempotency-Key, so two manifests never share keys).
        line: the manifest line the job came from (1-based), for messages.
        catalogued: False for a model outside the catalog (``unknown_models: allow``):
            only its model and prompt were checked, and its price is unknown.
        take: which purchase of this job id this is: 1, then one more for each deliberate
            regeneration (``--retry-failed``, ``--resubmit-changed``); the ledger records it.
        metadata: the user's tags (``metadata:`` of defaults and entry, merged): kept in
            the ledger and reports, never sent, and not part of ``fingerprint`` or
            ``idempotency_key``, so changing them never makes the job a changed one.
    """

    job_id: str
    request: Mapping[str, Any]
    uploads: tuple[Upload, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=lambda: _SAME_NAMES)
    manifest: str = ""
    manifest_name: str = ""
    line: int = 0
    catalogued: bool = True
    take: int = 1
    metadata: Mapping[str, str] = field(default_factory=lambda: NO_TAGS)
    # The two hashes, computed on first use: a rerun asks each several times. Not init
    # fields, so dataclasses.replace starts afresh; not compared, hashed or shown.
    _fingerprint: str = field(default="", init=False, repr=False, compare=False)
    _idempotency_key: str = field(default="", init=False, repr=False, compare=False)

    @property
    def model(self) -> str:
        """The model id."""
        return str(self.request.get("model", ""))

    @property
    def prompt(self) -> str:
        """The prompt ('' for a model that takes none)."""
        prompt = self.request.get("prompt")
        return prompt if isinstance(prompt, str) else ""

    def written(self, common: str) -> Any:
        """The value the manifest gave for a common idea (``resolution``...), else None."""
        name = self.fields.get(common)
        return self.request.get(name) if name else None

    def resolved(self, common: str) -> Any:
        """The value the API renders for a common idea: written, else the API's default."""
        name = self.fields.get(common)
        if not name:
            return None
        return self.request.get(name, self.defaults.get(name))

    @property
    def duration(self) -> int | None:
        """The duration the manifest asked for (None: the API's default)."""
        value = self.written("duration")
        return value if isinstance(value, int) else None

    @property
    def resolution(self) -> str | None:
        """The resolution (or mode, or quality) the manifest asked for."""
        value = self.written("resolution")
        return value if isinstance(value, str) else None

    @property
    def aspect_ratio(self) -> str | None:
        """The aspect ratio (or size) the manifest asked for."""
        value = self.written("aspect_ratio")
        return value if isinstance(value, str) else None

    @property
    def seconds(self) -> int | None:
        """Seconds of video the API will render (None when neither asked nor known)."""
        value = self.resolved("duration")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def effective_resolution(self) -> str:
        """The resolution the API will render at ('' when unknown)."""
        value = self.resolved("resolution")
        return str(value) if value is not None else ""

    @property
    def image_url(self) -> str | None:
        """The first image given by URL (not a local file), for tables."""
        local = {u.pointer for u in self.uploads}
        for key in ("image_urls", "first_frame_image"):
            value = self.request.get(key)
            if isinstance(value, list) and value and (key, 0) not in local:
                return str(value[0])
            if isinstance(value, str) and (key,) not in local:
                return value
        return None

    @property
    def image_file(self) -> str | None:
        """The first local image, for tables and the ledger's ``image_file`` column."""
        return self.uploads[0].file if self.uploads else None

    @property
    def image_sha256(self) -> str | None:
        """The content hash of the first local image."""
        return self.uploads[0].sha256 if self.uploads else None

    def body(self, uploaded: Mapping[Pointer, str] | None = None) -> dict[str, Any]:
        """The JSON body to send: the request with each local image replaced by its URL.

        ``uploaded`` maps upload pointers to the URLs the files were uploaded to. A local
        image without a URL is left out of a list, or its key is dropped: the body then
        says what the fingerprint covers.
        """
        urls = uploaded or {}
        body: dict[str, Any] = copy.deepcopy(dict(self.request))
        for upload in sorted(self.uploads, key=lambda u: u.pointer, reverse=True):
            if upload.pointer in urls:
                _put(body, upload.pointer, urls[upload.pointer])
            else:
                _drop(body, upload.pointer)
        return body

    @property
    def fingerprint(self) -> str:
        """A stable hash of the effective request (a local image counts by its content).

        One form for every model: the body with each local image replaced by
        ``sha256:<hex>``. The one exception keeps 0.1's keys: a body whose only image is
        one local file in ``image_urls`` is hashed as 0.1 did (without ``image_urls``,
        plus ``image_sha256``), so ledgers written before the catalog keep their
        fingerprints and Idempotency-Keys.
        """
        if not self._fingerprint:
            object.__setattr__(self, "_fingerprint", self._computed_fingerprint())
        return self._fingerprint

    def _computed_fingerprint(self) -> str:
        if len(self.uploads) == 1 and self.uploads[0].pointer == ("image_urls", 0):
            images = self.request.get("image_urls")
            if isinstance(images, list) and len(images) == 1:
                request = self.body()
                request.pop("image_urls", None)
                request["image_sha256"] = self.uploads[0].sha256
                return _hash(request)[:16]
        if not self.uploads:  # the body is the request as it is: no copy to make
            return _hash(self.request)[:16]
        return _hash(self.body({u.pointer: f"sha256:{u.sha256}" for u in self.uploads}))[:16]

    @property
    def idempotency_key(self) -> str:
        """The Idempotency-Key: same manifest name + job id + request + take, same key, always.

        Take 1 keeps the key of versions before takes existed; a later take is a new
        purchase, so its key differs and an honouring server cannot replay the earlier task.
        """
        if not self._idempotency_key:
            object.__setattr__(self, "_idempotency_key", self._computed_key())
        return self._idempotency_key

    def _computed_key(self) -> str:
        parts = (self.manifest_name, self.job_id, self.fingerprint)
        seed = "\0".join(parts if self.take == 1 else (*parts, f"take {self.take}"))
        return "apimart-batch-" + hashlib.sha256(seed.encode()).hexdigest()[:40]


_SAME_NAMES: Mapping[str, str] = MappingProxyType(
    {"duration": "duration", "resolution": "resolution", "aspect_ratio": "aspect_ratio"}
)


def _hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _put(body: Any, pointer: Pointer, value: Any) -> None:
    for step in pointer[:-1]:
        body = body[step]
    body[pointer[-1]] = value


def _drop(body: Any, pointer: Pointer) -> None:
    parent = body
    for step in pointer[:-1]:
        parent = parent[step]
    del parent[pointer[-1]]
    if isinstance(parent, list) and not parent and len(pointer) == 2:
        del body[pointer[0]]


def iso_utc(ts: float) -> str:
    """A unix time as ``2026-11-25T07:30:00Z`` (how the ledger writes instants).

    A time that is not finite or not between 1970 and 9999 gives '' (no instant): a
    server's absurd timestamp must never crash a run.
    """
    if not isinstance(ts, int | float) or not 0 <= ts < _YEAR_10000:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


_YEAR_10000 = 253_402_300_800


def parse_iso(text: str) -> float | None:
    """An ISO-8601 instant as a unix time; None when empty or malformed."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None
    except ValueError:
        return None


#: Failed or rejected outcomes this run must see before a share can halt it.
HALT_SAMPLE = 10


@dataclass(frozen=True, slots=True)
class HaltAfter:
    """``--halt-after``: stop submitting after ``count`` failed or rejected jobs of this
    run, or once ``share`` of the jobs sent this run (at least ``HALT_SAMPLE``) did."""

    count: int | None = None
    share: float | None = None

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{(self.share or 0) * 100:g}%"
