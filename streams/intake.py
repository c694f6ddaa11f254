"""Intake: turn a request body into accepted events and dead-letter records, with reasons.

Plain functions with no I/O, used by the HTTP gateway (and by anything else that takes raw
input), so every rejection reason is decided in one place and tested without a server.

Bodies are a JSON array of events (a single JSON object is taken as an array of one) or JSON
lines. One bad event never sinks the others: each is accepted or rejected on its own. Only a
body that cannot be split into events at all (not JSON, not an array, nested deeper than
``MAX_JSON_DEPTH``) is rejected whole.

Whatever the input, its dead letter fits in one Kafka message: :func:`dead_letter` keeps at
most ``max_raw_bytes`` of the raw bytes and bounds the detail, the issues and the ids, so a
record is never larger than :func:`dead_letter_max_bytes` (docs/pipeline.md, "Poison").
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache, cached_property
from itertools import accumulate

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
from streams.pii import Scrubber

UserEventModel = Interaction | Feedback | Annotation
USER_EVENT_LIST_ADAPTER: TypeAdapter[list[UserEventModel]] = TypeAdapter(list[UserEvent])

_TYPES = "'interaction', 'feedback', 'annotation'"
JSONL_CONTENT_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")

# A valid event nests 4 deep (event > prompt > message, context > features); a body adds one.
# Deeper input is refused before it is parsed: Python's json recurses once per level and
# raises RecursionError at about a thousand.
MAX_JSON_DEPTH = 64
DEFAULT_MAX_EVENT_BYTES = 256 * 1024
DEFAULT_DEAD_LETTER_MAX_RAW_BYTES = 512 * 1024
# What one dead letter keeps besides the raw bytes.
DETAIL_MAX_CHARS = 1000
ISSUES_MAX = 20
ISSUE_TEXT_MAX_CHARS = 200
ID_MAX_CHARS = 128
# The serialized envelope of a dead letter (every field but raw_b64) is at most this large:
# the bounds above, each character JSON-escaped to at most 6 bytes, plus the field names.
DEAD_LETTER_ENVELOPE_BYTES = 64 * 1024
# The smallest producer limit a dead letter must fit: Faust's producer_max_request_size
# default, which the pipeline worker runs with (aiokafka's default is 1 MiB).
PRODUCER_MAX_REQUEST_BYTES = 1_000_000
# Kafka's per-record overhead (batch header, key, headers) that must fit beside the value.
RECORD_OVERHEAD_BYTES = 4096
# How far past the kept prefix raw input is scrubbed (longer than any value a detector takes).
SCRUB_MARGIN_BYTES = 4096
# A dead letter's received_at when nothing about its record says a time (replay must agree).
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int
    max_events: int
    dead_letter_max_raw_bytes: int
    max_clock_skew_s: float | None = None  # None: occurred_at may be any time ahead
    event_time_span_s: float = 0  # PipelineSettings.event_time_span_s

    # As timedeltas, made once: every event of a body is checked against them.
    @cached_property
    def max_clock_skew(self) -> timedelta | None:
        return None if self.max_clock_skew_s is None else timedelta(seconds=self.max_clock_skew_s)

    @cached_property
    def event_time_span(self) -> timedelta:
        return timedelta(seconds=self.event_time_span_s)


@dataclass(frozen=True)
class Accepted:
    index: int
    event: UserEventModel  # or the review desk's ReviewCorrection, which it builds itself
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


class TooDeeplyNested(ValueError):
    """JSON nested deeper than ``MAX_JSON_DEPTH``: refused before it is parsed."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"JSON nested {depth} deep; the limit is {MAX_JSON_DEPTH}")
        self.depth = depth


# A JSON string (escapes included; an unterminated one runs to the end), skipped by the scan.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _text(data: bytes | str) -> str:
    """``data`` decoded as ``json.loads`` would (UTF-8, -16 or -32), invalid bytes replaced."""
    if isinstance(data, str):
        return data
    return data.decode(json.detect_encoding(data), "replace")


