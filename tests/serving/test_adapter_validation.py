"""Adapter validation: every way an adapter can be wrong is refused with its reason.

Files only (no vLLM server): refusals happen before any replica hears of the adapter; the
served set staying untouched is checked against the real server in test_hotswap.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from tests.serving.conftest import MAX_LORA_RANK, SERVED_NAME, Models, save_random_adapter
from trainer.adapter_validation import AdapterRefused, AdapterSpec, adapter_sha256
from trainer.replicas import ReplicaClient, ReplicaUnavailable, Retry
from trainer.serving import BASE_ALIAS, model_for, zero_delta_name
from trainer.vllm_server import free_port


def copy_adapter(models: Models, source: AdapterSpec, dest) -> AdapterSpec:
    shutil.copytree(source.path, dest)
    return AdapterSpec(dest.name, dest, adapter_sha256(dest), models.base_sha256)


def refusal(models: Models, spec: AdapterSpec, **validator) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as caught:
        models.validator(**validator).validate(spec)
    return caught.value


def test_good_adapters_pass_with_their_real_paths(models: Models):
    validator = models.validator()
    for spec in (models.zero, models.alpha, models.beta):
        adapter = validator.validate(spec)
        assert adapter.path == spec.path.resolve()
        assert adapter.rank == MAX_LORA_RANK
        assert adapter.sha256 == spec.sha256
    assert set(validator.known) == {models.zero.name, "alpha-v1", "beta-v1"}


def test_bad_checksum(models: Models, tmp_path):
    spec = copy_adapter(models, models.alpha, models.adapters_dir / "corrupt-v1")
    weights = spec.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last tensor
    weights.write_bytes(bytes(data))
    assert refusal(models, spec).reason == "checksum_mismatch"
    # A changed config (e.g. lora_alpha) changes the digest too.
    spec2 = copy_adapter(models, models.alpha, models.adapters_dir / "alpha-tweaked-v1")
    config = json.loads((spec2.path / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (spec2.path / "adapter_config.json").write_text(json.dumps(config))
    assert refusal(models, spec2).reason == "checksum_mismatch"


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_file(models: Models, missing: str):
    spec = copy_adapter(models, models.alpha, models.adapters_dir / f"missing-{missing.split('.')[0]}-v1")
    (spec.path / missing).unlink()
    assert refusal(models, spec).reason == "missing_file"


def test_missing_directory(models: Models):
    spec = AdapterSpec("ghost-v1", models.adapters_dir / "ghost-v1", "0" * 64, models.base_sha256)
    assert refusal(models, spec).reason == "missing_file"


def test_rank_above_the_server_maximum(models: Models):
    path = save_random_adapter(models.base_dir, models.adapters_dir / "rank16-v1", seed=3, rank=2 * MAX_LORA_RANK)
    spec = AdapterSpec("rank16-v1", path, adapter_sha256(path), models.base_sha256)
    assert refusal(models, spec).reason == "rank_too_high"
    # The same adapter passes where the server allows rank 16.
    assert models.validator(max_lora_rank=16).validate(spec).rank == 16


def test_weights_that_disagree_with_the_config(models: Models):
    spec = copy_adapter(models, models.alpha, models.adapters_dir / "liar-v1")
    config_file = spec.path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 4  # the tensors have rank 8
    config_file.write_text(json.dumps(config))
    spec = replace(spec, sha256=adapter_sha256(spec.path))
    refused = refusal(models, spec)
    assert refused.reason == "bad_weights" and "rank 4" in refused.detail


def test_truncated_weights(models: Models):
    spec = copy_adapter(models, models.alpha, models.adapters_dir / "truncated-v1")
    weights = spec.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    spec = replace(spec, sha256=adapter_sha256(spec.path))  # matching digest: the parse must catch it
    assert refusal(models, spec).reason == "bad_weights"


@pytest.mark.parametrize(
    "path",
    [
        "../outside/evil-v1",  # relative, climbs out
        "{adapters}/../outside/evil-v1",  # absolute with ..
        "{outside}/evil-v1",  # plainly elsewhere
        "{adapters}",  # the adapters directory itself
    ],
)
def test_path_outside_the_adapters_dir(models: Models, path: str):
    evil = models.outside_dir / "evil-v1"
    if not evil.exists():
        shutil.copytree(models.alpha.path, evil)  # a perfectly good adapter, in the wrong place
    raw = path.format(adapters=models.adapters_dir, outside=models.outside_dir)
    spec = AdapterSpec("evil-v1", raw, adapter_sha256(evil), models.base_sha256)
    assert refusal(models, spec).reason == "outside_adapters_dir"


def test_symlink_escapes(models: Models):
    evil = models.outside_dir / "linked-v1"
    shutil.copytree(models.alpha.path, evil)
    link = models.adapters_dir / "linked-v1"
    link.symlink_to(evil, target_is_directory=True)
    spec = AdapterSpec("linked-v1", link, adapter_sha256(evil), models.base_sha256)
    assert refusal(models, spec).reason == "outside_adapters_dir"

    # A real directory whose weights file is a link out of it.
    partial = models.adapters_dir / "partial-link-v1"
    partial.mkdir()
    shutil.copy(models.alpha.path / "adapter_config.json", partial)
    (partial / "adapter_model.safetensors").symlink_to(evil / "adapter_model.safetensors")
    spec = AdapterSpec("partial-link-v1", partial, adapter_sha256(partial), models.base_sha256)
    assert refusal(models, spec).reason == "outside_adapters_dir"


def test_base_model_mismatch_and_unknown(models: Models):
    assert refusal(models, replace(models.alpha, base_model_sha256="f" * 64)).reason == "base_model_mismatch"
    assert refusal(models, models.alpha, base_model_sha256="e" * 64).reason == "base_model_mismatch"
    # No recorded digest: the config's base_model_name_or_path is this base, so it passes...
    assert models.validator().validate(replace(models.alpha, base_model_sha256=None)).name == "alpha-v1"
    # ...and an adapter naming a base that is not here is refused.
    spec = copy_adapter(models, models.alpha, models.adapters_dir / "nobase-v1")
    config = json.loads((spec.path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (spec.path / "adapter_config.json").write_text(json.dumps(config))
    spec = AdapterSpec(spec.name, spec.path, adapter_sha256(spec.path), None)
    assert refusal(models, spec).reason == "base_model_unknown"


@pytest.mark.parametrize(
    "name", ["", "../alpha-v1", "a/b", "-lead", "trail-", "two..dots", "sp ace", "x" * 129, "ünï", "a:b", SERVED_NAME]
)
def test_bad_names(models: Models, name: str):
    assert refusal(models, replace(models.alpha, name=name)).reason == "bad_name"


def test_names_are_never_reused(models: Models):
    # Known from the registry with other files.
    assert refusal(models, models.alpha, known={"alpha-v1": "0" * 64}).reason == "name_reused"
    # Seen by this validator: beta's files under alpha's name.
    validator = models.validator()
    validator.validate(models.alpha)
    validator.validate(models.alpha)  # the same adapter again is fine (idempotent)
    with pytest.raises(AdapterRefused) as caught:
        validator.validate(replace(models.beta, name="alpha-v1"))
    assert caught.value.reason == "name_reused"


def test_base_traffic_maps_to_the_zero_delta_adapter(models: Models):
    zero = models.zero.name
    assert zero == zero_delta_name(models.base_sha256, MAX_LORA_RANK)
    for asked in (None, "", BASE_ALIAS, SERVED_NAME):
        assert model_for(asked, base_adapter=zero, served_model_name=SERVED_NAME) == zero
    assert model_for("alpha-v1", base_adapter=zero, served_model_name=SERVED_NAME) == "alpha-v1"
    with pytest.raises(AdapterRefused):
        model_for("../etc", base_adapter=zero)


def test_zero_delta_adapter_is_reproducible(models: Models, tmp_path):
    from trainer.serving import ensure_zero_delta_adapter

    again = ensure_zero_delta_adapter(models.base_dir, tmp_path, rank=MAX_LORA_RANK)
    assert (again.name, again.sha256) == (models.zero.name, models.zero.sha256)


def test_connection_errors_are_retried_with_exponential_backoff():
    slept: list[float] = []
    client = ReplicaClient(
        f"http://127.0.0.1:{free_port()}", retry=Retry(attempts=5, delay_s=0.1, max_delay_s=0.3), sleep=slept.append
    )
    with pytest.raises(ReplicaUnavailable):
        client.list_adapters()
    assert slept == [0.1, 0.2, 0.3, 0.3]
