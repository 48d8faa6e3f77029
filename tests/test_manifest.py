"""runner.manifest and runner.schemas: YAML -> validated, expanded, named jobs."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from runner.errors import ManifestError
from runner.manifest import loader as manifest_module
from runner.manifest.catalog import composed_schema, load_catalog, manifest_validators
from runner.manifest.loader import Manifest, load_manifests
from runner.manifest.schemas import MANIFEST_SCHEMA, load_schema, schema_text, surely_valid
from runner.manifest.yamlfile import parse_yaml

ROOT = Path(__file__).resolve().parent.parent


def _png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = (b"\x00" + b"\x80\x80\x80" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))


def write(folder: Path, text: str, name: str = "m.yaml") -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(folder: Path, text: str, name: str = "m.yaml") -> Manifest:
    (manifest,) = load_manifests([write(folder, text, name)])
    return manifest


def problems(folder: Path, text: str) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifests([write(folder, text)])
    return str(caught.value)


ONE = "version: 1\ndefaults: {model: sora-2}\njobs:\n"


# --- YAML reading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "expected"),
    [
        pytest.param("no", "no", id="no-is-text"),
        pytest.param("yes", "yes", id="yes-is-text"),
        pytest.param("off", "off", id="off-is-text"),
        pytest.param("2024-01-01", "2024-01-01", id="date-is-text"),
        pytest.param("2024-01-01 10:00:00", "2024-01-01 10:00:00", id="timestamp-is-text"),
        pytest.param("16:9", "16:9", id="sexagesimal-is-text"),
        pytest.param("0x10", "0x10", id="hex-is-text"),
        pytest.param(".inf", ".inf", id="inf-is-text"),
        pytest.param("1_000", "1_000", id="underscore-is-text"),
        pytest.param("12", 12, id="int"),
        pytest.param("08", 8, id="leading-zero-is-decimal"),
        pytest.param("1.5", 1.5, id="float"),
        pytest.param("true", True, id="true"),
        pytest.param("False", False, id="false"),
        pytest.param("~", None, id="null"),
    ],
)
def test_scalars_are_read_the_json_way(scalar: str, expected: Any) -> None:
    """Only YAML 1.2 core types resolve; YAML 1.1 surprises stay the text written."""
    doc, found = parse_yaml(f"value: {scalar}\n")
    assert found == []
    assert doc["value"] == expected
    assert type(doc["value"]) is type(expected)


def test_unquoted_aspect_ratio_means_what_it_says(tmp_path: Path) -> None:
    """``aspect_ratio: 16:9`` unquoted is the string "16:9", not 969."""
    manifest = load(tmp_path, ONE + "  - {prompt: a, aspect_ratio: 16:9}\n  - prompt: no\n")
    assert [job.aspect_ratio for job in manifest.jobs] == ["16:9", None]
    assert manifest.jobs[1].prompt == "no"


def test_duplicate_keys_are_errors_with_both_lines(tmp_path: Path) -> None:
    """A key given twice is reported at the second, naming the first line."""
    text = problems(tmp_path, ONE + "  - prompt: a\n    duration: 4\n    duration: 8\n")
    assert "m.yaml:6:5: duplicate key 'duration' (first at line 5)" in text


def test_merge_keys_and_x_anchors_work(tmp_path: Path) -> None:
    """Anchors under ``x-`` keys and ``<<:`` merges let a user share a template."""
    text = (
        "version: 1\nx-pro: &pro {model: sora-2-pro, resolution: 1080p}\njobs:\n"
        "  - <<: *pro\n    prompt: merged\n    resolution: 720p\n"
    )
    (job,) = load(tmp_path, text).jobs
    assert (job.model, job.resolution) == ("sora-2-pro", "720p")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"", "1:1: the file is empty", id="empty"),
        pytest.param(b"  \n\n", "1:1: the file is empty", id="blank"),
        pytest.param(b"\xff\xfev\x00", "UTF-16", id="utf16"),
        pytest.param(b"version: 1\nname: caf\xe9\n", "2:10: the file is not UTF-8", id="latin1"),
        pytest.param(b"just text\n", "1:1: expected a mapping (key: value), got text", id="scalar"),
        pytest.param(b"version: [1\n", "while parsing a flow sequence", id="syntax"),
        pytest.param(b"version: 1\njobs: !!binary aGk=\n", "'!!binary' is not supported", id="tag"),
        pytest.param(b"version: 1e999\n", "is not a usable number", id="huge-float"),
        pytest.param(b"version: " + b"9" * 5000 + b"\n", "is not a usable number", id="huge-int"),
        pytest.param(b"? [a]\n: b\n", "a key must be plain text", id="complex-key"),
    ],
)
def test_yaml_hazards_are_diagnostics(tmp_path: Path, content: bytes, fragment: str) -> None:
    """Unreadable or surprising files give a located message, never a traceback."""
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        load_manifests([str(path)])
    assert fragment in str(caught.value)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A BOM (Windows editors) is not part of the first key."""
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (ONE + "  - prompt: a\n").encode())
    (manifest,) = load_manifests([str(path)])
    assert len(manifest.jobs) == 1


