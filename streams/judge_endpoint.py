"""How feedloop reaches a model judge: an OpenAI-compatible endpoint, its key, its client.

Two parts ask a judge: the trainer's gate suite (``trainer.judge_suite``) grades a
candidate's answers, and the self-evaluation annotator (``streams.annotator``) grades served
answers. They read their reply by rules of their own (a grade, a strict JSON verdict), but
reach the endpoint by one rule, written here: the key comes from a named environment
variable (never from a setting that ends up in logs or child processes' dumps), a local
endpoint may need none, and the openai client never retries on its own, because each caller
decides what an unanswered request means (the suite abstains, the annotator backs off).
"""

from __future__ import annotations

import os

import openai

NO_KEY = "unused"  # the openai client wants a key; a local vLLM checks none


def judge_api_key(api_key_env: str | None, *, where: str) -> str:
    """The key in ``api_key_env``, or :data:`NO_KEY` when it is None; ValueError saying what
    to set when the variable is empty. ``where``: the setting that named it, for the message."""
    if api_key_env is None:
        return NO_KEY
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"the judge's API key is not set: put it in {api_key_env}, or set {where} to null "
                         "for an endpoint that needs none")  # fmt: skip
    return key


def judge_client(base_url: str, api_key: str, timeout_s: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)


def async_judge_client(base_url: str, api_key: str, timeout_s: float) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
