"""Job ids: the id each expanded job runs under, and the refusal of an id given twice."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import replace
from typing import Any

from runner.manifest.diagnostics import Reporter
from runner.manifest.expand import Plan
from runner.manifest.yamlfile import Pos
from runner.models import Job, canonical_json


class JobIds:
    """Names one manifest's jobs and keeps the valid ones with the position of their entry."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.job_positions: list[tuple[Job, Pos]] = []
        self._taken: dict[str, tuple[int, Pos]] = {}

    def take(self, plan: Plan, combo: dict[str, int], job: Job | None, pos: Pos) -> None:
        """Name every take of one combination (``<id>``, ``<id>-2``, ...) and keep valid jobs.

        A taken id is refused even for an invalid job.
        """
        index, entry, _, repeat = plan
        base = job.job_id if job is not None and job.job_id else _base_id(entry, combo, job)
        if base is None:
            return
        taken = self._taken
        for take in range(1, repeat + 1):
            job_id = base if take == 1 else f"{base}-{take}"
            if job_id in taken:
                self._refuse(job_id, index, *taken[job_id])
                continue
            taken[job_id] = (index, pos)
            if job is not None:
                named = job if job_id == job.job_id else replace(job, job_id=job_id)
                self.job_positions.append((named, pos))

    def _refuse(self, job_id: str, index: int, first: int, first_pos: Pos) -> None:
        message = (
            f"this entry yields job_id '{job_id}' twice: a matrix list repeats a value"
            if first == index
            else f"job_id '{job_id}' is already used by jobs[{first}] (line {first_pos[0]})"
        )
        hint = "for several takes of one request use 'repeat: N'; else give each job its own id"
        self.reporter.at(("jobs", index), message, hint, late=True)


def given_id(entry: dict[str, Any], combo: dict[str, int]) -> str | None:
    """The id of take 1 when the entry gives an ``id`` (see the schema's description)."""
    given = entry.get("id")
    if isinstance(given, str) and combo:
        chosen = {key: entry["matrix"][key][i] for key, i in combo.items()}
        return f"{given}-{_digest(chosen)[:12]}"
    return given if isinstance(given, str) else None


def _base_id(entry: dict[str, Any], combo: dict[str, int], job: Job | None) -> str | None:
    """The id of take 1 (see the schema's description); None if it needs an invalid job."""
    given = given_id(entry, combo)
    if given is not None:
        return given
    if job is None:
        return None
    slug = _slug(job.prompt)
    return f"{slug}-{job.fingerprint[:12]}" if slug else job.fingerprint[:12]


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


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
