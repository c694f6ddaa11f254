"""Documentation claims that code can check."""

from pathlib import Path

from app.settings import LearnerSettings, PipelineSettings, Settings
from streams.topics import ALL_TOPICS

DOCS = Path(__file__).parents[1] / "docs"


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    nested = {"pipeline": PipelineSettings, "learners": LearnerSettings}
    names = [f"FEEDLOOP_{name.upper()}" for name in Settings.model_fields if name not in nested]
    for prefix, model in nested.items():
        names += [f"FEEDLOOP_{prefix.upper()}__{name.upper()}" for name in model.model_fields]
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_every_topic_is_documented():
    text = (DOCS / "events.md").read_text()
    assert all(topic.name in text for topic in ALL_TOPICS)
