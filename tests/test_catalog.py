"""runner.catalog: the model schemas, their examples, the price table and what they promise."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from runner.cli import main
from runner.errors import ManifestError
from runner.manifest import catalog as catalog_module
from runner.manifest import pricing
from runner.manifest.catalog import dispatch, load_catalog, manifest_validators
from runner.manifest.loader import load_manifests
from runner.manifest.schemas import Problem, explain, load_schema
from runner.report.plan import models_listing, plan_json

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "schemas" / "models"
EXAMPLES = ROOT / "tests" / "data" / "models"
CATALOG = load_catalog()
FILES = sorted(p for p in MODELS.glob("*.json") if p.name != "common.json")
TAKES = {"text", "first_frame", "last_frame", "reference_images", "video", "audio"}
#: What a model's prompt schema may say: the loader judges prompts by type, blankness and
#: length only (jobs that differ only in their prompt's text share one verdict).
PROMPT_KEYWORDS = {"type", "minLength", "maxLength", "pattern", "title", "description",
                   "examples", "$ref"}  # fmt: skip


def cases(kind: str) -> list[Any]:
    """Every example file of ``kind`` (valid/invalid), as pytest params named model/file."""
    found = sorted(EXAMPLES.glob(f"*/{kind}/*.json"))
    return [pytest.param(path, id=f"{path.parent.parent.name}/{path.stem}") for path in found]


def problems(request: dict[str, Any]) -> list[Any]:
    """What the manifest loader says of one expanded job (a model outside the catalog first)."""
    validators = manifest_validators()
    if request.get("model") not in CATALOG:
        return [Problem(("model",), "not in the catalog")]
    return explain(validators.job, request, registry=validators.catalog.registry)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_each_schema_is_valid_and_says_where_it_came_from(path: Path) -> None:
    """A model schema passes its metaschema and carries title, examples, source and date."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    meta = schema["x-apimart"]
    assert schema["$id"] == f"urn:apimart-batch:schema:model:{path.stem}"
    assert schema["title"] and schema["description"] and schema["examples"]
    assert meta["models"] and meta["family"] and meta["source"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["read"])
    assert meta["response"] in ("array", "object")
    assert set(meta["takes"]) <= TAKES
    assert schema["additionalProperties"] is False and "model" in schema["required"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_documented_examples_validate(path: Path) -> None:
    """Every request example of a model's page is a valid job for the runner."""
    for example in json.loads(path.read_text(encoding="utf-8"))["examples"]:
        assert problems(example) == [], example


@pytest.mark.parametrize("model", list(CATALOG))
def test_every_model_has_positive_and_negative_examples(model: str) -> None:
    """Each catalog id has at least one valid and one invalid example file."""
    assert list((EXAMPLES / model / "valid").glob("*.json")), model
    assert list((EXAMPLES / model / "invalid").glob("*.json")), model


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_examples_validate(path: Path) -> None:
    """A valid example file is accepted as its model's request."""
    assert problems(json.loads(path.read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_examples_fail_where_they_say(path: Path) -> None:
    """An invalid example is refused, with a problem at (or under) the path it names."""
    case = json.loads(path.read_text(encoding="utf-8"))
    found = [".".join(map(str, p.path)) for p in problems(case["request"])]
    assert found, f"{path.name}: accepted, but {case['why']}"
    assert any(f == case["path"] or f.startswith(case["path"]) for f in found), found


def test_example_folders_name_catalog_models() -> None:
    """No example folder is left for a model the catalog lost."""
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(CATALOG)


def test_manifest_schema_lists_the_catalog() -> None:
    """The shipped manifest schema's $defs/job dispatch is the catalog's, model by model."""
    assert load_schema()["$defs"]["job"]["allOf"] == dispatch(CATALOG), (
        "schemas/manifest.schema.json is out of step with schemas/models/: rewrite $defs/job/"
        "allOf from runner.catalog.dispatch(load_catalog())"
    )


def test_every_model_has_a_price_entry_and_every_key_is_usable() -> None:
    """One price entry (known or null) per model; each key names a model and a resolution."""
    prices = pricing.built_in_prices()
    for model in CATALOG:
        assert any(k == model or k.startswith(model + "/") for k in prices), model
    assert [key for key in prices if pricing.key_problem(key) is not None] == []


@pytest.mark.parametrize("model", list(CATALOG))
def test_prompts_are_judged_by_type_blankness_and_length_only(model: str) -> None:
    """The loader's shared verdict for jobs differing in prompt text stays correct."""
    prompt = CATALOG[model].schema["properties"].get("prompt", {})
    assert set(prompt) <= PROMPT_KEYWORDS, sorted(set(prompt) - PROMPT_KEYWORDS)
    assert prompt.get("pattern", "\\S") == "\\S"


def test_image_fields_are_found_for_upload() -> None:
    """Every kind of image field is marked for upload: lists, single fields, roles."""
    uploads = {spec.id: spec.uploads for spec in CATALOG.values()}
    assert ("image_urls", "*") in uploads["sora-2"]
    assert ("first_frame_image",) in uploads["MiniMax-Hailuo-2.3"]
    assert ("image_with_roles", "*", "url") in uploads["wan2.7"]
    assert ("last_frame_image",) in uploads["veo3.1-fast-official"]


def test_grok_answers_with_a_data_object() -> None:
    """The catalog says which model answers {data: {id}} instead of {data: [{task_id}]}."""
    assert {m for m, spec in CATALOG.items() if spec.response == "object"} == {
        "grok-imagine-1.0-video-apimart"
    }


def test_models_command_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    """`models` shows every id with its resolutions and price; --json has the same ids."""
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for model in CATALOG:
        assert model in text
    assert "720P/1080P (1080P)" in text
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["id"] for entry in listing] == list(CATALOG)
    wan = next(entry for entry in listing if entry["id"] == "wan2.7")
    assert wan["resolution_field"] == "resolution" and wan["aspect_field"] == "size"
    assert wan["default_resolution"] == "1080P" and wan["usd_per_second"] == {"wan2.7": None}


def test_schema_command_prints_one_model_or_the_bundle(capsys: pytest.CaptureFixture[str]) -> None:
    """`schema --model ID` prints that file; `schema` embeds every model schema by its $id."""
    assert main(["schema", "--model", "kling-v3"]) == 0
    assert json.loads(capsys.readouterr().out) == CATALOG["kling-v3"].schema
    assert main(["schema"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    job = Draft202012Validator({**bundle, "$ref": "#/$defs/job"})
    errors = [e for e in job.iter_errors({"model": "wan2.7", "prompt": "x", "size": "21:9"})
              if list(e.absolute_path) == ["size"]]
    assert errors, "the bundle alone must resolve the model schemas"
    assert main(["schema", "--model", "wan27"]) == 2
    assert "did you mean wan2.7" in capsys.readouterr().err


def test_adding_a_model_is_one_schema_file_and_one_price_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new schema file plus a price entry: validated, priced and listed, no code change."""
    schemas = tmp_path / "schemas"
    shutil.copytree(ROOT / "schemas", schemas)
    new = json.loads((MODELS / "viduq3-pro.json").read_text(encoding="utf-8"))
    new["$id"] = "urn:apimart-batch:schema:model:acme-video-1"
    new["x-apimart"]["models"] = ["acme-video-1"]
    new["properties"]["model"] = {"type": "string", "enum": ["acme-video-1"]}
    new["examples"] = [{"model": "acme-video-1", "prompt": "A cat"}]
    (schemas / "models" / "acme-video-1.json").write_text(json.dumps(new), encoding="utf-8")
    table = json.loads((schemas / "prices.json").read_text(encoding="utf-8"))
    table["prices"].append({"key": "acme-video-1/720p", "usd_per_second": 0.5, "source": "test"})
    (schemas / "prices.json").write_text(json.dumps(table), encoding="utf-8")
    monkeypatch.setattr(catalog_module, "schema_dir", lambda: schemas)
    monkeypatch.setattr(pricing, "schema_dir", lambda: schemas)
    for cached in (catalog_module.load_catalog, catalog_module.manifest_validators,
                   pricing._built_in):  # fmt: skip
        cached.cache_clear()
    try:
        manifest = tmp_path / "m.yaml"
        manifest.write_text(
            "version: 1\njobs:\n  - {model: acme-video-1, prompt: A cat, duration: 4}\n"
            "  - {model: acme-video-1, prompt: A dog, resolution: 9000p}\n", encoding="utf-8"
        )
        with pytest.raises(ManifestError, match="'9000p' is not allowed for model acme-video-1"):
            load_manifests([str(manifest)])
        manifest.write_text(
            "version: 1\njobs:\n  - {model: acme-video-1, prompt: A cat, duration: 4}\n",
            encoding="utf-8",
        )
        plan = plan_json(load_manifests([str(manifest)]), pricing.merged_prices([]))
        assert plan["jobs"][0]["estimated_usd"] == 2.0  # 4 s at the default 720p x $0.5
        assert "acme-video-1" in [entry["id"] for entry in models_listing(load_catalog())]
    finally:
        for cached in (catalog_module.load_catalog, catalog_module.manifest_validators,
                       pricing._built_in):  # fmt: skip
            cached.cache_clear()
