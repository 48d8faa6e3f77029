"""The APIMart emulator over real loopback sockets: contract rules, lifecycle, faults, stats."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from runner.emulator.config import flag_name
from runner.emulator.contract import UPLOAD_MAX_BYTES, ulid, video_bytes
from runner.emulator.server import (
    Emulator,
    EmulatorConfig,
    add_arguments,
    config_from_args,
    running,
    serve_forever,
)
from runner.errors import UsageError
from runner.manifest.catalog import load_catalog

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "sora-2", "prompt": "a red fox crossing fresh snow"}
SUBMIT = "/v1/videos/generations"
TASK_ID = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)


@dataclass
class Answer:
    """One HTTP answer, read in full."""

    status: int
    headers: CIMultiDictProxy[str]
    body: Any


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    """Send one request (authorised by default) and read the JSON, or raw, answer."""
    kwargs.setdefault("headers", AUTH)
    async with session.request(method, url, **kwargs) as resp:
        raw = await resp.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        return Answer(resp.status, resp.headers, body)


async def submit(session, srv, body: Any = BODY, **kwargs: Any) -> Answer:
    """POST a generation request to the emulator."""
    return await call(session, "POST", srv.base_url + SUBMIT, json=body, **kwargs)


async def poll(session, srv, task_id: str, **kwargs: Any) -> Answer:
    """GET a task from the emulator."""
    return await call(session, "GET", f"{srv.base_url}/v1/tasks/{task_id}", **kwargs)


async def new_task(session, srv, body: Any = BODY) -> str:
    """Submit and return the new task id."""
    answer = await submit(session, srv, body)
    assert answer.status == 200, answer.body
    return answer.body["data"][0]["task_id"]


async def upload(session, srv, content: bytes = PNG, filename: str = "ref.png", **kw: Any):
    """Upload ``content`` as the multipart field ``file``."""
    form = aiohttp.FormData()
    form.add_field(
        "file", io.BytesIO(content), filename=filename, content_type="application/octet-stream"
    )
    return await call(session, "POST", srv.base_url + "/v1/uploads/images", data=form, **kw)


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-key"),
        pytest.param({"Authorization": "Bearer "}, id="empty-key"),
        pytest.param({"Authorization": f"Basic {KEY}"}, id="not-bearer"),
    ],
)
async def test_bad_credentials_get_401_on_every_api_route(emulator, session, headers):
    """Submit, task query and upload all answer 401 authentication_error without the key."""
    srv = await emulator(key=KEY)
    answers = [
        await submit(session, srv, headers=headers),
        await poll(session, srv, "task_x", headers=headers),
        await upload(session, srv, headers=headers),
    ]
    for answer in answers:
        assert answer.status == 401
        assert answer.body == {
            "error": {
                "code": 401,
                "message": "Invalid authentication credentials",
                "type": "authentication_error",
            }
        }
    assert srv.emulator.stats()["tasks_created"] == 0


async def test_any_non_empty_key_is_accepted_when_none_is_configured(emulator, session):
    """With ``key=None`` every Bearer key works, and tasks are counted per (short) key."""
    srv = await emulator()
    await submit(session, srv, headers={"Authorization": "Bearer a"})
    await submit(session, srv, headers={"Authorization": "Bearer sk-live-0123456789"})
    assert srv.emulator.stats()["tasks_per_key"] == {"a": 1, "sk-l…6789": 1}


# -- validation (§1.1) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"model": None}, "Model name is required", id="no-model"),
        pytest.param({"model": ""}, "Model name is required", id="empty-model"),
        pytest.param({"model": ["sora-2"]}, "'model' must be a string", id="model-list"),
        pytest.param({"prompt": None}, "'prompt'", id="no-prompt"),
        pytest.param({"prompt": "   "}, "'prompt'", id="blank-prompt"),
        pytest.param({"prompt": 5}, "'prompt'", id="prompt-int"),
        pytest.param({"duration": "8"}, "'duration': '8' is not of type", id="duration-string"),
        pytest.param({"duration": True}, "'duration': True is not of type", id="duration-bool"),
        pytest.param({"duration": 8.0}, "'duration': 8.0 is not of type", id="duration-float"),
        pytest.param({"duration": 7}, "7 is not one of [4, 8, 12, 16, 20]", id="duration-7"),
        pytest.param({"duration": 10}, "'duration': 10 is not one of", id="duration-legacy"),
        pytest.param({"resolution": "1080p"}, "sora-2 renders 720p only", id="sora2-1080p"),
        pytest.param({"model": "sora-2-pro", "resolution": "4k"}, "'resolution'", id="pro-4k"),
        pytest.param({"aspect_ratio": "1:1"}, "'aspect_ratio'", id="square"),
        pytest.param({"image_urls": "https://x.test/a.png"}, "'image_urls'", id="urls-str"),
        pytest.param(
            {"image_urls": ["https://x.test/a.png", "https://x.test/b.png"]},
            "is too long",
            id="two-urls",
        ),
        pytest.param({"image_urls": ["ftp://x.test/a.png"]}, "'image_urls[0]': 'ftp:", id="ftp"),
        pytest.param({"image_urls": ["images/a.png"]}, "'image_urls[0]'", id="local-path"),
        pytest.param({"image_urls": ["https://x.test/a.gif"]}, "'image_urls[0]'", id="gif"),
        pytest.param({"image_urls": [7]}, "'image_urls[0]': 7 is not of type", id="url-int"),
    ],
)
async def test_invalid_requests_get_400_and_create_nothing(emulator, session, change, message):
    """Every rule of the sora-2 schema is enforced with the 400 invalid_request_error envelope."""
    srv = await emulator()
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    answer = await submit(session, srv, body)
    assert answer.status == 400
    error = answer.body["error"]
    assert (error["code"], error["type"]) == (400, "invalid_request_error")
    assert message in error["message"]
    assert srv.emulator.stats()["tasks_created"] == 0


@pytest.mark.parametrize(
    "raw",
    [pytest.param(b"{not json", id="broken"), pytest.param(b"[1, 2]", id="array")],
)
async def test_a_body_that_is_not_a_json_object_gets_400(emulator, session, raw):
    """Broken JSON and non-object JSON are invalid requests."""
    srv = await emulator()
    answer = await call(session, "POST", srv.base_url + SUBMIT, data=raw, headers=AUTH)
    assert answer.status == 400
    assert answer.body["error"]["message"].startswith("Invalid request parameters")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({}, id="minimal"),
        pytest.param({"model": "sora-2-pro", "resolution": "1080p", "duration": 20}, id="pro"),
        pytest.param({"aspect_ratio": "portrait", "duration": 16}, id="portrait"),
        pytest.param({"image_urls": ["https://img.test/A.JPG"]}, id="image-upper-ext"),
        pytest.param({"image_urls": []}, id="no-images"),
        pytest.param({"duration": None, "resolution": None}, id="nulls"),
        pytest.param({"watermark": True, "style": "anime", "private": False}, id="extra-fields"),
    ],
)
async def test_valid_requests_are_accepted(emulator, session, change):
    """Documented values, explicit nulls and unknown extra fields are accepted."""
    srv = await emulator()
    answer = await submit(session, srv, {**BODY, **change})
    assert answer.status == 200, answer.body
    assert srv.emulator.stats()["tasks_created"] == 1


@pytest.mark.parametrize(
    ("model", "duration", "legacy", "status"),
    [
        ("sora-2", 10, False, 400),
        ("sora-2", 10, True, 200),
        ("sora-2", 25, True, 400),
        ("sora-2-pro", 25, True, 200),
        ("sora-2-pro", 8, True, 200),
    ],
)
async def test_legacy_durations_only_behind_the_flag(
    emulator, session, model, duration, legacy, status
):
    """The older 10/15(/25) durations are accepted only with ``legacy_values``."""
    srv = await emulator(legacy_values=legacy)
    answer = await submit(session, srv, {**BODY, "model": model, "duration": duration})
    assert answer.status == status


# -- envelopes and idempotency (§1.2, §5) --------------------------------------------------


async def test_legacy_envelope_carries_a_task_ulid(emulator, session):
    """By default the answer is the legacy array envelope with a ``task_`` + ULID id."""
    srv = await emulator()
    answer = await submit(session, srv)
    assert answer.status == 200
    assert answer.body["code"] == 200
    [item] = answer.body["data"]
    assert item["status"] == "submitted"
    assert TASK_ID.fullmatch(item["task_id"])
    assert "X-APIMart-Response-Version" not in answer.headers


async def test_versioned_envelope_on_request(emulator, session):
    """``X-APIMart-Response-Version`` gets the object envelope and the header back."""
    srv = await emulator()
    headers = {**AUTH, "X-APIMart-Response-Version": "2026-07-27"}
    answer = await submit(session, srv, headers=headers)
    assert answer.headers["X-APIMart-Response-Version"] == "2026-07-27"
    data = answer.body["data"]
    assert data["object"] == "generation.task"
    assert data["status"] == "pending"
    assert TASK_ID.fullmatch(data["id"])
    assert answer.body["request_id"].startswith("req_")


async def test_same_idempotency_key_and_body_replays_the_task(emulator, session):
    """A replay returns the original id with ``Idempotency-Replayed`` and creates nothing."""
    srv = await emulator()
    headers = {**AUTH, "Idempotency-Key": "job-1"}
    first = await submit(session, srv, headers=headers)
    second = await submit(session, srv, headers=headers)
    assert second.status == 200
    assert second.body["data"][0]["task_id"] == first.body["data"][0]["task_id"]
    assert "Idempotency-Replayed" not in first.headers
    assert second.headers["Idempotency-Replayed"] == "true"
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["replays"]) == (1, 1)
    assert stats["max_tasks_per_idempotency_key"] == 1


async def test_same_idempotency_key_with_another_body_is_422(emulator, session):
    """Reusing a key for a different request is refused and creates nothing."""
    srv = await emulator()
    headers = {**AUTH, "Idempotency-Key": "job-1"}
    await submit(session, srv, headers=headers)
    answer = await submit(session, srv, {**BODY, "duration": 8}, headers=headers)
    assert answer.status == 422
    assert answer.body["error"]["type"] == "invalid_request_error"
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["idempotency_conflicts"]) == (1, 1)


async def test_malformed_idempotency_key_is_400(emulator, session):
    """An Idempotency-Key with a space (not visible ASCII) is an invalid request."""
    srv = await emulator()
    answer = await submit(session, srv, headers={**AUTH, "Idempotency-Key": "job 1"})
    assert answer.status == 400
    assert "Idempotency-Key" in answer.body["error"]["message"]


async def test_without_idempotency_support_a_resend_creates_a_duplicate(emulator, session):
    """``idempotency=False`` ignores the key, and the stats expose the duplicate."""
    srv = await emulator(idempotency=False)
    headers = {**AUTH, "Idempotency-Key": "job-1"}
    first = await submit(session, srv, headers=headers)
    second = await submit(session, srv, headers=headers)
    assert first.body["data"][0]["task_id"] != second.body["data"][0]["task_id"]
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["max_tasks_per_body"], stats["replays"]) == (2, 2, 0)


async def test_seeded_emulators_give_the_same_ids(emulator, session):
    """Same seed and clock: the same fault draws and the same task ids."""
    runs = []
    for _ in range(2):
        srv = await emulator(seed=1, p_500=0.5)
        answers = [await submit(session, srv) for _ in range(8)]
        runs.append(
            [a.body["data"][0]["task_id"] if a.status == 200 else a.status for a in answers]
        )
    assert runs[0] == runs[1]
    assert 500 in runs[0]
    assert any(isinstance(item, str) for item in runs[0])


# -- task lifecycle (§3) --------------------------------------------------------------------


async def test_task_goes_pending_processing_completed_with_the_clock(emulator, session, fake_clock):
    """Pending for the first 10%, rising progress, then completed with result and cost."""
    srv = await emulator(task_seconds=100)
    created = int(fake_clock())
    task_id = await new_task(session, srv)
    seen = []
    for step in (0, 5, 10, 50, 99.9):
        fake_clock.now = created + step
        data = (await poll(session, srv, task_id)).body["data"]
        assert data["estimated_time"] == 100
        assert "result" not in data
        assert "completed" not in data
        seen.append((data["status"], data["progress"]))
    assert [s for s, _ in seen] == ["pending", "pending", "processing", "processing", "processing"]
    progress = [p for _, p in seen]
    assert progress == sorted(progress)
    assert progress[0] == 0
    assert 0 < progress[2] < progress[3] < progress[4] <= 99
    fake_clock.now = created + 100
    answer = await poll(session, srv, task_id, params={"language": "en"})
    assert answer.body["code"] == 200
    data = answer.body["data"]
    assert (data["id"], data["status"], data["progress"]) == (task_id, "completed", 100)
    assert (data["created"], data["completed"], data["actual_time"]) == (
        created,
        created + 100,
        100,
    )
    [video] = data["result"]["videos"]
    assert video["expires_at"] == created + 100 + 86400
    [url] = video["url"]
    assert url.startswith(srv.base_url + "/f/video/")
    assert url.endswith(".mp4")
    assert "thumbnail_url" not in data["result"]
    assert (data["cost"], data["credits_cost"]) == (0.32, 32)
    assert "error" not in data


async def test_cost_follows_model_resolution_and_duration(emulator, session):
    """sora-2-pro 1080p for 12 s bills 12 x $0.56."""
    srv = await emulator(task_seconds=0)
    body = {**BODY, "model": "sora-2-pro", "resolution": "1080p", "duration": 12}
    data = (await poll(session, srv, await new_task(session, srv, body))).body["data"]
    assert (data["cost"], data["credits_cost"]) == (6.72, 672)


async def test_thumbnail_only_when_asked_and_at_result_level(emulator, session):
    """``thumbnail: true`` adds ``result.thumbnail_url`` (served); otherwise there is none."""
    srv = await emulator(task_seconds=0)
    task_id = await new_task(session, srv, {**BODY, "thumbnail": True})
    result = (await poll(session, srv, task_id)).body["data"]["result"]
    assert "thumbnail_url" not in result["videos"][0]
    image = await call(session, "GET", result["thumbnail_url"])
    assert image.status == 200
    assert image.body.startswith(b"\xff\xd8\xff")
    without = (await poll(session, srv, await new_task(session, srv))).body["data"]["result"]
    assert "thumbnail_url" not in without


async def test_url_can_be_a_plain_string(emulator, session):
    """``url_as_string`` serves the old revision's string ``url``."""
    srv = await emulator(task_seconds=0, url_as_string=True)
    data = (await poll(session, srv, await new_task(session, srv))).body["data"]
    assert isinstance(data["result"]["videos"][0]["url"], str)


