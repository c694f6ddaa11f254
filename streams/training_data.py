"""The training batch format: what the curator writes and the trainer reads.

A batch is a directory ``<data_dir>/batches/<batch_id>/`` holding up to three JSON-lines
files, one per training signal, and a ``manifest.json``:

- ``sft.jsonl``: :class:`SftRecord`, a conversation whose last assistant turn is the target
  (an accepted response, or a user's correction of a bad one);
- ``pairs.jsonl``: :class:`PreferenceRecord`, a prompt with a chosen and a rejected response
  (edited over original, accepted regeneration over the replaced response), for DPO;
- ``labels.jsonl``: :class:`LabelRecord`, a prompt and one response labelled desirable or
  not (thumbs, ratings), for KTO.

A batch may also hold a **held-out** part, the examples the curator kept out of training
(``streams.curator.is_heldout``) for the gate to judge candidates on: the same three kinds
of record in ``heldout_sft.jsonl``, ``heldout_pairs.jsonl`` and ``heldout_labels.jsonl``,
read under the signals ``heldout_sft``, ``heldout_pairs`` and ``heldout_labels``. A held-out
file is written only when it has records, so a batch with none is byte for byte what it was
before held-out parts existed, and such batches read with empty held-out signals. Held-out
records count in ``counts``, ``files`` and ``source_event_ids``, not in ``strata`` or
``replayed``, which describe what is trained.

Every record carries its stratum (cohort, domain), the per-example loss weight, the event
ids it came from, and whether it is a replayed older example (against forgetting). Text is
already anonymized. Records are sorted by ``example_id`` and serialized canonically, so the
same examples always give the same bytes and checksums (replay determinism).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streams.contract import Message

SIGNAL_FILES = {"sft": "sft.jsonl", "pairs": "pairs.jsonl", "labels": "labels.jsonl"}
HELDOUT = "heldout_"  # a held-out signal is its trained signal's name after this prefix
HELDOUT_FILES = {HELDOUT + signal: HELDOUT + filename for signal, filename in SIGNAL_FILES.items()}
MANIFEST = "manifest.json"
Channel = Literal["explicit", "implicit", "self_eval"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    example_id: str = Field(description="Stable id: the interaction id plus the signal.")
    cohort: str
    domain: str
    weight: float = Field(1.0, ge=0, description="Per-example loss weight.")
    source: str = Field(description="Which rule made it, e.g. 'edit', 'regenerate', 'thumbs'.")
    event_ids: list[str] = Field(description="The events it was derived from.")
    replay: bool = Field(False, description="Replayed from the reservoir, not new in this batch.")


class SftRecord(_Record):
    messages: list[Message] = Field(description="Prompt turns, then the assistant target last.")


class PreferenceRecord(_Record):
    prompt: list[Message]
    chosen: str
    rejected: str


class LabelRecord(_Record):
    prompt: list[Message]
    completion: str
    desirable: bool


class BatchManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    trigger: Literal["size", "time", "drift", "manual"]
    event_time: str = Field(description="Event time (ISO 8601) of the newest example: not wall time.")
    counts: dict[str, int] = Field(description="Records per signal file, held-out files included.")
    strata: dict[str, int] = Field(description="Trained records per 'cohort/domain'.")
    replayed: int = Field(description="Records drawn from the replay reservoir.")
    loss_weights: dict[str, float] = Field(description="Per-channel weights for the trainer's loss.")
    files: dict[str, str] = Field(description="sha256 of each signal file.")
    source_event_ids: list[str] = Field(description="Every event id the batch was derived from.")
    users: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Each user's pseudonym and the example ids of their records (held-out ones too): "
        "what an erasure cuts out of a batch not yet trained, and how the registry names the adapters "
        "trained on a user's data. Empty in batches written before it existed.",
    )


RECORD_TYPES: dict[str, type[_Record]] = {"sft": SftRecord, "pairs": PreferenceRecord, "labels": LabelRecord}
SIGNAL_OF = {cls: signal for signal, cls in RECORD_TYPES.items()}


def _canonical(record: BaseModel) -> str:
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_batch(
    directory: Path,
    *,
    batch_id: str,
    trigger: str,
    event_time: str,
    records: Iterable[SftRecord | PreferenceRecord | LabelRecord],
    loss_weights: dict[str, float],
    heldout: Iterable[SftRecord | PreferenceRecord | LabelRecord] = (),
    users: Mapping[str, Iterable[str]] | None = None,
) -> tuple[BatchManifest, str]:
    """Write a batch atomically, ``heldout`` its held-out part, ``users`` each pseudonym's
    example ids; returns its manifest and the manifest's sha256."""
    by_signal: dict[str, list[_Record]] = {signal: [] for signal in SIGNAL_FILES}
    for record in records:
        by_signal[SIGNAL_OF[type(record)]].append(record)
    for record in heldout:
        by_signal.setdefault(HELDOUT + SIGNAL_OF[type(record)], []).append(record)
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    files, counts, strata, event_ids = {}, {}, {}, set()
    replayed = 0
    for signal, items in by_signal.items():
        items.sort(key=lambda r: r.example_id)
        payload = "".join(_canonical(r) + "\n" for r in items).encode("utf-8")
        (staging / (SIGNAL_FILES | HELDOUT_FILES)[signal]).write_bytes(payload)
        files[signal] = hashlib.sha256(payload).hexdigest()
        counts[signal] = len(items)
        for r in items:
            event_ids.update(r.event_ids)
            if signal in SIGNAL_FILES:
                stratum = f"{r.cohort}/{r.domain}"
                strata[stratum] = strata.get(stratum, 0) + 1
                replayed += r.replay
    manifest = BatchManifest(
        batch_id=batch_id,
        trigger=trigger,
        event_time=event_time,
        counts=counts,
        strata=dict(sorted(strata.items())),
        replayed=replayed,
        loss_weights=dict(sorted(loss_weights.items())),
        files=files,
        source_event_ids=sorted(event_ids),
        users={user: sorted(set(ids)) for user, ids in sorted((users or {}).items())},
    )
    manifest_bytes = (_canonical(manifest) + "\n").encode("utf-8")
    (staging / MANIFEST).write_bytes(manifest_bytes)
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, directory)  # readers never see a half-written batch
    return manifest, hashlib.sha256(manifest_bytes).hexdigest()


