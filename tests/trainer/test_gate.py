"""The gate's rule on suites plugged in: protected suites floored at the base model, the objective at the parent."""

import math
from dataclasses import dataclass

import pytest
import torch

from trainer.config import GateConfig, SuiteSpec
from trainer.gate import Abstain, Evaluation, evaluate, faults, judge, load_suites


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
    assert evaluate(model, None, SUITES, {}) == Evaluation(model.figures, {}) and not model.training
    with pytest.raises(ValueError, match="distinct names"):
        evaluate(model, None, SUITES + SUITES[:1], {})


@dataclass(frozen=True)
class PerCohort(Fixed):
    """A suite that measures parts (cohorts), or abstains when the model has none."""

    def score(self, model, tokenizer, records):
        if not model.figures:
            raise Abstain("no items")
        return model.figures


def test_a_suites_parts_are_figures_of_their_own_and_the_verdict_names_the_part_that_fell():
    suite = PerCohort("accuracy", protected=False, tolerance=0.05)
    model = torch.nn.Linear(1, 1)
    model.figures = {"all": 0.8, "minority": 0.5}
    parent = evaluate(model, None, [suite], {})
    assert parent == Evaluation({"accuracy/all": 0.8, "accuracy/minority": 0.5}, {})
    candidate = {"accuracy/all": 0.78, "accuracy/minority": 0.3}
    assert judge([suite], candidate, parent.scores, {}).reasons == (
        "accuracy/minority fell from the parent's 0.500 to 0.300 (allowed drop 0.050)",)  # fmt: skip


def test_a_suite_that_abstains_is_left_out_with_its_reason_and_not_compared():
    suite = PerCohort("accuracy", protected=False, tolerance=0.05)
    model = torch.nn.Linear(1, 1)
    model.figures = {}
    abstained = evaluate(model, None, [suite], {})
    assert abstained == Evaluation({}, {"accuracy": "no items"})
    assert abstained.of([suite]) == abstained and abstained.of([]) == Evaluation()
    assert judge([suite], {}, {"accuracy/all": 0.9}, {}).passed  # the candidate measured nothing
    assert judge([suite], {"accuracy/all": 0.1}, {}, {}).passed  # nor did the parent


def test_the_spec_marks_its_suites_protected_or_not_whatever_the_factory_says():
    spec = SuiteSpec(component="tests.trainer.test_gate:fixed_suites", protected=True)
    objective, skill = load_suites([spec])
    assert (objective.protected, skill.protected) == (True, True)
    assert (objective.name, objective.tolerance, objective.version) == ("objective", 0.05, "v1")
    model = torch.nn.Linear(1, 1)
    model.figures = {"objective": 0.3, "skill": 0.7}
    assert objective.score(model, None, {}) == 0.3
    # Held to the base model now: the parent's higher score is no reference.
    assert not judge([objective], {"objective": 0.3}, {"objective": 0.3}, {"objective": 0.5}).passed
    assert [s.protected for s in load_suites([spec.model_copy(update={"protected": False})])] == [False, False]
