"""Deterministic shards: ``--shard I/N`` takes the jobs whose id hashes to ``I`` modulo ``N``.

The hash is the first 8 bytes of the SHA-256 of the UTF-8 job id, read big-endian: the
same on every machine, run and Python version (the built-in ``hash()`` of a string
changes with ``PYTHONHASHSEED``). ``auto/N`` takes the index from ``JOB_COMPLETION_INDEX``,
which Kubernetes sets in every pod of an Indexed Job.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The variable Kubernetes Indexed Jobs set to the pod's index (0 ... completions - 1).
INDEX_VARIABLE: Final = "JOB_COMPLETION_INDEX"
#: The most shards ``--shard`` takes (Kubernetes caps an Indexed Job at 100 000 completions).
MAX_SHARDS: Final = 100_000
#: The part a shard adds to a ledger's file name: ``m.shard-2-of-4.ledger.csv``.
LEDGER_TAG: Final = re.compile(r"\.shard-(\d+)-of-(\d+)")


def shard_index(job_id: str, count: int) -> int:
    """The shard (0 ... ``count`` - 1) that ``job_id`` belongs to when there are ``count``."""
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``: the jobs whose :func:`shard_index` is ``index``."""

    index: int
    count: int

    def holds(self, job_id: str) -> bool:
        """True when ``job_id`` belongs to this shard."""
        return shard_index(job_id, self.count) == self.index

    @property
    def tag(self) -> str:
        """What the shard adds to a ledger's file name, e.g. ``.shard-2-of-4``."""
        return f".shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> Shard:
    """``I/N`` or ``auto/N`` as a :class:`Shard`; ``ValueError`` with a clear message if not."""
    match = re.fullmatch(r"\s*(auto|-?[0-9]+)\s*/\s*(-?[0-9]+)\s*", text)
    if match is None:
        msg = f"must be I/N (0 <= I < N, e.g. 0/4) or auto/N, got '{text}'"
        raise ValueError(msg)
    count = _bounded(match[2])
    if count < 1:
        msg = f"the shard count N must be at least 1, got '{text}'"
        raise ValueError(msg)
    if count > MAX_SHARDS:
        msg = f"the shard count N must be at most {MAX_SHARDS}, got '{text}'"
        raise ValueError(msg)
    raw = match[1]
    where = ""
    if raw == "auto":
        raw = environ.get(INDEX_VARIABLE, "").strip()
        where = f" ({INDEX_VARIABLE}={raw})"
        if not raw:
            msg = (f"'{text}' takes the index from {INDEX_VARIABLE}, which is not set "
                   "(Kubernetes sets it in Indexed Jobs); pass I/N instead")
            raise ValueError(msg)
        if not re.fullmatch(r"-?[0-9]+", raw):
            msg = f"'{text}': {INDEX_VARIABLE} must be a whole number, got '{raw}'"
            raise ValueError(msg)
    index = _bounded(raw)
    if not 0 <= index < count:
        msg = f"the shard index must be from 0 to {count - 1} for N={count}, got {raw}{where}"
        raise ValueError(msg)
    return Shard(index, count)


def _bounded(digits: str) -> int:
    """``digits`` as an int, or just past ``MAX_SHARDS`` (either sign) when far longer.

    Python refuses ``int()`` of thousands of digits with a message about its own limits.
    """
    if len(digits.lstrip("-")) <= len(str(MAX_SHARDS)):
        return int(digits)
    return -(MAX_SHARDS + 1) if digits.startswith("-") else MAX_SHARDS + 1


def ledger_shard(path: str) -> Shard | None:
    """The shard a ledger's file name says it belongs to (``.shard-I-of-N``), if any."""
    found = LEDGER_TAG.findall(Path(path).name)
    if not found:
        return None
    index, count = (int(n) for n in found[-1])
    return Shard(index, count) if 0 <= index < count else None


def split_ending(name: str) -> tuple[str, str]:
    """``m.ledger.csv`` -> (``m``, ``.ledger.csv``): a ledger name around where a tag goes."""
    for ending in (".ledger.csv", ".csv"):
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], ending
    return name, ""


def family_base(path: str) -> str:
    """The unsharded ledger of ``path``'s family: ``path`` with any shard tag removed."""
    return str(Path(path).with_name(LEDGER_TAG.sub("", Path(path).name)))


def shard_ledger_path(base: str, shard: Shard) -> str:
    """The shard's ledger in ``base``'s family: its tag before the ``.ledger.csv`` ending."""
    path = Path(family_base(base))
    head, ending = split_ending(path.name)
    return str(path.with_name(head + shard.tag + ending))
