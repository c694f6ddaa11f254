"""The demo's simulated population: a deterministic stream, hidden preferences, valid feedback."""

import doctest
import random
from collections import Counter
from datetime import datetime, timezone
from typing import get_args

import pytest
from pydantic import ValidationError

import demo.population
from app.gateway.chat_request import ChatExtras
from demo.population import (
    AFTER_DRIFT,
    BEFORE_DRIFT,
    CANARY_TYPES,
    MINORITY,
    Population,
    PopulationConfig,
    Prompt,
    german_iban,
    luhn_check_digit,
    normalized,
    style_profile,
)
from demo.synthetic_chats import CONCISE, DETAILED, STYLES, UNITS
from streams.contract import Feedback, FeedbackKind, Interaction
from streams.pii import PiiType, Scrubber

SCRUBBER = Scrubber()
POPULATION = Population(PopulationConfig(seed=11, interactions=3000))
TURNS = list(POPULATION.turns())


def other(style: str) -> str:
    return DETAILED if style == CONCISE else CONCISE


def feedback(turn, action) -> Feedback:
    """The contract's Feedback event for an action, as the demo will build it."""
    return Feedback(
        event_id=f"fb-{turn.index:06d}-{turn.attempt}", occurred_at=datetime.now(timezone.utc), app_id="demo-chat",
        session_id=turn.session_id, interaction_id=f"i-{turn.index:06d}-{turn.attempt}", **action.fields,
    )  # fmt: skip


def test_docstring_examples_run():
    result = doctest.testmod(demo.population)
    assert result.attempted > 0 and result.failed == 0


# --- the stream ------------------------------------------------------------------------------


def test_same_seed_gives_the_same_stream_and_reactions_and_another_seed_does_not():
    config = PopulationConfig(seed=11, interactions=3000)
    again = Population(config)
    assert list(again.turns()) == TURNS
    assert list(again.turns()) == TURNS  # a second pass over the same population too
    answer = "Sure! An answer.\n- one\n- two\nHope this helps!"
    reactions = [POPULATION.react(t, answer) for t in TURNS[:300]]
    assert [again.react(t, answer) for t in TURNS[:300]] == reactions
    # Reactions are seeded per turn: asking in another order changes nothing.
    assert [again.react(t, answer) for t in reversed(TURNS[:300])][::-1] == reactions
    different = list(Population(PopulationConfig(seed=12, interactions=3000)).turns())
    assert [t.text for t in different] != [t.text for t in TURNS]


def test_users_are_split_into_exact_cohort_shares_and_turns_follow_them():
    population = Population(PopulationConfig(users=300))
    assert Counter(population.user_cohorts.values()) == {"a": 165, "b": 105, MINORITY: 30}
    shares = Counter(t.cohort for t in TURNS)
    for cohort, share in POPULATION.config.cohort_shares.items():
        assert abs(shares[cohort] / len(TURNS) - share) < 0.04, shares
    # Every turn's cohort is its user's, and it travels in the routing context.
    assert all(t.cohort == POPULATION.user_cohorts[t.user_id] == t.context["cohort"] for t in TURNS)
    assert all(t.context == {"domain": t.prompt.domain, "cohort": t.cohort} for t in TURNS)


def test_the_rare_skill_is_rare_overall_and_the_minority_asks_for_it_more():
    units = [t for t in TURNS if t.prompt.domain == UNITS]
    assert 0.025 <= len(units) / len(TURNS) <= 0.055
    by_cohort = {c: [t for t in TURNS if t.cohort == c] for c in ("a", MINORITY)}
    share = {c: sum(t.prompt.domain == UNITS for t in ts) / len(ts) for c, ts in by_cohort.items()}
    assert share[MINORITY] > 2 * share["a"], share


def test_sessions_group_turns_of_one_user():
    sessions = {}
    for turn in TURNS:
        assert sessions.setdefault(turn.session_id, turn.user_id) == turn.user_id
    assert len(TURNS) / 4 < len(sessions) < len(TURNS)


