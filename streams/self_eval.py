"""Self-evaluation: the pure core of the model judge that feeds the ``self_eval`` channel.

`feedloop judge` (``streams.annotator``) reads the interactions on the events topic, asks a
judge model to grade each answer by a versioned rubric, and writes the grade back to the
events topic as a model :class:`~streams.contract.Annotation`, where the pipeline joins it
like any other annotation (``streams.rewards`` averages model scores into ``self_eval``).
Every decision it takes is made here, deterministically and without I/O; the annotator only
moves bytes and waits on the network:

- **which** interactions are judged (:func:`skip_reason`): a share sampled by a hash of the
  interaction id (the same ones on every run and every replica), none whose user opted out
  of training or was erased (their text goes to no further model), none cut off mid-stream,
  none whose feedback window has already closed (the pipeline would refuse the annotation as
  late: the tokens would be spent for nothing), and none beyond the hourly budget;
- **what it costs** (:class:`HourlyBudget`): requests and tokens per wall-clock hour, the
  tokens as the endpoint reports them (estimated from the characters where it does not);
- **what is asked** (:func:`judge_messages`): the rubric, the PII-scrubbed conversation, and
  the instruction to reply with one JSON object;
- **what counts as an answer** (:func:`parse_verdict`): that object and nothing else, both
  numbers within [0, 1]. Anything else is :class:`MalformedVerdict`, never a score: a
  grade read out of prose would be a made-up score in the training signal;
- **which annotation** (:func:`annotation_for`): its event id is derived from (app,
  interaction, rubric), so an interaction judged twice by the same rubric (a redelivery
  after a crash, a second replica) gives the same event id, and the pipeline's
  de-duplication keeps the first. A new rubric id judges anew: a new annotation.

Why the events topic and not the closed examples: an example is emitted when its
interaction's window closes, and the pipeline joins nothing to a closed interaction. The
judge has to answer while the window is open (``FEEDLOOP_PIPELINE__EXPLICIT_WINDOW_S``,
half an hour by default), so it reads the interactions as they come, and scrubs their text
with the pipeline's own scrubber before any of it leaves for the judge.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel, Field

from streams.contract import STREAM_INTERRUPTED, Annotation, Id, Interaction

DEFAULT_RUBRIC_ID = "helpful-v1"
DEFAULT_RUBRIC = (
    "A good answer does what the user asked, is correct, and says it plainly: no padding, no "
    "invented facts, no refusal of a harmless request. Score 1 for an answer a careful expert "
    "would give, 0 for one that is wrong, off topic or harmful."
)
INSTRUCTION = (
    'Reply with one JSON object and nothing else: {"score": S, "confidence": C}, where S is the '
    "answer's quality from 0 (worst) to 1 (best) and C how sure you are of S, from 0 to 1."
)
LABEL = "self_eval"  # the annotations' label: the grade is in the score
MAX_REPLY_CHARS = 2_000  # a verdict is a few dozen characters; more is not one
CHARS_PER_TOKEN = 4  # the estimate where an endpoint reports no usage


class JudgeSettings(BaseModel):
    """``FEEDLOOP_JUDGE__*``: the model judge of `feedloop judge` (docs/pipeline.md, "Self-evaluation").

    By default the judge is the served base model: the first ``FEEDLOOP_VLLM_URLS`` entry,
    under the base model's zero-delta adapter name (as the chat gateway asks it)."""

    base_url: str | None = Field(
        None, description="The judge's OpenAI-compatible API, e.g. https://api.example.com/v1. Default: the first "
        "FEEDLOOP_VLLM_URLS entry + /v1.",
    )  # fmt: skip
    model: str | None = Field(None, description="The judge model's name at that endpoint. Default: the served base model.")
    name: Id | None = Field(None, description="The annotator the annotations name. Default: the model's name.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the judge's API key; null: no key (a local vLLM)."
    )
    rubric_id: Id = Field(
        DEFAULT_RUBRIC_ID, description="The rubric's versioned id, in every annotation: change it with the text."
    )
    rubric: str = Field(DEFAULT_RUBRIC, min_length=1, description="What a good answer is: the judge's instructions.")
    sample_share: float = Field(1.0, ge=0, le=1, description="Share of interactions judged, by a hash of their id.")
    max_per_hour: int = Field(600, ge=0, description="Most judge requests per hour (wall clock); the rest go unjudged.")
    max_tokens_per_hour: int | None = Field(
        None, ge=0, description="Most tokens (prompt and reply) per hour; null: only max_per_hour bounds the cost."
    )
    max_reply_tokens: int = Field(64, ge=1, description="Longest reply the judge may write (a verdict is ~20 tokens).")
    timeout_s: float = Field(30.0, gt=0, description="How long one judge request may take before it is retried.")
    retries: int = Field(5, ge=0, description="Retries of a request the judge did not answer, before a dead letter.")
    backoff_s: float = Field(1.0, gt=0, description="Wait before the first retry; doubled at each one.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between two retries.")


