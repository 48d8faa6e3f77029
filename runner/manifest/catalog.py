"""The model catalog: one JSON Schema per APIMart video model, read from ``schemas/models/``.

Each file describes the request body of ``POST /v1/videos/generations`` for its model ids,
in the API's own field names, and carries an ``x-apimart`` block of metadata (its source
page and the date it was read, what it takes, the API's defaults, the response shape).
``schemas/models/README.md`` is the format. No Python code names a model: adding one is a
new schema file plus a price entry in ``schemas/prices.json``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from referencing import Registry, Resource

from runner.errors import RunnerError
from runner.manifest.schemas import (
    MANIFEST_SCHEMA,
    checked_validator,
    inline,
    load_schema,
    schema_dir,
    surely_valid,
)

COMMON_ID = "urn:apimart-batch:schema:common"
#: The common ideas whose field names differ between models (``x-apimart-aka``).
COMMON_FIELDS = ("duration", "resolution", "aspect_ratio")
#: The upload endpoint's own limit (apimart-api.md §5), for models whose page gives none.
UPLOAD_MAX_BYTES = 20 * 1024 * 1024

Pointer = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model id of the catalog: its schema's validator and its metadata.

    Attributes:
        id: the model id sent as ``model``.
        file: the schema file's name (several ids may share one file).
        defaults: what the API renders when a field is omitted, by API field name.
        fields: which API field holds each of :data:`COMMON_FIELDS` for this model
            (``{"resolution": "mode", "aspect_ratio": "size"}``); absent when it has none.
        uploads: patterns of the fields that take images (``("image_urls", "*")``).
        aliases: for each API field of the model, what other models call it.
        dropped: fields an earlier revision of the model's page had, with what to say.
    """

    id: str
    file: str
    title: str
    description: str
    family: str
    source: str
    read: str
    response: str
    takes: tuple[str, ...]
    defaults: Mapping[str, Any]
    fields: Mapping[str, str]
    uploads: tuple[Pointer, ...]
    aliases: Mapping[str, tuple[str, ...]]
    dropped: Mapping[str, str]
    max_image_bytes: int
    schema: Mapping[str, Any] = field(repr=False)
    validator: Validator = field(repr=False, compare=False)

    def enum(self, name: str) -> list[Any]:
        """The allowed values of one API field (empty when it is not an enum)."""
        prop = self.schema.get("properties", {}).get(name, {})
        return list(prop.get("enum", []))


