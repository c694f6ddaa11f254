"""The loop on hosts that share no directory: only Kafka, PostgreSQL and an S3 bucket.

Ten processes on this machine, each with a local directory of its own and nothing else in
common: two gateways, two workers (two partitions), the archiver, two learners (one a
standby), the trainer, the swap controller and a vLLM replica that fetches adapters from the
bucket itself (``FEEDLOOP_SERVING__REPLICAS_FETCH``). Each host gets its own copy of the base
model, as each machine of a deployment has its image. The demo's population talks to both
gateways; once the trainer has made its first adapter from their feedback, the active
learner is SIGKILLed, and the standby must take over and carry the A/B test to a promotion.

Checks: an adapter trained from feedback is promoted and serves; the batches, archive, keys
and adapters are in the bucket and no batch, segment, key or ledger is on any local disk (the
privacy ledger, written with DP on, is tested on S3 in tests/trainer); the replica serves the champion from its own cache; the standby holds the lease; no
acknowledged event is missing from the archive; no adapter got two verdicts.

The population prefers detailed answers from the first turn (the tiny base model answers
concisely), so the first adapter gains tens of points and its test ends within minutes: the
loop, not the statistics (tests/learners), is what is tested here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from rich.console import Console

import migrations
from app.broker import ensure_topics
from app.processes import Child
from demo.base_model import ensure_base_model
from demo.driver import DEMO_APP, Driver, demo_settings, live_arms, registry
from demo.population import Population, PopulationConfig
from streams.archive import iter_archive
from streams.contract import AdapterState
from streams.store import make_engine, make_sessionmaker
from streams.topics import CONTROL, EVENTS
from tests.conftest import free_port, make_settings
from tests.integration.test_learner_failover import lease, read_topic
from tests.integration.test_pipeline_live import wait_for
from trainer.lora_resolver import storage_environment
from trainer.registry import NAME as TRAINED_NAME
from trainer.vllm_server import VllmServer, VllmServerConfig

INTERACTIONS = 1400  # turns offered; the traffic stops once an adapter is promoted
TRAFFIC_S = 13 * 60
PROCESSES = {  # host -> command
    "gateway-1": ["gateway"], "gateway-2": ["gateway"], "worker-1": ["worker"], "worker-2": ["worker"],
    "archiver": ["archive", "run"], "learner-1": ["learn"], "learner-2": ["learn"], "trainer": ["train"],
    "swap": ["swap"],
}  # fmt: skip


def local_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


class Hosts:
    """The processes, each on its "host" (a directory of its own); ``check`` fails on one that died."""

    def __init__(self, vllm: VllmServer) -> None:
        self.vllm = vllm
        self.children: dict[str, Child] = {}
        self.killed: str | None = None

    def check(self) -> None:
        for name, child in self.children.items():
            assert child.running or name == self.killed, f"{name} exited:\n{child.log_tail(40)}"
        assert self.vllm.running, f"vLLM exited:\n{self.vllm.log_tail()}"

    async def wait_listening(self, url: str, timeout_s: float = 120) -> None:
        """Until the gateway at ``url`` answers ``/healthz`` (its process started, the store migrated)."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            while True:
                self.check()
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"the gateway at {url} did not start within {timeout_s:.0f} s"
                await asyncio.sleep(0.5)

    def pid(self, name: str) -> int:
        return self.children[name].process.pid

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()
        self.vllm.stop()


