"""Every Kafka client feedloop opens is built here: producers, consumers, admin clients, Faust.

One :class:`KafkaSettings` holds what a connection needs (the bootstrap servers and the
consumer-group timings today); :func:`connection_options` turns it into the keyword
arguments every aiokafka client takes, and each factory adds only what its role decides
(acks, group, offsets), never the connection: a connection setting added here (TLS, SASL)
reaches every client at once, the pipeline's Faust app included, so no process can be left
talking plaintext to a cluster that needs credentials.

Why the group timings are short by default: Tansu, the embedded broker, holds every
JoinGroup for half the session timeout, so Kafka's usual 45-60 s would stall each start and
rebalance for half a minute (see docs/deployment.md for production values).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel, ConfigDict, Field


class KafkaSettings(BaseModel):
    """How to reach the broker; built by ``app.settings.Settings.kafka``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(description="host:port[,host:port...] of the brokers.")
    session_timeout_s: float = Field(6.0, gt=0, description="Consumer-group session timeout.")

    @property
    def heartbeat_interval_s(self) -> float:
        """A sixth of the session timeout (Kafka advises at most a third), at least 0.5 s."""
        return max(0.5, self.session_timeout_s / 6)


def connection_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments of every aiokafka client: where the brokers are and how to talk to them."""
    return {"bootstrap_servers": kafka.bootstrap_servers}


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
    """The ``faust.App`` settings that say where the brokers are and how to talk to them."""
    return {
        "broker": [f"kafka://{host}" for host in kafka.bootstrap_servers.split(",")],
        "broker_session_timeout": kafka.session_timeout_s,
        "broker_heartbeat_interval": kafka.heartbeat_interval_s,
    }
