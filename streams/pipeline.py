"""The pipeline for one partition of the events topic, as plain deterministic Python.

For each record, in offset order: validate (size, nesting, contract, event time within the
clock-skew bound of its receive time) -> de-duplicate by event id -> drop erased users'
old events -> anonymize (scrub PII, pseudonymize the user) -> quality filters -> join
feedback to its interaction. When the partition's event time closes an interaction's window:
rewards per channel -> annotated example -> training signals -> curator -> batches. A
reviewer's correction of a closed example joins nothing: it carries its example, and its
records go to the curator at once.

The live worker, ``feedloop replay --offline`` and the tests all drive this same class, so
the same records in the same order produce the same examples and byte-identical batches.
Nothing is dropped silently: every record that does not become part of an example comes out
as a dead letter with its reason, and is counted in :class:`PipelineStats`. No record stops
it either: any bytes (oversized, binary, deeply nested, dated decades ahead) become a dead
letter that fits in one Kafka message (docs/pipeline.md, "Poison").
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from pydantic import ValidationError

from streams.config import PipelineSettings
from learners.loss_weights import LossWeights
from streams.contract import (
    EVENTS_TOPIC_ADAPTER,
    AnnotatedExample,
    Annotation,
    CurationTrigger,
    DeadLetter,
    Feedback,
    Interaction,
    Message,
    ReviewCorrection,
    ToolCall,
    WatermarkTick,
)
from streams.curator import Buffered, Curator, CutBatch
from streams.intake import (
    DEFAULT_DEAD_LETTER_MAX_RAW_BYTES,
    DEFAULT_MAX_EVENT_BYTES,
    EPOCH,
    dead_letter,
    event_time_problem,
    why_invalid,
)
from streams.join import Key, OpenInteraction, SessionJoin, Unjoined
from streams.pii import Scrubber
from streams.pseudonyms import Pseudonymizer, erased_by, user_identity
from streams.quality import QualityFilter
from streams.rewards import ScoreRule, channel_rewards, kind_of, signal_reward
from streams.signals import Rival, review_records, training_records

STAGE = "pipeline"
RECEIVED_AT_HEADER = "received_at"  # written by the gateway (app/publisher.py)


class Received(NamedTuple):  # a tuple: one is made per record
    """When a record was received (by the gateway, else by the broker), and what says so."""

    at: datetime
    source: str


def receive_time(headers: Mapping | Iterable | None, timestamp_s: float | None) -> Received | None:
    """A record's receive time: the gateway's ``received_at`` header, or the Kafka record
    timestamp for records produced straight to the topic; the earlier of the two when both
    are there (a producer that writes a header of its own cannot move it later). None when
    neither is readable. Both are in the log, so replay finds the same time."""
    header = None
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, value in pairs:
        if name in (RECEIVED_AT_HEADER, RECEIVED_AT_HEADER.encode()):
            try:
                parsed = datetime.fromisoformat(value.decode() if isinstance(value, bytes) else value)
            except (ValueError, TypeError, UnicodeDecodeError):
                break
            header = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)
            break
    stamp = None
    if timestamp_s is not None and timestamp_s > 0:
        try:
            stamp = datetime.fromtimestamp(timestamp_s, timezone.utc)
        except (OverflowError, OSError, ValueError):
            stamp = None
    if header is not None and (stamp is None or header <= stamp):
        return Received(header, "its received_at header")
    if stamp is not None:
        return Received(stamp, "its Kafka record timestamp")
    return None


@dataclass(frozen=True)
class RecordChecks:
    """The bounds every record is held to before it is an event. Settings, not state: the
    :class:`PipelineSet` hands its own to each partition on every record, so a restored
    checkpoint runs with the settings of the worker that restored it."""

    max_clock_skew: timedelta
    event_time_span: timedelta  # PipelineSettings.event_time_span_s
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    dead_letter_max_raw_bytes: int = DEFAULT_DEAD_LETTER_MAX_RAW_BYTES

    @classmethod
    def of(cls, config: PipelineSettings, **limits: int) -> RecordChecks:
        return cls(timedelta(seconds=config.max_clock_skew_s), timedelta(seconds=config.event_time_span_s), **limits)


@dataclass
class PipelineStats:
    counts: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)


@dataclass
class Outputs:
    dead_letters: list[DeadLetter] = field(default_factory=list)
    examples: list[AnnotatedExample] = field(default_factory=list)
    batches: list[CutBatch] = field(default_factory=list)


class PartitionPipeline:
    """All pipeline state of one partition; pickles whole (the worker checkpoints it)."""

    checks = RecordChecks.of(PipelineSettings())  # for states pickled before checks existed; set per record

    def __init__(self, partition: int, config: PipelineSettings, checks: RecordChecks | None = None) -> None:
        self.partition = partition
        self.config = config
        self.checks = checks or RecordChecks.of(config)
        # The score rules, like the checks, are the running worker's: set per record, so rules
        # changed at a restart apply to every window that closes after it, restored ones too.
        self.scores: Mapping[str, ScoreRule] = config.scores
        self.join = SessionJoin(
            explicit_window=timedelta(seconds=config.explicit_window_s),
            implicit_window=timedelta(seconds=config.implicit_window_s),
            allowed_lateness=timedelta(seconds=config.allowed_lateness_s),
        )
        self.quality = QualityFilter(config.max_prompt_chars, tuple(config.blocked_terms),
                                     config.near_duplicate_threshold, memory=config.repeat_memory)  # fmt: skip
        self.curator = Curator(
            partition=partition,
            batch_size=config.batch_size,
            max_wait=timedelta(seconds=config.batch_max_wait_s),
            max_group_share=config.max_group_share,
            replay_fraction=config.replay_fraction,
            reservoir_per_stratum=config.reservoir_per_stratum,
            seed=config.seed,
            heldout_share=config.heldout_share,
        )
        self.loss_weights = LossWeights()
        # Ids are an app's own: every key below is (app id, the app's id), so one app's ids
        # never collide with, join or de-duplicate another's.
        self.seen: set[tuple[str, str]] = set()  # event ids, for de-duplication
        self._seen_expiry: list[tuple[datetime, tuple[str, str]]] = []  # heap of (utc(occurred_at), event key)
        # Closed examples, to pair regenerations and pairwise choices, with the utc time their
        # window closed: the sweep keeps each one more window, as long as the interaction that
        # regenerates it (or was chosen over it) can still be open.
        self.recent: dict[tuple[str, str], tuple[datetime, AnnotatedExample]] = {}
        self.user_of: dict[tuple[str, str], str] = {}  # interaction -> user_identity (state only)
        self.stats = PipelineStats()
        self.offset = -1  # last offset processed, for checkpoints
        self._next_sweep: datetime | None = None

    # --- one record ----------------------------------------------------------------------

    def process(self, offset: int, value: bytes | None, *, scrubber: Scrubber, pseudonyms: Pseudonymizer,
                received: Received | None = None) -> Outputs:
        """One record. ``received``: its receive time (:func:`receive_time`); without one,
        event time is not checked against the clock-skew bound."""
        self.offset = offset
        out = Outputs()
        self.stats.counts["records"] += 1
        value = value or b""  # a tombstone (null value) is an empty record
        received_at = received.at if received else None
        if len(value) > self.checks.max_event_bytes:
            limit = self.checks.max_event_bytes
            detail = f"record is {len(value)} bytes; the limit is {limit} (FEEDLOOP_MAX_EVENT_BYTES): split it"
            out.dead_letters.append(self._dead("event_too_large", detail, value, None, received_at))
            return out
        try:
            event = EVENTS_TOPIC_ADAPTER.validate_json(value)
        except ValidationError as error:
            reason, detail, issues = why_invalid(error, value)
            out.dead_letters.append(self._dead(reason, detail, value, None, received_at, issues))
            return out
        if problem := self._time_problem(event, received):
            out.dead_letters.append(self._dead(*problem, value, event, received_at))
            return out
        since = self.join.watermark_key
        occurred_at = self.join.observe(event.occurred_at)
        if isinstance(event, WatermarkTick):
            self.stats.counts["ticks"] += 1
            self.advance(out, pseudonyms, since)
            return out
        seen_key = (getattr(event, "app_id", ""), event.event_id)  # a curation trigger has no app
        if seen_key in self.seen:
            out.dead_letters.append(self._dead("duplicate_event", f"event {event.event_id} was already processed",
                                               value, event))
            return out
        self.seen.add(seen_key)
        heapq.heappush(self._seen_expiry, (occurred_at, seen_key))
        if isinstance(event, CurationTrigger):
            self.stats.counts[f"trigger_{event.trigger}"] += 1
            if event.preferences_moved:
                self.stats.counts["forgotten_on_shift"] += self.curator.forget_held()
            else:
                self.curator.request_early(event.trigger)
            self.advance(out, pseudonyms, since)
            return out
        if isinstance(event, ReviewCorrection):
            self._review(event, occurred_at, scrubber)
            self.advance(out, pseudonyms, since)
            return out
        user = (user_identity(event.app_id, event.user_id) if isinstance(event, Interaction)
                else self.user_of.get((event.app_id, event.interaction_id)))  # fmt: skip
        if user and erased_by(pseudonyms.erased_at(user), event.occurred_at):
            out.dead_letters.append(self._dead("user_erased", "the user asked to be erased after this event",
                                               b"", event))  # the raw text is not kept for erased users
            return out
        if isinstance(event, Interaction):
            out.dead_letters += self._interaction(event, occurred_at, value, scrubber, pseudonyms)
        else:
            out.dead_letters += [self._unjoined(u) for u in self.join.add_signal(self._scrub_signal(event, scrubber))]
        self.advance(out, pseudonyms, since)
        return out

    def _time_problem(self, event: object, received: Received | None) -> tuple[str, str] | None:
        """``clock_skew`` or ``occurred_at_out_of_range`` (intake.event_time_problem), checked
        before the record's time can move the watermark."""
        return event_time_problem(event.occurred_at, received and received.at, received and received.source,
                                  max_skew=self.checks.max_clock_skew, span=self.checks.event_time_span)

    def _interaction(self, event: Interaction, occurred_at: datetime, value: bytes, scrubber: Scrubber,
                     pseudonyms: Pseudonymizer) -> list[DeadLetter]:
        if self.join.knows(event.app_id, event.interaction_id):
            return [self._dead("duplicate_interaction", f"interaction {event.interaction_id} was already received "
                               "under another event id", value, event)]
        prompt = [self._scrub_message(m, scrubber) for m in event.prompt]
        response = self._scrub(event.response, scrubber)
        tool_calls = self._scrub_calls(event.tool_calls, scrubber)
        # Models are copied only when the scrubber replaced something: most text has no PII.
        if (response != event.response or tool_calls is not event.tool_calls
                or any(new is not old for new, old in zip(prompt, event.prompt))):  # fmt: skip
            scrubbed = event.model_copy(update={"prompt": prompt, "response": response, "tool_calls": tool_calls})
        else:
            scrubbed = event
        user = self.user_of[(event.app_id, event.interaction_id)] = user_identity(event.app_id, event.user_id)
        pseudonym = pseudonyms.pseudonym(user)
        return [self._unjoined(u) for u in self.join.add_interaction(scrubbed, pseudonym, occurred_at)]

    def _review(self, event: ReviewCorrection, occurred_at: datetime, scrubber: Scrubber) -> None:
        """A reviewer's correction of a closed example: its records join the curator now, in the
        review's event time. They are the example's user's (the user's prompt is in them): the
        manifest lists the example's pseudonym, by which the trainer cuts an erased user out of
        every batch not yet trained. The pipeline has no user identity for it (a closed example
        keeps none), so its own cut-time check passes them (``user`` "")."""
        records = review_records(event.example, self._scrub(event.correction, scrubber), self.loss_weights.weights())
        self.stats.counts["review_corrections"] += 1
        self.stats.counts["review_not_trained"] += not records  # no consent, or a quality filter stopped it
        for record in records:
            self.stats.counts[f"records_{record.source}"] += 1
        self.curator.add([Buffered(r, "", occurred_at, event.example.user) for r in records])

    def _scrub(self, text: str, scrubber: Scrubber) -> str:
        result = scrubber.scrub(text)
        if result.counts:
            self.stats.pii.update({str(k): v for k, v in result.counts.items()})
        return result.text

    def _scrub_message(self, message: Message, scrubber: Scrubber) -> Message:
        content = self._scrub(message.content, scrubber)
        calls = self._scrub_calls(message.tool_calls, scrubber) if message.tool_calls else message.tool_calls
        if content == message.content and calls is message.tool_calls:
            return message
        return message.model_copy(update={"content": content, "tool_calls": calls})

    def _scrub_calls(self, calls: list[ToolCall], scrubber: Scrubber) -> list[ToolCall]:
        """Tool calls with their arguments scrubbed (a model passes on what the user told it);
        the same list when nothing changed."""
        scrubbed = []
        for call in calls:
            arguments = self._scrub(call.function.arguments, scrubber)
            if arguments != call.function.arguments:
                call = call.model_copy(update={"function": call.function.model_copy(update={"arguments": arguments})})
            scrubbed.append(call)
        return calls if all(new is old for new, old in zip(scrubbed, calls)) else scrubbed

    def _scrub_signal(self, event: Feedback | Annotation, scrubber: Scrubber) -> Feedback | Annotation:
        names = ("text", "comment") if isinstance(event, Feedback) else ("notes",)
        update = {name: self._scrub(text, scrubber) for name in names if (text := getattr(event, name))}
        update = {name: text for name, text in update.items() if text != getattr(event, name)}
        return event.model_copy(update=update) if update else event

    # --- event time moves -------------------------------------------------------------------

    def advance(self, out: Outputs, pseudonyms: Pseudonymizer, since: datetime | None = None) -> None:
        """Close the windows the watermark passed and cut the batches that came due.

        With ``since``, the watermark before this record, each window closes and each batch is
        cut at its own event time, in that order, as if the watermark had stopped at every
        deadline on its way from ``since``: how far one record moves it (the next event, or a
        tick after a quiet spell, whose time is the wall clock's) changes nothing in what comes
        out. So two workers, or a worker whose ticks came at other moments, cut the same
        batches from the same events, and a window's ``closed_at`` is its deadline."""
        mark, watermark = self.join.watermark_key, self.join.watermark
        if since is not None and mark is not None:
            while (due := self._next_due()) is not None and due < mark:
                since = max(due, since)  # an interaction that came after its window's end closes now
                self.join.watermark_key = self.join.watermark = since
                self._settle(out, pseudonyms)
            self.join.watermark_key, self.join.watermark = mark, watermark
        self._settle(out, pseudonyms)

    def _next_due(self) -> datetime | None:
        """The earliest event time (a utc key) at which a window closes, an orphan expires or a
        batch's wait ends; None when nothing waits."""
        times = [t for t in (self.join.next_deadline(), self.curator.due_at()) if t is not None]
        return min(times, default=None)

    def _settle(self, out: Outputs, pseudonyms: Pseudonymizer) -> None:
        """Close the windows the watermark passed; cut the batches that are due."""
        closed, expired = self.join.close_due()
        out.dead_letters += [self._unjoined(u) for u in expired]
        closing = {entry.key: entry for entry in closed}  # out of the join now, still a pairwise rival
        for entry in closed:
            if self._erased_while_open(entry, pseudonyms):
                continue  # no example: its text would reach the examples topic, the learner and the archive
            out.examples.append(self._close(entry, closing))
        self._forget_old()
        while trigger := self.curator.due(self.join.watermark_key):
            batch = self.curator.cut(
                trigger, self.join.watermark, pseudonyms_erased(pseudonyms), self.loss_weights.weights()
            )
            self.stats.counts[f"batch_{trigger}"] += 1
            self.stats.counts["capped"] += batch.capped
            self.stats.counts["erased_from_batches"] += batch.erased
            out.batches.append(batch)

    def finish(self, pseudonyms: Pseudonymizer) -> Outputs:
        """The end of a finished log: let event time run on until every window has closed,
        every orphan has expired and every buffered record is in a batch, as the worker's
        ticks do once traffic stops, but in event time. Each window closes at its own closing
        time (so ``closed_at`` is what a tick at that instant would give) and batches are cut
        as their time comes (``time``; ``size`` while enough wait)."""
        out = Outputs()
        lateness = self.join.allowed_lateness
        while (deadline := self.join.next_deadline()) is not None:
            self.join.observe(deadline + lateness)
            self.advance(out, pseudonyms)
        self.stats.counts["closed_at_end"] += len(out.examples)
        while self.curator.buffer:
            self.join.observe(self.curator.buffer[0].occurred_at + self.curator.max_wait + lateness)
            self.advance(out, pseudonyms)
        return out

    def _erased_while_open(self, entry: OpenInteraction, pseudonyms: Pseudonymizer) -> bool:
        """The user asked to be erased after this interaction opened: forget it."""
        event = entry.interaction
        key = (event.app_id, event.interaction_id)
        if not erased_by(pseudonyms.erased_at(self.user_of[key]), event.occurred_at):
            return False
        del self.user_of[key]
        self.stats.counts["erased_while_open"] += 1
        return True

    def _close(self, entry: OpenInteraction, closing: Mapping[Key, OpenInteraction]) -> AnnotatedExample:
        """The annotated example of a closed interaction; its training records go to the curator.
        ``closing``: the interactions whose windows close with it, in whatever order."""
        event = entry.interaction
        edits = [f.text for f in entry.feedback if f.kind == "edit"]
        scores = self.scores
        example = AnnotatedExample(
            example_id=event.interaction_id,
            app_id=event.app_id,
            session_id=event.session_id,
            user=entry.pseudonym,
            adapter=event.adapter,
            propensity=event.propensity,
            probabilities=event.probabilities,
            cohort=event.context.cohort or "default",
            domain=event.context.domain or "general",
            context=event.context,
            prompt=event.prompt,
            response=event.response,
            tool_calls=event.tool_calls,
            edit=edits[-1] if edits else None,
            comments=[f.comment for f in entry.feedback if f.comment],
            regenerates=event.regenerates,
            rewards=channel_rewards(entry.feedback, entry.annotations, scores),
            feedback_kinds=sorted({kind_of(f) for f in entry.feedback}),
            training_consent=event.training_consent,
            filtered=self.quality.check(event),
            occurred_at=event.occurred_at,
            closed_at=self.join.watermark,
            event_ids=entry.event_ids,
        )
        self.loss_weights.learn_one(example.rewards)
        occurred_at = entry.occurred_at
        replaced = self.recent.get((example.app_id, example.regenerates)) if example.regenerates else None
        rivals = [self._rival(entry, f, closing) for f in entry.feedback if f.kind == "pairwise"]
        records = training_records(example, replaced[1] if replaced else None, self.loss_weights.weights(),
                                   [r for r in rivals if isinstance(r, Rival)])
        if records and self.quality.near_duplicate(event):
            example = example.model_copy(update={"filtered": "near_duplicate"})
            records = []
        self.recent[example.key] = (occurred_at + self.join.explicit_window, example)
        counts = self.stats.counts
        counts["examples"] += 1
        counts["no_consent"] += not example.training_consent
        if example.filtered:
            counts[f"filtered_{example.filtered}"] += 1
        counts["score_unrewarded"] += sum(f.kind == "score" and signal_reward(f, scores) is None
                                          for f in entry.feedback)
        counts.update(f"pairwise_{r}" for r in rivals if isinstance(r, str))
        for record in records:
            counts[f"records_{record.source}"] += 1
        user = self.user_of.pop(example.key)
        self.curator.add([Buffered(r, user, occurred_at, example.user) for r in records])
        return example

    def _rival(self, entry: OpenInteraction, choice: Feedback, closing: Mapping[Key, OpenInteraction]) -> Rival | str:
        """The response a pairwise ``choice`` rejected, or why it makes no pair: ``unpaired``
        (the rival never came before the chosen one's window closed, or was forgotten),
        ``mismatched`` (another session, user or prompt: no preference between answers to the
        same question), ``rival_opted_out`` (its user withheld consent for training)."""
        key = (choice.app_id, choice.rejected_interaction_id)
        if (held := self.join.open.get(key) or closing.get(key)) is not None:
            other = held.interaction
            facts = (other.session_id, held.pseudonym, other.prompt)
            rival = Rival(other.interaction_id, other.event_id, other.response)
        elif (closed := self.recent.get(key)) is not None:
            other = closed[1]
            facts = (other.session_id, other.user, other.prompt)
            rival = Rival(other.example_id, other.event_ids[0], other.response)  # its interaction's id first
        else:
            return "unpaired"
        chosen = entry.interaction
        if facts != (chosen.session_id, entry.pseudonym, chosen.prompt):
            return "mismatched"
        return rival if other.training_consent else "rival_opted_out"

    def _forget_old(self) -> None:
        """Bound the state: ids and examples older than any window that could still use them.

        Sweeps run once per tenth of a window of event time. Seen ids leave through a heap in
        event-time order: walking all of them each sweep cost more than the rest of the
        pipeline's bookkeeping (a cache miss per id)."""
        watermark = self.join.watermark_key
        if watermark is None or (self._next_sweep is not None and watermark < self._next_sweep):
            return
        self._next_sweep = watermark + self.join.explicit_window / 10
        horizon = watermark - self.join.explicit_window - self.join.allowed_lateness
        while self._seen_expiry and self._seen_expiry[0][0] <= horizon:
            self.seen.discard(heapq.heappop(self._seen_expiry)[1])
        self.recent = {i: closed for i, closed in self.recent.items() if closed[0] > horizon}

    # --- dead letters ---------------------------------------------------------------------------

    def _dead(self, reason: str, detail: str, raw: bytes, event: object | None,
              received_at: datetime | None = None, issues=()) -> DeadLetter:
        """A dead letter of at most ``dead_letter_max_raw_bytes`` of raw input (it always fits
        in one message). ``received_at``: the record's receive time, for records whose own
        event time is missing or not to be trusted."""
        self.stats.counts[reason] += 1
        return dead_letter(
            dead_letter_id=f"p{self.partition}-{self.offset}-{reason}",
            # Times from the log, not the wall clock: a replay must produce the same record.
            received_at=received_at or getattr(event, "occurred_at", None) or self.join.watermark or EPOCH,
            stage=STAGE,
            app_id=getattr(event, "app_id", None),
            event_id=getattr(event, "event_id", None),
            reason=reason,
            detail=detail,
            issues=issues,
            raw=raw,
            max_raw_bytes=self.checks.dead_letter_max_raw_bytes,
        )

    def _unjoined(self, unjoined: Unjoined) -> DeadLetter:
        raw = unjoined.event.model_dump_json().encode()
        return self._dead(unjoined.reason, unjoined.detail, raw, unjoined.event)


