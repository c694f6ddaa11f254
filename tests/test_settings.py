"""Settings come from FEEDLOOP_* variables, typed and checked."""

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_defaults_are_embedded_and_local(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.uses_embedded_broker
    assert settings.bootstrap_servers == "127.0.0.1:19092"
    assert settings.store_url == "sqlite:///data/feedloop.db"
    assert settings.gateway_host == "127.0.0.1"


def test_environment_points_at_real_kafka_and_postgres(monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BROKER", "kafka://k1:9092,k2:9092")
    monkeypatch.setenv("FEEDLOOP_DATABASE_URL", "postgresql+psycopg://u:p@db/feedloop")
    monkeypatch.setenv("FEEDLOOP_API_KEYS", '{"chat-web": "s3cret", "chat-ios": "other"}')
    settings = Settings()
    assert not settings.uses_embedded_broker
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.store_url == "postgresql+psycopg://u:p@db/feedloop"
    assert settings.app_for_key("other") == "chat-ios"
    assert settings.app_for_key("s3cre") is None
    assert "s3cret" not in repr(settings)  # secrets never show in logs


def test_bad_broker_url_is_explained(monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BROKER", "localhost:9092")
    with pytest.raises(ValidationError, match="kafka://host:port"):
        Settings()
