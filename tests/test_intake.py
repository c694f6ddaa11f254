"""Intake decides, per event, accepted or rejected, and says why in words a developer can act on."""

import base64
import json

import pytest

from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from app.settings import Settings
from streams.config import PipelineSettings
from streams.contract import ValidationIssue, utcnow
from streams.intake import (
    EPOCH,
    ISSUES_MAX,
    MAX_JSON_DEPTH,
    PRODUCER_MAX_REQUEST_BYTES,
    Accepted,
    BodyRejected,
    Limits,
    Rejected,
    TooDeeplyNested,
    check_body,
    dead_letter,
    dead_letter_max_bytes,
    largest_raw_bytes,
    parse_json,
    split_body,
)
from streams.topics import event_key
from tests.factories import ANY_TURN, feedback, interaction
from tests.poison import FAR_FUTURE, corpus

LIMITS = Limits(max_event_bytes=4096, max_events=50, dead_letter_max_raw_bytes=64)


def run(body: bytes, content_type: str = "application/json", app_id: str = "app-a"):
    return check_body(body, content_type, app_id, LIMITS)


def test_valid_array_is_accepted_in_canonical_form():
    first = interaction()
    results = run(json.dumps([first, feedback(first)]).encode())
    assert [type(r) for r in results] == [Accepted, Accepted]
    payload = json.loads(results[0].payload)
    assert payload["event_id"] == first["event_id"] and payload["schema_version"] == 1


def test_feedback_without_a_session_goes_on_the_topic_with_its_interactions_gateway_session():
    thumbs = {k: v for k, v in feedback({"interaction_id": "9b1e.2", "session_id": "unused"}).items()
              if k != "session_id"}
    (accepted,) = run(json.dumps([thumbs]).encode())
    assert accepted.event.session_id == json.loads(accepted.payload)["session_id"] == "chat-9b1e"
    assert event_key(accepted.event) == b"chat-9b1e"


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


NOW = datetime(2026, 11, 21, 10, 0, 30, tzinfo=timezone.utc)
GATEWAY_LIMITS = Limits(max_event_bytes=256 * 1024, max_events=50, dead_letter_max_raw_bytes=512 * 1024,
                        max_clock_skew_s=300, event_time_span_s=PipelineSettings().event_time_span_s)


@pytest.mark.parametrize("case", corpus(), ids=lambda case: case.name)
def test_poison_bodies_are_rejected_with_a_reason_and_their_dead_letters_fit(case):
    status, reason = case.gateway
    try:
        results = check_body(case.value, "application/json", "app-a", GATEWAY_LIMITS, NOW)
    except BodyRejected as whole:
        assert (422, whole.reason) == (status, reason)
        rejected = [Rejected(0, whole.reason, whole.detail, case.value)]
    else:
        assert status == 202 and [r.reason for r in results] == [reason] * len(results)
        rejected = results
    for r in rejected:
        letter = dead_letter(reason=r.reason, detail=r.detail, raw=r.raw, received_at=NOW, stage="gateway",
                             max_raw_bytes=GATEWAY_LIMITS.dead_letter_max_raw_bytes, event_id=r.event_id,
                             issues=r.issues)
        assert len(letter.model_dump_json().encode()) <= dead_letter_max_bytes(GATEWAY_LIMITS.dead_letter_max_raw_bytes)


def test_a_dead_letter_fits_the_worker_producer_whatever_it_carries():
    control = "\x01" * 10_000  # each character JSON-escaped to six bytes
    default_raw = Settings.model_construct().dead_letter_max_raw_bytes
    letter = dead_letter(reason=control, detail=control, raw=b"\xff" * 2_000_000, received_at=NOW, stage=control,
                         max_raw_bytes=default_raw, app_id=control, event_id=control, dead_letter_id=control,
                         issues=[ValidationIssue(loc=control, msg=control)] * 1000)
    assert len(letter.model_dump_json().encode()) <= dead_letter_max_bytes(default_raw) < PRODUCER_MAX_REQUEST_BYTES
    assert letter.raw_truncated and letter.raw_size == 2_000_000 and len(letter.issues) == ISSUES_MAX
    assert len(letter.detail) <= 1000 and len(letter.event_id) <= 128