def test_prompts_are_worded_variously_so_the_repeat_filter_leaves_training_data():
    distinct = {normalized(t.prompt.text) for t in TURNS}
    assert len(distinct) > 0.5 * len(TURNS)


def test_turns_fit_the_event_contract_and_the_chat_gateways_request():
    for turn in [*TURNS[:200], POPULATION.regenerate(TURNS[0], "i-000000")]:
        extras = ChatExtras.model_validate(turn.feedloop)
        assert (extras.session_id, extras.regenerates) == (turn.session_id, turn.regenerates)
        assert (extras.user_id, extras.context.cohort) == (turn.user_id, turn.cohort)
        Interaction(
            event_id=f"ev-{turn.index:06d}", occurred_at=datetime.now(timezone.utc), app_id="demo-chat",
            user_id=turn.user_id, session_id=turn.session_id, interaction_id=f"i-{turn.index:06d}", adapter="base",
            prompt=turn.messages, response="ok", context=extras.context, regenerates=turn.regenerates,
        )  # fmt: skip


# --- the hidden preferences and the drift ----------------------------------------------------------


def test_the_drift_point_changes_every_cohorts_preferred_style():
    assert POPULATION.shift_index == 1500
    assert {t.phase for t in TURNS[:1500]} == {BEFORE_DRIFT} and {t.phase for t in TURNS[1500:]} == {AFTER_DRIFT}
    for cohort in POPULATION.config.cohort_shares:
        before, after = (POPULATION.preferred_style(cohort, phase) for phase in (BEFORE_DRIFT, AFTER_DRIFT))
        assert before != after
    # The same answer that satisfied a user before the shift does not after it.
    turn = TURNS[0]
    liked = turn.prompt.answer(POPULATION.preferred_style(turn.cohort, BEFORE_DRIFT))
    assert POPULATION.satisfies(turn.cohort, BEFORE_DRIFT, turn.prompt, liked)
    assert not POPULATION.satisfies(turn.cohort, AFTER_DRIFT, turn.prompt, liked)


def test_without_drift_every_turn_stays_in_the_first_phase():
    population = Population(PopulationConfig(interactions=200, drift_fraction=1.0))
    assert {t.phase for t in population.turns()} == {BEFORE_DRIFT}


def test_the_minority_shares_the_majoritys_style_but_gives_less_explicit_feedback():
    config = POPULATION.config
    assert config.preferred_styles[MINORITY] == config.preferred_styles["a"] == config.preferred_styles["b"]
    assert config.explicit_rate[MINORITY] < config.explicit_rate["a"]
    explicit = {"thumbs", "rating", "edit", "report"}
    rate = {}
    for cohort in ("a", MINORITY):
        turns = [t for t in TURNS if t.cohort == cohort]
        rate[cohort] = sum(any(a.kind in explicit for a in POPULATION.react(t, "x")) for t in turns) / len(turns)
    assert rate[MINORITY] < 0.7 * rate["a"], rate


def test_a_units_answer_satisfies_only_with_the_right_value():
    prompt = Prompt(UNITS, "Convert 5 kilometers to miles.", "5 kilometers is about 3.1 miles.",
                    "Sure! 5 kilometers is about 3.1 miles.\n- a\n- b\nHope this helps!")  # fmt: skip
    assert prompt.fact == "3.1 miles"
    assert POPULATION.satisfies("a", BEFORE_DRIFT, prompt, "5 kilometers is about 3.1 miles.")
    for wrong in ("5 kilometers is about 13.1 miles.", "5 kilometers is about 3.1 pounds.", "It is about 3.2 miles."):
        assert not POPULATION.satisfies("a", BEFORE_DRIFT, prompt, wrong), wrong
    # Right value, wrong style: still not what the user wants.
    assert not POPULATION.satisfies("a", AFTER_DRIFT, prompt, "5 kilometers is about 3.1 miles.")
    # Every units prompt of the stream knows its fact, and its canonical answers state it.
    for turn in (t for t in TURNS if t.prompt.domain == UNITS):
        for style in STYLES:
            assert POPULATION.satisfies(turn.cohort, BEFORE_DRIFT if style == CONCISE else AFTER_DRIFT,
                                        turn.prompt, turn.prompt.answer(style))  # fmt: skip


