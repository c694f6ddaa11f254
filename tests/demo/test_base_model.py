"""The demo keeps its own base model only while it matches the demo's recipe."""

import json

import pytest
from rich.console import Console

import trainer.base_model
from demo.driver import ensure_base_model
from app.settings import Settings


@pytest.fixture
def builds(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.base_model, "build_base_model", lambda path, config, on_step: calls.append(config))
    return calls


def built_with(path, config: dict) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / trainer.base_model.METADATA_FILE).write_text(json.dumps({"config": config}))


def test_a_base_model_from_another_recipe_is_rebuilt_and_the_same_one_kept(tmp_path, builds, monkeypatch):
    monkeypatch.delenv("FEEDLOOP_BASE_MODEL_PATH", raising=False)
    settings = Settings(data_dir=tmp_path, base_model_path=tmp_path / "base")
    ensure_base_model(settings, Console(quiet=True))  # missing: built
    (config,) = builds
    built_with(settings.model_path, config.model_dump())
    ensure_base_model(settings, Console(quiet=True))  # the same recipe: kept
    assert len(builds) == 1
    old = {**config.model_dump(), "phrased_share": 0.0}  # an older checkout's demo base
    (settings.model_path / trainer.base_model.METADATA_FILE).write_text(json.dumps({"config": old}))
    ensure_base_model(settings, Console(quiet=True))
    assert len(builds) == 2 and builds[1].phrased_share > 0


def test_a_model_the_operator_named_is_never_rebuilt(tmp_path, builds, monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BASE_MODEL_PATH", str(tmp_path / "theirs"))
    settings = Settings(data_dir=tmp_path, base_model_path=tmp_path / "theirs")
    built_with(settings.model_path, {"anything": "else"})
    ensure_base_model(settings, Console(quiet=True))
    assert builds == []