def excess_depth(data: bytes | str) -> int:
    """How deep the brackets of ``data`` nest (strings skipped) if deeper than
    ``MAX_JSON_DEPTH``, else 0; without parsing it, so it works on invalid JSON too.

    Two regular-expression passes and, only when there are more opening brackets than the
    limit, a running sum over the brackets: cheap beside parsing."""
    structure = _NOT_BRACKETS.sub("", _STRING.sub("", _text(data)))
    if structure.count("[") + structure.count("{") <= MAX_JSON_DEPTH:
        return 0
    depth = max(accumulate(map(_DEPTH_STEP.__getitem__, structure)), default=0)
    return depth if depth > MAX_JSON_DEPTH else 0


def check_depth(data: bytes | str) -> None:
    """Raise :class:`TooDeeplyNested` if ``data`` nests deeper than ``MAX_JSON_DEPTH``."""
    if depth := excess_depth(data):
        raise TooDeeplyNested(depth)


def parse_json(data: bytes | str) -> object:
    """``json.loads`` that refuses nesting deeper than ``MAX_JSON_DEPTH`` (TooDeeplyNested, a
    ValueError) instead of recursing into a RecursionError; other bad input raises ValueError."""
    text = data if isinstance(data, str) else data.decode(json.detect_encoding(data), "surrogatepass")
    check_depth(text)
    try:
        return json.loads(text)
    except RecursionError as exc:  # not reached below the limit; kept as a backstop
        raise TooDeeplyNested(MAX_JSON_DEPTH + 1) from exc


def too_deeply_nested_detail(depth: int) -> str:
    return (f"JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH} (an event nests at most 4): "
            "send flat events")


def split_body(body: bytes, content_type: str) -> list[bytes | object]:
    """The body's events: raw lines for JSON lines, parsed items for a JSON array."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type in JSONL_CONTENT_TYPES:
        return [line for line in body.split(b"\n") if line.strip()]
    try:
        parsed = parse_json(body)
    except TooDeeplyNested as exc:
        raise BodyRejected("too_deeply_nested", "request body: " + too_deeply_nested_detail(exc.depth)) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
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


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked, lone surrogates (which no JSON
    encoder writes as UTF-8) spelled out as ``\\udXXX``."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 15] + " ...(truncated)"


def _issue(loc: str, msg: str) -> ValidationIssue:
    return ValidationIssue(loc=clip(loc, ISSUE_TEXT_MAX_CHARS), msg=clip(msg, ISSUE_TEXT_MAX_CHARS))


def issues_of(error: ValidationError) -> tuple[ValidationIssue, ...]:
    """The first ``ISSUES_MAX`` field errors (the detail says how many there were)."""
    return tuple(
        _issue(".".join(str(p) for p in e["loc"]) or "(event)", e["msg"])
        for e in error.errors(include_url=False)[:ISSUES_MAX]
    )


def why_invalid(error: ValidationError, raw: bytes) -> tuple[str, str, tuple[ValidationIssue, ...]]:
    """Reason, detail and issues of a record that failed validation; nesting past the limit
    is named as such (pydantic's parser only says it recursed too deep)."""
    if depth := excess_depth(raw):
        return "too_deeply_nested", too_deeply_nested_detail(depth), ()
    reason, detail = classify_error(error)
    return reason, detail, issues_of(error)


def classify_error(error: ValidationError) -> tuple[str, str]:
    """Reason code and a one-line, actionable message (at most ``DETAIL_MAX_CHARS``)."""
    reason, detail = _classify(error)
    return reason, clip(detail, DETAIL_MAX_CHARS)


def _classify(error: ValidationError) -> tuple[str, str]:
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


def event_time_problem(
    occurred_at: datetime, received_at: datetime | None, source: str, *, max_skew: timedelta | None, span: timedelta
) -> tuple[str, str] | None:
    """Why an event's time must not become event time, if it must not (reason, detail).

    ``clock_skew``: dated more than ``max_skew`` after ``received_at`` (``source`` says where
    that time came from): a wrong clock, which would close every open window of its
    partition and make all later feedback late. ``occurred_at_out_of_range``: so near the
    ends of the calendar that its windows (``span`` either side) cannot be computed. Far in
    the past is not a problem here: the pipeline's join treats it as late."""
    if max_skew is not None and received_at is not None and occurred_at - received_at > max_skew:
        return "clock_skew", (
            f"occurred_at {occurred_at.isoformat()} is {occurred_at - received_at} ahead of its receive time "
            f"{received_at.isoformat()} ({source}); the limit is {max_skew.total_seconds():g} s: fix the "
            "sending clock (occurred_at needs its timezone)"
        )
    try:
        at = occurred_at.astimezone(timezone.utc)
        _ = (at - span, at + span)  # only whether they can be computed
    except OverflowError:
        return "occurred_at_out_of_range", (f"occurred_at {occurred_at.isoformat()} is too near the ends of the "
                                            "calendar for the pipeline's windows: send the real time")
    return None


def _event_id_of(item: object) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("event_id"), str):
        return clip(item["event_id"], ID_MAX_CHARS)
    return None