def test_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes beyond MAX_MANIFEST_BYTES are never parsed."""
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 64)
    text = problems(tmp_path, ONE + "".join(f"  - prompt: take {i}\n" for i in range(10)))
    assert "larger than the" in text


def test_the_size_limit_admits_the_most_jobs_with_realistic_prompts(tmp_path: Path) -> None:
    """MAX_JOBS entries, each an id and a 200-character prompt, pass the file-size limit."""
    prompt = ("a lighthouse in a storm at dusk, waves on the rocks, " * 4)[:200]
    entries = "".join(f"  - id: job-{i:06d}\n    prompt: {prompt}\n"
                      for i in range(manifest_module.MAX_JOBS))
    path = tmp_path / "most.yaml"
    path.write_text(ONE + entries, encoding="utf-8")
    loader = manifest_module._FileLoader(str(path))
    assert loader._read() is not None, loader.reporter.trim()


def test_missing_file_is_a_diagnostic(tmp_path: Path) -> None:
    """A path that does not exist is reported like any other problem."""
    with pytest.raises(ManifestError) as caught:
        load_manifests([str(tmp_path / "nope.yaml")])
    assert "cannot read the manifest" in str(caught.value)


# --- expansion and identity -------------------------------------------------------------------


def test_defaults_fill_in_and_entries_win(tmp_path: Path) -> None:
    """Effective job = defaults < entry; omitted fields stay None (the API's default)."""
    text = (
        "version: 1\ndefaults: {model: sora-2, duration: 8}\njobs:\n"
        "  - prompt: a\n  - prompt: b\n    duration: 12\n"
    )
    a, b = load(tmp_path, text).jobs
    assert (a.model, a.duration, a.resolution, a.aspect_ratio) == ("sora-2", 8, None, None)
    assert b.duration == 12


def test_an_entry_image_replaces_the_default_image(tmp_path: Path) -> None:
    """image or image_urls on an entry replaces both image defaults; [] removes one."""
    text = (
        "version: 1\ndefaults: {model: sora-2, image_urls: ['https://e.com/a.png']}\njobs:\n"
        "  - prompt: default\n"
        "  - {prompt: other, image: 'https://e.com/b.jpg'}\n"
        "  - {prompt: none, image_urls: []}\n"
    )
    images = [job.image_url for job in load(tmp_path, text).jobs]
    assert images == ["https://e.com/a.png", "https://e.com/b.jpg", None]


def test_job_records_where_it_came_from(tmp_path: Path) -> None:
    """manifest is the path as given, manifest_name the name (else stem), line the entry's."""
    path = write(tmp_path, ONE + "  - prompt: a\n\n  - id: b\n    prompt: b\n", "batch.yaml")
    (manifest,) = load_manifests([path])
    assert manifest.name == "batch"
    assert [(job.manifest, job.manifest_name, job.line) for job in manifest.jobs] == [
        (path, "batch", 4),
        (path, "batch", 6),
    ]
    named = load(tmp_path, "name: waterfalls\n" + ONE + "  - prompt: a\n")
    assert named.name == named.jobs[0].manifest_name == "waterfalls"


def test_prompt_is_trimmed_and_whole_floats_become_ints(tmp_path: Path) -> None:
    """A block scalar's newline is not part of the prompt; duration 8.0 is sent as 8."""
    (job,) = load(tmp_path, ONE + "  - prompt: |\n      two\n      lines\n    duration: 8.0\n").jobs
    assert job.prompt == "two\nlines"
    assert job.duration == 8
    assert type(job.duration) is int


def test_default_id_is_stable_and_position_independent(tmp_path: Path) -> None:
    """Without id, a job is named by its request: reordering keeps every name."""
    forward = load(tmp_path, ONE + "  - prompt: A cat surfing\n  - prompt: 한국어 프롬프트\n")
    backward = load(tmp_path, ONE + "  - prompt: 한국어 프롬프트\n  - prompt: A cat surfing\n")
    assert {j.job_id for j in forward.jobs} == {j.job_id for j in backward.jobs}
    cat, korean = forward.jobs
    assert cat.job_id == f"a-cat-surfing-{cat.fingerprint[:12]}"
    assert korean.job_id == korean.fingerprint[:12]


def test_default_id_changes_with_the_request(tmp_path: Path) -> None:
    """A different effective request (here via defaults) is a different job."""
    text = "version: 1\ndefaults: {model: sora-2, duration: %d}\njobs: [{prompt: a}]"
    four, eight = load(tmp_path, text % 4), load(tmp_path, text % 8)
    assert four.jobs[0].job_id != eight.jobs[0].job_id


@pytest.mark.parametrize("given_id", ["", "id: take, "], ids=["default-id", "explicit-id"])
def test_raising_repeat_adds_exactly_the_new_takes(tmp_path: Path, given_id: str) -> None:
    """repeat 1 -> 3 keeps take 1's id and adds id-2 and id-3."""
    once = load(tmp_path, ONE + f"  - {{{given_id}prompt: a}}\n").jobs
    thrice = load(tmp_path, ONE + f"  - {{{given_id}prompt: a, repeat: 3}}\n").jobs
    base = once[0].job_id
    assert [job.job_id for job in thrice] == [base, f"{base}-2", f"{base}-3"]
    assert len({job.idempotency_key for job in thrice}) == 3


def test_repeat_can_be_a_default(tmp_path: Path) -> None:
    """repeat under defaults applies to every entry that does not set its own."""
    text = "version: 1\ndefaults: {model: sora-2, repeat: 2}\n"
    text += "jobs: [{prompt: a}, {prompt: b, repeat: 1}]"
    assert len(load(tmp_path, text).jobs) == 3


def test_matrix_expands_to_the_product_first_key_outermost(tmp_path: Path) -> None:
    """2 prompts x 2 durations = 4 jobs, in order."""
    text = ONE + "  - matrix:\n      prompt: [a, b]\n      duration: [4, 8]\n"
    jobs = load(tmp_path, text).jobs
    assert [(job.prompt, job.duration) for job in jobs] == [("a", 4), ("a", 8), ("b", 4), ("b", 8)]
    assert {job.line for job in jobs} == {4}


def test_matrix_ids_survive_appending_a_value(tmp_path: Path) -> None:
    """With id, each combination is id-<hash of its values>: appending renames nothing."""
    before = load(tmp_path, ONE + "  - id: sky\n    matrix: {prompt: [a, b]}\n").jobs
    after = load(tmp_path, ONE + "  - id: sky\n    matrix: {prompt: [c, a, b]}\n").jobs
    assert {job.job_id for job in before} < {job.job_id for job in after}
    assert all(job.job_id.startswith("sky-") and len(job.job_id) == 16 for job in after)


def test_matrix_image_urls_accepts_single_urls(tmp_path: Path) -> None:
    """matrix.image_urls items may be one URL each, or an image_urls list."""
    text = ONE + "  - prompt: a\n    matrix:\n      image_urls: [https://e.com/a.png, [https://e.com/b.png]]\n"
    jobs = load(tmp_path, text).jobs
    assert [job.image_url for job in jobs] == ["https://e.com/a.png", "https://e.com/b.png"]


def test_matrix_errors_point_at_the_value_to_edit(tmp_path: Path) -> None:
    """A cross-field error in one combination names the entry's field, once."""
    text = ONE + "  - resolution: 1080p\n    matrix:\n      prompt: [a, b, c]\n"
    report = problems(tmp_path, text)
    assert report.count("'1080p' is not allowed for model sora-2") == 1
    assert "m.yaml:4:17: jobs[0].resolution:" in report


def test_every_problem_is_reported_sorted(tmp_path: Path) -> None:
    """One run lists all problems of all files, by file and line."""
    first = write(tmp_path, ONE + "  - prompt: a\n    duration: 5\n  - prompt: b\n    seconds: 4\n")
    second = write(tmp_path, "version: 1\njobs: [{prompt: a}]\n", "other.yaml")
    with pytest.raises(ManifestError) as caught:
        load_manifests([second, first])
    where = [(Path(d.file).name, d.line) for d in caught.value.diagnostics]
    assert where == [("m.yaml", 5), ("m.yaml", 7), ("other.yaml", 2)]


def test_too_many_problems_are_counted_not_printed(tmp_path: Path) -> None:
    """Past MAX_DIAGNOSTICS the rest of a file's problems are one summary line."""
    entries = "".join(f"  - {{prompt: p{i}, duration: 5}}\n" for i in range(150))
    with pytest.raises(ManifestError) as caught:
        load_manifests([write(tmp_path, ONE + entries)])
    diagnostics = caught.value.diagnostics
    assert len(diagnostics) == manifest_module.MAX_DIAGNOSTICS + 1
    assert "and 50 more; 150 problems found" in diagnostics[-1].message


def test_same_id_in_two_manifests_is_an_error(tmp_path: Path) -> None:
    """Manifests run together share a ledger: an id may appear in only one of them."""
    first = write(tmp_path, ONE + "  - {id: shared, prompt: a}\n", "a.yaml")
    second = write(tmp_path, ONE + "  - {id: shared, prompt: b}\n", "b.yaml")
    with pytest.raises(ManifestError) as caught:
        load_manifests([first, second])
    assert f"job_id 'shared' is also used by {first}:4" in str(caught.value)


def test_the_same_file_twice_is_loaded_once(tmp_path: Path) -> None:
    """Naming a manifest twice (e.g. by a glob) does not double its jobs."""
    path = write(tmp_path, ONE + "  - prompt: a\n")
    assert len(load_manifests([path, path])) == 1


def test_prices_block_is_kept(tmp_path: Path) -> None:
    """A manifest's prices: block becomes Manifest.prices (floats)."""
    manifest = load(tmp_path, "prices: {sora-2-pro/1080p: 1}\n" + ONE + "  - prompt: a\n")
    assert manifest.prices == {"sora-2-pro/1080p": 1.0}


# --- local images -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_png(), id="png"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\0" * 20, id="jpeg"),
        pytest.param(b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 8, id="webp"),
    ],
)
def test_local_image_is_checked_and_hashed(tmp_path: Path, content: bytes) -> None:
    """image: a relative path -> absolute image_file, content SHA-256, no image_url."""
    (tmp_path / "stills").mkdir()
    (tmp_path / "stills" / "cat.png").write_bytes(content)
    (job,) = load(tmp_path, ONE + "  - {prompt: a, image: stills/cat.png}\n").jobs
    assert job.image_file == str((tmp_path / "stills" / "cat.png").resolve())
    assert job.image_sha256 == hashlib.sha256(content).hexdigest()
    assert job.image_url is None
    assert "image_urls" not in job.body()


