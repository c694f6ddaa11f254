"""Serving on a real vLLM server: hot-swap latency, and the chat gateway beside direct vLLM.

    .venv/bin/python benchmarks/serving_overhead.py [--swaps 30] [--requests 200] [--concurrency 8]

One vLLM server (the serving environment, docs/serving.md) for a tiny base model built here,
one embedded broker, one store and the gateway (`feedloop gateway`, its own process), then:

1. Hot swap, ``--swaps`` times: a fresh adapter (new immutable name) is registered and its
   ``adapter_ready`` handed to the hot-swap controller, which validates it, loads it on the
   replica, verifies ``/v1/models`` and writes the registry (-> ``adapter_loaded``); then the
   first request names it. Baseline in the same run: the same request to a warm adapter.
2. Chat gateway overhead: ``--requests`` pairs, one after the other, of the same chat request
   straight to vLLM and through the gateway (route, forward, record the interaction with
   acks=all). The per-pair difference carries vLLM's own variance on a shared CPU; the
   gateway's ``Server-Timing`` header (its time minus the upstream call) isolates what it adds.
3. Tokens/s with ``--concurrency`` requests in flight, direct and through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

import migrations  # noqa: E402
from app.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from app.settings import Settings  # noqa: E402
from streams.store import Adapter, make_engine, make_sessionmaker  # noqa: E402
from streams.contract import AdapterReady, AdapterState, utcnow  # noqa: E402
from trainer.adapter_validation import AdapterValidator, adapter_sha256  # noqa: E402
from trainer.hot_swap import SwapController  # noqa: E402
from trainer.replicas import AdapterSet, HotSwapper, ReplicaClient  # noqa: E402
from trainer.serving import ensure_zero_delta_adapter  # noqa: E402
from trainer.vllm_server import VllmServer, VllmServerConfig, free_port  # noqa: E402

SERVED = "bench-base"
KEY = "bench-key-0123456789"
PROMPT = "<|im_start|>user\nWhat do horses eat?<|im_end|>\n<|im_start|>assistant\n"
MESSAGES = [{"role": "user", "content": "What do horses eat?"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):7.1f} ms   p99 {percentile(values, 0.99):7.1f} ms   mean {statistics.fmean(values):7.1f} ms"


def swaps(controller: SwapController, sessions, zero, adapters_dir: Path, count: int, max_tokens: int) -> None:
    client = controller.swapper.clients[0]
    ready_ms, first_ms, total_ms, warm_ms = [], [], [], []
    for i in range(count):
        name = f"adapter-{i + 1:06d}-00000000"
        path = adapters_dir / name
        shutil.copytree(zero.path, path)  # a fresh, immutable adapter: the zero-delta files renamed
        sha = adapter_sha256(path)
        with sessions.begin() as session:
            session.add(Adapter(name=name, state=AdapterState.READY, path=str(path), sha256=sha,
                                base_model_sha256=zero.base_model_sha256, lineage={}))  # fmt: skip
        event = AdapterReady(event_id=f"adapter-ready-{name}", occurred_at=utcnow(), source="bench", adapter=name,
                             path=str(path), sha256=sha, base_model_sha256=zero.base_model_sha256)  # fmt: skip
        t0 = time.perf_counter()
        announced = controller.handle(event)  # adapter_loaded, and adapter_unloaded of the one before
        t1 = time.perf_counter()
        assert announced[0].type == "adapter_loaded", announced
        client.complete(name, PROMPT, max_tokens=max_tokens)
        t2 = time.perf_counter()
        client.complete(zero.name, PROMPT, max_tokens=max_tokens)
        t3 = time.perf_counter()
        ready_ms.append((t1 - t0) * 1e3)
        first_ms.append((t2 - t1) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
        warm_ms.append((t3 - t2) * 1e3)
        controller.adapters.retire(name)  # keep the replica's slots for the next one
    controller.swapper.reconcile()
    print(f"1. hot swap, {count} adapters, {max_tokens} tokens per request")
    print(f"   adapter_ready -> adapter_loaded (validate, load, verify, registry)  {fmt(ready_ms)}")
    print(f"   first request to the new adapter                                  {fmt(first_ms)}")
    print(f"   adapter_ready -> first request served                             {fmt(total_ms)}")
    print(f"   warm request (baseline)                                           {fmt(warm_ms)}")
    print(f"   first / warm (median ratio): {statistics.median(first_ms) / statistics.median(warm_ms):.2f}")


async def chat(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, headers=None) -> tuple[float, int, float]:
    """Client-side milliseconds, completion tokens, and the gateway's own Server-Timing share."""
    t0 = time.perf_counter()
    response = await client.post(url, json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens,
                                            "temperature": 0}, headers=headers)  # fmt: skip
    elapsed = (time.perf_counter() - t0) * 1e3
    response.raise_for_status()
    timing = dict(part.strip().split(";dur=") for part in response.headers.get("server-timing", "").split(",") if part)
    return elapsed, response.json()["usage"]["completion_tokens"], float(timing.get("gateway", "nan"))


