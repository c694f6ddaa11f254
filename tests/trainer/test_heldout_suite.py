"""The held-out feedback suites: the users' own pairs and labels that no candidate trained on."""

import pytest
import torch
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from streams.objects import ObjectStore
from streams.store import Adapter
from streams.training_data import BatchFolder, LabelRecord, PreferenceRecord, write_batch
from tests.trainer import batches
from trainer.config import StageConfig, SuiteSpec, TrainerConfig
from trainer.gate import Abstain, evaluate, load_suites
from trainer.heldout_suite import LABEL_AGREEMENT, PREFERENCE_ACCURACY, agreement, heldout_suites
from trainer.recipe import train_batch

COMPONENT = "trainer.heldout_suite:heldout_suites"
# One pass over the records is enough to move the toy preference all the way (measured: 0.5 -> 1.0, or 0.0 flipped).
FAST = TrainerConfig(num_threads=2, rehearsal_per_batch=0, log_every=5, dpo=StageConfig(epochs=1, learning_rate=5e-4),
                     kto=StageConfig(epochs=1, learning_rate=5e-4))


def cohorts(records: list, names=("majority", "minority")) -> list:
    return [r.model_copy(update={"cohort": names[i // 2 % len(names)]}) for i, r in enumerate(records)]


def flipped(record):
    if isinstance(record, PreferenceRecord):
        return record.model_copy(update={"chosen": record.rejected, "rejected": record.chosen})
    return record.model_copy(update={"desirable": not record.desirable})


def feedback_batch(data_dir, batch_id: str, flip: bool) -> BatchFolder:
    """Feedback that prefers the concise style: 48 pairs and 48 labels to train on (flipped, if
    asked), and 40 held-out pairs and 40 held-out labels of the same preference, never flipped."""
    trained = cohorts(batches.preference_records(seed=1, sft=0, pairs=48, labels=48))
    heldout = cohorts(batches.preference_records(seed=2, sft=0, pairs=40, labels=40))
    heldout = [r.model_copy(update={"example_id": "held-" + r.example_id}) for r in heldout]
    batch = BatchFolder.of(ObjectStore(data_dir.as_uri()), batch_id)
    write_batch(batch, batch_id=batch_id, trigger="size", event_time="2026-11-21T10:00:00Z",
                records=[flipped(r) for r in trained] if flip else trained, loss_weights={}, heldout=heldout)  # fmt: skip
    return batch


def test_agreement_is_the_share_of_good_bad_pairs_the_good_one_wins_ties_half():
    likelihood = torch.tensor([-1.0, -2.0, -2.0, -3.0])
    assert agreement(likelihood, torch.tensor([True, True, False, False])) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert agreement(-likelihood, torch.tensor([True, True, False, False])) == pytest.approx(0.5 / 4)


def test_the_suites_are_the_objective_unless_marked_and_abstain_with_too_few_items(trained_base):
    accuracy, labels = load_suites([SuiteSpec(component=COMPONENT, options={"min_items": 5})])
    assert (accuracy.name, accuracy.protected, accuracy.tolerance, accuracy.prompts) == (
        PREFERENCE_ACCURACY, False, 0.05, ())  # fmt: skip
    assert labels.name == LABEL_AGREEMENT and accuracy.version == heldout_suites(min_items=5)[0].version
    assert accuracy.version != heldout_suites(min_items=6)[0].version
    assert all(s.protected for s in load_suites([SuiteSpec(component=COMPONENT, protected=True)]))

    model = AutoModelForCausalLM.from_pretrained(trained_base, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(trained_base, local_files_only=True)
    records = batches.preference_records(seed=3, sft=0, pairs=7, labels=12)
    pairs = cohorts([r for r in records if isinstance(r, PreferenceRecord)], ("a", "a", "a", "b"))
    verdicts = [r for r in records if isinstance(r, LabelRecord)]
    batch = {"sft": [], "pairs": [], "labels": [], "heldout_pairs": pairs, "heldout_labels": verdicts[:9]}
    figures = evaluate(model, tokenizer, [accuracy, labels], batch)
    # 7 pairs: overall and cohort a (5) measured, cohort b (2) too few to report; 5 good and 4 bad labels: abstain.
    assert sorted(figures.scores) == [f"{PREFERENCE_ACCURACY}/all", f"{PREFERENCE_ACCURACY}/cohort=a"]
    assert all(0 <= v <= 1 for v in figures.scores.values())
    assert figures.abstained == {LABEL_AGREEMENT: "5 desirable and 4 undesirable labels in this batch's held-out "
                                 "part, fewer than min_items=5; hold out more (FEEDLOOP_PIPELINE__HELDOUT_SHARE) or "
                                 "cut larger batches"}  # fmt: skip
    with pytest.raises(Abstain, match="0 pairs"):
        accuracy.score(model, tokenizer, {"pairs": pairs})  # a batch without a held-out part


@pytest.mark.parametrize("flip", [False, True], ids=["learns-the-preference", "learns-its-opposite"])
def test_a_candidate_is_held_to_its_parent_on_the_held_out_feedback(trained_base, sessions, tmp_path, flip):
    suites = load_suites([SuiteSpec(component=COMPONENT)])
    batch = feedback_batch(tmp_path, "batch-feedback", flip)

    result = train_batch(batch, FAST, sessions, base_model_dir=trained_base, adapters_dir=tmp_path / "adapters",
                         objects=ObjectStore(tmp_path.as_uri()),
                         suites=suites)  # fmt: skip

    with sessions() as session:
        (row,) = session.scalars(select(Adapter)).all()
    parent, candidate = row.lineage["eval"]["parent"], row.lineage["eval"]["candidate"]
    assert set(candidate) == {f"{name}/{part}" for name in (PREFERENCE_ACCURACY, LABEL_AGREEMENT)
                              for part in ("all", "cohort=majority", "cohort=minority")}  # fmt: skip
    accuracy = f"{PREFERENCE_ACCURACY}/all"
    if flip:
        assert result.status == "rejected" and f"{accuracy} fell from the parent's" in result.reason
        assert candidate[accuracy] < parent[accuracy] - 0.05, (parent, candidate)
    else:
        assert result.status == "trained", result.reason
        assert candidate[accuracy] > parent[accuracy] + 0.05, (parent, candidate)
    assert parent[accuracy] == 0.5, (parent, candidate)  # the base model: every gain is 0, a tie
