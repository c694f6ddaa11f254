"""``AsyncFeedloopClient``: the same calls awaited, and a background task that sends logged events in batches.

The task starts with the first ``log`` on the running event loop and ends on ``aclose`` (or
the ``async with`` block's exit), which sends what is queued first. There is no atexit hook:
at interpreter exit the loop is already gone, so an app closes the client before its loop
ends (``async with`` does it). ``log`` awaits room in the bounded queue, which slows a sender
that outruns the gateway instead of growing memory or dropping events.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from feedloop_client import calls
from feedloop_client.base import ROUTE_RETRY, ClientBase
from feedloop_client.batching import Batch, queueable
from feedloop_client.config import RetryPolicy
from feedloop_client.events import Event
from feedloop_client.results import Erasure, IngestResult, RouteAnswer
from feedloop_client.retry import wait_before_retry

T = TypeVar("T")


@dataclass
class _Marker:
    """Put on the queue behind the events it must wait for: set once they are sent."""

    stop: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncFeedloopClient(ClientBase):
    """The asyncio client; its background sender is a task on the running loop."""

    def _open(self, http_options: dict[str, Any]) -> None:
        self._http = httpx.AsyncClient(**http_options)
        self._queue: asyncio.Queue[Event | _Marker] = asyncio.Queue(self.batch.max_queue)
        self._worker: asyncio.Task[None] | None = None

    async def send(self, events: Iterable[Event]) -> IngestResult:
        """Post events now, retried; the answer names each rejected event's reason."""
        return await self._execute(calls.post_events(calls.events_body(events)))

    async def send_raw(self, body: bytes, content_type: str = "application/json") -> IngestResult:
        """Post a prepared body (a JSON array or JSON lines) as it is, retried."""
        return await self._execute(calls.post_events(body, content_type))

    async def route(self, context: Mapping[str, Any] | None = None) -> RouteAnswer:
        """Which adapter should serve a request with this context; tried once (see the sync client)."""
        return await self._execute(calls.route(self.app_id, context), ROUTE_RETRY)

    async def erase(self, user_id: str) -> Erasure:
        """Erase one of this app's users: their pseudonym key is shredded."""
        return await self._execute(calls.erase(user_id))

    async def log(self, *events: Event) -> None:
        """Queue events for the background task (waiting for room when the queue is full)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="feedloop-client")
        for event in events:
            await self._queue.put(queueable(event))

    async def flush(self) -> None:
        """Wait until every event logged before this call has been sent (or reported failed)."""
        if self._worker is not None and not self._closed:  # closed: the sender has stopped, all sent
            await self._mark(stop=False)

    async def aclose(self) -> None:
        """Send what is queued, stop the sender, close the connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            await self._mark(stop=True)
            await self._worker
        await self._http.aclose()

    async def __aenter__(self) -> AsyncFeedloopClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _mark(self, stop: bool) -> None:
        marker = _Marker(stop)
        await self._queue.put(marker)
        await marker.done.wait()

    async def _run(self) -> None:
        batch = Batch(self.batch)
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), batch.wait_s())
            except TimeoutError:
                item = None  # the batch's time is up
            await self._deliver(batch.take(item))
            if isinstance(item, _Marker):
                item.done.set()
                if item.stop:
                    return

    async def _deliver(self, events: list[Event]) -> None:
        if not events:
            return
        try:
            self.delivery.succeeded(await self.send(events))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the task must live on and say so
            self.delivery.gave_up(events, exc)

    async def _execute(self, call: calls.Call[T], retry: RetryPolicy | None = None) -> T:
        for attempt in itertools.count(1):
            try:
                response = await self._http.request(call.method, call.path, content=call.content, headers=call.headers)
            except httpx.TransportError as exc:
                wait = wait_before_retry(retry or self.retry, attempt, exc)
            else:
                if response.status_code == call.ok:
                    return call.parse(response.json())
                wait = wait_before_retry(retry or self.retry, attempt, response)
            await asyncio.sleep(wait)