def read_batch(directory: Path) -> tuple[BatchManifest, dict[str, list]]:
    """The manifest and the records of each signal, held-out ones included, checksums verified."""
    manifest = BatchManifest.model_validate_json((directory / MANIFEST).read_bytes())
    records: dict[str, list] = {}
    for signal, filename in (SIGNAL_FILES | HELDOUT_FILES).items():
        if signal in HELDOUT_FILES and signal not in manifest.files:
            records[signal] = []  # none held out (or written before held-out parts existed)
            continue
        payload = (directory / filename).read_bytes()
        if hashlib.sha256(payload).hexdigest() != manifest.files[signal]:
            raise ValueError(f"{directory / filename}: checksum does not match the manifest")
        kind = RECORD_TYPES[signal.removeprefix(HELDOUT)]
        records[signal] = [kind.model_validate_json(line) for line in payload.splitlines() if line]
    return manifest, records


def without_users(manifest: BatchManifest, records: dict[str, list], erased: set[str]) -> dict[str, list]:
    """The pure core of an erasure in a batch: every signal's records less those of the
    ``erased`` pseudonyms (by example id: ids are an app's own, so another app's record
    under the same id goes too, which errs on the side of the erased user)."""
    gone = {example_id for user in erased for example_id in manifest.users.get(user, ())}
    return {signal: [r for r in items if r.example_id not in gone] for signal, items in records.items()}


def recut_batch(directory: Path, erased: set[str]) -> tuple[BatchManifest, str]:
    """The batch without the records of the ``erased`` pseudonyms: rewritten under the same
    id, trigger, event time and loss weights when it holds any (every other record keeps its
    bytes, the new manifest its checksums), else as it is. Returns its manifest and the
    manifest's sha256. The new batch is written beside the old and swapped in (a crash between
    the two renames is finished by the next call), so a reader sees the old batch or the new
    one, never a mix."""
    fresh, old = directory.with_name(directory.name + ".recut"), directory.with_name(directory.name + ".old")
    if not directory.exists() and (fresh / MANIFEST).exists():
        os.replace(fresh, directory)  # the last call crashed between the renames
    shutil.rmtree(old, ignore_errors=True)
    manifest, records = read_batch(directory)
    if not erased & manifest.users.keys():
        return manifest, hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    kept = without_users(manifest, records, erased)
    shutil.rmtree(fresh, ignore_errors=True)
    written = write_batch(
        fresh, batch_id=manifest.batch_id, trigger=manifest.trigger, event_time=manifest.event_time,
        records=[r for signal in SIGNAL_FILES for r in kept[signal]], loss_weights=manifest.loss_weights,
        heldout=[r for signal in HELDOUT_FILES for r in kept[signal]],
        users={user: ids for user, ids in manifest.users.items() if user not in erased},
    )  # fmt: skip
    os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old)
    return written
