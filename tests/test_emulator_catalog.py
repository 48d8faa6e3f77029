"""The emulator follows the model catalog: each body is checked with its model's schema.

Over real loopback sockets: 400 with the documented envelope on a violation (for every
shipped model that has a documented example, and for a temporary catalog), every documented
example accepted, Grok's ``data``-object answer, the model-unavailable answer for retired and
uncatalogued models in both assumed forms, and the per-model image limits.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from runner.emulator.server import RunningEmulator
from runner.manifest.catalog import ModelSpec, load_catalog
from runner.manifest.schemas import schema_dir

if TYPE_CHECKING:
    from conftest import EmulatorFactory, FakeClock

KEY = "catalog-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SUBMIT = "/v1/videos/generations"
TASK_ID = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")
PNG = b"\x89PNG\r\n\x1a\n"
BOGUS = "__not-a-value__"
CATALOG = load_catalog()


async def post(
    session: aiohttp.ClientSession, srv: RunningEmulator, body: Any, **headers: str
) -> tuple[int, Any]:
    """POST a generation request; (status, JSON body)."""
    url = srv.base_url + SUBMIT
    async with session.post(url, json=body, headers={**AUTH, **headers}) as resp:
        return resp.status, await resp.json()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    """GET an API route; (status, JSON body)."""
    async with session.get(url, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def upload(session: aiohttp.ClientSession, srv: RunningEmulator, size: int) -> str:
    """Upload a PNG of ``size`` bytes; its URL."""
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(PNG + bytes(size - len(PNG))), filename="still.png")
    async with session.post(srv.base_url + "/v1/uploads/images", data=form, headers=AUTH) as r:
        assert r.status == 200
        url: str = (await r.json())["url"]
        return url


def valid_base(spec: ModelSpec) -> dict[str, Any] | None:
    """A body the catalog accepts for ``spec``: its own documented example, else the minimum."""
    own = [e for e in spec.schema.get("examples", []) if e.get("model") == spec.id]
    for body in [*own, {"model": spec.id, "prompt": "a lighthouse at dusk"}]:
        if spec.validator.is_valid(body):
            return dict(body)
    return None


def violation(spec: ModelSpec) -> tuple[dict[str, Any], str] | None:
    """A valid body with its first enum field (other than ``model``) set to a bogus value."""
    base = valid_base(spec)
    field = next((name for name in spec.schema.get("properties", {}) if spec.enum(name)
                  and name != "model"), None)
    if base is None or field is None:
        return None
    return {**base, field: BOGUS}, field


VIOLATIONS = [
    pytest.param(spec.id, *found, id=f"{spec.id}-{found[1]}")
    for spec in CATALOG.values()
    if (found := violation(spec)) is not None
]
EXAMPLES = [
    pytest.param(example, id=f"{Path(spec.file).stem}-{index}")
    for spec in {spec.file: spec for spec in CATALOG.values()}.values()
    for index, example in enumerate(spec.schema.get("examples", []))
]
OBJECT_MODELS = [model for model, spec in CATALOG.items() if spec.response == "object"]
#: The catalog's own request files (schemas/models/README.md), by model folder.
DATA = Path(__file__).resolve().parent / "data" / "models"
VALID_FILES = sorted(DATA.glob("*/valid/*.json"))
INVALID_FILES = sorted(DATA.glob("*/invalid/*.json"))


def expected_answer(request: dict[str, Any]) -> str:
    """What the emulator answers a catalog-invalid body: 400, unavailable, or accepted.

    A body whose only fault is a field its schema lacks is accepted: a gateway ignores
    unknown JSON fields (the emulator's documented decision); apimart-batch refuses them
    before sending.
    """
    model = request.get("model")
    spec = CATALOG.get(model) if isinstance(model, str) else None
    if spec is None:
        return "unavailable"
    errors = list(spec.validator.iter_errors(request))
    return "accepted" if all(e.validator == "additionalProperties" for e in errors) else "400"


def test_the_shipped_catalog_is_covered() -> None:
    """Violations cover sora-2 and at least two other models; Grok answers an object."""
    covered = {param.values[0] for param in VIOLATIONS}
    assert "sora-2" in covered
    assert len(covered - {"sora-2", "sora-2-pro"}) >= 2
    assert "grok-imagine-1.0-video-apimart" in OBJECT_MODELS


# -- a temporary catalog -----------------------------------------------------------------------


def toy_schema(model: str, response: str) -> dict[str, Any]:
    """A small model schema in the catalog's format, with two kinds of image fields."""
    image = {"$ref": "urn:apimart-batch:schema:common#/$defs/image_url"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:apimart-batch:schema:model:{model}",
        "title": model,
        "description": "A test model.",
        "x-apimart": {
            "models": [model],
            "family": "toy",
            "source": "tests",
            "read": "2026-12-01",
            "response": response,
            "takes": ["text", "first_frame"],
            "defaults": {"duration": 5, "shape": "wide"},
            "max_image_bytes": 1000,
        },
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": False,
        "properties": {
            "model": {"enum": [model]},
            "prompt": {"$ref": "urn:apimart-batch:schema:common#/$defs/prompt"},
            "duration": {"type": "integer", "minimum": 2, "maximum": 9},
            "shape": {"enum": ["wide", "tall"], "x-apimart-aka": ["aspect_ratio"]},
            "first_frame_image": image,
            "image_with_roles": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {"url": image, "role": {"enum": ["first_frame"]}},
                },
            },
        },
        "allOf": [
            {
                "description": "a tall video is at most 5 seconds",
                "if": {"required": ["shape"], "properties": {"shape": {"const": "tall"}}},
                "then": {"properties": {"duration": {"maximum": 5}}},
            }
        ],
        "examples": [{"model": model, "prompt": "a toy boat", "shape": "tall", "duration": 4}],
    }


