"""Batch records -> the conversational datasets trl's trainers take, each row with its weight."""

from datasets import Dataset

from streams.training_data import LabelRecord, PreferenceRecord, SftRecord
from trainer.weighting import WEIGHT


def chat_messages(messages: list) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_dataset(records: list[SftRecord]) -> Dataset:
    return Dataset.from_list([{"messages": chat_messages(r.messages), WEIGHT: r.weight} for r in records])


def dpo_dataset(records: list[PreferenceRecord]) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": chat_messages(r.prompt),
                "chosen": _assistant(r.chosen),
                "rejected": _assistant(r.rejected),
                WEIGHT: r.weight,
            }
            for r in records
        ]
    )


def kto_dataset(records: list[LabelRecord]) -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": chat_messages(r.prompt), "completion": _assistant(r.completion), "label": r.desirable, WEIGHT: r.weight}
            for r in records
        ]
    )


def weight_summary(records: list) -> dict[str, float]:
    """What the lineage keeps about a signal's weights."""
    weights = [r.weight for r in records]
    if not weights:
        return {"count": 0}
    return {"count": len(weights), "sum": sum(weights), "min": min(weights), "max": max(weights)}
