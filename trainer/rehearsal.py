"""Rehearsal: chats from the base model's own training data, mixed into every SFT stage.

Fine-tuning on a batch of feedback erodes what the batch hardly touches (catastrophic
forgetting). The standard remedy is rehearsal: train on a sample of the original training
data for the skills to protect together with the new data. Measured in the demo, on the
four batches after its preference shift: without rehearsal every adapter lost 2.5 to 4
points of rare-skill accuracy and the gate rejected them all; with 20 rehearsal chats per
batch the rare skill rose (0.706 -> 0.71-0.75) and the preferred-style rate moved as far
(0.10 -> 0.80). docs/trainer.md has the rest of the measurements.

The set travels with the base model: ``<base model>/rehearsal.jsonl``, one
``{"messages": [...]}`` per line. ``feedloop model init`` writes one for the tiny model (its
training chats of the rare skill); for a real model, put a sample of its instruction data for
the skills it must not lose there. No file: no rehearsal.

>>> chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(5)]
>>> [r.messages[0].content for r in draw(chats, 2, "batch-1", exclude={"q0"})]
['q3', 'q1']
>>> draw(chats, 2, "batch-1", exclude={"q0"}) == draw(chats, 2, "batch-1", exclude={"q0"})
True
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from streams.training_data import SftRecord

FILE = "rehearsal.jsonl"
SOURCE = "rehearsal"

Chat = list[dict[str, str]]


def load(base_model_dir: Path) -> list[Chat]:
    """The base model's rehearsal chats; empty when it has none."""
    path = Path(base_model_dir) / FILE
    if not path.exists():
        return []
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


def save(base_model_dir: Path, chats: list[Chat]) -> Path:
    path = Path(base_model_dir) / FILE
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return path


def draw(chats: list[Chat], count: int, batch_id: str, exclude: set[str]) -> list[SftRecord]:
    """``count`` chats for one batch, seeded by its id (the same batch draws the same ones),
    never one whose prompt holds a question in ``exclude`` (the gate's held-out items must
    stay unseen, however worded)."""
    eligible = [chat for chat in chats if not any(question in chat[0]["content"] for question in exclude)]
    seed = int.from_bytes(hashlib.sha256(batch_id.encode()).digest()[:8], "big")
    picked = random.Random(seed).sample(eligible, min(count, len(eligible)))
    return [SftRecord(example_id=f"{SOURCE}-{hashlib.sha256(json.dumps(chat).encode()).hexdigest()[:16]}",
                      cohort=SOURCE, domain=SOURCE, source=SOURCE, event_ids=[], messages=chat)
            for chat in picked]  # fmt: skip
