"""A small Python client for chat apps: log interactions and feedback to the gateway.

>>> client = FeedloopClient("http://127.0.0.1:8080", api_key="s3cret", app_id="chat-web")  # doctest: +SKIP
>>> turn = client.interaction(user_id="u1", session_id="s1", adapter="base",
...                           prompt=[{"role": "user", "content": "hi"}], response="hello")  # doctest: +SKIP
>>> client.send([turn, client.feedback(turn, "thumbs", value=1)])  # doctest: +SKIP
IngestResult(accepted=2, rejected=0, errors=[])

``route(context)`` asks which adapter should answer; send its ``adapter`` and ``propensity``
with the interaction. Events get their ``event_id`` when they are built, so a retry after a timeout re-sends the
same ids and feedloop counts them once. ``send`` retries connection errors and 503s with
exponential backoff; a 4xx is a bug in the caller and raises ``FeedloopError`` at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import httpx

from app.gateway.events import IngestResult
from app.gateway.route import RouteAnswer
from streams.contract import Annotation, Context, Feedback, Interaction, utcnow

Event = Interaction | Feedback | Annotation


class FeedloopError(RuntimeError):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def new_id() -> str:
    return uuid.uuid4().hex


def _error(response: httpx.Response) -> FeedloopError:
    payload = response.json() if response.content else {}
    return FeedloopError(response.status_code, payload.get("reason", "error"), payload.get("detail", response.text))


def _ids(turn: Interaction) -> dict[str, str]:
    return {"interaction_id": turn.interaction_id, "session_id": turn.session_id}


class FeedloopClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        app_id: str,
        timeout_s: float = 10.0,
        retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.app_id = app_id
        self.retries = retries
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            transport=transport,
        )

    def interaction(self, **fields: Any) -> Interaction:
        """An interaction event; ids and time are filled in unless given."""
        fields.setdefault("interaction_id", new_id())
        return Interaction(**self._defaults(fields))

    def feedback(self, turn: Interaction, kind: str, **fields: Any) -> Feedback:
        """Feedback of ``kind`` on the interaction ``turn``."""
        return Feedback(kind=kind, **self._defaults({**_ids(turn), **fields}))

    def annotation(self, turn: Interaction, **fields: Any) -> Annotation:
        return Annotation(**self._defaults({**_ids(turn), **fields}))

    def _defaults(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"event_id": new_id(), "occurred_at": utcnow(), "app_id": self.app_id, **fields}

    def send(self, events: Iterable[Event]) -> IngestResult:
        body = "[" + ",".join(e.model_dump_json() for e in events) + "]"
        return self.send_raw(body.encode(), content_type="application/json")

    def send_raw(self, body: bytes, content_type: str = "application/json") -> IngestResult:
        """Post a prepared body (a JSON array or JSON lines) as it is."""
        delay = 0.2
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.post(
                    "/v1/events", content=body, headers={"Content-Type": content_type}
                )
            except httpx.TransportError:
                if last:
                    raise
            else:
                if response.status_code == 202:
                    return IngestResult.model_validate(response.json())
                if response.status_code != 503 or last:
                    raise _error(response)
            time.sleep(delay)
            delay *= 2
        raise ValueError("retries must be >= 0")

    def route(self, context: Context | dict[str, Any] | None = None) -> RouteAnswer:
        """Which adapter should serve a request with this context (``POST /v1/route``).

        Not retried: a chat request should not wait on routing. On FeedloopError or
        httpx.TransportError serve your default adapter, with propensity 1.0 (no choice)."""
        body = {"context": Context.model_validate(context or {}).model_dump(mode="json"), "app_id": self.app_id}
        response = self._http.post("/v1/route", json=body)
        if response.status_code != 200:
            raise _error(response)
        return RouteAnswer.model_validate(response.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FeedloopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