def pseudonyms_erased(pseudonyms: Pseudonymizer):
    """``is_erased(user, occurred_at)`` for one cut: erased after the record's event.

    Each user's erasure time is looked up once per cut (a cut checks every buffered and
    reservoir record, and users have many)."""
    erasures: dict[str, datetime | None] = {}

    def is_erased(user: str, occurred_at: datetime) -> bool:
        if not user:
            return False  # a reviewed correction's: the trainer erases it by its pseudonym
        if user not in erasures:
            erasures[user] = pseudonyms.erased_at(user)
        return erased_by(erasures[user], occurred_at)

    return is_erased


class PipelineSet:
    """One :class:`PartitionPipeline` per partition, created on first sight.

    ``max_event_bytes`` and ``dead_letter_max_raw_bytes`` are the deployment's
    (``FEEDLOOP_MAX_EVENT_BYTES``, ``FEEDLOOP_DEAD_LETTER_MAX_RAW_BYTES``), shared with the gateway."""

    def __init__(self, config: PipelineSettings, scrubber: Scrubber, pseudonyms: Pseudonymizer, *,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 dead_letter_max_raw_bytes: int = DEFAULT_DEAD_LETTER_MAX_RAW_BYTES) -> None:
        self.config = config
        self.scrubber = scrubber
        self.pseudonyms = pseudonyms
        self.checks = RecordChecks.of(config, max_event_bytes=max_event_bytes,
                                      dead_letter_max_raw_bytes=dead_letter_max_raw_bytes)
        self.partitions: dict[int, PartitionPipeline] = {}

    def process(self, partition: int, offset: int, value: bytes | None, received: Received | None = None) -> Outputs:
        pipeline = self.partitions.get(partition)
        if pipeline is None:
            pipeline = self.partitions[partition] = PartitionPipeline(partition, self.config, self.checks)
        # A restored state runs with this worker's settings.
        pipeline.checks, pipeline.scores = self.checks, self.config.scores
        return pipeline.process(offset, value, scrubber=self.scrubber, pseudonyms=self.pseudonyms, received=received)

    def finish(self) -> Outputs:
        """:meth:`PartitionPipeline.finish` of every partition, in partition order."""
        out = Outputs()
        for partition in sorted(self.partitions):
            done = self.partitions[partition].finish(self.pseudonyms)
            out.dead_letters += done.dead_letters
            out.examples += done.examples
            out.batches += done.batches
        return out

    def counts(self) -> Counter:
        total: Counter = Counter()
        for pipeline in self.partitions.values():
            total.update(pipeline.stats.counts)
        return total