async def test_failed_task_carries_an_error_object_and_no_result(emulator, session):
    """``fail_rate=1`` ends tasks ``failed`` with error{code,message,type}; nothing is billed."""
    srv = await emulator(task_seconds=0, fail_rate=1.0)
    data = (await poll(session, srv, await new_task(session, srv))).body["data"]
    assert data["status"] == "failed"
    assert set(data["error"]) == {"code", "message", "type"}
    assert isinstance(data["error"]["code"], int)
    assert data["error"]["message"]
    assert not {"result", "cost", "fail_reason"} & set(data)


async def test_failed_task_can_carry_fail_reason_instead(emulator, session):
    """``fail_reason_field`` puts the reason in ``fail_reason`` and drops ``error``."""
    srv = await emulator(task_seconds=0, fail_rate=1.0, fail_reason_field=True)
    data = (await poll(session, srv, await new_task(session, srv))).body["data"]
    assert data["status"] == "failed"
    assert isinstance(data["fail_reason"], str)
    assert "error" not in data


async def test_scripted_fail_task_fails_only_that_task(emulator, session):
    """``fail_task`` in the submit script fails exactly the next task."""
    srv = await emulator(task_seconds=0)
    srv.emulator.script_submit(["fail_task"])
    first, second = await new_task(session, srv), await new_task(session, srv)
    assert (await poll(session, srv, first)).body["data"]["status"] == "failed"
    assert (await poll(session, srv, second)).body["data"]["status"] == "completed"
    assert srv.emulator.stats()["tasks_by_status"] == {"failed": 1, "completed": 1}


