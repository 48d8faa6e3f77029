"""The parsing floor: the essential work of ``validate`` in plain Python, run as its own process.

Parse the manifest with libyaml's ``CSafeLoader``, expand ``defaults`` and ``matrix`` (first
key outermost, as the runner does), and hash each job's canonical JSON with SHA-256. No line
numbers, no schema checks, no ids: what ``validate`` would cost if those were free.
Usage: ``python bench/floor.py MANIFEST`` prints the number of jobs and one digest of them all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from typing import Any

import yaml


def expand(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every job of a manifest: each entry over the defaults, matrices as every combination."""
    defaults = doc.get("defaults") or {}
    for entry in doc.get("jobs") or []:
        base = {**defaults, **{k: v for k, v in entry.items() if k != "matrix"}}
        axes = entry.get("matrix") or {}
        for values in itertools.product(*axes.values()):
            yield {**base, **dict(zip(axes, values, strict=True))}


def main(argv: list[str]) -> int:
    """Parse, expand and hash ``argv[0]``; print the job count and a digest of the digests."""
    with open(argv[0], "rb") as f:  # noqa: PTH123 - the floor is plain Python on purpose
        doc = yaml.load(f, Loader=yaml.CSafeLoader)
    total = hashlib.sha256()
    count = 0
    for job in expand(doc):
        canonical = json.dumps(job, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        total.update(hashlib.sha256(canonical.encode()).digest())
        count += 1
    print(count, total.hexdigest()[:16])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
