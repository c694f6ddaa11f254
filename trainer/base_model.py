"""Build a tiny chat base model from scratch, offline, in well under a minute on a CPU.

    build_base_model(out_dir, chats, config, rehearsal=..., data=..., on_step=...) -> Path

The chats are handed in: what a model is pretrained on is its maker's choice, not the
trainer's. feedloop's own tiny model is the demo's, pretrained on its toy world
(``demo.base_model``); a production deployment configures a real model by path instead.

Recipe:
  1. train a byte-level BPE chat tokenizer on the chats
  2. create a small randomly initialised Llama
  3. pretrain it (full fine-tune, next-token loss on whole chats)
  4. save model + tokenizer + generation config + ``feedloop_model.json`` (the config and
     ``data``, the caller's account of the chats), and the ``rehearsal`` chats, the skills
     its adapters must keep, as ``rehearsal.jsonl`` (``trainer.rehearsal``)

The output is a standard Hugging Face Llama directory, loadable by transformers and
servable by vLLM. The same chats and seed give bit-identical weights on the same machine.
"""

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import tokenizers
import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from trainer import rehearsal
from trainer.rehearsal import Chat
from trainer.tokenizer import IM_END, train_tokenizer

log = structlog.get_logger(__name__)

METADATA_FILE = "feedloop_model.json"
WEIGHTS_FILE = "model.safetensors"


class BaseModelConfig(BaseModel):
    """Everything but the chats that determines the base model; the defaults build the demo's
    in ~30 s on 2 CPU cores."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(0, description="Seeds weight init and data order.")
    vocab_size: int = Field(1024, description="Upper bound on the BPE vocabulary (a small corpus may stop short).")
    hidden_size: int = Field(128, description="Model width.")
    intermediate_size: int = Field(384, description="MLP width (about 3x hidden, as in Llama).")
    num_layers: int = Field(4, description="Transformer blocks.")
    # head_dim 64 is supported by every vLLM attention backend.
    num_heads: int = Field(2, description="Attention heads; head_dim = hidden_size / num_heads.")
    max_position_embeddings: int = Field(512, description="Longest context; vLLM serves with --max-model-len <= this.")
    train_steps: int = Field(300, description="Optimizer steps of pretraining.")
    batch_size: int = Field(16, description="Chats per step.")
    learning_rate: float = Field(3e-3, description="Peak AdamW rate; tiny models want a high one.")
    warmup_steps: int = Field(20, description="Linear warm-up before the cosine decay.")
    log_every: int = Field(25, description="Log the loss every this many steps.")
    device: str | None = Field(None, description="torch device; None picks cuda when available, else cpu.")


StepCallback = Callable[[int, float], None]


def build_base_model(
    out_dir: str | Path,
    chats: Sequence[Chat],
    config: BaseModelConfig = BaseModelConfig(),
    *,
    rehearsal_chats: Sequence[Chat] = (),
    data: Mapping[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> Path:
    """Build, pretrain on ``chats`` and save the base model into ``out_dir``; returns its path.

    ``rehearsal_chats`` go to ``rehearsal.jsonl`` (none: no rehearsal); ``data``,
    recorded in ``feedloop_model.json``, says what the chats are, so that their maker can
    tell its own model from another. ``on_step(step, loss)`` is called after every optimizer
    step (progress bars, tests).
    """
    out_dir = Path(out_dir)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()

    with _deterministic(config.seed):
        # 1. Tokenizer.
        tokenizer = train_tokenizer(
            (message["content"] for chat in chats for message in chat),
            vocab_size=config.vocab_size,
            model_max_length=config.max_position_embeddings,
        )
        examples = [tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"] for chat in chats]

        # 2. Model. Untied embeddings: opacus ghost clipping (DP-SGD later) breaks on tied ones.
        model_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(model_config).to(device)
        log.info(
            "base_model_created", parameters=model.num_parameters(), vocab_size=len(tokenizer), device=str(device)
        )

        # 3. Pretraining.
        losses = _pretrain(model, examples, tokenizer.pad_token_id, config, device, on_step)

    # 4. Save. vLLM and transformers read the stop token from generation_config.json.
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    rehearsal.save(out_dir, list(rehearsal_chats))
    metadata = {
        "config": config.model_dump(),
        "data": dict(data or {}),
        "seed": config.seed,
        "weights_sha256": weights_sha256(out_dir),
        "parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        # Bit-identical rebuilds hold for the same machine and library versions.
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    log.info(
        "base_model_saved",
        path=str(out_dir),
        seconds=round(time.monotonic() - started, 1),
        weights_sha256=metadata["weights_sha256"],
        final_loss=round(losses[-1], 4),
    )
    return out_dir


def _pretrain(
    model: LlamaForCausalLM,
    examples: list[list[int]],
    pad_id: int,
    config: BaseModelConfig,
    device: torch.device,
    on_step: StepCallback | None,
) -> list[float]:
    """Plain next-token training on whole chats; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.train_steps)
    # bf16 compute where the hardware has it; fp32 master weights either way.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = _batches(examples, pad_id, config.batch_size, torch.Generator().manual_seed(config.seed))

    model.train()
    losses = []
    for step in range(1, config.train_steps + 1):
        input_ids, attention_mask, labels = (tensor.to(device) for tensor in next(batches))
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if step % config.log_every == 0 or step == config.train_steps:
            log.info("pretrain_step", step=step, steps=config.train_steps, loss=round(losses[-1], 4))
    model.eval()
    return losses


def _batches(
    examples: list[list[int]], pad_id: int, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless right-padded batches, reshuffled every epoch by the seeded ``generator``."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(map(len, batch))
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in batch])
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
            # Padding carries no loss.
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            yield input_ids, attention_mask, labels


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch and require deterministic kernels, restoring the global flag afterwards."""
    # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the saved weights file: identical for identical weights."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