@pytest.fixture
def toy_catalog(tmp_path: Path) -> Path:
    """A catalog folder with ``toy-array`` (list answer) and ``toy-object`` (object answer)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "common.json").write_bytes((schema_dir() / "models" / "common.json").read_bytes())
    for model, response in (("toy-array", "array"), ("toy-object", "object")):
        text = json.dumps(toy_schema(model, response))
        (folder / f"{model}.json").write_text(text, encoding="utf-8")
    return folder


# -- 400 on a violation ------------------------------------------------------------------------


def assert_invalid(status: int, doc: Any, *fragments: str) -> None:
    """The documented 400 envelope (§4.1) whose message holds every fragment."""
    assert status == 400, doc
    assert set(doc) == {"error"}
    error = doc["error"]
    assert (error["code"], error["type"]) == (400, "invalid_request_error")
    assert error["message"].startswith("Invalid request parameters: ")
    for fragment in fragments:
        assert fragment in error["message"]


@pytest.mark.parametrize(("model", "body", "field"), VIOLATIONS)
async def test_a_violation_of_the_models_schema_is_400_naming_the_field(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, model: str,
    body: dict[str, Any], field: str
) -> None:
    """A value outside a shipped model's enum is a 400 naming the field; nothing is created."""
    srv = await emulator()
    status, doc = await post(session, srv, body)
    assert_invalid(status, doc, f"'{field}': '{BOGUS}' is not")  # one of / of type
    assert srv.emulator.stats()["tasks_created"] == 0


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param({"shape": "square"}, ["'shape': 'square' is not one of"], id="enum"),
        pytest.param({"duration": "4"}, ["'duration': '4' is not of type 'integer'"], id="str"),
        pytest.param({"duration": 4.0}, ["'duration': 4.0 is not of type 'integer'"], id="float"),
        pytest.param({"duration": 7}, ["'duration': 7 is greater than the maximum of 5",
                                       "(a tall video is at most 5 seconds)"], id="rule"),
        pytest.param({"prompt": None}, ["'prompt' is a required property"], id="required"),
        pytest.param({"image_with_roles": [{"url": "./a.png"}]},
                     ["'image_with_roles[0].url': './a.png' does not match"], id="nested"),
    ],
)
async def test_a_temporary_catalog_is_enforced(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, toy_catalog: Path,
    change: dict[str, Any], fragments: list[str]
) -> None:
    """``catalog_dir`` swaps the rules: types, enums, cross-field rules and nested fields."""
    srv = await emulator(catalog_dir=toy_catalog)
    body = {"model": "toy-array", "prompt": "a toy boat", "shape": "tall", "duration": 4}
    assert (await post(session, srv, body))[0] == 200
    changed = {k: v for k, v in {**body, **change}.items() if v is not None}
    assert_invalid(*(await post(session, srv, changed)), *fragments)
    assert srv.emulator.stats()["tasks_created"] == 1


