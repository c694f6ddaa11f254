"""The toy world's suites: deterministic, held out from rehearsal, and plugged in by the demo's config."""

from app.settings import Settings
from demo.driver import demo_settings
from demo.suites import (
    PREFERRED_STYLE_RATE,
    RARE_SKILL_ACCURACY,
    WELL_FORMED_RATE,
    is_well_formed,
    preferred_style,
    toy_suites,
)
from demo.synthetic_chats import CONCISE, DETAILED, RARE_DOMAIN, generate_chats
from streams.contract import Message
from streams.training_data import LabelRecord, PreferenceRecord
from trainer.gate import load_suites


def test_suites_are_deterministic_and_follow_their_seed():
    style, well_formed, rare = toy_suites()
    assert (style, well_formed, rare) == toy_suites()
    assert [s.version for s in toy_suites()] == [style.version, well_formed.version, rare.version]
    assert toy_suites(seed=1)[0].version != style.version and toy_suites(seed=1)[2].version != rare.version
    assert len(style.prompts) == 60 and style.prompts == well_formed.prompts and len(rare.items) == 120
    assert all(item.prompt.startswith("Convert ") and item.correct not in item.wrong for item in rare.items)
    assert rare.prompts == tuple(item.prompt for item in rare.items)


def test_the_objective_is_the_style_and_the_skills_to_keep_are_protected():
    style, well_formed, rare = toy_suites(max_rare_skill_drop=0.03)
    assert [(s.name, s.protected, s.tolerance) for s in (style, well_formed, rare)] == [
        (PREFERRED_STYLE_RATE, False, 0.05),
        (WELL_FORMED_RATE, True, 0.05),
        (RARE_SKILL_ACCURACY, True, 0.03),
    ]


def test_the_preferred_style_is_the_one_the_batchs_feedback_favours():
    prompt = [Message(role="user", content="What is 2 plus 2?")]

    def pair(chosen, rejected):
        return PreferenceRecord(example_id=chosen[:8], cohort="all", domain="math", source="regenerate",
                                event_ids=["e"], prompt=prompt, chosen=chosen, rejected=rejected)  # fmt: skip

    def label(completion, desirable):
        return LabelRecord(example_id="l", cohort="all", domain="math", source="thumbs", event_ids=["e"],
                           prompt=prompt, completion=completion, desirable=desirable)  # fmt: skip

    detailed = "Sure! 2 plus 2 is 4.\n- Start with 2.\n- Add 2.\nHope this helps!"
    concise = "2 plus 2 is 4."
    records = {"sft": [], "pairs": [pair(detailed, concise)], "labels": [label(detailed, True), label(concise, True)]}
    assert preferred_style(records) == DETAILED
    assert preferred_style({"sft": [], "pairs": [], "labels": []}) == CONCISE  # no votes: the first style


def test_well_formed_means_terminated_and_not_looping():
    assert is_well_formed("Cats eat fish and meat.<|im_end|>")
    assert not is_well_formed("Cats eat fish and meat.")  # ran out of budget
    assert not is_well_formed("<|im_end|>")  # empty
    assert not is_well_formed("to the to the to the to the to the<|im_end|>")


def test_rare_domain_is_the_one_the_suite_checks():
    assert RARE_DOMAIN == "units" and any(c.domain == RARE_DOMAIN for c in generate_chats(200, seed=0))


def test_the_demo_plugs_its_suites_into_the_gate_through_the_trainers_config(monkeypatch):
    monkeypatch.delenv("FEEDLOOP_TRAINER__GATE", raising=False)
    suites = load_suites(demo_settings(Settings()).trainer.gate.suites)
    assert [s.name for s in suites] == [PREFERRED_STYLE_RATE, WELL_FORMED_RATE, RARE_SKILL_ACCURACY]
    assert len(suites[0].prompts) == 20 and len(suites[2].items) == 120
