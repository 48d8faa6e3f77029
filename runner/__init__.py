"""apimart-batch: validate, submit, record, poll and download APIMart video batches."""

from __future__ import annotations

# The public names load on first use: the console script (runner.entry) must install its
# signal handlers before anything heavy is imported, and importing it imports this first.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from runner.errors import RunnerError
    from runner.models import Job

__version__ = "0.2.0"

__all__ = ["Job", "RunnerError", "__version__"]


def __getattr__(name: str) -> object:
    if name == "Job":
        from runner.models import Job

        return Job
    if name == "RunnerError":
        from runner.errors import RunnerError

        return RunnerError
    msg = f"module 'runner' has no attribute {name!r}"
    raise AttributeError(msg)
