"""``FeedloopClient``: blocking calls, and a background thread that sends logged events in batches.

``send`` posts at once and returns the gateway's answer (or raises). ``log`` queues events for
a daemon thread that batches them by size and time; ``flush`` waits until everything logged so
far has been sent, and ``close`` (the ``with`` block's exit, or interpreter exit through
``atexit``: a daemon thread alone would die with queued events in it) flushes and stops.
The thread starts with the first ``log``, so a client that only calls ``send`` never has one.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from feedloop_client import calls
from feedloop_client.base import ROUTE_RETRY, ClientBase
from feedloop_client.batching import Batch, queueable
from feedloop_client.config import RetryPolicy
from feedloop_client.errors import QueueFull
from feedloop_client.events import Event
from feedloop_client.results import Erasure, IngestResult, RouteAnswer
from feedloop_client.retry import wait_before_retry

T = TypeVar("T")


@dataclass
class _Marker:
    """Put on the queue behind the events it must wait for: set once they are sent."""

    stop: bool
    done: threading.Event = field(default_factory=threading.Event)


class FeedloopClient(ClientBase):
    """The blocking client; its background sender is a daemon thread."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.Client(**http_options)
        self._queue: queue.Queue[Event | _Marker] = queue.Queue(self.batch.max_queue)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, events: Iterable[Event]) -> IngestResult:
        """Post events now, retried; the answer names each rejected event's reason."""
        return self._execute(calls.post_events(calls.events_body(events)))

    def send_raw(self, body: bytes, content_type: str = "application/json") -> IngestResult:
        """Post a prepared body (a JSON array or JSON lines) as it is, retried."""
        return self._execute(calls.post_events(body, content_type))

    def route(self, context: Mapping[str, Any] | None = None) -> RouteAnswer:
        """Which adapter should serve a request with this context. Tried once: on
        FeedloopError or httpx.TransportError serve your default adapter, propensity 1.0."""
        return self._execute(calls.route(self.app_id, context), ROUTE_RETRY)

    def erase(self, user_id: str) -> Erasure:
        """Erase one of this app's users: their pseudonym key is shredded."""
        return self._execute(calls.erase(user_id))

    def log(self, *events: Event) -> None:
        """Queue events for the background sender; raises QueueFull if no room came in time."""
        self._start()
        for event in events:
            try:
                self._queue.put(queueable(event), timeout=self.batch.put_timeout_s)
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} events queued for {self.batch.put_timeout_s} s") from None

    def flush(self) -> None:
        """Wait until every event logged before this call has been sent (or reported failed)."""
        if self._worker is not None and not self._closed:  # closed: the sender has stopped, all sent
            self._mark(stop=False)

    def close(self) -> None:
        """Send what is queued, stop the sender, close the connections; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._worker is not None:
            self._mark(stop=True)
            self._worker.join()
            atexit.unregister(self.close)
        self._http.close()

    def __enter__(self) -> FeedloopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="feedloop-client", daemon=True)
                self._worker.start()
                atexit.register(self.close)

    def _mark(self, stop: bool) -> None:
        marker = _Marker(stop)
        self._queue.put(marker)
        marker.done.wait()

    def _run(self) -> None:
        batch = Batch(self.batch)
        while True:
            try:
                item = self._queue.get(timeout=batch.wait_s())
            except queue.Empty:
                item = None  # the batch's time is up
            self._deliver(batch.take(item))
            if isinstance(item, _Marker):
                item.done.set()
                if item.stop:
                    return

    def _deliver(self, events: list[Event]) -> None:
        if not events:
            return
        try:
            self.delivery.succeeded(self.send(events))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the thread must live on and say so
            self.delivery.gave_up(events, exc)

    def _execute(self, call: calls.Call[T], retry: RetryPolicy | None = None) -> T:
        for attempt in itertools.count(1):
            try:
                response = self._http.request(call.method, call.path, content=call.content, headers=call.headers)
            except httpx.TransportError as exc:
                wait = wait_before_retry(retry or self.retry, attempt, exc)
            else:
                if response.status_code == call.ok:
                    return call.parse(response.json())
                wait = wait_before_retry(retry or self.retry, attempt, response)
            time.sleep(wait)