def test_the_raw_bytes_kept_are_bounded_by_what_fits_one_message():
    largest = largest_raw_bytes()
    assert dead_letter_max_bytes(largest) < PRODUCER_MAX_REQUEST_BYTES
    Settings(dead_letter_max_raw_bytes=largest)
    with pytest.raises(ValidationError, match="dead_letter_max_raw_bytes"):
        Settings(dead_letter_max_raw_bytes=largest + 1)


def test_nesting_is_refused_before_parsing_and_brackets_in_strings_do_not_count():
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(TooDeeplyNested):
        parse_json(deep)
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    # Brackets inside strings (escaped quotes too) are text: this event is valid and accepted.
    chatty = interaction(response='quote \\" then ' + "[{" * 5000)
    (result,) = check_body(json.dumps([chatty]).encode(), "application/json", "app-a", GATEWAY_LIMITS)
    assert isinstance(result, Accepted)
    # json.loads also reads UTF-16: the scan decodes as it does, so nothing hides in the bytes.
    with pytest.raises(BodyRejected) as error:
        split_body(("[" * 5000 + "]" * 5000).encode("utf-16"), "application/json")
    assert error.value.reason == "too_deeply_nested" and "5000 levels" in error.value.detail


def test_a_deep_json_line_is_rejected_alone():
    good = json.dumps(interaction())
    body = "\n".join([good, "[" * 5000, good]).encode()
    results = check_body(body, "application/x-ndjson", "app-a", GATEWAY_LIMITS)
    assert [r.reason if isinstance(r, Rejected) else "ok" for r in results] == ["ok", "too_deeply_nested", "ok"]


def test_events_dated_ahead_of_the_gateway_clock_are_clock_skew():
    ahead = interaction(occurred_at=FAR_FUTURE)
    near = interaction(occurred_at=(NOW + timedelta(seconds=299)).isoformat())
    results = check_body(json.dumps([ahead, near]).encode(), "application/json", "app-a", GATEWAY_LIMITS, NOW)
    assert [r.reason if isinstance(r, Rejected) else "ok" for r in results] == ["clock_skew", "ok"]
    assert FAR_FUTURE in results[0].detail and NOW.isoformat() in results[0].detail
    assert results[0].event_id == ahead["event_id"]
    # Without a receive time (or a bound) nothing is checked.
    assert isinstance(check_body(json.dumps([ahead]).encode(), "application/json", "app-a", GATEWAY_LIMITS)[0],
                      Accepted)


def test_a_dead_letter_keeps_no_pii_of_its_raw_input():
    """Dead letters are archived and shown to operators: their raw bytes are scrubbed like
    events, bytes that are not UTF-8 kept as they were, and a value cut by the size bound is
    not kept half."""
    raw = b'{"type": "interaction", "prompt": "call me on +1 415 555 0134 or jane.doe@example.com", \xff\xfe'
    letter = dead_letter(reason="invalid_json", detail="-", raw=raw, received_at=EPOCH, stage="t", max_raw_bytes=1024)
    kept = base64.b64decode(letter.raw_b64)
    assert b"555 0134" not in kept and b"jane.doe" not in kept and b"<EMAIL>" in kept
    assert kept.endswith(b"\xff\xfe") and letter.raw_scrubbed and not letter.raw_truncated
    clean = dead_letter(reason="invalid_json", detail="-", raw=b"not json", received_at=EPOCH, stage="t",
                        max_raw_bytes=1024)  # fmt: skip
    assert base64.b64decode(clean.raw_b64) == b"not json" and not clean.raw_scrubbed

    cut = b"x" * 95 + b" jane.doe@example.com and more"  # the address straddles the 100-byte bound
    letter = dead_letter(reason="invalid_json", detail="-", raw=cut, received_at=EPOCH, stage="t", max_raw_bytes=100)
    kept = base64.b64decode(letter.raw_b64)
    assert len(kept) == 100 and b"jane" not in kept and letter.raw_truncated and letter.raw_size == len(cut)
