"""The evaluation gate: a candidate adapter must not be worse than its parent where it counts.

Two suites, generated deterministically from ``synthetic_chats`` with the gate's own seed
(never a training seed), so they are the same for every candidate:

- **held-out prompts** over the common domains, answered by sampling (seeded): the
  *preferred-style rate* (``answer_style`` of the answer is the batch's preferred style)
  and the *well-formed rate* (the answer ends in ``<|im_end|>`` within the budget and does
  not loop). Margins alone miss preference collapse; generated text does not.
- **rare skill** (``units``): the correct answer against three near misses (wrong unit, wrong
  amount, wrong factor) by log-likelihood; *accuracy* is the share of (item, near miss)
  comparisons the correct answer wins (the default base model scores ~0.7, chance is 0.5).
  The base model cannot generate correct conversions, so exact match would read 0 for
  every model; likelihood ranking is measurable and moves when the skill is forgotten.

The verdict compares the candidate's style and well-formed rates with its parent's, and its
rare skill with the base model's: a fixed floor, so the losses of a chain of adapters cannot
add up. Not with the parent's: an adapter a few items above the base on the suite holds no
skill its child must keep, and measured in the demo, that check rejected the two adapters
that had learned the users' new preference best, both well above the floor.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainer.config import GateConfig
from demo.synthetic_chats import DOMAINS, RARE_DOMAIN, STYLES, answer_style, make_chat, units_multiple_choice
from trainer.tokenizer import IM_END

COMMON_DOMAINS = tuple(d for d in DOMAINS if d != RARE_DOMAIN)
PREFERRED_STYLE_RATE = "preferred_style_rate"
WELL_FORMED_RATE = "well_formed_rate"
RARE_SKILL_ACCURACY = "rare_skill_accuracy"


@dataclass(frozen=True)
class Suites:
    prompts: tuple[str, ...]
    rare_skill: tuple  # of synthetic_chats.MultipleChoice

    @property
    def version(self) -> str:
        """Hash of the suites' content: metrics are only comparable under the same version."""
        payload = json.dumps([self.prompts, [(m.prompt, m.correct, m.wrong) for m in self.rare_skill]])
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_suites(config: GateConfig) -> Suites:
    rng = random.Random(config.seed)
    prompts = tuple(
        make_chat(COMMON_DOMAINS[i % len(COMMON_DOMAINS)], STYLES[0], rng).prompt for i in range(config.heldout_prompts)
    )
    return Suites(prompts, tuple(units_multiple_choice(rng) for _ in range(config.rare_skill_items)))


def is_well_formed(completion: str) -> bool:
    """Ends the turn with <|im_end|> and does not repeat itself (the collapse symptom)."""
    if IM_END not in completion:
        return False
    words = completion.split(IM_END)[0].split()
    if not words:
        return False
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return not trigrams or max(trigrams.values()) < 3


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: tuple[str, ...], config: GateConfig
) -> list[str]:
    """Seeded sampled answers (temperature 1), decoded with special tokens kept."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        output = model.generate(
            **encoded,
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            top_k=0,
            eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=False)
    # Padding after <|im_end|> is not part of the answer.
    return [re.sub(re.escape(tokenizer.pad_token) + "+$", "", c) for c in completions]


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> torch.Tensor:
    """Total log-probability of each (prompt, answer) pair's answer, its <|im_end|> included."""
    scores = []
    for start in range(0, len(pairs), batch_size):
        prefixes, sequences = [], []
        for prompt, answer in pairs[start : start + batch_size]:
            prefix = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            prefixes.append(len(prefix))
            sequences.append(prefix + tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"])
        width = max(map(len, sequences))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        # Only answer tokens count: position t predicts token t + 1.
        mask = torch.tensor(
            [[int(p - 1 <= t < len(s) - 1) for t in range(width - 1)] for p, s in zip(prefixes, sequences)],
            device=model.device,
        )
        logits = model(input_ids=input_ids, attention_mask=(input_ids != pad).long()).logits[:, :-1].float()
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        scores.append((token_logprobs * mask).sum(-1))
    return torch.cat(scores)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suites: Suites,
    config: GateConfig,
    preferred_style: str,
) -> dict[str, float]:
    model.eval()
    completions = generate(model, tokenizer, suites.prompts, config)
    answers = [c.split(IM_END)[0].strip() for c in completions]
    return {
        PREFERRED_STYLE_RATE: sum(answer_style(a) == preferred_style for a in answers) / len(answers),
        WELL_FORMED_RATE: sum(map(is_well_formed, completions)) / len(completions),
        RARE_SKILL_ACCURACY: rare_skill_accuracy(model, tokenizer, suites),
    }


def rare_skill_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, suites: Suites) -> float:
    """Share of (item, near miss) comparisons in which the correct answer is likelier."""
    model.eval()
    choices = 1 + len(suites.rare_skill[0].wrong)
    pairs = [(item.prompt, answer) for item in suites.rare_skill for answer in (item.correct, *item.wrong)]
    scores = answer_logprobs(model, tokenizer, pairs).view(-1, choices)
    # The correct answer comes first in each row; count the near misses it beats.
    return (scores[:, :1] > scores[:, 1:]).float().mean().item()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) or None


def judge(
    parent: dict[str, float], candidate: dict[str, float], config: GateConfig, base_rare_skill: float | None = None
) -> Verdict:
    """Pass unless the style or well-formed rate fell by more than its allowed drop below the
    parent's, or the rare skill by more than its drop below the base model's (the parent's
    when it is the base model; ``base_rare_skill`` when it is an adapter)."""
    references = [
        ("", parent[PREFERRED_STYLE_RATE], PREFERRED_STYLE_RATE, config.max_preference_drop),
        ("", parent[WELL_FORMED_RATE], WELL_FORMED_RATE, config.max_well_formed_drop),
        ("the base model's " if base_rare_skill is not None else "",
         parent[RARE_SKILL_ACCURACY] if base_rare_skill is None else base_rare_skill,
         RARE_SKILL_ACCURACY, config.max_rare_skill_drop),
    ]  # fmt: skip
    reasons = tuple(
        f"{metric} fell from {whose}{reference:.3f} to {candidate[metric]:.3f} (allowed drop {limit:.3f})"
        for whose, reference, metric, limit in references
        # A small epsilon keeps float noise (0.5 - 0.48 = 0.0200000001) from tripping an exact limit.
        if reference - candidate[metric] > limit + 1e-9
    )
    return Verdict(not reasons, reasons)
