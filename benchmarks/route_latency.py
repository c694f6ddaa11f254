"""Route decisions in process beside ``POST /v1/route`` over loopback HTTP, in one run.

    .venv/bin/python benchmarks/route_latency.py [--arms 5] [--decisions 20000] [--requests 2000] [--concurrency 8]

A learner state is trained on simulated examples and its router snapshot written to a fresh
SQLite store, as ``feedloop learn`` does. In process: the gateway's ``RoutingService`` loads
that snapshot and decides for varied contexts, one at a time (target p99 < 2 ms). Over HTTP:
``feedloop gateway`` runs as its own process (as in production, at the default log level, so
each decision is logged) on a fresh embedded broker, and is asked the same questions by one
keep-alive client (latency) and by ``--concurrency`` concurrent clients (throughput); ``GET
/healthz`` on the same server and client is the baseline: what HTTP costs before any routing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import migrations  # noqa: E402
from app.broker import EmbeddedBroker  # noqa: E402
from app.routing import RoutingService  # noqa: E402
from streams.config import LearnerSettings  # noqa: E402
from streams.store import make_engine, make_sessionmaker  # noqa: E402
from streams.contract import AnnotatedExample, Context  # noqa: E402
from streams.learner_agents import LiveLearner  # noqa: E402
from streams.objects import ObjectStore  # noqa: E402
from tests.conftest import free_port  # noqa: E402

API_KEY = "bench-key-0123456789"
DOMAINS = ("code", "chat", "math", "units", "travel")
T0 = datetime(2026, 11, 21, tzinfo=timezone.utc)


def contexts(rng: np.random.Generator, n: int) -> list[Context]:
    return [Context(domain=str(rng.choice(DOMAINS)), locale=str(rng.choice(["en", "fr", "de"])),
                    client=str(rng.choice(["web", "ios"])), cohort=str(rng.choice(["a", "b"])),
                    features={"prompt_tokens": int(rng.integers(5, 2000))}) for _ in range(n)]  # fmt: skip


def trained_store(url: str, data_dir: Path, arms: list[str], examples: int) -> LearnerSettings:
    """A store holding the snapshot of a router trained on ``examples`` simulated examples."""
    config = LearnerSettings(initial_arms=arms, ab_min_samples=10**9, ab_max_samples=None)
    migrations.upgrade(url)
    learner = LiveLearner(config, make_sessionmaker(make_engine(url)), objects=ObjectStore(data_dir.as_uri()),
                          consumer="bench", cluster_id="bench", snapshots_kept=1)  # fmt: skip
    rng = np.random.default_rng(0)
    for i, context in enumerate(contexts(rng, examples)):
        arm = arms[i % len(arms)]
        good = DOMAINS.index(context.domain) % len(arms) == arms.index(arm)
        at = T0 + timedelta(seconds=i)
        learner.state.learn_one(AnnotatedExample(
            example_id=f"i-{i}", app_id="bench", session_id=f"s-{i}", user="u", adapter=arm, propensity=1 / len(arms),
            cohort=context.cohort, domain=context.domain, context=context, prompt=[{"role": "user", "content": "q"}],
            response="a", rewards={"explicit": float(rng.random() < (0.8 if good else 0.4))}, feedback_kinds=["thumbs"],
            training_consent=True, occurred_at=at, closed_at=at, event_ids=[f"e-{i}"],
        ))  # fmt: skip
    asyncio.run(learner.save())
    return config


def summary(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    return {"per_s": len(ms) / wall_s, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def in_process(config: LearnerSettings, url: str, asks: list[Context]) -> dict[str, float]:
    routing = RoutingService(config, make_sessionmaker(make_engine(url)))
    assert routing.refresh(), "no snapshot in the store"
    for context in asks[:500]:  # warm-up
        routing.decide(context, "bench")
    latencies = []
    started = time.perf_counter()
    for context in asks:
        t = time.perf_counter()
        routing.decide(context, "bench")
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - started)


def start_gateway(url: str, broker_port: int, port: int, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "FEEDLOOP_DATABASE_URL": url, "FEEDLOOP_EMBEDDED_BROKER_PORT": str(broker_port),
           "FEEDLOOP_DATA_DIR": str(data_dir), "FEEDLOOP_API_KEYS": f'{{"bench": "{API_KEY}"}}',
           "FEEDLOOP_LOG_FORMAT": "json"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "app.cli", "gateway", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


async def over_http(base_url: str, asks: list[Context], requests: int, concurrency: int) -> tuple[dict, ...]:
    bodies = [{"context": c.model_dump(mode="json")} for c in asks[:requests]]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        deadline = time.monotonic() + 60
        while True:  # up, and routing with the trained snapshot
            try:
                answer = await http.post("/v1/route", json=bodies[0])
                if answer.status_code == 200 and answer.json()["snapshot_version"] > 0:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not start (or never loaded the snapshot) within 60 s")
            await asyncio.sleep(0.2)
        for body in bodies[:200]:  # warm-up
            await http.post("/v1/route", json=body)

        latencies = []
        started = time.perf_counter()
        for body in bodies:
            t = time.perf_counter()
            response = await http.post("/v1/route", json=body)
            latencies.append(time.perf_counter() - t)
            assert response.status_code == 200, response.text
        sequential = summary(latencies, time.perf_counter() - started)

        # Baseline: the same server and client answering the cheapest endpoint.
        latencies = []
        started = time.perf_counter()
        for _ in bodies:
            t = time.perf_counter()
            await http.get("/healthz")
            latencies.append(time.perf_counter() - t)
        baseline = summary(latencies, time.perf_counter() - started)

        concurrent_latencies: list[float] = []
        queue = iter(bodies)

        async def client() -> None:
            for body in queue:
                t = time.perf_counter()
                response = await http.post("/v1/route", json=body)
                concurrent_latencies.append(time.perf_counter() - t)
                assert response.status_code == 200, response.text

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        concurrent = summary(concurrent_latencies, time.perf_counter() - started)
    return baseline, sequential, concurrent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=5)
    parser.add_argument("--examples", type=int, default=5000, help="simulated examples the router learns from")
    parser.add_argument("--decisions", type=int, default=20_000, help="in-process decisions timed")
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests timed, per mode")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    arms = [f"adapter-{i}" for i in range(args.arms)]
    asks = contexts(np.random.default_rng(1), max(args.decisions, args.requests))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        url = f"sqlite:///{Path(tmp) / 'feedloop.db'}"
        config = trained_store(url, Path(tmp), arms, args.examples)
        local = in_process(config, url, asks[: args.decisions])
        gateway = start_gateway(url, broker.port, port := free_port(), Path(tmp))
        try:
            baseline, sequential, concurrent = asyncio.run(
                over_http(f"http://127.0.0.1:{port}", asks, args.requests, args.concurrency))
        finally:
            gateway.terminate()
            gateway.wait(30)

    print(f"route decisions, {args.arms} arms, d={config.feature_dim}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, Python {platform.python_version()}")
    print(f"{'':34}{'decisions/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    rows = [("in process (RoutingService.decide)", local), ("POST /v1/route, 1 client", sequential),
            (f"POST /v1/route, {args.concurrency} clients", concurrent),
            ("baseline: GET /healthz, 1 client", baseline)]  # fmt: skip
    for name, row in rows:
        print(f"{name:34}{row['per_s']:>12,.0f}{row['p50']:>9.3f}{row['p99']:>9.3f}")
    verdict = "meets" if local["p99"] < 2.0 else "MISSES"
    print(f"in-process p99 {local['p99']:.3f} ms {verdict} the 2 ms target")


if __name__ == "__main__":
    main()
