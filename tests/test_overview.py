"""app/overview.py on hand-written archive segments and store rows (no broker)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select

from app.overview import PIPELINE_CONSUMER, ArchiveFold, OverviewSource, TimeBuckets
from app.settings import Settings
from streams.config import LearnerSettings
from streams.store import ArchiveSegment, StreamCheckpoint
from learners.ab_test import ABTest
from streams.archive import ArchivedRecord, encode_record, segment_path, write_segment
from streams.contract import (
    AdapterLoaded,
    AdapterPromoted,
    AdapterReady,
    AdapterRolledBack,
    AdapterState,
    AnnotatedExample,
    Context,
    DriftAlarm,
)
from streams.learning import LearnerState
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES
from tests.factories import feedback, interaction
from tests.poison import corpus

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)
CLUSTER = "cluster-1"


@pytest.fixture
def settings(tmp_path, sessions) -> Settings:
    # The `sessions` fixture's store is tmp_path/feedloop.db: data_dir's default store.
    return Settings(data_dir=tmp_path, learners=LearnerSettings(initial_arms=["champ"], ab_min_samples=10))


def seal(sessions, settings: Settings, topic: str, values: list, partition: int = 0) -> None:
    """Archive ``values`` (models, dicts, raw strings or bytes) as one segment, as the archiver does."""
    with sessions() as session:
        last = session.scalar(select(func.max(ArchiveSegment.last_offset))
                              .where(ArchiveSegment.topic == topic, ArchiveSegment.partition == partition))
    first = 0 if last is None else last + 1
    raw = [v if isinstance(v, bytes | None) else v.model_dump_json().encode() if hasattr(v, "model_dump_json")
           else (v if isinstance(v, str) else json.dumps(v)).encode() for v in values]  # fmt: skip
    lines = [encode_record(topic, partition, first + i, 0, None, value) for i, value in enumerate(raw)]
    relative = segment_path(CLUSTER, topic, partition, first)
    # No row is at ``first`` (it follows the last): a file there is one a replaced store left.
    digest, size = write_segment(settings.objects, relative, lines, recorded=lambda: False)
    with sessions.begin() as session:
        session.add(ArchiveSegment(cluster_id=CLUSTER, topic=topic, partition=partition, first_offset=first,
                                   last_offset=first + len(lines) - 1, event_count=len(lines), path=str(relative),
                                   sha256=digest, size_bytes=size, first_timestamp_ms=0, last_timestamp_ms=0))


def example(adapter: str, i: int, reward: float, cohort: str = "a",
            probabilities: dict[str, float] | None = None) -> AnnotatedExample:  # fmt: skip
    at = T0 + timedelta(seconds=i)
    return AnnotatedExample(
        example_id=f"{adapter}-{i}", app_id="app", session_id=f"s-{i}", user="p", adapter=adapter,
        propensity=0.5 if probabilities is None else probabilities[adapter], probabilities=probabilities,
        cohort=cohort, domain="code", context=Context(), prompt=[{"role": "user", "content": "q"}], response="a",
        rewards={"explicit": reward}, feedback_kinds=["thumbs"], training_consent=True, occurred_at=at,
        closed_at=at, event_ids=[],
    )  # fmt: skip


def ready(adapter: str) -> AdapterReady:
    return AdapterReady(event_id=f"ready-{adapter}", occurred_at=T0, source="trainer", adapter=adapter, path="p",
                        sha256="0", base_model_sha256="1")


def loaded(adapter: str) -> AdapterLoaded:
    return AdapterLoaded(event_id=f"loaded-{adapter}", occurred_at=T0, source="serving", adapter=adapter,
                         replicas=["r0"])


def dead(reason: str) -> dict:
    return {"type": "dead_letter", "reason": reason, "detail": f"{reason} detail", "received_at": T0.isoformat(),
            "app_id": "app", "stage": "gateway", "raw_b64": "", "raw_size": 0, "dead_letter_id": reason}


def state_of(overview, name: str) -> str:
    return next(a.state for a in overview.adapters if a.name == name)


def test_counts_roles_and_the_ab_sequence_follow_the_log(sessions, settings):
    turns = [interaction(adapter="champ"), interaction(adapter="chall"), interaction(adapter="champ")]
    tick = {"type": "tick", "event_id": "tick-00000001", "occurred_at": T0.isoformat(), "partition": 0}
    seal(sessions, settings, EVENTS.name, [*turns, feedback(turns[0]), tick, "not json"])
    seal(sessions, settings, DEAD_LETTER.name, [dead("schema_violation"), dead("invalid_json"), dead("schema_violation")])
    seal(sessions, settings, CONTROL.name, [ready("chall"), loaded("chall")])
    rng = random.Random(3)
    rewards = [(arm, float(rng.random() < p)) for _ in range(30) for arm, p in (("champ", 0.3), ("chall", 0.6))]
    sent = [example(arm, i, r) for i, (arm, r) in enumerate(rewards)]
    seal(sessions, settings, EXAMPLES.name, sent + sent[:7])  # seven emitted again: the learner counts them once

    overview = OverviewSource(settings, sessions).read()

    assert overview.events_accepted == {"interaction": 3, "feedback": 1, "annotation": 0}
    assert overview.undecodable == 1  # the garbage line; the tick is not a user event
    assert overview.dead_letters == {"schema_violation": 2, "invalid_json": 1}
    assert overview.records_by_topic[EVENTS.name] == 6
    assert overview.examples == len(rewards)
    assert (overview.champion, overview.challengers) == ("champ", ["chall"])
    assert (state_of(overview, "champ"), state_of(overview, "chall")) == ("champion", "challenger")
    assert [e.kind for e in next(a for a in overview.adapters if a.name == "chall").events] == ["ready", "loaded"]

    reference = ABTest("champ", "chall", alpha=0.05, min_samples=10, tau=0.05)
    for arm, reward in rewards:
        reference.update(arm, reward, 0.5, cohort="a")
    expected = reference.decision()
    [experiment] = overview.experiments
    assert (experiment.n_champion, experiment.n_challenger, experiment.status) == (30, 30, expected.verdict.replace(
        "continue", "running"))
    assert (experiment.lift, experiment.lower, experiment.upper) == pytest.approx(
        (expected.lift, expected.lower, expected.upper))
    assert experiment.lowers[0] is None and experiment.lowers[-1] == pytest.approx(expected.lower)
    assert set(overview.reward_mean.values) == {"champ", "chall"}
    json.dumps(overview.to_json(), allow_nan=False)  # what /v1/overview sends


def test_promotion_retires_the_champion_and_rollback_ends_the_experiment(sessions, settings):
    seal(sessions, settings, CONTROL.name, [loaded("chall"), loaded("other"),
                                            AdapterPromoted(event_id="promote-1", occurred_at=T0, source="learners",
                                                            adapter="chall", previous_champion="champ")])
    overview = OverviewSource(settings, sessions).read()
    assert overview.champion == "chall" and overview.challengers == ["other"]
    assert state_of(overview, "champ") == "retired" and state_of(overview, "chall") == "champion"
    # "other" ran against champ, then starts again against the new champion.
    assert [(x.challenger, x.champion, x.status) for x in overview.experiments] == [
        ("chall", "champ", "promote"), ("other", "champ", "restarted"), ("other", "chall", "running")]

    source = OverviewSource(settings, sessions)
    seal(sessions, settings, CONTROL.name, [AdapterRolledBack(event_id="rollback-1", occurred_at=T0, source="learners",
                                                              adapter="other", reason="ab_test: worse")])
    overview = source.read()
    assert overview.challengers == [] and state_of(overview, "other") == "rolled_back"
    assert overview.experiments[-1].status == "rollback"
    seal(sessions, settings, CONTROL.name, [loaded("other")])  # a restarted swap controller announcing again
    overview = source.read()
    assert overview.challengers == [] and state_of(overview, "other") == "rolled_back", "the learner refuses it too"


def test_two_challengers_ready_on_the_same_reward_promote_only_the_first_as_the_learner_does(sessions, settings):
    # b and c earn the same rewards, so both tests against champ decide on the same reward of
    # champ's; the promotion of b restarts c's test, and the replaced one decides nothing.
    seal(sessions, settings, CONTROL.name, [loaded("b"), loaded("c")])
    # Each challenger's requests were split with champ alone, so both tests see the same sequence.
    split = {"b": {"champ": 0.5, "b": 0.5}, "c": {"champ": 0.5, "c": 0.5}, "champ": dict.fromkeys("bc", 0.25) | {"champ": 0.5}}
    rows = [(arm, float(i % 10 != 0) if arm != "champ" else float(i % 10 < 2))
            for i in range(40) for arm in ("b", "c", "champ")]  # fmt: skip
    seal(sessions, settings, EXAMPLES.name, [example(arm, i, r, probabilities=split[arm])
                                             for i, (arm, r) in enumerate(rows)])  # fmt: skip
    overview = OverviewSource(settings, sessions).read()
    assert overview.champion == "b" and overview.challengers == ["c"]
    assert state_of(overview, "c") == "challenger"


def test_after_a_reward_drift_alarm_the_base_model_is_a_challenger_again(sessions, settings):
    promoted = AdapterPromoted(event_id="promote-1", occurred_at=T0, source="learners", adapter="chall")
    alarm = DriftAlarm(event_id="drift-alarm-1", occurred_at=T0, source="learners", signal="reward:chall",
                       detector="ADWIN", detected_at=T0)
    feature = alarm.model_copy(update={"event_id": "drift-alarm-2", "signal": "feature:domain=code"})
    seal(sessions, settings, CONTROL.name, [loaded("chall"), promoted, feature])
    assert OverviewSource(settings, sessions).read().challengers == []  # the questions changed, not the verdicts
    seal(sessions, settings, CONTROL.name, [alarm])
    overview = OverviewSource(settings, sessions).read()
    assert overview.champion == "chall" and overview.challengers == ["champ"]
    assert [(x.challenger, x.champion, x.status) for x in overview.experiments][-1] == ("champ", "chall", "running")
    # The same alarm again (a learner's output sent twice, or re-derived by a standby after a
    # takeover): one event, counted once, and the base model's new test is not restarted.
    seal(sessions, settings, CONTROL.name, [alarm])
    again = OverviewSource(settings, sessions).read()
    assert again.drift_alarms == {"feature:domain=code": 1, "reward:chall": 1}
    assert [(x.challenger, x.status) for x in again.experiments] == [(x.challenger, x.status) for x in overview.experiments]


def test_each_segment_is_read_once_and_a_new_store_starts_over(sessions, settings):
    source = OverviewSource(settings, sessions)
    seal(sessions, settings, EVENTS.name, [interaction()])
    seal(sessions, settings, EVENTS.name, [interaction()])
    assert source.read().events_accepted["interaction"] == 2 and source.segments_read == 2
    assert source.read().events_accepted["interaction"] == 2 and source.segments_read == 2
    seal(sessions, settings, EVENTS.name, [interaction(), interaction()])
    assert source.read().events_accepted["interaction"] == 4 and source.segments_read == 3

    with sessions.begin() as session:  # the store was replaced: its segment ids mean other files
        session.execute(delete(ArchiveSegment))
    seal(sessions, settings, EVENTS.name, [interaction()])
    assert source.read().events_accepted["interaction"] == 1


def test_lag_is_the_pipelines_checkpoint_behind_the_archive(sessions, settings):
    seal(sessions, settings, EVENTS.name, [interaction() for _ in range(10)], partition=1)
    with sessions.begin() as session:
        session.add(StreamCheckpoint(consumer=PIPELINE_CONSUMER, partition=1, cluster_id=CLUSTER, offset=3, state=b""))
        session.add(StreamCheckpoint(consumer="feedloop-learners", partition=0, cluster_id=CLUSTER, offset=99,
                                     state=b""))  # a state version, not an offset
    [lag] = OverviewSource(settings, sessions).read().lag
    assert (lag.consumer, lag.partition, lag.archived_offset, lag.checkpointed_offset, lag.lag) == (
        PIPELINE_CONSUMER, 1, 9, 3, 6)


def test_names_shared_with_modules_the_overview_cannot_import():
    from app.runtime import PIPELINE_CONSUMER as runtime_consumer

    assert PIPELINE_CONSUMER == runtime_consumer


def test_time_buckets_coarsen_without_losing_counts():
    buckets = TimeBuckets(lambda a, b: a + b, width_s=10, max_buckets=50)
    for i in range(1000):
        buckets.put(1_800_000_000 + 10 * i, "arm", 1)
    rows = buckets.rows()
    assert len(rows) <= 50 and buckets.width_s > 10
    assert sum(cells["arm"] for _, cells in rows) == 1000
    assert [start for start, _ in rows] == sorted(start for start, _ in rows)


# --- the learner and the overview fold the same log to the same roles ----------------------------

ONE_LOG = LearnerSettings(initial_arms=["champ"], ab_min_samples=100)


def recorded_log() -> list[tuple[str, bytes]]:
    """What the archive holds after a live run, in the order the learner handled it: examples,
    the operator's and the swap controller's control events, and what the learner published,
    right after the example that made it publish (as it comes back on the control topic).

    The story: two adapters under test; the operator promotes one while the other's test runs
    (restarted against the new champion, which it then loses); a restarted swap controller
    announces the rolled-back one again; a third adapter's rewards drift, which ends its test
    and brings the base model back, and the base model wins its test against the champion."""
    live = LearnerState(ONE_LOG)
    rng = random.Random(11)
    log = []

    def control(event) -> None:
        log.append((CONTROL.name, event.model_dump_json().encode()))
        live.apply_control(event)

    def serve(arm: str, p: float) -> None:
        turn = example(arm, len(log), float(rng.random() < p))
        log.append((EXAMPLES.name, turn.model_dump_json().encode()))
        log.extend((CONTROL.name, e.model_dump_json().encode()) for e in live.learn_one(turn).control)

    def until(done, p: dict[str, float], limit: int = 5000) -> None:
        """Serve the live arms in turn until ``done()``."""
        for i in range(limit):
            if done():
                return
            arms = live.router.arms
            serve(arms[i % len(arms)], p[arms[i % len(arms)]])
        raise AssertionError("the story did not happen")

    lifecycle = live.lifecycle
    control(loaded("a"))
    control(loaded("b"))
    until(lambda: len(log) > 150, {"champ": 0.5, "a": 0.5, "b": 0.5})
    assert set(lifecycle.experiments) == {"a", "b"}
    control(AdapterPromoted(event_id="operator-promote-a", occurred_at=T0, source="operator", adapter="a"))
    until(lambda: "b" in lifecycle.ended, {"a": 0.9, "b": 0.1})
    serve("b", 1.0)  # late feedback
    control(loaded("b"))  # the swap controller, restarted, announces what it served again
    control(loaded("c"))
    until(lambda: lifecycle.experiments["c"].decision().n_challenger >= 300, {"a": 0.6, "c": 0.6})
    until(lambda: "champ" in lifecycle.experiments, {"a": 0.6, "c": 0.1})  # c's users change their minds
    until(lambda: lifecycle.champion == "champ", {"a": 0.6, "champ": 0.8})
    for _ in range(20):  # rewards after the story
        serve("champ", 0.8)
    return log


def test_the_learner_and_the_overview_fold_one_control_log_to_the_same_roles(tmp_path):
    log = recorded_log()
    events = [json.loads(value) for topic, value in log if topic == CONTROL.name]
    kinds = [(e["type"], e.get("adapter") or e.get("signal")) for e in events]
    rolled_back_b = kinds.index(("adapter_rolled_back", "b"))
    assert ("adapter_loaded", "b") in kinds[rolled_back_b:], "a late adapter_loaded after the rollback"
    assert kinds.index(("adapter_promoted", "a")) < rolled_back_b, "a promotion while b's test ran"
    assert ("drift_alarm", "reward:c") in kinds and ("adapter_rolled_back", "c") in kinds
    assert ("adapter_promoted", "champ") in kinds, "a verdict the overview reaches too"

    learner = LearnerState(ONE_LOG)
    fold = ArchiveFold(Settings(data_dir=tmp_path, learners=ONE_LOG))
    offsets: dict[str, int] = {}

    def roles(lifecycle) -> tuple:
        return (lifecycle.champion, list(lifecycle.live), {c: t.champion for c, t in lifecycle.experiments.items()},
                dict(lifecycle.ended))  # fmt: skip

    for i, (topic, value) in enumerate(log):
        offsets[topic] = offsets.get(topic, -1) + 1
        learner.handle(topic, 0, offsets[topic], value)
        fold.fold(ArchivedRecord(topic, 0, offsets[topic], 0, None, value, {}))
        if i + 1 == len(log) or log[i + 1][0] == EXAMPLES.name:  # the outputs of an example are in
            assert roles(fold.lifecycle) == roles(learner.lifecycle), f"after record {i}"
            assert learner.router.arms == tuple(learner.lifecycle.live)
    assert roles(fold.lifecycle) == ("champ", ["champ"], {}, {"a": AdapterState.RETIRED, "b": AdapterState.ROLLED_BACK,
                                                              "c": AdapterState.ROLLED_BACK})  # fmt: skip
    assert fold.undecodable == 0
    # The dashboard's view of the same: b stays rolled back, whatever the late announcement said.
    views = {(v.challenger, v.champion): v.status for v in fold.experiment_views()}
    assert views[("b", "champ")] == "restarted" and views[("b", "a")] == "rollback"
    assert views[("c", "a")] == "rollback" and views[("champ", "a")] == "promote"
    assert [e.kind for e in fold.timelines["b"]][-2:] == ["rolled_back", "loaded"]


# Events at the ends of the calendar: the pipeline and the gateway refuse them, but a producer
# writing straight to the topic can still put them in the archive, and the traffic chart must
# still draw (at the calendar's edge).
CALENDAR_ENDS = ("start_of_calendar", "first_day", "end_of_calendar")


def test_the_overview_and_status_render_an_archive_of_poison(sessions, settings):
    import io

    from rich.console import Console

    from app.status import render_status
    from streams.intake import dead_letter

    poison = [case.value for case in corpus() if case.name not in CALENDAR_ENDS]
    seal(sessions, settings, EVENTS.name, [*poison, None, interaction(adapter="champ")])
    markup = dead_letter(reason="unknown_type", detail="Input tag '[/x]' found", raw=b"", received_at=T0,
                         stage="pipeline", max_raw_bytes=0)
    seal(sessions, settings, DEAD_LETTER.name, [markup, b"[" * 5000, b"\xff"])

    overview = OverviewSource(settings, sessions).read()

    assert overview.records_by_topic[EVENTS.name] == len(poison) + 2
    assert overview.dead_letters == {"unknown_type": 1}
    # Not JSON, nested past the parser's recursion limit, or not an object; the other poison parses,
    # and the fold counts only what it reads (the pipeline is what rejects it). Then the two dead letters.
    unreadable = {"oversized_garbage", "binary", "invalid_utf8", "nested_arrays", "nested_objects", "unclosed",
                  "empty", "null", "number", "string", "array_of_numbers", "huge_integer"}
    assert overview.undecodable == len(unreadable) + 2
    out = io.StringIO()
    render_status(overview, Console(file=out, width=200))
    assert "[/x]" in out.getvalue() and "undecodable records" in out.getvalue()
    json.dumps(overview.to_json(), allow_nan=False)


def test_the_overview_renders_events_at_the_ends_of_the_calendar(sessions, settings):
    seal(sessions, settings, EVENTS.name, [case.value for case in corpus() if case.name in CALENDAR_ENDS])
    overview = OverviewSource(settings, sessions).read()
    times = overview.traffic_share.times
    assert times and min(times) >= "0001-01-02" and max(times) <= "9999-12-30 23:59:59"


def test_only_configured_apps_get_a_view_of_their_own(sessions, tmp_path):
    settings = Settings(data_dir=tmp_path, api_keys={"app-a": "key-a"})
    made_up = [interaction(app_id=f"made-up-{i}") for i in range(50)]  # written straight to the topic
    seal(sessions, settings, EVENTS.name, [interaction(app_id="app-a"), *made_up])
    source = OverviewSource(settings, sessions)
    assert source.read().events_accepted["interaction"] == 51  # the operator's view counts every record
    assert source.read("app-a").events_accepted["interaction"] == 1
    assert source.read("made-up-1").events_accepted["interaction"] == 0
    assert set(source._fold.apps) == {"app-a"}  # no totals kept for app ids no key can read
