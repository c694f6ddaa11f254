"""The training batch format: what the curator writes and the trainer reads.

A batch is a folder ``batches/<batch_id>/`` of the object store (``streams.objects``; on the
default ``file://`` store, the directory ``<data_dir>/batches/<batch_id>/``) holding up to
three JSON-lines parts, one per training signal, and a ``manifest.json``:

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

**Publication.** An object store has no rename of a folder, so a batch is not staged and
swapped in: its parts are written first and its manifest, which holds their sha256s, last.
The manifest is the commit marker: a reader finds a batch by it and checks every part
against it, so a writer that dies between the parts and the manifest leaves parts nobody
reads, and writing the batch again completes it (the parts are deterministic). The manifest
is created only where there is none (``put_new``): the same batch again is a no-op, a
different batch under an existing id is refused (:class:`BatchConflict`) before any part of
it is written, and of two writers racing, one wins and the other is told.

**Erasure** (:func:`recut_batch`) rewrites a batch not yet trained without a user. An S3 PUT
is atomic per object, but nothing makes several PUTs atomic together: rewriting
``sft.jsonl`` and ``pairs.jsonl`` in place would let a reader between the two see the new
sft and the old pairs (the checksums would refuse it, but a reader should get a batch, not
an error). So a recut writes each changed part under a name derived from its content
(``sft.<sha256>.jsonl``), which no manifest has named before, and records the names in the
manifest's ``parts``; the objects the old manifest names stay untouched until the new
manifest replaces it in one PUT. A reader that read the old manifest reads old parts, one
that read the new reads new ones; never a mix. Only then are the parts no manifest names
deleted, and with them the erased user's bytes; a reader that read the old manifest just
before and finds a part gone reads the manifest again (:func:`read_batch` does). A version
prefix (``batches/<id>/v2/``) would do as much, but needs a pointer object besides the
manifest and moves every part, the unchanged ones too; named by content, a part without the
erased user's records keeps its object. A batch as first published keeps the plain names
(``parts`` lists only the names that differ, and is left out of the manifest when empty), so
the data directory's layout is what it was and every batch already on disk reads as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from streams.contract import Message
from streams.objects import ObjectMissing, ObjectStore

log = structlog.get_logger(__name__)

SIGNAL_FILES = {"sft": "sft.jsonl", "pairs": "pairs.jsonl", "labels": "labels.jsonl"}
HELDOUT = "heldout_"  # a held-out signal is its trained signal's name after this prefix
HELDOUT_FILES = {HELDOUT + signal: HELDOUT + filename for signal, filename in SIGNAL_FILES.items()}
PART_FILES = SIGNAL_FILES | HELDOUT_FILES
MANIFEST = "manifest.json"
BATCHES = "batches"  # the store's folder of batches
READ_ATTEMPTS = 3  # a reader that loses a race with a recut reads the new manifest; more is not a race
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
    parts: dict[str, str] = Field(
        default_factory=dict,
        description="The object name of each part not under its signal's plain name (sft.jsonl...): a recut "
        "names the parts it changes by their sha256. Empty, and left out of the manifest, for a batch as "
        "first published.",
    )

    @model_serializer(mode="wrap")
    def _plain_names_left_out(self, handler):
        dumped = handler(self)
        if not dumped.get("parts"):  # the bytes of a batch as first published stay what they always were
            dumped.pop("parts", None)
        return dumped

    def part(self, signal: str) -> str:
        """The object name of a signal's part, within the batch's folder."""
        return self.parts.get(signal, PART_FILES[signal])


RECORD_TYPES: dict[str, type[_Record]] = {"sft": SftRecord, "pairs": PreferenceRecord, "labels": LabelRecord}
SIGNAL_OF = {cls: signal for signal, cls in RECORD_TYPES.items()}


class BatchConflict(RuntimeError):
    """A different batch already holds the id."""


class BatchUnreadable(ValueError):
    """The batch is not there, or not what its manifest says; the message says which."""


@dataclass(frozen=True)
class BatchFolder:
    """Where a batch lies: ``folder`` (``batches/<batch_id>``) of ``store``."""

    store: ObjectStore
    folder: str

    @classmethod
    def of(cls, store: ObjectStore, batch_id: str) -> BatchFolder:
        return cls(store, f"{BATCHES}/{batch_id}")

    def key(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def __str__(self) -> str:
        return f"{self.folder} of {self.store.url}"


def batch_folder(path: str) -> str | None:
    """The store folder a ``batch_emitted`` event's ``path`` names, if it is a batch's:
    ``batches/<name>`` and nothing else (not an absolute path, no ``..``, no other folder).

    >>> batch_folder("batches/b-1"), batch_folder("batches/../keys"), batch_folder("/etc"), batch_folder("batches")
    ('batches/b-1', None, None, None)
    """
    parts = path.split("/")
    return path if len(parts) == 2 and parts[0] == BATCHES and parts[1] not in ("", ".", "..") else None


def _canonical(record: BaseModel) -> str:
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _manifest_bytes(manifest: BatchManifest) -> bytes:
    return (_canonical(manifest) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cut_parts(
    *,
    batch_id: str,
    trigger: str,
    event_time: str,
    records: Iterable[SftRecord | PreferenceRecord | LabelRecord],
    loss_weights: dict[str, float],
    heldout: Iterable[SftRecord | PreferenceRecord | LabelRecord] = (),
    users: Mapping[str, Iterable[str]] | None = None,
) -> tuple[BatchManifest, dict[str, bytes]]:
    """The pure core of a batch: its manifest and each signal's part, as bytes (the manifest's
    ``parts`` empty: plain names)."""
    by_signal: dict[str, list[_Record]] = {signal: [] for signal in SIGNAL_FILES}
    for record in records:
        by_signal[SIGNAL_OF[type(record)]].append(record)
    for record in heldout:
        by_signal.setdefault(HELDOUT + SIGNAL_OF[type(record)], []).append(record)
    payloads, counts, strata, event_ids = {}, {}, {}, set()
    replayed = 0
    for signal, items in by_signal.items():
        items.sort(key=lambda r: r.example_id)
        payloads[signal] = "".join(_canonical(r) + "\n" for r in items).encode("utf-8")
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
        files={signal: _sha256(payload) for signal, payload in payloads.items()},
        source_event_ids=sorted(event_ids),
        users={user: sorted(set(ids)) for user, ids in sorted((users or {}).items())},
    )
    return manifest, payloads


def write_batch(batch: BatchFolder, **cut) -> tuple[BatchManifest, str]:
    """Publish a batch (``cut``: :func:`cut_parts`'s arguments) into its folder: the parts,
    then the manifest, the commit marker; returns the manifest and its sha256. The same batch
    again is a no-op (a re-publish after a crash completes it); a different one under a
    manifest already there raises :class:`BatchConflict`, before any part is written."""
    manifest, payloads = cut_parts(**cut)
    manifest_bytes = _manifest_bytes(manifest)
    existing = batch.store.find(batch.key(MANIFEST))
    if existing is None:
        for signal, payload in payloads.items():
            batch.store.put(batch.key(manifest.part(signal)), payload)
        if batch.store.put_new(batch.key(MANIFEST), manifest_bytes):
            return manifest, _sha256(manifest_bytes)
        existing = batch.store.get(batch.key(MANIFEST))  # another writer's manifest came first
    if existing != manifest_bytes:
        raise BatchConflict(
            f"{batch} already holds a different batch {manifest.batch_id}; replay what-if runs into their own "
            "data directory (--data-dir) or store (FEEDLOOP_STORAGE__URL)"
        )
    return manifest, _sha256(manifest_bytes)


def _read(batch: BatchFolder) -> tuple[bytes, BatchManifest, dict[str, list]]:
    for _ in range(READ_ATTEMPTS):
        raw = batch.store.find(batch.key(MANIFEST))
        if raw is None:
            raise BatchUnreadable(
                f"no batch at {batch}: it has no {MANIFEST} (never published, or its publisher stopped before the "
                "manifest: the curator completes it when it publishes the batch again)"
            )
        manifest = BatchManifest.model_validate_json(raw)
        try:
            return raw, manifest, _parts(batch, manifest)
        except ObjectMissing as missing:
            if batch.store.find(batch.key(MANIFEST)) == raw:
                raise BatchUnreadable(f"{batch}: part {missing.args[0]} of its manifest is gone; restore it") from None
            log.info("batch.read_again", batch=str(batch), reason="recut while read: the new manifest names the parts")
    raise BatchUnreadable(f"{batch} changed {READ_ATTEMPTS} times while read; read it again when erasures are done")


def _parts(batch: BatchFolder, manifest: BatchManifest) -> dict[str, list]:
    records: dict[str, list] = {}
    for signal in PART_FILES:
        if signal in HELDOUT_FILES and signal not in manifest.files:
            records[signal] = []  # none held out (or written before held-out parts existed)
            continue
        key = batch.key(manifest.part(signal))
        payload = batch.store.get(key)
        if _sha256(payload) != manifest.files[signal]:
            raise BatchUnreadable(f"{key} of {batch.store.url}: checksum does not match the manifest; the batch was "
                                  "altered after it was published: cut it again or restore it")  # fmt: skip
        kind = RECORD_TYPES[signal.removeprefix(HELDOUT)]
        records[signal] = [kind.model_validate_json(line) for line in payload.splitlines() if line]
    return records


def read_batch(batch: BatchFolder) -> tuple[BatchManifest, dict[str, list]]:
    """The manifest and the records of each signal, held-out ones included, checksums verified.
    A batch without a manifest is not published: :class:`BatchUnreadable`, as for a checksum
    that does not match."""
    _, manifest, records = _read(batch)
    return manifest, records


def manifest_sha256(batch: BatchFolder) -> str:
    """The sha256 of the batch's manifest as stored: what the batch_emitted event and the
    store's row name it by."""
    return _sha256(batch.store.get(batch.key(MANIFEST)))


def without_users(manifest: BatchManifest, records: dict[str, list], erased: set[str]) -> dict[str, list]:
    """The pure core of an erasure in a batch: every signal's records less those of the
    ``erased`` pseudonyms (by example id: ids are an app's own, so another app's record
    under the same id goes too, which errs on the side of the erased user)."""
    gone = {example_id for user in erased for example_id in manifest.users.get(user, ())}
    return {signal: [r for r in items if r.example_id not in gone] for signal, items in records.items()}


def _content_named(signal: str, payload: bytes) -> str:
    stem, suffix = PART_FILES[signal].rsplit(".", 1)
    return f"{stem}.{_sha256(payload)}.{suffix}"


def recut_batch(batch: BatchFolder, erased: set[str]) -> tuple[BatchManifest, str]:
    """The batch without the records of the ``erased`` pseudonyms: rewritten under the same
    id, trigger, event time and loss weights when it holds any (every other record keeps its
    bytes, the new manifest its checksums), else as it is. Returns its manifest and the
    manifest's sha256.

    The changed parts are written under names of their content, the manifest replaces the
    old one, then every object of the folder the manifest does not name is deleted (the
    module doc argues why a reader never sees a mix). Each call ends with that sweep, so a
    crash anywhere is healed by the next: before the manifest, the new parts are swept (and
    written again, the same bytes); after it, the old parts are."""
    old_bytes, old, records = _read(batch)
    manifest, manifest_bytes = old, old_bytes
    if erased & old.users.keys():
        kept = without_users(old, records, erased)
        manifest, payloads = cut_parts(
            batch_id=old.batch_id, trigger=old.trigger, event_time=old.event_time,
            records=[r for signal in SIGNAL_FILES for r in kept[signal]], loss_weights=old.loss_weights,
            heldout=[r for signal in HELDOUT_FILES for r in kept[signal]],
            users={user: ids for user, ids in old.users.items() if user not in erased},
        )  # fmt: skip
        names = {signal: old.part(signal) if old.files.get(signal) == manifest.files[signal]
                 else _content_named(signal, payload) for signal, payload in payloads.items()}  # fmt: skip
        manifest = manifest.model_copy(update={"parts": {s: n for s, n in names.items() if n != PART_FILES[s]}})
        for signal, payload in payloads.items():
            if old.files.get(signal) != manifest.files[signal]:
                batch.store.put(batch.key(names[signal]), payload)
        manifest_bytes = _manifest_bytes(manifest)
        batch.store.put(batch.key(MANIFEST), manifest_bytes)  # the commit: readers now read the new parts
    named = {batch.key(MANIFEST)} | {batch.key(manifest.part(signal)) for signal in manifest.files}
    for key in batch.store.keys(batch.folder):
        if key not in named:
            batch.store.delete(key)
    return manifest, _sha256(manifest_bytes)
