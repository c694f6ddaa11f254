"""A gate suite graded by an LLM judge: any OpenAI-compatible endpoint scores the model's answers.

For what no likelihood ranking captures (is the answer helpful, safe, on brand), a stronger
model grades. The suite answers each prompt of a JSONL file (``{"prompt": ..., "reference":
...}``, the reference optional: shown to the judge when given) with the model under test,
greedily, so every candidate is asked the same way, and sends each answer to the judge with
the operator's rubric. The judge is told to reply with a grade between 0 and 1; the first
number in its reply is the grade. The figure is the mean grade, the objective by default
(held to the parent: the judge's scale drifts less between two models than against a fixed
floor); a spec's ``protected: true`` holds it to the base model instead.

A judge out of reach, too slow (``timeout_s``), refusing the request, or replying without a
grade between 0 and 1 makes the suite abstain, with the reason, for this model: the gate
then compares the figures it has, and the trainer goes on. A grade for some answers only
would not compare with the parent's. Each evaluation costs one request per prompt (and the
parent, the candidate and, if protected, the base model are evaluated): keep the file small.
"""

import hashlib
import re
from pathlib import Path
from dataclasses import dataclass

import openai
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from streams.judge_endpoint import judge_api_key, judge_client
from trainer.gate import Abstain, Records
from trainer.jsonl_suite import Prompted, read_items

FORMAT = '{"prompt": "...", "reference": "..."} ("reference" optional)'
INSTRUCTION = "Grade the answer by the rubric. Reply with the grade alone: a number from 0 (worst) to 1 (best)."
GRADE = re.compile(r"\d+(?:\.\d+)?")


class JudgeSuiteConfig(BaseModel):
    """The options of ``trainer.judge_suite:judge_suite`` in a gate suite spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="JSONL file of the prompts to answer, one per line.")
    base_url: str = Field(description="The judge's OpenAI-compatible API, e.g. https://api.example.com/v1.")
    model: str = Field(description="The judge model's name at that endpoint.")
    rubric: str = Field(min_length=1, description="What a good answer is: the judge's instructions.")
    api_key_env: str | None = Field(
        "FEEDLOOP_JUDGE_API_KEY", description="Environment variable that holds the judge's API key; None: no key."
    )
    name: str = Field("judge_grade", description="The suite's name in the lineage and the verdict.")
    tolerance: float = Field(0.05, ge=0, description="How far below its reference the mean grade may fall.")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer the model under test writes.")
    timeout_s: float = Field(30.0, gt=0, description="How long one grading request may take; longer: abstain.")


class JudgedItem(Prompted):
    reference: str | None = None


def parse_grade(reply: str) -> float:
    """The first number of the judge's reply, which must lie in [0, 1]; ValueError otherwise."""
    found = GRADE.search(reply)
    if found is None or not 0 <= float(found.group()) <= 1:
        raise ValueError(f"no grade between 0 and 1 in the judge's reply {reply[:200]!r}")
    return float(found.group())


@torch.no_grad()
def answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: tuple[JudgedItem, ...],
            max_new_tokens: int) -> list[str]:  # fmt: skip
    """Each prompt's answer by ``model``, greedy, without the end-of-turn token."""
    texts = [tokenizer.apply_chat_template(item.chat, add_generation_prompt=True, tokenize=False) for item in items]
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass(frozen=True)
class JudgeSuite:
    config: JudgeSuiteConfig
    items: tuple[JudgedItem, ...]
    file_sha256: str
    client: openai.OpenAI
    protected: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tolerance(self) -> float:
        return self.config.tolerance

    @property
    def version(self) -> str:
        asked = [self.file_sha256, self.config.model, self.config.rubric, self.config.max_new_tokens]
        return hashlib.sha256(repr(asked).encode()).hexdigest()[:12]

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(item.question for item in self.items)

    def grade(self, item: JudgedItem, answer: str) -> float:
        reference = f"Reference answer:\n{item.reference}\n\n" if item.reference else ""
        reply = self.client.chat.completions.create(
            model=self.config.model,
            temperature=0,
            messages=[
                {"role": "system", "content": f"{self.config.rubric}\n\n{INSTRUCTION}"},
                {"role": "user", "content": f"Question:\n{item.question}\n\n{reference}Answer to grade:\n{answer}"},
            ],
        )
        return parse_grade(reply.choices[0].message.content or "")

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Records) -> float:
        written = answers(model, tokenizer, self.items, self.config.max_new_tokens)
        try:
            grades = [self.grade(item, answer) for item, answer in zip(self.items, written)]
        except (openai.OpenAIError, ValueError) as exc:  # out of reach, too slow, refused, or no grade
            raise Abstain(f"the judge {self.config.model} at {self.config.base_url} gave no grade: "
                          f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        return sum(grades) / len(grades)


def judge_suite(**options: object) -> tuple[JudgeSuite]:
    """The component a spec names: ``{"component": "trainer.judge_suite:judge_suite", "options":
    {"path": ..., "base_url": ..., "model": ..., "rubric": ...}}``. Reads the file and the key
    now, so a missing one stops the trainer at start-up, not mid-batch."""
    config = JudgeSuiteConfig(**options)
    items, file_sha256 = read_items(config.path, JudgedItem, FORMAT)
    key = judge_api_key(config.api_key_env, where="the suite's api_key_env")
    # No retries: a judge that failed once is reported (the suite abstains), not waited for.
    return (JudgeSuite(config, items, file_sha256, judge_client(config.base_url, key, config.timeout_s)),)
