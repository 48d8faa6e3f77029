"""Stages 2 to 4, the engine: decide, submit, poll and download, bounded and stop-aware.

``resume`` decides what a rerun sends, ``schedule`` bounds concurrency and retries,
``submit`` turns each job into ledger rows, ``poll`` follows tasks, ``download`` fetches
videos, ``lifecycle`` runs polling and downloads as one pipeline, and ``runtime`` holds the
run's environment (the emulator for ``--mock``, signals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from runner.engine.resume import REGENERABLE, Decision, decide, decide_across, recorded_take
    from runner.engine.runtime import connect, fewer_collections, interrupts, merged_error
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
    "decide_across",
    "default_out",
    "expires_ts",
    "fewer_collections",
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
#: Which module holds each public name: they load on first use, so that ``report`` and
#: ``plan`` (which need a few pure helpers) do not import the network code.
_HOME = {
    "Decision": "resume",
    "LedgerConfig": "lifecycle",
    "Limiter": "schedule",
    "Media": "lifecycle",
    "NEEDS_ACTION": "lifecycle",
    "NO_VIDEO_STATES": "poll",
    "POLLABLE_STATES": "poll",
    "PollTiming": "poll",
    "REGENERABLE": "resume",
    "Submitter": "submit",
    "connect": "runtime",
    "decide": "resume",
    "decide_across": "resume",
    "default_out": "lifecycle",
    "expires_ts": "download",
    "fewer_collections": "runtime",
    "interrupts": "runtime",
    "merged_error": "runtime",
    "needs_action": "lifecycle",
    "needs_download": "download",
    "prepare_out": "lifecycle",
    "recorded_take": "resume",
    "regenerate_hint": "lifecycle",
    "rerun_command": "lifecycle",
    "run_download": "lifecycle",
    "run_pool": "schedule",
    "run_status": "lifecycle",
    "video_folder": "download",
    "warn_other_targets": "lifecycle",
    "warn_unforeseen": "lifecycle",
    "write_json": "lifecycle",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"runner.engine.{_HOME[name]}"), name)
    msg = f"module 'runner.engine' has no attribute {name!r}"
    raise AttributeError(msg)
