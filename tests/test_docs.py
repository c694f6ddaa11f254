"""Documentation claims that code can check."""

import ast
import json
import re
import typing
from pathlib import Path

from pydantic import BaseModel, SecretStr

from app.settings import Settings, env_name
from streams.contract import ControlEvent
from streams.topics import ALL_TOPICS

DOCS = Path(__file__).parents[1] / "docs"


def variable_of(prefix: str, name: str, field) -> str:
    """A field's environment variable (nested groups joined by '__')."""
    return env_name(name, field) if prefix == "FEEDLOOP" else f"{prefix}__{name.upper()}"


def variables(model: type[BaseModel], prefix: str = "FEEDLOOP") -> list[str]:
    """Every environment variable a settings model reads, nested groups joined by '__'."""
    names = []
    for name, field in model.model_fields.items():
        variable = variable_of(prefix, name, field)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += variables(field.annotation, variable)
        else:
            names.append(variable)
    return names


def defaults(model: BaseModel, prefix: str = "FEEDLOOP") -> dict[str, object]:
    """Every environment variable and its default, read from a default instance: a nested
    group's defaults are those of the instance its parent builds (DPO's learning rate is not
    StageConfig's)."""
    out = {}
    for name, field in type(model).model_fields.items():
        variable = variable_of(prefix, name, field)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out |= defaults(value, variable)
        else:
            out[variable] = value
    return out


def default_settings() -> Settings:
    """Settings with every field at its default: no environment, no .env file."""
    return Settings.model_construct()


def documented_defaults(text: str) -> dict[str, str]:
    """The default column of each `| `FEEDLOOP_...` | `default` | meaning |` row."""
    return dict(re.findall(r"^\| `(FEEDLOOP_[A-Z0-9_]+)` \| `([^`]*)` \|", text, flags=re.MULTILINE))


def parse_default(cell: str) -> object:
    """A documented default as a value: JSON, a Python literal (True, None, 1e-05), or text."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(cell)
        except (ValueError, SyntaxError):
            pass
    return cell


def plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):  # documented as the JSON list an environment variable takes
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v.get_secret_value() if isinstance(v, SecretStr) else v) for k, v in value.items()}
    return value


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    names = variables(Settings)
    assert "FEEDLOOP_TRAINER__SFT__EPOCHS" in names and "FEEDLOOP_PIPELINE__BATCH_SIZE" in names
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_every_documented_default_is_the_settings_default():
    text = (DOCS / "configuration.md").read_text()
    documented = documented_defaults(text)
    actual = defaults(default_settings())
    assert actual["FEEDLOOP_TRAINER__DPO__LEARNING_RATE"] == 5e-4 != actual["FEEDLOOP_TRAINER__SFT__LEARNING_RATE"]
    assert set(documented) == set(actual), "every setting has one row with its default in backticks"
    wrong = {name: (cell, plain(actual[name])) for name, cell in documented.items()
             if parse_default(cell) != plain(actual[name])}  # fmt: skip
    assert not wrong, f"docs/configuration.md defaults (documented, actual): {wrong}"


def test_the_documented_default_check_catches_a_wrong_one():
    row = "| `FEEDLOOP_TRAINER__KTO__LEARNING_RATE` | `0.001` | AdamW peak rate. |"
    (cell,) = documented_defaults(row).values()
    assert parse_default(cell) != defaults(default_settings())["FEEDLOOP_TRAINER__KTO__LEARNING_RATE"]
    assert [parse_default(c) for c in ("True", "None", "1e-05", "data", '["base"]', "{}")] == [
        True, None, 1e-05, "data", ["base"], {}]  # fmt: skip


def test_every_control_event_is_documented():
    text = (DOCS / "events.md").read_text()
    section = text[text.index("## Control events"):text.index("## Review requests")]
    union = typing.get_args(ControlEvent)[0]  # Annotated[Union[...], Field(discriminator)]
    types = [model.model_fields["type"].default for model in typing.get_args(union)]
    assert len(types) >= 9 and "adapter_pinned" in types
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(listed) == sorted(types), "docs/events.md: one row per control event type"


def test_every_topic_is_documented():
    text = (DOCS / "events.md").read_text()
    assert all(topic.name in text for topic in ALL_TOPICS)
