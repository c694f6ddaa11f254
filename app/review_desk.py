"""The review desk's queue: the examples the learner picked for human review and nobody has
reviewed yet, folded from the log.

The learner emits a :class:`~streams.learning.ReviewRequest` to ``feedloop.review.v1`` for
each example it picks (``learners.active_learning``); a reviewer's verdict is a ``human``
annotation on the example's interaction in ``feedloop.events.v1``. The queue is the picks
minus the reviewed, both read from the archive (:class:`ReviewQueue`, the pure fold; the
:class:`ReviewDesk` follows the archive's sealed segments as the overview does), so every
gateway and every reviewer sees the same queue and a restart rebuilds it. A gateway also
folds the annotations it publishes itself at once: its own reviewer never sees a reviewed
item again, and the others see it leave once the archiver sealed the segment
(``FEEDLOOP_ARCHIVE_FLUSH_SECONDS``).

:func:`review_events` turns a reviewer's labels into the events the gateway publishes, and
:func:`review_correction` a corrected answer into the record the pipeline trains on.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.sealed_segments import SealedSegments
from streams.archive import ArchivedRecord
from streams.contract import ReviewCorrection
from streams.learning import ReviewRequest
from streams.objects import ObjectStore
from streams.store import Erasure
from streams.topics import EVENTS, REVIEW

log = structlog.get_logger(__name__)

REVIEWED = "human"  # the annotation source that takes an example off the queue


class ReviewerKey(BaseModel):
    """A reviewer's key, for one app's queue (``FEEDLOOP_REVIEWER_KEYS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_id: str = Field(description="The app whose picked examples this reviewer labels.")
    key: SecretStr


class Labels(BaseModel):
    """What a reviewer says about one example; at least one of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thumbs: Literal[1, -1] | None = None
    rating: int | None = Field(None, ge=1, le=5)
    correction: str | None = Field(None, min_length=1, description="The answer the model should have given.")
    report: str | None = Field(None, min_length=1, description="Why the answer is harmful or wrong.")
    label: str | None = Field(None, min_length=1, max_length=128, description="Default: from the labels given.")
    notes: str | None = Field(None, max_length=4000)


class NothingLabelled(ValueError):
    pass


def _event_id(app_id: str, example_id: str, kind: str) -> str:
    """The same review's events get the same ids, whoever sends them and however often: a
    retry, or a second reviewer racing the first, is de-duplicated by the pipeline."""
    return "review-" + hashlib.sha256("\x1f".join((app_id, example_id, kind)).encode()).hexdigest()[:32]


def review_events(request: ReviewRequest, labels: Labels, reviewer: str, now: datetime) -> list[dict[str, Any]]:
    """The user events of one review: a ``human`` annotation (what takes the example off the
    queue) and a feedback event per verdict (thumbs, rating, report); each on the example's
    app, session and interaction, from ``reviewer:<name>``. The correction is not among them:
    it is a :func:`review_correction`."""
    if not any((labels.thumbs, labels.rating, labels.correction, labels.report, labels.label)):
        raise NothingLabelled("give at least one of thumbs, rating, correction, report or label")
    example = request.example
    common = {"app_id": example.app_id, "session_id": example.session_id, "interaction_id": example.example_id,
              "occurred_at": now.isoformat(), "metadata": {"review_id": request.review_id}}  # fmt: skip
    user = f"reviewer:{reviewer}"
    feedback = [("thumbs", {"value": labels.thumbs}), ("rating", {"value": labels.rating}),
                ("report", {"text": labels.report})]  # fmt: skip
    events = [{**common, "type": "feedback", "event_id": _event_id(example.app_id, example.example_id, kind),
               "kind": kind, "user_id": user, **fields}
              for kind, fields in feedback if next(iter(fields.values())) is not None]  # fmt: skip
    label = labels.label or (
        "corrected" if labels.correction else "reported" if labels.report
        else {1: "good", -1: "bad"}.get(labels.thumbs, "reviewed")
    )  # fmt: skip
    score = (labels.rating - 1) / 4 if labels.rating is not None else {1: 1.0, -1: 0.0}.get(labels.thumbs)
    annotation = {**common, "type": "annotation", "event_id": _event_id(example.app_id, example.example_id, "annotation"),
                  "annotator": reviewer, "source": REVIEWED, "label": label, "score": score, "notes": labels.notes}  # fmt: skip
    return [annotation, *events]


def review_correction(request: ReviewRequest, labels: Labels, reviewer: str, now: datetime) -> ReviewCorrection | None:
    """The record that makes a reviewer's corrected answer training data, or None without one.

    Not an ``edit`` feedback: that would come after the example's window closed and be
    dead-lettered as late, as an app's own late feedback is. The correction is what the review
    budget pays for, so it carries its example and the pipeline trains on it whenever it comes
    (``streams.signals.review_records``)."""
    if labels.correction is None:
        return None
    example = request.example
    return ReviewCorrection(event_id=_event_id(example.app_id, example.example_id, "correction"), occurred_at=now,
                            review_id=request.review_id, reviewer=reviewer, correction=labels.correction,
                            example=example)  # fmt: skip


@dataclass
class ReviewQueue:
    """The pure fold: picks in the order the learner made them, minus the examples a human
    annotated, by (app id, example id). An annotation may be folded before its pick (the two
    topics' segments are sealed in any order): the reviewed set remembers it."""

    picked: dict[tuple[str, str], ReviewRequest] = field(default_factory=dict)
    reviewed: set[tuple[str, str]] = field(default_factory=set)
    undecodable: int = 0

    def fold(self, record: ArchivedRecord) -> None:
        if record.value is None:
            return
        try:
            if record.topic == REVIEW.name:
                self.pick(ReviewRequest.model_validate_json(record.value))
            elif record.topic == EVENTS.name:
                event = json.loads(record.value)
                if event.get("type") == "annotation" and event.get("source") == REVIEWED:
                    self.review(event["app_id"], event["interaction_id"])
        except (ValidationError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            # Another producer's bad record stays in the archive; it must not stop the queue.
            self.undecodable += 1

    def pick(self, request: ReviewRequest) -> None:
        self.picked.setdefault(request.example.key, request)  # a pick emitted again keeps its place

    def review(self, app_id: str, example_id: str) -> None:
        self.reviewed.add((app_id, example_id))
        self.picked.pop((app_id, example_id), None)

    def waiting(self, app_id: str | None = None) -> list[ReviewRequest]:
        """The queue: every app's (``None``) or one app's."""
        return [r for key, r in self.picked.items() if key not in self.reviewed and app_id in (None, key[0])]

    def get(self, app_id: str, example_id: str) -> ReviewRequest | None:
        """The pick, if it is still waiting."""
        key = (app_id, example_id)
        return None if key in self.reviewed else self.picked.get(key)


class ReviewDesk:
    """The queue as of the archive's newest sealed segment, less the examples of users erased
    since they were picked (the store's ``erasures``, written by the erase before it answers):
    nothing of an erased user reaches a reviewer's page. Thread-safe."""

    def __init__(self, sessions: sessionmaker, objects: ObjectStore) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        self._queue = ReviewQueue()
        self._segments = SealedSegments(sessions, objects, frozenset({REVIEW.name, EVENTS.name}))

    def _reset(self) -> None:
        self._queue = ReviewQueue()

    def _caught_up(self) -> ReviewQueue:
        # A lambda, not the bound method: _reset replaces the queue mid-call.
        self._segments.catch_up(lambda record: self._queue.fold(record), self._reset)
        return self._queue

    def _erased(self) -> set[str]:
        with self._sessions() as session:
            return set(session.scalars(select(Erasure.pseudonym)))

    def waiting(self, app_id: str | None = None) -> list[ReviewRequest]:
        erased = self._erased()
        with self._lock:
            return [r for r in self._caught_up().waiting(app_id) if r.example.user not in erased]

    def get(self, app_id: str, example_id: str) -> ReviewRequest | None:
        erased = self._erased()
        with self._lock:
            picked = self._caught_up().get(app_id, example_id)
        return None if picked is None or picked.example.user in erased else picked

    def reviewed(self, app_id: str, example_id: str) -> None:
        """This gateway published the review: off its queue now, not only once archived."""
        with self._lock:
            self._queue.review(app_id, example_id)
