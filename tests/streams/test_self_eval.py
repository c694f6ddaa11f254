"""The self-evaluation core (streams/self_eval.py) and the annotator's handling of one record.

The annotator's judge here is an object that answers from a script: what is under test is
the decision of each record (judge it or not, retry, dead-letter, annotate), which does not
depend on how the reply travelled. tests/integration/test_judge_live.py runs the same code
on the broker against an HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone

import httpx
import openai
import pytest

from streams.annotator import Annotator, Reply
from streams.contract import Annotation, DeadLetter, Interaction
from streams.kafka import KafkaSettings
from streams.pii import Scrubber
from streams.self_eval import (
    HourlyBudget,
    JudgeSettings,
    MalformedVerdict,
    annotation_id,
    judge_messages,
    parse_verdict,
    sampled,
    skip_reason,
    tokens_used,
)
from tests.factories import interaction

NOW = datetime(2026, 12, 3, 12, 30, tzinfo=timezone.utc)
WINDOW = timedelta(seconds=1800)


def turn(**overrides) -> Interaction:
    return Interaction.model_validate(interaction(**{"occurred_at": NOW.isoformat(), **overrides}))


# --- the verdict --------------------------------------------------------------------------------


@pytest.mark.parametrize("reply", ['{"score": 0.8, "confidence": 0.9}', '\n {"confidence": 1, "score": 0}\n'])
def test_a_verdict_is_one_json_object_of_two_numbers(reply):
    verdict = parse_verdict(reply)
    assert (verdict.score, verdict.confidence) == tuple(float(v) for v in (json.loads(reply)["score"],
                                                                          json.loads(reply)["confidence"]))


@pytest.mark.parametrize("reply", [
    "0.8",  # a grade, but not the object asked for
    "The answer is good. Score: 0.8",
    '```json\n{"score": 0.8, "confidence": 0.9}\n```',  # fenced: more than the object
    '{"score": 0.8, "confidence": 0.9} I am confident.',
    '{"score": 0.8}',
    '{"score": 0.8, "confidence": 0.9, "reason": "clear"}',
    '{"score": 1.2, "confidence": 0.9}',
    '{"score": -0.1, "confidence": 0.9}',
    '{"score": "0.8", "confidence": 0.9}',
    '{"score": true, "confidence": 0.9}',
    '{"score": NaN, "confidence": 0.9}',
    '{"score": Infinity, "confidence": 0.9}',
    '[0.8, 0.9]',
    "",
    "[" * 5_000 + "]" * 5_000,  # json raises RecursionError on this, not a decode error
    '{"score": 0.8, "confidence": 0.9}' + " " * 3_000,
])  # fmt: skip
def test_anything_else_is_malformed_never_a_score(reply):
    with pytest.raises(MalformedVerdict):
        parse_verdict(reply)


# --- which interactions, at what cost --------------------------------------------------------------


def test_sampling_is_a_stable_share_of_interaction_ids():
    ids = [f"i-{n}" for n in range(4_000)]
    picked = {i for i in ids if sampled("app-a", i, 0.25)}
    assert 0.22 < len(picked) / len(ids) < 0.28
    assert picked == {i for i in ids if sampled("app-a", i, 0.25)}  # the same on every run and replica
    assert picked < {i for i in ids if sampled("app-a", i, 0.5)}  # a larger share keeps the earlier picks
    assert picked != {i for i in ids if sampled("app-b", i, 0.25)}  # ids are per app


def test_the_annotation_id_is_one_per_interaction_and_rubric():
    first = annotation_id("app-a", "i-1", "helpful-v1")
    assert first == annotation_id("app-a", "i-1", "helpful-v1")
    assert len({first, annotation_id("app-a", "i-2", "helpful-v1"), annotation_id("app-b", "i-1", "helpful-v1"),
                annotation_id("app-a", "i-1", "helpful-v2")}) == 4  # fmt: skip
    Annotation.model_validate({"event_id": first, "occurred_at": NOW, "app_id": "a", "interaction_id": "i",
                               "annotator": "j", "source": "model", "label": "x"})  # a valid event id


def test_the_budget_counts_requests_and_tokens_per_clock_hour():
    budget = HourlyBudget(max_requests=2, max_tokens=1_000)
    assert budget.allows(NOW)
    budget.spend(NOW, 400)
    budget.spend(NOW + timedelta(minutes=5), 400)
    assert not budget.allows(NOW + timedelta(minutes=10))  # two requests this hour
    assert budget.allows(NOW + timedelta(minutes=31))  # the next hour (13:01)
    budget.spend(NOW + timedelta(minutes=31), 1_000)
    assert not budget.allows(NOW + timedelta(minutes=32))  # its tokens are spent
    assert budget.report() == {"requests_this_hour": 1, "tokens_this_hour": 1_000, "requests": 3, "tokens": 1_800}


def test_tokens_are_the_endpoints_count_else_an_estimate():
    messages = [{"role": "user", "content": "x" * 400}]
    assert tokens_used(123, messages, "{}") == 123
    assert tokens_used(None, messages, "y" * 100) == 125


@pytest.mark.parametrize("event, reason", [
    (dict(training_consent=False), "no_consent"),
    (dict(metadata={"stream_interrupted": True}), "stream_interrupted"),
    (dict(occurred_at=(NOW - WINDOW).isoformat()), "window_closed"),
    (dict(), None),
])  # fmt: skip
def test_what_is_not_judged(event, reason):
    budget = HourlyBudget(max_requests=10)
    assert skip_reason(turn(**event), NOW, share=1.0, window=WINDOW, erased=False, budget=budget) == reason
    assert skip_reason(turn(**event), NOW, share=1.0, window=WINDOW, erased=True, budget=budget) == (
        reason if reason == "no_consent" else "user_erased")
    assert budget.requests == 0  # asking spends nothing


def test_the_judge_sees_the_conversation_scrubbed():
    event = turn(prompt=[{"role": "user", "content": "mail me at jo@example.com"}], response="Sure, jo@example.com.")
    scrubber = Scrubber()
    messages = judge_messages("helpful-v1", "Be helpful.", event, lambda text: scrubber.scrub(text).text)
    text = json.dumps(messages)
    assert "jo@example.com" not in text and "<EMAIL>" in text
    assert "helpful-v1" in messages[0]["content"] and "Be helpful." in messages[0]["content"]
    assert '"score"' in messages[0]["content"]


# --- one record through the annotator ---------------------------------------------------------------


class ScriptedJudge:
    """Answers from ``script``: an exception to raise or the reply's text, in turn; then ``then``."""

    def __init__(self, *script, then='{"score": 0.75, "confidence": 0.5}') -> None:
        self.script, self.then, self.asked = list(script), then, 0

    async def ask(self, messages) -> Reply:
        self.asked += 1
        step = self.script.pop(0) if self.script else self.then
        if isinstance(step, Exception):
            raise step
        return Reply(step, 50)


