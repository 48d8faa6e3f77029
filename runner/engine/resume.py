"""Resume rules: given a job and its latest ledger row, send it or not, and why.

These rules are what "never pay twice" rests on:

- no row, or last status ``error`` (known not created): submit;
- ``unknown`` (may exist and be billed): hold, unless ``--resubmit-unknown``, which
  resends with the same Idempotency-Key so an honouring server replays it;
- ``rejected``: hold while the request is unchanged (it would be refused again);
- a task id exists (submitted and every later state): skip, already paid for;
- ``failed``, ``cancelled`` or ``expired`` (the task ended, or its link died, with no
  video on disk): skip, unless ``--retry-failed``, which buys the next *take*;
- the same id recorded for another manifest (a shared ledger): hold and say so;
- the request changed since its row was written: hold and say so, unless
  ``--resubmit-changed`` (a new, deliberate purchase, made only once the earlier
  task's video is downloaded, its link expired, or the task ended without one); a
  rejected or errored job whose request changed is simply submitted, since that is how
  it gets fixed.

A take is one purchase of a job id. The ledger's ``take`` column counts them (empty: 1);
a deliberate new purchase after a task existed is the next take, whose Idempotency-Key
differs (so a key-honouring server cannot replay the earlier task) and whose video gets
a file of its own. Resending an ``error`` or ``unknown`` job keeps its take, and so its key.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from runner.models import Job, parse_iso

Verdict = Literal["submit", "done", "unknown", "rejected", "changed"]

#: Statuses that mean "a task was never created": safe to send again.
NOT_CREATED = frozenset({"error"})
#: Statuses of a known task whose video is not downloaded yet.
UNSECURED = frozenset({"submitted", "pending", "processing", "completed"})
#: Statuses that mean "it may exist": only --resubmit-unknown sends again.
AMBIGUOUS = frozenset({"unknown", "submitting"})
#: Statuses of a task that ended with no video to keep: only --retry-failed buys again.
REGENERABLE = frozenset({"failed", "cancelled", "expired"})


def recorded_take(row: Mapping[str, str] | None) -> int:
    """The take a row records (1 for no row, an empty cell, or a ledger without takes)."""
    cell = (row or {}).get("take", "")
    return int(cell) if cell.isdigit() and int(cell) > 0 else 1


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one job this run, and the reason in words."""

    job: Job
    verdict: Verdict
    reason: str


def decide(
    job: Job,
    row: Mapping[str, str] | None,
    *,
    resubmit_unknown: bool = False,
    resubmit_changed: bool = False,
    retry_failed: bool = False,
) -> Decision:
    """Apply the resume rules to one job; the decision's job carries the take to send."""
    if row is None:
        return Decision(job, "submit", "new")
    status = row.get("status", "")
    task = row.get("task_id") or "?"
    take = recorded_take(row)
    job = replace(job, take=take)
    # A new purchase after a task existed (or may have) is the next take: a new key.
    following = replace(job, take=take + 1)
    recorded = row.get("fingerprint", "")
    if recorded and recorded != job.fingerprint:
        if status in NOT_CREATED or status == "rejected":
            return Decision(job, "submit", f"changed since it was {status}")
        expires = parse_iso(row.get("expires_at", ""))
        lost = status == "expired" or (
            status == "completed" and expires is not None and expires <= time.time())
        if resubmit_changed and status in UNSECURED and not lost:
            # Only the last row of an id is polled and fetched: replacing it now would
            # abandon a paid video that is still running or not yet on disk.
            return Decision(
                job,
                "changed",
                f"request changed, but its earlier task {task} is {status} and its video is "
                "not on disk yet; let 'status --wait' and 'download' fetch it first",
            )
        if resubmit_changed:
            return Decision(following, "submit",
                            f"changed; take {take + 1} bought by --resubmit-changed")
        what = f"submitted as task {task}" if status not in AMBIGUOUS else f"recorded as {status}"
        return Decision(
            job,
            "changed",
            f"request changed since it was {what}; give the job a new id to submit the new "
            "request (or pass --resubmit-changed to pay for it under the same id)",
        )
    recorded_key = row.get("idempotency_key", "")
    if recorded_key and recorded_key != job.idempotency_key:
        # Same id and request, another manifest name: two manifests share this ledger and id.
        where = row.get("manifest") or "another manifest"
        return Decision(
            job,
            "changed",
            f"this job id is already recorded for {where} (another manifest name) in this "
            "ledger; give the job another id, or use a separate --ledger",
        )
    if status in NOT_CREATED:
        return Decision(job, "submit", "retry after error")
    if status in AMBIGUOUS:
        if resubmit_unknown:
            return Decision(job, "submit", "unknown; resent with the same Idempotency-Key")
        return Decision(job, "unknown", "may have been created and billed (status unknown)")
    if status == "rejected":
        return Decision(job, "rejected", f"rejected by the API: {row.get('error') or '?'}")
    if status in REGENERABLE and retry_failed:
        return Decision(following, "submit",
                        f"{status} (task {task}); take {take + 1} bought by --retry-failed")
    return Decision(job, "done", f"already {status} (task {task})")


def decide_across(
    job: Job,
    row: Mapping[str, str] | None,
    elsewhere: tuple[str, Mapping[str, str]] | None,
    **flags: bool,
) -> Decision:
    """``decide`` on the job's newest row: its own ledger's ``row``, or the newer one of
    another ledger of its family (``elsewhere``: that ledger and its row); ``flags`` are
    ``decide``'s."""
    other, newest = elsewhere if elsewhere is not None else (None, row)
    decision = decide(job, newest, **flags)
    if other is None or decision.verdict == "submit":
        return decision  # once sent, it is recorded in this run's ledger
    return replace(decision, reason=f"recorded in other ledger {other}: {decision.reason}")
