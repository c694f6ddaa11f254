"""Documentation claims that code can check."""

from pathlib import Path

from pydantic import BaseModel

from app.settings import Settings
from streams.topics import ALL_TOPICS

DOCS = Path(__file__).parents[1] / "docs"


def variables(model: type[BaseModel], prefix: str = "FEEDLOOP") -> list[str]:
    """Every environment variable a settings model reads, nested groups joined by '__'."""
    names = []
    for name, field in model.model_fields.items():
        separator = "_" if prefix == "FEEDLOOP" else "__"
        variable = f"{prefix}{separator}{name.upper()}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += variables(field.annotation, variable)
        else:
            names.append(variable)
    return names


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    names = variables(Settings)
    assert "FEEDLOOP_TRAINER__SFT__EPOCHS" in names and "FEEDLOOP_PIPELINE__BATCH_SIZE" in names
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_every_topic_is_documented():
    text = (DOCS / "events.md").read_text()
    assert all(topic.name in text for topic in ALL_TOPICS)
