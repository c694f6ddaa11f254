"""The event contract, version 1: the one source of truth for every record on feedloop's topics.

Chat apps send three kinds of *user events*: ``interaction`` (a prompt and the response an
adapter gave), ``feedback`` (explicit or implicit signals about an interaction) and
``annotation`` (a human or model label). feedloop itself emits *control events* (batch emitted,
adapter ready/loaded/promoted/rolled back, drift alarm) and *dead-letter records* for input it
could not accept. ``feedloop schema export`` writes the JSON Schema of each for apps written in
other languages; docs/events.md explains the fields and the topic layout.

Every record carries ``schema_version``. Unknown fields are rejected rather than dropped so a
typo never silently loses data; app-specific extras go in ``metadata``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

SCHEMA_VERSION = 1

Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$"),
]
EventId = Annotated[
    str,
    StringConstraints(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"),
]
Scalar = Union[str, int, float, bool]
Metadata = Annotated[dict[str, Scalar], Field(max_length=64)]
# The router's whole distribution at a decision: adapter -> probability.
Probabilities = Annotated[dict[Id, Annotated[float, Field(ge=0, le=1)]], Field(max_length=64)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: Literal[1] = Field(
        SCHEMA_VERSION, description="Contract version; v1 is the only one so far."
    )


class _Event(_Record):
    event_id: EventId = Field(
        description="Unique per event and stable across retries: the de-duplication key. "
        "Generate a UUID when the event is created, not when it is sent."
    )
    occurred_at: AwareDatetime = Field(description="When it happened, with a timezone.")
    metadata: Metadata = Field(default_factory=dict, description="App-specific scalars.")


# --- user events ---------------------------------------------------------------------------


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=256)
    arguments: str = Field(description="The arguments as the model wrote them (JSON text, not checked).")


class ToolCall(BaseModel):
    """A tool call an assistant turn made, as in OpenAI's chat API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(description="The text; empty for an assistant turn that only called tools.")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the tools it called.")
    tool_call_id: str | None = Field(None, max_length=256, description="tool: the call this message answers.")


GATEWAY_SESSION_PREFIX = "chat-"


def gateway_session_id(interaction_id: str) -> str:
    """The session the chat gateway records an interaction under when the app named none.

    The gateway mints interaction ids ``<uuid>`` (one choice) or ``<uuid>.<i>`` (choice ``i``
    of ``n``); all choices of one answer share the session ``chat-<uuid>``. Feedback that
    leaves out ``session_id`` gets this one, so it lands on its interaction's partition."""
    return GATEWAY_SESSION_PREFIX + interaction_id.split(".", 1)[0]


# The metadata key the chat gateway sets on an interaction whose client left mid-stream: what
# was recorded is what the user saw, not the whole answer (kept out of training).
STREAM_INTERRUPTED = "stream_interrupted"


