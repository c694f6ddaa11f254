"""`feedloop judge`: interactions in, a model judge asked, annotations out. No logic lives here.

Every decision (which interaction, what to ask, what the reply means, which annotation) is
``streams.self_eval``'s; this module reads the events topic, waits on the judge and writes.
For each record, in its consumer group ``feedloop-judge``: decode it (anything but an
interaction is passed over: the pipeline dead-letters what is invalid), ask the core whether
to judge it, ask the judge, and publish the annotation to the events topic (keyed by its
session, so it lands on its interaction's partition) or a dead letter with the reason
(acks=all); only then commit the offset.

What survives a restart: the committed offset, so a restarted judge goes on after the last
record it finished; and the annotation's event id, derived from (app, interaction, rubric),
so the record it was working on when it died, judged again, gives the same event id, and the
pipeline keeps the first annotation it joined. A stop during a retry's wait commits nothing:
that record is judged on the next start.

When the judge does not answer (unreachable, too slow, 429 or 5xx) the request is retried
after ``backoff_s``, doubling up to ``backoff_max_s``, ``retries`` times; then the
interaction gets a ``judge_unavailable`` dead letter and the judge goes on with the next
(an annotation after the window closes would be refused anyway). A judge that refuses the
request (another 4xx: a wrong model name, a bad key) gets ``judge_refused`` at once, and a
reply that is not a verdict ``judge_malformed``, with the reply kept: never a score.

Why a plain consumer and not a Faust agent (as the pipeline and the learner are): the work of
a record is one HTTP request of up to seconds, there is no state to checkpoint beside the
offset, and records need no order; Faust's buffering and acknowledgement would add a second
place where a record can be half done. Requests go one at a time, so throughput is one
judge's latency: at 1 s a request, 3,600 an hour, above the default budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import openai
import structlog
from pydantic import ValidationError

from streams import kafka
from streams.contract import EVENTS_TOPIC_ADAPTER, Annotation, DeadLetter, Interaction, utcnow
from streams.intake import DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, dead_letter
from streams.kafka import KafkaSettings
from streams.self_eval import (
    HourlyBudget,
    JudgeCounts,
    JudgeSettings,
    MalformedVerdict,
    annotation_for,
    annotation_id,
    judge_messages,
    parse_verdict,
    retry_delays,
    skip_reason,
    tokens_used,
)
from streams.topics import DEAD_LETTER, EVENTS, dead_letter_key, event_key

log = structlog.get_logger(__name__)

JUDGE_CONSUMER = "feedloop-judge"
STAGE = "judge"
# Not answered, worth asking again; any other error of the endpoint is a refusal.
UNANSWERED = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int | None  # as the endpoint counted them (prompt and reply); None: not reported


class Judge(Protocol):
    async def ask(self, messages: list[dict[str, str]]) -> Reply: ...


class OpenAIJudge:
    """A judge model behind an OpenAI-compatible endpoint, asked greedily."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, max_reply_tokens: int) -> None:
        self.client, self.model, self.max_reply_tokens = client, model, max_reply_tokens

    async def ask(self, messages: list[dict[str, str]]) -> Reply:
        completion = await self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=0, max_tokens=self.max_reply_tokens)
        usage = completion.usage
        return Reply(completion.choices[0].message.content or "", usage.total_tokens if usage else None)


class _Stopped(Exception):
    """Stopped while waiting to retry: the record stays uncommitted."""


