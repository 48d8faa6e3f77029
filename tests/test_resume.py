"""Resume rules: which jobs a rerun sends, holds or skips, and why."""

from __future__ import annotations

from dataclasses import replace

import pytest
from jobfactory import make_job

from runner.engine.resume import decide
from runner.models import Job

JOB = make_job("cat", model="sora-2", prompt="a cat", duration=8, manifest_name="m")


def row(status: str, job: Job = JOB, **cells: str) -> dict[str, str]:
    """A ledger row as the run would have written it for ``job``."""
    return {"status": status, "task_id": "task_1", "fingerprint": job.fingerprint,
            "idempotency_key": job.idempotency_key, **cells}


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        pytest.param("error", "submit", id="error-retried"),
        pytest.param("unknown", "unknown", id="unknown-held"),
        pytest.param("submitting", "unknown", id="submitting-held"),
        pytest.param("rejected", "rejected", id="rejected-held"),
        pytest.param("submitted", "done", id="submitted-done"),
        pytest.param("processing", "done", id="processing-done"),
        pytest.param("downloaded", "done", id="downloaded-done"),
        pytest.param("failed", "done", id="failed-done"),
    ],
)
def test_unchanged_job_by_last_status(status, verdict):
    """An unchanged job is sent again only after 'error'."""
    assert decide(JOB, row(status)).verdict == verdict


def test_new_job_is_sent():
    """A job with no row is new."""
    assert decide(JOB, None).verdict == "submit"


def test_unknown_is_sent_only_when_asked():
    """--resubmit-unknown turns a held unknown job into a submission."""
    assert decide(JOB, row("unknown"), resubmit_unknown=True).verdict == "submit"


@pytest.mark.parametrize(
    ("status", "flag", "verdict"),
    [
        pytest.param("submitted", False, "changed", id="paid-held"),
        pytest.param("submitted", True, "changed", id="running-not-replaced"),
        pytest.param("completed", True, "changed", id="not-downloaded-not-replaced"),
        pytest.param("downloaded", True, "submit", id="downloaded-resubmit-changed"),
        pytest.param("failed", True, "submit", id="failed-resubmit-changed"),
        pytest.param("unknown", False, "changed", id="unknown-held"),
        pytest.param("rejected", False, "submit", id="rejected-fixed"),
        pytest.param("error", False, "submit", id="error-fixed"),
    ],
)
def test_changed_request(status, flag, verdict):
    """An edited job is held once it may have been paid for, and sent when it was refused."""
    edited = replace(JOB, request={**JOB.request, "prompt": "a cat, at night"})
    decision = decide(edited, row(status), resubmit_changed=flag)
    assert decision.verdict == verdict
    if verdict == "changed":
        assert "new id" in decision.reason or "fetch it first" in decision.reason


def test_an_expired_link_does_not_block_resubmit_changed():
    """A completed task whose link expired can no longer be fetched: it blocks nothing."""
    edited = replace(JOB, request={**JOB.request, "prompt": "a cat, at night"})
    expired = row("completed", expires_at="2020-01-01T00:00:00Z")
    assert decide(edited, expired, resubmit_changed=True).verdict == "submit"
    alive = row("completed", expires_at="2999-01-01T00:00:00Z")
    assert decide(edited, alive, resubmit_changed=True).verdict == "changed"


def test_same_id_from_another_manifest_is_held():
    """A shared ledger: the same id and request under another manifest name is not ours."""
    other = replace(JOB, manifest_name="other")
    decision = decide(other, row("error", manifest="jobs/m.yaml"))
    assert decision.verdict == "changed"
    assert "jobs/m.yaml" in decision.reason
