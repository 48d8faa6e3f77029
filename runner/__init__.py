"""apimart-batch: validate, submit, record, poll and download APIMart Sora 2 video batches."""

from __future__ import annotations

from runner.errors import RunnerError
from runner.models import Job

__version__ = "0.1.0"

__all__ = ["Job", "RunnerError", "__version__"]