async def test_unknown_task_id_is_400_invalid_task_id(emulator, session):
    """An unknown id is the documented 400, not 404."""
    srv = await emulator()
    answer = await poll(session, srv, "task_01K8SGYNNNVBQTXNR4MM964S7K")
    assert answer.status == 400
    assert answer.body["error"] == {
        "code": 400,
        "message": "Invalid task ID",
        "type": "invalid_request_error",
    }


# -- files ---------------------------------------------------------------------------------


async def test_video_is_served_until_its_link_expires(emulator, session, fake_clock):
    """The video's bytes are deterministic; after ``expires_at`` the CDN answers 403."""
    srv = await emulator(task_seconds=10, link_ttl=60)
    task_id = await new_task(session, srv)
    fake_clock.advance(10)
    video = (await poll(session, srv, task_id)).body["data"]["result"]["videos"][0]
    fake_clock.now = video["expires_at"] - 1
    got = await call(session, "GET", video["url"][0], headers={})
    assert got.status == 200
    assert got.headers["Content-Length"] == str(len(got.body))
    assert got.body == video_bytes(task_id)
    assert got.body[4:8] == b"ftyp"
    fake_clock.now = video["expires_at"]
    assert (await call(session, "GET", video["url"][0], headers={})).status == 403
    assert srv.emulator.stats()["downloads"] == 1


