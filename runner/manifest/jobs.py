"""One combination of one entry -> one validated :class:`~runner.models.Job`.

The job's values are defaults < entry < matrix combination; the ``image`` shorthand is
``image_urls`` of one; local files stand as uploaded URLs while the model's schema judges
the request, and are checked as the images they must be.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.manifest.catalog import ModelSpec, Validators, upload_pointers
from runner.manifest.diagnostics import DocPath, Reporter
from runner.manifest.expand import ENTRY_KEYS
from runner.manifest.images import LocalImages
from runner.manifest.verdict import Verdicts
from runner.manifest.yamlfile import Pos
from runner.models import NO_TAGS, Job, Pointer, Upload

_IMAGE_FIELDS = ("image", "image_urls")
#: Each job key of an entry: its name, the mapping it comes from (None: the matrix), and
#: where it was written (for a matrix value, built per combination).
_Layout = list[tuple[str, Mapping[str, Any] | None, DocPath]]
#: What a local file stands as while the job's request is validated (an upload's URL).
_UPLOADED = "https://upload.apimart.invalid/local-file.png"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class JobBuilder:
    """Builds and validates one manifest's jobs; reports each problem where it was written."""

    def __init__(
        self,
        path: str,
        name: str,
        folder: Path,
        validators: Validators,
        reporter: Reporter,
        *,
        allow_unknown: bool,
    ) -> None:
        self.path = path
        self.name = name
        self.catalog = validators.catalog
        self.allow_unknown = allow_unknown
        self.reporter = reporter
        self.verdicts = Verdicts(validators)
        self.images = LocalImages(folder, reporter)
        self._layouts: dict[int, tuple[dict[str, Any], dict[str, Any], _Layout | None]] = {}

    def build(
        self,
        index: int,
        entry: dict[str, Any],
        defaults: dict[str, Any],
        combo: dict[str, int],
        pos: Pos,
        *,
        job_id: str = "",
    ) -> Job | None:
        """One expanded job (None when invalid; the problems are reported).

        ``job_id``: its id when the entry gives one (else ``JobIds`` names it later).
        """
        here: DocPath = ("jobs", index)
        sources: dict[str, DocPath] = {}
        values: dict[str, Any] = {}
        layout = self._layout(index, entry, defaults, combo)
        if layout is not None:  # every combination of an entry takes its keys alike
            for key, origin, fixed in layout:
                if origin is None:  # the matrix: this combination's value
                    i = combo[key]
                    values[key] = _matrix_value(key, entry["matrix"][key][i])
                    sources[key] = (*here, "matrix", key, i)
                else:
                    values[key], sources[key] = origin[key], fixed
        own_image = any(k in entry or k in combo for k in _IMAGE_FIELDS)
        for key in dict.fromkeys([*defaults, *entry, *combo]) if layout is None else ():
            if key in ENTRY_KEYS:
                continue
            if key in combo:
                values[key] = _matrix_value(key, entry["matrix"][key][combo[key]])
                sources[key] = (*here, "matrix", key, combo[key])
            elif key in entry:
                values[key], sources[key] = entry[key], (*here, key)
            elif not (key in _IMAGE_FIELDS and own_image):
                values[key], sources[key] = defaults[key], ("defaults", key)
            if key in combo and key in entry:
                hint = f"keep one: matrix.{key} lists the values to combine"
                self.reporter.at((*here, key), f"'{key}' is set both here and in matrix", hint)
        if "image" in values:
            if "image_urls" in values:
                hint = "a job has one image list: give either image (a file or URL) or image_urls"
                where = sources["image_urls"]
                self.reporter.at(where, "'image_urls' cannot be combined with 'image'", hint)
                return None
            values["image_urls"] = [values.pop("image")]
            sources["image_urls"] = sources.pop("image")
        for key in [k for k, v in values.items() if v == []]:
            del values[key]  # "[] means none": the field is not sent
        model = values.get("model")
        spec = self.catalog.get(model) if isinstance(model, str) else None
        if isinstance(model, str) and spec is None and not self.allow_unknown:
            self.reporter.at(sources["model"], *self.verdicts.unknown_model(model), late=True)
            return None
        shorthand = any("image" in where for where in (entry, combo, defaults))
        uploads, checked = self._uploads(spec, values, sources, from_image=shorthand)
        problems = self.verdicts.judge(spec, checked)
        for problem in problems:
            path = _source_path(problem.path, sources, here)
            self.reporter.at(path, problem.message, problem.hint, at_key=problem.at_key, late=True)
        if problems or uploads is None:
            return None
        request = {key: _integral(value) for key, value in values.items()}
        if isinstance(request.get("prompt"), str):
            request["prompt"] = request["prompt"].strip()
        return Job(
            job_id=job_id,
            request=request,
            uploads=uploads,
            defaults=spec.defaults if spec else {},
            fields=spec.fields if spec else {},
            manifest=self.path,
            manifest_name=self.name,
            line=pos[0],
            catalogued=spec is not None,
            metadata=merged_metadata(defaults, entry),
        )

    def _layout(
        self, index: int, entry: dict[str, Any], defaults: dict[str, Any], combo: dict[str, int]
    ) -> _Layout | None:
        """Where each of the entry's job keys comes from, in order (as the loop in
        :meth:`build` decides it), or None when a key is both in the entry and its matrix
        (that loop reports it, for every combination)."""
        cached = self._layouts.get(index)
        if cached is not None and cached[0] is entry and cached[1] is defaults:
            return cached[2]
        here: DocPath = ("jobs", index)
        own_image = any(k in entry or k in combo for k in _IMAGE_FIELDS)
        layout: _Layout | None = []
        for key in dict.fromkeys([*defaults, *entry, *combo]):
            if key in ENTRY_KEYS or layout is None:
                continue
            if key in combo and key in entry:
                layout = None
            elif key in combo:
                layout.append((key, None, ()))
            elif key in entry:
                layout.append((key, entry, (*here, key)))
            elif not (key in _IMAGE_FIELDS and own_image):
                layout.append((key, defaults, ("defaults", key)))
        self._layouts = {index: (entry, defaults, layout)}  # entries come one at a time
        return layout

    def _uploads(
        self,
        spec: ModelSpec | None,
        values: dict[str, Any],
        sources: dict[str, DocPath],
        *,
        from_image: bool,
    ) -> tuple[tuple[Upload, ...] | None, dict[str, Any]]:
        """The job's local images (None if one is unusable) and its values as validated.

        A local file stands as an uploaded URL while the request is validated: the schema
        judges what will be sent. Checked even when other fields are wrong, so one run
        reports both. A model outside the catalog uploads only the ``image`` shorthand.
        """
        if spec is not None:
            # Most jobs have none of the fields that take images: skip the walk for them.
            wanted = any(not p or p[0] in values for p in spec.uploads)
            places = list(upload_pointers(spec, values)) if wanted else []
        else:
            images = values.get("image_urls") if from_image else None
            places = [(("image_urls", 0), images[0])] if isinstance(images, list) else []
        uploads: list[Upload] = []
        checked = values
        usable = True
        limit = spec.max_image_bytes if spec else None
        for pointer, value in places:
            if not isinstance(value, str) or not value.strip() or _URL.match(value):
                continue
            where = _source_path(pointer, sources, ())
            found = self.images.find(value, where, limit)
            if checked is values:
                checked = copy.deepcopy(values)
            _set(checked, pointer, _UPLOADED)  # one problem per place: the file's own
            if found is None:
                usable = False
                continue
            uploads.append(Upload(pointer=pointer, file=found[0], sha256=found[1]))
        return (tuple(uploads) if usable else None), checked