async def test_unknown_fields_and_nulls_pass_as_a_gateway_reads_them(
    emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """A field the schema does not know is ignored and a null counts as omitted (as today)."""
    srv = await emulator()
    body = {"model": "kling-v2-6", "prompt": "a kite", "watermark_text": "x", "mode": None}
    assert "watermark_text" not in CATALOG["kling-v2-6"].schema["properties"]
    status, doc = await post(session, srv, body)
    assert status == 200, doc


@pytest.mark.parametrize("example", EXAMPLES)
async def test_every_documented_example_is_accepted(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, example: dict[str, Any]
) -> None:
    """Each ``examples`` entry of each shipped model schema creates a task."""
    srv = await emulator()
    status, doc = await post(session, srv, example)
    assert status == 200, doc
    assert srv.emulator.stats()["tasks_created"] == 1


def _rel(path: Path) -> str:
    return str(path.relative_to(DATA))


@pytest.mark.parametrize("path", VALID_FILES, ids=_rel)
async def test_every_valid_request_file_is_accepted(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, path: Path
) -> None:
    """Each ``tests/data/models/*/valid/*.json`` body creates a task."""
    srv = await emulator()
    status, doc = await post(session, srv, json.loads(path.read_text(encoding="utf-8")))
    assert status == 200, doc


@pytest.mark.parametrize("path", INVALID_FILES, ids=_rel)
async def test_every_invalid_request_file_is_refused_at_its_path(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, path: Path
) -> None:
    """Each ``invalid/*.json`` body is a 400 naming its ``path`` (see ``expected_answer``)."""
    case = json.loads(path.read_text(encoding="utf-8"))
    srv = await emulator()
    status, doc = await post(session, srv, case["request"])
    expected = expected_answer(case["request"])
    if expected == "accepted":
        assert status == 200, doc
        return
    if expected == "unavailable":
        assert_unavailable(status, doc, case["request"]["model"], 503)
        return
    where = "".join(
        f"[{step}]" if step.isdigit() else (f".{step}" if index else step)
        for index, step in enumerate(case["path"].split(".") if case["path"] else [])
    )
    assert_invalid(status, doc, f"'{where}" if where else "")
    assert srv.emulator.stats()["tasks_created"] == 0


# -- image limits per model --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_body", "where"),
    [
        pytest.param(lambda url: {"first_frame_image": url}, "first_frame_image", id="field"),
        pytest.param(lambda url: {"image_with_roles": [{"url": url, "role": "first_frame"}]},
                     "image_with_roles[0].url", id="nested"),
    ],
)
async def test_an_uploaded_image_over_the_models_limit_is_400(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, toy_catalog: Path,
    make_body: Any, where: str
) -> None:
    """Every upload field of the schema is held to the model's ``max_image_bytes``."""
    srv = await emulator(catalog_dir=toy_catalog)
    base = {"model": "toy-array", "prompt": "a toy boat"}
    small, large = await upload(session, srv, 1000), await upload(session, srv, 1001)
    assert (await post(session, srv, {**base, **make_body(small)}))[0] == 200
    status, doc = await post(session, srv, {**base, **make_body(large)})
    assert_invalid(status, doc, f"'{where}': the image is 1001 bytes, more than 1000")


# -- Grok's object answer ----------------------------------------------------------------------


async def check_object_answer(
    session: aiohttp.ClientSession, srv: RunningEmulator, fake_clock: FakeClock, model: str
) -> None:
    """The submit answers the documented object; the task query keeps its usual shape."""
    status, doc = await post(session, srv, {"model": model, "prompt": "a dog on a beach"})
    assert status == 200, doc
    task_id = doc["data"]["id"]
    assert TASK_ID.fullmatch(task_id)
    created = int(fake_clock())
    data = {"id": task_id, "status": "submitted", "progress": 0, "created": created}
    assert doc == {"code": 200, "data": {**data, "type": "video"}}
    fake_clock.advance(srv.emulator.config.task_seconds)
    status, task = await get(session, f"{srv.base_url}/v1/tasks/{task_id}")
    assert status == 200
    assert (task["code"], task["data"]["id"], task["data"]["status"]) == (200, task_id, "completed")
    assert task["data"]["result"]["videos"][0]["url"][0].endswith(f"video_{task_id}.mp4")
    # No published price for this model: no cost rather than a made-up one.
    assert "cost" not in task["data"]
    assert "credits_cost" not in task["data"]


@pytest.mark.parametrize("model", OBJECT_MODELS)
async def test_grok_answers_data_as_an_object(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, fake_clock: FakeClock, model: str
) -> None:
    """A shipped model whose catalog ``response`` is ``object`` gets Grok's documented shape."""
    await check_object_answer(session, await emulator(), fake_clock, model)