class Context(BaseModel):
    """Features the router and the curator use: who asked, about what, from where."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str | None = Field(None, max_length=64, description="Topic of the request, e.g. 'code'.")
    locale: str | None = Field(None, max_length=35, description="BCP 47 tag, e.g. 'en-GB'.")
    client: str | None = Field(None, max_length=64, description="e.g. 'web', 'ios'.")
    cohort: str | None = Field(None, max_length=64, description="Experiment or user cohort.")
    features: Metadata = Field(default_factory=dict, description="More routing features.")


class Interaction(_Event):
    """One prompt and the response an adapter served."""

    type: Literal["interaction"] = "interaction"
    app_id: Id
    user_id: Id = Field(description="The app's user id; feedloop pseudonymizes it.")
    session_id: Id = Field(description="The conversation; the partition key of all its events.")
    interaction_id: Id = Field(description="Unique per interaction; feedback refers to it.")
    adapter: Id = Field(description="Name of the adapter (router arm) that served the response.")
    propensity: float | None = Field(
        None, gt=0, le=1, description="Probability with which the router chose that adapter."
    )
    probabilities: Probabilities | None = Field(
        None,
        description="The router's whole distribution at the decision (POST /v1/route's probabilities): the A/B "
        "test counts the interaction for a champion and challenger only if both had a chance in it.",
    )
    prompt: list[Message] = Field(min_length=1, description="The messages sent to the model.")
    response: str
    context: Context = Field(default_factory=Context)
    prompt_tokens: int | None = Field(None, ge=0)
    completion_tokens: int | None = Field(None, ge=0)
    latency_ms: float | None = Field(None, ge=0)
    training_consent: bool = Field(
        True, description="False: the user opted out; kept for metrics, never trained on."
    )
    regenerates: Id | None = Field(
        None, description="interaction_id of the response this one replaced (user pressed regenerate)."
    )
    tool_calls: list[ToolCall] = Field(
        default_factory=list, description="Tools the response called (its text may then be empty)."
    )


FeedbackKind = Literal[
    "thumbs", "rating", "edit", "report", "regenerate", "copy", "abandon", "dwell", "rephrase", "score", "pairwise"
]

# The fields whose use depends on the kind, and what each kind needs in them. A field a kind
# does not list is forbidden for it, so a misplaced field is caught early. "either": exactly
# one of the kind's "either" fields (a score is a number or a label).
_KIND_FIELDS = ("value", "text", "name", "label", "rejected_interaction_id")
_FEEDBACK_RULES: dict[str, dict[str, str]] = {
    "thumbs": {"value": "required: 1 (up) or -1 (down)"},
    "rating": {"value": "required: 1 to 5"},
    "edit": {"text": "required: the corrected response"},
    "report": {"text": "optional: the reason"},
    "regenerate": {},
    "copy": {},
    "abandon": {},
    "dwell": {"value": "required: seconds >= 0"},
    "rephrase": {"text": "optional: the rephrased prompt"},
    "score": {"name": "required: the score's name", "value": "either: a number", "label": "either: a label"},
    "pairwise": {"rejected_interaction_id": "required: the interaction not chosen"},
}


def with_default_session(data: Any) -> Any:
    """Feedback or an annotation that leaves out ``session_id`` is in its interaction's
    gateway session (:func:`gateway_session_id`). The models' before-validator, so every path
    that builds the event (the gateway, the pipeline, replay, import) fills in the same
    session and the canonical JSON on the topic carries it; and what partitions raw events
    before they are parsed (a replayed file of bare events) applies it too."""
    if isinstance(data, dict) and "session_id" not in data and isinstance(data.get("interaction_id"), str):
        return {**data, "session_id": gateway_session_id(data["interaction_id"])}
    return data


def _absent_from_schema(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # filled by with_default_session, never null


_SESSION_DEFAULT = (
    "The interaction's session: routes it beside the interaction. Absent: the chat gateway's session of "
    "the interaction, 'chat-' + interaction_id up to its first '.'."
)


class Feedback(_Event):
    """An explicit (thumbs, rating, edit, report, score, pairwise) or implicit signal about one interaction."""

    type: Literal["feedback"] = "feedback"
    app_id: Id
    session_id: Id = Field(None, description=_SESSION_DEFAULT, json_schema_extra=_absent_from_schema)
    interaction_id: Id = Field(description="The interaction it is about; pairwise: the one chosen.")
    user_id: Id | None = Field(None, description="Who gave it, if not the interaction's user.")
    kind: FeedbackKind
    value: float | None = Field(None, description="thumbs: 1/-1; rating: 1-5; dwell: seconds; score: a number.")
    text: str | None = Field(None, description="edit: corrected text; rephrase/report: optional.")
    comment: str | None = Field(
        None, max_length=4000, description="Any kind: the user's words about it ('why thumbs down'). Never trained on."
    )
    name: Id | None = Field(None, description="score: the score's name, e.g. 'helpfulness'.")
    label: str | None = Field(
        None, min_length=1, max_length=128, description="score: a categorical or boolean value, e.g. 'true'."
    )
    rejected_interaction_id: Id | None = Field(
        None, description="pairwise: the interaction not chosen (same session and user as interaction_id)."
    )
    feedback_id: Id | None = Field(
        None,
        description="The app's id of this piece of feedback: a later one with the same id on the same interaction "
        "replaces it. Absent: thumbs and rating replace per (kind, user), a score per (name, user), a pairwise "
        "choice per (rejected_interaction_id, user).",
    )

    _default_session = model_validator(mode="before")(classmethod(lambda cls, data: with_default_session(data)))

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Feedback:
        rules = _FEEDBACK_RULES[self.kind]
        for name in _KIND_FIELDS:
            rule, given = rules.get(name, "forbidden"), getattr(self, name)
            if rule.startswith("required") and given in (None, ""):
                raise ValueError(f"feedback kind '{self.kind}' needs {name} ({rule})")
            if rule == "forbidden" and given is not None:
                raise ValueError(f"feedback kind '{self.kind}' takes no {name}")
        either = [name for name in _KIND_FIELDS if rules.get(name, "").startswith("either")]
        if either and sum(getattr(self, name) is not None for name in either) != 1:
            raise ValueError(f"feedback kind '{self.kind}' needs exactly one of {' or '.join(either)}")
        bad_value = (
            (self.kind == "thumbs" and self.value not in (1, -1))
            or (self.kind == "rating" and not 1 <= self.value <= 5)
            or (self.kind == "dwell" and self.value < 0)
        )
        if bad_value:
            raise ValueError(f"feedback kind '{self.kind}': value {self.value} ({rules['value']})")
        if self.rejected_interaction_id == self.interaction_id:
            raise ValueError("feedback kind 'pairwise': the rejected interaction is the chosen one")
        return self


class Annotation(_Event):
    """A label on an interaction from a human reviewer or a model judge."""

    type: Literal["annotation"] = "annotation"
    app_id: Id
    session_id: Id = Field(None, description=_SESSION_DEFAULT, json_schema_extra=_absent_from_schema)
    interaction_id: Id
    annotator: Id = Field(description="Reviewer id or judge model name.")
    source: Literal["human", "model"]
    label: str = Field(max_length=128, description="e.g. 'good', 'harmful', 'off_topic'.")
    score: float | None = Field(None, ge=0, le=1, description="Quality score, 1 is best.")
    confidence: float | None = Field(None, ge=0, le=1)
    notes: str | None = None
    rubric: Id | None = Field(
        None, description="The versioned rubric it was graded by (a model judge's, e.g. 'helpful-v1'); a new rubric "
        "id is a new judgement.",
    )

    _default_session = model_validator(mode="before")(classmethod(lambda cls, data: with_default_session(data)))


UserEvent = Annotated[Union[Interaction, Feedback, Annotation], Field(discriminator="type")]


# --- control events ----------------------------------------------------------------------


class _ControlEvent(_Event):
    source: str = Field(description="The component that emitted it, e.g. 'curator'.")


class BatchEmitted(_ControlEvent):
    type: Literal["batch_emitted"] = "batch_emitted"
    batch_id: Id
    path: str = Field(description="Batch directory, relative to the data directory.")
    manifest_sha256: str
    example_count: int = Field(ge=0)
    trigger: Literal["size", "time", "drift", "manual"]
    loss_weights: dict[str, float] = Field(default_factory=dict)


class AdapterState(StrEnum):
    """Where an adapter is in its life: its ``state`` in the registry (``adapters`` table) and
    its role in the learner's lifecycle (``streams.lifecycle``), one set of names for both.
    A StrEnum, so the stored rows and the JSON hold the plain values.

    Trained and past the gate it is ``ready``; served under an A/B test it is a
    ``challenger``; promoted, the ``champion``; replaced by a promotion, ``retired``. It is
    ``rolled_back`` when its test (or an operator, or a reward drift alarm) ends it,
    ``superseded`` when a fresher adapter was served while it waited, and ``failed`` when the
    gate or the hot-swap controller refused it. ``loaded``: an arm the router serves beside the
    champion without a test (an initial arm other than the first)."""

    READY = "ready"
    LOADED = "loaded"
    CHALLENGER = "challenger"
    CHAMPION = "champion"
    RETIRED = "retired"
    SUPERSEDED = "superseded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class AdapterReady(_ControlEvent):
    type: Literal["adapter_ready"] = "adapter_ready"
    adapter: Id = Field(description="Immutable versioned name, never reused.")
    path: str
    sha256: str
    base_model_sha256: str
    parent: Id | None = None
    batch_ids: list[Id] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class AdapterLoaded(_ControlEvent):
    type: Literal["adapter_loaded"] = "adapter_loaded"
    adapter: Id
    replicas: list[str]


class AdapterPromoted(_ControlEvent):
    type: Literal["adapter_promoted"] = "adapter_promoted"
    adapter: Id
    previous_champion: Id | None = None
    evidence: dict[str, float] = Field(default_factory=dict)


class AdapterRolledBack(_ControlEvent):
    type: Literal["adapter_rolled_back"] = "adapter_rolled_back"
    adapter: Id
    reason: str
    evidence: dict[str, float] = Field(default_factory=dict)


class AdapterRefused(_ControlEvent):
    """The hot-swap controller would not serve an adapter: it failed validation or no replica
    could load it. Traffic never reached it."""

    type: Literal["adapter_refused"] = "adapter_refused"
    adapter: Id
    reason: str = Field(description="Short code, e.g. 'checksum_mismatch', 'load_failed'.")
    detail: str = Field(description="What was wrong and what to do about it.")


class AdapterUnloaded(_ControlEvent):
    """Replicas stopped serving an adapter (retired after a promotion, or rolled back)."""

    type: Literal["adapter_unloaded"] = "adapter_unloaded"
    adapter: Id
    replicas: list[str]


class AdapterPinned(_ControlEvent):
    """An operator froze routing: every request goes to ``adapter`` (None lifts the pin)."""

    type: Literal["adapter_pinned"] = "adapter_pinned"
    adapter: Id | None = Field(description="The adapter all traffic goes to; null unpins.")


class DriftAlarm(_ControlEvent):
    type: Literal["drift_alarm"] = "drift_alarm"
    signal: str = Field(description="What drifted, e.g. 'reward:adapter-3' or 'feature:domain'.")
    detector: str
    detected_at: AwareDatetime
    details: dict[str, float] = Field(default_factory=dict)

    @property
    def preferences_moved(self) -> bool:
        """The same adapter is rewarded differently: the users' preferences moved (not only
        what they ask about). Training data and tests from before it are stale."""
        return self.signal.startswith("reward:")


class UserErased(_ControlEvent):
    """A user asked to be erased (``POST /v1/users/{id}/erase``, ``feedloop erase``): the
    trainer cuts their records out of the batches it has not trained, and the adapters
    trained on them are named for retraining. It carries the pseudonym the user had until
    then, never the user id; ``occurred_at`` is the erasure's time (the key store's record of
    it), and the event id is derived from the pseudonym, so announcing it again dedupes."""

    type: Literal["user_erased"] = "user_erased"
    app_id: Id
    pseudonym: str = Field(pattern=r"^u_[0-9a-f]{32}$", description="The user's pseudonym before the erasure.")


ControlEvent = Annotated[
    Union[
        BatchEmitted, AdapterReady, AdapterLoaded, AdapterPromoted, AdapterRolledBack, AdapterRefused,
        AdapterUnloaded, AdapterPinned, DriftAlarm, UserErased,
    ],
    Field(discriminator="type"),
]


# --- records the pipeline writes -----------------------------------------------------------


class WatermarkTick(_Record):
    """Moves a partition's event time forward when it is idle, so open windows still close.

    The pipeline worker writes one into each idle partition of the events topic; because it
    is in the log, replay closes the same windows at the same place.
    """

    type: Literal["tick"] = "tick"
    event_id: EventId
    occurred_at: AwareDatetime
    partition: int = Field(ge=0)


class CurationTrigger(_Record):
    """Asks a partition's curator to cut a batch now (a drift alarm, or an operator).

    Written into every partition of the events topic, so the cut happens at the same place
    in the log live and in replay.
    """

    type: Literal["curation_trigger"] = "curation_trigger"
    event_id: EventId
    occurred_at: AwareDatetime
    partition: int = Field(ge=0)
    trigger: Literal["drift", "manual"]
    cause: str = Field(description="What asked for it, e.g. the drift alarm's event id.")
    preferences_moved: bool = Field(
        False,
        description="A reward drift alarm: the users' preferences moved. The curator forgets the records it "
        "holds (buffered and replay), which would teach what users no longer want, and cuts no early batch.",
    )


class AnnotatedExample(_Record):
    """One interaction after its feedback window closed: anonymized, with rewards per channel."""

    type: Literal["annotated_example"] = "annotated_example"
    example_id: str = Field(description="The interaction id.")
    app_id: str
    session_id: str
    user: str = Field(description="Pseudonym of the user (keyed HMAC), never the app's user id.")
    adapter: str
    propensity: float | None
    probabilities: dict[str, float] | None = Field(None, description="The interaction's, when it logged them.")
    cohort: str
    domain: str
    context: Context
    prompt: list[Message] = Field(description="PII scrubbed.")
    response: str = Field(description="PII scrubbed.")
    tool_calls: list[ToolCall] = Field(default_factory=list, description="The tools the response called; "
                                       "arguments PII scrubbed.")  # fmt: skip
    edit: str | None = Field(None, description="The user's correction, PII scrubbed.")
    comments: list[str] = Field(
        default_factory=list, description="Its feedback's comments, PII scrubbed: for people and metrics, not training."
    )
    regenerates: str | None = None
    rewards: dict[str, float | None] = Field(description="explicit, implicit, self_eval in [0, 1].")
    feedback_kinds: list[str] = Field(description="The kinds of its feedback; a score is 'score:<name>'.")
    training_consent: bool
    filtered: str | None = Field(None, description="Quality filter that kept it out of training.")
    occurred_at: AwareDatetime
    closed_at: AwareDatetime = Field(description="Event time at which its window closed.")
    event_ids: list[str]

    @property
    def key(self) -> tuple[str, str]:
        """What tells examples apart: an example id is its app's interaction id, unique in that app."""
        return self.app_id, self.example_id


