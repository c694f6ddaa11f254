"""Every Kafka client feedloop opens is built here: producers, consumers, admin clients, Faust.

One :class:`KafkaSettings` holds what a connection needs (the bootstrap servers, the
consumer-group timings, TLS and SASL in :class:`KafkaSecurity`); :func:`connection_options` turns it into the keyword
arguments every aiokafka client takes, and each factory adds only what its role decides
(acks, group, offsets), never the connection: a connection setting added here (TLS, SASL)
reaches every client at once, the pipeline's Faust app included, so no process can be left
talking plaintext to a cluster that needs credentials.

Why the group timings are short by default: Tansu, the embedded broker, holds every
JoinGroup for half the session timeout, so Kafka's usual 45-60 s would stall each start and
rebalance for half a minute (see docs/deployment.md for production values).
"""

from __future__ import annotations

import ssl
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


def _secret_from_file(value: SecretStr | None, path: Path | None, name: str) -> SecretStr | None:
    """A secret given as itself or as a file holding it (Docker and Kubernetes secrets). Once
    read, only the secret is kept: a child process gets it as such (app.processes)."""
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"set {name} or {name}_file, not both")
    try:
        return SecretStr(path.read_text().rstrip("\r\n"))
    except OSError as exc:
        raise ValueError(f"{name}_file {path}: {exc.strerror}") from exc


class KafkaSecurity(BaseModel):
    """TLS and SASL for every Kafka client, ``FEEDLOOP_KAFKA__<FIELD>``; the default is the
    embedded broker's plaintext. docs/deployment.md shows a managed-Kafka configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers: SASL_SSL for most managed Kafka services."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols)."
    )
    sasl_username: str | None = Field(None, description="SASL user name (SASL_* protocols).")
    sasl_password: SecretStr | None = Field(None, description="SASL password; or sasl_password_file.")
    sasl_password_file: Path | None = Field(None, description="A file holding the SASL password (a mounted secret).")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates; default: the system's.")
    ssl_certfile: Path | None = Field(None, description="Client certificate, for brokers that require mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Private key of the client certificate.")
    ssl_key_password: SecretStr | None = Field(None, description="Password of the private key; or ssl_key_password_file.")
    ssl_key_password_file: Path | None = Field(None, description="A file holding the private key's password.")
    ssl_check_hostname: bool = Field(True, description="Check that a broker's certificate names it (keep on).")

    @model_validator(mode="after")
    def _complete(self) -> KafkaSecurity:
        object.__setattr__(self, "sasl_password",
                           _secret_from_file(self.sasl_password, self.sasl_password_file, "sasl_password"))  # fmt: skip
        object.__setattr__(self, "ssl_key_password",
                           _secret_from_file(self.ssl_key_password, self.ssl_key_password_file, "ssl_key_password"))  # fmt: skip
        object.__setattr__(self, "sasl_password_file", None)
        object.__setattr__(self, "ssl_key_password_file", None)
        if self.uses_sasl and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(f"security_protocol {self.security_protocol} needs FEEDLOOP_KAFKA__SASL_USERNAME and "
                             "FEEDLOOP_KAFKA__SASL_PASSWORD (or FEEDLOOP_KAFKA__SASL_PASSWORD_FILE)")  # fmt: skip
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a client certificate needs both FEEDLOOP_KAFKA__SSL_CERTFILE and FEEDLOOP_KAFKA__SSL_KEYFILE")
        return self

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """One context for all of a process's clients (reading the files once)."""
        if not self.uses_tls:
            return None
        context = create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile,
            password=self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        )  # fmt: skip
        context.check_hostname = self.ssl_check_hostname
        return context


class KafkaSettings(BaseModel):
    """How to reach the broker; built by ``app.settings.Settings.kafka``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(description="host:port[,host:port...] of the brokers.")
    session_timeout_s: float = Field(6.0, gt=0, description="Consumer-group session timeout.")
    security: KafkaSecurity = Field(default_factory=KafkaSecurity, description="TLS and SASL.")

    @property
    def heartbeat_interval_s(self) -> float:
        """A sixth of the session timeout (Kafka advises at most a third), at least 0.5 s."""
        return max(0.5, self.session_timeout_s / 6)


def connection_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments of every aiokafka client: where the brokers are and how to talk to them."""
    security = kafka.security
    options: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers,
                               "security_protocol": security.security_protocol}  # fmt: skip
    if security.uses_tls:
        options["ssl_context"] = security.ssl_context
    if security.uses_sasl:
        options.update(sasl_mechanism=security.sasl_mechanism, sasl_plain_username=security.sasl_username,
                       sasl_plain_password=security.sasl_password.get_secret_value())  # fmt: skip
    return options


def producer(kafka: KafkaSettings, **options: Any) -> AIOKafkaProducer:
    """A producer that waits for every in-sync replica (acks=all) unless ``options`` say otherwise.

    Not idempotent: Tansu does not answer the InitProducerId version aiokafka sends, so
    duplicates from retries are removed downstream by event id instead."""
    return AIOKafkaProducer(**{"acks": "all", **options, **connection_options(kafka)})


def consumer(kafka: KafkaSettings, *topics: str, group_id: str | None, **options: Any) -> AIOKafkaConsumer:
    """A consumer that commits by hand, after the work a record caused is done, from the
    earliest offset for a new group."""
    session_ms = int(kafka.session_timeout_s * 1000)
    defaults = {"enable_auto_commit": False, "auto_offset_reset": "earliest", "session_timeout_ms": session_ms,
                "heartbeat_interval_ms": int(kafka.heartbeat_interval_s * 1000)}  # fmt: skip
    return AIOKafkaConsumer(*topics, **{**defaults, **options, "group_id": group_id, **connection_options(kafka)})


def admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection_options(kafka))


def faust_broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The ``faust.App`` settings that say where the brokers are and how to talk to them.
    Faust takes TLS and SASL as credentials objects; it turns them back into the same aiokafka
    options as :func:`connection_options`."""
    import faust  # here: only the pipeline and learner processes run Faust

    security = kafka.security
    credentials = None
    if security.uses_sasl:
        credentials = faust.SASLCredentials(username=security.sasl_username,
                                            password=security.sasl_password.get_secret_value(),
                                            ssl_context=security.ssl_context, mechanism=security.sasl_mechanism)  # fmt: skip
    elif security.uses_tls:
        credentials = faust.SSLCredentials(security.ssl_context)
    return {
        "broker": [f"kafka://{host}" for host in kafka.bootstrap_servers.split(",")],
        "broker_session_timeout": kafka.session_timeout_s,
        "broker_heartbeat_interval": kafka.heartbeat_interval_s,
        "broker_credentials": credentials,
    }
