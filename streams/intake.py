"""Intake: turn a request body into accepted events and dead-letter records, with reasons.

Plain functions with no I/O, used by the HTTP gateway (and by anything else that takes raw
input), so every rejection reason is decided in one place and tested without a server.

Bodies are a JSON array of events (a single JSON object is taken as an array of one) or JSON
lines. One bad event never sinks the others: each is accepted or rejected on its own. Only a
body that cannot be split into events at all (not JSON, not an array) is rejected whole.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from pydantic import TypeAdapter, ValidationError

from streams.contract import (
    USER_EVENT_ADAPTER,
    UserEvent,
    Annotation,
    DeadLetter,
    Feedback,
    Interaction,
    ValidationIssue,
)

UserEventModel = Interaction | Feedback | Annotation
USER_EVENT_LIST_ADAPTER: TypeAdapter[list[UserEventModel]] = TypeAdapter(list[UserEvent])

_TYPES = "'interaction', 'feedback', 'annotation'"
JSONL_CONTENT_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int
    max_events: int
    dead_letter_max_raw_bytes: int


@dataclass(frozen=True)
class Accepted:
    index: int
    event: UserEventModel
    payload: bytes  # canonical JSON, what goes on the topic


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str
    detail: str
    raw: bytes
    event_id: str | None = None
    issues: tuple[ValidationIssue, ...] = ()


class BodyRejected(Exception):
    """The body as a whole cannot be read as events (HTTP 422)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def split_body(body: bytes, content_type: str) -> list[bytes | object]:
    """The body's events: raw lines for JSON lines, parsed items for a JSON array."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type in JSONL_CONTENT_TYPES:
        return [line for line in body.split(b"\n") if line.strip()]
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyRejected(
            "invalid_json",
            f"request body is not valid JSON ({exc}); send a JSON array of events, or JSON "
            "lines with Content-Type: application/x-ndjson",
        ) from exc
    if isinstance(parsed, dict):
        return [parsed]
    if not isinstance(parsed, list):
        raise BodyRejected(
            "not_an_array", f"request body is a JSON {type(parsed).__name__}; send an array of events"
        )
    return parsed


def _issues(error: ValidationError) -> tuple[ValidationIssue, ...]:
    return tuple(
        ValidationIssue(loc=".".join(str(p) for p in e["loc"]) or "(event)", msg=e["msg"])
        for e in error.errors(include_url=False)
    )


def classify_error(error: ValidationError) -> tuple[str, str]:
    """Reason code and a one-line, actionable message for a validation error."""
    errors = error.errors(include_url=False)
    first = errors[0]
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds:
        return "invalid_json", f"event is not valid JSON: {first['msg']}"
    if "union_tag_not_found" in kinds:
        return "missing_type", f"event has no 'type'; it must be one of {_TYPES}"
    if "union_tag_invalid" in kinds:
        return "unknown_type", f"{first['msg']}; 'type' must be one of {_TYPES}"
    if kinds <= {"model_type", "model_attributes_type", "dict_type"} and not first["loc"]:
        return "not_an_object", "each event must be a JSON object"
    summary = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'event'}: {e['msg']}" for e in errors[:5]
    )
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "schema_violation", summary + more


def _event_id_of(item: object) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("event_id"), str):
        return item["event_id"][:128]
    return None


def _check_count(count: int, limits: Limits) -> None:
    if count > limits.max_events:
        raise BodyRejected(
            "too_many_events",
            f"{count} events in one request; the limit is {limits.max_events}: split it",
        )


def _admit(index: int, event: UserEventModel, raw: bytes, app_id: str, limits: Limits) -> Accepted | Rejected:
    """Checks after the schema: size of the canonical form, and the owning app."""
    payload = event.model_dump_json().encode("utf-8")
    if len(payload) > limits.max_event_bytes:
        detail = f"event is {len(payload)} bytes; the limit is {limits.max_event_bytes}"
        return Rejected(index, "event_too_large", detail, raw, event.event_id)
    if event.app_id != app_id:
        detail = f"event app_id '{event.app_id}' does not match the API key's app '{app_id}'"
        return Rejected(index, "app_id_mismatch", detail, raw, event.event_id)
    return Accepted(index, event, payload)


def check_body(body: bytes, content_type: str, app_id: str, limits: Limits) -> list[Accepted | Rejected]:
    """Every event of a request body, accepted or rejected with its reason."""
    if content_type.split(";")[0].strip().lower() not in JSONL_CONTENT_TYPES:
        # Fast path: a clean JSON array is parsed and validated in one pass of pydantic-core.
        try:
            events = USER_EVENT_LIST_ADAPTER.validate_json(body)
        except ValidationError:
            events = None
        if events is not None:
            _check_count(len(events), limits)
            results = [_admit(i, e, b"", app_id, limits) for i, e in enumerate(events)]
            if all(isinstance(r, Accepted) for r in results):
                return results
    # Some event is bad: judge each on its own, keeping the raw bytes of the rejected ones.
    return check_events(split_body(body, content_type), app_id, limits)


def check_events(items: list[bytes | object], app_id: str, limits: Limits) -> list[Accepted | Rejected]:
    """Validate each event: schema, size, and that it belongs to the authenticated app."""
    _check_count(len(items), limits)
    results: list[Accepted | Rejected] = []
    for index, item in enumerate(items):
        is_line = isinstance(item, bytes)
        if is_line and len(item) > limits.max_event_bytes:
            detail = f"event is {len(item)} bytes; the limit is {limits.max_event_bytes}"
            results.append(Rejected(index, "event_too_large", detail, item))
            continue
        try:
            event = (
                USER_EVENT_ADAPTER.validate_json(item)
                if is_line
                else USER_EVENT_ADAPTER.validate_python(item)
            )
        except ValidationError as error:
            reason, detail = classify_error(error)
            raw = item if is_line else _raw(item)
            parsed = json.loads(item) if is_line and reason != "invalid_json" else item
            results.append(Rejected(index, reason, detail, raw, _event_id_of(parsed), _issues(error)))
            continue
        results.append(_admit(index, event, item if is_line else _raw(item), app_id, limits))
    return results


def _raw(item: object) -> bytes:
    return json.dumps(item, ensure_ascii=False).encode("utf-8")


def dead_letter(
    *,
    reason: str,
    detail: str,
    raw: bytes,
    received_at: datetime,
    stage: str,
    max_raw_bytes: int,
    app_id: str | None = None,
    event_id: str | None = None,
    issues: tuple[ValidationIssue, ...] | list[ValidationIssue] = (),
) -> DeadLetter:
    """A dead-letter record keeping (up to ``max_raw_bytes`` of) the raw input."""
    kept = raw[:max_raw_bytes]
    return DeadLetter(
        dead_letter_id=uuid.uuid4().hex,
        received_at=received_at,
        stage=stage,
        app_id=app_id,
        event_id=event_id,
        reason=reason,
        detail=detail,
        issues=list(issues),
        raw_b64=base64.b64encode(kept).decode("ascii"),
        raw_size=len(raw),
        raw_truncated=len(kept) < len(raw),
    )
