"""The toy world's evaluation suites, plugged into the trainer's gate (``trainer.gate``).

The gate holds the rule (a protected suite is floored at the base model's score, the
objective at the parent's); these say what the demo's users want and what its model must
keep. Drawn deterministically from ``demo.synthetic_chats`` with their own seed (never a
training seed), so they are the same for every candidate:

- ``preferred_style_rate``, the objective: held-out prompts over the common domains,
  answered by sampling (seeded); the share answered in the batch's preferred style (the one
  its chosen and desirable answers favour, by ``answer_style``). Margins alone miss
  preference collapse; generated text does not.
- ``well_formed_rate``, protected: of the same answers, the share that ends in
  ``<|im_end|>`` within the budget and does not loop.
- ``rare_skill_accuracy``, protected: the rare skill (``units``), the correct answer against
  three near misses (wrong unit, wrong amount, wrong factor) by log-likelihood; the share of
  (item, near miss) comparisons the correct answer wins (the default base model scores
  ~0.7, chance is 0.5). The base model cannot generate correct conversions, so exact match
  would read 0 for every model; likelihood ranking is measurable and moves when the skill
  is forgotten.

:func:`toy_suites` is the component the demo names in ``FEEDLOOP_TRAINER__GATE__SUITES``.
It builds the three from one seeded draw, the prompts first, then the items: the draw the
gate made when it held these suites itself, so the demo's measured figures (docs/demo.md)
stay comparable.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.synthetic_chats import (
    DOMAINS,
    RARE_DOMAIN,
    STYLES,
    MultipleChoice,
    answer_style,
    make_chat,
    units_multiple_choice,
)
from trainer.gate import Records
from trainer.likelihood import answer_logprobs
from trainer.tokenizer import IM_END

SEED = 9_001
COMMON_DOMAINS = tuple(d for d in DOMAINS if d != RARE_DOMAIN)
PREFERRED_STYLE_RATE = "preferred_style_rate"
WELL_FORMED_RATE = "well_formed_rate"
RARE_SKILL_ACCURACY = "rare_skill_accuracy"


def toy_suites(
    seed: int = SEED,
    heldout_prompts: int = 60,
    rare_skill_items: int = 120,
    max_new_tokens: int = 64,
    max_preference_drop: float = 0.05,
    max_well_formed_drop: float = 0.05,
    max_rare_skill_drop: float = 0.02,
    preferred_style: str | None = None,
) -> tuple["PreferredStyleRate", "WellFormedRate", "RareSkillAccuracy"]:
    """The demo's three suites. ``preferred_style`` None: the batch's (``preferred_style``)."""
    rng = random.Random(seed)
    prompts = tuple(
        make_chat(COMMON_DOMAINS[i % len(COMMON_DOMAINS)], STYLES[0], rng).prompt for i in range(heldout_prompts)
    )
    items = tuple(units_multiple_choice(rng) for _ in range(rare_skill_items))
    answering = Answering(prompts, seed, max_new_tokens)
    return (
        PreferredStyleRate(answering, max_preference_drop, preferred_style),
        WellFormedRate(answering, max_well_formed_drop),
        RareSkillAccuracy(items, max_rare_skill_drop),
    )


def preferred_style(records: Records) -> str:
    """The style a batch's feedback favours: majority over chosen and desirable answers."""
    votes = Counter(answer_style(r.chosen) for r in records.get("pairs", ()))
    votes.update(answer_style(r.completion) for r in records.get("labels", ()) if r.desirable)
    return votes.most_common(1)[0][0] if votes else STYLES[0]


def is_well_formed(completion: str) -> bool:
    """Ends the turn with <|im_end|> and does not repeat itself (the collapse symptom)."""
    if IM_END not in completion:
        return False
    words = completion.split(IM_END)[0].split()
    if not words:
        return False
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return not trigrams or max(trigrams.values()) < 3


def _version(content: object) -> str:
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Answering:
    """Held-out prompts and how they are answered: seeded sampling, temperature 1."""

    prompts: tuple[str, ...]
    seed: int
    max_new_tokens: int

    @torch.no_grad()
    def completions(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The sampled answers, decoded with special tokens kept (<|im_end|> shows the turn ended)."""
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in self.prompts
        ]
        tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            output = model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                top_k=0,
                eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                pad_token_id=tokenizer.pad_token_id,
            )
        completions = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=False)
        # Padding after <|im_end|> is not part of the answer.
        return [re.sub(re.escape(tokenizer.pad_token) + "+$", "", c) for c in completions]

    @property
    def version(self) -> str:
        return _version([self.prompts, self.seed, self.max_new_tokens])


@dataclass(frozen=True)
class _AnsweredSuite:
    """A suite scored on the sampled answers to its held-out prompts."""

    answering: Answering
    tolerance: float

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.answering.prompts

    @property
    def version(self) -> str:
        return self.answering.version


@dataclass(frozen=True)
class PreferredStyleRate(_AnsweredSuite):
    """Share of held-out answers in the preferred style: the demo's objective."""

    preferred: str | None = None  # None: the batch's
    name: ClassVar[str] = PREFERRED_STYLE_RATE
    protected: ClassVar[bool] = False

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> float:
        style = self.preferred or preferred_style(records)
        answers = [c.split(IM_END)[0].strip() for c in self.answering.completions(model, tokenizer)]
        return sum(answer_style(a) == style for a in answers) / len(answers)


@dataclass(frozen=True)
class WellFormedRate(_AnsweredSuite):
    """Share of held-out answers that end cleanly: what preference collapse destroys first."""

    name: ClassVar[str] = WELL_FORMED_RATE
    protected: ClassVar[bool] = True

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> float:
        completions = self.answering.completions(model, tokenizer)
        return sum(map(is_well_formed, completions)) / len(completions)


@dataclass(frozen=True)
class RareSkillAccuracy:
    """Share of (item, near miss) comparisons in which the correct answer is likelier."""

    items: tuple[MultipleChoice, ...]
    tolerance: float
    name: ClassVar[str] = RARE_SKILL_ACCURACY
    protected: ClassVar[bool] = True

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(item.prompt for item in self.items)

    @property
    def version(self) -> str:
        return _version([(m.prompt, m.correct, m.wrong) for m in self.items])

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> float:
        choices = 1 + len(self.items[0].wrong)
        pairs = [([{"role": "user", "content": item.prompt}], answer)
                 for item in self.items for answer in (item.correct, *item.wrong)]  # fmt: skip
        scores = answer_logprobs(model, tokenizer, pairs)[0].view(-1, choices)
        # The correct answer comes first in each row; count the near misses it beats.
        return (scores[:, :1] > scores[:, 1:]).float().mean().item()