class ReviewCorrection(_Record):
    """A reviewer's corrected answer to an example the learner picked for review.

    Written by the review desk (``POST /v1/review/...``), never by an app: ``/v1/events`` takes
    user events only. A review comes after the example's window closed, when the pipeline no
    longer holds the interaction (nor the user's identity), so the record carries the picked
    example itself, scrubbed as the learner emitted it; the pipeline makes the correction's SFT
    record and preference pair from it at once. Whose data they are is the example's
    pseudonym, which the batch manifest lists, so an erasure still cuts them out.
    """

    type: Literal["review_correction"] = "review_correction"
    event_id: EventId = Field(description="Derived from (app, example): a review sent twice is one.")
    occurred_at: AwareDatetime = Field(description="When the reviewer saved it.")
    review_id: str = Field(max_length=256, description="The pick's (``review-<example_id>``).")
    reviewer: Id
    correction: str = Field(min_length=1, description="The answer the model should have given.")
    example: AnnotatedExample

    @property
    def app_id(self) -> str:
        return self.example.app_id

    @property
    def session_id(self) -> str:  # its partition key: the example's conversation's partition
        return self.example.session_id


# --- dead letters ------------------------------------------------------------------------


class ValidationIssue(BaseModel):
    model_config = ConfigDict(frozen=True)

    loc: str
    msg: str


