"""Entries -> the combinations they expand to, counted before anything expands.

An entry stands for every combination of its ``matrix`` lists (one job without a matrix),
each taken ``repeat`` times; what a job's values are is the job builder's part.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

from runner.manifest.diagnostics import Reporter

#: Most jobs one manifest may expand to (after matrix and repeat).
MAX_JOBS = 100_000

#: Keys of an entry that shape the batch or tag it (``metadata``, never sent); every other
#: key is a request field.
ENTRY_KEYS = ("id", "matrix", "repeat", "metadata")


#: One entry that can expand: (its index, the entry, its lists to combine, takes of each).
Plan = tuple[int, dict[str, Any], dict[str, list[Any]], int]


def combinations(matrix: dict[str, list[Any]]) -> Iterator[dict[str, int]]:
    """Each combination, as the index chosen in each matrix list ({} without a matrix)."""
    for choice in itertools.product(*(range(len(values)) for values in matrix.values())):
        yield dict(zip(matrix, choice, strict=True))


def plan(entries: list[Any], defaults: dict[str, Any], reporter: Reporter) -> list[Plan] | None:
    """The entries that can expand; None (reported) when they make more than MAX_JOBS jobs."""
    # Counted before anything expands: a huge matrix costs one multiplication, not memory.
    total = 0
    plans: list[Plan] = []
    for index, entry in enumerate(entries):
        matrix = _matrix(entry)
        if matrix is None:
            continue
        repeat = _count(entry.get("repeat", defaults.get("repeat", 1)))
        total += math.prod(len(values) for values in matrix.values()) * repeat
        if total > MAX_JOBS:
            message = f"the manifest expands to more than {MAX_JOBS:,} jobs"
            hint = "split the batch into several manifests, or shrink the matrix or repeat"
            reporter.at(("jobs", index), message, hint)
            return None
        plans.append((index, entry, matrix, repeat))
    return plans


def _matrix(entry: Any) -> dict[str, list[Any]] | None:
    """The entry's usable matrix lists ({} without a matrix); None if the entry can't expand."""
    if not isinstance(entry, dict):
        return None
    matrix = entry.get("matrix", {})
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        return None
    return {key: values for key, values in matrix.items() if key not in ENTRY_KEYS}


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
