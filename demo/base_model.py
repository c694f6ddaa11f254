"""The tiny base model of the toy world: the trainer's builder, fed the demo's synthetic chats.

feedloop serves any causal LM it is given by path; the tiny Llama it can build offline is
the demo's (and the tests'), small enough for CI and the CPU build of vLLM, and it knows just
enough of the toy world to make feedback loops measurable (docs/model.md). What it is
pretrained on is therefore the demo's to say: :class:`ToyChats` generates the chats
(``demo.synthetic_chats``, seeded by the model's own seed, so one seed still gives one
model) and :func:`build_tiny_model` hands them to ``trainer.base_model``, with the rare
skill's chats for rehearsal, the skill the gate protects. ``feedloop model init`` builds one;
:func:`ensure_base_model` keeps the demo's own in line with the demo's recipe.
"""

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app.settings import Settings
from demo.population import PopulationConfig
from demo.synthetic_chats import RARE_DOMAIN, generate_chats
from trainer.base_model import METADATA_FILE, BaseModelConfig, StepCallback, build_base_model

SOURCE = "demo.synthetic_chats"  # how feedloop_model.json names the chats


class ToyChats(BaseModel):
    """Which synthetic chats the tiny model is pretrained on."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(2000, description="Synthetic chats to pretrain on.")
    detailed_share: float = Field(
        0.5, ge=0, le=1, description="Share of those chats answered in the detailed style; the rest are concise."
    )
    phrased_share: float = Field(
        0.0, ge=0, le=1, description="Share of their prompts worded with an opener or closer ('Hi! ... Thanks!')."
    )

    @property
    def data(self) -> dict:
        """What feedloop_model.json records of them."""
        return {"source": SOURCE, **self.model_dump()}


# The demo's own base model writes concise answers three times out of four: what a population
# comes to want is rarely what a base model does by habit (docs/demo.md, "The base model").
# It is pretrained on prompts worded as the population words them: a model never shown
# "Hi! ... Thanks!" answered such prompts detailed half the time, whatever its style mix.
DEMO_CHATS = ToyChats(detailed_share=0.25, phrased_share=PopulationConfig().phrasing_share)


def build_tiny_model(
    out_dir: str | Path,
    chats: ToyChats = ToyChats(),
    config: BaseModelConfig = BaseModelConfig(),
    on_step: StepCallback | None = None,
) -> Path:
    """Generate the chats and build the model from them into ``out_dir``; returns its path."""
    generated = generate_chats(chats.count, config.seed, detailed_share=chats.detailed_share,
                               phrased_share=chats.phrased_share)  # fmt: skip
    return build_base_model(
        out_dir,
        [chat.messages for chat in generated],
        config,
        # What adapters must keep able to do: the rare skill, which feedback seldom exercises.
        rehearsal_chats=[chat.messages for chat in generated if chat.domain == RARE_DOMAIN],
        data=chats.data,
        on_step=on_step,
    )


def ensure_base_model(settings: Settings, console: Console) -> None:
    """Build the demo's base model if it is missing, or if it is the demo's own and was built
    with another recipe (an older checkout's): the report's figures hold only for this one.
    A model named by FEEDLOOP_BASE_MODEL_PATH is never rebuilt."""
    config = BaseModelConfig()
    if (settings.model_path / "config.json").exists():
        metadata = settings.model_path / METADATA_FILE
        own = "FEEDLOOP_BASE_MODEL_PATH" not in os.environ
        if not own or (metadata.exists() and _recipe(metadata) == (config.model_dump(), DEMO_CHATS.data)):
            return
        console.print(f"{settings.model_path} was built with another recipe: rebuilding it")
    with Progress(TextColumn("[bold]building the tiny base model"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("pretraining", total=config.train_steps)
        build_tiny_model(settings.model_path, DEMO_CHATS, config,
                         on_step=lambda step, loss: progress.update(task, completed=step))  # fmt: skip


def _recipe(metadata_file: Path) -> tuple:
    metadata = json.loads(metadata_file.read_text())
    return metadata.get("config"), metadata.get("data")
