"""When to retry, and how long to wait first: one rule for the sync and the async client.

Retried: 429 (over the app's rate limit), 502/503/504 (a proxy, the broker or the gateway
briefly unavailable) and transport errors (connection refused, timeouts). Every other status
is an answer, not an outage: a 4xx names what the caller must fix, and retrying it only
delays the error. Events are safe to re-send because their ids were made when they were
built, and the pipeline de-duplicates on them.

The wait honours ``Retry-After`` (seconds or an HTTP date) when the gateway sends one: the
rate limiter knows when the next token is due, and retrying sooner only earns another 429.
Jitter is added on top of it, never taken off, so many clients throttled at once spread out
without any of them coming back early. Without the header the backoff is exponential with
full jitter.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from feedloop_client.config import RetryPolicy
from feedloop_client.errors import FeedloopError

RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def wait_before_retry(policy: RetryPolicy, attempt: int, failure: httpx.Response | httpx.TransportError) -> float:
    """Seconds to wait before attempt ``attempt + 1``; raises when there must be none: the
    gateway's error for a response, the transport error itself otherwise."""
    retried = isinstance(failure, httpx.TransportError) or failure.status_code in RETRIED_STATUSES
    if not retried or attempt >= policy.attempts:
        if isinstance(failure, httpx.TransportError):
            raise failure
        raise FeedloopError.from_response(failure)
    jitter = random.uniform(0, policy.base_delay_s)
    told = None if isinstance(failure, httpx.TransportError) else retry_after_s(failure)
    if told is not None:
        return min(told, policy.max_retry_after_s) + jitter
    return random.uniform(0, min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1)))


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unreadable: fall back to the backoff
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
