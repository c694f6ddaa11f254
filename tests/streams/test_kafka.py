"""The one Kafka client factory and the control topic's key rule."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from streams import kafka
from streams.contract import AdapterPromoted, BatchEmitted, DriftAlarm
from streams.kafka import KafkaSettings
from streams.topics import control_key

AT = datetime(2026, 12, 1, tzinfo=timezone.utc)
SETTINGS = KafkaSettings(bootstrap_servers="k1:9092,k2:9092", session_timeout_s=12.0)


class Recorder:
    """Stands in for an aiokafka client class: records what the factory built it with."""

    built: list[tuple[str, tuple, dict]] = []

    def __init__(self, *args, **kwargs) -> None:
        Recorder.built.append((type(self).__name__, args, kwargs))


@pytest.fixture
def built(monkeypatch) -> list:
    # The clients are replaced because constructing real ones needs no broker but leaves them
    # unclosed; what is under test is only what the factory hands them.
    Recorder.built = []
    for name in ("AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"):
        monkeypatch.setattr(kafka, name, type(name, (Recorder,), {}))
    return Recorder.built


def test_every_client_role_gets_the_same_connection_options(built, monkeypatch) -> None:
    # A connection setting added to connection_options (TLS, SASL) must reach every role.
    monkeypatch.setattr(kafka, "connection_options",
                        lambda k: {"bootstrap_servers": k.bootstrap_servers, "security_protocol": "SSL"})
    kafka.producer(SETTINGS)
    kafka.consumer(SETTINGS, "topic-a", group_id="g")
    kafka.admin(SETTINGS)
    assert [name for name, _, _ in built] == ["AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"]
    for _, _, options in built:
        assert options["bootstrap_servers"] == "k1:9092,k2:9092"
        assert options["security_protocol"] == "SSL"


def test_a_role_may_override_its_defaults_but_not_the_connection(built) -> None:
    kafka.producer(SETTINGS, acks=1, linger_ms=5, bootstrap_servers="elsewhere:1")
    (_, _, options), = built
    assert options["acks"] == 1 and options["linger_ms"] == 5
    assert options["bootstrap_servers"] == "k1:9092,k2:9092"  # the connection is the settings', always
    built.clear()
    kafka.producer(SETTINGS)
    assert built[0][2]["acks"] == "all"


def test_consumers_commit_by_hand_from_the_earliest_offset_with_the_group_timings(built) -> None:
    kafka.consumer(SETTINGS, "topic-a", "topic-b", group_id="g", max_poll_records=7)
    (_, topics, options), = built
    assert topics == ("topic-a", "topic-b")
    assert options["group_id"] == "g" and options["max_poll_records"] == 7
    assert options["enable_auto_commit"] is False and options["auto_offset_reset"] == "earliest"
    assert (options["session_timeout_ms"], options["heartbeat_interval_ms"]) == (12_000, 2_000)


def test_faust_gets_the_same_brokers_and_timings() -> None:
    options = kafka.faust_broker_options(SETTINGS)
    assert options["broker"] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert (options["broker_session_timeout"], options["broker_heartbeat_interval"]) == (12.0, 2.0)


def test_heartbeat_is_a_sixth_of_the_session_but_at_least_half_a_second() -> None:
    assert KafkaSettings(bootstrap_servers="x:1", session_timeout_s=6).heartbeat_interval_s == 1.0
    assert KafkaSettings(bootstrap_servers="x:1", session_timeout_s=1).heartbeat_interval_s == 0.5


def test_control_events_are_keyed_by_their_subject() -> None:
    promoted = AdapterPromoted(event_id="promote-1", occurred_at=AT, source="t", adapter="ad-3", previous_champion="base")
    emitted = BatchEmitted(event_id="b-1.emitted", occurred_at=AT, source="t", batch_id="b-1", path="batches/b-1",
                           manifest_sha256="x" * 64, example_count=3, trigger="manual")  # fmt: skip
    alarm = DriftAlarm(event_id="drift-0001", occurred_at=AT, source="t", signal="reward:base", detector="adwin",
                       detected_at=AT, details={})  # fmt: skip
    assert [control_key(e) for e in (promoted, emitted, alarm)] == [b"ad-3", b"b-1", b"reward:base"]
