"""The ledger: the append-only CSV file that is the run's "never pay twice" memory."""

from __future__ import annotations

from runner.ledger.family import (
    OtherShardCountError,
    expand_ledgers,
    family,
    recorded_elsewhere,
    refuse_other_counts,
)
from runner.ledger.store import (
    COLUMNS,
    STATUSES,
    Ledger,
    Recorder,
    iter_rows,
    keep_synced,
    ledger_is_mock,
    ledger_path,
    open_ledger,
    read_latest,
    write_csv,
)

__all__ = [
    "COLUMNS",
    "STATUSES",
    "Ledger",
    "OtherShardCountError",
    "Recorder",
    "expand_ledgers",
    "family",
    "iter_rows",
    "keep_synced",
    "ledger_is_mock",
    "ledger_path",
    "open_ledger",
    "read_latest",
    "recorded_elsewhere",
    "refuse_other_counts",
    "write_csv",
]
