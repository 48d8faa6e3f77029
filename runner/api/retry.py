"""Retry policy: how often and how long to wait before sending a request again.

The vocabulary is stamina's: bounded by ``attempts`` *and* a total ``timeout``,
exponential backoff (``wait_initial`` × ``wait_exp_base`` ** n, capped at ``wait_max``)
with full jitter, and the server's ``Retry-After`` honoured as the minimum wait.
Which errors are worth a retry is decided by the caller, by error class.

Every wait is bounded: never more than ``MAX_SERVER_WAIT`` (10 minutes, whatever the
server asks), never more than what is left of the policy's ``timeout``, nor of any
other budget the caller names (``left``, e.g. what remains of ``--deadline``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Final

#: The longest single wait: a ``Retry-After: 99999999`` or ``retry_after: 1e300`` waits this.
MAX_SERVER_WAIT: Final = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds and backoff for resending one request.

    Args:
        attempts: total tries, the first one included (1 = never retry).
        timeout: seconds from the first try after which no new try starts.
        wait_initial: the backoff ceiling before the second try.
        wait_max: the largest backoff ceiling.
        wait_exp_base: growth of the ceiling per try.
    """

    attempts: int = 5
    timeout: float = 600.0
    wait_initial: float = 1.0
    wait_max: float = 60.0
    wait_exp_base: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            msg = f"'attempts' must be >= 1, got {self.attempts}"
            raise ValueError(msg)
        if not self.timeout > 0:  # written so that NaN (for which `nan <= 0` is False) fails too
            msg = f"'timeout' must be > 0, got {self.timeout}"
            raise ValueError(msg)

    def wait(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        elapsed: float = 0.0,
        left: float | None = None,
    ) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        Full jitter spreads workers that failed together; ``retry_after`` is a floor,
        because the server knows better than our guess (a negative, NaN or infinite one
        is no advice). The result is at most ``MAX_SERVER_WAIT``, at most what is left of
        ``timeout`` after ``elapsed`` seconds since the first try, and at most ``left``.
        """
        try:
            growth = self.wait_exp_base ** max(0, attempt - 1)
        except OverflowError:  # a float power past ~1e308 raises instead of giving inf
            growth = math.inf
        ceiling = min(self.wait_max, self.wait_initial * growth) if self.wait_initial > 0 else 0.0
        jittered = random.uniform(0.0, ceiling) if ceiling > 0 else 0.0
        floor = retry_after if retry_after is not None and math.isfinite(retry_after) else 0.0
        wait = max(jittered, floor)
        bounds = [MAX_SERVER_WAIT, self.timeout - elapsed]
        if left is not None:
            bounds.append(left)
        bound = min(b if not math.isnan(b) else 0.0 for b in bounds)
        return max(0.0, min(wait, bound)) if math.isfinite(wait) else max(0.0, bound)

    def with_attempts(self, attempts: int) -> RetryPolicy:
        """A copy with another attempt bound."""
        return replace(self, attempts=attempts)


#: For tests: no backoff of our own (a Retry-After still sets the floor; tests fake the sleep).
NO_WAIT = RetryPolicy(attempts=5, wait_initial=0.0, wait_max=0.0)
