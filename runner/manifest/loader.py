"""YAML manifests -> validated, expanded :class:`~runner.models.Job` records.

The format is defined by ``schemas/manifest.schema.json``; read its descriptions first.
Loading a file is four steps, and every problem of every step is collected, so one run
reports them all, each at the line the user must edit:

1. read the bytes (size limit, UTF-8) and parse them with a strict YAML loader;
2. validate the document against the schema (what is written, where it is written);
3. expand each entry (defaults < entry < matrix combination) and validate every expanded
   job against its model's schema from the catalog (``catalog``), through
   ``$defs/job``: what is missing, and rules that span defaults and entry;
4. check local images in every field the model's schema marks for upload, give each job
   its ``job_id`` and refuse duplicate ids.

This module reads and parses the file (step 1), makes the document pass (step 2) and
conducts the rest: ``expand`` counts and expands the entries, ``jobs`` builds each job
with ``verdict`` (one shared verdict per job but its prompt's text) and ``images`` (local
files for upload), ``ids`` names them, and ``diagnostics`` reports every problem at its
YAML position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner.errors import Diagnostic, ManifestError
from runner.manifest import pricing
from runner.manifest.catalog import Validators, manifest_validators
from runner.manifest.diagnostics import MAX_DIAGNOSTICS as MAX_DIAGNOSTICS
from runner.manifest.diagnostics import Reporter, locate
from runner.manifest.expand import MAX_JOBS as MAX_JOBS
from runner.manifest.expand import combinations, plan
from runner.manifest.ids import JobIds, given_id
from runner.manifest.jobs import JobBuilder
from runner.manifest.schemas import Problem, explain
from runner.manifest.sources import read_sources
from runner.manifest.yamlfile import Pos, parse_yaml
from runner.models import Job

#: Largest manifest file read, in bytes (bounds memory and parse time). It agrees with
#: ``MAX_JOBS``: 100,000 entries with 200-character prompts take about 22 MiB.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024


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


def _reindexed(problem: Problem, kept: list[int]) -> Problem:
    """``problem`` of the document whose ``jobs`` were ``kept``, at the entry's own index."""
    path = problem.path
    if len(path) < 2 or path[0] != "jobs" or not isinstance(path[1], int):
        return problem
    return replace(problem, path=("jobs", kept[path[1]], *path[2:]))


# --- one file --------------------------------------------------------------------------------


class _FileLoader:
    """Loads one manifest; collects its diagnostics and the positions of its jobs."""

    def __init__(self, path: str, *, allow_unknown_models: bool = False) -> None:
        self.path = path
        self.allow_unknown = allow_unknown_models
        self.validators: Validators = manifest_validators()
        self.folder = Path(path).parent
        self.name = Path(path).stem
        self.doc: Any = None
        self.reporter = Reporter(path)
        self.diagnostics: list[Diagnostic] = []
        self.job_positions: list[tuple[Job, Pos]] = []

    def load(self) -> Manifest | None:
        """The manifest, or None when it has problems (then ``diagnostics`` says which)."""
        reporter = self.reporter
        text = self._read()
        if text is not None:
            self.doc, problems = parse_yaml(text)
            reporter.doc = self.doc
            for pos, message, hint in problems:
                reporter.add(pos, "", message, hint)
        if isinstance(self.doc, dict) and isinstance(self.doc.get("name"), str):
            self.name = self.doc["name"]
        if isinstance(self.doc, dict) and self.doc.get("unknown_models") == "allow":
            self.allow_unknown = True
        if self.doc is not None:
            reporter.all((), self._document_problems())
            self._check_prices()
            self._expand()
        self.diagnostics = reporter.trim()
        if self.diagnostics or not isinstance(self.doc, dict):
            return None
        prices = {key: float(value) for key, value in self.doc.get("prices", {}).items()}
        jobs = tuple(job for job, _ in self.job_positions)
        return Manifest(path=self.path, name=self.name, jobs=jobs, prices=prices)

    def _document_problems(self) -> list[Problem]:
        """What the schema says of the document. Entries that surely pass it (most, and
        checked in a fraction of jsonschema's time) are left out of its pass; each job is
        validated again once expanded, so this pass is about the entries' own shape."""
        doc, ok = self.doc, self.validators.entry_ok
        entries = doc.get("jobs") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or len(entries) < 2:
            return explain(self.validators.document, doc)
        doubtful = [i for i, entry in enumerate(entries) if not ok(entry)]
        kept = doubtful or [0]  # one entry keeps 'jobs' non-empty, as the schema asks
        problems = explain(self.validators.document, {**doc, "jobs": [entries[i] for i in kept]})
        return [_reindexed(problem, kept) for problem in problems]

    def _check_prices(self) -> None:
        """Each ``prices:`` key names a model of the catalog (and a resolution it renders)."""
        prices = self.doc.get("prices") if isinstance(self.doc, dict) else None
        for key in prices if isinstance(prices, dict) else ():
            problem = pricing.key_problem(key, self.validators.catalog)
            unknown_model = key.partition("/")[0] not in self.validators.catalog
            if problem is not None and not (self.allow_unknown and unknown_model):
                self.reporter.at(("prices", key), f"unknown key '{key}'", problem, at_key=True)

    def _read(self) -> str | None:
        try:
            with Path(self.path).open("rb") as stream:
                raw = stream.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            self.reporter.add((1, 1), "", f"cannot read the manifest: {exc.strerror or exc}")
            return None
        if len(raw) > MAX_MANIFEST_BYTES:
            message = f"the file is larger than the {MAX_MANIFEST_BYTES // 2**20} MiB limit"
            hint = "split it into several manifests and run them together"
            self.reporter.add((1, 1), "", message, hint)
            return None
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            self.reporter.add((1, 1), "", "the file is UTF-16, not UTF-8", "save it as UTF-8")
            return None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line_start = raw.rfind(b"\n", 0, exc.start) + 1
            col = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
            where = (raw.count(b"\n", 0, exc.start) + 1, col)
            message = f"the file is not UTF-8 (byte 0x{raw[exc.start]:02x} here)"
            self.reporter.add(where, "", message, "save the file as UTF-8")
            return None
        if not text.strip():
            hint = "start with 'version: 1' and a 'jobs:' list"
            self.reporter.add((1, 1), "", "the file is empty", hint)
            return None
        return text

    def _expand(self) -> None:
        """Expand every entry, build each combination's job, and name its takes."""
        doc = self.doc
        entries = doc.get("jobs") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            return
        defaults = doc.get("defaults")
        defaults = defaults if isinstance(defaults, dict) else {}
        entries = read_sources(entries, self.folder, self.reporter)  # prompt files -> lists
        plans = plan(entries, defaults, self.reporter)
        if plans is None:
            return
        builder = JobBuilder(self.path, self.name, self.folder, self.validators, self.reporter,
                             allow_unknown=self.allow_unknown)
        ids = JobIds(self.reporter)
        for entry_plan in plans:
            index, entry, matrix, _ = entry_plan
            pos = locate(doc, ("jobs", index))[1]
            for combo in combinations(matrix):
                named = given_id(entry, combo) or ""  # built with its id: no copy to rename
                job = builder.build(index, entry, defaults, combo, pos, job_id=named)
                ids.take(entry_plan, combo, job, pos)
        self.job_positions = ids.job_positions
