"""A gate suite read from a JSONL file: the operator's own questions, good answers and near misses.

One item per line::

    {"prompt": "Convert 3 km to miles", "reference": "About 1.86 miles.", "rejected": ["3 miles.", "About 1.86 km."]}

``prompt`` is one user turn, or a list of ``{"role", "content"}`` messages; ``reference``
(``chosen`` is read as the same) is the answer to keep; ``rejected`` (a string or a list),
where given, answers that are worse. The figure, higher is better:

- every item has rejected answers: the share of (item, rejected answer) comparisons that the
  reference wins by per-token log-likelihood (:func:`trainer.likelihood.prefers`; chance is
  0.5). A likelihood ranking measures a skill even where the model cannot yet generate the
  right text, and it moves when a batch teaches the skill wrong;
- no item has: the mean per-token log-likelihood of the references, in nats (a tolerance of
  0.05 allows each reference token to become e^0.05 ~ 5% less likely).

A file that mixes both kinds is refused: one suite gives one figure, and an average of a
share and a log-likelihood means nothing. The suite is protected by default (a file of
reference answers is a skill to keep); a spec's ``protected: false`` makes it the objective.
Its ``version`` is a hash of the file's bytes, so scores compare only under one file, and its
``prompts`` (each item's last user turn) are kept out of rehearsal.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from streams.contract import Message
from trainer.data import chat_messages
from trainer.gate import Records
from trainer.likelihood import Chat, answer_logprobs, prefers

FORMAT = '{"prompt": "...", "reference": "...", "rejected": ["...", ...]} ("rejected" optional)'


class JsonlSuiteConfig(BaseModel):
    """The options of ``trainer.jsonl_suite:jsonl_suite`` in a gate suite spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="The JSONL file of items, one per line.")
    name: str | None = Field(None, description="The suite's name in the lineage and the verdict; None: the file's stem.")
    tolerance: float = Field(0.02, ge=0, description="How far below its reference the candidate may fall.")


class Prompted(BaseModel):
    """An item's prompt: one user turn, or messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | list[Message]

    @property
    def chat(self) -> Chat:
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else chat_messages(self.prompt)

    @property
    def question(self) -> str:
        """The last user turn: what rehearsal must not train on."""
        return [m["content"] for m in self.chat if m["role"] == "user"][-1]


class Item(Prompted):
    reference: str = Field(validation_alias=AliasChoices("reference", "chosen"))
    rejected: list[str] = Field(default_factory=list)

    @field_validator("rejected", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


def read_items(path: Path, kind: type[Prompted] = Item, form: str = FORMAT) -> tuple[tuple, str]:
    """The file's items (each a ``kind``, one a line, written as ``form``) and the hash of its
    bytes; a ValueError that names the file (and line) and says what to fix."""
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"gate suite file {path}: {exc.strerror}; point the suite's path at a JSONL file of "
                         f"items, one per line: {form}") from exc  # fmt: skip
    items = []
    for number, line in enumerate(payload.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(kind.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{number}: not an item ({exc}); each line is {form}") from exc
    if not items:
        raise ValueError(f"gate suite file {path} holds no items; write one per line: {form}")
    return tuple(items), hashlib.sha256(payload).hexdigest()[:12]


def read_ranked(path: Path) -> tuple[tuple[Item, ...], str]:
    """:func:`read_items` of this suite's kind, refusing a file that mixes items with and
    without rejected answers."""
    items, version = read_items(path)
    if len({bool(item.rejected) for item in items}) > 1:
        raise ValueError(f"{path} mixes items with and without rejected answers; give every item rejected answers "
                         "(a likelihood ranking) or none (the references' likelihood), or split the file")  # fmt: skip
    return items, version


@dataclass(frozen=True)
class JsonlSuite:
    """The items of one file, scored as the module doc says."""

    name: str
    items: tuple[Item, ...]
    version: str
    tolerance: float
    protected: bool = True

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(item.question for item in self.items)

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> float:
        if self.items[0].rejected:
            comparisons = [(item.chat, item.reference, worse) for item in self.items for worse in item.rejected]
            return prefers(model, tokenizer, comparisons).float().mean().item()
        totals, lengths = answer_logprobs(model, tokenizer, [(item.chat, item.reference) for item in self.items])
        return (totals / lengths.clamp(min=1)).mean().item()


def jsonl_suite(**options: object) -> tuple[JsonlSuite]:
    """The component a spec names: ``{"component": "trainer.jsonl_suite:jsonl_suite",
    "options": {"path": ..., "name": ..., "tolerance": ...}}``. Reads the file now, so a missing
    or malformed one stops the trainer at start-up, not mid-batch."""
    config = JsonlSuiteConfig(**options)
    items, version = read_ranked(config.path)
    return (JsonlSuite(config.name or config.path.stem, items, version, config.tolerance),)
