"""Stages 2 to 4, the engine: decide, submit, poll and download, bounded and stop-aware.

``resume`` decides what a rerun sends, ``schedule`` bounds concurrency and retries,
``submit`` turns each job into ledger rows, ``poll`` follows tasks, ``download`` fetches
videos, ``lifecycle`` runs polling and downloads as one pipeline, and ``runtime`` holds the
run's environment (the emulator for ``--mock``, signals).
"""

from __future__ import annotations

from runner.engine.download import expires_ts, needs_download, video_folder
from runner.engine.lifecycle import (
    NEEDS_ACTION,
    LedgerConfig,
    Media,
    default_out,
    needs_action,
    prepare_out,
    regenerate_hint,
    rerun_command,
    run_download,
    run_status,
    warn_other_targets,
    warn_unforeseen,
    write_json,
)
from runner.engine.poll import NO_VIDEO_STATES, POLLABLE_STATES, PollTiming
from runner.engine.resume import REGENERABLE, Decision, decide, recorded_take
from runner.engine.runtime import connect, interrupts, merged_error
from runner.engine.schedule import Limiter, run_pool
from runner.engine.submit import Submitter

__all__ = [
    "NEEDS_ACTION",
    "NO_VIDEO_STATES",
    "POLLABLE_STATES",
    "REGENERABLE",
    "Decision",
    "LedgerConfig",
    "Limiter",
    "Media",
    "PollTiming",
    "Submitter",
    "connect",
    "decide",
    "default_out",
    "expires_ts",
    "interrupts",
    "merged_error",
    "needs_action",
    "needs_download",
    "prepare_out",
    "recorded_take",
    "regenerate_hint",
    "rerun_command",
    "run_download",
    "run_pool",
    "run_status",
    "video_folder",
    "warn_other_targets",
    "warn_unforeseen",
    "write_json",
]