def _check_count(count: int, limits: Limits) -> None:
    if count > limits.max_events:
        raise BodyRejected(
            "too_many_events",
            f"{count} events in one request; the limit is {limits.max_events}: split it",
        )


def _admit(
    index: int, event: UserEventModel, raw: bytes, app_id: str, limits: Limits, received_at: datetime | None
) -> Accepted | Rejected:
    """Checks after the schema: size of the canonical form, the owning app, the clock."""
    try:
        payload = event.model_dump_json().encode("utf-8")
    except ValueError:  # a lone surrogate escape ("\\ud800") parses, but is no Unicode text
        detail = "event holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800)"
        return Rejected(index, "invalid_json", detail, raw, event.event_id)
    if len(payload) > limits.max_event_bytes:
        detail = f"event is {len(payload)} bytes; the limit is {limits.max_event_bytes}"
        return Rejected(index, "event_too_large", detail, raw, event.event_id)
    if event.app_id != app_id:
        detail = f"event app_id '{event.app_id}' does not match the API key's app '{app_id}'"
        return Rejected(index, "app_id_mismatch", detail, raw, event.event_id)
    problem = event_time_problem(event.occurred_at, received_at, "the gateway's clock", max_skew=limits.max_clock_skew,
                                 span=limits.event_time_span)
    if problem is not None:
        return Rejected(index, *problem, raw, event.event_id)
    return Accepted(index, event, payload)


def check_body(
    body: bytes, content_type: str, app_id: str, limits: Limits, received_at: datetime | None = None
) -> list[Accepted | Rejected]:
    """Every event of a request body, accepted or rejected with its reason. With
    ``received_at``, events dated more than ``limits.max_clock_skew_s`` after it are rejected."""
    if content_type.split(";")[0].strip().lower() not in JSONL_CONTENT_TYPES:
        # Fast path: a clean JSON array is parsed and validated in one pass of pydantic-core.
        try:
            events = USER_EVENT_LIST_ADAPTER.validate_json(body)
        except ValidationError:
            events = None
        if events is not None:
            _check_count(len(events), limits)
            results = [_admit(i, e, b"", app_id, limits, received_at) for i, e in enumerate(events)]
            if all(isinstance(r, Accepted) for r in results):
                return results
    # Some event is bad: judge each on its own, keeping the raw bytes of the rejected ones.
    return check_events(split_body(body, content_type), app_id, limits, received_at)


def check_events(
    items: list[bytes | object], app_id: str, limits: Limits, received_at: datetime | None = None
) -> list[Accepted | Rejected]:
    """Validate each event: schema, size, nesting, that it belongs to the authenticated app
    and (with ``received_at``) that it is not dated ahead of it."""
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
            raw = item if is_line else _raw(item)
            reason, detail, issues = why_invalid(error, raw)
            # A line nested too deep parses to None here, as an invalid one would not parse at all.
            parsed = _parsed_or_none(item) if is_line and reason != "invalid_json" else item
            results.append(Rejected(index, reason, detail, raw, _event_id_of(parsed), issues))
            continue
        results.append(_admit(index, event, item if is_line else _raw(item), app_id, limits, received_at))
    return results


