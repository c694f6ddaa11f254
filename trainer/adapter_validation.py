"""Check a LoRA adapter before any replica hears of it.

vLLM loads whatever path it is given, and a bad adapter can cost a replica (an unreadable
file, a rank above ``--max-lora-rank``) or, worse, serve quietly wrong text (weights for
another base model, a file changed after it was evaluated). So every adapter passes
:class:`AdapterValidator` first, and is refused with a reason code when it does not:

==========================  =======================================================
reason                      meaning
==========================  =======================================================
``bad_name``                name does not match :data:`ADAPTER_NAME_PATTERN`, or is the
                            served base model's name
``name_reused``             the name was seen before with other files (names are immutable)
``outside_adapters_dir``    the path (after resolving ``..`` and symlinks) leaves the
                            adapters directory, or a file in it is a symlink leading out
``missing_file``            ``adapter_config.json`` or ``adapter_model.safetensors`` absent
``checksum_mismatch``       :func:`adapter_sha256` differs from the expected digest
``bad_config``              unreadable ``adapter_config.json``, not a LoRA adapter, DoRA, ...
``bad_weights``             ``adapter_model.safetensors`` truncated, unparsable, or its
                            tensor shapes disagree with the config's rank
``rank_too_high``           rank above the server's ``--max-lora-rank``
``base_model_mismatch``     trained on another base model than the one served
``base_model_unknown``      no way to tell which base model it was trained on
==========================  =======================================================

Plain Python and the standard library only: it runs in the trainer, the hot-swapper and
the tests, and never imports torch or vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

# A strict subset of the event contract's Id: letters, digits, '.', '_', '-', starting and
# ending with a letter or digit, no '..', at most 128 characters (the registry's column).
# No '/' or ':' so a name can never be read as a path or a URL.
ADAPTER_NAME_PATTERN = re.compile(r"^(?!.*\.\.)[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")

BASE_MODEL_METADATA = "feedloop_model.json"  # written by trainer.base_model
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class AdapterRefused(ValueError):
    """The adapter must not be served; ``reason`` is one of the codes of this module."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"adapter {name!r} refused ({reason}): {detail}")
        self.name = name
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AdapterSpec:
    """What the trainer announces (``AdapterReady``): a name, where it is, what it must hash to."""

    name: str
    path: str | Path
    sha256: str
    base_model_sha256: str | None = None

    @classmethod
    def from_event(cls, event) -> AdapterSpec:
        """From a ``streams.contract.AdapterReady`` (or anything with the same fields)."""
        return cls(event.adapter, event.path, event.sha256, event.base_model_sha256)


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check; ``path`` is the resolved, real path to load."""

    name: str
    path: Path
    sha256: str
    rank: int
    base_model_sha256: str
    target_modules: tuple[str, ...] = field(default=())


def adapter_sha256(adapter_dir: str | Path) -> str:
    """The digest of an adapter: both files, in a fixed order, each with its name and size.

    Covers the config as well as the weights: a changed ``lora_alpha`` or rank changes the
    output as surely as changed weights do. The trainer puts this in ``AdapterReady.sha256``.
    """
    digest = hashlib.sha256(b"feedloop-adapter-v1\0")
    for name in ADAPTER_FILES:
        file = Path(adapter_dir) / name
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_model_sha256(model_dir: str | Path) -> str:
    """sha256 of a base model's weights: from ``feedloop_model.json`` if there, else hashed."""
    model_dir = Path(model_dir)
    metadata = model_dir / BASE_MODEL_METADATA
    if metadata.is_file():
        recorded = json.loads(metadata.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    digest = hashlib.sha256()
    if len(files) == 1:  # the same value as trainer.base_model.weights_sha256
        with open(files[0], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    for file in files:  # sharded checkpoints: name + content of every shard
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_name(name: str, *, reserved: tuple[str, ...] = ()) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise AdapterRefused(str(name), "bad_name", f"must match {ADAPTER_NAME_PATTERN.pattern}")
    if name in reserved:
        raise AdapterRefused(name, "bad_name", "is the served base model's own name")
    return name


class AdapterValidator:
    """Validates adapters for one served base model and one adapters directory.

    ``known`` maps every adapter name ever used (from the registry, ``streams.store.Adapter``)
    to its sha256; names validated here are added to it, so a name is never reused for
    different files, even after the adapter was retired.
    """

    def __init__(
        self,
        adapters_dir: str | Path,
        *,
        base_model_sha256: str,
        max_lora_rank: int,
        served_model_name: str | None = None,
        known: Mapping[str, str] | None = None,
    ) -> None:
        self.adapters_dir = Path(os.path.realpath(adapters_dir))
        self.base_model_sha256 = base_model_sha256
        self.max_lora_rank = max_lora_rank
        self.reserved = (served_model_name,) if served_model_name else ()
        self.known: dict[str, str] = dict(known or {})

    def validate(self, spec: AdapterSpec) -> ValidatedAdapter:
        """The checked adapter, or :class:`AdapterRefused`. Reads files only; no network."""
        name = check_name(spec.name, reserved=self.reserved)
        previous = self.known.get(name)
        if previous is not None and previous != spec.sha256:
            raise AdapterRefused(name, "name_reused", "this name was used before for other files; pick a new version")
        path = self._confined(name, spec.path)

        config = self._read_config(name, path)
        rank = self._rank(name, config)
        self._check_weights(name, path / WEIGHTS_FILE, rank)
        actual = adapter_sha256(path)
        if actual != spec.sha256:
            raise AdapterRefused(name, "checksum_mismatch", f"expected {spec.sha256}, files hash to {actual}")
        self._check_base(name, spec, config)

        self.known[name] = spec.sha256
        return ValidatedAdapter(
            name=name,
            path=path,
            sha256=actual,
            rank=rank,
            base_model_sha256=self.base_model_sha256,
            target_modules=tuple(sorted(_as_list(config.get("target_modules")))),
        )

    # --- the checks --------------------------------------------------------------------

    def _confined(self, name: str, raw: str | Path) -> Path:
        text = os.fspath(raw)
        if not text or "\0" in text:
            raise AdapterRefused(name, "outside_adapters_dir", "empty path or NUL byte")
        candidate = Path(text)
        if not candidate.is_absolute():
            candidate = self.adapters_dir / candidate
        real = Path(os.path.realpath(candidate))  # resolves '..' and every symlink
        if real == self.adapters_dir or not real.is_relative_to(self.adapters_dir):
            raise AdapterRefused(name, "outside_adapters_dir", f"{text} resolves to {real}, outside {self.adapters_dir}")
        if not real.is_dir():
            raise AdapterRefused(name, "missing_file", f"{real} is not a directory")
        for file in ADAPTER_FILES:
            entry = real / file
            if not entry.exists():
                raise AdapterRefused(name, "missing_file", f"{file} not in {real}")
            target = Path(os.path.realpath(entry))
            if not target.is_relative_to(real) or not target.is_file():
                raise AdapterRefused(name, "outside_adapters_dir", f"{file} is a link to {target}")
        return real

    def _read_config(self, name: str, path: Path) -> dict:
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterRefused(name, "bad_config", f"{CONFIG_FILE}: {exc}") from exc
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise AdapterRefused(name, "bad_config", "not a LoRA adapter config")
        if config.get("use_dora"):
            raise AdapterRefused(name, "bad_config", "DoRA adapters are not served by vLLM")
        if config.get("modules_to_save"):
            raise AdapterRefused(name, "bad_config", "modules_to_save (full layers) are not supported by vLLM")
        return config

    def _rank(self, name: str, config: dict) -> int:
        ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise AdapterRefused(name, "bad_config", f"bad rank in {CONFIG_FILE}: {ranks}")
        rank = max(ranks)
        if rank > self.max_lora_rank:
            raise AdapterRefused(name, "rank_too_high", f"rank {rank} > the server's --max-lora-rank {self.max_lora_rank}")
        return rank

    def _check_weights(self, name: str, file: Path, rank: int) -> None:
        """Parse the safetensors header: every tensor inside the file, LoRA shapes of rank <= r."""
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
                    raise ValueError(f"header length {header_len} beyond the file")
                header = json.loads(handle.read(header_len))
        except (OSError, struct.error, ValueError) as exc:
            raise AdapterRefused(name, "bad_weights", f"{WEIGHTS_FILE}: {exc}") from exc
        data_len = size - 8 - header_len
        tensors = {key: value for key, value in header.items() if key != "__metadata__"}
        if not tensors:
            raise AdapterRefused(name, "bad_weights", "no tensors")
        for key, info in tensors.items():
            try:
                start, end = info["data_offsets"]
                shape = info["shape"]
            except (KeyError, TypeError, ValueError) as exc:
                raise AdapterRefused(name, "bad_weights", f"tensor {key}: bad header entry") from exc
            if not 0 <= start <= end <= data_len:
                raise AdapterRefused(name, "bad_weights", f"tensor {key} lies beyond the end of the file")
            if "lora_A" in key and (len(shape) != 2 or shape[0] > rank):
                raise AdapterRefused(name, "bad_weights", f"{key} has shape {shape}, rank {rank} in the config")
            if "lora_B" in key and (len(shape) != 2 or shape[1] > rank):
                raise AdapterRefused(name, "bad_weights", f"{key} has shape {shape}, rank {rank} in the config")

    def _check_base(self, name: str, spec: AdapterSpec, config: dict) -> None:
        recorded = spec.base_model_sha256
        if recorded is None:
            # No recorded digest: the base directory named in the config, if it is here.
            base_path = config.get("base_model_name_or_path")
            if base_path and Path(base_path).is_dir():
                try:
                    recorded = base_model_sha256(base_path)
                except (OSError, ValueError) as exc:
                    raise AdapterRefused(name, "base_model_unknown", f"{base_path}: {exc}") from exc
            else:
                raise AdapterRefused(
                    name, "base_model_unknown", f"no base_model_sha256 given and {base_path!r} is not a local model"
                )
        if recorded != self.base_model_sha256:
            raise AdapterRefused(
                name, "base_model_mismatch", f"trained on base {recorded[:12]}, served base is {self.base_model_sha256[:12]}"
            )


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]