def test_local_image_identity_is_its_content(tmp_path: Path) -> None:
    """Same bytes under another name: same request; changed bytes: another job."""
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png())
    (tmp_path / "c.png").write_bytes(_png(3, 3))
    text = ONE + "  - {id: a, prompt: x, image: a.png}\n  - {id: b, prompt: x, image: b.png}\n"
    text += "  - {id: c, prompt: x, image: c.png}\n"
    a, b, c = load(tmp_path, text).jobs
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        pytest.param("gif", "is not a JPEG, PNG or WebP image", id="gif"),
        pytest.param("dir", "is not a file", id="directory"),
        pytest.param("big", "the model takes at most 10 MB", id="too-big"),
    ],
)
def test_unusable_local_images_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str, fragment: str
) -> None:
    """A GIF, a folder, or a file over the size limit is an error before anything is sent."""
    target = tmp_path / "still.png"
    if setup == "dir":
        target.mkdir()
    elif setup == "big":
        target.write_bytes(_png() + bytes(10_000_001))  # sora-2's own limit is 10 MB
    else:
        target.write_bytes(b"GIF89a" + b"\0" * 20)
    report = problems(tmp_path, ONE + "  - prompt: a\n    image: still.png\n")
    assert "m.yaml:5:12: jobs[0].image:" in report
    assert fragment in report


