"""The gate's rule on suites plugged in: protected suites floored at the base model, the objective at the parent."""

import math
from dataclasses import dataclass

import pytest
import torch

from trainer.config import GateConfig, SuiteSpec
from trainer.gate import evaluate, faults, judge, load_suites


@dataclass(frozen=True)
class Fixed:
    """A suite that reads a fixed figure off the model, for the rule alone."""

    name: str
    protected: bool
    tolerance: float
    version: str = "v1"
    prompts: tuple[str, ...] = ()

    def score(self, model, tokenizer, records) -> float:
        return model.figures[self.name]


def fixed_suites(tolerance: float = 0.02) -> list[Fixed]:
    """A suite factory as a config names one: tests.trainer.test_gate:fixed_suites."""
    return [Fixed("objective", protected=False, tolerance=0.05), Fixed("skill", protected=True, tolerance=tolerance)]


SUITES = fixed_suites()
PARENT = {"objective": 0.5, "skill": 0.60}


def test_a_protected_suite_may_not_fall_beyond_its_tolerance_below_the_base_model():
    base = {"skill": 0.60}
    assert judge(SUITES, {**PARENT, "skill": 0.58}, PARENT, base).passed  # exactly its 2 points
    verdict = judge(SUITES, {**PARENT, "skill": 0.575}, PARENT, base)
    assert not verdict.passed
    assert verdict.reasons == ("skill fell from the base model's 0.600 to 0.575 (allowed drop 0.020)",)


def test_the_floor_is_the_base_models_not_the_parents():
    # Two points below the parent each time would add up over a chain of promotions.
    step = {**PARENT, "skill": 0.59}
    assert not judge(SUITES, {**PARENT, "skill": 0.575}, step, {"skill": 0.6}).passed
    # A parent above the base model may lose its gain, down to the floor.
    above = {**PARENT, "skill": 0.65}
    assert judge(SUITES, {**PARENT, "skill": 0.58}, above, {"skill": 0.6}).passed


def test_the_objective_is_held_to_the_parent():
    base = {"skill": 0.60}
    verdict = judge(SUITES, {**PARENT, "objective": 0.4}, {**PARENT, "objective": 0.5}, base)
    assert verdict.reasons == ("objective fell from the parent's 0.500 to 0.400 (allowed drop 0.050)",)
    assert judge(SUITES, {**PARENT, "objective": 0.9, "skill": 0.7}, PARENT, base).passed


def test_an_unsound_candidate_or_a_score_that_is_no_number_fails_whatever_the_suites():
    assert not judge([], {}, {}, {}, unsound=("the sft stage's training loss is nan",)).passed
    verdict = judge(SUITES, {**PARENT, "skill": math.nan}, PARENT, {"skill": 0.6})
    assert verdict.reasons == ("skill is nan",)


def test_with_no_suites_a_sound_candidate_passes():
    assert judge([], {}, {}, {}, faults(torch.nn.Linear(2, 2), {"sft": 0.7, "dpo": 0.4})).passed


def test_faults_are_non_finite_losses_and_lora_weights():
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.tensor([1.0, math.inf]))
    assert faults(model, {"sft": 0.5, "dpo": math.nan}) == (
        "the dpo stage's training loss is nan",
        "the candidate's LoRA weights are not all finite",
    )


def test_suites_are_built_from_the_components_the_config_names():
    spec = SuiteSpec(component="tests.trainer.test_gate:fixed_suites", options={"tolerance": 0.1})
    config = GateConfig(suites=[spec])
    suites = load_suites(config.suites)
    assert [(s.name, s.protected, s.tolerance) for s in suites] == [("objective", False, 0.05), ("skill", True, 0.1)]
    assert load_suites(GateConfig().suites) == ()
    with pytest.raises(ValueError):
        SuiteSpec(component="not a path")


def test_evaluate_scores_every_suite_and_refuses_two_of_one_name():
    model = torch.nn.Linear(1, 1)
    model.figures = {"objective": 0.3, "skill": 0.7}
    assert evaluate(model, None, SUITES, {}) == model.figures and not model.training
    with pytest.raises(ValueError, match="share a name"):
        evaluate(model, None, SUITES + SUITES[:1], {})
