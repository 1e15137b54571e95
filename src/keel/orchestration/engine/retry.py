"""Retry policy for durable steps, on tenacity.

Retryable: rate limits (429, honouring ``Retry-After``), timeouts, 5xx and connection failures. Never retried:
validation errors (a malformed input or output will not fix itself), budget breakers, cancellation.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pydantic
import tenacity
from tenacity.wait import wait_base

from keel.errors import BudgetExceeded, InputError, StepFailed, UpstreamError, WorkflowError


@dataclass(kw_only=True, slots=True, frozen=True)
class RetryPolicy:
    """How often, and how patiently, a step is tried (Temporal's ``RetryPolicy`` shape)."""

    max_attempts: int = 3
    """Total tries, the first one included. 1 disables retries."""
    initial_interval: float = 0.5
    """Seconds before the first retry."""
    backoff_coefficient: float = 2.0
    maximum_interval: float = 30.0
    """Cap on the exponential part of the wait. A server's ``Retry-After`` may ask for longer and is honoured."""
    jitter: float = 0.5
    """Up to this many random seconds are added to each wait, so that retries of many tasks do not align."""
    retryable: tuple[type[BaseException], ...] = (TimeoutError, httpx.TransportError)
    """Extra exception types to retry, on top of retryable ``UpstreamError`` and HTTP 429/5xx."""
    non_retryable: tuple[type[BaseException], ...] = ()
    """Exception types never retried, even if they would otherwise be."""

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, self.non_retryable) or isinstance(exc, _NEVER):
            return False
        if isinstance(exc, UpstreamError):
            return exc.retryable
        if isinstance(exc, httpx.HTTPStatusError):
            code = exc.response.status_code
            return code == 429 or code >= 500
        return isinstance(exc, self.retryable)

    def wait_after(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds to wait after failed try number ``attempt``: the backoff, or longer if the server asked."""
        backoff = min(self.initial_interval * self.backoff_coefficient ** (attempt - 1), self.maximum_interval)
        backoff += random.uniform(0, self.jitter) if self.jitter > 0 else 0.0
        asked = retry_after(exc)
        return max(asked, backoff) if asked is not None else backoff

    def retrying(
        self, *, already: int = 0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> tenacity.AsyncRetrying:
        """The tries left after ``already`` failed ones (whose wait the caller has slept). The waits go through
        ``sleep``, which a test makes fast (see ``WorkflowContext(sleep=…)``)."""
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(max(self.max_attempts - already, 1)),
            wait=_RetryAfterOrBackoff(self, already),
            retry=tenacity.retry_if_exception(self.is_retryable),
            reraise=True,
            sleep=sleep,
        )


# Validation and budget failures are deterministic: trying again only burns money.
_NEVER: tuple[type[BaseException], ...] = (
    pydantic.ValidationError,
    InputError,
    BudgetExceeded,
    StepFailed,
    WorkflowError,
    ValueError,
    TypeError,
)

NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


def retry_after(exc: BaseException | None) -> float | None:
    if isinstance(exc, UpstreamError):
        return exc.retry_after
    if isinstance(exc, httpx.HTTPStatusError):
        value = exc.response.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None
    return None


class _RetryAfterOrBackoff(wait_base):
    def __init__(self, policy: RetryPolicy, offset: int) -> None:
        self._policy = policy
        self._offset = offset

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        return self._policy.wait_after(retry_state.attempt_number + self._offset, exc)