def test_a_missing_image_is_reported_with_other_problems(tmp_path: Path) -> None:
    """The file check runs even when the same job has another error."""
    report = problems(tmp_path, ONE + "  - prompt: a\n    duration: 3\n    image: gone.png\n")
    assert "duration: 3 is not allowed" in report
    assert "image file" in report and "does not exist" in report


# --- the schema -------------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
        return {**_resolve(schema, target), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _properties(schema: dict[str, Any], node: Any, where: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("properties", "patternProperties"):
                found += [(f"{where}.{name}", sub) for name, sub in value.items()]
            found += _properties(schema, value, f"{where}.{key}")
    elif isinstance(node, list):
        for item in node:
            found += _properties(schema, item, where)
    return found


def test_schema_is_valid_and_identified() -> None:
    """The shipped schema passes its metaschema and has $id, title and examples."""
    schema = load_schema()
    Draft202012Validator.check_schema(composed_schema(load_catalog()))
    manifest_validators()
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["$id"] and schema["title"] and schema["examples"]
    assert json.loads(schema_text(MANIFEST_SCHEMA)) == schema


def test_every_property_is_documented() -> None:
    """Each property (through its $ref) has a title, a description and examples."""
    schema = load_schema()
    for where, node in _properties(schema, schema):
        if {"if", "then"} & set(where.split(".")):
            continue  # a rule's condition or consequence, not a key a user writes
        resolved = _resolve(schema, node)
        assert resolved.get("title") and resolved.get("description"), where
        assert resolved.get("examples"), where


def test_schema_examples_validate() -> None:
    """The schema's own examples are valid manifests."""
    document = manifest_validators().document
    for example in load_schema()["examples"]:
        assert list(document.iter_errors(example)) == []


def test_load_schema_returns_a_fresh_copy() -> None:
    """Callers may change what load_schema returns without harming the next caller."""
    load_schema()["title"] = "changed"
    assert load_schema()["title"] == "apimart-batch manifest"


# --- never a traceback ------------------------------------------------------------------------

YAMLISH = st.text(alphabet=" \n\t-:[]{}&*!|>'\"#%@`,?<=~abcxyz0129._/\\é한🎬\x00\x85", max_size=200)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        ["sora-2", "sora-2-pro", "720p", "1080p", "16:9", "portrait", "./x.png",
         "https://e.com/a.png", "ftp://x", "", " ", "no", 4, 8, 20, 0, -1]
    ),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=9), inner),
    max_leaves=12,
)
FIELDS = ["id", "model", "prompt", "duration", "resolution", "aspect_ratio", "image_urls",
          "image", "repeat", "matrix", "resolutoin"]  # fmt: skip
ENTRIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)
MANIFESTS = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1"])},
    optional={
        "name": VALUES,
        "defaults": st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4) | VALUES,
        "prices": st.dictionaries(st.sampled_from(["sora-2/720p", "x"]), VALUES, max_size=2),
        "jobs": st.lists(ENTRIES, max_size=4) | VALUES,
    },
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the generated manifests of this module."""
    return tmp_path_factory.mktemp("fuzz")


def _load_or_refuse(path: Path) -> None:
    try:
        load_manifests([str(path)])
    except ManifestError as exc:
        assert exc.diagnostics
        assert all(d.line >= 1 and d.col >= 1 for d in exc.diagnostics)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=YAMLISH)
def test_random_yamlish_text_never_crashes(scratch: Path, text: str) -> None:
    """Any text gives a manifest or a ManifestError, never another exception."""
    path = scratch / "text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_refuse(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=MANIFESTS)
def test_random_manifests_never_crash(scratch: Path, document: dict[str, Any]) -> None:
    """Manifest-shaped documents with random values never crash the validator."""
    path = scratch / "doc.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    _load_or_refuse(path)


# Control characters are refused by the YAML loader itself (tested apart).
PROMPTS = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp")), min_size=1, max_size=20
).filter(
    str.strip
)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(PROMPTS, min_size=1, max_size=4, unique_by=str.strip),
    durations=st.lists(st.sampled_from([4, 8, 12, 16, 20]), min_size=1, max_size=3, unique=True),
    repeat=st.integers(min_value=1, max_value=3),
)
def test_valid_matrices_expand_to_unique_ids(
    scratch: Path, prompts: list[str], durations: list[int], repeat: int
) -> None:
    """A valid matrix yields len(prompts) x len(durations) x repeat jobs, all named apart."""
    document = {
        "version": 1,
        "defaults": {"model": "sora-2"},
        "jobs": [{"repeat": repeat, "matrix": {"prompt": prompts, "duration": durations}}],
    }
    path = scratch / "matrix.yaml"
    # JSON is YAML 1.2, as the loader reads it; PyYAML would write '0E0' unquoted (YAML 1.1).
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    (manifest,) = load_manifests([str(path)])
    ids = [job.job_id for job in manifest.jobs]
    assert len(ids) == len(set(ids)) == len(prompts) * len(durations) * repeat


_VALUES = st.one_of(
    st.sampled_from(["", " ", "a", "job-1", "-bad", "x" * 101, "sora-2", "16:9"]),
    st.integers(-2, 3), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.none(), st.lists(st.sampled_from(["a", " ", "", 1, None]), max_size=3),
)
_MATRIX = st.dictionaries(st.sampled_from(["prompt", "model", "image", "duration", "id"]),
                          st.one_of(_VALUES, st.lists(_VALUES, max_size=3)), max_size=3)
_ENTRIES = st.dictionaries(
    st.sampled_from(["id", "model", "prompt", "image", "image_urls", "repeat", "matrix",
                     "version", "name", "duration", "size"]),
    st.one_of(_VALUES, _MATRIX), max_size=5,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ENTRIES)
def test_an_entry_the_fast_check_accepts_has_no_schema_problem(entry: dict[str, Any]) -> None:
    """entry_ok, which lets entries skip the document's jsonschema pass, never lets a bad one by."""
    validators = manifest_validators()
    if validators.entry_ok(entry):
        doc = {"version": 1, "jobs": [entry]}
        assert list(validators.document.iter_errors(doc)) == []


