"""The partition pipeline, offline: joins, windows, signals, dead letters, batches, erasure."""

import base64
import json
import pickle
from datetime import datetime, timedelta, timezone

import pytest

from streams.config import PipelineSettings
from streams.contract import AnnotatedExample, gateway_session_id
from streams.pii import Scrubber
from streams.intake import PRODUCER_MAX_REQUEST_BYTES, dead_letter_max_bytes
from streams.pipeline import PartitionPipeline, PipelineSet, Received, receive_time
from streams.pseudonyms import KeyStore, Pseudonymizer, user_identity
from streams.training_data import LabelRecord, PreferenceRecord, SftRecord
from tests.factories import feedback, interaction
from tests.poison import FAR_FUTURE, OVERSIZED, corpus

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)
CONFIG = PipelineSettings(implicit_window_s=60, explicit_window_s=600, allowed_lateness_s=0,
                          batch_size=1000, batch_max_wait_s=10**6)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def turn(seconds: float, **overrides):
    """An interaction at T0 + seconds, with a prompt of its own (repeats are filtered)."""
    event = interaction(occurred_at=at(seconds), **overrides)
    if "prompt" not in overrides:
        event["prompt"] = [{"role": "user", "content": f"question {event['interaction_id']}"}]
    return event


def signal(of: dict, kind: str, seconds: float, **overrides):
    return feedback(of, kind, occurred_at=at(seconds), **overrides)


def tick(seconds: float) -> dict:
    return {"type": "tick", "event_id": f"tick-{seconds:012.0f}", "occurred_at": at(seconds), "partition": 0}


@pytest.fixture
def pseudonyms(tmp_path):
    return Pseudonymizer(KeyStore.in_directory(tmp_path / "keys"))


class Run:
    """Feeds events to one partition pipeline and collects everything it emits."""

    def __init__(self, pseudonyms, config=CONFIG):
        self.pipeline = PartitionPipeline(0, config)
        self.scrubber = Scrubber()
        self.pseudonyms = pseudonyms
        self.examples: list[AnnotatedExample] = []
        self.dead = []
        self.batches = []
        self.offset = 0

    def feed(self, *events, received=None):
        """Process ``events`` (dicts, or raw bytes); ``received``: their receive time."""
        for event in events:
            raw = event if isinstance(event, bytes) else json.dumps(event).encode()
            out = self.pipeline.process(self.offset, raw, scrubber=self.scrubber, pseudonyms=self.pseudonyms,
                                        received=received)
            self.offset += 1
            self.examples += out.examples
            self.dead += out.dead_letters
            self.batches += out.batches
        return self

    def reasons(self):
        return sorted(d.reason for d in self.dead)

    def records(self):
        return [r for b in self.batches for r in b.records]


