"""What the sync and the async client share: configuration, event builders bound to the
app, the delivery counters, and the httpx options. Only the I/O differs between them."""

from __future__ import annotations

from typing import Any

from feedloop_client import events
from feedloop_client.batching import Delivery, OnFailure
from feedloop_client.config import BatchPolicy, RetryPolicy

# Routing sits on the path of a chat request: an app should serve its default adapter rather
# than wait out backoffs, so route() tries once.
ROUTE_RETRY = RetryPolicy(attempts=1)


class ClientBase:
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
    ) -> None:
        self.base_url, self.api_key, self.app_id = base_url.rstrip("/"), api_key, app_id
        self.retry, self.batch = retry, batch
        self.delivery = Delivery(on_failure)
        self._http_options: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": {"Authorization": f"Bearer {api_key}"},
            "timeout": timeout_s,
        }

    def interaction(self, **fields: Any) -> events.Event:
        """An interaction of this app; see :func:`feedloop_client.events.interaction`."""
        return events.interaction(self.app_id, **fields)

    def feedback(self, about: events.About, kind: str, **fields: Any) -> events.Event:
        """Feedback of this app; see :func:`feedloop_client.events.feedback`."""
        return events.feedback(self.app_id, about, kind, **fields)

    def annotation(self, about: events.About, **fields: Any) -> events.Event:
        """An annotation of this app; see :func:`feedloop_client.events.annotation`."""
        return events.annotation(self.app_id, about, **fields)
