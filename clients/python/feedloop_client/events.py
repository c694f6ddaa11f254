"""Events as plain JSON-ready dicts, the shape of feedloop's event contract v1.

The builders only fill in what the contract asks the *sender* to generate: ``event_id`` (a
UUID made when the event is created, so a retry re-sends the same id and the pipeline counts
it once), a timezone-aware ``occurred_at``, ``app_id`` and ``type``. Every other field passes
through as given: the gateway validates against the contract and answers each rejected event
with its reason, so new feedback kinds and fields (``score`` with ``name`` and ``value`` or
``label``, ``pairwise`` with ``rejected_interaction_id``, ``comment``, ``feedback_id``) work
here the day the gateway accepts them, without a client release.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

Event = dict[str, Any]


class HasInteractionId(Protocol):
    """An interaction's ids, e.g. :class:`feedloop_client.FeedloopIds` from a chat answer."""

    interaction_id: str
    session_id: str | None


About = str | Mapping[str, Any] | HasInteractionId


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(timezone.utc)


def interaction(app_id: str, **fields: Any) -> Event:
    """An interaction (prompt, response, adapter, user_id, session_id, ...); its
    ``interaction_id`` is made here unless given, so feedback can name it at once."""
    return _event("interaction", app_id, {"interaction_id": new_id(), **fields})


def feedback(app_id: str, about: About, kind: str, **fields: Any) -> Event:
    """Feedback of ``kind`` (thumbs, rating, edit, ..., or any kind the gateway knows) on the
    interaction ``about``: its id, an interaction event, or the ids of a chat answer."""
    return _event("feedback", app_id, {**_ids(about), "kind": kind, **fields})


def annotation(app_id: str, about: About, **fields: Any) -> Event:
    """A label (annotator, source, label, score, ...) on the interaction ``about``."""
    return _event("annotation", app_id, {**_ids(about), **fields})


def _event(type_: str, app_id: str, fields: dict[str, Any]) -> Event:
    event = {"type": type_, "event_id": new_id(), "occurred_at": now(), "app_id": app_id, **fields}
    occurred_at = event["occurred_at"]
    if isinstance(occurred_at, datetime):
        if occurred_at.utcoffset() is None:  # the contract refuses it; say so before it is queued
            raise ValueError("occurred_at needs a timezone (e.g. datetime.now(timezone.utc))")
        event["occurred_at"] = occurred_at.isoformat()
    return event


def _ids(about: About) -> dict[str, str]:
    """interaction_id, and session_id when known (the gateway fills in a chat answer's own)."""
    if isinstance(about, str):
        return {"interaction_id": about}
    get = about.get if isinstance(about, Mapping) else lambda name: getattr(about, name, None)
    ids = {"interaction_id": get("interaction_id"), "session_id": get("session_id")}
    if not ids["interaction_id"]:
        raise ValueError(f"no interaction_id in {about!r}")
    return {name: value for name, value in ids.items() if value}
