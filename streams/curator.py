"""The curator: buffers training records and cuts balanced batches.

A batch is cut when ``batch_size`` new records are buffered (trigger ``size``), when the
oldest buffered record has waited ``max_wait`` of event time (``time``), or when a drift
alarm asks for one early (``drift``). A drift alarm on rewards (the users' preferences
moved) instead forgets every record held (``forget_held``). Cutting a batch:

1. **Stratify with a cap.** Records are grouped by ``cohort/domain``. No group may hold more
   than ``max_group_share`` of the batch: the cap is the largest per-group count ``c`` with
   ``c <= share * sum(min(n_g, c))`` (water-filling), unless there are too few groups for any
   cap to hold. Records over the cap are not dropped: they join the replay reservoir.
2. **Mix in replay.** ``replay_fraction`` of the batch is drawn from a reservoir of older
   records kept per stratum (reservoir sampling, ``reservoir_per_stratum`` each), strata
   drawn round-robin so rare skills and minority cohorts get an equal voice against
   forgetting. Replayed records are marked ``replay=True``.
3. **Forget the erased.** Records of users erased since they were buffered are removed.
4. **Hold out** (``heldout_share``, 0 by default: off). Every record of an example whose id
   hashes below the share (:func:`is_heldout`) goes to the batch's held-out part, never to
   training, the reservoir or replay: the gate's held-out feedback suite
   (``trainer.heldout_suite``) scores candidates on those pairs and labels. The split is by
   a hash of the example id alone, not the curator's seed or the order of arrival, so an
   example falls on the same side in every replay and in every batch it could reach, and a
   trained example is never judged as unseen later. It is the whole example, not its pairs
   and labels alone, because an example's records share their text (an edit is an SFT
   target and the chosen side of a pair): training on one would leak the other. In
   expectation each stratum loses the same share, SFT-only examples included (they are kept
   in the held-out part, untrained).

Everything is driven by the curator's own seeded RNG and event time, so the same records in
the same order give the same batches.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from streams.pickled_once import for_state, from_state
from streams.signals import TrainingRecord


@dataclass(frozen=True)
class Buffered:
    record: TrainingRecord
    user: str  # streams.pseudonyms.user_identity, kept in state only, to honour erasure; never in batch files
    occurred_at: datetime  # as a streams.join.utc() key: compared with the watermark per record
    # The user's pseudonym as the example has it: the batch manifest lists it (its ``users``),
    # so an erasure finds the user's records in batches not yet trained. "" in checkpoints
    # from before it existed: such records are cut out by the curator's own erasure check only.
    pseudonym: str = ""

    def __reduce__(self):
        # Reservoir records outlive many checkpoints: pickle each record once.
        return _restore_buffered, (for_state(self, "record"), self.user, self.occurred_at, self.pseudonym)


def _restore_buffered(record: object, user: str, occurred_at: datetime, pseudonym: str = "") -> Buffered:
    return Buffered(from_state(record), user, occurred_at, pseudonym)


@dataclass(frozen=True)
class CutBatch:
    batch_id: str
    trigger: str
    event_time: datetime
    records: list[TrainingRecord]
    capped: int  # records moved to the reservoir by the cap
    erased: int  # records dropped because their user was erased
    loss_weights: dict[str, float]  # per-channel weights for the trainer, as of the cut
    heldout: list[TrainingRecord] = field(default_factory=list)  # never trained: the gate's held-out items
    users: dict[str, list[str]] = field(default_factory=dict)  # pseudonym -> example ids (manifest ``users``)


def _stable_order(seed: int, example_id: str) -> str:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()


def is_heldout(example_id: str, share: float) -> bool:
    """Whether a record's example is held out: the hash of its example id (the record id
    without its signal suffix), read as a fraction of 2^64, is below ``share``."""
    example = example_id.rsplit(":", 1)[0]
    digest = hashlib.sha256(f"heldout:{example}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def group_cap(sizes: list[int], share: float) -> int:
    """Largest per-group count that keeps every group within ``share`` of the total."""
    if not sizes or len(sizes) * share < 1:
        return max(sizes, default=0)  # too few groups for the cap to be satisfiable
    for cap in range(max(sizes), 0, -1):
        if cap <= share * sum(min(n, cap) for n in sizes):
            return cap
    return 1


@dataclass
class Curator:
    partition: int
    batch_size: int
    max_wait: timedelta
    max_group_share: float
    replay_fraction: float
    reservoir_per_stratum: int
    seed: int = 0
    heldout_share: float = 0.0  # a default, so a curator pickled before it existed reads 0 (off)
    buffer: list[Buffered] = field(default_factory=list)
    reservoir: dict[str, list[Buffered]] = field(default_factory=dict)
    reservoir_seen: dict[str, int] = field(default_factory=dict)
    batches_cut: int = 0
    early_trigger: str | None = None
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed * 1_000_003 + self.partition)

    def add(self, entries: list[Buffered]) -> None:
        self.buffer.extend(entries)

    def request_early(self, trigger: str) -> None:
        """A drift alarm (or an operator) asks for a batch from what is buffered."""
        self.early_trigger = trigger

    def forget_held(self) -> int:
        """The users' preferences moved: forget every record held, buffered or kept for replay,
        and return how many were buffered. They would train against the new preferences
        (the buffer, too, is mostly from before the shift: the alarm comes some tens of
        events after it). The next batch is cut from fresh records only, and the reservoir
        refills from the records cut from now on. The events stay in the log."""
        dropped = len(self.buffer)
        self.buffer.clear()
        self.reservoir.clear()
        self.reservoir_seen.clear()
        self.early_trigger = None
        return dropped

    def due_at(self) -> datetime | None:
        """When the oldest buffered record's wait ends (its ``occurred_at`` key + ``max_wait``);
        None with nothing buffered."""
        return self.buffer[0].occurred_at + self.max_wait if self.buffer else None

    def due(self, watermark: datetime | None) -> str | None:
        if not self.buffer:
            return None
        if self.early_trigger:
            return self.early_trigger
        if len(self.buffer) >= self.batch_size:
            return "size"
        if watermark is not None and self.buffer[0].occurred_at + self.max_wait <= watermark:
            return "time"
        return None

    def cut(
        self,
        trigger: str,
        event_time: datetime,
        is_erased: Callable[[str, datetime], bool],
        loss_weights: dict[str, float],
    ) -> CutBatch:
        taken, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size :]
        self.early_trigger = None
        kept = [b for b in taken if not is_erased(b.user, b.occurred_at)]
        erased = len(taken) - len(kept)
        heldout_entries = [b for b in kept if is_heldout(b.record.example_id, self.heldout_share)]
        kept = [b for b in kept if not is_heldout(b.record.example_id, self.heldout_share)]
        for stratum in self.reservoir:
            self.reservoir[stratum] = [b for b in self.reservoir[stratum] if not is_erased(b.user, b.occurred_at)]

        groups: dict[str, list[Buffered]] = defaultdict(list)
        for b in kept:
            groups[f"{b.record.cohort}/{b.record.domain}"].append(b)
        cap = group_cap([len(g) for g in groups.values()], self.max_group_share)
        chosen, overflow = [], []
        for stratum in sorted(groups):
            members = sorted(groups[stratum], key=lambda b: _stable_order(self.seed, b.record.example_id))
            chosen += members[:cap]
            overflow += members[cap:]

        replayed = self._draw_replay(math.floor(len(chosen) * self.replay_fraction / (1 - self.replay_fraction)))
        for b in chosen + overflow:
            self._remember(b)
        self.batches_cut += 1
        users: dict[str, list[str]] = defaultdict(list)
        for b in chosen + replayed + heldout_entries:
            if b.pseudonym:
                users[b.pseudonym].append(b.record.example_id)
        return CutBatch(
            batch_id=f"batch-p{self.partition}-{self.batches_cut:06d}",
            trigger=trigger,
            event_time=event_time,
            records=[b.record for b in chosen] + [b.record.model_copy(update={"replay": True}) for b in replayed],
            capped=len(overflow),
            erased=erased,
            loss_weights=loss_weights,
            heldout=[b.record for b in heldout_entries],
            users=dict(users),
        )

    def _draw_replay(self, count: int) -> list[Buffered]:
        strata = sorted(s for s, members in self.reservoir.items() if members)
        drawn: list[Buffered] = []
        pools = {s: list(self.reservoir[s]) for s in strata}
        while len(drawn) < count and any(pools.values()):
            for stratum in strata:
                if pools[stratum] and len(drawn) < count:
                    drawn.append(pools[stratum].pop(self._rng.randrange(len(pools[stratum]))))
        return drawn

    def _remember(self, entry: Buffered) -> None:
        """Reservoir sampling (Algorithm R) per stratum."""
        stratum = f"{entry.record.cohort}/{entry.record.domain}"
        members = self.reservoir.setdefault(stratum, [])
        seen = self.reservoir_seen.get(stratum, 0) + 1
        self.reservoir_seen[stratum] = seen
        if len(members) < self.reservoir_per_stratum:
            members.append(entry)
        else:
            slot = self._rng.randrange(seen)
            if slot < self.reservoir_per_stratum:
                members[slot] = entry