async def test_video_of_an_unfinished_or_failed_task_is_404(emulator, session, fake_clock):
    """No file exists before completion, nor for a failed task."""
    srv = await emulator(task_seconds=10)
    srv.emulator.script_submit(["ok", "fail_task"])
    running_id, failed_id = await new_task(session, srv), await new_task(session, srv)
    created = int(fake_clock())
    assert (await poll(session, srv, running_id)).body["data"]["status"] == "pending"
    url = f"{srv.base_url}/f/video/{created}-video_{running_id}.mp4"
    assert (await call(session, "GET", url)).status == 404
    fake_clock.advance(10)
    url = f"{srv.base_url}/f/video/{created}-video_{failed_id}.mp4"
    assert (await call(session, "GET", url)).status == 404


async def test_upload_returns_a_served_url_and_counts_by_content(emulator, session, fake_clock):
    """An upload answers the §5 fields; the URL serves the same bytes; stats count by sha256."""
    srv = await emulator()
    first = await upload(session, srv, filename="../../etc/my ref.png")
    await upload(session, srv)
    assert first.status == 200
    doc = first.body
    assert (doc["filename"], doc["content_type"]) == ("my_ref.png", "image/png")
    assert (doc["bytes"], doc["created_at"]) == (len(PNG), int(fake_clock()))
    assert doc["url"].startswith(srv.base_url + "/f/image/")
    assert doc["url"].endswith("-my_ref.png")
    served = await call(session, "GET", doc["url"], headers={})
    assert (served.status, served.body) == (200, PNG)
    stats = srv.emulator.stats()
    assert stats["uploads"] == 2
    assert list(stats["uploads_per_sha256"].values()) == [2]
    task = await submit(session, srv, {**BODY, "image_urls": [doc["url"]]})
    assert task.status == 200


