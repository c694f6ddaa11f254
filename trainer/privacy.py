"""Differential privacy: DP-SGD (opacus) for the SFT stage, and the epsilon of a run.

Only SFT runs under DP. DPO's example is two rows (chosen, rejected) and KTO's KL term
mixes rows of a batch, so opacus' per-row gradient clipping would not bound one record's
influence there; a DP run therefore skips the preference stages and says so in the
lineage. The privacy unit is one SFT record (record-level DP): a user with k records in a
batch is protected at roughly k times the epsilon (group privacy).

The epsilon of a run is fixed before it starts (RDP accountant over the planned steps:
sample rate, noise multiplier, step count), so a run that would exceed the budget is
refused before it touches the data. Runs compose by simple addition of epsilons (and of
deltas): a safe upper bound across adapters trained on overlapping users, kept in the
deployment's ledger (``trainer.ledger``).
"""

import math
import time
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from streams.training_data import SftRecord
from trainer.config import PrivacyConfig, TrainerConfig
from trainer.progress import ProgressReporter
from trainer.stages import SFT, StageResult

def plan(examples: int, config: PrivacyConfig) -> tuple[float, int, float]:
    """(epsilon, steps, sample rate) of a DP run over ``examples`` records; over none, no
    run: nothing is trained on, so nothing is spent (a batch of only pairs or labels)."""
    if examples == 0:
        return 0.0, 0, 0.0
    sample_rate = min(1.0, config.batch_size / examples)
    steps = max(1, math.ceil(config.epochs / sample_rate))
    accountant = RDPAccountant()
    accountant.history = [(config.noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(config.delta), steps, sample_rate


def _tokenize(record: SftRecord, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple:
    encoded = tokenizer.apply_chat_template(
        [m.model_dump() for m in record.messages], return_dict=True, return_assistant_tokens_mask=True
    )
    ids = torch.tensor(encoded["input_ids"][:max_length])
    labels = ids.masked_fill(torch.tensor(encoded["assistant_masks"][:max_length]) == 0, -100)
    return ids, labels, torch.tensor(record.weight)


def _pad(pad_id: int) -> Any:
    def collate(rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max((len(ids) for ids, _, _ in rows), default=1)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        for i, (row_ids, row_labels, _) in enumerate(rows):
            ids[i, : len(row_ids)], labels[i, : len(row_labels)] = row_ids, row_labels
        return ids, labels, torch.stack([w for _, _, w in rows]) if rows else torch.zeros(0)

    return collate


def dp_sft(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[SftRecord],
    config: TrainerConfig,
    device: torch.device,
    reporter: ProgressReporter,
) -> tuple[StageResult, float]:
    """DP-SGD on the LoRA weights in a plain loop; returns the stage result and the epsilon spent."""
    dp = config.privacy
    epsilon, steps, sample_rate = plan(len(records), dp)
    examples = [_tokenize(r, tokenizer, config.max_length) for r in records]
    loader = DataLoader(examples, batch_size=dp.batch_size, collate_fn=_pad(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=dp.learning_rate)
    engine = PrivacyEngine(accountant="rdp")
    model.train()
    # "hooks" computes per-example gradients of the LoRA Linear layers; ghost clipping would
    # also work here because the base model's embeddings are untied.
    private_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    step, tokens, loss_sum, started = 0, 0, 0.0, reporter.started
    try:
        while step < steps:
            for ids, labels, weights in loader:
                if step == steps:
                    break
                if len(ids) == 0:  # Poisson sampling can draw nobody (p ~ e^-batch_size)
                    continue
                ids, labels, weights = ids.to(device), labels.to(device), weights.to(device)
                logits = private_model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
                per_token = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none"
                )
                answer_tokens = (labels[:, 1:] != -100).sum(-1).clamp(min=1)
                # Each record's weight scales its loss; opacus clips each record's gradient afterwards.
                loss = (weights * per_token.sum(-1) / answer_tokens).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += int((ids != tokenizer.pad_token_id).sum())
                loss_sum += loss.item()
                reporter.step(step, steps, loss.item())
    finally:
        private_model.remove_hooks()
    seconds = time.monotonic() - started
    return StageResult(SFT, len(records), step, loss_sum / max(step, 1), seconds, tokens), epsilon