def sampled(app_id: str, interaction_id: str, share: float) -> bool:
    """Whether an interaction is in the judged share: a hash of its key, so every run and
    replica picks the same ones, and a share raised later keeps the ones picked before.

    >>> sampled("app", "i-1", 1.0), sampled("app", "i-1", 0.0)
    (True, False)
    """
    digest = hashlib.sha256(f"{app_id}\0{interaction_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def annotation_id(app_id: str, interaction_id: str, rubric_id: str) -> str:
    """The event id of the judge's annotation: the same for the same interaction and rubric."""
    return "judge-" + hashlib.sha256(f"{app_id}\0{interaction_id}\0{rubric_id}".encode()).hexdigest()[:40]


def retry_delays(retries: int, first_s: float, longest_s: float) -> list[float]:
    """Waits before each retry of an unanswered request: doubling, capped.

    >>> retry_delays(5, 1.0, 10.0)
    [1.0, 2.0, 4.0, 8.0, 10.0]
    """
    delays, delay = [], first_s
    for _ in range(retries):
        delays.append(min(delay, longest_s))
        delay = min(delay * 2, longest_s)  # capped as it goes: 2**retries would overflow a float
    return delays


@dataclass
class HourlyBudget:
    """Judge requests and tokens spent in the current wall-clock hour, and in all.

    The hour is the clock's (money is spent in wall time, not event time). Held in memory:
    a restart within the hour starts the hour's count afresh (docs/operations.md)."""

    max_requests: int
    max_tokens: int | None = None
    hour: datetime | None = None
    requests: int = 0  # in this hour
    tokens: int = 0  # in this hour
    total_requests: int = 0
    total_tokens: int = 0

    def _roll(self, now: datetime) -> None:
        hour = now.replace(minute=0, second=0, microsecond=0)
        if hour != self.hour:
            self.hour, self.requests, self.tokens = hour, 0, 0

    def allows(self, now: datetime) -> bool:
        self._roll(now)
        return self.requests < self.max_requests and (self.max_tokens is None or self.tokens < self.max_tokens)

    def spend(self, now: datetime, tokens: int) -> None:
        """Count one answered request (a malformed answer costs as much as a good one)."""
        self._roll(now)
        self.requests += 1
        self.tokens += tokens
        self.total_requests += 1
        self.total_tokens += tokens

    def report(self) -> dict[str, int]:
        return {"requests_this_hour": self.requests, "tokens_this_hour": self.tokens,
                "requests": self.total_requests, "tokens": self.total_tokens}  # fmt: skip


def skip_reason(interaction: Interaction, now: datetime, *, share: float, window: timedelta, erased: bool,
                budget: HourlyBudget) -> str | None:  # fmt: skip
    """Why an interaction is not judged, or None: judge it. The budget is asked last, so an
    interaction that would be skipped anyway spends none of it."""
    if not interaction.training_consent:
        return "no_consent"
    if erased:
        return "user_erased"
    if interaction.metadata.get(STREAM_INTERRUPTED):
        return "stream_interrupted"
    if not sampled(interaction.app_id, interaction.interaction_id, share):
        return "not_sampled"
    if now - interaction.occurred_at >= window:
        return "window_closed"
    if not budget.allows(now):
        return "over_budget"
    return None


def _turn(role: str, content: str, calls: list) -> str:
    called = "".join(f"\n(calls {c.function.name}({c.function.arguments}))" for c in calls or ())
    return f"[{role}] {content}{called}"


def judge_messages(rubric_id: str, rubric: str, interaction: Interaction,
                   scrub: Callable[[str], str]) -> list[dict[str, str]]:  # fmt: skip
    """The chat request to the judge: the rubric and the instruction, then the conversation and
    the answer, every text through ``scrub`` (the pipeline's PII scrubber)."""
    conversation = "\n".join(scrub(_turn(m.role, m.content, m.tool_calls)) for m in interaction.prompt)
    answer = scrub(_turn("assistant", interaction.response, interaction.tool_calls))
    return [
        {"role": "system", "content": f"You grade an assistant's answer by a rubric ({rubric_id}).\n\n"
                                      f"Rubric:\n{rubric}\n\n{INSTRUCTION}"},
        {"role": "user", "content": f"Conversation:\n{conversation}\n\nAnswer to grade:\n{answer}"},
    ]  # fmt: skip


class MalformedVerdict(ValueError):
    """The judge's reply is not a verdict; never turned into a score."""


@dataclass(frozen=True)
class Verdict:
    score: float
    confidence: float


def _refuse_constant(name: str) -> float:
    raise MalformedVerdict(f"{name} is not a number")


def parse_verdict(reply: str) -> Verdict:
    """The judge's verdict: the whole reply (surrounding whitespace aside) is one JSON object
    with exactly the numbers ``score`` and ``confidence``, both in [0, 1].

    >>> parse_verdict(' {"score": 0.8, "confidence": 0.9} ')
    Verdict(score=0.8, confidence=0.9)
    >>> parse_verdict('The score is 0.8')
    Traceback (most recent call last):
    ...
    streams.self_eval.MalformedVerdict: not a JSON object: 'The score is 0.8'
    """
    if len(reply) > MAX_REPLY_CHARS:
        raise MalformedVerdict(f"a reply of {len(reply)} characters is no verdict: {reply[:200]!r}...")
    try:
        answer = json.loads(reply, parse_constant=_refuse_constant)  # NaN and Infinity are no grades
    except (json.JSONDecodeError, RecursionError):
        raise MalformedVerdict(f"not a JSON object: {reply[:200]!r}") from None
    if not isinstance(answer, dict):
        raise MalformedVerdict(f"not a JSON object: {reply[:200]!r}")
    if set(answer) != {"score", "confidence"}:
        raise MalformedVerdict(f"keys {sorted(answer)}, not exactly score and confidence: {reply[:200]!r}")
    for name, value in answer.items():
        # bool is an int in Python, and true is no grade
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 or math.isnan(value):
            raise MalformedVerdict(f"{name} {value!r} is not a number from 0 to 1: {reply[:200]!r}")
    return Verdict(score=float(answer["score"]), confidence=float(answer["confidence"]))


def tokens_used(reported: int | None, messages: list[dict[str, str]], reply: str) -> int:
    """The request's tokens as the endpoint counted them, else about four characters a token."""
    if reported is not None:
        return reported
    return math.ceil((sum(len(m["content"]) for m in messages) + len(reply)) / CHARS_PER_TOKEN)


def annotation_for(interaction: Interaction, verdict: Verdict, *, rubric_id: str, judge: str,
                   at: datetime) -> Annotation:  # fmt: skip
    """The annotation carrying ``verdict``, in the interaction's session (its partition)."""
    return Annotation(
        event_id=annotation_id(interaction.app_id, interaction.interaction_id, rubric_id),
        occurred_at=at,
        app_id=interaction.app_id,
        session_id=interaction.session_id,
        interaction_id=interaction.interaction_id,
        annotator=judge,
        source="model",
        label=LABEL,
        score=verdict.score,
        confidence=verdict.confidence,
        rubric=rubric_id,
    )


@dataclass
class JudgeCounts:
    """What the annotator did, for its heartbeat (`feedloop status`) and its logs."""

    annotated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def dead(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1