@pytest.mark.parametrize(
    ("content", "content_type", "name"),
    [
        (b"\xff\xd8\xff\xe0" + bytes(50), "image/jpeg", "a.jpeg"),
        (b"GIF89a" + bytes(50), "image/gif", "a.gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(50), "image/webp", "a.webp"),
        (PNG, "image/png", "noext.png"),
    ],
)
async def test_upload_detects_the_image_type_by_content(
    emulator, session, content, content_type, name
):
    """JPEG, GIF and WebP are recognised by magic bytes; a missing extension is added."""
    srv = await emulator()
    filename = name.removesuffix(".png") if name == "noext.png" else name
    answer = await upload(session, srv, content, filename=filename)
    assert answer.status == 200
    assert (answer.body["content_type"], answer.body["filename"]) == (content_type, name)


async def test_upload_rejects_non_images_and_missing_files(emulator, session):
    """A text file, or a form without ``file``, is a 400 without ``error.code``."""
    srv = await emulator()
    text = await upload(session, srv, b"hello world", filename="notes.txt")
    assert text.status == 400
    assert "code" not in text.body["error"]
    form = aiohttp.FormData()
    form.add_field("other", io.BytesIO(PNG), filename="x.png")
    missing = await call(session, "POST", srv.base_url + "/v1/uploads/images", data=form)
    assert missing.status == 400
    assert srv.emulator.stats()["uploads"] == 0


async def test_upload_over_20_mb_is_413_with_the_documented_message(emulator, session):
    """More than 20 MB is 413 "file size N exceeds maximum 20971520 bytes", without a code."""
    srv = await emulator()
    size = UPLOAD_MAX_BYTES + 1
    answer = await upload(session, srv, PNG + bytes(size - len(PNG)))
    assert answer.status == 413
    assert answer.body == {
        "error": {
            "message": f"file size {size} exceeds maximum 20971520 bytes",
            "type": "invalid_request_error",
        }
    }


async def test_an_uploaded_image_over_10_mb_is_refused_by_sora(emulator, session):
    """Uploads may be 20 MB but Sora's ``image_urls`` limit (its catalog entry) is 10 MB."""
    srv = await emulator()
    limit = load_catalog()["sora-2"].max_image_bytes
    doc = (await upload(session, srv, PNG + bytes(11 * 1024 * 1024))).body
    answer = await submit(session, srv, {**BODY, "image_urls": [doc["url"]]})
    assert answer.status == 400
    assert f"'image_urls[0]': the image is {doc['bytes']} bytes, more than {limit}" in (
        answer.body["error"]["message"]
    )


async def test_uploaded_images_expire_after_72_hours(emulator, session, fake_clock):
    """The upload URL answers 403 once its 72 h are over."""
    srv = await emulator()
    url = (await upload(session, srv)).body["url"]
    fake_clock.advance(72 * 3600)
    assert (await call(session, "GET", url, headers={})).status == 403


# -- balance and quota ---------------------------------------------------------------------


async def test_balance_is_unlimited_without_a_quota(emulator, session):
    """No quota: ``remain_balance`` -1 and ``unlimited_quota`` true."""
    srv = await emulator()
    answer = await call(session, "GET", srv.base_url + "/v1/balance")
    assert answer.body == {
        "success": True,
        "remain_balance": -1,
        "used_balance": 0.0,
        "unlimited_quota": True,
    }


async def test_balance_counts_tasks_against_the_quota(emulator, session):
    """With a quota, the balance is the number of tasks left."""
    srv = await emulator(quota=3)
    await new_task(session, srv)
    answer = await call(session, "GET", srv.base_url + "/v1/balance")
    assert answer.body == {
        "success": True,
        "remain_balance": 2.0,
        "used_balance": 1.0,
        "unlimited_quota": False,
    }


async def test_balance_with_a_bad_key_is_200_success_false(emulator, session):
    """A balance lookup fails with HTTP 200 and ``success: false`` (§4.2)."""
    srv = await emulator(key=KEY)
    answer = await call(session, "GET", srv.base_url + "/v1/balance", headers={})
    assert answer.status == 200
    assert answer.body["success"] is False
    assert "record not found" in answer.body["message"]


async def test_quota_exhausted_is_402_payment_required(emulator, session):
    """Once ``quota`` tasks exist, submits get the documented 402; replays still work."""
    srv = await emulator(quota=1)
    headers = {**AUTH, "Idempotency-Key": "k1"}
    first = await submit(session, srv, headers=headers)
    refused = await submit(session, srv, {**BODY, "duration": 8})
    assert refused.status == 402
    assert refused.body["error"] == {
        "code": 402,
        "message": "Insufficient balance. Please top up your account",
        "type": "payment_required",
    }
    replay = await submit(session, srv, headers=headers)
    assert replay.body == first.body
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_quota_can_answer_403_insufficient_user_quota(emulator, session):
    """``quota_status=403`` answers the new-api style string code."""
    srv = await emulator(quota=0, quota_status=403)
    answer = await submit(session, srv)
    assert answer.status == 403
    assert answer.body["error"]["code"] == "insufficient_user_quota"


# -- submit faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "error_type", "created"),
    [
        ("401", "authentication_error", 0),
        ("402", "payment_required", 0),
        ("403", "permission_error", 0),
        ("429", "rate_limit_error", 0),
        ("503", "service_unavailable", 0),
        ("500", "server_error", 1),
        ("502", "bad_gateway", 1),
        ("504", "gateway_timeout", 1),
    ],
)
async def test_scripted_status_faults(emulator, session, action, error_type, created):
    """Refusals create nothing; 500/502/504 come after the task was created."""
    srv = await emulator()
    srv.emulator.script_submit([action])
    answer = await submit(session, srv)
    assert answer.status == int(action)
    assert answer.body["error"]["type"] == error_type
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["faults"]) == (created, {action: 1})
    assert (await submit(session, srv)).status == 200


