"""Joins feedback and annotations to their interaction, in event time, within one partition.

An interaction stays *open* until its window closes: explicit feedback and annotations count
for ``explicit_window`` after the interaction occurred, implicit signals only for the shorter
``implicit_window`` (a copy an hour later says little about this answer). Time is event time:
the partition's watermark is the latest ``occurred_at`` seen minus ``allowed_lateness``, so
the same records in the same order always close the same windows, live or in replay.

Interactions are keyed by (app id, interaction id): feedback joins an interaction of its own
app only, so an app cannot attach its feedback (and so training data) to another's answers.

Feedback *replaces* earlier feedback with the same upsert key (:func:`upsert_key`) on the
same interaction: a user who flips a thumb from up to down has said "down", not "0.5". The
latest ``occurred_at`` wins, ties go to the later record in the log, and the replaced
event's id stays among those the interaction consumed (``event_ids``), so de-duplication and a
replay see the same events and reach the same state.

Feedback that arrives before its interaction waits as an *orphan* until the interaction comes
or the window passes. Feedback for an interaction already closed is *late*. Neither is
dropped silently: both come back as :class:`Unjoined` with a reason.

The bookkeeping (heaps, the watermark's comparisons) runs on :func:`utc` keys; what goes out
(the watermark, close times in details) keeps the events' own datetimes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from streams.contract import Annotation, Feedback, Interaction
from streams.pickled_once import for_state, from_state
from streams.rewards import EXPLICIT_KINDS


def utc(at: datetime) -> datetime:
    """``at`` on the one shared UTC tzinfo: a key that compares ~10x faster.

    pydantic gives every parsed datetime a tzinfo object of its own, and comparing aware
    datetimes with different tzinfo objects calls ``utcoffset()`` on both; datetimes sharing
    one tzinfo compare field by field. The instant is the same, so the order is too."""
    return at.astimezone(timezone.utc)


def upsert_key(feedback: Feedback, interaction_user: str) -> tuple[str, ...] | None:
    """What makes two feedback events on one interaction the same piece of feedback, so the
    later replaces the earlier: the app's ``feedback_id``; else a thumbs or a rating per
    (kind, user), a score per (name, user) and a pairwise choice per (rejected interaction,
    user), the user being the interaction's when the feedback names none. Other kinds
    accumulate (each copy, each dwell is one more signal)."""
    if feedback.feedback_id is not None:
        return ("id", feedback.feedback_id)
    user = feedback.user_id or interaction_user
    if feedback.kind in ("thumbs", "rating"):
        return (feedback.kind, user)
    if feedback.kind == "score":
        return ("score", feedback.name, user)
    if feedback.kind == "pairwise":  # the same choice sent twice is one pair, not two
        return ("pairwise", feedback.rejected_interaction_id, user)
    return None


Key = tuple[str, str]  # (app id, interaction id)


@dataclass
class OpenInteraction:
    interaction: Interaction  # text already scrubbed
    pseudonym: str
    occurred_at: datetime  # utc(interaction.occurred_at)
    feedback: list[Feedback] = field(default_factory=list)  # the feedback in force, replaced ones left out
    annotations: list[Annotation] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)  # every joined feedback's event id, replaced or not

    @property
    def key(self) -> Key:
        return self.interaction.app_id, self.interaction.interaction_id

    @property
    def event_ids(self) -> list[str]:
        return [self.interaction.event_id, *self.consumed, *(a.event_id for a in self.annotations)]

    def upsert(self, event: Feedback) -> None:
        """Add ``event``, or let it replace the feedback it is a new version of (the latest
        ``occurred_at`` wins; on a tie the later record, which this one is)."""
        self.consumed.append(event.event_id)
        user = self.interaction.user_id
        if (key := upsert_key(event, user)) is not None:
            for i, held in enumerate(self.feedback):
                if upsert_key(held, user) == key:
                    if held.occurred_at > event.occurred_at:
                        return  # an older version, come late: it changes nothing
                    del self.feedback[i]
                    break
        self.feedback.append(event)

    def __getstate__(self) -> dict:
        # An interaction stays open through many checkpoints: pickle it once (feedback changes).
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_pickled_")}
        return {**state, "interaction": for_state(self, "interaction")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, interaction=from_state(state["interaction"]))


@dataclass(frozen=True)
class Unjoined:
    """Feedback or an annotation that could not be joined, and why."""

    event: Feedback | Annotation
    reason: str  # orphan_feedback, late_feedback or outside_implicit_window
    detail: str


@dataclass
class SessionJoin:
    explicit_window: timedelta
    implicit_window: timedelta
    allowed_lateness: timedelta
    open: dict[Key, OpenInteraction] = field(default_factory=dict)
    orphans: dict[Key, list[Feedback | Annotation]] = field(default_factory=dict)
    closed: dict[Key, datetime] = field(default_factory=dict)  # interaction -> closed at
    watermark: datetime | None = None
    watermark_key: datetime | None = None  # utc(watermark)
    _max_seen: datetime | None = None
    _closing: list[tuple[datetime, Key]] = field(default_factory=list)  # heap of (utc closes at, key)
    _orphan_expiry: list[tuple[datetime, Key]] = field(default_factory=list)  # heap of (utc expires, key)
    _forget: list[tuple[datetime, Key]] = field(default_factory=list)  # heap of (utc closed at, key)

    def observe(self, occurred_at: datetime) -> datetime:
        """Move event time forward (never back); returns ``utc(occurred_at)``."""
        at = utc(occurred_at)
        watermark_key = at - self.allowed_lateness
        if self.watermark_key is None or watermark_key > self.watermark_key:
            self._max_seen = occurred_at
            self.watermark = occurred_at - self.allowed_lateness
            self.watermark_key = watermark_key
        return at

    def knows(self, app_id: str, interaction_id: str) -> bool:
        key = (app_id, interaction_id)
        return key in self.open or key in self.closed

    def add_interaction(self, interaction: Interaction, pseudonym: str, occurred_at: datetime) -> list[Unjoined]:
        """Open an interaction (the caller checks ``knows`` first) and attach its orphans.

        ``occurred_at`` is ``utc(interaction.occurred_at)``, as :meth:`observe` returned it."""
        key = (interaction.app_id, interaction.interaction_id)
        entry = OpenInteraction(interaction, pseudonym, occurred_at)
        self.open[key] = entry
        heapq.heappush(self._closing, (occurred_at + self.explicit_window, key))
        unjoined = []
        for waiting in self.orphans.pop(key, []):
            unjoined += self._attach(entry, waiting)
        return unjoined

    def add_signal(self, event: Feedback | Annotation) -> list[Unjoined]:
        iid = event.interaction_id
        key = (event.app_id, iid)
        if key in self.open:
            return self._attach(self.open[key], event)
        if key in self.closed:
            return [Unjoined(event, "late_feedback", f"interaction {iid} closed at {self.closed[key].isoformat()}")]
        expires = utc(event.occurred_at) + self.explicit_window
        if self.watermark_key is not None and expires <= self.watermark_key:
            # Too old to join anything still open, whether or not its interaction was seen.
            return [Unjoined(event, "late_feedback", f"{event.occurred_at.isoformat()} is behind event time "
                             f"{self.watermark.isoformat()} by more than the window")]
        if key not in self.orphans:
            heapq.heappush(self._orphan_expiry, (expires, key))
        self.orphans.setdefault(key, []).append(event)
        return []

    def _attach(self, entry: OpenInteraction, event: Feedback | Annotation) -> list[Unjoined]:
        elapsed = event.occurred_at - entry.interaction.occurred_at
        if isinstance(event, Annotation):
            entry.annotations.append(event)
        elif event.kind in EXPLICIT_KINDS or elapsed <= self.implicit_window:
            entry.upsert(event)
        else:
            return [Unjoined(event, "outside_implicit_window", f"{event.kind} came {elapsed} after the interaction")]
        return []

    def next_deadline(self) -> datetime | None:
        """The earliest event time (a :func:`utc` key) at which a window closes or an orphan
        expires; None when nothing is open or waiting. An orphan whose interaction came
        meanwhile leaves a stale entry: its time may come back once, and ``close_due`` drops it."""
        heads = [heap[0][0] for heap in (self._closing, self._orphan_expiry) if heap]
        return min(heads, default=None)

    def close_due(self) -> tuple[list[OpenInteraction], list[Unjoined]]:
        """Interactions whose window the watermark has passed (in closing order), and orphans
        whose interaction never came in time."""
        mark = self.watermark_key
        if mark is None:
            return [], []
        closed = []
        while self._closing and self._closing[0][0] <= mark:
            closes_at, key = heapq.heappop(self._closing)
            entry = self.open.pop(key)
            closed.append(entry)
            self.closed[key] = entry.interaction.occurred_at + self.explicit_window
            heapq.heappush(self._forget, (closes_at, key))
        expired = []
        while self._orphan_expiry and self._orphan_expiry[0][0] <= mark:
            _, key = heapq.heappop(self._orphan_expiry)
            for event in self.orphans.pop(key, []):
                expired.append(Unjoined(event, "orphan_feedback", f"interaction {key[1]} never arrived"))
        # Remember closed ids only as long as late feedback for them is plausible.
        horizon = mark - self.explicit_window
        while self._forget and self._forget[0][0] <= horizon:
            self.closed.pop(heapq.heappop(self._forget)[1], None)
        return closed, expired
