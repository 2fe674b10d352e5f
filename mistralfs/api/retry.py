"""Retrying transient failures with full-jitter exponential backoff, in bounded time.

The filesystem must not hang on a flaky network: every operation gives up
after ``max_attempts`` or ``total_budget`` seconds, whichever comes first,
and then raises :class:`Unavailable` (EIO for the caller).
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from mistralfs.api.errors import (
    ApiError,
    CertificateRejected,
    RateLimited,
    ServerError,
    Unavailable,
    strip_query,
)
from mistralfs.api.tls import verify_failure

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts, backoff bounds, and a wall-clock budget for the whole call."""

    max_attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 8.0
    total_budget: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * 2**(attempt-1)))."""
        cap = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return random.uniform(0.0, cap)


class RetryableStatus(Exception):
    """Raised by one attempt when the answer was 429/5xx; carries what the final error needs."""

    def __init__(self, error: ApiError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def is_retryable_transport_error(exc: BaseException) -> bool:
    """Connect errors, timeouts, resets and truncated answers; not bad URLs or local misuse."""
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or HTTP-date); None if absent or junk."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


async def run_with_retries(
    policy: RetryPolicy,
    attempt_fn: Callable[[int], Awaitable[T]],
    *,
    method: str,
    url: str,
    deadline: float | None = None,
) -> T:
    """Call ``attempt_fn(attempt)`` until it succeeds, fails for good, or the budget runs out.

    ``attempt_fn`` signals a retryable answer by raising :class:`RetryableStatus`;
    retryable httpx transport errors are recognised here. Any other exception
    propagates at once. ``deadline`` (trio clock) replaces the policy's
    ``total_budget`` counted from now, so that several calls making up one
    operation (an upload and the look-ups it needs) share one budget. A wait
    that would use up the rest of the budget is not waited: the call gives up
    at once rather than make an attempt with no time left.
    """
    clean_url = strip_query(url)
    if deadline is None:
        deadline = trio.current_time() + policy.total_budget
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_fn(attempt)
        except RetryableStatus as exc:
            failure: BaseException = exc
            reason = f"{exc.error.status} {exc.error.message}"
            retry_after = exc.retry_after
        except httpx.HTTPError as exc:
            rejected = verify_failure(exc)
            if rejected is not None:
                message = f"certificate verify failed: {rejected.verify_message}"
                raise CertificateRejected(message, method=method, url=clean_url) from None
            if not is_retryable_transport_error(exc):
                raise
            failure = exc
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            retry_after = None

        remaining = deadline - trio.current_time()
        delay = retry_after if retry_after is not None else policy.backoff(attempt)
        out_of_time = remaining <= 0 or delay >= remaining
        if attempt >= policy.max_attempts or out_of_time:
            error = _exhausted(failure, method, clean_url, attempt, policy)
            error.timed_out = out_of_time and isinstance(failure, httpx.TimeoutException)
            raise error from (failure if not isinstance(failure, RetryableStatus) else None)
        path = httpx.URL(clean_url).path if "://" in clean_url else clean_url
        logger.warning(
            "%s %s: %s; retry %d/%d in %.2fs",
            method,
            path,
            reason,
            attempt + 1,
            policy.max_attempts,
            delay,
        )
        await trio.sleep(delay)


def _exhausted(
    failure: BaseException, method: str, url: str, attempts: int, policy: RetryPolicy
) -> Unavailable:
    """The error to raise once retrying stops; keeps the last status and server message."""
    suffix = f" (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"
    if isinstance(failure, RetryableStatus):
        err = failure.error
        cls = RateLimited if err.status == 429 else ServerError
        return cls(err.message + suffix, status=err.status, method=method, url=url)
    text = str(failure)
    detail = f"{type(failure).__name__}: {text}" if text else type(failure).__name__
    return Unavailable(detail + suffix, status=None, method=method, url=url)
