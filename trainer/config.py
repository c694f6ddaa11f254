"""The typed configuration of the trainer (every knob of the recipe) and of serving (the
hot-swap controller and the chat gateway's upstream), each with its default and why.

Defaults suit the tiny base model on CPU; a real model wants lower learning rates. All
models are frozen, so one config object can be shared by concurrent readers.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSettings(_Frozen):
    """Shape of every adapter feedloop trains; vLLM needs --max-lora-rank >= rank."""

    rank: int = Field(8, description="LoRA rank r.")
    alpha: int = Field(16, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, description="Dropout on the LoRA input during training.")


class StageConfig(_Frozen):
    """Optimisation settings of one trl stage (SFT, DPO or KTO)."""

    enabled: bool = Field(True, description="Skip the stage when False (or when the batch has no records for it).")
    epochs: float = Field(2.0, gt=0, description="Passes over the stage's records.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 lets epochs decide.")
    batch_size: int = Field(8, ge=2, description="Examples per step (KTO needs >= 2 for its KL estimate).")
    learning_rate: float = Field(
        1e-3, gt=0, description="AdamW peak rate; trl's defaults (1e-5..5e-7) barely move a 1M-parameter model."
    )
    beta: float = Field(0.1, gt=0, description="DPO/KTO temperature: how far the policy may move from the reference.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warm-up share of the steps.")


class SuiteSpec(_Frozen):
    """One evaluation component of the gate, named by import path (trainer.gate.load_suites)."""

    component: str = Field(
        pattern=r"^[\w.]+:[\w.]+$", description="`package.module:factory`; the factory returns the suites it builds."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the factory.")
    protected: bool | None = Field(
        None,
        description="Mark every suite it builds protected (held to the base model) or not (the objective, held to "
        "the parent); None: as the factory built it.",
    )


class GateConfig(_Frozen):
    """The evaluation gate that stands between a trained candidate and the registry (trainer.gate)."""

    suites: tuple[SuiteSpec, ...] = Field(
        (), description="Evaluation suites plugged into the gate; none: it checks only that a candidate is sound."
    )


class PrivacyConfig(_Frozen):
    """DP-SGD (opacus) for deployments whose users were promised differential privacy."""

    enabled: bool = Field(False, description="Train the SFT stage with DP-SGD and skip the preference stages.")
    noise_multiplier: float = Field(1.0, gt=0, description="Gaussian noise std relative to the clipping norm.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient clipping norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; well below 1/#examples.")
    budget_epsilon: float = Field(
        8.0, gt=0, description="Total epsilon all adapters of this deployment may spend (basic composition)."
    )
    batch_size: int = Field(32, ge=1, description="Expected Poisson batch size (sample rate = batch / records).")
    epochs: float = Field(3.0, gt=0, description="Passes over the SFT records.")
    learning_rate: float = Field(3e-3, gt=0, description="DP noise wants a higher rate than plain SFT.")


class TrainerConfig(_Frozen):
    """Everything that determines a training run of ``train_batch``."""

    seed: int = Field(0, description="Seeds LoRA init and data order: same batch + seed -> same adapter.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape (vLLM --max-lora-rank >= rank).")
    max_length: int = Field(256, ge=16, description="Longest training sequence in tokens; longer ones are cut.")
    sft: StageConfig = Field(default_factory=StageConfig, description="Supervised stage on sft.jsonl.")
    dpo: StageConfig = Field(
        default_factory=lambda: StageConfig(learning_rate=5e-4),
        description="DPO stage on pairs.jsonl; a lower rate than SFT, as plain DPO collapses at high rates.",
    )
    dpo_sft_weight: float = Field(
        1.0, ge=0, description="Weight of the SFT (NLL on chosen) term mixed into DPO against preference collapse."
    )
    kto: StageConfig = Field(
        default_factory=lambda: StageConfig(learning_rate=5e-4), description="KTO stage on labels.jsonl."
    )
    anchor_l2: float = Field(
        0.0, ge=0, description="L2 pull of the LoRA weights towards the parent's (0 = off); slows forgetting."
    )
    rehearsal_per_batch: int = Field(
        40, ge=0, description="Chats of the base model's rehearsal.jsonl mixed into each SFT stage (0 = off)."
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    num_threads: int = Field(
        1, ge=1, description="torch CPU threads while training: leaves cores for the stream processors."
    )
    log_every: int = Field(10, ge=1, description="Log progress (steps/s, ETA) every this many optimizer steps.")
    max_attempts: int = Field(3, ge=1, description="Restarts of a crashed batch before it is marked failed.")
    device: str | None = Field(None, description="torch device; None picks cuda (bf16) when present, else cpu (fp32).")


class ServingSettings(BaseModel):
    """vLLM replicas, the hot-swap controller (`feedloop swap`) and the chat gateway (docs/serving.md).

    Set as ``FEEDLOOP_SERVING__<FIELD>``; the replicas themselves are ``FEEDLOOP_VLLM_URLS``.
    """

    served_model_name: str = Field("base", description="Name vLLM serves the base model under (--served-model-name).")
    max_lora_rank: int = Field(8, ge=1, description="vLLM --max-lora-rank; adapters of a higher rank are refused.")
    max_loras: int = Field(4, ge=1, description="vLLM --max-loras: adapters batched together.")
    tool_call_parser: str | None = Field(
        None, description="vLLM --tool-call-parser (with --enable-auto-tool-choice) for chat apps that send tools, "
        "e.g. 'hermes' for ChatML models; the one your model's chat template writes. Unset: vLLM refuses tools (400).",
    )  # fmt: skip
    max_challengers: int = Field(
        1, ge=1, description="Adapters under A/B test at once; newer ones wait, and only the newest is loaded next."
    )
    drain_s: float = Field(
        10.0, ge=0, description="After a promotion or rollback, wait this long before unloading the old adapter."
    )
    reconcile_interval_s: float = Field(
        15.0, gt=0, description="How often the controller re-checks every replica (one that came back is caught up)."
    )
    request_timeout_s: float = Field(120.0, gt=0, description="The chat gateway's timeout for one vLLM answer.")
    replicas_fetch: bool = Field(
        False, description="vLLM replicas fetch approved adapters from the object store themselves (feedloop's LoRA "
        "resolver installed beside vLLM, FEEDLOOP_STORAGE__* set there); off: the controller sends each replica the "
        "path it validated, which the replica must see (same host or a shared volume). docs/serving.md.",
    )
