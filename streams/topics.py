"""Topic names, keys and partitioning: where each record goes.

User events (interaction, feedback, annotation) share ONE topic keyed by ``session_id``.
Kafka's default partitioner hashes the key, so a conversation's interactions and all their
feedback land on the same partition in arrival order, whatever client produced them; the
pipeline's joins (feedback to interaction, a regenerated response to the one it replaced) then
need only partition-local table state. Control events go to a single-partition topic so every
consumer sees adapter lifecycle changes in one global order. docs/events.md has the rationale.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.contract import Annotation, DeadLetter, Feedback, Interaction


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int | None  # None: the deployment's `topic_partitions`
    purpose: str


EVENTS = TopicSpec("feedloop.events.v1", None, "interaction, feedback, annotation; key session_id")
CONTROL = TopicSpec("feedloop.control.v1", 1, "batch, adapter and drift control events; key subject")
DEAD_LETTER = TopicSpec("feedloop.deadletter.v1", None, "rejected input with reason; key app_id")
EXAMPLES = TopicSpec("feedloop.examples.v1", None, "annotated examples for the learners; key session_id")
# A handful of picks per hour, read by reviewers in the order the learner chose them.
REVIEW = TopicSpec("feedloop.review.v1", 1, "examples picked for human review; key example_id")

# Historical imports (`feedloop import`): the raw events of each run, kept beside the live
# ones so the archive holds them; no worker reads this topic (docs/pipeline.md#historical-import).
IMPORTS = TopicSpec("feedloop.imports.v1", None, "raw events of historical imports; key session_id")

ALL_TOPICS = (EVENTS, CONTROL, DEAD_LETTER, EXAMPLES, REVIEW, IMPORTS)
# The archive keeps every topic: the log is the source of truth and the broker may forget.
ARCHIVED_TOPICS = tuple(t.name for t in ALL_TOPICS)


def event_key(event: Interaction | Feedback | Annotation) -> bytes:
    """Partition key of a user event: its session id."""
    return event.session_id.encode()


def dead_letter_key(record: DeadLetter) -> bytes:
    return (record.app_id or "unknown").encode()


def control_key(event: object) -> bytes:
    """Key of a control event: its subject, so a compacted control topic keeps each subject's
    latest word. The adapter it is about, else the batch, else the drift signal, else its id."""
    for field in ("adapter", "batch_id", "signal"):
        subject = getattr(event, field, None)
        if subject:
            return str(subject).encode()
    return str(getattr(event, "event_id")).encode()