def _parsed_or_none(line: bytes) -> object:
    try:
        return parse_json(line)
    except ValueError:
        return None


def _raw(item: object) -> bytes:
    # surrogatepass: a lone surrogate escape in the input is kept, as the bytes it stood for
    return json.dumps(item, ensure_ascii=False).encode("utf-8", "surrogatepass")


def dead_letter_max_bytes(max_raw_bytes: int) -> int:
    """The most bytes a dead letter keeping ``max_raw_bytes`` serializes to (base64 + envelope)."""
    return 4 * -(-max_raw_bytes // 3) + DEAD_LETTER_ENVELOPE_BYTES


def largest_raw_bytes(record_limit: int = PRODUCER_MAX_REQUEST_BYTES) -> int:
    """The largest ``max_raw_bytes`` whose dead letters fit a record limit, Kafka overhead included."""
    return (record_limit - RECORD_OVERHEAD_BYTES - DEAD_LETTER_ENVELOPE_BYTES) // 4 * 3


def refused_record(error: ValidationError, value: bytes, *, topic: str, partition: int, offset: int,
                   timestamp_s: float | None, stage: str) -> DeadLetter:  # fmt: skip
    """The dead letter of a record that a reader (``stage``) of ``topic`` cannot decode.

    Every reader of a topic that anyone can produce to refuses what it cannot read this way
    and keeps going: the learner (examples, control), the trainer and the swap controller
    (control). Its id names the reader and the record, so a redelivered record gives the same
    dead letter, and each reader's refusal is its own."""
    reason, detail, issues = why_invalid(error, value)
    received = datetime.fromtimestamp(timestamp_s, timezone.utc) if timestamp_s else EPOCH
    return dead_letter(
        reason=reason, detail=f"{topic} record: {detail}", raw=value, received_at=received, stage=stage,
        max_raw_bytes=DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, issues=issues,
        dead_letter_id=f"{stage}-{topic}-{partition}-{offset}",
    )  # fmt: skip


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
    dead_letter_id: str | None = None,
) -> DeadLetter:
    """A dead-letter record keeping (up to ``max_raw_bytes`` of) the raw input, its PII
    replaced (:func:`scrub_raw`): dead letters are kept and archived like events, and shown to
    operators, so they must not be where an app's users' phone numbers and keys end up.

    Every part is bounded (detail, issues, ids), so the record serializes to at most
    :func:`dead_letter_max_bytes` whatever the input was."""
    # Scrubbed a little past the cut, so that no value straddling it is kept half.
    window = raw[: max_raw_bytes + SCRUB_MARGIN_BYTES]
    scrubbed = scrub_raw(window)
    kept = scrubbed[:max_raw_bytes]
    return DeadLetter(
        dead_letter_id=clip(dead_letter_id or uuid.uuid4().hex, ID_MAX_CHARS),
        received_at=received_at,
        stage=clip(stage, ID_MAX_CHARS),
        app_id=None if app_id is None else clip(app_id, ID_MAX_CHARS),
        event_id=None if event_id is None else clip(event_id, ID_MAX_CHARS),
        reason=clip(reason, ID_MAX_CHARS),
        detail=clip(detail, DETAIL_MAX_CHARS),
        issues=[_issue(i.loc, i.msg) for i in list(issues)[:ISSUES_MAX]],
        raw_b64=base64.b64encode(kept).decode("ascii"),
        raw_size=len(raw),
        raw_truncated=len(kept) < len(scrubbed) or len(window) < len(raw),
        raw_scrubbed=scrubbed != window,
    )


@cache
def _scrubber() -> Scrubber:
    return Scrubber()  # the pipeline's: every detector


def scrub_raw(raw: bytes) -> bytes:
    """``raw`` with PII replaced as the pipeline replaces it in events. Bytes that are not
    UTF-8 stay as they are around the text (surrogateescape), so binary input keeps its shape."""
    text = raw.decode("utf-8", errors="surrogateescape")
    scrubbed = _scrubber().scrub(text).text
    return raw if scrubbed == text else scrubbed.encode("utf-8", errors="surrogateescape")
