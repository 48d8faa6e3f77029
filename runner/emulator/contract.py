"""The APIMart contract as data and pure functions: request rules, envelopes, ids and payloads.

Everything here follows apimart-api.md (§1.2 ids, §3 tasks, §4.1 errors, §5 uploads, §6 prices)
and, for each model's request body, its schema in the model catalog (``schemas/models/``);
:mod:`runner.emulator` serves it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator, TypeChecker, validators
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

from runner.manifest import Catalog, ModelSpec, upload_pointers

RESPONSE_VERSION = "2026-07-27"
UPLOAD_MAX_BYTES = 20 * 1024 * 1024
UPLOAD_TTL = 72 * 3600

#: Older Sora durations (§1.3), accepted only with the ``legacy_values`` knob.
LEGACY_DURATIONS: dict[str, tuple[int, ...]] = {"sora-2": (10, 15), "sora-2-pro": (10, 15, 25)}

#: How a retired or uncatalogued model is refused. APIMart's real answer is UNKNOWN
#: (apimart-models.md §4); both are assumptions. 503 is what new-api (the gateway APIMart
#: appears to run, apimart-api.md §4.3) sends when no channel serves a model; 404 is
#: OpenAI's own "model does not exist". Both carry ``error.code: "model_not_found"``.
UNAVAILABLE_STATUSES = (503, 404)

#: USD per second of video: the §6 suggested table ($0.08 x 1/3/5/7). Only Sora has a
#: published price; other models' completed tasks carry no ``cost`` (theirs are unknown).
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


def model_unavailable(model: str, status: int, request_id: str) -> web.Response:
    """The answer for a model that is retired or not served (status from UNAVAILABLE_STATUSES).

    503 copies new-api's distributor (HTTP 503, ``type: new_api_error``, the message in
    Chinese with its request id); 404 copies OpenAI's. Both are assumptions, see above.
    """
    if status == 503:
        message = f"当前分组 default 下对于模型 {model} 无可用渠道 (request id: {request_id})"
        kind = "new_api_error"
    else:
        message = f"The model `{model}` does not exist or you do not have access to it."
        kind = "invalid_request_error"
    body = {"error": {"code": "model_not_found", "message": message, "type": kind}}
    return web.json_response(body, status=status)


def _bad(what: str) -> str:
    return f"Invalid request parameters: {what}"


def routing_problem(body: object) -> str | None:
    """Why ``body`` names no model to route to (not an object, no model), or None."""
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        return "Model name is required"
    if not isinstance(model, str):
        return _bad(f"'model' must be a string (got {json.dumps(model)})")
    return None


def _json_integer(checker: TypeChecker, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_ADDITIONAL = Draft202012Validator.VALIDATORS["additionalProperties"]


def _unknown_fields_ignored(
    validator: Validator, value: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if value is not False:
        yield from _ADDITIONAL(validator, value, instance, schema)


#: The model schemas read as a gateway reads a body: an unknown field is ignored (Go's JSON
#: decoding drops it), and an integer field takes only an integer literal (``8.0`` does not
#: decode into an int; APIMart answers 400 for a quoted duration, apimart-api.md §1.1).
GatewayValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    validators={"additionalProperties": _unknown_fields_ignored},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _json_integer),
)


def gateway_validators(catalog: Catalog) -> dict[str, Validator]:
    """One :data:`GatewayValidator` per catalog model id, $refs resolved in the catalog."""
    return {
        model: GatewayValidator(spec.schema, registry=catalog.registry)
        for model, spec in catalog.items()
    }


def problem(
    body: dict[str, Any],
    spec: ModelSpec,
    validator: Validator,
    legacy: bool,
    image_size: Callable[[str], int | None],
) -> str | None:
    """Why ``body`` is not a valid request for ``spec``'s model, or None when it is.

    Args:
        body: the parsed JSON object; a null field counts as omitted, as a gateway's
            optional (pointer) fields read it.
        spec: the catalog entry of ``body["model"]``.
        validator: ``spec``'s schema as a gateway reads it (:func:`gateway_validators`).
        legacy: also accept the older Sora durations (§1.3).
        image_size: bytes of an image URL when known (our own uploads), else None.
    """
    present = {name: value for name, value in body.items() if value is not None}
    errors: Iterable[ValidationError] = validator.iter_errors(present)
    if legacy:
        errors = (e for e in errors if not _legacy_duration(e, present, spec.id))
    error = best_match(errors)
    if error is not None:
        return _bad(_describe(error, spec.schema))
    for pointer, url in upload_pointers(spec, present):
        size = image_size(url) if isinstance(url, str) else None
        if size is not None and size > spec.max_image_bytes:
            limit = spec.max_image_bytes
            return _bad(f"'{_where(pointer)}': the image is {size} bytes, more than {limit}")
    return None


def _legacy_duration(error: ValidationError, body: Mapping[str, Any], model: str) -> bool:
    duration = body.get("duration")
    allowed = LEGACY_DURATIONS.get(model, ())
    return list(error.absolute_path) == ["duration"] and type(duration) is int and (
        duration in allowed
    )


def _describe(error: ValidationError, schema: Mapping[str, Any]) -> str:
    """``'field': what is wrong (the rule's description)``; the field leads."""
    steps = list(error.absolute_schema_path)
    rules = schema.get("allOf", [])
    rule = None
    if len(steps) > 1 and steps[0] == "allOf" and isinstance(steps[1], int):
        rule = rules[steps[1]].get("description") if steps[1] < len(rules) else None
    text = error.message
    if rule and error.validator in ("not", "oneOf", "anyOf"):
        # jsonschema's own text for these repeats the whole body and subschema.
        text, rule = rule, None
    text = text if len(text) <= 300 else text[:296] + " ..."
    where = _where(error.absolute_path)
    return (f"'{where}': " if where else "") + text + (f" ({rule})" if rule else "")


def _where(path: Iterable[str | int]) -> str:
    """A body location as ``image_with_roles[1].url``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


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


def cost(model: str, resolution: str, seconds: int) -> float | None:
    """USD billed for a completed task: seconds x the per-second rate; None when unpriced."""
    rate = RATES.get((model, resolution))
    return None if rate is None else round(seconds * rate, 4)


def video_bytes(task_id: str, size: int | None = None) -> bytes:
    """The emulator's deterministic video of a task: a real, playable MP4, unique to the task.

    It is ``data/sample.mp4`` (1 s, 64x64 H.264; ``data/README.md`` says how it was made) with
    a ``free`` box naming the task appended after its last box, where no player looks and no
    offset in ``moov`` points. ``size`` pads that box to make the file exactly ``size`` bytes;
    a size too small for the sample and the task's name raises ValueError.
    """
    note = b"apimart-batch emulator video of " + task_id.encode() + b"\n"
    length = 8 + len(note) if size is None else size - len(_sample_video())
    if length < 8 + len(note):
        smallest = len(_sample_video()) + 8 + len(note)
        msg = f"'size' must be >= {smallest} for task {task_id!r} (got {size})"
        raise ValueError(msg)
    free = length.to_bytes(4, "big") + b"free" + note.ljust(length - 8, b"\0")
    return _sample_video() + free


@functools.cache
def _sample_video() -> bytes:
    return resources.files("runner.emulator").joinpath("data", "sample.mp4").read_bytes()


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
