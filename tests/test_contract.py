"""The event contract: per-kind feedback rules, strictness, and the exported JSON Schemas."""

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from streams.contract import SCHEMAS, USER_EVENT_ADAPTER, Feedback, Interaction, gateway_session_id, json_schema
from tests.factories import ANY_TURN, annotation, feedback, interaction

SCHEMA_DIR = Path(__file__).parents[1] / "schemas" / "v1"


@pytest.mark.parametrize(
    "kind, fields",
    [
        ("thumbs", {"value": -1}),
        ("rating", {"value": 5}),
        ("edit", {"text": "better"}),
        ("report", {}),
        ("report", {"text": "offensive"}),
        ("regenerate", {}),
        ("copy", {}),
        ("abandon", {}),
        ("dwell", {"value": 0}),
        ("rephrase", {"text": "say it again"}),
        ("score", {"name": "helpfulness", "value": 7}),
        ("score", {"name": "correct", "label": "true"}),
        ("pairwise", {"rejected_interaction_id": "i-2"}),
        ("thumbs", {"value": -1, "comment": "why: it ignored my question"}),
        ("copy", {"comment": "copied it to my notes", "feedback_id": "fb-7"}),
    ],
)
def test_every_feedback_kind_accepts_its_valid_form(kind, fields):
    event = USER_EVENT_ADAPTER.validate_python({**feedback(ANY_TURN, kind), **fields})
    assert isinstance(event, Feedback) and event.kind == kind


@pytest.mark.parametrize(
    "kind, fields, message",
    [
        ("thumbs", {"value": 3}, "1 (up) or -1 (down)"),
        ("thumbs", {"value": None}, "needs value"),
        ("rating", {"value": 6}, "1 to 5"),
        ("rating", {"value": 0}, "1 to 5"),
        ("dwell", {"value": -1}, "seconds >= 0"),
        ("edit", {"text": None}, "needs text"),
        ("edit", {"text": ""}, "needs text"),
        ("copy", {"value": 1}, "takes no value"),
        ("regenerate", {"text": "x"}, "takes no text"),
        ("score", {"value": 1}, "needs name"),
        ("score", {"name": "helpfulness"}, "exactly one of value or label"),
        ("score", {"name": "helpfulness", "value": 1, "label": "true"}, "exactly one of value or label"),
        ("score", {"name": "has space", "value": 1}, "should match pattern"),
        ("score", {"name": "correct", "label": ""}, "at least 1 character"),
        ("thumbs", {"value": 1, "name": "helpfulness"}, "takes no name"),
        ("rating", {"value": 4, "label": "good"}, "takes no label"),
        ("thumbs", {"value": 1, "rejected_interaction_id": "i-2"}, "takes no rejected_interaction_id"),
        ("pairwise", {}, "needs rejected_interaction_id"),
        ("pairwise", {"rejected_interaction_id": "i-1"}, "the rejected interaction is the chosen one"),
        ("pairwise", {"rejected_interaction_id": "i-2", "value": 1}, "takes no value"),
        ("thumbs", {"value": 1, "comment": "x" * 4001}, "at most 4000 characters"),
    ],
)
def test_feedback_value_must_fit_its_kind(kind, fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        USER_EVENT_ADAPTER.validate_python({**feedback(ANY_TURN, kind), **fields})


def test_unknown_fields_are_rejected_not_dropped():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        USER_EVENT_ADAPTER.validate_python({**interaction(), "respones": "typo"})


@pytest.mark.parametrize("event_id", ["short", "has space in it", "-leading-dash", "x" * 129])
def test_event_ids_are_constrained(event_id):
    with pytest.raises(ValidationError):
        USER_EVENT_ADAPTER.validate_python(interaction(event_id=event_id))


def test_timestamps_need_a_timezone():
    with pytest.raises(ValidationError, match="timezone"):
        USER_EVENT_ADAPTER.validate_python(interaction(occurred_at="2026-11-21T10:00:00"))


def test_canonical_json_round_trips():
    event = USER_EVENT_ADAPTER.validate_python(interaction())
    again = USER_EVENT_ADAPTER.validate_json(event.model_dump_json())
    assert again == event and isinstance(again, Interaction)
    assert json.loads(event.model_dump_json())["schema_version"] == 1


def test_committed_schema_files_match_the_models():
    """schemas/v1 is what non-Python apps validate against; it must not drift from the code."""
    for name in SCHEMAS:
        committed = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
        assert committed == json_schema(name), f"run `feedloop schema export` ({name} drifted)"


def test_exported_schema_validates_like_the_models():
    schema = json_schema("user_event")
    validator = jsonschema.Draft202012Validator(schema)
    for good in (interaction(), feedback(ANY_TURN, "edit"), annotation(ANY_TURN)):
        assert not list(validator.iter_errors(good))
    for bad in (
        {**interaction(), "type": "sparkle"},
        {**feedback(ANY_TURN, "thumbs"), "kind": "sparkle"},
        {**interaction(), "prompt": []},
        {k: v for k, v in interaction().items() if k != "response"},
    ):
        assert list(validator.iter_errors(bad)), bad


@pytest.mark.parametrize("event", [feedback(ANY_TURN, "thumbs"), annotation(ANY_TURN)], ids=["feedback", "annotation"])
def test_a_signal_without_a_session_is_in_its_interactions_gateway_session(event):
    without = {k: v for k, v in event.items() if k != "session_id"} | {"interaction_id": "7d2e.1"}
    parsed = USER_EVENT_ADAPTER.validate_json(json.dumps(without))
    assert parsed.session_id == gateway_session_id("7d2e.1") == "chat-7d2e"
    assert json.loads(parsed.model_dump_json())["session_id"] == "chat-7d2e"  # the topic's copy carries it
    assert USER_EVENT_ADAPTER.validate_python({**without, "session_id": "s-9"}).session_id == "s-9"
    validator = jsonschema.Draft202012Validator(json_schema("user_event"))
    assert not list(validator.iter_errors(without))
    # null is not "absent": the model and the schema both refuse it
    assert list(validator.iter_errors({**without, "session_id": None}))
    with pytest.raises(ValidationError, match="session_id"):
        USER_EVENT_ADAPTER.validate_python({**without, "session_id": None})