def test_tool_turns_and_interrupted_streams_count_but_are_never_trained_on(pseudonyms):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "send_mail", "arguments": '{"to": "ann.lee@example.com"}'}}  # fmt: skip
    tool_answer = turn(0, response="", tool_calls=[call])
    tool_result = turn(0, prompt=[{"role": "user", "content": "Mail Ann"},
                                  {"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "content": "sent", "tool_call_id": "call_1"}])  # fmt: skip
    cut_short = turn(0, metadata={"stream_interrupted": True})
    plain = turn(0)
    events = [tool_answer, tool_result, cut_short, plain]
    run = Run(pseudonyms).feed(*events, *[signal(e, "thumbs", 5) for e in events], tick(700))
    by_id = {e.example_id: e for e in run.examples}
    assert {i: e.filtered for i, e in by_id.items()} == {
        tool_answer["interaction_id"]: "tool_use", tool_result["interaction_id"]: "tool_use",
        cut_short["interaction_id"]: "interrupted", plain["interaction_id"]: None}  # fmt: skip
    assert all(e.rewards["explicit"] == 1.0 for e in by_id.values()), "they still count for the router"
    run.pipeline.curator.request_early("manual")
    run.feed(tick(701))
    assert {r.example_id.split(":")[0] for r in run.records()} == {plain["interaction_id"]}
    (answered,) = by_id[tool_answer["interaction_id"]].tool_calls
    (asked,) = by_id[tool_result["interaction_id"]].prompt[1].tool_calls
    for scrubbed in (answered.function.arguments, asked.function.arguments):
        assert "ann.lee@example.com" not in scrubbed and "<EMAIL>" in scrubbed, scrubbed


def test_feedback_joins_its_interaction_and_the_window_closes_in_event_time(pseudonyms):
    a = turn(0)
    run = Run(pseudonyms).feed(a, signal(a, "thumbs", 5), signal(a, "copy", 10))
    assert run.examples == []  # window still open
    run.feed(tick(599))
    assert run.examples == []
    run.feed(tick(600))
    (example,) = run.examples
    assert example.example_id == a["interaction_id"]
    assert example.rewards == {"explicit": 1.0, "implicit": 1.0, "self_eval": None}
    assert example.feedback_kinds == ["copy", "thumbs"]
    assert example.user.startswith("u_") and example.user != a["user_id"]
    assert len(example.event_ids) == 3


def test_signal_rules_edit_regenerate_thumbs_accept(pseudonyms):
    edited, regenerated = turn(0), turn(1)
    better = turn(20, session_id=regenerated["session_id"], regenerates=regenerated["interaction_id"],
                  response="A clearer answer.", prompt=regenerated["prompt"])
    run = Run(pseudonyms).feed(
        edited, signal(edited, "edit", 30, text="The corrected answer."),
        regenerated, signal(regenerated, "regenerate", 19),
        better, signal(better, "copy", 40), signal(better, "thumbs", 41),
        tick(10_000),
    )
    run.pipeline.curator.request_early("manual")
    run.feed(tick(10_001))
    records = {r.example_id: r for r in run.records()}
    edit_sft = records[f"{edited['interaction_id']}:edit"]
    assert isinstance(edit_sft, SftRecord) and edit_sft.messages[-1].content == "The corrected answer."
    pair = records[f"{edited['interaction_id']}:edit-pair"]
    assert isinstance(pair, PreferenceRecord) and pair.chosen == "The corrected answer."
    regen_pair = records[f"{better['interaction_id']}:regenerate-pair"]
    assert (regen_pair.chosen, regen_pair.rejected) == ("A clearer answer.", regenerated["response"])
    label = records[f"{better['interaction_id']}:thumbs"]
    assert isinstance(label, LabelRecord) and label.desirable
    assert f"{better['interaction_id']}:accepted" in records
    assert f"{regenerated['interaction_id']}:accepted" not in records


def test_duplicates_orphans_late_and_invalid_are_dead_lettered_and_counted(pseudonyms):
    a, b = turn(0), turn(1)
    thumbs = signal(a, "thumbs", 2)
    early = signal(b, "copy", 0.5)  # arrives before its interaction: waits as an orphan
    never = signal({"interaction_id": "nope", "session_id": "s"}, "thumbs", 3)
    run = Run(pseudonyms).feed(a, thumbs, thumbs, early, b, never, b"{not json",
                               signal(a, "copy", 120),  # implicit, after the 60 s window
                               tick(700), signal(a, "thumbs", 701))  # a closed at 600: late
    assert run.reasons() == ["duplicate_event", "invalid_json", "late_feedback", "orphan_feedback",
                             "outside_implicit_window"]
    by_id = {e.example_id: e for e in run.examples}
    assert by_id[a["interaction_id"]].feedback_kinds == ["thumbs"]  # the duplicate counted once
    assert by_id[b["interaction_id"]].feedback_kinds == ["copy"]  # the early one joined
    counts = run.pipeline.stats.counts
    assert counts["duplicate_event"] == 1 and counts["orphan_feedback"] == 1 and counts["examples"] == 2


def test_opted_out_users_are_metrics_only(pseudonyms):
    a = turn(0, training_consent=False)
    run = Run(pseudonyms).feed(a, signal(a, "thumbs", 1), signal(a, "edit", 2, text="x"), tick(601))
    assert len(run.examples) == 1 and run.examples[0].rewards["explicit"] is not None
    run.pipeline.curator.request_early("manual")
    run.feed(tick(602))
    assert run.records() == [] and run.pipeline.stats.counts["no_consent"] == 1


def test_quality_filters_keep_examples_out_of_training(pseudonyms):
    config = CONFIG.model_copy(update={"blocked_terms": ["forbidden"], "max_prompt_chars": 500,
                                       "near_duplicate_threshold": 0.7})
    words = "please explain how the river flows from the mountains down to the sea in the spring".split()
    blocked = turn(0, response="this is Forbidden text")
    long = turn(0, response="x" * 600)
    empty = turn(0, response="   ")
    first = turn(0, prompt=[{"role": "user", "content": " ".join(words)}])
    same = turn(1, prompt=[{"role": "user", "content": " ".join(words).upper() + "!"}])
    near = turn(2, prompt=[{"role": "user", "content": " ".join(words[:-1] + ["summer"])}])
    other_topic = turn(3)
    same_session = turn(4, session_id=first["session_id"], prompt=first["prompt"])
    events = [blocked, long, empty, first, same, near, other_topic, same_session]
    run = Run(pseudonyms, config).feed(*events, *[signal(e, "thumbs", 5) for e in events], tick(700))
    filtered = {e.example_id: e.filtered for e in run.examples}
    assert filtered == {
        blocked["interaction_id"]: "blocked_term", long["interaction_id"]: "too_long",
        empty["interaction_id"]: "empty", first["interaction_id"]: None,
        same["interaction_id"]: "repeated_prompt", near["interaction_id"]: "near_duplicate",
        other_topic["interaction_id"]: None, same_session["interaction_id"]: None,
    }
    assert run.pipeline.stats.counts["filtered_near_duplicate"] == 1


def test_a_prompt_is_a_repeat_only_while_it_is_remembered(pseudonyms):
    config = CONFIG.model_copy(update={"repeat_memory": 2})
    words = [{"role": "user", "content": "how far is the moon from the earth in miles"}]
    first = turn(0, prompt=words)
    soon, others, late = turn(1, prompt=words), [turn(2 + i) for i in range(2)], turn(5, prompt=words)
    events = [first, soon, *others, late]
    run = Run(pseudonyms, config).feed(*events, *[signal(e, "thumbs", 6) for e in events], tick(700))
    filtered = {e.example_id: e.filtered for e in run.examples}
    assert filtered[soon["interaction_id"]] == "repeated_prompt"
    assert filtered[late["interaction_id"]] is None, "two prompts later the first is forgotten"


def test_batches_cut_by_size_are_stratified_with_a_cap_and_replay(pseudonyms):
    config = CONFIG.model_copy(update={"batch_size": 40, "max_group_share": 0.5, "replay_fraction": 0.2})
    events = []
    for i in range(60):
        cohort, domain = ("minority", "units") if i % 10 == 0 else ("a", "code")
        t = turn(i, context={"cohort": cohort, "domain": domain},
                 prompt=[{"role": "user", "content": f"question {i} about {domain} topic {i * 7}"}])
        events += [t, signal(t, "thumbs", i + 1)]
    run = Run(pseudonyms, config).feed(*events, tick(5000))
    assert [b.trigger for b in run.batches] == ["size", "size", "size"]
    first, second = run.batches[0], run.batches[1]
    strata = {}
    for r in first.records:
        strata[f"{r.cohort}/{r.domain}"] = strata.get(f"{r.cohort}/{r.domain}", 0) + 1
    assert max(strata.values()) <= 0.5 * len(first.records) + 1e-9  # the cap holds
    assert first.capped > 0  # the majority's overflow went to the reservoir
    assert any(r.replay for r in second.records) and not any(r.replay for r in first.records)


@pytest.mark.parametrize("preferences_moved", [True, False])
def test_a_reward_drift_trigger_forgets_the_records_held_from_before_it(pseudonyms, preferences_moved):
    config = CONFIG.model_copy(update={"batch_size": 20, "replay_fraction": 0.2})

    def turns(start: int, count: int) -> list[dict]:
        events = []
        for i in range(start, start + count):
            t = turn(i, context={"cohort": "a", "domain": "code"},
                     prompt=[{"role": "user", "content": f"question {i} about code topic {i * 7}"}])
            events += [t, signal(t, "thumbs", i + 1)]
        return events

    run = Run(pseudonyms, config).feed(*turns(0, 45), tick(700))
    curator = run.pipeline.curator
    buffered = {b.record.example_id for b in curator.buffer}
    before = buffered | {r.example_id for b in run.batches for r in b.records}
    cut_before = len(run.batches)
    assert cut_before >= 2 and buffered and curator.reservoir
    run.feed({"type": "curation_trigger", "event_id": "drift-alarm-2-p0", "occurred_at": at(701), "partition": 0,
              "trigger": "drift", "cause": "alarm-2", "preferences_moved": preferences_moved})
    if preferences_moved:  # nothing cut early: what was held is forgotten
        assert len(run.batches) == cut_before and not curator.buffer
        assert run.pipeline.stats.counts["forgotten_on_shift"] == len(buffered)
    else:  # the buffered records are cut at once
        assert run.batches[cut_before].trigger == "drift"
        assert {r.example_id for r in run.batches[cut_before].records if not r.replay} == buffered
    run.feed(*turns(1000, 40), tick(2000))
    later = [r for b in run.batches[cut_before:] for r in b.records]
    assert any(r.replay for r in later), "replay goes on"
    # Forgotten, only records from after the alarm are trained on; otherwise older ones come back too.
    assert any(r.example_id in before for r in later) is not preferences_moved


def test_erased_users_never_reach_a_later_batch(tmp_path):
    # The erasure's time is pinned between the old events and the new one: the pipeline
    # compares event times with it, and the wall clock is later than every event here.
    erased_at = T0 + timedelta(seconds=5_000)
    pseudonyms = Pseudonymizer(KeyStore.in_directory(tmp_path / "keys", clock=lambda: erased_at))
    keep, erase = turn(0, user_id="keep-me"), turn(1, user_id="erase-me")
    before = [keep, erase, signal(keep, "thumbs", 2), signal(erase, "thumbs", 3), tick(700)]
    run = Run(pseudonyms).feed(*before)
    (old_pseudonym,) = {e.user for e in run.examples if e.example_id == erase["interaction_id"]}
    pseudonyms.erase(user_identity(erase["app_id"], "erase-me"))
    run.pipeline.curator.request_early("manual")
    run.feed(tick(800))
    ids = {r.example_id.split(":")[0] for r in run.records()}
    assert keep["interaction_id"] in ids and erase["interaction_id"] not in ids
    assert run.batches[0].erased >= 1

    # After the erasure: a new pseudonym, a new start. Their new turn is trained on, the old
    # one still is not.
    later = turn(10**4 - 5, user_id="erase-me")
    cut = len(run.batches)
    after = [later, signal(later, "thumbs", 10**4 - 4), tick(10**4 + 700)]
    run.feed(*after)
    run.pipeline.curator.request_early("manual")
    run.feed(tick(10**4 + 800))
    (example,) = [e for e in run.examples if e.example_id == later["interaction_id"]]
    assert example.user.startswith("u_") and example.user != old_pseudonym
    new_ids = {r.example_id.split(":")[0] for b in run.batches[cut:] for r in b.records if not r.replay}
    assert later["interaction_id"] in new_ids
    assert erase["interaction_id"] not in {r.example_id.split(":")[0] for r in run.records()}
    assert "user_erased" not in run.reasons()

    # Replaying the raw log after the erasure drops their old turn at the door (its feedback
    # then has nothing to join), not the new one.
    replay = Run(pseudonyms).feed(*before, *after)
    assert {d.event_id: d.reason for d in replay.dead} == {erase["event_id"]: "user_erased",
                                                          before[3]["event_id"]: "orphan_feedback"}  # fmt: skip
    assert {e.example_id for e in replay.examples} == {keep["interaction_id"], later["interaction_id"]}


def test_same_records_same_outputs_and_state_pickles_midstream(pseudonyms):
    events = []
    for i in range(30):
        t = turn(i * 10, context={"cohort": "ab"[i % 2], "domain": "code"},
                 prompt=[{"role": "user", "content": f"different question number {i} on code {i * 31}"}])
        events += [t, signal(t, ["thumbs", "copy", "rating"][i % 3], i * 10 + 1,
                             **({"value": 4} if i % 3 == 2 else {}))]
    events.append(tick(5000))
    config = CONFIG.model_copy(update={"batch_size": 8})
    whole = Run(pseudonyms, config).feed(*events)
    half = Run(pseudonyms, config).feed(*events[:25])
    restored = Run(pseudonyms, config)
    restored.pipeline = pickle.loads(pickle.dumps(half.pipeline))
    restored.offset = half.offset
    restored.feed(*events[25:])
    assert whole.batches and [b.records for b in whole.batches] == [b.records for b in half.batches + restored.batches]
    assert [e.example_id for e in whole.examples] == [e.example_id for e in half.examples + restored.examples]


def test_where_ticks_fall_after_the_events_changes_nothing_in_the_outputs(pseudonyms):
    # One worker's clock ticks once, long after the last event; another's every few minutes
    # (a quiet spell, a slower machine, two workers sharing the partitions): the same events must
    # give the same examples and batches, each window closed and each batch cut at its own time.
    config = CONFIG.model_copy(update={"batch_size": 5, "batch_max_wait_s": 900})
    events = []
    for i in range(12):
        t = turn(i * 40, context={"cohort": "ab"[i % 2], "domain": "code"})
        events += [t, signal(t, "thumbs", i * 40 + 5)]
    once = Run(pseudonyms, config).feed(*events, tick(50_000))
    often = Run(pseudonyms, config).feed(*events, *[tick(600 + 137 * k) for k in range(40)], tick(50_000))

    def dumped(run):
        return ([e.model_dump_json() for e in run.examples],
                [(b.trigger, b.event_time, b.records) for b in run.batches])

    assert len(once.batches) >= 3 and {b.trigger for b in once.batches} == {"size", "time"}
    assert dumped(once) == dumped(often)
    first = once.examples[0]
    assert first.closed_at == first.occurred_at + timedelta(seconds=600)  # its deadline, not the tick's time
    time_cut = next(b for b in once.batches if b.trigger == "time")
    assert time_cut.event_time < T0 + timedelta(seconds=50_000)  # when its wait ended


def test_a_curation_trigger_in_the_log_cuts_a_batch_there(pseudonyms):
    a = turn(0)
    run = Run(pseudonyms).feed(a, signal(a, "thumbs", 1), tick(700))
    assert run.batches == [] and run.pipeline.curator.buffer  # under the size, not yet due
    run.feed({"type": "curation_trigger", "event_id": "drift-alarm-1-p0", "occurred_at": at(701),
              "partition": 0, "trigger": "drift", "cause": "alarm-1"})
    assert [b.trigger for b in run.batches] == ["drift"] and not run.pipeline.curator.buffer
    assert run.pipeline.stats.counts["trigger_drift"] == 1


def test_pipeline_set_routes_by_partition(pseudonyms):
    pipelines = PipelineSet(CONFIG, Scrubber(), pseudonyms)
    a = turn(0)
    pipelines.process(0, 0, json.dumps(a).encode())
    pipelines.process(3, 0, json.dumps(turn(0)).encode())
    assert sorted(pipelines.partitions) == [0, 3]
    assert pipelines.counts()["records"] == 2


def test_every_poison_record_is_one_dead_letter_that_fits_and_the_partition_goes_on(pseudonyms):
    run = Run(pseudonyms)
    received = Received(T0, "test")
    cases = corpus()
    run.feed(*(case.value for case in cases), received=received)
    assert [(d.dead_letter_id, d.reason) for d in run.dead] == [
        (f"p0-{i}-{case.reason}", case.reason) for i, case in enumerate(cases)
    ]
    bound = dead_letter_max_bytes(run.pipeline.checks.dead_letter_max_raw_bytes)
    assert bound < PRODUCER_MAX_REQUEST_BYTES
    for letter in run.dead:
        assert len(letter.model_dump_json().encode()) <= bound
        assert letter.detail and letter.stage == "pipeline"
    oversized = [d for d in run.dead if d.reason == "event_too_large"]
    assert all(d.raw_truncated and d.raw_size >= OVERSIZED for d in oversized) and len(oversized) == 2
    skewed = next(d for d in run.dead if d.reason == "clock_skew")
    assert FAR_FUTURE in skewed.detail and T0.isoformat() in skewed.detail
    assert skewed.received_at == T0  # the receive time, not the event's own
    assert run.pipeline.join.watermark is None, "no poison record moved event time"
    # The same partition still joins and closes windows.
    a = turn(0)
    run.feed(a, signal(a, "thumbs", 5), received=Received(T0 + timedelta(seconds=5), "test"))
    run.feed(tick(600), received=Received(T0 + timedelta(seconds=600), "test"))
    (example,) = run.examples
    assert example.example_id == a["interaction_id"] and example.feedback_kinds == ["thumbs"]


def test_an_event_dated_decades_ahead_is_clock_skew_and_never_moves_event_time(pseudonyms):
    received = Received(T0 + timedelta(seconds=3), "test")
    a = turn(0)
    future = interaction(occurred_at=FAR_FUTURE, session_id=a["session_id"])
    run = Run(pseudonyms).feed(a, future, received=received)
    (dead,) = run.dead
    assert dead.reason == "clock_skew" and dead.event_id == future["event_id"]
    assert FAR_FUTURE in dead.detail and received.at.isoformat() in dead.detail
    assert run.pipeline.join.watermark == T0  # the interaction's, not 2096
    run.feed(signal(a, "rating", 10, value=5), a, received=received)  # and a re-sent interaction
    assert run.reasons() == ["clock_skew", "duplicate_event"], "the de-duplication memory was kept"
    run.feed(tick(600), received=Received(T0 + timedelta(seconds=600), "test"))
    (example,) = run.examples
    assert example.example_id == a["interaction_id"] and example.feedback_kinds == ["rating"]
    # Within the bound is not skew: a client clock a little ahead.
    b = turn(1_000)
    run.feed(b, received=Received(T0 + timedelta(seconds=1_000 - CONFIG.max_clock_skew_s), "test"))
    assert run.reasons() == ["clock_skew", "duplicate_event"]


def test_a_restored_state_runs_with_the_current_settings(pseudonyms):
    """A checkpoint keeps the bounds it was made with only until the next record: the
    PipelineSet's own are handed over (and a state pickled before bounds existed works)."""
    old = PartitionPipeline(0, CONFIG)
    del old.__dict__["checks"]
    restored = pickle.loads(pickle.dumps(old))
    strict = PipelineSet(CONFIG.model_copy(update={"max_clock_skew_s": 1}), Scrubber(), pseudonyms)
    strict.partitions[0] = restored
    near = turn(60)
    (dead,) = strict.process(0, 0, json.dumps(near).encode(), Received(T0, "test")).dead_letters
    assert dead.reason == "clock_skew"


def test_a_restored_state_rewards_scores_by_the_current_rules(pseudonyms):
    a = turn(0)
    before = PartitionPipeline(0, CONFIG)  # checkpointed with no score rules
    rules = PipelineSettings(scores={"helpful": {"type": "boolean"}}).scores
    pipelines = PipelineSet(CONFIG.model_copy(update={"scores": rules}), Scrubber(), pseudonyms)
    pipelines.partitions[0] = pickle.loads(pickle.dumps(before))
    for offset, event in enumerate([a, signal(a, "score", 5, name="helpful", label="true"), tick(600)]):
        examples = pipelines.process(0, offset, json.dumps(event).encode()).examples
    assert examples[0].rewards["explicit"] == 1.0


def test_receive_time_is_the_earlier_of_the_gateway_header_and_the_record_timestamp():
    header = (T0 + timedelta(seconds=1)).isoformat().encode()
    stamp = (T0 + timedelta(seconds=2)).timestamp()
    assert receive_time([("received_at", header)], stamp).at == T0 + timedelta(seconds=1)
    assert receive_time({"received_at": header}, T0.timestamp()).at == T0  # a header later than the broker's
    assert receive_time([("received_at", b"garbage")], stamp).at == T0 + timedelta(seconds=2)
    assert receive_time(None, stamp).source == "its Kafka record timestamp"
    assert receive_time([], None) is None and receive_time(None, -1) is None


def test_an_interaction_id_received_again_under_another_event_id_is_a_dead_letter(pseudonyms):
    first = turn(0, response="The first answer.")
    # A client that retried with a fresh event id: same interaction, other event id, other text.
    again = {**first, "event_id": "retry-" + first["event_id"], "response": "A second answer."}
    run = Run(pseudonyms).feed(first, signal(first, "thumbs", 1), again)
    assert run.reasons() == ["duplicate_interaction"]
    (dead,) = run.dead
    assert dead.event_id == again["event_id"] and first["interaction_id"] in dead.detail
    assert json.loads(base64.b64decode(dead.raw_b64)) == again  # kept whole, for an operator to look at
    run.feed(tick(600))
    (example,) = run.examples
    assert example.response == "The first answer." and example.event_ids[0] == first["event_id"]
    # Still known after its window closed (late feedback is still plausible): refused again.
    late = {**first, "event_id": "late-" + first["event_id"], "occurred_at": at(650)}
    run.feed(late)
    assert run.reasons() == ["duplicate_interaction", "duplicate_interaction"]
    assert len(run.examples) == 1 and run.pipeline.stats.counts["duplicate_interaction"] == 2


def test_a_batch_is_cut_by_time_once_the_oldest_record_has_waited_max_wait_in_event_time(pseudonyms):
    # Records join the buffer when their window closes (600 s); they wait from their interaction's time.
    config = CONFIG.model_copy(update={"batch_max_wait_s": 1000, "allowed_lateness_s": 30})
    old, newer = turn(0), turn(300)
    run = Run(pseudonyms, config).feed(old, signal(old, "thumbs", 1), newer, signal(newer, "thumbs", 301))
    run.feed(tick(1000))  # the watermark is 970: both closed, the oldest has waited 970 s
    assert len(run.examples) == 2 and run.batches == [] and len(run.pipeline.curator.buffer) >= 2
    run.feed(tick(1029))  # 999 s
    assert run.batches == []
    run.feed(tick(1030))  # the watermark reaches 1000 s after the oldest record
    (batch,) = run.batches
    assert batch.trigger == "time" and batch.event_time == T0 + timedelta(seconds=1000)
    assert {r.example_id.split(":")[0] for r in batch.records} == {old["interaction_id"], newer["interaction_id"]}
    assert not run.pipeline.curator.buffer and run.pipeline.stats.counts["batch_time"] == 1
    run.feed(tick(5000))
    assert len(run.batches) == 1, "an empty buffer is never cut"


def test_apps_sharing_a_deployment_never_join_or_dedupe_each_others_events(pseudonyms):
    """App B's feedback naming app A's interaction id never joins it (it would have been SFT data
    for A); the same interaction and event ids in two apps are two interactions; the same user id
    in two apps is two pseudonyms."""
    a = turn(0, app_id="app-a", user_id="42", interaction_id="shared-id", event_id="event-shared-1")
    b = turn(1, app_id="app-b", user_id="42", interaction_id="shared-id", event_id="event-shared-1",
             session_id=a["session_id"])  # one partition, as their session keys could share one
    poison = signal(a, "edit", 2, app_id="app-b", text="app B's words in app A's mouth")
    run = Run(pseudonyms).feed(a, poison, signal(a, "thumbs", 3, value=1), tick(700))
    (example_a,) = run.examples
    assert example_a.app_id == "app-a" and example_a.edit is None and example_a.feedback_kinds == ["thumbs"]
    assert [(d.reason, d.app_id) for d in run.dead] == [("orphan_feedback", "app-b")]  # B's, unjoined
    run.feed(b, tick(1400))
    assert run.reasons() == ["orphan_feedback"], "B's turn is not a duplicate of A's (same ids, other app)"
    assert [e.app_id for e in run.examples] == ["app-a", "app-b"]
    assert example_a.user != run.examples[1].user
    assert not [r for r in run.records() if isinstance(r, SftRecord) and r.source == "edit"]


def test_a_user_erased_while_their_interaction_is_open_gets_no_example(tmp_path):
    """Its text would otherwise reach the examples topic, the learner and the archive after
    the user asked to be forgotten; the other user's example comes out as usual."""
    erased_at = T0 + timedelta(seconds=100)
    pseudonyms = Pseudonymizer(KeyStore.in_directory(tmp_path / "keys", clock=lambda: erased_at))
    keep, erase = turn(0, user_id="keep-me"), turn(1, user_id="erase-me")
    run = Run(pseudonyms).feed(keep, erase, signal(erase, "edit", 2, text="my secret words"))
    pseudonyms.erase(user_identity(erase["app_id"], "erase-me"))
    run.feed(tick(700))
    assert [e.example_id for e in run.examples] == [keep["interaction_id"]]
    assert run.pipeline.stats.counts["erased_while_open"] == 1
    assert not run.pipeline.user_of  # nothing of theirs kept in state either


# --- the feedback model: comments, scores, upserts, pairwise choices, session defaults ----------


def cut(run: Run, seconds: float) -> list:
    """Close every window by ``seconds`` and cut what is buffered; the training records."""
    run.feed(tick(seconds))
    run.pipeline.curator.request_early("manual")
    run.feed(tick(seconds + 1))
    return run.records()


def test_a_comment_reaches_the_example_scrubbed_and_is_never_trained_on(pseudonyms):
    a = turn(0)
    comment = "Far too long. Mail me at anna@example.com"
    run = Run(pseudonyms).feed(a, signal(a, "thumbs", 5, value=1, comment=comment))
    records = cut(run, 700)
    (example,) = run.examples
    assert example.comments == ["Far too long. Mail me at <EMAIL>"]
    assert run.pipeline.stats.pii["EMAIL"] == 1
    assert {r.source for r in records} == {"thumbs", "accepted"}, "the thumbs still trains"
    assert all("Far too long" not in r.model_dump_json() for r in records)


def test_a_custom_score_is_rewarded_by_its_configured_rule(pseudonyms):
    def explicit_reward(scores: dict) -> float | None:
        a = turn(0)
        config = CONFIG.model_copy(update={"scores": PipelineSettings(scores=scores).scores})
        run = Run(pseudonyms, config).feed(a, signal(a, "score", 5, name="helpful", value=8), tick(600))
        (example,) = run.examples
        assert example.feedback_kinds == ["score:helpful"]
        return example.rewards["explicit"]

    assert explicit_reward({"helpful": {"type": "numeric", "min": 0, "max": 10}}) == pytest.approx(0.8)
    assert explicit_reward({"helpful": {"type": "numeric", "min": 4, "max": 12}}) == pytest.approx(0.5)
    assert explicit_reward({}) is None  # no rule: kept among the kinds, no reward


def test_an_unrewarded_score_is_counted(pseudonyms):
    a = turn(0)
    run = Run(pseudonyms).feed(a, signal(a, "score", 5, name="tone", label="warm"), tick(600))
    assert run.examples[0].rewards == {"explicit": None, "implicit": None, "self_eval": None}
    assert run.pipeline.stats.counts["score_unrewarded"] == 1


def test_a_flipped_thumb_replaces_the_first_and_both_events_stay_consumed(pseudonyms):
    a = turn(0)
    up, down = signal(a, "thumbs", 5, value=1), signal(a, "thumbs", 9, value=-1)
    run = Run(pseudonyms).feed(a, up, down, up, tick(600))  # the up sent again: still a duplicate
    (example,) = run.examples
    assert example.rewards["explicit"] == 0.0, "a single down, not the 0.5 of up and down"
    assert example.event_ids == [a["event_id"], up["event_id"], down["event_id"]]
    assert run.reasons() == ["duplicate_event"]


@pytest.mark.parametrize("late_first", [False, True])
def test_the_latest_occurred_at_wins_whatever_the_log_order(pseudonyms, late_first):
    a = turn(0)
    rated = [signal(a, "rating", 5, value=2), signal(a, "rating", 30, value=5)]
    run = Run(pseudonyms).feed(a, *(rated[::-1] if late_first else rated), tick(600))
    assert run.examples[0].rewards["explicit"] == 1.0
    assert sorted(run.examples[0].event_ids) == sorted([a["event_id"], *(r["event_id"] for r in rated)])


def test_upserts_are_per_user_and_kind_ties_go_to_the_log_and_feedback_id_keys_any_kind(pseudonyms):
    a = turn(0)
    run = Run(pseudonyms).feed(
        a,
        signal(a, "thumbs", 5, value=1), signal(a, "thumbs", 5, value=-1),  # a tie: the later record wins
        signal(a, "thumbs", 6, value=1, user_id="reviewer-2"),  # another user's thumb is one more signal
        signal(a, "rating", 7, value=5),  # another kind too
        signal(a, "report", 8, feedback_id="fb-1"), signal(a, "report", 9, feedback_id="fb-1", text="rude"),
        tick(600),
    )
    (example,) = run.examples
    assert example.rewards["explicit"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    assert len(example.event_ids) == 7


def test_replay_of_upserts_gives_the_same_example(pseudonyms):
    a = turn(0)
    log = [a, signal(a, "thumbs", 5, value=1), signal(a, "thumbs", 9, value=-1), tick(600)]
    first, second = Run(pseudonyms).feed(*log), Run(pseudonyms).feed(*log)
    assert first.examples == second.examples


def test_a_pairwise_choice_becomes_a_preference_pair(pseudonyms):
    a = turn(0, response="The first answer.")
    b = turn(0, session_id=a["session_id"], prompt=a["prompt"], response="The second answer.")
    choice = signal(b, "pairwise", 20, rejected_interaction_id=a["interaction_id"])
    run = Run(pseudonyms).feed(a, b, choice)
    records = cut(run, 700)
    (pair,) = [r for r in records if r.source == "pairwise"]
    assert isinstance(pair, PreferenceRecord)
    assert (pair.chosen, pair.rejected) == ("The second answer.", "The first answer.")
    assert [m.content for m in pair.prompt] == [m["content"] for m in a["prompt"]]
    assert {a["event_id"], b["event_id"], choice["event_id"]} <= set(pair.event_ids)
    by_id = {e.example_id: e for e in run.examples}
    assert by_id[b["interaction_id"]].rewards["explicit"] is None, "a choice is no scalar reward"
    again = Run(pseudonyms).feed(a, b, choice, {**choice, "event_id": "resent-0001"})  # a client retry, new id
    assert [r.source for r in cut(again, 700)].count("pairwise") == 1
    assert by_id[b["interaction_id"]].feedback_kinds == ["pairwise"]


def test_a_pairwise_rival_closed_first_still_pairs(pseudonyms):
    a = turn(0, response="The first answer.")
    b = turn(10, session_id=a["session_id"], prompt=a["prompt"], response="The second answer.")
    run = Run(pseudonyms).feed(a, b, signal(b, "pairwise", 20, rejected_interaction_id=a["interaction_id"]))
    run.feed(tick(605))  # a closed, b still open
    assert [e.example_id for e in run.examples] == [a["interaction_id"]]
    assert [r.rejected for r in cut(run, 700) if r.source == "pairwise"] == ["The first answer."]


def test_a_pairwise_choice_without_a_fitting_rival_is_counted_not_paired(pseudonyms):
    a = turn(0)
    other_session = turn(0, prompt=a["prompt"])
    other_prompt = turn(0, session_id=a["session_id"])
    run = Run(pseudonyms).feed(
        a, other_session, other_prompt,
        signal(a, "pairwise", 5, rejected_interaction_id=other_session["interaction_id"]),
        signal(a, "pairwise", 6, rejected_interaction_id=other_prompt["interaction_id"]),
        signal(a, "pairwise", 7, rejected_interaction_id="never-came"),
    )
    assert [r for r in cut(run, 700) if r.source == "pairwise"] == []
    counts = run.pipeline.stats.counts
    assert (counts["pairwise_mismatched"], counts["pairwise_unpaired"]) == (2, 1)


def test_feedback_without_a_session_joins_the_interaction_the_gateway_recorded(pseudonyms):
    a = turn(0, interaction_id="3f1c9a.0", session_id=gateway_session_id("3f1c9a.0"))
    thumbs = signal(a, "thumbs", 5, value=-1)
    del thumbs["session_id"]
    run = Run(pseudonyms).feed(a, thumbs, tick(600))
    (example,) = run.examples
    assert example.feedback_kinds == ["thumbs"] and example.rewards["explicit"] == 0.0


def test_a_regeneration_pairs_with_the_answer_it_replaced_though_that_closed_first(pseudonyms):
    a = turn(0)
    b = turn(20, session_id=a["session_id"], regenerates=a["interaction_id"], prompt=a["prompt"],
             response="A clearer answer.")
    run = Run(pseudonyms).feed(a, signal(a, "regenerate", 19), b, signal(b, "thumbs", 30), tick(605))
    assert [e.example_id for e in run.examples] == [a["interaction_id"]]  # a closed, b still open
    (pair,) = [r for r in cut(run, 700) if r.source == "regenerate"]
    assert (pair.chosen, pair.rejected) == ("A clearer answer.", a["response"])


def test_a_batch_lists_each_record_under_the_pseudonym_its_example_carries(pseudonyms):
    config = CONFIG.model_copy(update={"batch_size": 40, "replay_fraction": 0.2})
    events = []
    for i in range(60):
        t = turn(i, user_id=f"user-{i % 3}", prompt=[{"role": "user", "content": f"question {i} topic {i * 7}"}])
        events += [t, signal(t, "thumbs", i + 1)]
    run = Run(pseudonyms, config).feed(*events, tick(5000))
    owner = {e.example_id: e.user for e in run.examples}
    assert len(set(owner.values())) == 3 and any(r.replay for r in run.records()), "the check has power"
    for batch in run.batches:
        listed = {example_id: user for user, ids in batch.users.items() for example_id in ids}
        assert listed == {r.example_id: owner[r.example_id.split(":")[0]] for r in batch.records + batch.heldout}


# --- a reviewer's correction of a closed example ------------------------------------------------


def correction(example: AnnotatedExample, seconds: float, text: str, reviewer: str = "alice") -> dict:
    """What the review desk publishes for a corrected answer (app.review_desk.review_correction)."""
    from app.review_desk import Labels, review_correction
    from streams.learning import ReviewRequest

    pick = ReviewRequest(review_id=f"review-{example.example_id}", score=0.9, terms={}, threshold=0.5,
                         selected_at=example.closed_at, example=example)  # fmt: skip
    return json.loads(review_correction(pick, Labels(correction=text), reviewer, T0 + timedelta(seconds=seconds))
                      .model_dump_json())  # fmt: skip


def test_a_reviewers_correction_of_a_closed_example_joins_the_next_batch_once(pseudonyms):
    first, late = turn(0), turn(1)
    run = Run(pseudonyms).feed(first, signal(first, "thumbs", 5, value=1), late, tick(700))
    example = next(e for e in run.examples if e.example_id == first["interaction_id"])
    before = {r.example_id for r in cut(run, 701)}
    assert f"{example.example_id}:thumbs" in before  # its own records went out at its close
    # Long after the window closed: an app's own edit is late, the reviewer's correction is not.
    fixed = correction(example, 5000, "The right answer; mail fixes to jane.doe@example.com")
    run.feed(signal(first, "edit", 4990, text="too late"), fixed, correction(example, 5001, "again", "bob"))
    assert run.reasons().count("late_feedback") == 1 and run.reasons().count("duplicate_event") == 1
    records = {r.example_id: r for r in cut(run, 5002) if r.example_id not in before}
    sft, pair = records.pop(f"{example.example_id}:review"), records.pop(f"{example.example_id}:review-pair")
    assert records == {}  # nothing else of the example again: no second thumbs label, no accepted SFT
    assert isinstance(sft, SftRecord) and sft.messages[:-1] == example.prompt and sft.source == "review"
    assert "jane.doe@example.com" not in sft.messages[-1].content  # scrubbed like any edit
    assert isinstance(pair, PreferenceRecord) and pair.rejected == example.response
    assert pair.chosen == sft.messages[-1].content and sft.event_ids == example.event_ids
    batch = next(b for b in run.batches if sft in b.records + b.heldout)
    assert {u: sorted(ids) for u, ids in batch.users.items()} == {example.user: [sft.example_id, pair.example_id]}
    assert run.pipeline.stats.counts["review_corrections"] == 1


def test_a_correction_of_an_opted_out_or_filtered_example_is_not_trained_on(pseudonyms):
    quiet, blocked = turn(0, training_consent=False), turn(1)
    run = Run(pseudonyms).feed(quiet, blocked, tick(700))
    examples = {e.example_id: e for e in run.examples}
    filtered = examples[blocked["interaction_id"]].model_copy(update={"filtered": "pii_heavy"})
    run.feed(correction(examples[quiet["interaction_id"]], 800, "fixed"), correction(filtered, 801, "fixed"))
    assert [r for r in cut(run, 802) if r.source == "review"] == []
    assert run.pipeline.stats.counts["review_not_trained"] == 2


def test_a_correction_replays_to_the_same_batches(pseudonyms):
    t = turn(0)
    first = Run(pseudonyms).feed(t, tick(700))
    events = [t, tick(700), correction(first.examples[0], 900, "better"), tick(10**6 + 2000)]
    one, two = Run(pseudonyms).feed(*events), Run(pseudonyms).feed(*events[:2])
    two.pipeline = pickle.loads(pickle.dumps(two.pipeline))  # a checkpoint between close and review
    two.feed(*events[2:])
    assert any(r.source == "review" for r in one.records())
    assert [b.records for b in one.batches] == [b.records for b in two.batches]
