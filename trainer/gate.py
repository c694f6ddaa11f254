"""The evaluation gate: a candidate adapter must not be worse than its parent where it counts.

What counts is the deployment's, not the trainer's, so the gate holds no suite of its own.
Evaluation suites are components plugged into it (:class:`EvalSuite`): each measures one
figure of a model, higher is better, the same way for every candidate. The gate holds the
rule that compares them:

- a **protected** suite is a skill to keep. The candidate may fall at most the suite's
  ``tolerance`` below the **base model**'s score: a fixed floor, so the losses of a chain of
  adapters cannot add up. Not below the parent's: an adapter a few items above the base
  holds no skill its child must keep, and measured in the demo, that check rejected the two
  adapters that had learned the users' new preference best, both well above the floor.
- any other suite is the app's **objective** (a preference): the candidate may fall at most
  its ``tolerance`` below its **parent**, so that no adapter moves away from what the users
  want. Doing better is not required: the A/B test measures that on real traffic.

Whatever is plugged in, the candidate must be numerically sound (:func:`faults`): every
stage's training loss finite, every LoRA weight finite, every score a number. With no suites
that is all the gate checks: it cannot know a deployment's skills or objective, and a
generic stand-in (say, "answers end within N tokens") would reject a real model's long
answers. A sound candidate then passes, and the A/B test, which serves it to a canary share
before anyone else, judges it.

Suites are named in ``GateConfig.suites`` by import path, torchtune-style (``module:factory``
and its options), and built once when the trainer starts (:func:`load_suites`), so a
deployment adds its own without the trainer importing them; the demo plugs in its toy
world's (``demo.suites``) that way. Which suites are protected is the operator's to say: a
spec's ``protected`` marks every suite it builds, whatever the component's default. The
trainer's own components score a JSONL file of items (``trainer.jsonl_suite``), the batch's
held-out feedback (``trainer.heldout_suite``) or an LLM judge's grades (``trainer.judge_suite``).

A suite may measure parts as well as a whole (a figure per cohort): its score is then a
mapping, and each part is a figure of its own, ``<suite>/<part>``, held to the same
reference and tolerance, so the verdict names the part that fell. A suite that cannot
measure this time (too few items, a judge out of reach) raises :class:`Abstain`: its figures
are left out, the reason goes to the lineage, and the rule compares what was measured.
"""

import importlib
import math
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.config import SuiteSpec

# A batch's records by signal ("sft", "pairs", "labels", and its held-out part "heldout_sft", "heldout_pairs",
# "heldout_labels"), as streams.training_data.read_batch gives them.
Records = Mapping[str, Sequence[Any]]


class EvalSuite(Protocol):
    """One figure of a model, higher is better, measured the same way for every candidate."""

    name: str  # the figure's name in the lineage and in the verdict's reasons
    protected: bool  # a skill to keep (held to the base model) or the objective (held to the parent)
    tolerance: float  # how far below its reference the candidate may fall
    version: str  # hash of what the suite asks: scores compare only under one version
    prompts: Collection[str]  # its questions: rehearsal never trains on a chat that holds one

    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records
    ) -> float | Mapping[str, float]:
        """The figure of ``model`` (in eval mode, no gradients), or its figure per part.
        ``records`` are the batch being trained, for an objective that depends on it (the
        style its feedback favours, its held-out feedback). Raises :class:`Abstain` when it
        cannot measure."""
        ...


class Abstain(Exception):
    """Raised by a suite that cannot measure this time; the message says why (the lineage keeps it)."""


@dataclass(frozen=True)
class _Marked:
    """A suite whose spec says whether it is protected: every other attribute is the suite's."""

    suite: EvalSuite
    protected: bool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.suite, name)


# What a SuiteSpec names: called with the spec's options, it returns the suites it builds
# (several can share one source: a file, a seeded draw).
SuiteFactory = Callable[..., Iterable[EvalSuite]]


