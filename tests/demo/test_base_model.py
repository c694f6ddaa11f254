"""The tiny model of the toy world, and the demo keeping its own only while it matches the demo's recipe."""

import json

import pytest
from rich.console import Console

import demo.base_model
from app.settings import Settings
from demo.base_model import DEMO_CHATS, ToyChats, build_tiny_model, ensure_base_model
from demo.synthetic_chats import RARE_DOMAIN, generate_chats
from trainer import rehearsal
from trainer.base_model import METADATA_FILE, BaseModelConfig


@pytest.fixture
def builds(monkeypatch):
    calls = []
    monkeypatch.setattr(demo.base_model, "build_tiny_model",
                        lambda path, chats, config, on_step: calls.append((chats, config)))  # fmt: skip
    return calls


def built_with(path, metadata: dict) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / METADATA_FILE).write_text(json.dumps(metadata))


def test_a_base_model_from_another_recipe_is_rebuilt_and_the_same_one_kept(tmp_path, builds, monkeypatch):
    monkeypatch.delenv("FEEDLOOP_BASE_MODEL_PATH", raising=False)
    settings = Settings(data_dir=tmp_path, base_model_path=tmp_path / "base")
    ensure_base_model(settings, Console(quiet=True))  # missing: built
    ((chats, config),) = builds
    assert chats == DEMO_CHATS and chats.detailed_share == 0.25 and chats.phrased_share > 0
    built_with(settings.model_path, {"config": config.model_dump(), "data": chats.data})
    ensure_base_model(settings, Console(quiet=True))  # the same recipe: kept
    assert len(builds) == 1
    # An older checkout's demo base: plain prompts, or the chats' knobs inside the model config.
    for old in ({"config": config.model_dump(), "data": {**chats.data, "phrased_share": 0.0}},
                {"config": {**config.model_dump(), "num_chats": 2000, "detailed_share": 0.25}}):  # fmt: skip
        (settings.model_path / METADATA_FILE).write_text(json.dumps(old))
        ensure_base_model(settings, Console(quiet=True))
    assert builds[1:] == [(DEMO_CHATS, config)] * 2


def test_a_model_the_operator_named_is_never_rebuilt(tmp_path, builds, monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BASE_MODEL_PATH", str(tmp_path / "theirs"))
    settings = Settings(data_dir=tmp_path, base_model_path=tmp_path / "theirs")
    built_with(settings.model_path, {"anything": "else"})
    ensure_base_model(settings, Console(quiet=True))
    assert builds == []


def test_the_tiny_model_keeps_its_rare_skill_chats_for_rehearsal_and_names_its_data(tmp_path):
    chats, config = ToyChats(count=100, detailed_share=0.25), BaseModelConfig(seed=3, train_steps=2)
    path = build_tiny_model(tmp_path / "tiny", chats, config)
    generated = generate_chats(100, 3, detailed_share=0.25)
    assert rehearsal.load(path) == [c.messages for c in generated if c.domain == RARE_DOMAIN]
    metadata = json.loads((path / METADATA_FILE).read_text())
    assert metadata["data"] == {"source": "demo.synthetic_chats", "count": 100, "detailed_share": 0.25,
                                "phrased_share": 0.0}  # fmt: skip
    assert metadata["config"] == config.model_dump()
