"""YAML manifests -> validated, expanded :class:`~runner.models.Job` records.

The format is defined by ``schemas/manifest.schema.json``; read its descriptions first.
Loading a file is four steps, and every problem of every step is collected, so one run
reports them all, each at the line the user must edit:

1. read the bytes (size limit, UTF-8) and parse them with a strict YAML loader;
2. validate the document against the schema (what is written, where it is written);
3. expand each entry (defaults < entry < matrix combination) and validate every expanded
   job against its model's schema from the catalog (``runner.catalog``), through
   ``$defs/job``: what is missing, and rules that span defaults and entry;
4. check local images in every field the model's schema marks for upload, give each job
   its ``job_id`` and refuse duplicate ids.

Each distinct job is validated once: jobs that differ only in their prompt's text share
one verdict (a model's schema judges a prompt by type, blankness and length only; a test
of the catalog keeps it so).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from runner.errors import Diagnostic, ManifestError
from runner.manifest import pricing
from runner.manifest.catalog import (
    UPLOAD_MAX_BYTES,
    ModelSpec,
    Validators,
    manifest_validators,
    upload_pointers,
)
from runner.manifest.schemas import Problem, explain
from runner.manifest.yamlfile import Pos, YamlMap, YamlSeq, parse_yaml
from runner.models import Job, Pointer, Upload, canonical_json

#: Largest manifest file read, in bytes (bounds memory and parse time).
MAX_MANIFEST_BYTES = 5 * 1024 * 1024
#: Most jobs one manifest may expand to (after matrix and repeat).
MAX_JOBS = 100_000
#: Most diagnostics printed per file; the rest are counted.
MAX_DIAGNOSTICS = 100

#: Keys of an entry that shape the batch; every other key is a request field.
_ENTRY_KEYS = ("id", "matrix", "repeat")
_IMAGE_FIELDS = ("image", "image_urls")
#: What a local file stands as while the job's request is validated (an upload's URL).
_UPLOADED = "https://upload.apimart.invalid/local-file.png"
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

DocPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    """One loaded manifest: its jobs, expanded and validated, and its price overrides."""

    path: str
    name: str
    jobs: tuple[Job, ...]
    prices: Mapping[str, float] = field(default_factory=dict)


def load_manifests(paths: Sequence[str], *, allow_unknown_models: bool = False) -> list[Manifest]:
    """Load and validate every manifest; raise one :class:`ManifestError` listing all problems.

    A ``job_id`` used in two manifests given together is an error too: they share a ledger.
    ``allow_unknown_models`` (``--allow-unknown-model``) accepts models outside the
    catalog in every manifest, as ``unknown_models: allow`` does in one.
    """
    manifests: list[Manifest] = []
    diagnostics: list[Diagnostic] = []
    owners: dict[str, tuple[Job, Pos]] = {}
    seen_files: set[Path] = set()
    for path in paths:
        key = Path(path).absolute()
        if key in seen_files:
            continue
        seen_files.add(key)
        loaded = _FileLoader(path, allow_unknown_models=allow_unknown_models)
        manifest = loaded.load()
        diagnostics += loaded.diagnostics
        for job, pos in loaded.job_positions:
            first = owners.setdefault(job.job_id, (job, pos))[0]
            if first.manifest != job.manifest:
                message = f"job_id '{job.job_id}' is also used by {first.manifest}:{first.line}"
                hint = "manifests run together share one ledger: give one of the jobs another id"
                diagnostics.append(Diagnostic(path, *pos, "", message, hint))
        if manifest is not None:
            manifests.append(manifest)
    if diagnostics:
        raise ManifestError(diagnostics)
    return manifests


# --- one file --------------------------------------------------------------------------------


class _FileLoader:
    """Loads one manifest; collects its diagnostics and the positions of its jobs."""

    def __init__(self, path: str, *, allow_unknown_models: bool = False) -> None:
        self.path = path
        self.allow_unknown = allow_unknown_models
        self.validators: Validators = manifest_validators()
        self._verdicts: dict[str, list[Problem]] = {}
        self.folder = Path(path).parent
        self.name = Path(path).stem
        self.doc: Any = None
        self.diagnostics: list[Diagnostic] = []
        self.job_positions: list[tuple[Job, Pos]] = []
        self._early: set[tuple[int, int, str]] = set()
        self._images: dict[tuple[Path, int | None], tuple[str | None, str, str | None]] = {}

    def load(self) -> Manifest | None:
        """The manifest, or None when it has problems (then ``diagnostics`` says which)."""
        text = self._read()
        if text is not None:
            self.doc, problems = parse_yaml(text)
            for pos, message, hint in problems:
                self._report(pos, "", message, hint)
        if isinstance(self.doc, dict) and isinstance(self.doc.get("name"), str):
            self.name = self.doc["name"]
        if isinstance(self.doc, dict) and self.doc.get("unknown_models") == "allow":
            self.allow_unknown = True
        if self.doc is not None:
            self._report_all((), explain(self.validators.document, self.doc))
            self._check_prices()
            self._expand()
        self._trim()
        if self.diagnostics or not isinstance(self.doc, dict):
            return None
        prices = {key: float(value) for key, value in self.doc.get("prices", {}).items()}
        jobs = tuple(job for job, _ in self.job_positions)
        return Manifest(path=self.path, name=self.name, jobs=jobs, prices=prices)

    def _check_prices(self) -> None:
        """Each ``prices:`` key names a model of the catalog (and a resolution it renders)."""
        prices = self.doc.get("prices") if isinstance(self.doc, dict) else None
        for key in prices if isinstance(prices, dict) else ():
            problem = pricing.key_problem(key, self.validators.catalog)
            unknown_model = key.partition("/")[0] not in self.validators.catalog
            if problem is not None and not (self.allow_unknown and unknown_model):
                self._report_at(("prices", key), f"unknown key '{key}'", problem, at_key=True)

    def _read(self) -> str | None:
        try:
            with Path(self.path).open("rb") as stream:
                raw = stream.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            self._report((1, 1), "", f"cannot read the manifest: {exc.strerror or exc}")
            return None
        if len(raw) > MAX_MANIFEST_BYTES:
            message = f"the file is larger than the {MAX_MANIFEST_BYTES // 2**20} MiB limit"
            hint = "split it into several manifests and run them together"
            self._report((1, 1), "", message, hint)
            return None
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            self._report((1, 1), "", "the file is UTF-16, not UTF-8", "save it as UTF-8")
            return None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line_start = raw.rfind(b"\n", 0, exc.start) + 1
            col = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
            where = (raw.count(b"\n", 0, exc.start) + 1, col)
            message = f"the file is not UTF-8 (byte 0x{raw[exc.start]:02x} here)"
            self._report(where, "", message, "save the file as UTF-8")
            return None
        if not text.strip():
            hint = "start with 'version: 1' and a 'jobs:' list"
            self._report((1, 1), "", "the file is empty", hint)
            return None
        return text

    # -- expansion --

    def _expand(self) -> None:
        doc = self.doc
        entries = doc.get("jobs") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            return
        defaults = doc.get("defaults")
        defaults = defaults if isinstance(defaults, dict) else {}
        # Counted before anything expands: a huge matrix costs one multiplication, not memory.
        total = 0
        plans: list[tuple[int, dict[str, Any], dict[str, list[Any]], int]] = []
        for index, entry in enumerate(entries):
            matrix = _matrix(entry)
            if matrix is None:
                continue
            repeat = _count(entry.get("repeat", defaults.get("repeat", 1)))
            total += math.prod(len(values) for values in matrix.values()) * repeat
            if total > MAX_JOBS:
                message = f"the manifest expands to more than {MAX_JOBS:,} jobs"
                hint = "split the batch into several manifests, or shrink the matrix or repeat"
                self._report_at(("jobs", index), message, hint)
                return
            plans.append((index, entry, matrix, repeat))
        taken: dict[str, tuple[int, Pos]] = {}
        for index, entry, matrix, repeat in plans:
            pos = _locate(self.doc, ("jobs", index))[1]
            for choice in itertools.product(*(range(len(values)) for values in matrix.values())):
                combo = dict(zip(matrix, choice, strict=True))
                job = self._job(index, entry, defaults, combo, pos)
                base = _base_id(entry, combo, job)
                if base is None:
                    continue
                for take in range(1, repeat + 1):
                    self._add(index, pos, base if take == 1 else f"{base}-{take}", job, taken)

    def _job(
        self,
        index: int,
        entry: dict[str, Any],
        defaults: dict[str, Any],
        combo: dict[str, int],
        pos: Pos,
    ) -> Job | None:
        """One expanded job (None when invalid; the problems are reported)."""
        here: DocPath = ("jobs", index)
        sources: dict[str, DocPath] = {}
        values: dict[str, Any] = {}
        own_image = any(k in entry or k in combo for k in _IMAGE_FIELDS)
        for key in dict.fromkeys([*defaults, *entry, *combo]):
            if key in _ENTRY_KEYS:
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
                self._report_at((*here, key), f"'{key}' is set both here and in matrix", hint)
        if "image" in values:
            if "image_urls" in values:
                hint = "a job has one image list: give either image (a file or URL) or image_urls"
                where = sources["image_urls"]
                self._report_at(where, "'image_urls' cannot be combined with 'image'", hint)
                return None
            values["image_urls"] = [values.pop("image")]
            sources["image_urls"] = sources.pop("image")
        for key in [k for k, v in values.items() if v == []]:
            del values[key]  # "[] means none": the field is not sent
        model = values.get("model")
        spec = self.validators.catalog.get(model) if isinstance(model, str) else None
        if isinstance(model, str) and spec is None and not self.allow_unknown:
            self._report_at(sources["model"], *self._unknown_model(model), late=True)
            return None
        shorthand = any("image" in where for where in (entry, combo, defaults))
        uploads, checked = self._uploads(spec, values, sources, from_image=shorthand)
        problems = self._verdict(spec, checked)
        for problem in problems:
            path = _source_path(problem.path, sources, here)
            self._report_at(path, problem.message, problem.hint, at_key=problem.at_key, late=True)
        if problems or uploads is None:
            return None
        request = {key: _integral(value) for key, value in values.items()}
        if isinstance(request.get("prompt"), str):
            request["prompt"] = request["prompt"].strip()
        return Job(
            job_id="",
            request=request,
            uploads=uploads,
            defaults=spec.defaults if spec else {},
            fields=spec.fields if spec else {},
            manifest=self.path,
            manifest_name=self.name,
            line=pos[0],
            catalogued=spec is not None,
        )

    def _unknown_model(self, model: str) -> tuple[str, str]:
        catalog = self.validators.catalog
        close = catalog.nearest(model)
        message = f"model '{model}' is not in the catalog"
        listing = "'apimart-batch models' lists the catalog"
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? ({listing})"
        else:
            hint = f"{listing}; for a model newer than it, add 'unknown_models: allow'"
        return message, hint

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
            places = list(upload_pointers(spec, values))
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
            found = self._local_image(value, where, limit)
            if checked is values:
                checked = copy.deepcopy(values)
            _set(checked, pointer, _UPLOADED)  # one problem per place: the file's own
            if found is None:
                usable = False
                continue
            uploads.append(Upload(pointer=pointer, file=found[0], sha256=found[1]))
        return (tuple(uploads) if usable else None), checked

    def _verdict(self, spec: ModelSpec | None, values: dict[str, Any]) -> list[Problem]:
        """The schema's problems with a job; jobs differing only in prompt text share one."""
        validators = self.validators
        validator = validators.job if spec is not None or "model" not in values else None
        validator = validator or validators.unknown_job
        probe = values
        prompt = values.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            probe = {**values, "prompt": "p" * len(prompt)}
        key = _canonical_or_none(probe)
        problems = self._verdicts.get(key) if key is not None else None
        if problems is None:
            problems = explain(validator, probe, registry=validators.catalog.registry,
                               key_hint=partial(self._key_hint, spec))
            if key is not None:
                self._verdicts[key] = problems
        if probe is not values and any(p.path[:1] == ("prompt",) for p in problems):
            problems = explain(validator, values, registry=validators.catalog.registry,
                               key_hint=partial(self._key_hint, spec))
        return problems

    def _key_hint(self, spec: ModelSpec | None, key: str, known: list[str]) -> str | None:
        """What to write instead of a key the job's model does not take."""
        if spec is None:
            return None
        if key in spec.dropped:
            return spec.dropped[key]
        for name, aka in spec.aliases.items():
            if key in aka:
                return f"{spec.id} calls it '{name}'"
        if key in _ENTRY_KEYS or key == "image":
            return None
        others = [m for m in self.validators.catalog.who_has(key) if m != spec.id]
        close = difflib.get_close_matches(key, [*known, *_ENTRY_KEYS], n=1, cutoff=0.75)
        if close:
            return f"did you mean '{close[0]}'?"
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            allowed = ", ".join(known)
            return f"'{key}' is a field of {shown}, not of {spec.id}; allowed here: {allowed}"
        return None

    def _add(
        self, index: int, pos: Pos, job_id: str, job: Job | None, taken: dict[str, tuple[int, Pos]]
    ) -> None:
        """Keep a valid job under ``job_id``; refuse a taken id even for an invalid job."""
        if job_id in taken:
            first, first_pos = taken[job_id]
            message = (
                f"this entry yields job_id '{job_id}' twice: a matrix list repeats a value"
                if first == index
                else f"job_id '{job_id}' is already used by jobs[{first}] (line {first_pos[0]})"
            )
            hint = "for several takes of one request use 'repeat: N'; else give each job its own id"
            self._report_at(("jobs", index), message, hint, late=True)
            return
        taken[job_id] = (index, pos)
        if job is not None:
            self.job_positions.append((replace(job, job_id=job_id), pos))

    def _local_image(
        self, image: str, source: DocPath, limit: int | None
    ) -> tuple[str, str] | None:
        """Absolute path and SHA-256 of a local image, or None and a reported problem."""
        try:
            path = (self.folder / image).resolve()
        except (OSError, RuntimeError, ValueError):
            path = self.folder / image
        if (path, limit) not in self._images:
            self._images[path, limit] = _inspect_image(path, self.folder, limit)
        digest, problem, hint = self._images[path, limit]
        if digest is None:
            self._report_at(source, problem, hint, late=True)
            return None
        return str(path), digest

    # -- reporting --

    def _report_at(
        self,
        path: DocPath,
        message: str,
        hint: str | None,
        *,
        at_key: bool = False,
        late: bool = False,
    ) -> None:
        shown, pos = _locate(self.doc, path, at_key=at_key)
        self._report(pos, shown, message, hint, late=late)

    def _report_all(self, prefix: DocPath, problems: list[Problem]) -> None:
        for problem in problems:
            path = (*prefix, *problem.path)
            self._report_at(path, problem.message, problem.hint, at_key=problem.at_key)

    def _report(
        self, pos: Pos, path: str, message: str, hint: str | None = None, *, late: bool = False
    ) -> None:
        # A later stage re-checks values the schema stage already judged where they were
        # written; one problem per place is enough.
        if late and (pos[0], pos[1], path) in self._early:
            return
        if not late:
            self._early.add((pos[0], pos[1], path))
        self.diagnostics.append(Diagnostic(self.path, pos[0], pos[1], path, message, hint))

    def _trim(self) -> None:
        self.diagnostics = sorted(set(self.diagnostics), key=lambda d: (d.line, d.col, d.path))
        if len(self.diagnostics) > MAX_DIAGNOSTICS:
            extra = self.diagnostics[MAX_DIAGNOSTICS]
            more = len(self.diagnostics) - MAX_DIAGNOSTICS
            message = f"... and {more} more problems (only the first {MAX_DIAGNOSTICS} are shown)"
            summary = replace(extra, path="", message=message, hint=None)
            self.diagnostics = [*self.diagnostics[:MAX_DIAGNOSTICS], summary]


