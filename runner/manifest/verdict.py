"""What a model's schema says of one expanded job, in words, with a hint for a stray key.

Each distinct job is judged once: jobs that differ only in their prompt's text share one
verdict (a model's schema judges a prompt by type, blankness and length only; a test of
the catalog keeps it so).
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable
from functools import partial
from typing import Any

from runner.manifest.catalog import ModelSpec, Validators
from runner.manifest.expand import ENTRY_KEYS
from runner.manifest.schemas import Problem, explain
from runner.models import canonical_json


class Verdicts:
    """Judges one manifest's jobs against their models' schemas, sharing verdicts."""

    def __init__(self, validators: Validators) -> None:
        self.validators = validators
        self._verdicts: dict[Hashable, list[Problem]] = {}

    def judge(self, spec: ModelSpec | None, values: dict[str, Any]) -> list[Problem]:
        """The schema's problems with a job; jobs differing only in prompt text share one."""
        validators = self.validators
        validator = validators.job if spec is not None or "model" not in values else None
        validator = validator or validators.unknown_job
        probe = values
        prompt = values.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            probe = {**values, "prompt": "p" * len(prompt)}
        key = _key(probe)
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

    def unknown_model(self, model: str) -> tuple[str, str]:
        """The message and hint for a model outside the catalog."""
        catalog = self.validators.catalog
        close = catalog.nearest(model)
        message = f"model '{model}' is not in the catalog"
        listing = "'apimart-batch models' lists the catalog"
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? ({listing})"
        else:
            hint = f"{listing}; for a model newer than it, add 'unknown_models: allow'"
        return message, hint

    def _key_hint(self, spec: ModelSpec | None, key: str, known: list[str]) -> str | None:
        """What to write instead of a key the job's model does not take."""
        if spec is None:
            return None
        if key in spec.dropped:
            return spec.dropped[key]
        for name, aka in spec.aliases.items():
            if key in aka:
                return f"{spec.id} calls it '{name}'"
        if key in ENTRY_KEYS or key == "image":
            return None
        others = [m for m in self.validators.catalog.who_has(key) if m != spec.id]
        close = difflib.get_close_matches(key, [*known, *ENTRY_KEYS], n=1, cutoff=0.75)
        if close:
            return f"did you mean '{close[0]}'?"
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            allowed = ", ".join(known)
            return f"'{key}' is a field of {shown}, not of {spec.id}; allowed here: {allowed}"
        return None


def _key(values: dict[str, Any]) -> Hashable | None:
    """What the verdict cache keys a job by: equal keys mean equal canonical JSON.

    Plain values (texts, numbers, lists of them) make a tuple, far cheaper than JSON; a
    number keeps its type (``1``, ``1.0`` and ``true`` differ) and a float its repr
    (``-0.0``). Anything else is keyed by its canonical JSON.
    """
    try:
        return tuple(sorted((name, _plain(value)) for name, value in values.items()))
    except _NotPlainError:
        return _canonical_or_none(values)


class _NotPlainError(Exception):
    """A value :func:`_key` leaves to canonical JSON."""


def _plain(value: Any) -> Hashable:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return kind, value
    if kind is float:
        return kind, repr(value)
    if isinstance(value, list):  # YamlSeq too: JSON sees a list
        return list, tuple(_plain(item) for item in value)
    raise _NotPlainError


def _canonical_or_none(value: Any) -> str | None:
    """``value`` as canonical JSON, or None when it holds something JSON cannot say."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError):
        return None
