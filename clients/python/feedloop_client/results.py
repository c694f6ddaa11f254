"""The gateway's answers as small frozen dataclasses.

Parsed leniently (fields the gateway adds later are ignored) so that an older client keeps
working against a newer gateway; the server's pydantic models stay on the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def parse(cls: type[T], payload: dict[str, Any]) -> T:
    return cls(**{f.name: payload[f.name] for f in fields(cls) if f.name in payload})  # type: ignore[arg-type]


@dataclass(frozen=True)
class RejectedEvent:
    index: int
    event_id: str | None
    reason: str
    detail: str


@dataclass(frozen=True)
class IngestResult:
    """``POST /v1/events``: what was accepted; each rejected event with its reason (the
    gateway dead-lettered it, so it is not lost, but it will not be learned from)."""

    accepted: int
    rejected: int
    errors: list[RejectedEvent]

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> IngestResult:
        errors = [parse(RejectedEvent, e) for e in payload.get("errors", [])]
        return cls(accepted=payload["accepted"], rejected=payload["rejected"], errors=errors)


@dataclass(frozen=True)
class RouteAnswer:
    """``POST /v1/route``: serve ``adapter``; send it and ``propensity`` with the interaction."""

    adapter: str
    propensity: float
    probabilities: dict[str, float]
    decision_id: str
    snapshot_version: int

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RouteAnswer:
        return parse(cls, payload)


@dataclass(frozen=True)
class Erasure:
    """``POST /v1/users/{id}/erase``: the user's key is shredded as of ``erased_at``;
    ``retrain_adapters`` were already trained on their data (empty from gateways that do not
    say); ``already_erased``: an earlier request did it, and this one changed nothing."""

    app_id: str
    user_id: str
    erased_at: str
    retrain_adapters: list[str] = field(default_factory=list)
    already_erased: bool = False

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Erasure:
        return parse(cls, payload)