def unavailable() -> Exception:
    return openai.APIConnectionError(request=httpx.Request("POST", "http://judge/v1/chat/completions"))


def annotator(judge, **settings) -> Annotator:
    config = JudgeSettings(backoff_s=0.001, backoff_max_s=0.004, **settings)
    return Annotator(config, KafkaSettings(bootstrap_servers="127.0.0.1:9"), judge, judge_name="judge-1",
                     window=WINDOW, scrub=lambda text: text, is_erased=lambda event: False, clock=lambda: NOW)


def annotate(annotator: Annotator, event: Interaction):
    return asyncio.run(annotator.annotate(event.model_dump_json().encode()))


def test_a_judged_interaction_becomes_its_model_annotation():
    event = turn()
    out = annotate(annotator(ScriptedJudge()), event)
    assert isinstance(out, Annotation)
    assert (out.source, out.score, out.confidence, out.rubric, out.annotator) == ("model", 0.75, 0.5, "helpful-v1",
                                                                                 "judge-1")  # fmt: skip
    assert (out.app_id, out.session_id, out.interaction_id) == (event.app_id, event.session_id, event.interaction_id)
    assert out.event_id == annotation_id(event.app_id, event.interaction_id, "helpful-v1")


def test_a_judge_that_comes_back_within_the_retries_gives_the_annotation():
    judge = ScriptedJudge(unavailable(), openai.InternalServerError("down", response=_response(503), body=None))
    assert isinstance(annotate(annotator(judge, retries=2), turn()), Annotation)
    assert judge.asked == 3


def test_a_judge_still_down_after_the_retries_gives_a_dead_letter():
    judge = ScriptedJudge(*[unavailable()] * 3)
    worker = annotator(judge, retries=2)
    out = annotate(worker, turn())
    assert isinstance(out, DeadLetter) and out.reason == "judge_unavailable" and out.stage == "judge"
    assert "after 3 requests" in out.detail and judge.asked == 3
    assert worker.budget.total_requests == 0  # nothing was answered, nothing spent


def test_a_refusal_is_not_retried():
    judge = ScriptedJudge(openai.NotFoundError("no such model", response=_response(404), body=None))
    out = annotate(annotator(judge, retries=5), turn())
    assert isinstance(out, DeadLetter) and out.reason == "judge_refused" and judge.asked == 1


def test_a_malformed_reply_is_a_dead_letter_with_the_reply_and_costs_its_tokens():
    worker = annotator(ScriptedJudge("I'd say 0.8."))
    out = annotate(worker, turn())
    assert isinstance(out, DeadLetter) and out.reason == "judge_malformed"
    assert base64.b64decode(out.raw_b64).decode() == "I'd say 0.8."
    assert worker.counts.dead_letters == {"judge_malformed": 1} and worker.counts.annotated == 0
    assert worker.budget.total_tokens == 50


def test_the_hourly_budget_bounds_the_requests():
    worker = annotator(ScriptedJudge(), max_per_hour=3)
    outs = [annotate(worker, turn()) for _ in range(5)]
    assert [type(o).__name__ for o in outs] == ["Annotation"] * 3 + ["NoneType"] * 2
    assert worker.counts.skipped == {"over_budget": 2}
    assert worker.liveness_detail()["requests_this_hour"] == 3


def test_records_that_are_no_interaction_are_passed_over():
    worker = annotator(ScriptedJudge())
    assert asyncio.run(worker.annotate(b"not json")) is None
    assert asyncio.run(worker.annotate(json.dumps({"type": "tick", "event_id": "tick-0001", "partition": 0,
                                                   "occurred_at": NOW.isoformat()}).encode())) is None  # fmt: skip
    assert worker.judge.asked == 0


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", "http://judge/v1/chat/completions"))


def test_a_stop_while_waiting_to_retry_leaves_the_record_to_the_next_start():
    from streams.annotator import _Stopped

    async def stopped_mid_outage() -> None:
        worker = annotator(ScriptedJudge(then=unavailable()), retries=10_000)
        task = asyncio.create_task(worker.annotate(turn().model_dump_json().encode()))
        while worker.judge.asked < 2 and not task.done():  # it is retrying
            await asyncio.sleep(0.001)
        worker.stop()
        with pytest.raises(_Stopped):  # neither an annotation nor a dead letter: run() commits nothing
            await task

    asyncio.run(stopped_mid_outage())
