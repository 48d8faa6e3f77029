"""Editors and pre-commit: the examples name a schema an editor can load, the hook runs validate.

Editors (yaml-language-server, VS Code) resolve a ``$ref`` by fetching its URI, so they
cannot follow the ``urn:`` references of ``schemas/manifest.schema.json`` (nor find the
``$id``-embedded resources of ``apimart-batch schema``). The examples' modeline therefore
names ``schemas/manifest.editor.schema.json``: the same schema with every reference a
pointer into the file itself. It is generated; when the catalog changes, regenerate it with
``python tests/test_editor_integration.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from jsonschema import Draft202012Validator

from runner.manifest import bundled_schema, load_catalog, load_manifests, manifest_validators

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
EDITOR_SCHEMA = ROOT / "schemas" / "manifest.editor.schema.json"
MODELINE = re.compile(r"# yaml-language-server: \$schema=(\S+)")
HOOKS = ROOT / ".pre-commit-hooks.yaml"


def editor_schema() -> dict[str, Any]:
    """The runner's bundled manifest schema with every ``$ref`` a pointer into the file.

    Each catalog schema embedded under ``$defs`` loses its ``$id`` (and ``$schema``), so
    that ``#/...`` means the file's root everywhere; references into it are rewritten to
    its place (``urn:...:sora-2#/$defs/x`` -> ``#/$defs/catalog:sora-2/$defs/x``).
    """
    schema = bundled_schema(load_catalog())
    homes = {node["$id"]: f"#/$defs/{key}" for key, node in schema["$defs"].items()
             if isinstance(node, Mapping) and "$id" in node}  # fmt: skip
    rebased = {key: value for key, value in schema.items() if key != "$defs"}
    rebased = _rebase(rebased, "#", homes)
    rebased["$defs"] = {
        key: _rebase(node, homes.get(node.get("$id"), "#") if isinstance(node, Mapping) else "#",
                     homes)
        for key, node in schema["$defs"].items()
    }
    return rebased


def _rebase(node: Any, home: str, homes: Mapping[str, str]) -> Any:
    """``node`` (inside the resource at ``home``) with its references made file-local."""
    if isinstance(node, list):
        return [_rebase(item, home, homes) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            uri, _, fragment = value.partition("#")
            base = homes[uri] if uri else home  # KeyError: a reference to outside the bundle
            out[key] = base + fragment if base != "#" else "#" + fragment
        elif key in ("$id", "$schema") and home != "#":
            continue
        else:
            out[key] = _rebase(value, home, homes)
    return out


def write_editor_schema() -> None:
    """Regenerate ``schemas/manifest.editor.schema.json`` from the runner's schema."""
    text = json.dumps(editor_schema(), indent=2, ensure_ascii=False) + "\n"
    EDITOR_SCHEMA.write_text(text, encoding="utf-8")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _refs(item)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)


def _ids(node: Any, top: bool = True) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _ids(item, top=False)
    elif isinstance(node, Mapping):
        if "$id" in node and not top:
            yield str(node["$id"])
        for key, value in node.items():
            if key not in ("enum", "const", "examples", "default"):
                yield from _ids(value, top=False)


def _pointer(document: Any, ref: str) -> Any:
    """The node a ``#/a/b`` reference names (KeyError/IndexError when there is none)."""
    node = document
    for part in ref.removeprefix("#").split("/")[1:]:
        step = unquote(part).replace("~1", "/").replace("~0", "~")
        node = node[int(step)] if isinstance(node, list) else node[step]
    return node


def _modeline_target(example: Path) -> Path:
    match = MODELINE.fullmatch(example.read_text(encoding="utf-8").splitlines()[0])
    assert match, f"{example.name}: line 1 is not '# yaml-language-server: $schema=PATH'"
    return example.parent / match.group(1)


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The committed editor schema."""
    document: dict[str, Any] = json.loads(EDITOR_SCHEMA.read_text(encoding="utf-8"))
    return document


# --- the modeline ------------------------------------------------------------------------------


def test_there_are_examples() -> None:
    """The parametrized tests below have files to run on."""
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_names_the_editor_schema_on_line_1(example: Path) -> None:
    """Line 1 is the modeline, with a relative path to the editor schema that exists."""
    line = example.read_text(encoding="utf-8").splitlines()[0]
    match = MODELINE.fullmatch(line)
    assert match, f"{example.name}: line 1 is {line!r}"
    assert not Path(match.group(1)).is_absolute()
    target = _modeline_target(example)
    assert target.is_file()
    assert target.resolve() == EDITOR_SCHEMA.resolve()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_modeline_schema_validates_its_example(example: Path) -> None:
    """The schema the modeline names accepts the example, as the runner's own checks do."""
    schema = json.loads(_modeline_target(example).read_text(encoding="utf-8"))
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    errors = [error.message for error in Draft202012Validator(schema).iter_errors(document)]
    assert errors == []
    assert list(manifest_validators().document.iter_errors(document)) == []
    (manifest,) = load_manifests([str(example)])
    assert manifest.jobs


