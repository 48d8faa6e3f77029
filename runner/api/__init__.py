"""The APIMart client: the only code that speaks HTTP to the API, and its retry policy.

Every outcome of a request is exactly one class of ``runner.errors`` (not sent, ambiguous,
rejected, model unavailable, fatal); answers are parsed defensively and scrubbed of the key.
"""

from __future__ import annotations

from runner.api.answers import Balance, Submitted, TaskState, Uploaded, valid_task_id
from runner.api.client import DEFAULT_BASE_URL, Client, Timeouts
from runner.api.failures import is_quota
from runner.api.retry import RetryPolicy
from runner.api.secret import Secret, api_key_from_env, key_file_warning

__all__ = [
    "DEFAULT_BASE_URL",
    "Balance",
    "Client",
    "RetryPolicy",
    "Secret",
    "Submitted",
    "TaskState",
    "Timeouts",
    "Uploaded",
    "api_key_from_env",
    "is_quota",
    "key_file_warning",
    "valid_task_id",
]
