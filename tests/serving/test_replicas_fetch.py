"""A vLLM replica on a disk of its own: it fetches adapters from object storage (SeaweedFS)
through feedloop's LoRA resolver, and only those the swap controller validated and approved.

Three hosts in one test: the trainer's adapters directory (where the session's adapters were
trained), the controller's own directory, and the replica's cache; they share only the S3
bucket. The replica is a real vLLM server from the serving environment, which has feedloop
installed for its plugin (Makefile, .venv-serve).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from streams.contract import AdapterLoaded, AdapterRolledBack, AdapterUnloaded, utcnow
from tests.serving.conftest import MAX_LORA_RANK, PROMPTS, SERVED_NAME, Models, Trained, registry_copy, server_config
from trainer.adapter_store import AdapterStore, adapter_objects
from trainer.adapter_validation import AdapterValidator
from trainer.hot_swap import SwapController
from trainer.lora_resolver import storage_environment
from trainer.replicas import AdapterNotLoaded, AdapterSet, HotSwapper, ReplicaClient
from trainer.vllm_server import VllmServer, free_port


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.storage("replicas-fetch")


@pytest.fixture(scope="module")
def fetching_server(models: Models, vllm_python: str, bucket, tmp_path_factory):
    cache = tmp_path_factory.mktemp("replica-cache")
    env = {**storage_environment(bucket), "FEEDLOOP_ADAPTER_DIR": str(cache)}
    config = replace(server_config(models, free_port(), tmp_path_factory.mktemp("vllm-fetch") / "replica.log"), env=env)
    running = VllmServer(config)
    running.start(timeout_s=300)
    try:
        yield running, cache
    finally:
        running.stop()


def answers(replica: ReplicaClient, adapter: str) -> list[str]:
    return [replica.complete(adapter, prompt, max_tokens=16) for prompt in PROMPTS[:3]]


def test_a_replica_serves_from_the_store_only_what_the_controller_approved(
    models: Models, trained: Trained, fetching_server, bucket, tmp_path
) -> None:
    server, cache = fetching_server
    trainer = AdapterStore(adapter_objects(bucket, models.adapters_dir), models.adapters_dir)
    for name in (models.zero.name, trained.concise.adapter, trained.detailed.adapter):
        trainer.publish(name, models.adapters_dir / name)
    controller_dir = tmp_path / "controller-adapters"
    store = AdapterStore(adapter_objects(bucket, controller_dir), controller_dir)
    base = replace(models.zero, path=store.stage(models.zero.name, models.zero.sha256))
    validator = AdapterValidator(controller_dir, base_model_sha256=models.base_sha256, max_lora_rank=MAX_LORA_RANK,
                                 served_model_name=SERVED_NAME)  # fmt: skip
    clock = Clock()
    with ReplicaClient(server.url) as replica:
        with pytest.raises(AdapterNotLoaded):  # its files are in the bucket, but nobody validated them
            replica.complete(trained.concise.adapter, PROMPTS[0], max_tokens=4)
        controller = SwapController(registry_copy(trained, tmp_path), HotSwapper(AdapterSet(validator, base),
                                    [server.url], fetch=True), drain_s=5.0, reconcile_interval_s=60.0,
                                    max_challengers=2, clock=clock, store=store)  # fmt: skip
        loaded = [e for ready in (trained.concise, trained.detailed) for e in controller.handle(ready)
                  if isinstance(e, AdapterLoaded)]  # fmt: skip
        assert [e.adapter for e in loaded] == [trained.concise.adapter, trained.detailed.adapter]

        serving = replica.list_adapters()
        assert set(serving) == {models.zero.name, trained.concise.adapter, trained.detailed.adapter}
        assert all(path.startswith(str(cache)) for path in serving.values())  # the replica's own copies
        assert (controller_dir / trained.concise.adapter).is_dir()  # validated on the controller's disk
        zero, concise, detailed = (answers(replica, name) for name in serving)
        assert concise != zero and detailed != concise

        controller.handle(AdapterRolledBack(event_id="rolled-back-concise", occurred_at=utcnow(), source="learner",
                                            adapter=trained.concise.adapter, reason="test"))  # fmt: skip
        clock.now += 6.0  # past the drain
        unloaded = [e for e in controller.tick() if isinstance(e, AdapterUnloaded)]
        assert [e.adapter for e in unloaded] == [trained.concise.adapter]
        assert store.approved(trained.concise.adapter) is None
        with pytest.raises(AdapterNotLoaded):  # a client naming it cannot bring it back
            replica.complete(trained.concise.adapter, PROMPTS[0], max_tokens=4)
        assert set(replica.list_adapters()) == {models.zero.name, trained.detailed.adapter}