def test_empty_or_looping_answers_satisfy_nobody():
    turn = TURNS[0]
    assert not POPULATION.satisfies(turn.cohort, turn.phase, turn.prompt, "   ")
    assert not POPULATION.satisfies(turn.cohort, turn.phase, turn.prompt, "cats eat fish " * 4)


def test_expected_reward_follows_the_preferred_style_and_weighs_a_profile():
    for phase in (BEFORE_DRIFT, AFTER_DRIFT):
        preferred = POPULATION.preferred_style("b", phase)
        assert POPULATION.expected_reward("b", phase, preferred) == 1.0
        assert POPULATION.expected_reward("b", phase, other(preferred)) == 0.0
        assert POPULATION.profile_reward("b", phase, {preferred: 0.8, other(preferred): 0.2}) == pytest.approx(0.8)
    assert style_profile(["a.", "b.", "Sure! c.\n- x\n- y\nHope this helps!", "d."]) == {CONCISE: 0.75, DETAILED: 0.25}


def test_config_must_describe_every_cohort():
    with pytest.raises(ValidationError, match="preferred_styles"):
        PopulationConfig(preferred_styles={"a": (CONCISE, DETAILED)})
    with pytest.raises(ValidationError, match="minority_cohort"):
        PopulationConfig(minority_cohort="nobody")


# --- behaviour -----------------------------------------------------------------------------------


def answers_for(turn, rng):
    """The answer a model might give: the wanted one, the other style, or junk."""
    draw = rng.random()
    if draw < 0.45:
        return turn.prompt.answer(POPULATION.preferred_style(turn.cohort, turn.phase)), True
    if draw < 0.9:
        return turn.prompt.answer(other(POPULATION.preferred_style(turn.cohort, turn.phase))), False
    return "", False


def test_every_action_is_a_valid_feedback_event_and_every_kind_occurs():
    rng = random.Random(0)
    kinds = Counter()
    for turn in TURNS:
        answer, _ = answers_for(turn, rng)
        for action in POPULATION.react(turn, answer):
            event = feedback(turn, action)  # raises if the action breaks a value rule
            kinds[event.kind] += 1
    # Not a score (its meaning is an app's configuration) nor a pairwise choice (the demo shows one answer).
    assert set(kinds) == set(get_args(FeedbackKind)) - {"score", "pairwise"}, kinds
    assert kinds["report"] < kinds["edit"] < kinds["dwell"]  # reports are rare, implicit signals common


def test_reactions_follow_the_hidden_preference():
    rng = random.Random(1)
    signals = {True: Counter(), False: Counter()}
    turns = {True: 0, False: 0}
    for turn in TURNS:
        answer, satisfied = answers_for(turn, rng)
        turns[satisfied] += 1
        for action in POPULATION.react(turn, answer):
            key = action.kind
            if key == "thumbs":
                key = "thumbs+1" if action.value == 1 else "thumbs-1"
            elif key == "dwell":
                key = "long dwell" if action.value >= 10 else "short dwell"
            signals[satisfied][key] += 1
            if action.kind == "edit":
                assert action.text == turn.prompt.answer(POPULATION.preferred_style(turn.cohort, turn.phase))
    liked, disliked = signals[True], signals[False]
    assert liked["thumbs+1"] > 5 * liked["thumbs-1"] and disliked["thumbs-1"] > 5 * disliked["thumbs+1"]
    assert liked["copy"] / turns[True] > 0.3 > 0.1 > disliked["copy"] / turns[False]
    assert disliked["regenerate"] / turns[False] > 0.25 > 0.1 > liked["regenerate"] / turns[True]
    assert liked["long dwell"] > 4 * liked["short dwell"] and disliked["short dwell"] > 4 * disliked["long dwell"]
    assert liked["edit"] < 0.2 * disliked["edit"]


