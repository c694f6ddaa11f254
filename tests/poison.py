"""Poison records: bytes that must become dead letters, never stop a reader of the events topic.

Each case is one record value (or request body) and the reason the pipeline gives it. The
gateway's answer is in ``GATEWAY``: 422 for a body it cannot split into events, else 202 with
every event rejected (one reason each). Built fresh per call: event ids are unique.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tests.factories import interaction

FAR_FUTURE = "2096-02-29T12:00:00+00:00"
# Over the pipeline's 256 KiB event limit and under the broker's: the base64 of the whole record
# in a dead letter (1.2 MB) would not fit the worker's 1 MB producer limit.
OVERSIZED = 900_000


@dataclass(frozen=True)
class Poison:
    name: str
    value: bytes
    reason: str  # what the pipeline calls it
    gateway: tuple[int, str]  # status, reason of the body (422) or of its one event (202)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def corpus(session_id: str = "s-poison") -> list[Poison]:
    """Every kind of bad record; those that parse as events carry ``session_id``."""
    def turn(**overrides) -> dict:
        return interaction(session_id=session_id, **overrides)

    many_fields = {**turn(), **{f"extra_{i}": i for i in range(3000)}}
    nested_metadata = turn(metadata={"deep": json.loads("[" * 100 + "]" * 100)})
    cases = [
        Poison("oversized_valid", _json(turn(response="x" * OVERSIZED)), "event_too_large", (202, "event_too_large")),
        Poison("oversized_garbage", b"\x00\x9c" * (OVERSIZED // 2), "event_too_large", (422, "invalid_json")),
        Poison("binary", random.Random(7).randbytes(4096), "invalid_json", (422, "invalid_json")),
        Poison("invalid_utf8", b'{"type": "interaction", "event_id": "\xff\xfe\xfd-0001"}', "invalid_json",
               (422, "invalid_json")),
        Poison("nested_arrays", b"[" * 5000 + b"]" * 5000, "too_deeply_nested", (422, "too_deeply_nested")),
        Poison("nested_objects", b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deeply_nested", (422, "too_deeply_nested")),
        Poison("unclosed", b"[" * 5000, "too_deeply_nested", (422, "too_deeply_nested")),
        Poison("nested_in_event", _json(nested_metadata), "too_deeply_nested", (422, "too_deeply_nested")),
        Poison("wrong_types", _json(turn(prompt_tokens="many", propensity="high", prompt="hi")), "schema_violation",
               (202, "schema_violation")),
        Poison("unknown_type", _json({"type": "sparkle", "event_id": "sparkle-0001"}), "unknown_type",
               (202, "unknown_type")),
        Poison("missing_type", _json({k: v for k, v in turn().items() if k != "type"}), "missing_type",
               (202, "missing_type")),
        Poison("markup_in_type", _json({"type": "[/x][bold]", "event_id": "markup-0001"}), "unknown_type",
               (202, "unknown_type")),
        Poison("empty", b"", "invalid_json", (422, "invalid_json")),
        Poison("null", b"null", "not_an_object", (422, "not_an_array")),
        Poison("number", b"1", "not_an_object", (422, "not_an_array")),
        Poison("string", b'"an event"', "not_an_object", (422, "not_an_array")),
        Poison("array_of_numbers", b"[1]", "not_an_object", (202, "not_an_object")),
        Poison("huge_integer", b'{"type": "interaction", "prompt_tokens": ' + b"9" * 5000 + b"}", "invalid_json",
               (422, "invalid_json")),
        Poison("lone_surrogate", json.dumps(turn(response="a\ud800b")).encode(), "invalid_json", (202, "invalid_json")),
        Poison("long_field_name", _json({**turn(), "k" * 100_000: 1}), "schema_violation", (202, "schema_violation")),
        Poison("many_errors", _json(many_fields), "schema_violation", (202, "schema_violation")),
        Poison("far_future", _json(turn(occurred_at=FAR_FUTURE)), "clock_skew", (202, "clock_skew")),
        Poison("end_of_calendar", _json(turn(occurred_at="9999-12-31T23:59:59-05:00")), "clock_skew",
               (202, "clock_skew")),
        Poison("start_of_calendar", _json(turn(occurred_at="0001-01-01T00:00:00+01:00")), "occurred_at_out_of_range",
               (202, "occurred_at_out_of_range")),
        Poison("first_day", _json(turn(occurred_at="0001-01-01T00:00:00+00:00")), "occurred_at_out_of_range",
               (202, "occurred_at_out_of_range")),
        Poison("far_future_tick", _json({"type": "tick", "event_id": "tick-rogue-0001", "occurred_at": FAR_FUTURE,
                                         "partition": 0}), "clock_skew", (202, "unknown_type")),
    ]
    return cases
