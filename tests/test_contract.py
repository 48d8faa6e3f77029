"""Contract test: the documented examples of apimart-api.md, replayed against the emulator.

Each example is embedded as the docs show it; the emulator's answer must have exactly the
same keys and JSON types (an integer may stand where the docs show a float, never the reverse).
"""

from __future__ import annotations

import io
import re
from typing import Any

import aiohttp
import pytest

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "sora-2", "prompt": "a lighthouse at dusk", "duration": 8, "resolution": "720p"}

# §1.2 success envelope (legacy, every revision and locale).
SUBMIT_OK = {
    "code": 200,
    "data": [{"status": "submitted", "task_id": "task_01K8SGYNNNVBQTXNR4MM964S7K"}],
}
# §1.2 versioned contract (X-APIMart-Response-Version: 2026-07-27).
SUBMIT_VERSIONED = {
    "data": {
        "id": "task_01K8SGYNNNVBQTXNR4MM964S7K",
        "status": "pending",
        "object": "generation.task",
    },
    "request_id": "req_01K8SGYNNNVBQTXNR4MM964S7K",
}
# §3 completed video task (the doc example, thumbnail requested).
TASK_COMPLETED = {
    "code": 200,
    "data": {
        "id": "task_01K9S419324DREZFBWNSVXYR6H",
        "status": "completed",
        "progress": 100,
        "result": {
            "thumbnail_url": "https://upload.apimart.ai/f/image/1-thumbnail_task_01K9S4.jpg",
            "videos": [
                {
                    "url": ["https://upload.apimart.ai/f/video/1-video_task_01K9S4.mp4"],
                    "expires_at": 1762940095,
                }
            ],
        },
        "created": 1762853430,
        "completed": 1762853695,
        "estimated_time": 600,
        "actual_time": 265,
    },
}
# §3 rules: while running only these fields; a failed task adds completed/actual_time/error.
TASK_RUNNING = {
    "code": 200,
    "data": {
        "id": "task_01K9S419324DREZFBWNSVXYR6H",
        "status": "processing",
        "progress": 40,
        "created": 1762853430,
        "estimated_time": 600,
    },
}
TASK_FAILED = {
    "code": 200,
    "data": {
        "id": "task_01K9S419324DREZFBWNSVXYR6H",
        "status": "failed",
        "progress": 99,
        "created": 1762853430,
        "completed": 1762853695,
        "estimated_time": 600,
        "actual_time": 265,
        "error": {"code": 400, "message": "blocked", "type": "content_policy_violation"},
    },
}
# §4.1 error envelope and table.
ERROR = {
    "error": {
        "code": 402,
        "message": "Insufficient balance. Please top up your account",
        "type": "payment_required",
    }
}
UPLOAD_TOO_LARGE = {
    "error": {
        "message": "file size 20971521 exceeds maximum 20971520 bytes",
        "type": "invalid_request_error",
    }
}
# §5 upload and balance.
UPLOAD = {
    "url": "https://upload.apimart.ai/f/image/1-0b7f-reference.png",
    "filename": "reference.png",
    "content_type": "image/png",
    "bytes": 12345,
    "created_at": 1785571200,
}
BALANCE = {"success": True, "remain_balance": 10.5, "used_balance": 2.3, "unlimited_quota": False}
BALANCE_FAILED = {"success": False, "message": "record not found"}

TASK_ID = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def mismatches(actual: Any, example: Any, path: str = "$") -> list[str]:
    """Where ``actual`` differs from ``example`` in keys or JSON types."""
    if isinstance(example, dict):
        if not isinstance(actual, dict):
            return [f"{path}: object expected, got {actual!r}"]
        if set(actual) != set(example):
            return [f"{path}: keys {sorted(actual)} != documented {sorted(example)}"]
        return [m for k in example for m in mismatches(actual[k], example[k], f"{path}.{k}")]
    if isinstance(example, list):
        if not isinstance(actual, list) or not actual:
            return [f"{path}: non-empty array expected, got {actual!r}"]
        return [m for i, a in enumerate(actual) for m in mismatches(a, example[0], f"{path}[{i}]")]
    if isinstance(example, bool):
        ok = isinstance(actual, bool)
    elif isinstance(example, int):
        ok = isinstance(actual, int) and not isinstance(actual, bool)
    elif isinstance(example, float):
        ok = isinstance(actual, int | float) and not isinstance(actual, bool)
    else:
        ok = type(actual) is type(example)
    return [] if ok else [f"{path}: {type(example).__name__} expected, got {actual!r}"]


async def get_json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any):
    """Send a request (authorised by default) and return (status, headers, JSON)."""
    kw.setdefault("headers", AUTH)
    async with session.request(method, url, **kw) as resp:
        return resp.status, resp.headers, await resp.json()


async def submit(session, srv, body: Any = BODY, **kw: Any):
    """POST a generation request."""
    return await get_json(session, "POST", srv.base_url + "/v1/videos/generations", json=body, **kw)


def test_the_shape_check_catches_differences():
    """The checker itself rejects a missing key, a string for an int, and an int for a bool."""
    assert mismatches(SUBMIT_OK, SUBMIT_OK) == []
    assert mismatches({"code": 200}, SUBMIT_OK)
    assert mismatches({"code": "200", "data": SUBMIT_OK["data"]}, SUBMIT_OK)
    assert mismatches({**BALANCE, "unlimited_quota": 0}, BALANCE)
    assert mismatches({**BALANCE, "used_balance": 2}, BALANCE) == []