def test_a_regeneration_is_the_same_request_pointing_at_the_replaced_one():
    turn = TURNS[5]
    retry = POPULATION.regenerate(turn, "i-000005")
    assert (retry.index, retry.attempt, retry.regenerates) == (turn.index, 1, "i-000005")
    same = ("user_id", "session_id", "cohort", "phase", "prompt", "text")
    assert [getattr(retry, name) for name in same] == [getattr(turn, name) for name in same]
    last = POPULATION.regenerate(retry, "i-000005-1")
    # After max_regenerations the user abandons instead of asking again.
    exhausted = [POPULATION.regenerate(POPULATION.regenerate(t, "x"), "y") for t in TURNS]
    kinds = [a.kind for t in exhausted for a in POPULATION.react(t, "")]
    assert "regenerate" not in kinds and "abandon" in kinds
    with pytest.raises(ValueError, match="regenerated 2 times"):
        POPULATION.regenerate(last, "i-000005-2")


# --- PII canaries ------------------------------------------------------------------------------


def test_canaries_of_every_type_are_seeded_and_recorded():
    population = Population(PopulationConfig(seed=3, interactions=2000, pii_share=0.2))
    carrying = [t for t in population.turns() if t.canary]
    assert 0.15 < len(carrying) / 2000 < 0.25
    # The population seeds the types it has templates for (the scrubber knows more since the
    # address, SSN, date-of-birth, passport and handle detectors: tests/streams/pii_corpus);
    # adding templates would change every seeded run of the demo.
    assert {t.canary.pii_type for t in carrying} == set(CANARY_TYPES) < {str(t) for t in PiiType}
    assert population.canaries_seeded == list(dict.fromkeys(t.canary.value for t in carrying))
    assert all(t.canary.value in t.text and t.canary.sentence in t.text for t in carrying)
    assert Population(PopulationConfig(interactions=500, pii_share=0)).canaries_seeded == []


@pytest.mark.parametrize("seed", range(4))
def test_the_projects_scrubber_catches_every_canary_and_leaves_clean_prompts_alone(seed):
    population = Population(PopulationConfig(seed=seed, interactions=1500, pii_share=0.3))
    for turn in population.turns():
        rephrased = [a.text for a in population.react(turn, "") if a.kind == "rephrase"]
        for text in [turn.text, *rephrased]:
            result = SCRUBBER.scrub(text)
            if turn.canary is None:
                assert result.text == text and result.total == 0, text
            else:
                # Exactly the canary is replaced, by its type's placeholder.
                placeholder = PiiType(turn.canary.pii_type).placeholder
                assert result.text == text.replace(turn.canary.value, placeholder), text
                assert turn.canary.value not in result.text


def test_card_and_iban_canaries_are_valid_numbers():
    def luhn_ok(number):  # independent of demo.population
        digits = [int(c) for c in number if c.isdigit()][::-1]
        return sum(d if i % 2 == 0 else sum(divmod(d * 2, 10)) for i, d in enumerate(digits)) % 10 == 0

    def iban_ok(iban):
        compact = iban.replace(" ", "")
        return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1

    assert luhn_check_digit("7992739871") == "3" and german_iban("370400440532013000") == "DE89 3704 0044 0532 0130 00"
    population = Population(PopulationConfig(seed=5, interactions=3000, pii_share=0.5))
    cards = [t.canary.value for t in population.turns() if t.canary and t.canary.pii_type == "CARD"]
    ibans = [t.canary.value for t in population.turns() if t.canary and t.canary.pii_type == "IBAN"]
    assert len(cards) > 50 and all(map(luhn_ok, cards))
    assert len(ibans) > 50 and all(map(iban_ok, ibans))


# --- the judge and held-out prompts ------------------------------------------------------------


