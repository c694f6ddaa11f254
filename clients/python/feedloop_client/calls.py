"""The gateway's endpoints as plain request descriptions, free of any I/O.

The sync and the async client both execute these (with their own httpx client and sleep),
so what a request looks like and what its answer means is written once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from feedloop_client.events import Event
from feedloop_client.results import Erasure, IngestResult, RouteAnswer

T = TypeVar("T")
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    ok: int  # the one status that means success
    parse: Callable[[dict[str, Any]], T]
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def post_events(body: bytes, content_type: str = "application/json") -> Call[IngestResult]:
    """A prepared body as it is: a JSON array of events, or JSON lines (application/x-ndjson)."""
    return Call("POST", "/v1/events", 202, IngestResult.from_json, body, {"Content-Type": content_type})


def events_body(events: Iterable[Event]) -> bytes:
    return _json(list(events))


def route(app_id: str, context: Mapping[str, Any] | None) -> Call[RouteAnswer]:
    body = {"app_id": app_id, "context": dict(context or {})}
    return Call("POST", "/v1/route", 200, RouteAnswer.from_json, _json(body), JSON)


def erase(user_id: str) -> Call[Erasure]:
    # Percent-encode all of it: the id is the app's, and must stay one path segment whatever it
    # holds. (One holding '/' cannot be erased this way yet: the gateway's router decodes %2F
    # before matching, and answers 404.)
    return Call("POST", f"/v1/users/{quote(user_id, safe='')}/erase", 202, Erasure.from_json)


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
