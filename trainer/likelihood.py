"""How likely a model finds an answer to a prompt: what the data-driven gate suites rank by.

An answer's tokens are what the chat template renders after the prompt's generation prompt
(its end-of-turn token included, trailing whitespace not), scored in one forward pass per
chunk of pairs. Ranking answers by likelihood measures a preference or a skill even where a
small model cannot generate the right text; exact match would read 0 for every model.
"""

import contextlib
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Chat = Sequence[Mapping[str, str]]  # role/content messages


def _tokens(tokenizer: PreTrainedTokenizerBase, prompt: Chat, answer: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens (through the generation prompt) and the answer's."""
    prompt = [dict(m) for m in prompt]
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(head):
        raise ValueError("the chat template does not render a chat as its prompt's generation prompt followed by "
                         "the answer; score with a template that does (docs/model.md)")  # fmt: skip
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    return prefix, tokenizer(whole[len(head) :].rstrip(), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[Chat, str]], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total log-probability of each (prompt, answer) pair's answer, and its number of tokens
    (divide for the length-normalised, per-token figure)."""
    totals, lengths = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(pairs), batch_size):
        prefixes, sequences = [], []
        for prompt, answer in pairs[start : start + batch_size]:
            prefix, tokens = _tokens(tokenizer, prompt, answer)
            prefixes.append(len(prefix))
            sequences.append(prefix + tokens)
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        # Only answer tokens count: position t predicts token t + 1.
        mask = torch.tensor(
            [[int(p - 1 <= t < len(s) - 1) for t in range(width - 1)] for p, s in zip(prefixes, sequences)],
            device=model.device,
        )
        attention = torch.tensor([[int(t < len(s)) for t in range(width)] for s in sequences], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        totals.append((token_logprobs * mask).sum(-1))
        lengths.append(mask.sum(-1))
    return torch.cat(totals), torch.cat(lengths)


def prefers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, comparisons: Sequence[tuple[Chat, str, str]]
) -> torch.Tensor:
    """For each (prompt, better, worse): whether ``model`` gives ``better`` the higher per-token
    log-likelihood. Per token, so that an answer is not preferred for being short (a total
    favours the shorter answer by its length alone), as DPO's own length-normalised variants do."""
    totals, lengths = answer_logprobs(model, tokenizer, [(p, a) for p, better, worse in comparisons for a in (better, worse)])
    per_token = (totals / lengths.clamp(min=1)).view(-1, 2)
    return per_token[:, 0] > per_token[:, 1]


def gains(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[Chat, str]]) -> torch.Tensor:
    """How much likelier each (prompt, answer) pair's answer is under ``model`` than under the
    base model beneath its adapter (peft's ``disable_adapter``), in log-probability per token:
    DPO's implicit reward, length-normalised. A model without an adapter gains 0 everywhere.

    Relative to the base model, because an answer's raw likelihood is dominated by its form:
    the tiny base model gives a formulaic long answer a higher per-token likelihood than a
    short one on every pair, and a lower total, whatever it was trained to prefer. The gain
    cancels the form and keeps what training moved."""
    totals, lengths = answer_logprobs(model, tokenizer, pairs)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        base, _ = answer_logprobs(model, tokenizer, pairs)
    return (totals - base) / lengths.clamp(min=1)
