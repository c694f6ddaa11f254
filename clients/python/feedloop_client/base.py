"""What the sync and the async client share: one typed constructor, event builders bound to
the app, the delivery counters. Only the I/O differs between them (``_open``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import httpx

from feedloop_client import events
from feedloop_client.batching import Delivery, OnFailure
from feedloop_client.config import BatchPolicy, RetryPolicy

# Routing sits on the path of a chat request: an app should serve its default adapter rather
# than wait out backoffs, so route() tries once.
ROUTE_RETRY = RetryPolicy(attempts=1)


class ClientBase(ABC):
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        app_id: str,
        retry: RetryPolicy = RetryPolicy(),
        batch: BatchPolicy = BatchPolicy(),
        timeout_s: float = 10.0,
        on_failure: OnFailure | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: httpx's (sync or async to match the client), e.g. for a proxy."""
        self.base_url, self.app_id = base_url.rstrip("/"), app_id
        self.retry, self.batch = retry, batch
        self.delivery = Delivery(on_failure)
        self._closed = False
        self._open({
            "base_url": self.base_url,
            "headers": {"Authorization": f"Bearer {api_key}"},
            "timeout": timeout_s,
            "transport": transport,
        })

    @abstractmethod
    def _open(self, http_options: dict[str, Any]) -> None:
        """The client's httpx client, queue and sender state."""

    def interaction(self, **fields: Any) -> events.Event:
        """An interaction of this app; see :func:`feedloop_client.events.interaction`."""
        return events.interaction(self.app_id, **fields)

    def feedback(self, about: events.About, kind: str, **fields: Any) -> events.Event:
        """Feedback of this app; see :func:`feedloop_client.events.feedback`."""
        return events.feedback(self.app_id, about, kind, **fields)

    def annotation(self, about: events.About, **fields: Any) -> events.Event:
        """An annotation of this app; see :func:`feedloop_client.events.annotation`."""
        return events.annotation(self.app_id, about, **fields)
