"""The client's typed configuration: how it retries and how it batches.

Frozen dataclasses rather than keyword soup: one value can be shared by many clients, and a
typo in a field name fails at construction instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429, 502, 503, 504 and transport errors (see :mod:`feedloop_client.retry`).

    ``attempts`` counts the first try: 1 means never retry. Backoff is exponential from
    ``base_delay_s`` with full jitter, capped at ``max_delay_s``; a ``Retry-After`` header
    replaces the backoff (capped at ``max_retry_after_s``, so a confused proxy cannot park a
    sender for hours)."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts counts the first try: it must be >= 1")


@dataclass(frozen=True)
class BatchPolicy:
    """Background batching of :meth:`log`-ged events.

    A batch is sent when it holds ``max_events`` or when its first event has waited
    ``max_wait_s``. The queue holds at most ``max_queue`` events: a sender that outruns the
    gateway is slowed down (sync: blocked up to ``put_timeout_s``, then :class:`QueueFull`;
    async: awaits room) rather than growing memory without bound or dropping events."""

    max_events: int = 100
    max_wait_s: float = 1.0
    max_queue: int = 10_000
    put_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_queue < 1:
            raise ValueError("max_events and max_queue must be >= 1")
