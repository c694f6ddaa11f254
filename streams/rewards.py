"""From feedback to rewards: one number in [0, 1] per channel, by documented rules.

Three channels, because they differ in how much they can be trusted (the loss-weight learner
estimates that online): **explicit** (what the user said: thumbs, rating, edit, report, and
human annotations), **implicit** (what the user did: copy, regenerate, abandon, dwell,
rephrase) and **self_eval** (a model judge's annotation score). A channel with no signal is
``None``, not 0.5: "nobody said anything" is not "neutral". docs/pipeline.md has the table.

Custom scores (feedback kind ``score``) mean what each app says they mean, so their rule is
configuration (:class:`PipelineSettings.scores <streams.config.PipelineSettings>`): per score
name a :data:`ScoreRule` gives the reward and the channel, and the score then counts like any
built-in kind on that channel. A score with no rule, or a value its rule cannot read, gives no
reward: a guessed meaning would be worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streams.contract import Annotation, Feedback

RewardChannel = Literal["explicit", "implicit"]

# Explicit: the response was good (1) or bad (0) in the user's own words.
_EXPLICIT = {
    "thumbs": lambda f: 1.0 if f.value > 0 else 0.0,
    "rating": lambda f: (f.value - 1.0) / 4.0,
    "edit": lambda f: 0.0,  # the user had to correct it
    "report": lambda f: 0.0,
}

# Implicit: behaviour that hints at quality. Copying is the strongest positive; regenerating
# or abandoning the strongest negatives. Dwell is weak either way: a glance (<2 s) hints the
# answer was skipped, a long read (>=10 s) that it was used.
_IMPLICIT = {
    "copy": lambda f: 1.0,
    "regenerate": lambda f: 0.0,
    "abandon": lambda f: 0.0,
    "rephrase": lambda f: 0.2,
    "dwell": lambda f: 0.3 if f.value < 2 else (0.7 if f.value >= 10 else 0.5),
}


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: RewardChannel = Field("explicit", description="The reward channel the score counts on.")


class NumericScore(_Rule):
    """A number on a scale: ``min`` gives 0, ``max`` gives 1, linear between, clamped outside."""

    type: Literal["numeric"] = "numeric"
    min: float
    max: float

    @model_validator(mode="after")
    def _scale(self) -> NumericScore:
        if self.max == self.min:
            raise ValueError("a numeric score needs max != min (max < min: lower is better)")
        return self

    def reward(self, value: float | None, label: str | None) -> float | None:
        if value is None:
            return None
        return min(1.0, max(0.0, (value - self.min) / (self.max - self.min)))


class BooleanScore(_Rule):
    """True gives 1 and false 0 (``inverted``: the other way round, e.g. 'hallucinated').
    Read from the label ``true``/``false`` (any case) or the value 1/0."""

    type: Literal["boolean"] = "boolean"
    inverted: bool = False

    def reward(self, value: float | None, label: str | None) -> float | None:
        if label is not None:
            truth = {"true": True, "false": False}.get(label.lower())
        else:
            truth = {1: True, 0: False}.get(value)
        return None if truth is None else float(truth != self.inverted)


class CategoricalScore(_Rule):
    """Each label its reward; a label not listed gives none."""

    type: Literal["categorical"] = "categorical"
    labels: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(min_length=1)

    def reward(self, value: float | None, label: str | None) -> float | None:
        return self.labels.get(label) if label is not None else None


ScoreRule = Annotated[Union[NumericScore, BooleanScore, CategoricalScore], Field(discriminator="type")]


def signal_reward(feedback: Feedback, scores: Mapping[str, ScoreRule]) -> tuple[RewardChannel, float] | None:
    """The channel and reward of one feedback event; None when it gives none (a pairwise
    preference, a score without a rule or with a value its rule cannot read)."""
    if feedback.kind in _EXPLICIT:
        return "explicit", _EXPLICIT[feedback.kind](feedback)
    if feedback.kind in _IMPLICIT:
        return "implicit", _IMPLICIT[feedback.kind](feedback)
    rule = scores.get(feedback.name) if feedback.kind == "score" else None
    reward = rule.reward(feedback.value, feedback.label) if rule else None
    return None if reward is None else (rule.channel, reward)


def channel_rewards(
    feedback: list[Feedback], annotations: list[Annotation], scores: Mapping[str, ScoreRule] | None = None
) -> dict[str, float | None]:
    """Mean reward per channel over the signals an interaction received."""
    rewarded = [r for f in feedback if (r := signal_reward(f, scores or {})) is not None]
    explicit = [reward for channel, reward in rewarded if channel == "explicit"]
    explicit += [a.score for a in annotations if a.source == "human" and a.score is not None]
    implicit = [reward for channel, reward in rewarded if channel == "implicit"]
    judged = [a.score for a in annotations if a.source == "model" and a.score is not None]
    return {
        "explicit": fmean(explicit) if explicit else None,
        "implicit": fmean(implicit) if implicit else None,
        "self_eval": fmean(judged) if judged else None,
    }


def kind_of(feedback: Feedback) -> str:
    """The feedback's entry in an example's ``feedback_kinds``: a score is ``score:<name>``, so
    an example says which scores it got, rewarded by a rule or not."""
    return f"score:{feedback.name}" if feedback.kind == "score" else feedback.kind


# The kinds the join counts for the whole explicit window (the rest: the implicit window). A
# score or a pairwise choice is something someone said about this answer, whatever channel
# the score's rule puts its reward on.
EXPLICIT_KINDS = frozenset({*_EXPLICIT, "score", "pairwise"})
