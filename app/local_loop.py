"""Several of feedloop's processes on one machine as one process tree: `feedloop up` and the demo.

In this process: the embedded broker (when the settings name it; its output in
``data_dir/logs/broker.log``), the store's migrations, the archiver and the gateway, each with
its heartbeat. Beside it, as children with the same settings (``app.processes``), the commands
asked for: `feedloop up` runs a worker, the demo also the learner, trainer and swap controller.
``stop_services()`` ends the in-process parts in the event loop, ``stop_processes()`` the rest.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import structlog

import migrations
from app.broker import EmbeddedBroker
from app.liveness import Heartbeat
from app.processes import Child
from app.runtime import build_archiver, gateway_server, wait_started
from app.settings import Settings
from streams.store import make_engine, make_sessionmaker

log = structlog.get_logger(__name__)


class LocalLoop:
    def __init__(self, settings: Settings, commands: Sequence[str]) -> None:
        self.settings = settings
        self.commands = tuple(commands)
        self.logs = settings.data_dir / "logs"
        self.broker: EmbeddedBroker | None = None
        self.children: list[Child] = []
        self.server = self.gateway_task = self.archiver = self.archive_task = None
        self.heartbeats: list[tuple[Heartbeat, asyncio.Task]] = []  # of the gateway and the archiver here

    def start_broker_and_store(self) -> None:
        settings = self.settings
        self.logs.mkdir(parents=True, exist_ok=True)
        if settings.uses_embedded_broker:
            self.broker = EmbeddedBroker(settings.embedded_broker_port, self.logs / "broker.log")
            self.broker.start()
        migrations.upgrade(settings.store_url)

    async def start_services(self) -> None:
        """The archiver and the gateway here, then the child commands."""
        settings = self.settings
        self.archiver = await build_archiver(settings)
        self.archive_task = asyncio.create_task(self.archiver.run())
        self.server = gateway_server(settings)
        self.gateway_task = asyncio.create_task(self.server.serve())
        await wait_started(self.server, self.gateway_task)
        sessions = make_sessionmaker(make_engine(settings.store_url))
        for heartbeat in (Heartbeat("archiver", sessions, settings.liveness),
                          Heartbeat("gateway", sessions, settings.liveness, ready=lambda: self.server.started)):
            self.heartbeats.append((heartbeat, asyncio.create_task(heartbeat.run())))  # as `feedloop status` shows them
        for command in self.commands:
            self.children.append(Child([command], settings, self.logs / f"{command}.log").start())

    def check(self) -> None:
        """Fail fast, with its log, when a part of the loop died."""
        for child in self.children:
            if not child.running:
                raise RuntimeError(f"`feedloop {child.name}` exited:\n{child.log_tail()}")
        for task in (self.gateway_task, self.archive_task):
            if task is not None and task.done():
                task.result()  # its error, if it had one
                raise RuntimeError("the gateway or the archiver stopped")

    async def stop_services(self) -> None:
        """The gateway and the archiver, in this process: they finish what they hold."""
        if self.server is not None:
            self.server.should_exit = True
        if self.archiver is not None:
            self.archiver.stop()
        await asyncio.gather(*(t for t in (self.gateway_task, self.archive_task) if t), return_exceptions=True)
        for heartbeat, _ in self.heartbeats:
            heartbeat.stop()
        await asyncio.gather(*(beating for _, beating in self.heartbeats), return_exceptions=True)

    def stop_processes(self) -> None:
        """The child processes and the broker. Synchronous, so that it runs to the end even when
        the event loop is being torn down (Ctrl-C, SIGTERM)."""
        for child in self.children:
            child.stop()
        if self.broker is not None:
            self.broker.stop()


UP_COMMANDS = ("worker",)  # ingest only: no model, no vLLM, nothing trained


def run_up(settings: Settings, say=print) -> int:
    """`feedloop up`: broker, store, archiver, gateway and a worker until Ctrl-C or SIGTERM."""
    local = LocalLoop(settings, UP_COMMANDS)

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            local.start_broker_and_store()
            await local.start_services()
            say(f"feedloop is up: gateway http://{settings.gateway_host}:{settings.gateway_port}, broker "
                f"{settings.bootstrap_servers}, worker log {local.logs / 'worker.log'}; Ctrl-C stops everything")
            while not stop.is_set():
                local.check()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass
        finally:
            await local.stop_services()

    try:
        asyncio.run(main())
    except RuntimeError as exc:
        log.error("up.part_exited", detail=str(exc))
        return 1
    finally:
        local.stop_processes()
    return 0
