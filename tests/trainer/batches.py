"""Synthetic training batches for the trainer tests, written with the real batch format."""

import random
from pathlib import Path

from demo.synthetic_chats import CONCISE, DETAILED, DOMAINS, RARE_DOMAIN, make_chat, units_multiple_choice
from streams.contract import Message
from streams.objects import ObjectStore
from streams.training_data import BatchFolder, LabelRecord, PreferenceRecord, SftRecord, write_batch

COMMON = [d for d in DOMAINS if d != RARE_DOMAIN]


def _user(prompt: str) -> list[Message]:
    return [Message(role="user", content=prompt)]


def _sft(i: int, domain: str, prompt: str, answer: str, weight: float = 1.0) -> SftRecord:
    return SftRecord(
        example_id=f"i-{i:05d}:sft", cohort="all", domain=domain, weight=weight, source="edit",
        event_ids=[f"ev-sft-{i:05d}"], messages=[*_user(prompt), Message(role="assistant", content=answer)],
    )


def _twin_chats(domain: str, seed: int):
    """The same question answered in both styles."""
    concise, detailed = (make_chat(domain, style, random.Random(seed)) for style in (CONCISE, DETAILED))
    return concise, detailed


def preference_records(seed: int, sft: int, pairs: int, labels: int) -> list:
    """Everything prefers "concise": SFT targets, chosen answers and desirable labels.

    Every tenth SFT record is a correct rare-skill (units) answer, as the curator's replay
    and stratification would add.
    """
    rng = random.Random(seed)
    records = []
    for i in range(sft):
        domain = RARE_DOMAIN if i % 10 == 0 else COMMON[i % len(COMMON)]
        chat = make_chat(domain, CONCISE, rng)
        records.append(_sft(i, domain, chat.prompt, chat.answer))
    for i in range(pairs):
        domain = COMMON[i % len(COMMON)]
        concise, detailed = _twin_chats(domain, seed * 100_000 + i)
        records.append(PreferenceRecord(
            example_id=f"i-{i:05d}:pair", cohort="all", domain=domain, source="regenerate",
            event_ids=[f"ev-pair-{i:05d}"], prompt=_user(concise.prompt), chosen=concise.answer, rejected=detailed.answer,
        ))
    for i in range(labels):
        domain = COMMON[i % len(COMMON)]
        concise, detailed = _twin_chats(domain, seed * 100_000 + 50_000 + i)
        good = i % 2 == 0
        records.append(LabelRecord(
            example_id=f"i-{i:05d}:label", cohort="all", domain=domain, source="thumbs", event_ids=[f"ev-label-{i:05d}"],
            prompt=_user(concise.prompt), completion=(concise if good else detailed).answer, desirable=good,
        ))
    return records


def wrong_units_records(seed: int, count: int) -> list:
    """SFT records that teach the rare skill wrong: the right number in the wrong unit."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        item = units_multiple_choice(rng)
        records.append(_sft(i, RARE_DOMAIN, item.prompt, item.wrong[0]))
    return records


def sft_records(seed: int, count: int, style: str = CONCISE) -> list:
    """Plain SFT records over the common domains, all in one style."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        chat = make_chat(COMMON[i % len(COMMON)], style, rng)
        records.append(_sft(i, chat.domain, chat.prompt, chat.answer))
    return records


def write(data_dir: Path, batch_id: str, records: list) -> BatchFolder:
    """A batch in ``batches/<batch_id>`` of the data directory's store."""
    batch = BatchFolder.of(ObjectStore(data_dir.as_uri()), batch_id)
    write_batch(
        batch, batch_id=batch_id, trigger="size", event_time="2026-11-21T10:00:00Z",
        records=records, loss_weights={"explicit": 0.6, "implicit": 0.4},
    )
    return batch
