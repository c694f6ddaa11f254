"""feedloop's LoRA resolver for vLLM: a replica fetches approved adapters from the store.

Installed with feedloop in the vLLM environment, vLLM loads :func:`register` through the
``vllm.general_plugins`` entry point in each of its processes. It registers a resolver only
where ``FEEDLOOP_STORAGE__URL`` is set (object storage; with a shared directory the swap
controller sends paths instead), reading the same ``FEEDLOOP_STORAGE__*`` variables as every
feedloop process, and staging adapters under ``FEEDLOOP_ADAPTER_DIR`` (default: a folder in
the temporary directory), this replica's own disk. Needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``.

What it serves, and why it is safe to let vLLM ask: :meth:`AdapterStore.fetch_approved`
(``trainer.adapter_store``) stages a name only if the swap controller approved it, and
only bytes with the approved digest; anything else is "not found".
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from streams.objects import ObjectStorage
from trainer.adapter_store import AdapterStore, adapter_objects

RESOLVER_NAME = "feedloop"
_STORAGE_ENV = "FEEDLOOP_STORAGE__"


def storage_from_environment(environ: dict[str, str] | os._Environ = os.environ) -> ObjectStorage:
    """``FEEDLOOP_STORAGE__<FIELD>`` as feedloop's settings read them (vLLM's process has no
    feedloop settings of its own)."""
    values = {field: environ[_STORAGE_ENV + field.upper()] for field in ObjectStorage.model_fields
              if _STORAGE_ENV + field.upper() in environ}  # fmt: skip
    return ObjectStorage.model_validate(values)


def storage_environment(storage: ObjectStorage) -> dict[str, str]:
    """The ``FEEDLOOP_STORAGE__<FIELD>`` variables that ``storage_from_environment`` reads back:
    what a process launching vLLM (or any feedloop process) passes on, secrets included."""
    values = storage.model_dump()
    if storage.secret_access_key is not None:
        values["secret_access_key"] = storage.secret_access_key.get_secret_value()
    return {_STORAGE_ENV + field.upper(): str(value).lower() if isinstance(value, bool) else str(value)
            for field, value in values.items() if value is not None}  # fmt: skip


def register() -> None:
    """vLLM's plugin hook: register the resolver when there is object storage to read."""
    storage = storage_from_environment()
    if not storage.url:
        return
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    cache = Path(os.environ.get("FEEDLOOP_ADAPTER_DIR") or Path(tempfile.gettempdir()) / "feedloop-adapters")
    store = AdapterStore(adapter_objects(storage, cache), cache)

    class StoreResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            path = await asyncio.to_thread(store.fetch_approved, lora_name, cache)
            if path is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)), lora_path=str(path))

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, StoreResolver())
