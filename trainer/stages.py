"""One trl stage (SFT, DPO or KTO) on the shared LoRA model, with feedloop's settings.

The three stages differ only in trainer class, trl config class and a few loss options;
everything else (CPU-safe precision, no checkpoints, no hub, progress) is common.
"""

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, KTOConfig, SFTConfig

from trainer.config import StageConfig, TrainerConfig
from trainer.progress import ProgressCallback, ProgressReporter
from trainer.weighting import Anchor, WeightedDPOTrainer, WeightedKTOTrainer, WeightedSFTTrainer

SFT, DPO, KTO = "sft", "dpo", "kto"


@dataclass(frozen=True)
class StageResult:
    stage: str
    examples: int
    steps: int
    train_loss: float
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def stage_options(stage: str, config: TrainerConfig) -> dict[str, Any]:
    """The loss options that make each stage what it is."""
    if stage == SFT:
        # Only the assistant turn carries loss (the chat template marks it with {% generation %}).
        return {"assistant_only_loss": True, "packing": False}
    if stage == DPO:
        # DPO plus an NLL term on the chosen answer (RPO): margins alone let text degenerate.
        return {"beta": config.dpo.beta, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.dpo_sft_weight]}
    return {"beta": config.kto.beta}


def trl_args(stage: str, config: TrainerConfig, stage_config: StageConfig, device: torch.device, out: str) -> Any:
    """trl config for a stage. bf16 and gradient checkpointing default to on in trl: set both explicitly."""
    config_class = {SFT: SFTConfig, DPO: DPOConfig, KTO: KTOConfig}[stage]
    return config_class(
        output_dir=out,
        num_train_epochs=stage_config.epochs,
        max_steps=stage_config.max_steps,
        per_device_train_batch_size=stage_config.batch_size,
        learning_rate=stage_config.learning_rate,
        warmup_steps=stage_config.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        lr_scheduler_type="cosine",
        max_length=config.max_length,
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.log_every,
        eval_strategy="no",
        save_strategy="no",  # crash recovery restarts the batch; checkpoints would only cost disk
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **stage_options(stage, config),
    )


TRAINERS = {SFT: WeightedSFTTrainer, DPO: WeightedDPOTrainer, KTO: WeightedKTOTrainer}


def run_stage(
    stage: str,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    config: TrainerConfig,
    device: torch.device,
    reporter: ProgressReporter,
    anchor: Anchor,
) -> StageResult:
    """Train ``model`` in place on ``dataset`` with the stage's trl trainer."""
    stage_config: StageConfig = getattr(config, stage)
    with tempfile.TemporaryDirectory(prefix=f"feedloop-{stage}-") as out:
        trainer = TRAINERS[stage](
            model=model,
            args=trl_args(stage, config, stage_config, device, out),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ProgressCallback(reporter)],
            anchor=anchor,
            anchor_l2=config.anchor_l2,
        )
        trainer.remove_callback(PrinterCallback)  # it prints raw dicts; progress goes to structlog
        output = trainer.train()
        tokens = count_tokens(trainer.train_dataset, trainer.state.num_train_epochs)
    # DPO/KTO add a frozen "ref" copy of the adapter as their reference; only "default" ships.
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter("default")
    return StageResult(
        stage, len(dataset), trainer.state.global_step, output.training_loss, output.metrics["train_runtime"], tokens
    )


def count_tokens(prepared: Dataset, epochs: float) -> int:
    """Tokens trained on: every prepared sequence (prompt and answer(s)) times the epochs."""
    names = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
    columns = [c for c in names if c in prepared.column_names]
    per_epoch = sum(len(ids) for column in columns for ids in prepared[column])
    if "prompt_ids" in columns and "rejected_ids" in columns:  # DPO feeds the prompt twice
        per_epoch += sum(len(ids) for ids in prepared["prompt_ids"])
    return int(per_epoch * epochs)
