"""A simulated contextual environment with known reward probabilities."""

from __future__ import annotations

import numpy as np
import pytest

ARMS = ("general", "coder", "mathy")
DOMAINS = ("code", "chat", "math")
COHORTS = ("a", "b")
# Success probability of each arm by domain, then a per-cohort shift: in cohort "b" the
# coder adapter is worse, so the best arm for code requests depends on the cohort too.
BASE = {
    "general": {"code": 0.45, "chat": 0.70, "math": 0.40},
    "coder": {"code": 0.75, "chat": 0.45, "math": 0.50},
    "mathy": {"code": 0.40, "chat": 0.50, "math": 0.75},
}
COHORT_SHIFT = {
    "general": {"a": 0.0, "b": 0.15},
    "coder": {"a": 0.0, "b": -0.25},
    "mathy": {"a": 0.0, "b": 0.0},
}


class ContextualEnvironment:
    arms = ARMS
    domain_probs = (0.4, 0.4, 0.2)
    cohort_probs = (0.6, 0.4)

    def reward_probability(self, domain: str, cohort: str, arm: str) -> float:
        return BASE[arm][domain] + COHORT_SHIFT[arm][cohort]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[dict], np.ndarray]:
        """n contexts and their (n, arms) reward probabilities."""
        domains = rng.choice(len(DOMAINS), size=n, p=self.domain_probs)
        cohorts = rng.choice(len(COHORTS), size=n, p=self.cohort_probs)
        locales = rng.choice(["en", "fr"], size=n, p=[0.7, 0.3])
        clients = rng.choice(["web", "api"], size=n)
        tokens = np.exp(rng.uniform(np.log(10), np.log(2000), size=n)).astype(int)
        table = np.array(
            [[[self.reward_probability(d, c, a) for a in ARMS] for c in COHORTS] for d in DOMAINS]
        )
        contexts = [
            {
                "domain": DOMAINS[d],
                "locale": str(loc),
                "client": str(cl),
                "cohort": COHORTS[c],
                "prompt_tokens": int(t),
            }
            for d, c, loc, cl, t in zip(domains, cohorts, locales, clients, tokens)
        ]
        return contexts, table[domains, cohorts]

    def policy_value(self, policy) -> float:
        """Exact expected reward of ``policy`` (context -> arm probabilities); the policy
        must only look at domain and cohort."""
        value = 0.0
        for d, pd in zip(DOMAINS, self.domain_probs):
            for c, pc in zip(COHORTS, self.cohort_probs):
                probabilities = policy({"domain": d, "cohort": c})
                value += (
                    pd
                    * pc
                    * sum(p * self.reward_probability(d, c, a) for a, p in probabilities.items())
                )
        return value


@pytest.fixture
def environment() -> ContextualEnvironment:
    return ContextualEnvironment()