async def test_a_created_then_502_task_is_replayed_with_its_key(emulator, session):
    """A resend with the same key after a 502 gets the task the 502 created."""
    srv = await emulator()
    srv.emulator.script_submit(["502"])
    headers = {**AUTH, "Idempotency-Key": "job-9"}
    assert (await submit(session, srv, headers=headers)).status == 502
    again = await submit(session, srv, headers=headers)
    assert again.headers["Idempotency-Replayed"] == "true"
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_probabilistic_503_refuses_every_submit(emulator, session):
    """``p_503=1`` refuses all submits and creates nothing."""
    srv = await emulator(p_503=1.0)
    statuses = [(await submit(session, srv)).status for _ in range(3)]
    assert statuses == [503, 503, 503]
    assert srv.emulator.stats()["faults"] == {"503": 3}
    assert srv.emulator.stats()["tasks_created"] == 0


@pytest.mark.parametrize(
    ("header", "body_seconds"),
    [pytest.param(None, None, id="bare"), pytest.param("7", 7.5, id="header-and-body")],
)
async def test_429_carries_retry_after_only_when_configured(
    emulator, session, header, body_seconds
):
    """``retry_after`` sets the header and ``retry_after_body`` the body field of 429s."""
    srv = await emulator(p_429=1.0, retry_after=header, retry_after_body=body_seconds)
    answer = await submit(session, srv)
    assert answer.status == 429
    assert answer.headers.get("Retry-After") == header
    assert answer.body.get("retry_after") == body_seconds
    assert answer.body["error"]["message"] == "Rate limit exceeded. Please try again later"


async def test_reset_after_create_drops_the_connection_and_creates_the_task(emulator, session):
    """The client sees a real disconnect, yet the task exists (the ambiguous case)."""
    srv = await emulator()
    srv.emulator.script_submit(["reset_after_create"])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await submit(session, srv)
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["faults"]) == (1, {"reset_after_create": 1})


async def test_slow_after_create_times_the_client_out_but_creates_the_task(emulator, session):
    """A client read timeout fires while the created task's answer is held back."""
    srv = await emulator(slow_seconds=30)
    srv.emulator.script_submit(["slow_after_create"])
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await submit(session, srv, timeout=aiohttp.ClientTimeout(sock_read=0.1))
    assert time.monotonic() - started < 5
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_slow_answers_end_when_the_server_stops(session):
    """Stopping the emulator does not wait ``slow_seconds`` for a held answer."""
    started = time.monotonic()
    async with running(EmulatorConfig(p_slow_after_create=1.0, slow_seconds=60)) as srv:
        pending = asyncio.ensure_future(submit(session, srv))
        while not srv.emulator.stats()["tasks_created"]:
            await asyncio.sleep(0.005)
    answer = await pending
    assert answer.status == 200
    assert time.monotonic() - started < 5


