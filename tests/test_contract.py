"""The event contract: per-kind feedback rules, strictness, and the exported JSON Schemas."""

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from streams.contract import SCHEMAS, USER_EVENT_ADAPTER, Feedback, Interaction, json_schema
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