def test_the_fast_check_accepts_plain_entries() -> None:
    """The shipped entry schema compiles to a real check (else every entry takes the slow way)."""
    ok = manifest_validators().entry_ok
    assert ok({"id": "a-1", "prompt": "a cat", "duration": 5})
    assert ok({"id": "m", "matrix": {"prompt": ["a", "b"], "duration": [4, 8]}})
    assert not ok({"id": "a", "prompt": "a cat", "version": 1})
    assert not ok({"image": "a.png", "image_urls": ["b.png"]})


def test_problems_of_many_entries_point_at_each_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With most entries fine, each bad entry's problem is what a full schema pass says."""
    entries = "".join(f"  - id: ok-{i}\n    prompt: fine\n" for i in range(5))
    text = (ONE + entries + "  - id: -bad\n    prompt: fine\n" + entries.replace("ok-", "ok2-")
            + "  - prompt: fine\n    jobs: 1\n")
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")

    def diagnostics() -> list[Any]:
        with pytest.raises(ManifestError) as caught:
            load_manifests([str(path)])
        return list(caught.value.diagnostics)

    found = diagnostics()
    assert [(d.line, d.col) for d in found[:2]] == [(14, 9), (27, 5)], found
    assert "'-bad' is not a valid" in found[0].message
    assert "'jobs' is not allowed here" in found[1].message
    slow = replace(manifest_validators(), entry_ok=lambda _: False)
    monkeypatch.setattr(manifest_module, "manifest_validators", lambda: slow)
    assert diagnostics() == found


def test_the_fast_check_trusts_only_the_then_side_of_if() -> None:
    """if/then: sure when "if" surely holds and "then" accepts; never sure on the "else" side."""
    ok = surely_valid({"if": {"type": "array"}, "then": {"items": {"type": "string"}},
                       "else": {"type": "object"}})
    assert ok(["a", "b"])
    assert not ok(["a", 1])
    assert not ok({"file": "p.txt"})  # valid by "else", but the fast check does not decide it
    assert not ok(3)
