"""The reward table (streams/rewards.py, docs/pipeline.md): each feedback kind's reward and channel,
and how the signals of one interaction combine into one reward per channel."""

import typing

import pytest
from pydantic import TypeAdapter, ValidationError

from streams.contract import Annotation, Feedback, FeedbackKind
from streams.rewards import EXPLICIT_KINDS, NumericScore, ScoreRule, channel_rewards
from tests.factories import ANY_TURN, annotation, feedback


def signal(kind: str, **fields) -> Feedback:
    return Feedback.model_validate(feedback(ANY_TURN, kind, **fields))


def judged(score: float | None, source: str = "human") -> Annotation:
    return Annotation.model_validate({**annotation(ANY_TURN), "source": source, "score": score})


# (kind, its fields, channel, reward): one row per rule of the table, with the edges of each range.
TABLE = [
    ("thumbs", {"value": 1}, "explicit", 1.0),
    ("thumbs", {"value": -1}, "explicit", 0.0),
    ("rating", {"value": 1}, "explicit", 0.0),
    ("rating", {"value": 2}, "explicit", 0.25),
    ("rating", {"value": 3}, "explicit", 0.5),
    ("rating", {"value": 4.5}, "explicit", 0.875),
    ("rating", {"value": 5}, "explicit", 1.0),
    ("edit", {"text": "the corrected answer"}, "explicit", 0.0),
    ("report", {}, "explicit", 0.0),
    ("report", {"text": "offensive"}, "explicit", 0.0),
    ("copy", {}, "implicit", 1.0),
    ("regenerate", {}, "implicit", 0.0),
    ("abandon", {}, "implicit", 0.0),
    ("rephrase", {}, "implicit", 0.2),
    ("rephrase", {"text": "what I meant was"}, "implicit", 0.2),
    ("dwell", {"value": 0}, "implicit", 0.3),  # a glance: skipped
    ("dwell", {"value": 1.99}, "implicit", 0.3),
    ("dwell", {"value": 2}, "implicit", 0.5),  # read, neither
    ("dwell", {"value": 9.99}, "implicit", 0.5),
    ("dwell", {"value": 10}, "implicit", 0.7),  # a long read: used
    ("dwell", {"value": 600}, "implicit", 0.7),
]


@pytest.mark.parametrize(("kind", "fields", "channel", "reward"), TABLE,
                         ids=[f"{k}-{next(iter(f.values()), '')}" for k, f, _, _ in TABLE])
def test_each_feedback_kind_has_its_reward_on_its_channel_and_nothing_elsewhere(kind, fields, channel, reward):
    rewards = channel_rewards([signal(kind, **fields)], [])
    assert rewards == {**{"explicit": None, "implicit": None, "self_eval": None}, channel: pytest.approx(reward)}


def test_the_table_covers_every_kind_of_the_contract_and_names_the_explicit_ones():
    # A score's reward is configured (below); a pairwise choice is a preference, never a reward.
    assert {k for k, *_ in TABLE} == set(typing.get_args(FeedbackKind)) - {"score", "pairwise"}
    # The join counts these for the whole explicit window, the others only for the implicit one.
    assert EXPLICIT_KINDS == {k for k, _, channel, _ in TABLE if channel == "explicit"} | {"score", "pairwise"}
    assert EXPLICIT_KINDS == {"thumbs", "rating", "edit", "report", "score", "pairwise"}


SCORES = TypeAdapter(dict[str, ScoreRule]).validate_python({
    "helpful": {"type": "numeric", "min": 0, "max": 10},
    "effort": {"type": "numeric", "min": 5, "max": 1, "channel": "implicit"},  # lower is better
    "correct": {"type": "boolean"},
    "hallucinated": {"type": "boolean", "inverted": True},
    "tone": {"type": "categorical", "labels": {"warm": 1, "neutral": 0.6, "curt": 0}},
})

