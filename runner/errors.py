"""The error tree of apimart-batch.

Every error the runner raises on purpose is a :class:`RunnerError`; its ``exit_code``
is what the process exits with when the error ends a command::

    RunnerError                      exit 2 unless stated
    ├── UsageError                   bad flags or environment (e.g. no API key)
    ├── ManifestError                one or more manifests are invalid; carries Diagnostics
    ├── LedgerError                  ledger missing, unreadable, not ours, or of the other mode
    │   └── LedgerLockedError        exit 75: another run holds the ledger
    └── ApiError                     one answer (or non-answer) of the APIMart API
        ├── RetryableError           refused before processing: safe to send again
        ├── AmbiguousError           may have been created and billed: never resent blindly
        ├── RejectedError            the request is wrong: no retry
        │   └── ModelUnavailableError  the API does not serve the model: stop its jobs
        └── FatalApiError            exit 3: auth, permission or balance; stop the batch

Job-level API errors never end a run by themselves: the submit stage turns them into
ledger rows. Only ``FatalApiError`` stops a batch. Messages lead with *where*, then say
*what*, then *how to fix* (a second line starting ``hint:``).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_USAGE = 2
EXIT_API_STOPPED = 3
EXIT_LOCKED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class RunnerError(Exception):
    """Base of every error apimart-batch raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(RunnerError):
    """Bad command-line flags, environment or configuration."""


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a manifest, located by file, line and column (1-based)."""

    file: str
    line: int
    col: int
    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        head = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return f"{head}\n  hint: {self.hint}" if self.hint else head


class ManifestError(RunnerError):
    """One or more manifests are invalid; ``diagnostics`` lists every problem found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.file, d.line, d.col))
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class LedgerError(RunnerError):
    """The ledger cannot be used: missing, unreadable, not a ledger, or of the other mode."""


class LedgerLockedError(LedgerError):
    """Another apimart-batch process holds the ledger's lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"{path}: ledger is in use by {who}\n"
            "  hint: wait for that run to finish; two runs on one ledger could pay twice"
        )


class ApiError(RunnerError):
    """An answer, or a missing answer, of the APIMart API.

    Attributes:
        status: the HTTP status, or None when no response arrived.
        code: the ``error.code`` or ``error.type`` of the body, when there is one.
        retry_after: seconds the server asked us to wait, when it said so.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after


class RetryableError(ApiError):
    """Refused before processing (connection refused, 408, 429, 503): safe to resend."""


class AmbiguousError(ApiError):
    """The request may have been processed (timeout after sending, 500/502/504, bad 200)."""


class RejectedError(ApiError):
    """The API refused the request itself (400, 404, 413, 422): fix the job."""


class ModelUnavailableError(RejectedError):
    """The API says it does not serve the job's model (retired, or no channel for it).

    Nothing was created. The run stops sending that model's jobs and records them
    ``error``, so a later run may try again; jobs of other models go on.
    """

    def __init__(self, message: str, *, model: str, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.model = model


class FatalApiError(ApiError):
    """Auth, permission or balance problem (401, 402, 403): stop the whole batch."""

    exit_code = EXIT_API_STOPPED
