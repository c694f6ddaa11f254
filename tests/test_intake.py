"""Intake decides, per event, accepted or rejected, and says why in words a developer can act on."""

import base64
import json

import pytest

from streams.contract import utcnow
from streams.intake import Accepted, BodyRejected, Limits, Rejected, check_body, dead_letter, split_body
from tests.factories import ANY_TURN, feedback, interaction

LIMITS = Limits(max_event_bytes=4096, max_events=50, dead_letter_max_raw_bytes=64)


def run(body: bytes, content_type: str = "application/json", app_id: str = "app-a"):
    return check_body(body, content_type, app_id, LIMITS)


def test_valid_array_is_accepted_in_canonical_form():
    first = interaction()
    results = run(json.dumps([first, feedback(first)]).encode())
    assert [type(r) for r in results] == [Accepted, Accepted]
    payload = json.loads(results[0].payload)
    assert payload["event_id"] == first["event_id"] and payload["schema_version"] == 1


def test_single_object_is_taken_as_one_event():
    assert isinstance(run(json.dumps(interaction()).encode())[0], Accepted)


def test_jsonl_lines_are_judged_one_by_one():
    good = json.dumps(interaction())
    body = "\n".join([good, "{not json", "", json.dumps({"type": "sparkle"}), good]).encode()
    results = run(body, "application/x-ndjson")
    assert [r.reason if isinstance(r, Rejected) else "ok" for r in results] == [
        "ok", "invalid_json", "unknown_type", "ok",
    ]
    assert results[1].raw == b"{not json"


@pytest.mark.parametrize(
    "event, reason, words",
    [
        ({"type": "sparkle", "event_id": "e-00000001"}, "unknown_type", "'interaction', 'feedback'"),
        ({"event_id": "e-00000001"}, "missing_type", "has no 'type'"),
        (feedback(ANY_TURN, "sparkle"), "schema_violation", "kind: Input should be 'thumbs'"),
        ({**interaction(), "propensity": "high"}, "schema_violation", "propensity"),
        ({k: v for k, v in interaction().items() if k != "user_id"}, "schema_violation", "user_id: Field required"),
        (interaction(app_id="app-b"), "app_id_mismatch", "does not match the API key's app 'app-a'"),
        (interaction(response="x" * 5000), "event_too_large", "limit is 4096"),
        ([1, 2], "not_an_object", "must be a JSON object"),
    ],
)
def test_rejections_carry_reason_detail_and_raw_bytes(event, reason, words):
    (result,) = run(json.dumps([event]).encode())
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert words in result.detail
    assert json.loads(result.raw) == event
    if isinstance(event, dict) and "event_id" in event:
        assert result.event_id == event["event_id"]


def test_one_bad_event_does_not_sink_the_others():
    results = run(json.dumps([interaction(), {"type": "sparkle"}, interaction()]).encode())
    assert [isinstance(r, Accepted) for r in results] == [True, False, True]
    assert results[1].index == 1


@pytest.mark.parametrize(
    "body, reason",
    [(b"{oops", "invalid_json"), (b'"a string"', "not_an_array"), (b"\xff\xfe", "invalid_json")],
)
def test_unreadable_bodies_are_rejected_whole(body, reason):
    with pytest.raises(BodyRejected) as error:
        split_body(body, "application/json")
    assert error.value.reason == reason


def test_too_many_events_is_rejected_whole():
    with pytest.raises(BodyRejected, match="limit is 50"):
        run(json.dumps([interaction()] * 51).encode())


def test_dead_letter_keeps_raw_bytes_and_says_when_truncated():
    raw = bytes(range(256)) * 2
    record = dead_letter(
        reason="invalid_json", detail="d", raw=raw, received_at=utcnow(), stage="gateway", max_raw_bytes=64
    )
    assert base64.b64decode(record.raw_b64) == raw[:64]
    assert record.raw_size == 512 and record.raw_truncated
    whole = dead_letter(reason="r", detail="d", raw=b"abc", received_at=utcnow(), stage="gateway", max_raw_bytes=64)
    assert base64.b64decode(whole.raw_b64) == b"abc" and not whole.raw_truncated