def test_the_judge_prefers_the_preferred_style_in_each_phase():
    clear = 1 - POPULATION.config.judge_noise / 2
    for turn in TURNS[:100]:
        for phase in (BEFORE_DRIFT, AFTER_DRIFT):
            wanted = turn.prompt.answer(POPULATION.preferred_style(turn.cohort, phase))
            unwanted = turn.prompt.answer(other(POPULATION.preferred_style(turn.cohort, phase)))
            assert POPULATION.prefer(turn.user_id, phase, wanted, unwanted, prompt=turn.prompt) == clear
            assert POPULATION.prefer(turn.cohort, phase, unwanted, wanted, prompt=turn.prompt) == 1 - clear
            assert POPULATION.prefer(turn.cohort, phase, wanted, wanted, prompt=turn.prompt) == 0.5


def test_the_judge_ranks_well_formed_then_correct_then_style():
    prompt = Prompt(UNITS, "Convert 5 kilometers to miles.", "5 kilometers is about 3.1 miles.",
                    "Sure! 5 kilometers is about 3.1 miles.\n- a\n- b\nHope this helps!")  # fmt: skip
    right_unwanted_style = prompt.detailed
    wrong_wanted_style = "5 kilometers is about 3.1 pounds."
    assert POPULATION.prefer("a", BEFORE_DRIFT, right_unwanted_style, wrong_wanted_style, prompt=prompt) > 0.9
    assert POPULATION.prefer("a", BEFORE_DRIFT, wrong_wanted_style, "", prompt=prompt) > 0.9
    with pytest.raises(ValueError, match="neither a user nor a cohort"):
        POPULATION.prefer("nobody", BEFORE_DRIFT, "a", "b", prompt=prompt)


def test_heldout_prompts_never_occur_in_the_training_stream():
    population = Population(PopulationConfig(seed=11, interactions=20_000))
    trained = {normalized(t.prompt.text) for t in population.turns()}
    for cohort in (None, "a", MINORITY):
        heldout = population.heldout_prompts(300, cohort)
        assert len(heldout) == 300 and not trained & {normalized(p.text) for p in heldout}
        assert heldout == population.heldout_prompts(300, cohort)  # deterministic
    assert population.heldout_prompts(50) != Population(PopulationConfig(seed=12)).heldout_prompts(50)


def test_heldout_prompts_follow_the_cohorts_domain_mix():
    units = {c: sum(p.domain == UNITS for p in POPULATION.heldout_prompts(1000, c)) for c in ("a", MINORITY)}
    assert units[MINORITY] > 2 * units["a"] > 0, units


def test_the_simulated_grader_is_biased_noisy_and_blind_to_the_users():
    """It wants its own style whoever asks: against users who want the other style it mostly
    disagrees, against users who want its style it mostly agrees; never always (noise)."""
    config = POPULATION.config
    graded = {True: [], False: []}  # the user's preferred style is the grader's -> (grade, user satisfied)
    for turn in TURNS:
        for style in STYLES:
            answer = turn.prompt.answer(style)
            grade = POPULATION.grade(turn, answer)
            assert grade == POPULATION.grade(turn, answer)  # seeded per turn
            if grade is not None:
                same = POPULATION.preferred_style(turn.cohort, turn.phase) == config.grader_style
                graded[same].append((grade, POPULATION.satisfies(turn.cohort, turn.phase, turn.prompt, answer)))
    share = sum(map(len, graded.values())) / (2 * len(TURNS))
    assert abs(share - config.grader_rate) < 0.03
    agreement = {same: sum(g == float(ok) for g, ok in pairs) / len(pairs) for same, pairs in graded.items()}
    expected_noise = config.grader_noise / 2  # a coin flip agrees half the time
    assert agreement[False] < 0.5 - 0.3 and abs(agreement[True] - (1 - expected_noise)) < 0.04, agreement
    assert POPULATION.grade(TURNS[0], "") in (None, 0.0, 1.0)
    with pytest.raises(ValueError, match="grader styles"):
        PopulationConfig(grader_style="verbose")