@pytest.mark.timeout(1800)  # the base model, vLLM, and up to 13 minutes of traffic
async def test_the_loop_promotes_with_no_shared_directory_through_a_learner_failover(tmp_path, own_broker,
                                                                                    database_url, s3_storage):  # fmt: skip
    vllm_port = free_port()
    shared = make_settings(tmp_path, own_broker.port, database_url=database_url, storage=s3_storage,
                           vllm_urls=[f"http://127.0.0.1:{vllm_port}"], log_level="info")  # fmt: skip
    shared = demo_settings(shared)  # the demo's short windows and thresholds, and its app key
    shared = shared.model_copy(update={
        "topic_partitions": 2,  # one per worker
        "pipeline": shared.pipeline.model_copy(update={"batch_size": 80}),  # each partition curates its own
        "serving": shared.serving.model_copy(update={"replicas_fetch": True}),
    })  # fmt: skip
    built = tmp_path / "built-model"
    await asyncio.to_thread(ensure_base_model, shared.model_copy(update={"base_model_path": built}),
                            Console(stderr=True))  # fmt: skip
    migrations.upgrade(shared.store_url)
    await ensure_topics(shared)

    def host(name: str, **updates):
        root = tmp_path / "hosts" / name
        shutil.copytree(built, root / "model")
        return root, shared.model_copy(update={"data_dir": root / "data", "base_model_path": root / "model",
                                               **updates})  # fmt: skip

    (tmp_path / "logs").mkdir()
    vllm_root, _ = host("vllm")
    serving = shared.serving
    vllm = VllmServer(VllmServerConfig(model_path=vllm_root / "model", served_model_name=serving.served_model_name,
                                       port=vllm_port, max_lora_rank=serving.max_lora_rank,
                                       max_loras=serving.max_loras, log_path=tmp_path / "logs" / "vllm.log",
                                       env={**storage_environment(s3_storage),
                                            "FEEDLOOP_ADAPTER_DIR": str(vllm_root / "adapters")}))  # fmt: skip
    hosts = Hosts(vllm)
    roots = {"vllm": vllm_root}
    sessions = make_sessionmaker(make_engine(shared.store_url))
    try:
        await asyncio.to_thread(vllm.start, 600)
        gateways = []
        for name, command in PROCESSES.items():
            port = free_port()
            roots[name], settings = host(name, gateway_port=port)
            hosts.children[name] = Child(command, settings, tmp_path / "logs" / f"{name}.log").start()
            if name.startswith("gateway"):
                gateways.append(f"http://127.0.0.1:{port}")

        population = Population(PopulationConfig(interactions=INTERACTIONS, drift_fraction=0.0))
        key = shared.api_keys[DEMO_APP].get_secret_value()
        drivers = [Driver(population, url, key, ["base"]) for url in gateways]
        for url, driver in zip(gateways, drivers):
            await hosts.wait_listening(url)
            await driver.wait_for_base(hosts, timeout_s=600)

        stop = asyncio.Event()

        def turns():
            for turn in population.turns():  # shared by both gateways' users
                if stop.is_set():
                    return
                yield turn

        shared_turns = turns()
        deadline = time.monotonic() + TRAFFIC_S
        traffic = asyncio.gather(*(d.run(shared_turns, INTERACTIONS, deadline) for d in drivers))
        champion = None
        while not traffic.done():
            hosts.check()
            for driver in drivers:
                driver.arms = live_arms(sessions) or driver.arms
            rows = registry(sessions)
            if hosts.killed is None and any(TRAINED_NAME.match(r.name) for r in rows):
                holder = lease(sessions).holder
                hosts.killed = next(n for n in ("learner-1", "learner-2") if f":{hosts.pid(n)}:" in holder)
                os.killpg(hosts.pid(hosts.killed), signal.SIGKILL)  # its host dies
                print(f"first adapter trained; SIGKILLed the active learner ({hosts.killed})")
            champion = next((r for r in rows if r.state == AdapterState.CHAMPION and TRAINED_NAME.match(r.name)), None)
            if champion is not None and hosts.killed is not None:
                stop.set()  # the users finish the turns they are in
            await asyncio.wait([traffic], timeout=1.0)
        traffic.result()
        for driver in drivers:
            await driver.close()
        assert hosts.killed is not None, "no adapter was trained from the feedback"
        assert champion is not None, f"no adapter was promoted: {[(r.name, r.state) for r in registry(sessions)]}"
        standby = next(n for n in ("learner-1", "learner-2") if n != hosts.killed)
        held = lease(sessions)
        assert held.epoch >= 2 and f":{hosts.pid(standby)}:" in held.holder, "the standby took over"

        # Every event a gateway acknowledged is in the archive (in the bucket).
        objects = shared.objects
        sent = sum(d.traffic.sent_events for d in drivers)

        def archived_events() -> int:
            with sessions() as session:
                return sum(1 for _ in iter_archive(session, objects, EVENTS.name))

        await wait_for(lambda: archived_events() >= sent, 120, f"the archive to hold the {sent} events sent")
        served = [s.adapter for d in drivers for s in d.traffic.served]
        assert champion.name in served, "the champion served traffic"

        # The shared state is in the bucket, and none of it on a host's disk.
        for folder in ("batches", "archive", "keys", "adapters"):
            assert objects.keys(folder), f"nothing under {folder}/ of {objects.url}"
        on_disk = [p for root in roots.values() for p in local_files(root)
                   if re.search(r"(^|/)(batches|archive|keys|ledger)/", p.relative_to(root).as_posix())]  # fmt: skip
        assert not on_disk, f"shared state on a local disk: {on_disk[:5]}"
        cached = vllm_root / "adapters" / champion.name
        assert (cached / "adapter_model.safetensors").is_file(), "the replica serves the champion from its own cache"

        # Decisions not doubled across the failover: one verdict per adapter.
        verdicts = defaultdict(set)
        for event in await read_topic(shared, CONTROL.name):
            if event.get("type") in ("adapter_promoted", "adapter_rolled_back") and event.get("source") == "learners":
                verdicts[event["adapter"]].add(event["event_id"])
        assert verdicts[champion.name], "the promotion is on the control topic"
        assert all(len(ids) == 1 for ids in verdicts.values()), f"an adapter judged twice: {dict(verdicts)}"
    finally:
        await asyncio.to_thread(hosts.stop)