class Catalog(Mapping[str, ModelSpec]):
    """Every model id of the catalog, in file order; a read-only mapping id -> spec."""

    def __init__(self, specs: Mapping[str, ModelSpec], registry: Registry[Any]) -> None:
        self._specs = dict(specs)
        self.registry = registry

    def __getitem__(self, model: str) -> ModelSpec:
        return self._specs[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def nearest(self, model: str, n: int = 3) -> list[str]:
        """Catalog ids that look like ``model`` (case and punctuation aside), best first."""
        folded = {_fold(m): m for m in self._specs}
        close = difflib.get_close_matches(_fold(model), list(folded), n=n, cutoff=0.5)
        return [folded[c] for c in close]

    def who_has(self, name: str) -> list[str]:
        """Model ids whose schema has a field ``name``."""
        return [m for m, spec in self._specs.items() if name in spec.schema.get("properties", {})]


def _fold(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


@lru_cache(maxsize=4)
def load_catalog(folder: Path | None = None) -> Catalog:
    """Read and check every schema under ``folder`` (default: the shipped ``models/``).

    The shipped schemas are checked against their metaschema by the tests, not on every
    start (that took most of a small ``validate``); a folder given here is checked.

    Raises:
        RunnerError: a schema file is unreadable, invalid JSON Schema, or claims an id
            another file claims (a broken catalog is our bug, reported as such).
    """
    check = folder is not None
    folder = folder or schema_dir() / "models"
    documents: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if check:
                Draft202012Validator.check_schema(document)
        except (OSError, ValueError, SchemaError) as exc:
            msg = f"{path.name}: the model catalog is broken: {getattr(exc, 'message', exc)}"
            raise RunnerError(msg) from exc
        documents.append((path, document))
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for _, doc in documents if "$id" in doc
    )
    specs: dict[str, ModelSpec] = {}
    for path, document in documents:
        meta = document.get("x-apimart")
        if not isinstance(meta, dict):
            continue  # common.json and other shared pieces
        validator = Draft202012Validator(document, registry=registry)
        for model in meta.get("models", []):
            if model in specs:
                msg = f"{path.name}: model {model!r} is also described by {specs[model].file}"
                raise RunnerError(msg)
            specs[model] = _spec(model, path.name, document, meta, validator, registry)
    return Catalog(specs, registry)


def _spec(
    model: str,
    file: str,
    document: dict[str, Any],
    meta: dict[str, Any],
    validator: Validator,
    registry: Registry[Any],
) -> ModelSpec:
    properties: dict[str, Any] = document.get("properties", {})
    aliases = {name: tuple(prop.get("x-apimart-aka", ())) for name, prop in properties.items()}
    fields: dict[str, str] = {}
    for common in COMMON_FIELDS:
        name = common if common in properties else next(
            (name for name, aka in aliases.items() if common in aka), None
        )
        if name is not None:
            fields[common] = name
    return ModelSpec(
        id=model,
        file=file,
        title=str(document.get("title", model)),
        description=str(document.get("description", "")),
        family=str(meta.get("family", "")),
        source=str(meta.get("source", "")),
        read=str(meta.get("read", "")),
        response=str(meta.get("response", "array")),
        takes=tuple(meta.get("takes", ())),
        defaults=dict(meta.get("defaults", {})),
        fields=fields,
        uploads=tuple(dict.fromkeys(_upload_paths(document, document, registry, ()))),
        aliases=aliases,
        dropped=dict(meta.get("dropped", {})),
        max_image_bytes=int(meta.get("max_image_bytes", UPLOAD_MAX_BYTES)),
        schema=document,
        validator=validator,
    )


def _upload_paths(
    node: Any, root: Mapping[str, Any], registry: Registry[Any], here: Pointer, depth: int = 0
) -> Iterator[Pointer]:
    """Where a body may hold an image to upload: ``properties``/``items`` marked for upload."""
    if not isinstance(node, Mapping) or depth > 16:
        return
    ref = node.get("$ref")
    if isinstance(ref, str):
        base = root.get("$id", "") if ref.startswith("#") else ""
        target = _resolve(registry, base + ref)
        yield from _upload_paths(target, root, registry, here, depth + 1)
    if node.get("x-apimart-upload") == "image":
        yield here
    properties = node.get("properties", {})
    for name, sub in properties.items() if isinstance(properties, Mapping) else ():
        yield from _upload_paths(sub, root, registry, (*here, name), depth + 1)
    if "items" in node:
        yield from _upload_paths(node["items"], root, registry, (*here, "*"), depth + 1)


def _resolve(registry: Registry[Any], ref: str) -> Any:
    try:
        return registry.resolver().lookup(ref).contents
    except Exception:  # noqa: BLE001 - an unresolvable $ref is reported by validation itself
        return None


def upload_pointers(spec: ModelSpec, request: Mapping[str, Any]) -> Iterator[tuple[Pointer, Any]]:
    """The concrete places in ``request`` that take an image, with their values."""
    for pattern in spec.uploads:
        yield from _match(request, pattern, ())


def _match(node: Any, pattern: Pointer, here: Pointer) -> Iterator[tuple[Pointer, Any]]:
    if not pattern:
        yield here, node
        return
    step, rest = pattern[0], pattern[1:]
    if step == "*" and isinstance(node, list):
        for index, item in enumerate(node):
            yield from _match(item, rest, (*here, index))
    elif isinstance(step, str) and isinstance(node, Mapping) and step in node:
        yield from _match(node[step], rest, (*here, step))


@dataclass(frozen=True, slots=True)
class Validators:
    """What a manifest is checked with: the document, each job by its model, and the catalog."""

    document: Validator
    job: Validator
    unknown_job: Validator
    catalog: Catalog
    #: True only for a ``jobs`` entry that surely passes the document schema's rules for
    #: entries (``surely_valid``): such entries need no jsonschema pass of their own.
    entry_ok: Callable[[Any], bool] = field(default=lambda _: False)


def dispatch(catalog: Catalog) -> list[dict[str, Any]]:
    """The manifest's ``$defs/job`` ``allOf``: each model id picks its schema by ``$ref``."""
    return [
        {
            "if": {"required": ["model"], "properties": {"model": {"const": model}}},
            "then": {"$ref": spec.schema["$id"]},
        }
        for model, spec in catalog.items()
    ]


def composed_schema(catalog: Catalog) -> dict[str, Any]:
    """The manifest schema with ``$defs/job`` built from ``catalog`` (what the runner uses)."""
    schema = load_schema(MANIFEST_SCHEMA)
    schema["$defs"]["job"]["allOf"] = dispatch(catalog)
    return schema


def bundled_schema(catalog: Catalog) -> dict[str, Any]:
    """:func:`composed_schema` with every catalog schema embedded: one self-contained file.

    Draft 2020-12 resolves the ``urn:`` references to the embedded resources by their
    ``$id``, so editors and check-jsonschema need no other file.
    """
    schema = composed_schema(catalog)
    for resource in _documents(catalog):
        # Each embedded resource sits directly under $defs: only there is it a subresource.
        schema["$defs"]["catalog:" + str(resource["$id"]).rsplit(":", 1)[-1]] = resource
    return schema


def _documents(catalog: Catalog) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for spec in catalog.values():
        seen.setdefault(str(spec.schema["$id"]), dict(spec.schema))
    common = catalog.registry.get(COMMON_ID)
    if common is not None:
        seen.setdefault(COMMON_ID, dict(common.contents))
    return list(seen.values())


@lru_cache(maxsize=4)
def manifest_validators(folder: Path | None = None) -> Validators:
    """Validators for a whole manifest document and for one expanded job (``$defs/job``)."""
    catalog = load_catalog(folder)
    schema = composed_schema(catalog)
    cls = checked_validator(schema, MANIFEST_SCHEMA, check=folder is not None)
    inlined = inline(schema, schema.get("$defs", {}))
    registry = catalog.registry.with_resource(schema["$id"], Resource.from_contents(schema))
    return Validators(
        document=cls(inlined),
        job=cls(inlined["$defs"]["job"], registry=registry),
        unknown_job=cls(inlined["$defs"]["unknown_model_job"]),
        catalog=catalog,
        entry_ok=surely_valid(inlined.get("properties", {}).get("jobs", {}).get("items")),
    )