async def test_html_200_creates_the_task_and_answers_html(emulator, session):
    """An HTML page with status 200 still means the task was created."""
    srv = await emulator()
    srv.emulator.script_submit(["html_200"])
    answer = await submit(session, srv)
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    assert answer.body.startswith(b"<!DOCTYPE html>")
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_rate_limit_is_a_token_bucket_on_the_clock(emulator, session, fake_clock):
    """Two submits per second pass, the third is 429, and time refills the bucket."""
    srv = await emulator(rate_limit_rps=2)
    statuses = [(await submit(session, srv)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    task_id = (await submit(session, srv)).body  # polls are not limited with the default scope
    assert task_id["error"]["type"] == "rate_limit_error"
    assert (await call(session, "GET", srv.base_url + "/v1/balance")).status == 200
    fake_clock.advance(0.5)
    assert [(await submit(session, srv)).status for _ in range(2)] == [200, 429]
    assert srv.emulator.stats()["faults"] == {"rate_limit": 3}


async def test_rate_limit_scope_api_limits_every_request(emulator, session):
    """With scope ``api`` a task query spends a token too."""
    srv = await emulator(rate_limit_rps=1, rate_limit_scope="api")
    task_id = await new_task(session, srv)
    assert (await poll(session, srv, task_id)).status == 429


# -- poll and download faults --------------------------------------------------------------


async def test_scripted_poll_faults_then_the_real_answer(emulator, session):
    """Poll scripts answer 502, 429, drop the connection, then answer normally."""
    srv = await emulator()
    task_id = await new_task(session, srv)
    # aiohttp resends an idempotent GET once after a disconnect, so it takes two resets.
    srv.emulator.script_poll(["502", "429", "reset", "reset"])
    assert (await poll(session, srv, task_id)).status == 502
    assert (await poll(session, srv, task_id)).status == 429
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await poll(session, srv, task_id)
    assert (await poll(session, srv, task_id)).status == 200
    assert srv.emulator.stats()["faults"] == {"poll_502": 1, "poll_429": 1, "poll_reset": 2}


async def test_probabilistic_poll_errors(emulator, session):
    """``p_poll_error=1`` answers every query with 500, 502 or 429."""
    srv = await emulator(p_poll_error=1.0, seed=3)
    task_id = await new_task(session, srv)
    statuses = {(await poll(session, srv, task_id)).status for _ in range(12)}
    assert statuses <= {500, 502, 429}
    assert len(statuses) > 1


async def test_download_reset_sends_half_the_body_then_drops(emulator, session):
    """Headers promise the full length, half arrives, then the connection is gone."""
    srv = await emulator(task_seconds=0)
    task_id = await new_task(session, srv)
    url = (await poll(session, srv, task_id)).body["data"]["result"]["videos"][0]["url"][0]
    srv.emulator.script_download(["reset"])
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(video_bytes(task_id)))
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (await call(session, "GET", url)).body == video_bytes(task_id)
    stats = srv.emulator.stats()
    assert (stats["downloads"], stats["faults"]) == (1, {"download_reset": 1})


async def test_probabilistic_download_reset(emulator, session):
    """``p_download_reset=1`` breaks every download."""
    srv = await emulator(task_seconds=0, p_download_reset=1.0)
    url = (await poll(session, srv, await new_task(session, srv))).body["data"]["result"]
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(session, "GET", url["videos"][0]["url"][0])


async def test_scripted_upload_reset_keeps_the_image(emulator, session):
    """An upload dropped after storing still counts (uploads have no idempotency key)."""
    srv = await emulator()
    srv.emulator.script_upload(["reset_after_create"])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await upload(session, srv)
    assert srv.emulator.stats()["uploads"] == 1


@pytest.mark.parametrize(
    ("route", "action"),
    [("submit", "bogus"), ("download", "reset_after_create"), ("poll", "200")],
)
def test_scripts_reject_unknown_actions(route, action):
    """A typo in a script fails loudly instead of silently answering ok."""
    with pytest.raises(ValueError, match="unknown"):
        Emulator().script(route, [action])


# -- concurrency, latency and stats --------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 5])
async def test_peak_in_flight_counts_concurrent_submits(emulator, session, concurrency):
    """The emulator sees exactly as many submits at once as the client sends."""
    srv = await emulator(latency_ms=30, latency_jitter=0.0)
    await asyncio.gather(*(submit(session, srv) for _ in range(concurrency)))
    stats = srv.emulator.stats()
    assert stats["peak_submit_in_flight"] == concurrency
    assert stats["peak_in_flight"] == concurrency
    assert (stats["in_flight"], stats["submit_in_flight"]) == (0, 0)


def test_latency_is_lognormal_around_the_median():
    """Latency samples vary, with their median near ``latency_ms``."""
    emu = Emulator(EmulatorConfig(latency_ms=200, latency_jitter=0.5, seed=1))
    samples = [emu._latency() for _ in range(2001)]
    assert statistics.median(samples) == pytest.approx(0.2, rel=0.1)
    assert min(samples) < 0.12 < 0.32 < max(samples)


async def test_stats_endpoint_needs_no_key_and_counts_routes(emulator, session):
    """``/_emulator/stats`` is open and reports requests per route."""
    srv = await emulator(key=KEY)
    await new_task(session, srv)
    await poll(session, srv, "task_unknown")
    answer = await call(session, "GET", srv.base_url + "/_emulator/stats", headers={})
    assert answer.status == 200
    assert answer.body["requests"] == {"submit": 1, "poll": 1, "stats": 1}
    assert answer.body["in_flight"] == 1  # the stats request itself


async def test_unknown_api_path_is_a_json_404(emulator, session):
    """An unknown ``/v1`` path answers the error envelope, not an HTML page."""
    srv = await emulator()
    answer = await call(session, "GET", srv.base_url + "/v1/nope")
    assert answer.status == 404
    assert answer.body["error"]["type"] == "invalid_request_error"


# -- configuration and serving -------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param({"p_500": 1.5}, id="p-above-1"),
        pytest.param({"fail_rate": -0.1}, id="negative-rate"),
        pytest.param({"task_seconds": -1}, id="negative-seconds"),
        pytest.param({"p_429": 0.6, "p_503": 0.6}, id="sum-above-1"),
        pytest.param({"quota_status": 401}, id="quota-status"),
        pytest.param({"rate_limit_rps": 0}, id="zero-rps"),
        pytest.param({"rate_limit_scope": "all"}, id="scope"),
        pytest.param({"unavailable_status": 400}, id="unavailable-status"),
        pytest.param({"retired_models": "sora-2"}, id="retired-models-str"),
        pytest.param({"catalog_dir": Path("no-such-folder")}, id="catalog-dir"),
    ],
)
def test_bad_config_values_are_refused(knobs):
    """Out-of-range knobs raise ValueError naming the knob."""
    with pytest.raises(ValueError, match=next(iter(knobs)) if len(knobs) == 1 else "sum"):
        EmulatorConfig(**knobs)


