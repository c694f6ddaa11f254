"""The gate's built-in objective: the users' own feedback that no candidate trained on.

The curator holds a share of each batch's examples out of training
(``FEEDLOOP_PIPELINE__HELDOUT_SHARE``, ``streams.curator.is_heldout``) and writes them to the
batch's held-out part. These suites score a model on them, higher is better:

- ``heldout_preference_accuracy``, on the held-out pairs: the share of pairs in which the
  model raised the chosen answer's likelihood more than the rejected one's, over the base
  model, per token (:func:`trainer.likelihood.gains`: DPO's implicit reward, the "reward
  accuracy" trl logs, length-normalised so that an answer does not win by its length); ties
  count half, so the base model reads 0.5. It is what DPO optimises, measured on pairs DPO
  never saw. Raw likelihood (chosen likelier than rejected) was tried and rejected: it reads
  an answer's form, not the preference. On the tiny model's concise-versus-detailed pairs
  the base model "preferred" the detailed answer on every pair per token, so a candidate
  trained on the flipped pairs could not fall below its parent's 0.0.
- ``heldout_label_agreement``, on the held-out labels: the share of (desirable, undesirable)
  label pairs in which the desirable response gained more (the same gain), ties counting
  half: the ROC AUC of the gain as a classifier of the users' verdicts, 0.5 is chance (and
  the base model). A threshold rule (above the median: "good") was rejected: with mostly
  good labels half of them sit below any median, so it reads about 0.5 for every model.

Each is reported overall (part ``all``) and per cohort (``cohort=<name>``), each part a
figure of its own (``trainer.gate``), so that a candidate that serves the majority better
and a minority worse is rejected, and the verdict names the cohort. A figure needs
``min_items`` items (pairs; labels of each kind): with fewer overall the suite abstains (the
lineage says why, the candidate is not held to it), and a cohort with fewer is not
reported. Both are the objective, held to the parent, unless a spec marks them protected.
"""

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.data import chat_messages
from trainer.gate import Abstain, Records
from trainer.likelihood import gains

PREFERENCE_ACCURACY = "heldout_preference_accuracy"
LABEL_AGREEMENT = "heldout_label_agreement"
ALL = "all"


class HeldoutSuiteConfig(BaseModel):
    """The options of ``trainer.heldout_suite:heldout_suites`` in a gate suite spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: float = Field(0.05, ge=0, description="How far below the parent's a figure may fall (a share).")
    min_items: int = Field(
        10, ge=1, description="Fewest items of a figure: pairs, or labels of each kind; fewer: abstain (or no cohort)."
    )
    by_cohort: bool = Field(True, description="Report each cohort's figure beside the overall one.")


def by_part(records: Sequence, by_cohort: bool) -> dict[str, list[int]]:
    """The rows of each part: all of them, and each cohort's."""
    parts: dict[str, list[int]] = defaultdict(list)
    for row, record in enumerate(records):
        parts[ALL].append(row)
        if by_cohort:
            parts[f"cohort={record.cohort}"].append(row)
    return dict(parts)


def wins(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Share of comparisons ``better`` wins, a tie counting half: the base model, which gains
    nothing on any answer, reads 0.5, chance, on both suites."""
    return ((better > worse).float() + 0.5 * (better == worse).float()).mean().item()


def agreement(gained: torch.Tensor, desirable: torch.Tensor) -> float:
    """Share of (desirable, undesirable) pairs whose desirable one gained more."""
    return wins(gained[desirable][:, None], gained[~desirable][None, :])


@dataclass(frozen=True)
class _HeldoutSuite:
    """A figure of the batch's held-out ``signal``, overall and per cohort."""

    config: HeldoutSuiteConfig
    name: ClassVar[str]
    signal: ClassVar[str]
    protected: ClassVar[bool] = False
    prompts: ClassVar[tuple[str, ...]] = ()  # held out by the curator, not known ahead

    @property
    def tolerance(self) -> float:
        return self.config.tolerance

    @property
    def version(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.config.model_dump_json()}".encode()).hexdigest()[:12]

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> dict[str, float]:
        items = list(records.get(self.signal, ()))
        parts = {part: rows for part, rows in by_part(items, self.config.by_cohort).items()
                 if self.enough([items[row] for row in rows])}  # fmt: skip
        if ALL not in parts:
            raise Abstain(f"{self.counted(items)} in this batch's held-out part, fewer than min_items="
                          f"{self.config.min_items}; hold out more (FEEDLOOP_PIPELINE__HELDOUT_SHARE) or cut "
                          "larger batches")  # fmt: skip
        measured = self.measure(model, tokenizer, items)
        return {part: self.figure(measured, rows) for part, rows in parts.items()}

    def enough(self, items: Sequence) -> bool: ...
    def counted(self, items: Sequence) -> str: ...
    def measure(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence) -> object: ...
    def figure(self, measured: object, rows: list[int]) -> float: ...


@dataclass(frozen=True)
class PreferenceAccuracy(_HeldoutSuite):
    name: ClassVar[str] = PREFERENCE_ACCURACY
    signal: ClassVar[str] = "heldout_pairs"

    def enough(self, items: Sequence) -> bool:
        return len(items) >= self.config.min_items

    def counted(self, items: Sequence) -> str:
        return f"{len(items)} pairs"

    def measure(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence) -> torch.Tensor:
        gained = gains(model, tokenizer, [(chat_messages(r.prompt), a) for r in items for a in (r.chosen, r.rejected)])
        return gained.view(-1, 2)

    def figure(self, measured: torch.Tensor, rows: list[int]) -> float:
        return wins(measured[rows, 0], measured[rows, 1])


@dataclass(frozen=True)
class LabelAgreement(_HeldoutSuite):
    name: ClassVar[str] = LABEL_AGREEMENT
    signal: ClassVar[str] = "heldout_labels"

    def enough(self, items: Sequence) -> bool:
        desirable = sum(r.desirable for r in items)
        return min(desirable, len(items) - desirable) >= self.config.min_items

    def counted(self, items: Sequence) -> str:
        desirable = sum(r.desirable for r in items)
        return f"{desirable} desirable and {len(items) - desirable} undesirable labels"

    def measure(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gained = gains(model, tokenizer, [(chat_messages(r.prompt), r.completion) for r in items])
        return gained, torch.tensor([r.desirable for r in items])

    def figure(self, measured: tuple[torch.Tensor, torch.Tensor], rows: list[int]) -> float:
        gained, desirable = measured
        return agreement(gained[rows], desirable[rows])


def heldout_suites(**options: object) -> tuple[PreferenceAccuracy, LabelAgreement]:
    """The component a spec names: ``{"component": "trainer.heldout_suite:heldout_suites",
    "options": {"tolerance": 0.05, "min_items": 10, "by_cohort": true}}``."""
    config = HeldoutSuiteConfig(**options)
    return PreferenceAccuracy(config), LabelAgreement(config)