def load_suites(specs: Sequence[SuiteSpec]) -> tuple[EvalSuite, ...]:
    """The suites ``specs`` name: each factory imported by its path and called with its options,
    each suite marked as its spec's ``protected`` says (None: as the factory built it)."""
    suites: list[EvalSuite] = []
    for spec in specs:
        module, _, attribute = spec.component.partition(":")
        factory: SuiteFactory = operator.attrgetter(attribute)(importlib.import_module(module))
        built = factory(**spec.options)
        suites.extend(built if spec.protected is None else (_Marked(suite, spec.protected) for suite in built))
    return tuple(suites)


@dataclass(frozen=True)
class Evaluation:
    """A model's figures by name (a suite's, or ``<suite>/<part>``), and why a suite measured none."""

    scores: dict[str, float] = field(default_factory=dict)
    abstained: dict[str, str] = field(default_factory=dict)

    def of(self, suites: Sequence[EvalSuite]) -> "Evaluation":
        """The figures and abstentions of ``suites`` alone."""
        return Evaluation(
            {name: value for suite in suites for name, value in figures(suite, self.scores).items()},
            {suite.name: self.abstained[suite.name] for suite in suites if suite.name in self.abstained},
        )


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, suites: Sequence[EvalSuite], records: Records
) -> Evaluation:
    """Every suite's figures of ``model``."""
    names = [suite.name for suite in suites]
    if len(set(names)) < len(names) or any("/" in name for name in names):
        raise ValueError(f"suites need distinct names without '/' (it names a part): {names}")
    model.eval()
    scores, abstained = {}, {}
    for suite in suites:
        try:
            score = suite.score(model, tokenizer, records)
        except Abstain as why:
            abstained[suite.name] = str(why)
            continue
        parts = score.items() if isinstance(score, Mapping) else ((None, score),)
        scores |= {suite.name if part is None else f"{suite.name}/{part}": float(value) for part, value in parts}
    return Evaluation(scores, abstained)


def figures(suite: EvalSuite, scores: Mapping[str, float]) -> dict[str, float]:
    """The figures of ``scores`` that ``suite`` measured: its own, or its parts'."""
    return {name: value for name, value in scores.items() if name == suite.name or name.startswith(f"{suite.name}/")}


def faults(model: torch.nn.Module, losses: Mapping[str, float]) -> tuple[str, ...]:
    """Why the candidate is numerically unsound; empty when it is sound. ``losses``: each
    stage's training loss. A diverged run ends in NaN weights that load, serve and answer
    garbage; no suite is needed to see it."""
    reasons = [f"the {stage} stage's training loss is {loss}"
               for stage, loss in losses.items() if not math.isfinite(loss)]  # fmt: skip
    if not all(torch.isfinite(weight).all() for name, weight in model.named_parameters() if "lora_" in name):
        reasons.append("the candidate's LoRA weights are not all finite")
    return tuple(reasons)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) or None


def judge(
    suites: Sequence[EvalSuite],
    candidate: Mapping[str, float],
    parent: Mapping[str, float],
    base: Mapping[str, float],
    unsound: Sequence[str] = (),
) -> Verdict:
    """Pass unless the candidate is ``unsound`` (:func:`faults`) or a figure fell by more than its
    suite's tolerance below its reference: ``base`` (the base model's scores; the parent's own
    when the parent is the base model) for a protected suite, ``parent`` for the objective.
    A figure measured on one side only (its suite abstained on the other) is not compared."""
    reasons = list(unsound)
    for suite in suites:
        whose, references = ("the base model's", base) if suite.protected else ("the parent's", parent)
        for name, score in figures(suite, candidate).items():
            reference = references.get(name)
            if not math.isfinite(score):
                reasons.append(f"{name} is {score}")
            # A small epsilon keeps float noise (0.5 - 0.48 = 0.0200000001) from tripping an exact limit.
            elif reference is not None and reference - score > suite.tolerance + 1e-9:
                reasons.append(f"{name} fell from {whose} {reference:.3f} to {score:.3f} "
                               f"(allowed drop {suite.tolerance:.3f})")  # fmt: skip
    return Verdict(not reasons, tuple(reasons))