# (name, value or label, channel, reward): each rule, its edges, and what it cannot read.
SCORED = [
    ("helpful", {"value": 7.5}, "explicit", 0.75),
    ("helpful", {"value": 0}, "explicit", 0.0),
    ("helpful", {"value": 12}, "explicit", 1.0),  # clamped to the scale
    ("helpful", {"label": "great"}, None, None),  # a numeric rule reads numbers only
    ("effort", {"value": 2}, "implicit", 0.75),
    ("correct", {"label": "true"}, "explicit", 1.0),
    ("correct", {"label": "False"}, "explicit", 0.0),
    ("correct", {"value": 1}, "explicit", 1.0),
    ("correct", {"value": 0.5}, None, None),
    ("correct", {"label": "maybe"}, None, None),
    ("hallucinated", {"label": "true"}, "explicit", 0.0),
    ("hallucinated", {"label": "false"}, "explicit", 1.0),
    ("tone", {"label": "neutral"}, "explicit", 0.6),
    ("tone", {"label": "rude"}, None, None),  # not in the map
    ("unconfigured", {"value": 1}, None, None),  # no rule: no reward
]


@pytest.mark.parametrize(("name", "fields", "channel", "reward"), SCORED,
                         ids=[f"{n}-{next(iter(f.values()))}" for n, f, _, _ in SCORED])
def test_a_score_is_rewarded_by_its_configured_rule_on_its_channel(name, fields, channel, reward):
    rewards = channel_rewards([signal("score", name=name, **fields)], [], SCORES)
    expected = {"explicit": None, "implicit": None, "self_eval": None}
    if channel is not None:
        expected[channel] = pytest.approx(reward)
    assert rewards == expected


def test_the_configured_rule_decides_a_scores_reward_and_it_averages_with_the_other_kinds():
    thumbs_up, helpful = signal("thumbs", value=1), signal("score", name="helpful", value=4)
    assert channel_rewards([thumbs_up, helpful], [], SCORES)["explicit"] == pytest.approx((1 + 0.4) / 2)
    stricter = {"helpful": NumericScore(min=2, max=6)}
    assert channel_rewards([thumbs_up, helpful], [], stricter)["explicit"] == pytest.approx((1 + 0.5) / 2)
    assert channel_rewards([thumbs_up, helpful], [])["explicit"] == 1.0  # no rule: the score counts for nothing


def test_a_pairwise_choice_gives_no_reward():
    choice = signal("pairwise", rejected_interaction_id="i-2")
    assert channel_rewards([choice], []) == {"explicit": None, "implicit": None, "self_eval": None}


def test_a_numeric_rule_needs_a_scale():
    with pytest.raises(ValidationError, match="max != min"):
        NumericScore(min=1, max=1)


@pytest.mark.parametrize(("source", "channel"), [("human", "explicit"), ("model", "self_eval")])
def test_an_annotation_score_is_the_reward_of_its_sources_channel(source, channel):
    assert channel_rewards([], [judged(0.9, source)])[channel] == pytest.approx(0.9)
    assert channel_rewards([], [judged(0.9, source)]) == {"explicit": None, "implicit": None, "self_eval": None,
                                                          channel: pytest.approx(0.9)}
    # A label without a score says nothing about the reward.
    assert channel_rewards([], [judged(None, source)]) == {"explicit": None, "implicit": None, "self_eval": None}


COMBINED = [
    # Each channel is the mean of its own signals, unweighted, whatever their kind.
    ([("thumbs", {"value": 1}), ("thumbs", {"value": -1})], [], (0.5, None, None)),
    ([("thumbs", {"value": 1}), ("rating", {"value": 3}), ("edit", {"text": "fixed"})], [], (0.5, None, None)),
    ([("copy", {}), ("regenerate", {}), ("dwell", {"value": 12})], [], (None, 1.7 / 3, None)),
    # A human annotation is one more explicit signal; a judge's score has a channel of its own.
    ([("thumbs", {"value": 1})], [(0.4, "human"), (0.2, "model"), (0.6, "model")], (0.7, None, 0.4)),
    # Channels never mix: a copy does not soften a thumbs down.
    ([("thumbs", {"value": -1}), ("copy", {})], [], (0.0, 1.0, None)),
    # No signal at all is no reward on any channel, not a neutral 0.5.
    ([], [], (None, None, None)),
    ([], [(None, "human"), (None, "model")], (None, None, None)),
]


@pytest.mark.parametrize(("signals", "annotations", "expected"), COMBINED)
def test_the_signals_of_one_interaction_combine_per_channel(signals, annotations, expected):
    rewards = channel_rewards([signal(kind, **fields) for kind, fields in signals],
                              [judged(score, source) for score, source in annotations])
    assert rewards == {channel: None if reward is None else pytest.approx(reward)
                       for channel, reward in zip(("explicit", "implicit", "self_eval"), expected)}