async def test_the_response_shape_comes_from_the_catalog(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, fake_clock: FakeClock,
    toy_catalog: Path
) -> None:
    """In a temporary catalog the ``object`` model answers an object, the other a list."""
    srv = await emulator(catalog_dir=toy_catalog)
    await check_object_answer(session, srv, fake_clock, "toy-object")
    status, doc = await post(session, srv, {"model": "toy-array", "prompt": "a toy boat"})
    assert status == 200
    assert [set(item) for item in doc["data"]] == [{"status", "task_id"}]


async def test_only_sora_tasks_are_billed(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    """A completed sora-2 task carries ``cost``; a completed kling-v2-6 task does not."""
    srv = await emulator()
    costs = {}
    for model in ("sora-2", "kling-v2-6"):
        _, doc = await post(session, srv, {"model": model, "prompt": "a kite"})
        fake_clock.advance(srv.emulator.config.task_seconds)
        _, task = await get(session, f"{srv.base_url}/v1/tasks/{doc['data'][0]['task_id']}")
        assert task["data"]["status"] == "completed"
        costs[model] = task["data"].get("cost")
    assert costs == {"sora-2": 4 * 0.08, "kling-v2-6": None}


# -- retired and uncatalogued models -----------------------------------------------------------

NO_CHANNEL = re.compile(r"当前分组 default 下对于模型 (\S+) 无可用渠道 \(request id: \d{22}\)")


def assert_unavailable(status: int, doc: Any, model: str, form: int) -> None:
    """The model-unavailable answer of the chosen form, naming ``model``."""
    assert status == form, doc
    error = doc["error"]
    assert set(doc) == {"error"}
    assert set(error) == {"code", "message", "type"}
    assert error["code"] == "model_not_found"
    if form == 503:
        assert error["type"] == "new_api_error"
        found = NO_CHANNEL.fullmatch(error["message"])
        assert found is not None and found.group(1) == model, error["message"]
    else:
        assert error["type"] == "invalid_request_error"
        expected = f"The model `{model}` does not exist or you do not have access to it."
        assert error["message"] == expected


@pytest.mark.parametrize("form", [503, 404], ids=["no-channel", "not-found"])
async def test_a_retired_model_is_unavailable_and_nothing_is_created(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, form: int
) -> None:
    """Retired sora-2 answers model-unavailable, replays too; sora-2-pro still works."""
    srv = await emulator(retired_models=frozenset({"sora-2"}), unavailable_status=form, quota=5)
    body = {"model": "sora-2", "prompt": "a lighthouse at dusk"}
    for _ in range(2):
        assert_unavailable(*(await post(session, srv, body, **{"Idempotency-Key": "k-1"})),
                           "sora-2", form)
    stats = srv.emulator.stats()
    assert (stats["tasks_created"], stats["replays"]) == (0, 0)
    assert stats["unavailable_models"] == {"sora-2": 2}
    _, balance = await get(session, srv.base_url + "/v1/balance")
    assert balance["used_balance"] == 0
    # The key was not recorded: with another body it creates a task, no 422 and no replay.
    pro = {**body, "model": "sora-2-pro"}
    status, doc = await post(session, srv, pro, **{"Idempotency-Key": "k-1"})
    assert status == 200, doc
    assert srv.emulator.stats()["tasks_created"] == 1


@pytest.mark.parametrize("form", [503, 404], ids=["no-channel", "not-found"])
async def test_a_model_outside_the_catalog_is_unavailable(
    emulator: EmulatorFactory, session: aiohttp.ClientSession, toy_catalog: Path, form: int
) -> None:
    """An uncatalogued id (here sora-2 against a toy catalog, and sora-3) gets the same answer."""
    srv = await emulator(catalog_dir=toy_catalog, unavailable_status=form)
    for model in ("sora-2", "sora-3"):
        answer = await post(session, srv, {"model": model, "prompt": "a lighthouse"})
        assert_unavailable(*answer, model, form)
    assert srv.emulator.stats()["tasks_created"] == 0


async def test_a_missing_or_malformed_model_is_still_a_400(
    emulator: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """No model is the documented "Model name is required"; a list is a 400, not unavailable."""
    srv = await emulator(retired_models=frozenset({"sora-2"}))
    status, doc = await post(session, srv, {"prompt": "a lighthouse"})
    assert (status, doc["error"]["message"]) == (400, "Model name is required")
    assert_invalid(*(await post(session, srv, {"model": ["sora-2"], "prompt": "x"})), "'model'")
