"""A ledger's family: the unsharded ledger of a manifest and every shard ledger beside it.

``m.ledger.csv``, ``m.shard-0-of-4.ledger.csv``, ``m.shard-2-of-3.ledger.csv`` ... are one
family (``--mock`` ledgers, ``m.mock...``, are another). A job belongs to no ledger in
particular: its state is the newest row it has in any ledger of the family. That is what
makes a change of the shard count safe: a run reads its siblings (without locking them)
and never sends a job whose newest row, wherever it is, says it needs no sending.
"""

from __future__ import annotations

import fcntl
import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from runner.errors import LedgerError, LedgerLockedError
from runner.ledger.store import read_latest
from runner.models import parse_iso
from runner.shard import LEDGER_TAG, Shard, family_base, ledger_shard, split_ending

#: File names beside ledgers that are not ledgers (locks, cut rows, backups).
_NOT_LEDGERS = (".lock", ".torn")


def family(path: str) -> list[str]:
    """Every existing ledger of ``path``'s family, ``path`` itself included if it exists."""
    base = Path(family_base(path))
    head, ending = split_ending(base.name)
    try:
        names = sorted(entry.name for entry in base.parent.iterdir())
    except OSError:
        return []

    def member(name: str) -> bool:
        middle = name[len(head): len(name) - len(ending)]
        return name.startswith(head) and name.endswith(ending) and bool(
            LEDGER_TAG.fullmatch(middle))

    found = [str(base.parent / name) for name in names if name == base.name or member(name)]
    return [name for name in found if Path(name).is_file()]


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def siblings(path: str) -> list[str]:
    """The other existing ledgers of ``path``'s family."""
    return [other for other in family(path) if not _same(other, path)]


def recorded_elsewhere(
    path: str, own: Mapping[str, Mapping[str, str]], *, mock: bool
) -> dict[str, tuple[str, dict[str, str]]]:
    """Jobs whose newest row in ``path``'s family is in another ledger than ``path``.

    ``own`` is the latest row of each job in ``path``. Returns job id -> (the other
    ledger, its row). Only rows of the same mode count (a mock task never stands for a
    real one). A sibling that cannot be read is an error: skipping it could pay twice.
    """
    flag = "1" if mock else "0"
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for other in siblings(path):
        for job_id, row in read_latest(other).items():
            if row.get("mock", flag) != flag:
                continue
            best = found.get(job_id)
            mine = own.get(job_id)
            if (best is None or _newer(row, best[1])) and (mine is None or _newer(row, mine)):
                found[job_id] = (other, row)
    return found


def _newer(row: Mapping[str, str], than: Mapping[str, str]) -> bool:
    try:
        a, b = parse_iso(row.get("time", "")), parse_iso(than.get("time", ""))
    except ValueError:
        return False
    return a is not None and (b is None or a > b)


class OtherShardCountError(LedgerLockedError):
    """A run with another shard count holds a ledger of the same family (exit 75)."""

    def __init__(self, path: str, pid: int | None, mine: Shard | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        ours = f"--shard {mine}" if mine is not None else "no --shard"
        LedgerError.__init__(
            self,
            f"{path}: in use by {who}, a run with another shard count than this one "
            f"({ours}); two shard counts at once could both send a job neither has recorded "
            "yet\n  hint: let that run finish (or stop it), then rerun; change the shard "
            "count only between runs",
        )


def refuse_other_counts(path: str, shard: Shard | None) -> None:
    """Raise ``OtherShardCountError`` if a run of another shard count holds a sibling now.

    Each run locks its own ledger first and looks at its siblings second, so of two
    runs of different counts started together at least one sees the other.
    """
    count = shard.count if shard is not None else 1
    for other in siblings(path):
        theirs = ledger_shard(other)
        if (theirs.count if theirs is not None else 1) == count:
            continue
        held, pid = _held(other)
        if held:
            raise OtherShardCountError(other, pid, shard)


def _held(path: str) -> tuple[bool, int | None]:
    """Whether a run holds the ledger's lock file (probed without taking it for long)."""
    sidecar = Path(path).resolve()
    sidecar = sidecar.with_name(sidecar.name + ".lock")
    try:
        fd = os.open(sidecar, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return True, int(text) if text.isdecimal() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def expand_ledgers(patterns: Sequence[str]) -> list[str]:
    """Ledger arguments with glob patterns (``'m.*.ledger.csv'``) expanded, each file once.

    A pattern matching nothing is a ``LedgerError``; lock files, cut rows and backups
    beside the ledgers are left out of a pattern's matches.
    """
    found: list[str] = []
    seen: set[Path] = set()  # one file under two names ('m.csv', './m.csv') counts once
    for pattern in patterns:
        if Path(pattern).exists() or not glob.has_magic(pattern):
            matches: Iterable[str] = [pattern]
        else:
            # glob.glob, not Path.glob: the pattern may be absolute or climb with '..'.
            matches = [name for name in sorted(glob.glob(pattern))  # noqa: PTH207
                       if not name.endswith(_NOT_LEDGERS) and ".bak-" not in Path(name).name]
            if not matches:
                msg = f"{pattern}: no ledger matches\n  hint: check the pattern and the folder"
                raise LedgerError(msg)
        for name in matches:
            if (real := Path(name).resolve()) not in seen:
                seen.add(real)
                found.append(name)
    return found