class _NoAnswer(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Annotator:
    def __init__(
        self,
        config: JudgeSettings,
        kafka_settings: KafkaSettings,
        judge: Judge,
        *,
        judge_name: str,
        window: timedelta,
        scrub: Callable[[str], str],
        is_erased: Callable[[Interaction], bool],
        group: str = JUDGE_CONSUMER,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config, self.judge, self.judge_name = config, judge, judge_name
        self.window, self.scrub, self.is_erased, self.clock = window, scrub, is_erased, clock
        self.budget = HourlyBudget(config.max_per_hour, config.max_tokens_per_hour)
        self.counts = JudgeCounts()
        self.kafka_settings, self.group = kafka_settings, group
        self._stopping = asyncio.Event()

    def liveness_detail(self) -> dict:
        return {"annotated": self.counts.annotated, "skipped": dict(self.counts.skipped),
                "dead_letters": dict(self.counts.dead_letters), **self.budget.report()}  # fmt: skip

    async def run(self) -> None:
        config = self.config
        # A record may wait through every retry: the group must not take the judge for dead.
        longest_s = sum(retry_delays(config.retries, config.backoff_s, config.backoff_max_s))
        longest_s += (config.retries + 1) * config.timeout_s
        self.consumer = kafka.consumer(self.kafka_settings, EVENTS.name, group_id=self.group,
                                       max_poll_interval_ms=int(max(300.0, 2 * longest_s) * 1000))  # fmt: skip
        self.producer = kafka.producer(self.kafka_settings)
        await self.consumer.start()
        await self.producer.start()
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=500, max_records=100)
                for tp, records in batches.items():
                    for record in records:
                        if self._stopping.is_set():
                            return  # the rest is redelivered to the next start
                        try:
                            out = await self.annotate(record.value or b"")
                        except _Stopped:
                            return
                        if isinstance(out, Annotation):
                            await self.producer.send_and_wait(EVENTS.name, out.model_dump_json().encode(),
                                                              key=event_key(out))  # fmt: skip
                        elif isinstance(out, DeadLetter):
                            await self.producer.send_and_wait(DEAD_LETTER.name, out.model_dump_json().encode(),
                                                              key=dead_letter_key(out))  # fmt: skip
                        await self.consumer.commit({tp: record.offset + 1})
        finally:
            await self.producer.stop()
            await self.consumer.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def annotate(self, value: bytes) -> Annotation | DeadLetter | None:
        """The annotation of one events-topic record, its dead letter, or None (not judged)."""
        try:
            event = EVENTS_TOPIC_ADAPTER.validate_json(value)
        except ValidationError:
            return None  # the pipeline dead-letters it, with the reason
        if not isinstance(event, Interaction):
            return None
        config = self.config
        reason = skip_reason(event, self.clock(), share=config.sample_share, window=self.window,
                             erased=self.is_erased(event), budget=self.budget)  # fmt: skip
        if reason is not None:
            self.counts.skip(reason)
            return None
        messages = judge_messages(config.rubric_id, config.rubric, event, self.scrub)
        try:
            reply = await self._ask(messages)
        except _NoAnswer as error:
            return self._dead(event, error.reason, str(error), b"")
        self.budget.spend(self.clock(), tokens_used(reply.tokens, messages, reply.text))
        try:
            verdict = parse_verdict(reply.text)
        except MalformedVerdict as error:
            log.warning("judge.malformed", interaction=event.interaction_id, problem=str(error)[:300],
                        hint="dead-lettered, no score; if most replies are, the judge needs a clearer instruction "
                             "or another model (FEEDLOOP_JUDGE__MODEL)")  # fmt: skip
            return self._dead(event, "judge_malformed", f"the judge's reply is no verdict: {error}",
                              reply.text.encode())
        self.counts.annotated += 1
        return annotation_for(event, verdict, rubric_id=config.rubric_id, judge=self.judge_name, at=self.clock())

    async def _ask(self, messages: list[dict[str, str]]) -> Reply:
        config = self.config
        delays = iter(retry_delays(config.retries, config.backoff_s, config.backoff_max_s))
        requests = 0
        while True:
            requests += 1
            try:
                return await asyncio.wait_for(self.judge.ask(messages), config.timeout_s)
            except (*UNANSWERED, asyncio.TimeoutError) as error:
                problem = f"{type(error).__name__}: {error}"[:300]
                if (delay := next(delays, None)) is None:
                    raise _NoAnswer("judge_unavailable", f"no answer after {requests} requests ({problem}); check "
                                    "the judge's endpoint (FEEDLOOP_JUDGE__BASE_URL)") from error  # fmt: skip
                log.warning("judge.retrying", request=requests, wait_s=delay, problem=problem)
            except openai.APIStatusError as error:  # after UNANSWERED: 429 and 5xx are its subclasses
                raise _NoAnswer("judge_refused", f"the judge refused the request: {error.status_code} {error.message}"
                                "; check FEEDLOOP_JUDGE__MODEL and its key") from error  # fmt: skip
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                continue
            raise _Stopped()

    def _dead(self, interaction: Interaction, reason: str, detail: str, raw: bytes) -> DeadLetter:
        self.counts.dead(reason)
        annotation = annotation_id(interaction.app_id, interaction.interaction_id, self.config.rubric_id)
        return dead_letter(reason=reason, detail=detail, raw=raw, received_at=self.clock(), stage=STAGE,
                           max_raw_bytes=DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, app_id=interaction.app_id,
                           event_id=interaction.event_id, dead_letter_id=f"{STAGE}-{reason}-{annotation}")  # fmt: skip
