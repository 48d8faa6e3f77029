"""The APIMart contract as data and pure functions: request rules, envelopes, ids and payloads.

Everything here follows apimart-api.md (§1.1 request schema, §1.2 ids, §3 tasks, §4.1 errors,
§5 uploads, §6 prices); :mod:`runner.emulator` serves it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from runner.models import API_DEFAULT_DURATION, API_DEFAULT_RESOLUTION

RESPONSE_VERSION = "2026-07-27"
DEFAULT_DURATION = API_DEFAULT_DURATION
DEFAULT_RESOLUTION = API_DEFAULT_RESOLUTION
UPLOAD_MAX_BYTES = 20 * 1024 * 1024
UPLOAD_TTL = 72 * 3600
#: Sora's own limit on a reference image (§1.1), stricter than the upload limit.
IMAGE_URL_MAX_BYTES = 10 * 1024 * 1024

RESOLUTIONS: dict[str, tuple[str, ...]] = {
    "sora-2": ("720p",),
    "sora-2-pro": ("720p", "1024p", "1080p"),
}
DURATIONS = (4, 8, 12, 16, 20)
LEGACY_DURATIONS: dict[str, tuple[int, ...]] = {"sora-2": (10, 15), "sora-2-pro": (10, 15, 25)}
ASPECT_RATIOS = ("16:9", "9:16", "landscape", "portrait")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")

#: USD per second of video: the §6 suggested table ($0.08 x 1/3/5/7).
RATES: dict[tuple[str, str], float] = {
    ("sora-2", "720p"): 0.08,
    ("sora-2-pro", "720p"): 0.24,
    ("sora-2-pro", "1024p"): 0.40,
    ("sora-2-pro", "1080p"): 0.56,
}
CREDITS_PER_USD = 100

#: HTTP status -> (error.type, error.message) of the documented envelope (§4.1).
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request parameters"),
    401: ("authentication_error", "Invalid authentication credentials"),
    402: ("payment_required", "Insufficient balance. Please top up your account"),
    403: ("permission_error", "Access forbidden"),
    404: ("invalid_request_error", "Not found"),
    405: ("invalid_request_error", "Method not allowed"),
    422: ("invalid_request_error", "Unprocessable request"),
    429: ("rate_limit_error", "Rate limit exceeded. Please try again later"),
    500: ("server_error", "Internal server error"),
    502: ("bad_gateway", "Bad gateway"),
    503: ("service_unavailable", "Service temporarily unavailable"),
    504: ("gateway_timeout", "Gateway timeout"),
}

#: The ways a task can end ``failed`` (the docs show no example; these follow §3's shape).
TASK_FAILURES: tuple[dict[str, Any], ...] = (
    {
        "code": 400,
        "message": "The request was blocked by content moderation. Please revise the prompt.",
        "type": "content_policy_violation",
    },
    {
        "code": 500,
        "message": "Video generation failed upstream. Please try again later.",
        "type": "generation_error",
    },
)

HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>Bad Gateway</h1><p>The upstream answered late.</p></body></html>"
)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,191}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_EXTENSION = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
}


def error(
    status: int,
    message: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """The documented error envelope ``{"error": {code, message, type}}`` (§4.1), plus ``extra``."""
    kind, default = ERRORS[status]
    body = {"error": {"code": status, "message": message or default, "type": kind}, **(extra or {})}
    return web.json_response(body, status=status, headers=headers)


def quota_error(status: int) -> web.Response:
    """Out of balance: the documented 402, or the new-api style 403 (§4.3)."""
    if status == 402:
        return error(402)
    body = {
        "error": {
            "code": "insufficient_user_quota",
            "message": "user quota is not enough",
            "type": "new_api_error",
        }
    }
    return web.json_response(body, status=403)


def upload_error(status: int, message: str) -> web.Response:
    """An upload error: the envelope without ``error.code``, as the upload docs show (§4.1)."""
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return web.json_response(body, status=status)


def _bad(what: str) -> str:
    return f"Invalid request parameters: {what}"


def problem(body: object, legacy: bool, image_size: Callable[[str], int | None]) -> str | None:
    """Why ``body`` is not a valid Sora 2 request (§1.1), or None when it is.

    Args:
        body: the parsed JSON body.
        legacy: also accept the older durations (§1.3).
        image_size: bytes of an image URL when known (our own uploads), else None.
    """
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        return "Model name is required"
    if not isinstance(model, str) or model not in RESOLUTIONS:
        return _bad(f"model {json.dumps(model)} is not supported (allowed: sora-2, sora-2-pro)")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _bad("'prompt' is required and must be a non-empty string")
    duration = body.get("duration")
    allowed = DURATIONS + (LEGACY_DURATIONS[model] if legacy else ())
    if duration is not None and (type(duration) is not int or duration not in allowed):
        choices = ", ".join(map(str, allowed))
        return _bad(f"'duration' must be an integer, one of {choices} (got {json.dumps(duration)})")
    resolution = body.get("resolution")
    if resolution is not None and resolution not in RESOLUTIONS[model]:
        choices = ", ".join(RESOLUTIONS[model])
        return _bad(f"'resolution' {json.dumps(resolution)} is not allowed for {model} ({choices})")
    aspect = body.get("aspect_ratio")
    if aspect is not None and aspect not in ASPECT_RATIOS:
        return _bad(f"'aspect_ratio' must be one of {', '.join(ASPECT_RATIOS)}")
    images = body.get("image_urls")
    if images is not None:
        if not isinstance(images, list) or len(images) > 1:
            return _bad("'image_urls' must be a list of at most 1 URL")
        for url in images:
            why = _image_url_problem(url, image_size)
            if why:
                return _bad(f"'image_urls': {why}")
    return None


def _image_url_problem(url: object, image_size: Callable[[str], int | None]) -> str | None:
    if not isinstance(url, str):
        return "each entry must be a URL string"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{url!r} is not a public http(s) URL"
    if not parts.path.lower().endswith(IMAGE_EXTENSIONS):
        return f"{url!r} must end in {'/'.join(IMAGE_EXTENSIONS)}"
    size = image_size(url)
    if size is not None and size > IMAGE_URL_MAX_BYTES:
        return f"the image is {size} bytes, more than {IMAGE_URL_MAX_BYTES}"
    return None


def idempotency_key_problem(key: str | None) -> str | None:
    """Why an ``Idempotency-Key`` header is malformed (1-191 visible ASCII), or None."""
    if key is None or _IDEMPOTENCY_KEY.fullmatch(key):
        return None
    return _bad("Idempotency-Key must be 1-191 visible ASCII characters")


def digest(body: Any) -> str:
    """A stable hash of a JSON body, to tell a replay from a different request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def mask_key(key: str) -> str:
    """An API key as the stats show it: short keys as they are, long ones ``abcd…wxyz``."""
    return key if len(key) <= 8 else f"{key[:4]}…{key[-4:]}"


