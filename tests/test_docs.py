"""Documentation claims that code can check."""

from pathlib import Path

from app.settings import PipelineSettings, Settings
from streams.topics import ALL_TOPICS

DOCS = Path(__file__).parents[1] / "docs"


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    names = [f"FEEDLOOP_{name.upper()}" for name in Settings.model_fields if name != "pipeline"]
    names += [f"FEEDLOOP_PIPELINE__{name.upper()}" for name in PipelineSettings.model_fields]
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_every_topic_is_documented():
    text = (DOCS / "events.md").read_text()
    assert all(topic.name in text for topic in ALL_TOPICS)
