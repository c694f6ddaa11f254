"""Settings come from FEEDLOOP_* variables, typed and checked."""

import pytest
from pydantic import ValidationError

from app.gateway.auth import ApiKeys
from app.settings import Settings


def test_defaults_are_embedded_and_local(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.uses_embedded_broker
    assert settings.bootstrap_servers == "127.0.0.1:19092"
    assert settings.store_url == f"sqlite:///{tmp_path}/data/feedloop.db"
    assert settings.gateway_host == "127.0.0.1"


def test_relative_paths_are_read_against_the_working_directory_once(monkeypatch, tmp_path):
    # vLLM runs in the temp dir and child processes may not share the cwd: paths must be absolute.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEEDLOOP_ADAPTER_DIR", "shared/adapters")
    settings = Settings()
    assert settings.model_path == tmp_path / "data" / "models" / "base"
    assert settings.adapters_path == tmp_path / "shared" / "adapters"
    assert settings.keys_path.is_absolute() and settings.archive_dir.is_absolute()


def test_environment_points_at_real_kafka_and_postgres(monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BROKER", "kafka://k1:9092,k2:9092")
    monkeypatch.setenv("FEEDLOOP_DATABASE_URL", "postgresql+psycopg://u:p@db/feedloop")
    monkeypatch.setenv("FEEDLOOP_API_KEYS", '{"chat-web": "s3cret", "chat-ios": "other"}')
    settings = Settings()
    assert not settings.uses_embedded_broker
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.store_url == "postgresql+psycopg://u:p@db/feedloop"
    keys = ApiKeys(settings.api_keys)
    assert keys.app_for_key("other") == "chat-ios"
    assert keys.app_for_key("s3cre") is None
    assert "s3cret" not in repr(settings)  # secrets never show in logs


def test_bad_broker_url_is_explained(monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BROKER", "localhost:9092")
    with pytest.raises(ValidationError, match="kafka://host:port"):
        Settings()


def test_a_copy_derives_its_stores_from_its_own_fields(tmp_path):
    settings = Settings(data_dir=tmp_path / "one", embedded_broker_port=9101)
    assert settings.objects.url.endswith("/one") and settings.bootstrap_servers.endswith(":9101")
    copy = settings.model_copy(update={"data_dir": tmp_path / "two", "embedded_broker_port": 9102})
    assert copy.objects.url.endswith("/two") and copy.objects.local_path("keys") == tmp_path / "two" / "keys"
    assert copy.bootstrap_servers.endswith(":9102") and copy.kafka.bootstrap_servers.endswith(":9102")
    assert copy.adapter_store is not settings.adapter_store
    assert settings.objects.url.endswith("/one")  # the original keeps its own