async def test_submit_success_envelope(emulator, session):
    """§1.2: ``{"code": 200, "data": [{"status": "submitted", "task_id"}]}`` with a ULID id."""
    srv = await emulator()
    status, _, doc = await submit(session, srv)
    assert status == 200
    assert mismatches(doc, SUBMIT_OK) == []
    assert doc["data"][0]["status"] == "submitted"
    assert TASK_ID.fullmatch(SUBMIT_OK["data"][0]["task_id"])
    assert TASK_ID.fullmatch(doc["data"][0]["task_id"])


async def test_versioned_submit_envelope(emulator, session):
    """§1.2 opt-in contract: ``data`` is an object and the version header comes back."""
    srv = await emulator()
    headers = {**AUTH, "X-APIMart-Response-Version": "2026-07-27", "Idempotency-Key": "c-1"}
    status, response_headers, doc = await submit(session, srv, headers=headers)
    assert status == 200
    assert mismatches(doc, SUBMIT_VERSIONED) == []
    assert response_headers["X-APIMart-Response-Version"] == "2026-07-27"


async def test_completed_task_document(emulator, session, fake_clock):
    """§3: the completed example's fields, plus the billed ``cost``/``credits_cost``."""
    srv = await emulator(task_seconds=265)
    _, _, doc = await submit(session, srv, {**BODY, "thumbnail": True})
    task_id = doc["data"][0]["task_id"]
    fake_clock.advance(265)
    status, _, doc = await get_json(
        session, "GET", f"{srv.base_url}/v1/tasks/{task_id}?language=en"
    )
    assert status == 200
    data = doc["data"]
    assert isinstance(data.pop("cost"), float)
    assert isinstance(data.pop("credits_cost"), int)
    assert mismatches(doc, TASK_COMPLETED) == []
    video = data["result"]["videos"][0]
    example = TASK_COMPLETED["data"]
    documented_ttl = example["result"]["videos"][0]["expires_at"] - example["completed"]
    assert video["expires_at"] - data["completed"] == documented_ttl == 86400
    assert data["actual_time"] == data["completed"] - data["created"] == 265
    assert re.fullmatch(r".*/f/video/\d+-video_task_\w{26}\.mp4", video["url"][0])
    thumbnail = data["result"]["thumbnail_url"]
    assert re.fullmatch(r".*/f/image/\d+-thumbnail_task_\w{26}\.jpg", thumbnail)


async def test_running_and_failed_task_documents(emulator, session, fake_clock):
    """§3: a running task has no result or end fields; a failed one has ``error`` only."""
    srv = await emulator(task_seconds=100)
    srv.emulator.script_submit(["ok", "fail_task"])
    ids = [(await submit(session, srv))[2]["data"][0]["task_id"] for _ in range(2)]
    fake_clock.advance(40)
    _, _, running = await get_json(session, "GET", f"{srv.base_url}/v1/tasks/{ids[0]}")
    assert mismatches(running, TASK_RUNNING) == []
    fake_clock.advance(60)
    _, _, failed = await get_json(session, "GET", f"{srv.base_url}/v1/tasks/{ids[1]}")
    assert mismatches(failed, TASK_FAILED) == []


async def _trigger(status: int, message: str, emulator, session):
    """Provoke the documented error ``status`` (with ``message``) the natural way."""
    if message == "Invalid task ID":
        srv = await emulator()
        return await get_json(session, "GET", srv.base_url + "/v1/tasks/task_nope")
    if status == 400:
        return await submit(session, await emulator(), {"model": "sora-2"})
    if status == 401:
        return await submit(session, await emulator(key=KEY), headers={})
    if status == 402:
        return await submit(session, await emulator(quota=0))
    if status == 429:
        return await submit(session, await emulator(p_429=1.0))
    srv = await emulator()
    srv.emulator.script_submit([str(status)])
    return await submit(session, srv)


@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        (400, "invalid_request_error", "Invalid request parameters"),
        (400, "invalid_request_error", "Invalid task ID"),
        (401, "authentication_error", "Invalid authentication credentials"),
        (402, "payment_required", "Insufficient balance. Please top up your account"),
        (403, "permission_error", "Access forbidden"),
        (429, "rate_limit_error", "Rate limit exceeded. Please try again later"),
        (500, "server_error", "Internal server error"),
        (502, "bad_gateway", "Bad gateway"),
    ],
)
async def test_error_table(emulator, session, status, error_type, message):
    """§4.1: each documented status carries the envelope with its type and message."""
    got_status, _, doc = await _trigger(status, message, emulator, session)
    assert got_status == status
    assert mismatches(doc, ERROR) == []
    assert (doc["error"]["code"], doc["error"]["type"]) == (status, error_type)
    assert doc["error"]["message"].startswith(message)


async def test_upload_documents(emulator, session):
    """§5: the upload answer's fields; §4.1: the 413 omits ``error.code``."""
    srv = await emulator(key=KEY)
    url = srv.base_url + "/v1/uploads/images"
    for content, example in ((PNG, UPLOAD), (PNG + bytes(20 * 1024 * 1024 - len(PNG) + 1), None)):
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(content), filename="reference.png")
        status, _, doc = await get_json(session, "POST", url, data=form)
        if example is None:
            assert status == 413
            assert doc == UPLOAD_TOO_LARGE
        else:
            assert status == 200
            assert mismatches(doc, example) == []
            assert (doc["filename"], doc["content_type"]) == ("reference.png", "image/png")


async def test_balance_documents(emulator, session):
    """§5: the balance answer, and its HTTP 200 ``success: false`` failure."""
    srv = await emulator(key=KEY, quota=10)
    url = srv.base_url + "/v1/balance"
    status, _, doc = await get_json(session, "GET", url)
    assert status == 200
    assert mismatches(doc, BALANCE) == []
    status, _, doc = await get_json(session, "GET", url, headers={"Authorization": "Bearer x"})
    assert status == 200
    assert mismatches(doc, BALANCE_FAILED) == []
