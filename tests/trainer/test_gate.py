from trainer.config import GateConfig
from trainer.gate import PREFERRED_STYLE_RATE, RARE_SKILL_ACCURACY, WELL_FORMED_RATE, build_suites, is_well_formed, judge
from demo.synthetic_chats import RARE_DOMAIN, generate_chats

PARENT = {PREFERRED_STYLE_RATE: 0.5, WELL_FORMED_RATE: 1.0, RARE_SKILL_ACCURACY: 0.60}


def test_suites_are_deterministic_and_follow_the_gate_seed():
    config = GateConfig()
    suites = build_suites(config)
    assert suites == build_suites(config) and suites.version == build_suites(config).version
    assert build_suites(GateConfig(seed=1)).version != suites.version
    assert len(suites.prompts) == config.heldout_prompts and len(suites.rare_skill) == config.rare_skill_items
    assert all(item.prompt.startswith("Convert ") and item.correct not in item.wrong for item in suites.rare_skill)


def test_rare_skill_drop_beyond_two_points_is_rejected_with_a_reason():
    assert judge(PARENT, {**PARENT, RARE_SKILL_ACCURACY: 0.58}, GateConfig()).passed  # exactly 2 points
    verdict = judge(PARENT, {**PARENT, RARE_SKILL_ACCURACY: 0.575}, GateConfig())
    assert not verdict.passed and verdict.reason.startswith("rare_skill_accuracy fell from 0.600 to 0.575")


def test_collapse_and_preference_loss_are_rejected():
    assert not judge(PARENT, {**PARENT, WELL_FORMED_RATE: 0.9}, GateConfig()).passed
    assert not judge(PARENT, {**PARENT, PREFERRED_STYLE_RATE: 0.4}, GateConfig()).passed
    assert judge(PARENT, {**PARENT, PREFERRED_STYLE_RATE: 0.9, RARE_SKILL_ACCURACY: 0.7}, GateConfig()).passed


def test_well_formed_means_terminated_and_not_looping():
    assert is_well_formed("Cats eat fish and meat.<|im_end|>")
    assert not is_well_formed("Cats eat fish and meat.")  # ran out of budget
    assert not is_well_formed("<|im_end|>")  # empty
    assert not is_well_formed("to the to the to the to the to the<|im_end|>")


def test_rare_domain_is_the_one_the_suite_checks():
    assert RARE_DOMAIN == "units" and any(c.domain == RARE_DOMAIN for c in generate_chats(200, seed=0))


def test_rare_skill_is_held_to_the_base_model_not_to_the_parent():
    # Two points below the parent each time would add up over a chain of promotions.
    step = {**PARENT, RARE_SKILL_ACCURACY: 0.59}
    assert judge(PARENT, step, GateConfig()).passed
    verdict = judge(step, {**PARENT, RARE_SKILL_ACCURACY: 0.575}, GateConfig(), base_rare_skill=0.6)
    assert verdict.reasons == ("rare_skill_accuracy fell from the base model's 0.600 to 0.575 (allowed drop 0.020)",)
    assert judge(step, {**PARENT, RARE_SKILL_ACCURACY: 0.58}, GateConfig(), base_rare_skill=0.6).passed
    # A parent above the base model may lose its gain, down to the floor.
    above = {**PARENT, RARE_SKILL_ACCURACY: 0.65}
    assert judge(above, {**PARENT, RARE_SKILL_ACCURACY: 0.58}, GateConfig(), base_rare_skill=0.6).passed
