"""The review desk's pure parts: the queue fold, the events and the correction of a review, who may review."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import SecretStr, ValidationError
from starlette.requests import Request

from app.gateway.auth import SESSION_COOKIE, ApiKeys, session_token
from app.review_desk import (Labels, NothingLabelled, ReviewDesk, ReviewerKey, ReviewQueue, review_correction,
                             review_events)
from app.settings import Settings
from streams.archive import ArchivedRecord
from streams.contract import EVENTS_TOPIC_ADAPTER, USER_EVENT_ADAPTER, AnnotatedExample, Context, ReviewCorrection
from streams.intake import Limits, check_body
from streams.learning import ReviewRequest
from streams.store import Erasure
from streams.topics import EVENTS, REVIEW, event_key
from tests.test_overview import seal

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def pick(example_id: str, app_id: str = "app-a") -> ReviewRequest:
    example = AnnotatedExample(
        example_id=example_id, app_id=app_id, session_id=f"s-{example_id}", user="pseudonym", adapter="champ",
        propensity=0.5, cohort="a", domain="code", context=Context(domain="code", cohort="a"),
        prompt=[{"role": "user", "content": "What is 2+2?"}], response="5", rewards={"explicit": 1.0, "implicit": 0.0},
        feedback_kinds=["thumbs"], training_consent=True, occurred_at=T0, closed_at=T0 + timedelta(minutes=30),
        event_ids=[f"e-{example_id}"],
    )  # fmt: skip
    return ReviewRequest(review_id=f"review-{example_id}", score=0.7, terms={"disagreement": 0.5, "rarity": 0.2},
                         threshold=0.4, selected_at=example.closed_at, example=example)  # fmt: skip


def record(topic: str, value: bytes | None, offset: int = 0) -> ArchivedRecord:
    return ArchivedRecord(topic, 0, offset, 0, None, value, {})


def human(example_id: str, app_id: str = "app-a", source: str = "human") -> bytes:
    return json.dumps({"type": "annotation", "app_id": app_id, "interaction_id": example_id, "source": source,
                       "label": "good", "annotator": "alice"}).encode()  # fmt: skip


def test_the_queue_is_the_picks_in_order_minus_the_human_annotated():
    queue = ReviewQueue()
    for n, example_id in enumerate(["i-1", "i-2", "i-3"]):
        queue.fold(record(REVIEW.name, pick(example_id).model_dump_json().encode(), n))
    queue.fold(record(EVENTS.name, human("i-2")))
    queue.fold(record(EVENTS.name, human("i-3", source="model")))  # a judge's label is not a review
    assert [r.example.example_id for r in queue.waiting()] == ["i-1", "i-3"]
    assert queue.get("app-a", "i-2") is None and queue.get("app-a", "i-1").review_id == "review-i-1"


def test_an_annotation_folded_before_its_pick_still_takes_it_off():
    queue = ReviewQueue()
    queue.fold(record(EVENTS.name, human("i-1")))  # the events segment was sealed first
    queue.fold(record(REVIEW.name, pick("i-1").model_dump_json().encode()))
    assert queue.waiting() == []


def test_the_queue_is_per_app_and_a_pick_emitted_again_keeps_its_place():
    queue = ReviewQueue()
    for request in (pick("i-1"), pick("i-1", app_id="app-b"), pick("i-2"), pick("i-1")):
        queue.pick(request)
    assert [(r.example.app_id, r.example.example_id) for r in queue.waiting()] == [
        ("app-a", "i-1"), ("app-b", "i-1"), ("app-a", "i-2")]
    queue.review("app-b", "i-1")  # ids are an app's own: app-a's i-1 stays
    assert [r.example.example_id for r in queue.waiting("app-a")] == ["i-1", "i-2"]
    assert queue.waiting("app-b") == []


def test_bad_records_are_counted_not_fatal():
    queue = ReviewQueue()
    for value in (b"{not json", b'{"type": "review_request"}', json.dumps({"type": "annotation", "source": "human"}).encode()):
        queue.fold(record(REVIEW.name if b"review" in value else EVENTS.name, value))
    queue.fold(record(REVIEW.name, None))  # a tombstone: nothing
    assert queue.undecodable == 3 and queue.waiting() == []


def test_the_desk_follows_the_archive_and_a_restart_rebuilds_the_same_queue(sessions, settings):
    seal(sessions, settings, REVIEW.name, [pick("i-1"), pick("i-2")])
    desk = ReviewDesk(sessions, settings.objects)
    assert [r.example.example_id for r in desk.waiting()] == ["i-1", "i-2"]
    desk.reviewed("app-a", "i-1")  # its own review, before the archive has it
    assert [r.example.example_id for r in desk.waiting()] == ["i-2"]
    seal(sessions, settings, EVENTS.name, [human("i-1").decode()])
    restarted = ReviewDesk(sessions, settings.objects)
    assert [r.example.example_id for r in restarted.waiting()] == ["i-2"]


def test_an_erased_users_examples_leave_the_desk(sessions, settings):
    gone = pick("i-2")
    gone = gone.model_copy(update={"example": gone.example.model_copy(update={"user": "pseudonym-of-the-erased"})})
    seal(sessions, settings, REVIEW.name, [pick("i-1"), gone])
    desk = ReviewDesk(sessions, settings.objects)
    assert [r.example.example_id for r in desk.waiting()] == ["i-1", "i-2"] and desk.get("app-a", "i-2") is not None
    with sessions.begin() as session:  # what the erase writes before it answers (app.erasure)
        session.add(Erasure(pseudonym="pseudonym-of-the-erased", app_id="app-a", erased_at=T0, event_id="user-erased-x"))
    assert [r.example.example_id for r in desk.waiting()] == ["i-1"] and desk.get("app-a", "i-2") is None
    assert desk.get("app-a", "i-1") is not None


def test_a_review_becomes_a_human_annotation_and_feedback_on_the_examples_ids():
    now = T0 + timedelta(hours=2)
    events = review_events(pick("i-1"), Labels(thumbs=-1, rating=2, correction="4", report="wrong sum"), "alice", now)
    parsed = [USER_EVENT_ADAPTER.validate_python(e) for e in events]  # the contract accepts every one
    annotation, *feedback = parsed
    assert (annotation.type, annotation.source, annotation.annotator, annotation.label, annotation.score) == (
        "annotation", "human", "alice", "corrected", 0.25)
    # The correction is not an edit: one would be dead-lettered as late feedback.
    assert [(f.kind, f.value, f.text) for f in feedback] == [("thumbs", -1, None), ("rating", 2, None),
                                                             ("report", None, "wrong sum")]  # fmt: skip
    for event in parsed:
        assert (event.app_id, event.session_id, event.interaction_id) == ("app-a", "s-i-1", "i-1")
        assert event.metadata == {"review_id": "review-i-1"} and event.occurred_at == now
    assert {f.user_id for f in feedback} == {"reviewer:alice"}  # not the user's own feedback
    # The same review from another reviewer, later, gets the same ids: the pipeline keeps one.
    again = review_events(pick("i-1"), Labels(thumbs=1, correction="four"), "bob", now + timedelta(minutes=1))
    assert {e["event_id"] for e in again} <= {e["event_id"] for e in events}
    other_app = review_events(pick("i-1", app_id="app-b"), Labels(thumbs=1), "alice", now)
    assert not {e["event_id"] for e in other_app} & {e["event_id"] for e in events}


def test_a_correction_is_a_record_that_carries_its_example_and_reaches_the_pipeline():
    now = T0 + timedelta(hours=2)
    correction = review_correction(pick("i-1"), Labels(thumbs=-1, correction="4"), "alice", now)
    assert review_correction(pick("i-1"), Labels(thumbs=-1), "alice", now) is None
    read = EVENTS_TOPIC_ADAPTER.validate_json(correction.model_dump_json())  # what the pipeline parses
    assert isinstance(read, ReviewCorrection) and read == correction
    assert (read.app_id, read.session_id, read.example.example_id, read.correction) == ("app-a", "s-i-1", "i-1", "4")
    assert event_key(read) == b"s-i-1"  # the example's partition
    events = review_events(pick("i-1"), Labels(thumbs=-1, correction="4"), "alice", now)
    assert correction.event_id not in {e["event_id"] for e in events}
    # Bob's later correction of the same example is the same record id: the first one counts.
    assert review_correction(pick("i-1"), Labels(correction="four"), "bob", now).event_id == correction.event_id
    # An app cannot send one: /v1/events refuses it as it refuses a tick.
    (refused,) = check_body(f"[{correction.model_dump_json()}]".encode(), "application/json", "app-a",
                            Limits(max_event_bytes=256 * 1024, max_events=10, dead_letter_max_raw_bytes=1024))
    assert refused.reason == "unknown_type"


def test_labels_say_what_they_are_and_something_must_be_said():
    assert review_events(pick("i-1"), Labels(thumbs=1), "alice", T0)[0]["label"] == "good"
    assert review_events(pick("i-1"), Labels(rating=5, label="exemplary"), "alice", T0)[0]["score"] == 1.0
    with pytest.raises(NothingLabelled, match="at least one"):
        review_events(pick("i-1"), Labels(notes="hmm"), "alice", T0)
    with pytest.raises(ValidationError):
        Labels(rating=6)


def request(key: str | None = None, cookie: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    if cookie:
        headers.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_operators_review_every_app_reviewers_their_own_and_app_keys_none():
    keys = ApiKeys({"app-a": SecretStr("app-key")}, {"ops": SecretStr("ops-key")},
                   {"alice": ReviewerKey(app_id="app-a", key=SecretStr("alice-key"))})  # fmt: skip
    assert keys.reviewer(request("ops-key")).app_id is None
    assert (keys.reviewer(request("alice-key")).name, keys.reviewer(request("alice-key")).app_id) == ("alice", "app-a")
    assert keys.reviewer(request(cookie=session_token("alice-key", "reviewer"))).name == "alice"
    assert keys.review_refusal(request("alice-key")) is None
    assert keys.review_refusal(request("app-key"))[:2] == (403, "forbidden")
    assert keys.review_refusal(request(cookie=session_token("app-key", "app")))[0] == 403
    assert keys.review_refusal(request("nobody"))[0] == 401
    # A reviewer's cookie opens the desk only: never the operator's views.
    assert keys.viewer(request(cookie=session_token("alice-key", "reviewer"))) is None
    assert keys.reviewer(request(cookie=session_token("alice-key"))) is None  # an operator-role token of it


def test_a_reviewer_key_may_not_be_another_roles_key():
    with pytest.raises(ValidationError, match="reviewer key"):
        Settings(api_keys={"app-a": "shared"}, reviewer_keys={"alice": {"app_id": "app-a", "key": "shared"}})