def merged_metadata(*layers: Mapping[str, Any]) -> Mapping[str, str]:
    """The ``metadata`` tags of ``layers`` merged key by key, a later layer winning.

    Values that are not text were reported by the schema; they are left out here.
    """
    merged: dict[str, str] = {}
    for layer in layers:
        tags = layer.get("metadata")
        if isinstance(tags, Mapping):
            merged |= {k: v for k, v in tags.items() if isinstance(k, str) and isinstance(v, str)}
    return merged or NO_TAGS


def _source_path(path: Pointer, sources: Mapping[str, DocPath], fallback: DocPath) -> DocPath:
    """Where in the document a problem at ``path`` of the expanded job was written."""
    if not path:
        return fallback
    source = sources.get(str(path[0]))
    if source is None:
        return fallback
    if len(source) and source[-1] == "image":  # the `image` shorthand is image_urls[0]
        return (*source, *path[2:])
    return (*source, *path[1:])


def _set(body: Any, pointer: Pointer, value: Any) -> None:
    for step in pointer[:-1]:
        body = body[step]
    body[pointer[-1]] = value


def _integral(value: Any) -> Any:
    """``value`` with integral floats as ints (``8.0`` -> ``8``): the API wants integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    return value


def _matrix_value(key: str, value: Any) -> Any:
    # A matrix may list single URLs for image_urls; each stands for a one-item list.
    return [value] if key == "image_urls" and isinstance(value, str) else value
