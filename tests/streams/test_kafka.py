"""The one Kafka client factory and the control topic's key rule."""

from __future__ import annotations

import ssl
from datetime import datetime, timezone

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import ValidationError

from streams import kafka
from streams.contract import AdapterPromoted, BatchEmitted, DriftAlarm
from streams.kafka import KafkaSecurity, KafkaSettings
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


SASL_SSL = KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="feedloop",
                         sasl_password="s3cret")  # fmt: skip


def test_every_client_and_faust_talk_sasl_over_tls_with_the_same_credentials(built) -> None:
    secured = SETTINGS.model_copy(update={"security": SASL_SSL})
    kafka.producer(secured)
    kafka.consumer(secured, "topic-a", group_id="g")
    kafka.admin(secured)
    faust_options = credentials_to_aiokafka_auth(kafka.faust_broker_options(secured)["broker_credentials"])
    for options in [o for _, _, o in built] + [faust_options]:
        assert options["security_protocol"] == "SASL_SSL"
        assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("SCRAM-SHA-512", "feedloop")
        assert options["sasl_plain_password"] == "s3cret"
        assert options["ssl_context"] is SASL_SSL.ssl_context and options["ssl_context"].check_hostname


def test_tls_without_sasl_and_the_plaintext_default() -> None:
    tls = SETTINGS.model_copy(update={"security": KafkaSecurity(security_protocol="SSL")})
    assert kafka.connection_options(tls)["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert "sasl_mechanism" not in kafka.connection_options(tls)
    assert credentials_to_aiokafka_auth(kafka.faust_broker_options(tls)["broker_credentials"])["security_protocol"] == "SSL"
    assert kafka.connection_options(SETTINGS) == {"bootstrap_servers": "k1:9092,k2:9092", "security_protocol": "PLAINTEXT"}
    assert kafka.faust_broker_options(SETTINGS)["broker_credentials"] is None


def test_secrets_come_from_files_and_a_missing_piece_says_what_to_set(tmp_path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-a-file\n")
    security = KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password_file=secret)
    assert security.sasl_password.get_secret_value() == "from-a-file"
    with pytest.raises(ValidationError, match="not both"):
        KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="x", sasl_password_file=secret)
    with pytest.raises(ValidationError, match="FEEDLOOP_KAFKA__SASL_PASSWORD"):
        KafkaSecurity(security_protocol="SASL_SSL", sasl_username="u")
    with pytest.raises(ValidationError, match="No such file"):
        KafkaSecurity(security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=tmp_path / "absent")
    with pytest.raises(ValidationError, match="SSL_KEYFILE"):
        KafkaSecurity(security_protocol="SSL", ssl_certfile=secret)


def test_settings_read_the_security_from_feedloop_kafka_variables(monkeypatch, tmp_path) -> None:
    from app.settings import Settings

    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-256", "SASL_USERNAME": "app",
                        "SASL_PASSWORD": "pw"}.items():  # fmt: skip
        monkeypatch.setenv(f"FEEDLOOP_KAFKA__{name}", value)
    settings = Settings(data_dir=tmp_path)
    assert settings.kafka.security.sasl_mechanism == "SCRAM-SHA-256"
    assert kafka.connection_options(settings.kafka)["sasl_plain_password"] == "pw"
