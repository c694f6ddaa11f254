"""Per-example weights scale each example's share of the gradient, exactly, in trl's own losses."""

import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer import batches
from trainer import data
from trainer.config import StageConfig, TrainerConfig
from trainer.lora import add_lora
from trainer.stages import DPO, KTO, SFT, TRAINERS, trl_args
from trainer.weighting import WEIGHT, anchor_penalty, snapshot_lora

CONFIG = TrainerConfig(
    sft=StageConfig(batch_size=2), dpo=StageConfig(batch_size=2), kto=StageConfig(batch_size=2), dpo_sft_weight=0.5
)


def make_trainer(stage, base_dir, out):
    records = batches.preference_records(seed=9, sft=4, pairs=4, labels=4)
    by_type = {SFT: (data.sft_dataset, "SftRecord"), DPO: (data.dpo_dataset, "PreferenceRecord"), KTO: (data.kto_dataset, "LabelRecord")}
    make, kind = by_type[stage]
    dataset = make([r for r in records if type(r).__name__ == kind])
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True))
    # B starts at zero, where LoRA's A gets no gradient: move off it so every weight is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    args = trl_args(stage, CONFIG, getattr(CONFIG, stage), torch.device("cpu"), out)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return TRAINERS[stage](model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def gradient(trainer, batch, weights):
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model, {**batch, WEIGHT: torch.tensor(weights)}).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("stage", [SFT, DPO, KTO])
def test_gradient_is_the_weighted_sum_of_per_example_gradients(stage, trained_base):
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(stage, trained_base, out)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch[WEIGHT].tolist() == [1.0, 1.0]  # the collator carried the records' weights
        first, second = gradient(trainer, batch, [1.0, 0.0]), gradient(trainer, batch, [0.0, 1.0])
        mixed = gradient(trainer, batch, [3.0, 0.5])
    assert first.abs().sum() > 0 and second.abs().sum() > 0 and not torch.allclose(first, second)
    torch.testing.assert_close(mixed, 3.0 * first + 0.5 * second, rtol=1e-4, atol=1e-7)


def test_anchor_penalty_is_zero_at_the_parent_and_grows_away_from_it(trained_base):
    model = add_lora(AutoModelForCausalLM.from_pretrained(trained_base, local_files_only=True))
    anchor = snapshot_lora(model)
    assert anchor_penalty(model, anchor, 0.5) == 0
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    assert anchor_penalty(model, anchor, 0.5) > 0 and anchor_penalty(model, anchor, 0.0) == 0
