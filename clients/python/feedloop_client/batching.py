"""What both background senders share: a batch that knows when it is due, and the account of
what happened to every queued event.

An event handed to :meth:`log` ends in exactly one of three counters: ``sent`` (the gateway
accepted it), ``rejected`` (the gateway answered it with a reason and dead-lettered it: a bug
in the event, logged with that reason) or ``failed`` (the retries ran out, or the gateway
refused the batch). Failures are logged and handed to ``on_failure`` with the events, so the
app can keep them (write them to disk, re-send later); nothing is dropped without a trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from feedloop_client.config import BatchPolicy
from feedloop_client.events import Event
from feedloop_client.results import IngestResult

log = logging.getLogger("feedloop_client")

OnFailure = Callable[[list[Event], BaseException], None]


def queueable(event: Event) -> Event:
    """The event, checked before it is queued: the sender tells events from its markers by
    their type, and an event it cannot send should fail in the caller's hands, not later."""
    if not isinstance(event, dict):
        raise TypeError(f"events are dicts (as the builders make them), not {type(event).__name__}")
    return event


@dataclass
class Batch:
    """The events taken off the queue for the next request. ``take`` is the one rule of both
    senders: a batch is due when full, when its first event has waited ``max_wait_s``
    (monotonic clock) or when a flush marker arrives behind it."""

    policy: BatchPolicy
    events: list[Event] = field(default_factory=list)
    started: float = 0.0

    def wait_s(self) -> float | None:
        """How long to wait for more; None: wait for the first event as long as it takes."""
        if not self.events:
            return None
        return max(0.0, self.started + self.policy.max_wait_s - time.monotonic())

    def take(self, item: object) -> list[Event]:
        """Take what came off the queue (an event; None: the wait ran out; anything else: a
        marker) and return the events due now, possibly none."""
        if isinstance(item, dict):
            if not self.events:
                self.started = time.monotonic()
            self.events.append(item)
            if len(self.events) < self.policy.max_events:
                return []
        due, self.events = self.events, []
        return due


@dataclass
class Delivery:
    """Counters of the background sender, and where failures are reported."""

    on_failure: OnFailure | None = None
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def succeeded(self, result: IngestResult) -> None:
        with self._lock:
            self.sent += result.accepted
            self.rejected += result.rejected
        for error in result.errors:
            log.warning("feedloop_client.event_rejected event_id=%s reason=%s detail=%s",
                        error.event_id, error.reason, error.detail)

    def gave_up(self, events: list[Event], error: BaseException) -> None:
        with self._lock:
            self.failed += len(events)
        log.error("feedloop_client.batch_failed events=%d error=%s", len(events), error)
        if self.on_failure is not None:
            try:
                self.on_failure(events, error)
            except Exception:  # the sender must outlive a faulty callback, or later batches are lost too
                log.exception("feedloop_client.on_failure_raised")
