"""Per-app request rate limits: a token bucket per API key's app.

Each app may send ``burst`` requests at once and ``requests_per_s`` on average after that
(``FEEDLOOP_RATE_LIMITS``, with ``"*"`` for every app without its own entry; none set: no
limit). A request over the limit is answered 429 with ``Retry-After``, the seconds until the
bucket holds a token again: the ``openai`` package and most HTTP clients wait that long and
retry. Counted per request, not per event: one ``POST /v1/events`` of 500 events is one.

The buckets live in the gateway process: with several gateway replicas behind a load
balancer each enforces the limit on its own share (set the limit per replica).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field

EVERY_APP = "*"


class RateLimit(BaseModel):
    """One app's limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_s: float = Field(gt=0, description="Requests per second on average.")
    burst: int = Field(ge=1, description="Requests at once, after a quiet spell.")


class RateLimiter:
    """Token buckets per app; ``wait_s(app)`` takes a token or says how long until one.

    >>> limiter = RateLimiter({"*": RateLimit(requests_per_s=1, burst=2)}, clock=lambda: 0.0)
    >>> [limiter.wait_s("chat-web") for _ in range(3)]
    [0.0, 0.0, 1.0]
    """

    def __init__(self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # app -> (tokens, when counted)

    def limit_of(self, app_id: str) -> RateLimit | None:
        return self.limits.get(app_id, self.limits.get(EVERY_APP))

    def wait_s(self, app_id: str) -> float:
        """0 when the request may go on (a token is taken), else the seconds to wait."""
        limit = self.limit_of(app_id)
        if limit is None:
            return 0.0
        now = self.clock()
        tokens, then = self._buckets.get(app_id, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - then) * limit.requests_per_s)
        if tokens >= 1:
            self._buckets[app_id] = (tokens - 1, now)
            return 0.0
        self._buckets[app_id] = (tokens, now)
        return (1 - tokens) / limit.requests_per_s

    def detail(self, app_id: str, wait_s: float) -> str:
        limit = self.limit_of(app_id)
        return (f"app '{app_id}' is over its rate limit of {limit.requests_per_s:g} requests/s (burst {limit.burst}): "
                f"retry after {wait_s:.1f} s, or ask the operator to raise FEEDLOOP_RATE_LIMITS")

    @staticmethod
    def retry_after(wait_s: float) -> dict[str, str]:
        """The ``Retry-After`` header: whole seconds, rounded up (at least 1)."""
        return {"Retry-After": str(max(1, math.ceil(wait_s)))}
