"""The emulator's image store: uploaded images by name, their bytes by sha256, bounded."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.emulator import contract

__all__ = ["BLOB_STORE_BYTES", "ImageStore", "Upload"]

BLOB_STORE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded image's record; its bytes are kept once per sha256."""

    sha256: str
    content_type: str
    size: int
    created: float


class ImageStore:
    """Images uploaded since start, served back under ``/f/image/{name}``.

    Args:
        clock: unix seconds; stamps uploads (their links expire after ``UPLOAD_TTL``).
        rng: the emulator's seeded generator (the uuid in each name).
    """

    def __init__(self, clock: Callable[[], float], rng: random.Random) -> None:
        self._clock = clock
        self._rng = rng
        self._uploads: dict[str, Upload] = {}
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._blob_bytes = 0
        self.per_sha256: Counter[str] = Counter()

    def store(
        self, content: bytes, content_type: str, filename: str, origin: str
    ) -> dict[str, Any]:
        """Keep an image and return the upload answer, its link under ``origin``."""
        sha = hashlib.sha256(content).hexdigest()
        self.per_sha256[sha] += 1
        if sha not in self._blobs:
            self._blobs[sha] = content
            self._blob_bytes += len(content)
            # Bounded memory: the oldest images go first and then answer 404, like expired links.
            while self._blob_bytes > BLOB_STORE_BYTES and len(self._blobs) > 1:
                self._blob_bytes -= len(self._blobs.popitem(last=False)[1])
        now = self._clock()
        safe = contract.safe_filename(filename, content_type)
        name = f"{int(now)}-{uuid.UUID(int=self._rng.getrandbits(128), version=4)}-{safe}"
        self._uploads[name] = Upload(sha, content_type, len(content), now)
        return {
            "url": f"{origin}/f/image/{name}",
            "filename": safe,
            "content_type": content_type,
            "bytes": len(content),
            "created_at": int(now),
        }

    def get(self, name: str) -> tuple[Upload, bytes] | None:
        """The upload behind a file name and its bytes, unless unknown or evicted."""
        upload = self._uploads.get(name)
        blob = self._blobs.get(upload.sha256) if upload else None
        if upload is None or blob is None:
            return None
        return upload, blob

    def image_size(self, url: str) -> int | None:
        """Bytes of an image this emulator serves at ``url``, else None (unknown to us)."""
        _, ours, name = url.rpartition("/f/image/")
        upload = self._uploads.get(name) if ours else None
        return upload.size if upload is not None else None
