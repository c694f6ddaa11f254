"""Contextual bandit router: which adapter serves a request."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from learners.features import Context, HashingFeaturizer
from learners.ridge import OnlineRidge

FORMAT = 1  # of ``LinUCBRouter.to_bytes``; ``from_bytes`` refuses any other


@dataclass(frozen=True)
class RoutingDecision:
    """The arm that serves a request, the probability it had, and the whole distribution."""

    arm: str
    propensity: float
    probabilities: dict[str, float]


class LinUCBRouter:
    """Disjoint LinUCB over hashed context features, with an exploration floor.

    Each arm has its own ridge regression of reward on the features ``x`` of the context.
    The arm with the highest upper confidence bound ``w_a . x + alpha * sqrt(x^T A_a^-1 x)``
    is the greedy choice; the decision is then the distribution

        p(a | x) = floor / K + (1 - floor) * [a is greedy] / (number of greedy arms)

    over the K live arms, sampled with the router's own seeded RNG. The floor keeps every arm
    observable, so the logged propensities support off-policy evaluation of any candidate.

    A new adapter starts as a canary: ``set_cap(arm, share)`` bounds its probability, and
    what it loses goes to the uncapped arms in proportion to theirs (a fresh arm's wide
    confidence bound would otherwise make it the greedy choice for almost all traffic).
    ``pin(arm)`` sends everything to one arm (an operator's freeze), ``pin(None)`` lifts it.
    Propensities are always those of the distribution actually sampled.

    ``to_bytes`` and ``from_bytes`` carry a router from the learner to the gateway.

    River's ``LinUCBDisjoint`` is not used: it returns a single arm without propensities, has
    no way to retire an arm or warm-start one, and updates through dict-based Bayesian
    regressions (~15k decisions/s); here numpy with Sherman-Morrison updates keeps a decision
    at tens of microseconds.

    Parameters
    ----------
    arms
        Initial live arms (adapter names), in a fixed order that sampling follows.
    alpha
        Width of the confidence bonus; 0 makes the greedy choice purely exploitative.
    floor
        Total probability spread evenly over live arms, in [0, 1].
    dim
        Length of the feature vector (see ``HashingFeaturizer``).
    l2
        Ridge penalty of each arm's regression.
    seed
        Seed of the sampling RNG.

    Examples
    --------
    >>> router = LinUCBRouter(["base", "code-v1"], floor=0.2, seed=42)
    >>> context = {"domain": "code", "cohort": "b", "prompt_tokens": 120}
    >>> for _ in range(50):
    ...     router.learn_one("code-v1", context, 1.0)
    ...     router.learn_one("base", context, 0.0)
    >>> router.probabilities(context)
    {'base': 0.1, 'code-v1': 0.9}
    >>> decision = router.decide(context)
    >>> decision.propensity == decision.probabilities[decision.arm]
    True
    >>> router.add_arm("code-v2", warm_start_from="code-v1")
    >>> router.set_cap("code-v2", 0.2)
    >>> router.probabilities(context)["code-v2"]
    0.2
    >>> copy = LinUCBRouter.from_bytes(router.to_bytes(), np.random.default_rng(7))
    >>> copy.probabilities(context) == router.probabilities(context), copy.caps
    (True, {'code-v2': 0.2})
    >>> router.pin("base")
    >>> router.decide(context).arm
    'base'
    >>> router.remove_arm("base")
    >>> router.arms, router.pinned
    (('code-v1', 'code-v2'), None)
    """

    def __init__(
        self,
        arms: Iterable[str] = (),
        *,
        alpha: float = 1.0,
        floor: float = 0.1,
        dim: int = 32,
        l2: float = 1.0,
        seed: int = 0,
    ):
        if not 0.0 <= floor <= 1.0:
            raise ValueError("floor must be in [0, 1]")
        self.alpha = alpha
        self.floor = floor
        self.l2 = l2
        self.featurizer = HashingFeaturizer(dim)
        self._models: dict[str, OnlineRidge] = {}
        self._caps: dict[str, float] = {}
        self.pinned: str | None = None
        self._rng = np.random.default_rng(seed)
        for arm in arms:
            self.add_arm(arm)

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self._models)

    def add_arm(self, arm: str, warm_start_from: str | None = None) -> None:
        """Make ``arm`` live; optionally start its weights at another arm's (e.g. its parent)."""
        if arm in self._models:
            raise ValueError(f"arm {arm!r} is already live")
        prior = None if warm_start_from is None else self._models[warm_start_from].weights
        self._models[arm] = OnlineRidge(self.featurizer.dim, self.l2, prior_mean=prior)

    def remove_arm(self, arm: str) -> None:
        del self._models[arm]
        self._caps.pop(arm, None)
        if self.pinned == arm:
            self.pinned = None

    @property
    def caps(self) -> dict[str, float]:
        return dict(self._caps)

    def set_cap(self, arm: str, share: float | None) -> None:
        """Bound ``arm``'s probability by ``share`` (None removes the bound)."""
        if arm not in self._models:
            raise ValueError(f"arm {arm!r} is not live")
        if share is None:
            self._caps.pop(arm, None)
        elif not 0.0 < share <= 1.0:
            raise ValueError("a cap must be in (0, 1]")
        else:
            self._caps[arm] = share

    def pin(self, arm: str | None) -> None:
        """Route everything to ``arm`` until ``pin(None)``."""
        if arm is not None and arm not in self._models:
            raise ValueError(f"arm {arm!r} is not live")
        self.pinned = arm

    def probabilities(self, context: Context) -> dict[str, float]:
        """The distribution ``decide`` samples from; does not touch the RNG."""
        if not self._models:
            raise ValueError("no live arms")
        if self.pinned is not None:
            return {arm: 1.0 if arm == self.pinned else 0.0 for arm in self._models}
        x = self.featurizer.transform(context)
        ucb = {
            arm: model.predict(x) + self.alpha * model.uncertainty(x)
            for arm, model in self._models.items()
        }
        best = max(ucb.values())
        greedy = [arm for arm, bound in ucb.items() if bound == best]
        base = self.floor / len(ucb)
        bonus = (1.0 - self.floor) / len(greedy)
        return _capped({arm: base + bonus if arm in greedy else base for arm in ucb}, self._caps)

    def decide(self, context: Context) -> RoutingDecision:
        probabilities = self.probabilities(context)
        arms = list(probabilities)
        cumulative = np.cumsum(list(probabilities.values()))
        # min(): if rounding leaves the total just under the draw, take the last arm.
        index = min(
            int(np.searchsorted(cumulative, self._rng.random(), side="right")), len(arms) - 1
        )
        return RoutingDecision(arms[index], probabilities[arms[index]], probabilities)

    def learn_one(self, arm: str, context: Context, reward: float) -> None:
        """Update ``arm`` with a reward in [0, 1]. Rewards for removed arms are dropped:
        late feedback for a retired adapter is normal in a stream."""
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward {reward} is outside [0, 1]")
        model = self._models.get(arm)
        if model is not None:
            model.learn_one(self.featurizer.transform(context), reward)

    def to_bytes(self) -> bytes:
        """A JSON header line (format, parameters, arms with their counts, caps, pin), then per
        arm ``A^-1``, ``b`` and ``w`` as little-endian float64.

        Not pickle: the gateway faces the internet and must not run code it reads from the
        store. The bytes depend only on the router's numbers, so equal states give equal
        bytes; the RNG is left out (see ``from_bytes``)."""
        header = {"format": FORMAT, "alpha": self.alpha, "floor": self.floor, "l2": self.l2,
                  "dim": self.featurizer.dim, "arms": [[arm, m.n] for arm, m in self._models.items()],
                  "caps": self._caps, "pinned": self.pinned}  # fmt: skip
        arrays = b"".join(model.to_array().astype("<f8").tobytes() for model in self._models.values())
        return json.dumps(header, sort_keys=True).encode() + b"\n" + arrays

    @classmethod
    def from_bytes(cls, data: bytes, rng: np.random.Generator) -> LinUCBRouter:
        """The router ``to_bytes`` wrote, drawing its decisions from ``rng``.

        The caller's RNG, not one from the bytes: the learner never draws, so every snapshot
        would hold the same RNG state, and a gateway restarting it at each reload would repeat
        the same draws after every reload."""
        head, _, arrays = data.partition(b"\n")
        header = json.loads(head)
        if header["format"] != FORMAT:
            raise ValueError(f"router format {header['format']} is not {FORMAT}")
        dim, l2 = header["dim"], header["l2"]
        router = cls((), alpha=header["alpha"], floor=header["floor"], dim=dim, l2=l2)
        router._rng = rng
        values = np.frombuffer(arrays, dtype="<f8")
        per_arm = dim * dim + 2 * dim
        if values.size != per_arm * len(header["arms"]):
            raise ValueError("router bytes are truncated")
        for i, (arm, n) in enumerate(header["arms"]):
            router._models[arm] = OnlineRidge.from_array(values[i * per_arm : (i + 1) * per_arm], n=n, l2=l2)
        for arm, share in header["caps"].items():
            router.set_cap(arm, share)
        router.pin(header["pinned"])
        return router


def _capped(probabilities: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Lower capped arms to their caps and give the excess to the uncapped arms, in proportion
    to their probabilities (evenly if those are all 0). With no uncapped arm, nothing moves."""
    excess = sum(max(0.0, p - caps[arm]) for arm, p in probabilities.items() if arm in caps)
    free = [arm for arm in probabilities if arm not in caps]
    if excess == 0.0 or not free:
        return probabilities
    free_total = sum(probabilities[arm] for arm in free)
    out = {}
    for arm, p in probabilities.items():
        if arm in caps:
            out[arm] = min(p, caps[arm])
        elif free_total > 0:
            out[arm] = p + excess * p / free_total
        else:
            out[arm] = p + excess / len(free)
    return out