def test_every_knob_has_a_flag_and_defaults_round_trip():
    """No flags: the default config; every knob has a flag with help."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == EmulatorConfig()
    text = parser.format_help()
    for f in fields(EmulatorConfig):
        assert flag_name(f.name) in text


def test_flags_build_the_config(tmp_path: Path):
    """Flags of each kind (float, int, str, bool, choice, path, repeated) reach the config."""
    catalog = tmp_path / "models"
    catalog.mkdir()
    parser = argparse.ArgumentParser()
    add_arguments(parser, prefix="mock-")
    argv = [
        *("--mock-key", "k", "--mock-p-503", "0.25", "--mock-quota", "5"),
        *("--mock-quota-status", "403", "--mock-retry-after", "3", "--no-mock-idempotency"),
        *("--mock-url-as-string", "--mock-rate-limit-scope", "api", "--mock-seed", "9"),
        *("--mock-retire-model", "sora-2", "--mock-retire-model", "kling-v3"),
        *("--mock-unavailable-status", "404", "--mock-catalog-dir", str(catalog)),
    ]
    ns = parser.parse_args(argv)
    assert config_from_args(ns) == EmulatorConfig(
        key="k",
        p_503=0.25,
        quota=5,
        quota_status=403,
        retry_after="3",
        idempotency=False,
        url_as_string=True,
        rate_limit_scope="api",
        seed=9,
        retired_models=frozenset({"sora-2", "kling-v3"}),
        unavailable_status=404,
        catalog_dir=catalog,
    )


def test_bad_flag_values_raise_usage_error():
    """A probability above 1 on the command line is a UsageError naming the knob."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UsageError, match="p_502"):
        config_from_args(parser.parse_args(["--p-502", "2"]))


async def test_serve_forever_reports_its_url_and_serves(session):
    """``serve_forever`` calls ``on_ready`` with a loopback URL and serves until cancelled."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(serve_forever(EmulatorConfig(), on_ready=ready.set_result))
    base_url = await ready
    assert base_url.startswith("http://127.0.0.1:")
    assert (await call(session, "GET", base_url + "/_emulator/stats")).status == 200
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server


@pytest.mark.parametrize("adopt", [True, False], ids=["adopting", "strict"])
async def test_adopt_tasks_answers_for_ids_of_an_earlier_process(emulator, session, fake_clock,
                                                                 adopt):
    """With adopt_tasks, a well-formed id minted earlier elsewhere completes; else it is a 400."""
    srv = await emulator(adopt_tasks=adopt)
    earlier = "task_" + ulid(int((fake_clock() - 60) * 1000), 42)
    answer = await call(session, "GET", f"{srv.base_url}/v1/tasks/{earlier}")
    if not adopt:
        assert answer.status == 400
        return
    assert answer.status == 200
    assert answer.body["data"]["status"] == "completed"
    video = answer.body["data"]["result"]["videos"][0]["url"][0]
    fetched = await call(session, "GET", video, headers={})
    assert fetched.status == 200
    later = "task_" + ulid(int((fake_clock() + 60) * 1000), 42)
    for bad in ("task_nope", later):
        assert (await call(session, "GET", f"{srv.base_url}/v1/tasks/{bad}")).status == 400