def ulid(milliseconds: int, randomness: int) -> str:
    """A 26-character Crockford base32 ULID from a 48-bit time and 80 random bits."""
    n = ((milliseconds & (2**48 - 1)) << 80) | (randomness & (2**80 - 1))
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


def ulid_seconds(task_id: str) -> float | None:
    """The creation time (unix seconds) inside a ``task_<ULID>`` id, or None if malformed."""
    body = task_id.removeprefix("task_")
    if len(body) != 26 or body == task_id or any(c not in _CROCKFORD for c in body):
        return None
    n = 0
    for char in body:
        n = n * 32 + _CROCKFORD.index(char)
    return (n >> 80) / 1000.0


def cost(model: str, resolution: str, seconds: int) -> float:
    """USD billed for a completed task: seconds x the per-second rate."""
    return round(seconds * RATES[(model, resolution)], 4)


def video_bytes(task_id: str, size: int = 4096) -> bytes:
    """The emulator's deterministic "video" of a task: an MP4 ``ftyp`` box, then ``mdat``."""
    ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    payload = hashlib.shake_256(task_id.encode()).digest(size - len(ftyp) - 8)
    return ftyp + (len(payload) + 8).to_bytes(4, "big") + b"mdat" + payload


def thumbnail_bytes(task_id: str) -> bytes:
    """A deterministic JPEG-looking thumbnail of a task."""
    noise = hashlib.shake_256(b"thumbnail" + task_id.encode()).digest(256)
    return b"\xff\xd8\xff\xe0" + noise + b"\xff\xd9"


def sniff_image(content: bytes) -> str | None:
    """The image type of ``content`` by its magic bytes: JPEG, PNG, WebP or GIF, else None."""
    if content.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if content.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def safe_filename(filename: str, content_type: str) -> str:
    """A URL-safe version of an uploaded file's name, ending in its type's extension."""
    name = _UNSAFE.sub("_", PurePosixPath(filename.replace("\\", "/")).name)[-100:] or "image"
    extension = _IMAGE_EXTENSION[content_type]
    same = (extension, ".jpeg") if extension == ".jpg" else (extension,)
    return name if name.lower().endswith(same) else name + extension
