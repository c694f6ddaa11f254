"""Hot-swap latency on a real vLLM server: load an adapter -> first request it serves.

    .venv/bin/python benchmarks/serving_overhead.py [--swaps 30] [--model DIR] [--max-tokens 16]

Starts one vLLM server (the serving environment, see docs/serving.md) for a base model
(default: a tiny one built here in a temporary directory), loads the zero-delta adapter,
then ``--swaps`` times: validates a fresh adapter (new immutable name), loads it
(``POST /v1/load_lora_adapter``), sends the first request naming it, and unloads the
previous one. The baseline, measured in the same run, is the same request to an adapter
that is already warm: the ratio first-request / warm-request is the swap overhead. Also
prints the server's start time and resident memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.adapter_validation import AdapterSpec, AdapterValidator, adapter_sha256  # noqa: E402
from trainer.replicas import ReplicaClient  # noqa: E402
from trainer.serving import ensure_zero_delta_adapter  # noqa: E402
from trainer.vllm_server import VllmServer, VllmServerConfig, free_port  # noqa: E402

PROMPT = "<|im_start|>user\nWhat do horses eat?<|im_end|>\n<|im_start|>assistant\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):7.1f} ms   p99 {percentile(values, 0.99):7.1f} ms   mean {statistics.fmean(values):7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: build a tiny one)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    try:
        if args.model is None:
            from trainer.base_model import BaseModelConfig, build_base_model

            print("building a tiny base model ...", flush=True)
            args.model = build_base_model(work / "base", BaseModelConfig(num_chats=300, train_steps=40, batch_size=8))
        adapters_dir = work / "adapters"
        adapters_dir.mkdir()
        zero = ensure_zero_delta_adapter(args.model, adapters_dir)
        validator = AdapterValidator(adapters_dir, base_model_sha256=zero.base_model_sha256, max_lora_rank=8)
        validator.validate(zero)

        config = VllmServerConfig(model_path=args.model, served_model_name="bench-base", port=free_port(), dtype=args.dtype)
        with VllmServer(config) as server:
            rss = server.rss_bytes()
            client = ReplicaClient(server.url)
            client.load_adapter(zero.name, str(zero.path))
            for _ in range(3):  # warm-up
                client.complete(zero.name, PROMPT, max_tokens=args.max_tokens)

            validate_ms, load_ms, first_ms, swap_ms, warm_ms, unload_ms = [], [], [], [], [], []
            previous = None
            for i in range(args.swaps):
                # A fresh, immutable adapter: a copy of the zero-delta files under a new name.
                name = f"swap-{i:04d}"
                shutil.copytree(zero.path, adapters_dir / name)
                spec = AdapterSpec(name, adapters_dir / name, adapter_sha256(adapters_dir / name), zero.base_model_sha256)

                t0 = time.perf_counter()
                adapter = validator.validate(spec)
                t1 = time.perf_counter()
                client.load_adapter(name, str(adapter.path))
                t2 = time.perf_counter()
                client.complete(name, PROMPT, max_tokens=args.max_tokens)
                t3 = time.perf_counter()
                client.complete(zero.name, PROMPT, max_tokens=args.max_tokens)  # baseline: warm adapter
                t4 = time.perf_counter()
                if previous:
                    client.unload_adapter(previous)
                t5 = time.perf_counter()
                previous = name
                validate_ms.append((t1 - t0) * 1e3)
                load_ms.append((t2 - t1) * 1e3)
                first_ms.append((t3 - t2) * 1e3)
                swap_ms.append((t3 - t0) * 1e3)
                warm_ms.append((t4 - t3) * 1e3)
                unload_ms.append((t5 - t4) * 1e3)

        print()
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"server start (process -> /v1/models answers): {server.started_s:.1f} s, RSS {rss / 2**30:.2f} GiB")
        print(f"{args.swaps} swaps, {args.max_tokens} tokens per request, dtype {args.dtype}")
        print(f"  validate (sha256 + checks)        {fmt(validate_ms)}")
        print(f"  POST load_lora_adapter            {fmt(load_ms)}")
        print(f"  first request to the new adapter  {fmt(first_ms)}")
        print(f"  swap total (validate..first text) {fmt(swap_ms)}")
        print(f"  warm request (baseline)           {fmt(warm_ms)}")
        print(f"  POST unload_lora_adapter          {fmt(unload_ms)}")
        ratio = statistics.median(first_ms) / statistics.median(warm_ms)
        print(f"  first request / warm request (median ratio): {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