async def gateway_vs_direct(vllm_url: str, gateway_url: str, zero_name: str, args) -> None:
    direct_url, via_url = f"{vllm_url}/v1/chat/completions", f"{gateway_url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(5):  # warm-up both paths
            await chat(client, direct_url, zero_name, args.max_tokens)
            await chat(client, via_url, "auto", args.max_tokens, auth)
        direct, via, overhead, inside = [], [], [], []
        for _ in range(args.requests):
            d, _, _ = await chat(client, direct_url, zero_name, args.max_tokens)
            g, _, own = await chat(client, via_url, "auto", args.max_tokens, auth)
            direct.append(d)
            via.append(g)
            overhead.append(g - d)
            inside.append(own)
        print(f"2. chat gateway vs direct vLLM, {args.requests} sequential pairs, {args.max_tokens} tokens")
        print(f"   direct vLLM        {fmt(direct)}")
        print(f"   through gateway    {fmt(via)}")
        print(f"   overhead per pair  {fmt(overhead)}   (vLLM's own variance included)")
        print(f"   gateway's own time {fmt(inside)}   (Server-Timing: total - upstream; target p99 < 10 ms)")

        async def load(url: str, model: str, headers=None) -> float:
            total = args.concurrency * 8
            queue = iter(range(total))
            tokens = 0

            async def worker() -> None:
                nonlocal tokens
                for _ in queue:
                    tokens += (await chat(client, url, model, args.max_tokens, headers))[1]

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            return tokens / (time.perf_counter() - t0)

        direct_tps = await load(direct_url, zero_name)
        via_tps = await load(via_url, "auto", auth)
        print(f"3. tokens/s with {args.concurrency} requests in flight")
        print(f"   direct vLLM {direct_tps:8.1f} tokens/s   through gateway {via_tps:8.1f} tokens/s   "
              f"ratio {via_tps / direct_tps:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    gateway = None
    try:
        from demo.base_model import ToyChats, build_tiny_model
        from trainer.base_model import BaseModelConfig

        print("building a tiny base model ...", flush=True)
        model = build_tiny_model(work / "base", ToyChats(count=300), BaseModelConfig(train_steps=40, batch_size=8))
        adapters_dir = work / "adapters"
        adapters_dir.mkdir()
        zero = ensure_zero_delta_adapter(model, adapters_dir)
        store = f"sqlite:///{work / 'feedloop.db'}"
        migrations.upgrade(store)
        sessions = make_sessionmaker(make_engine(store))
        validator = AdapterValidator(adapters_dir, base_model_sha256=zero.base_model_sha256, max_lora_rank=8,
                                     served_model_name=SERVED)  # fmt: skip

        config = VllmServerConfig(model_path=model, served_model_name=SERVED, port=free_port(), dtype=args.dtype)
        with EmbeddedBroker(free_port()) as broker, VllmServer(config) as server:
            controller = SwapController(sessions, HotSwapper(AdapterSet(validator, zero), [ReplicaClient(server.url)]),
                                        drain_s=0, reconcile_interval_s=3600, max_challengers=args.swaps + 1)  # fmt: skip
            controller.resume()  # loads the zero-delta adapter
            env = {**os.environ, "FEEDLOOP_BROKER": "embedded", "FEEDLOOP_EMBEDDED_BROKER_PORT": str(broker.port),
                   "FEEDLOOP_DATABASE_URL": store, "FEEDLOOP_DATA_DIR": str(work / "data"),
                   "FEEDLOOP_BASE_MODEL_PATH": str(model), "FEEDLOOP_ADAPTER_DIR": str(adapters_dir),
                   "FEEDLOOP_VLLM_URLS": f'["{server.url}"]', "FEEDLOOP_SERVING__SERVED_MODEL_NAME": SERVED,
                   "FEEDLOOP_API_KEYS": f'{{"bench": "{KEY}"}}', "FEEDLOOP_GATEWAY_PORT": str(free_port()),
                   "FEEDLOOP_LOG_LEVEL": "warning"}  # fmt: skip
            asyncio.run(ensure_topics(Settings(broker="embedded", embedded_broker_port=broker.port)))
            gateway_url = f"http://127.0.0.1:{env['FEEDLOOP_GATEWAY_PORT']}"
            gateway = subprocess.Popen([str(Path(sys.executable).with_name("feedloop")), "gateway"], env=env)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{gateway_url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError("the gateway did not start")
                time.sleep(0.2)

            print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                  f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
            print(f"vLLM start {server.started_s:.1f} s, RSS {server.rss_bytes() / 2**30:.2f} GiB, dtype {args.dtype}")
            swaps(controller, sessions, zero, adapters_dir, args.swaps, args.max_tokens)
            asyncio.run(gateway_vs_direct(server.url, gateway_url, zero.name, args))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