class DeadLetter(_Record):
    """Input feedloop could not accept, kept with the reason and the raw bytes."""

    type: Literal["dead_letter"] = "dead_letter"
    dead_letter_id: str
    received_at: AwareDatetime
    stage: str = Field(description="Where it was rejected, e.g. 'gateway'.")
    app_id: str | None = None
    event_id: str | None = Field(None, description="The event's id if one could be read.")
    reason: str = Field(
        description="Short code, e.g. 'invalid_json', 'schema_violation', 'clock_skew' (docs/events.md lists them)."
    )
    detail: str = Field(description="What was wrong and what to do about it (at most 1,000 characters).")
    issues: list[ValidationIssue] = Field(default_factory=list, description="The first 20 field-level errors.")
    raw_b64: str = Field(
        description="The input bytes, base64: at most FEEDLOOP_DEAD_LETTER_MAX_RAW_BYTES of them, so that the "
        "record always fits one Kafka message (raw_truncated says when that cut it short)."
    )
    raw_size: int = Field(ge=0, description="Size of the whole input in bytes.")
    raw_truncated: bool = Field(False, description="raw_b64 holds only the first bytes of the input.")
    raw_scrubbed: bool = Field(
        False, description="PII in raw_b64 was replaced by placeholders (as in events) before it was kept.")


ID_ADAPTER: TypeAdapter[str] = TypeAdapter(Id)  # an id an event can carry, checked on its own
USER_EVENT_ADAPTER: TypeAdapter[Interaction | Feedback | Annotation] = TypeAdapter(UserEvent)
# What the pipeline reads from the events topic: user events, the worker's ticks and triggers,
# and the review desk's corrections.
EVENTS_TOPIC_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Annotated[
        Union[Interaction, Feedback, Annotation, WatermarkTick, CurationTrigger, ReviewCorrection],
        Field(discriminator="type"),
    ]
)
CONTROL_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ControlEvent)

# Name -> model, for schema export and for the gateway's /v1/schemas endpoint.
SCHEMAS: dict[str, Any] = {
    "user_event": UserEvent,
    "interaction": Interaction,
    "feedback": Feedback,
    "annotation": Annotation,
    "control_event": ControlEvent,
    "dead_letter": DeadLetter,
    "annotated_example": AnnotatedExample,
}


def json_schema(name: str) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one record kind, as apps should validate it."""
    schema = TypeAdapter(SCHEMAS[name]).json_schema(mode="validation")
    schema["$id"] = f"https://feedloop.dev/schemas/v{SCHEMA_VERSION}/{name}.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