# --- the editor schema -------------------------------------------------------------------------


def test_editor_schema_is_in_step_with_the_runner(shipped: dict[str, Any]) -> None:
    """The committed file is what the runner's schema and catalog generate today."""
    assert shipped == editor_schema(), (
        f"{EDITOR_SCHEMA.relative_to(ROOT)} is out of step with schemas/: regenerate it with "
        "'python tests/test_editor_integration.py'"
    )


def test_editor_schema_is_valid_and_self_contained(shipped: dict[str, Any]) -> None:
    """A valid 2020-12 schema whose every $ref is a pointer to a node of the file itself."""
    Draft202012Validator.check_schema(shipped)
    refs = sorted(set(_refs(shipped)))
    assert any("catalog:" in ref for ref in refs)  # the models are reached, not left out
    outside = [ref for ref in refs if not ref.startswith("#/")]
    assert outside == []
    for ref in refs:
        assert _pointer(shipped, ref) is not None, ref
    assert list(_ids(shipped)) == []  # no embedded resource changes what '#' means


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("version: 2\njobs: [{prompt: a}]\n", "1", id="wrong-version"),
        pytest.param("version: 1\n", "jobs", id="no-jobs"),
        pytest.param("version: 1\njobs: []\n", "[]", id="empty-jobs"),
        pytest.param("version: 1\njobs: [{prompt: a}]\nbogus: 1\n", "bogus", id="unknown-key"),
        pytest.param("version: 1\njobs: [{prompt: a, version: 1}]\n", "version", id="misplaced"),
    ],
)
def test_editor_schema_refuses_what_the_runner_refuses(
    shipped: dict[str, Any], text: str, fragment: str
) -> None:
    """Document-level mistakes show in the editor as they do in the runner's first check."""
    document = yaml.safe_load(text)
    editor = [error.message for error in Draft202012Validator(shipped).iter_errors(document)]
    runner = list(manifest_validators().document.iter_errors(document))
    assert editor
    assert runner
    assert any(fragment in message for message in editor), editor


@pytest.mark.slow
def test_validate_accepts_every_example() -> None:
    """``apimart-batch validate jobs/*.yaml`` exits 0 and names each file."""
    done = subprocess.run([*_apimart_batch(), "validate", *map(str, EXAMPLES)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert len(done.stdout.splitlines()) == len(EXAMPLES)


# --- pre-commit --------------------------------------------------------------------------------


def _hook() -> dict[str, Any]:
    hooks = yaml.safe_load(HOOKS.read_text(encoding="utf-8"))
    assert isinstance(hooks, list)
    assert len(hooks) == 1
    hook: dict[str, Any] = hooks[0]
    return hook


def test_pre_commit_hook_parses() -> None:
    """One hook, ``apimart-batch-validate``, with every key pre-commit requires."""
    hook = _hook()
    assert hook["id"] == "apimart-batch-validate"
    assert hook["name"]
    assert hook["entry"] == "apimart-batch validate"
    assert hook["language"] == "python"
    assert "files:" in hook["description"]


@pytest.mark.parametrize(
    ("path", "matched"),
    [
        ("jobs/example.yaml", True),
        ("jobs/nightly.yml", True),
        ("video/jobs/batch.yaml", True),
        ("jobs/sub/batch.yaml", True),
        ("jobs/example.mock.ledger.csv", False),
        ("jobs/stills/dawn.png", False),
        ("schemas/manifest.schema.json", False),
        (".pre-commit-config.yaml", False),
        ("myjobs/x.yaml", False),
        ("jobs/example.yaml.bak", False),
    ],
)
def test_pre_commit_hook_files_pattern(path: str, matched: bool) -> None:
    """The default ``files:`` picks YAML manifests under a jobs/ folder and nothing else."""
    assert bool(re.search(_hook()["files"], path)) is matched


def _apimart_batch() -> list[str]:
    """The console script the hook's entry names (or the module it runs, if not installed)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "apimart-batch" in scripts["project"]["scripts"]
    beside = Path(sys.executable).with_name("apimart-batch")
    found = str(beside) if beside.is_file() else shutil.which("apimart-batch")
    return [found] if found else [sys.executable, "-m", "runner"]


@pytest.mark.slow
def test_pre_commit_hook_entry_is_a_subcommand() -> None:
    """The entry's command runs: ``apimart-batch validate --help`` exits 0."""
    program, *words = _hook()["entry"].split()
    assert program == "apimart-batch"
    done = subprocess.run([*_apimart_batch(), *words, "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: apimart-batch validate" in done.stdout


if __name__ == "__main__":
    write_editor_schema()
    print(f"wrote {EDITOR_SCHEMA.relative_to(ROOT)}")
