"""The APIMart client: the only code that speaks HTTP to the API, and its retry policy.

Every outcome of a request is exactly one class of ``runner.errors`` (not sent, ambiguous,
rejected, model unavailable, fatal); answers are parsed defensively and scrubbed of the key.
The names that need aiohttp (``Client``, ``Timeouts``, ``is_quota``) load on first use, so
that commands which never touch the network do not pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.api.answers import Balance, Submitted, TaskState, Uploaded, valid_task_id
from runner.api.base import DEFAULT_BASE_URL
from runner.api.retry import RetryPolicy
from runner.api.secret import Secret, api_key_from_env, key_file_warning

if TYPE_CHECKING:
    from runner.api.client import Client, Timeouts
    from runner.api.failures import is_quota

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
_NETWORK = {"Client": "client", "Timeouts": "client", "is_quota": "failures"}


def __getattr__(name: str) -> Any:
    if name in _NETWORK:
        import importlib

        return getattr(importlib.import_module(f"runner.api.{_NETWORK[name]}"), name)
    msg = f"module 'runner.api' has no attribute {name!r}"
    raise AttributeError(msg)
