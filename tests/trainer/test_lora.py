import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from demo.base_model import ToyChats, build_tiny_model
from trainer.base_model import BaseModelConfig
from trainer.lora import LoraSettings, save_zero_delta_adapter

LLAMA_LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("base"), ToyChats(count=100), BaseModelConfig(train_steps=3))


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    return save_zero_delta_adapter(base_dir, tmp_path_factory.mktemp("adapter"), LoraSettings(rank=4, alpha=8))


def test_adapter_files_target_every_linear_layer_with_zero_b(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert set(config["target_modules"]) == LLAMA_LINEAR_LAYERS

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    a_matrices = [w for name, w in weights.items() if "lora_A" in name]
    b_matrices = [w for name, w in weights.items() if "lora_B" in name]
    num_layers = 4
    assert len(a_matrices) == len(b_matrices) == num_layers * len(LLAMA_LINEAR_LAYERS)
    assert all(not b.any() for b in b_matrices)
    assert all(a.any() for a in a_matrices)


def test_zero_delta_adapter_gives_exactly_the_base_logits(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        base_logits = base(input_ids).logits.clone()
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        assert torch.equal(adapted(input_ids).logits, base_logits)

        # The adapter is really in the forward pass: a non-zero B changes the logits.
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.1)
        assert not torch.allclose(adapted(input_ids).logits, base_logits)
