"""Valid events for tests, built as a chat app would build them."""

from __future__ import annotations

import uuid
from typing import Any


def interaction(app_id: str = "app-a", **overrides: Any) -> dict[str, Any]:
    event = {
        "type": "interaction",
        "event_id": uuid.uuid4().hex,
        "occurred_at": "2026-11-21T10:00:00+00:00",
        "app_id": app_id,
        "user_id": "user-1",
        "session_id": uuid.uuid4().hex,
        "interaction_id": uuid.uuid4().hex,
        "adapter": "base",
        "propensity": 0.5,
        "prompt": [{"role": "user", "content": "How do I reverse a list in Python?"}],
        "response": "Use reversed(items) or items[::-1].",
        "context": {"domain": "code", "locale": "en", "client": "web", "cohort": "a"},
        "prompt_tokens": 9,
        "completion_tokens": 8,
        "latency_ms": 120.5,
    }
    event.update(overrides)
    return event


ANY_TURN = {"interaction_id": "i-1", "session_id": "s-1"}


def feedback(turn: dict[str, Any], kind: str = "thumbs", app_id: str = "app-a", **overrides: Any) -> dict[str, Any]:
    """Feedback on ``turn`` (an interaction, or any dict with its two ids)."""
    event = {
        "type": "feedback",
        "event_id": uuid.uuid4().hex,
        "occurred_at": "2026-11-21T10:00:05+00:00",
        "app_id": app_id,
        "session_id": turn["session_id"],
        "interaction_id": turn["interaction_id"],
        "kind": kind,
    }
    event.update({"thumbs": {"value": 1}, "rating": {"value": 4}, "dwell": {"value": 12.5},
                  "edit": {"text": "Use items.reverse() to reverse in place."}}.get(kind, {}))
    event.update(overrides)
    return event


def annotation(turn: dict[str, Any], app_id: str = "app-a") -> dict[str, Any]:
    return {
        "type": "annotation",
        "event_id": uuid.uuid4().hex,
        "occurred_at": "2026-11-21T11:00:00+00:00",
        "app_id": app_id,
        "session_id": turn["session_id"],
        "interaction_id": turn["interaction_id"],
        "annotator": "reviewer-7",
        "source": "human",
        "label": "good",
        "score": 0.9,
    }