def _matrix(entry: Any) -> dict[str, list[Any]] | None:
    """The entry's usable matrix lists ({} without a matrix); None if the entry can't expand."""
    if not isinstance(entry, dict):
        return None
    matrix = entry.get("matrix", {})
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        return None
    return {key: values for key, values in matrix.items() if key not in _ENTRY_KEYS}


def _base_id(entry: dict[str, Any], combo: dict[str, int], job: Job | None) -> str | None:
    """The id of take 1 (see the schema's description); None if it needs an invalid job."""
    given = entry.get("id")
    if isinstance(given, str) and combo:
        chosen = {key: entry["matrix"][key][i] for key, i in combo.items()}
        return f"{given}-{_digest(chosen)[:12]}"
    if isinstance(given, str):
        return given
    if job is None:
        return None
    slug = _slug(job.prompt)
    return f"{slug}-{job.fingerprint[:12]}" if slug else job.fingerprint[:12]


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


def _canonical_or_none(value: Any) -> str | None:
    """``value`` as canonical JSON, or None when it holds something JSON cannot say."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError):
        return None


def _matrix_value(key: str, value: Any) -> Any:
    # A matrix may list single URLs for image_urls; each stands for a one-item list.
    return [value] if key == "image_urls" and isinstance(value, str) else value


def _count(repeat: Any) -> int:
    """``repeat`` as a count; an invalid one (reported by the schema) counts as 1.

    Integers stay integers (a 400-digit count must not go through float); an integral
    float counts only while it is finite.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int | float):
        return 1
    if isinstance(repeat, float) and not (math.isfinite(repeat) and repeat.is_integer()):
        return 1
    return int(repeat) if repeat >= 1 else 1


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _slug(prompt: str, width: int = 24) -> str:
    """The prompt's first ASCII words, for a readable default id ('' for e.g. Korean)."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text.lower()):
        longer = f"{slug}-{word}" if slug else word[:width]
        if len(longer) > width:
            break
        slug = longer
    return slug


def _locate(doc: Any, path: DocPath, *, at_key: bool = False) -> tuple[str, Pos]:
    """A readable path and the position of ``path`` in the document, or of its deepest part."""
    node, pos, shown = doc, getattr(doc, "pos", (1, 1)), ""
    for n, step in enumerate(path):
        if isinstance(node, YamlMap) and isinstance(step, str) and step in node:
            last = n == len(path) - 1
            empty = node[step] is None  # an empty value's mark is the next token's
            pos = node.key_pos[step] if (at_key and last) or empty else node.value_pos[step]
            shown += _key_text(step, first=not shown)
        elif isinstance(node, YamlSeq) and isinstance(step, int) and 0 <= step < len(node):
            pos = node.item_pos[step]
            shown += f"[{step}]"
        else:
            break
        node = node[step]
    return shown, pos


def _key_text(key: str, *, first: bool) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", key):
        return key if first else f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _inspect_image(
    path: Path, folder: Path, limit: int | None
) -> tuple[str | None, str, str | None]:
    """(SHA-256 of the content, "", None) for a usable image, else (None, problem, hint)."""
    try:
        if not path.is_file():
            if path.exists():
                return None, f"{path} is not a file", None
            hint = f"a relative path starts at the manifest's folder ({folder.absolute()})"
            return None, f"image file {path} does not exist", hint
        size = path.stat().st_size
        limit = limit or UPLOAD_MAX_BYTES
        if size > limit:
            most = f"{limit / 1e6:g} MB"
            message = f"image {path} is {size / 1e6:.1f} MB; the model takes at most {most}"
            return None, message, "shrink or recompress it"
        with path.open("rb") as stream:
            content = stream.read(limit + 1)
    except (OSError, ValueError) as exc:
        return None, f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}", None
    kind = next((name for magic, name in _IMAGE_MAGIC if content.startswith(magic)), None)
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:
        message = f"{path} is not a JPEG, PNG or WebP image (judged by its content)"
        return None, message, "convert it to PNG or JPEG"
    return hashlib.sha256(content).hexdigest(), "", None
