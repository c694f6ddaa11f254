"""The Faust application: broker settings tuned for Kafka and for the embedded Tansu broker.

Tansu holds every consumer-group join for half the session timeout, so the session timeout
is short (6 s by default) from the first run; exactly-once is off because Tansu cannot
serve idempotent producers (at-least-once plus de-duplication by event id instead); topics
are created by feedloop (``ensure_topics``), not declared by Faust; the web server is off.
"""

from __future__ import annotations

import faust

from app.settings import Settings
from streams.kafka import faust_broker_options


def make_faust_app(settings: Settings, name: str = "feedloop-pipeline") -> faust.App:
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    return faust.App(
        name,
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        processing_guarantee="at_least_once",
        web_enabled=False,
        # Records are acknowledged only after a checkpoint covers them; on shutdown or
        # rebalance the rest is redelivered to the next owner, which skips what its restored
        # checkpoint holds. Waiting for those acks would hang the shutdown instead.
        stream_wait_empty=False,
        datadir=str(settings.data_dir / "faust"),
        **faust_broker_options(settings.kafka),
    )
