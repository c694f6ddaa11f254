"""Gateway ingest throughput beside a bare aiokafka producer, in one run on one broker.

    .venv/bin/python benchmarks/gateway_ingest.py [--events 20000] [--batch 500] [--concurrency 4]

Both sides publish the same canonical event payloads, keyed by session id, with acks=all,
to a fresh embedded broker. The gateway runs as its own process (`feedloop gateway`), as in
production, and is driven over loopback HTTP by concurrent posts of `--batch` events. The
ratio gateway / bare producer is the figure to watch; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from app.settings import Settings  # noqa: E402
from streams.contract import USER_EVENT_ADAPTER  # noqa: E402
from streams.topics import EVENTS  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.factories import feedback, interaction  # noqa: E402

API_KEY = "bench-key-0123456789"


def make_events(count: int) -> list[dict]:
    events = []
    while len(events) < count:
        turn = interaction(app_id="bench")
        events += [turn, feedback(turn, "thumbs", app_id="bench")]
    return events[:count]


async def bare_producer(bootstrap: str, events: list[dict], batch: int) -> float:
    """events/s of aiokafka alone: validate nothing, send the canonical payloads."""
    payloads = [
        (e["session_id"].encode(), USER_EVENT_ADAPTER.validate_python(e).model_dump_json().encode())
        for e in events
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        started = time.perf_counter()
        for i in range(0, len(payloads), batch):
            pending = [await producer.send(EVENTS.name, v, key=k) for k, v in payloads[i : i + batch]]
            await asyncio.gather(*pending)
        return len(payloads) / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def through_gateway(base_url: str, events: list[dict], batch: int, concurrency: int) -> tuple[float, int]:
    bodies = [json.dumps(events[i : i + batch]).encode() for i in range(0, len(events), batch)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    accepted = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            response = await http.post(
                "/v1/events", content=body,
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )  # fmt: skip
            response.raise_for_status()
            accepted += response.json()["accepted"]

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return accepted / (time.perf_counter() - started), accepted


def start_gateway(broker_port: int, gateway_port: int, data_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "FEEDLOOP_EMBEDDED_BROKER_PORT": str(broker_port),
        "FEEDLOOP_GATEWAY_PORT": str(gateway_port),
        "FEEDLOOP_API_KEYS": json.dumps({"bench": API_KEY}),
        "FEEDLOOP_DATA_DIR": str(data_dir),
        "FEEDLOOP_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "gateway"], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{gateway_port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("gateway did not start")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    events = make_events(args.events)
    with EmbeddedBroker(free_port()) as broker:
        await ensure_topics(Settings(embedded_broker_port=broker.port))
        gateway_port = free_port()
        gateway = start_gateway(broker.port, gateway_port, Path("/tmp/feedloop-bench"))
        try:
            await through_gateway(f"http://127.0.0.1:{gateway_port}", events[:1000], args.batch, 2)  # warm-up
            bare = await bare_producer(broker.bootstrap_servers, events, args.batch)
            rate, accepted = await through_gateway(
                f"http://127.0.0.1:{gateway_port}", events, args.batch, args.concurrency
            )
        finally:
            gateway.terminate()
            gateway.wait(10)
    assert accepted == len(events), f"gateway accepted {accepted} of {len(events)}"
    size = sum(len(json.dumps(e)) for e in events) / len(events)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"events: {len(events)} (~{size:.0f} bytes each), batch {args.batch}, concurrency {args.concurrency}")
    print(f"{'path':<40}{'events/s':>12}{'ratio':>8}")
    print(f"{'bare aiokafka producer (baseline)':<40}{bare:>12,.0f}{1.0:>8.2f}")
    print(f"{'gateway POST /v1/events (validated)':<40}{rate:>12,.0f}{rate / bare:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
