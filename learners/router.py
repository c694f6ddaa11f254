"""Contextual bandit router: which adapter serves a request."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from learners.features import Context, HashingFeaturizer
from learners.ridge import OnlineRidge

# Of ``LinUCBRouter.to_bytes``; ``from_bytes`` refuses any other. 2: each arm's residual sum
# of squares (the noise-scaled bonus), min_propensity and noise_prior_weight.
FORMAT = 2
NOISE_PRIOR_SD = 0.5  # the largest standard deviation a reward in [0, 1] can have


@dataclass(frozen=True)
class RoutingDecision:
    """The arm that serves a request, the probability it had, and the whole distribution."""

    arm: str
    propensity: float
    probabilities: dict[str, float]


class LinUCBRouter:
    """Disjoint LinUCB over hashed context features, with exploration scaled to each arm's noise.

    Each arm has its own ridge regression of reward on the features ``x`` of the context, and
    an estimate of its reward's noise variance, its residuals shrunk towards all arms':

        s2 = (noise_prior_weight * 0.25 + sum_b RSS_b) / (noise_prior_weight + sum_b n_b)
        s2_a = (noise_prior_weight * s2 + RSS_a) / (noise_prior_weight + n_a)

    (``RSS_a``: the ridge's penalised residual sum of squares over its ``n_a`` rewards; 0.25 is
    the largest variance a reward in [0, 1] can have). The greedy choice maximises the upper
    bound ``w_a . x + alpha * s_a * sqrt(x^T A_a^-1 x)`` and the decision is the distribution

        p(a | x) = e_a(x) + (1 - sum_b e_b(x)) * [a is greedy] / (number of greedy arms)
        e_a(x) = max(min_propensity, floor / K * min(1, s_a sqrt(x^T A_a^-1 x) / (0.5 ||x|| / sqrt(l2))))

    over the K live arms (all equal if ``sum_b e_b(x) >= 1``), sampled with the router's own
    seeded RNG.

    Why this scheme. ``s_a sqrt(x^T A_a^-1 x)`` is the standard deviation of the arm's mean
    reward at ``x`` under the Bayesian (normal-inverse-gamma) reading of its ridge, so
    ``alpha`` counts standard deviations whatever the reward's scale: a bonus in reward units
    is too wide for a 3% click rate (sd ~0.17) and too narrow for a 50% one (sd 0.5), and no one
    value fits both. The noise is shrunk towards the router-wide estimate because an arm with
    few rewards says least about its own noise: at a low click rate an arm that drew only
    zeros would look noiseless, and be dropped for good. An arm's exploration share is the
    floor's even share times its width as a part of the widest a fresh arm can have (0.5 ||x||
    / sqrt(l2), with the noise at its largest): traffic goes to arms still uncertain at ``x``, an arm the router has neglected
    keeps its share until its own rewards firm it up, and an arm long known to be worse fades
    to ``min_propensity``, which every live arm keeps so the logged propensities support
    off-policy evaluation of any candidate. A deterministic greedy rule plus these shares,
    rather than Thompson sampling, keeps each propensity exact and cheap: sampled posteriors
    have no closed-form probability of each arm. ``alpha`` = 1, one standard deviation: half
    of one did as well on ``benchmarks/router_replay.py``'s short logs but, at a 4% reward rate,
    dropped an arm that was best after a few unlucky zeros (tests/learners/test_router.py).

    A new adapter starts as a canary: ``set_cap(arm, share)`` bounds its probability, and
    what it loses goes to the uncapped arms in proportion to theirs (a fresh arm's wide
    confidence bound would otherwise make it the greedy choice for almost all traffic); an
    operator's cap below ``min_propensity`` wins. ``pin(arm)`` sends everything to one arm (an
    operator's freeze), ``pin(None)`` lifts it. Propensities are always those of the
    distribution actually sampled.

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
        Width of the confidence bonus in standard deviations of the arm's mean reward; 0 makes
        the greedy choice purely exploitative.
    floor
        Exploration share spread evenly over live arms before any reward, in [0, 1]; each
        arm's part shrinks with its uncertainty.
    min_propensity
        Least probability of every live arm (unless capped or pinned), in [0, 1]; with
        ``1 / min_propensity`` arms or more, all are equally likely.
    noise_prior_weight
        Pseudo-rewards of the prior variance at each level of the noise estimate (> 0).
    dim
        Length of the feature vector (see ``HashingFeaturizer``).
    l2
        Ridge penalty of each arm's regression.
    seed
        Seed of the sampling RNG.

    Examples
    --------
    >>> router = LinUCBRouter(["base", "code-v1"], seed=42)
    >>> context = {"domain": "code", "cohort": "b", "prompt_tokens": 120}
    >>> router.probabilities(context)  # no reward yet: both greedy
    {'base': 0.5, 'code-v1': 0.5}
    >>> for _ in range(50):
    ...     router.learn_one("code-v1", context, 1.0)
    ...     router.learn_one("base", context, 0.0)
    >>> {arm: round(p, 3) for arm, p in router.probabilities(context).items()}
    {'base': 0.001, 'code-v1': 0.999}
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
        min_propensity: float = 0.001,
        noise_prior_weight: float = 10.0,
        dim: int = 32,
        l2: float = 1.0,
        seed: int = 0,
    ):
        if not 0.0 <= floor <= 1.0:
            raise ValueError("floor must be in [0, 1]")
        if not 0.0 <= min_propensity <= 1.0:
            raise ValueError("min_propensity must be in [0, 1]")
        if noise_prior_weight <= 0:
            raise ValueError("noise_prior_weight must be positive")
        self.alpha = alpha
        self.floor = floor
        self.min_propensity = min_propensity
        self.noise_prior_weight = noise_prior_weight
        self.l2 = l2
        self.featurizer = HashingFeaturizer(dim)
        self._models: dict[str, OnlineRidge] = {}
        self._caps: dict[str, float] = {}
        self._held: dict[str, float] = {}  # least shares (``hold``)
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
        self._held.pop(arm, None)
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

    def hold(self, shares: Mapping[str, float]) -> None:
        """Keep at least ``shares[arm]`` of the traffic on each named live arm, however sure the
        router is (the arms of a running A/B test: its propensity-weighted terms grow as 1/p, so
        an arm left at ``min_propensity`` would stall the verdict); replaces the last call's.
        A cap below a hold wins."""
        if unknown := set(shares) - set(self._models):
            raise ValueError(f"arms {sorted(unknown)} are not live")
        if any(not 0.0 <= share <= 1.0 for share in shares.values()):
            raise ValueError("a held share must be in [0, 1]")
        self._held = dict(shares)

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
        models = self._models.values()
        means = np.array([model.predict(x) for model in models])
        widths = np.sqrt(self._noise_variances()) * np.array([model.uncertainty(x) for model in models])
        ucb = means + self.alpha * widths
        greedy = ucb == ucb.max()
        prior_width = NOISE_PRIOR_SD * float(np.sqrt(x @ x / self.l2))
        explore = np.maximum(self.min_propensity, self.floor / len(ucb) * np.minimum(1.0, widths / prior_width))
        if self._held:
            explore = np.maximum(explore, [self._held.get(arm, 0.0) for arm in self._models])
        if explore.sum() >= 1.0:  # more arms than 1 / min_propensity: none can be favoured
            explore = np.full(len(ucb), 1.0 / len(ucb))
        p = explore + (1.0 - explore.sum()) * greedy / greedy.sum()
        return _capped(dict(zip(self._models, p.tolist())), self._caps)

    def noise_sd(self, arm: str) -> float:
        """The estimated standard deviation of ``arm``'s reward around its ridge's prediction."""
        return math.sqrt(self._noise_variances()[self.arms.index(arm)])

    def _noise_variances(self) -> np.ndarray:
        """Each arm's residual variance shrunk towards the router-wide one, itself shrunk towards 0.25."""
        weight = self.noise_prior_weight
        rss = np.array([model.residual_ss for model in self._models.values()])
        n = np.array([model.n for model in self._models.values()])
        pooled = (weight * NOISE_PRIOR_SD**2 + rss.sum()) / (weight + n.sum())
        return (weight * pooled + rss) / (weight + n)

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
        arm ``A^-1``, ``b``, ``w`` and its ridge's running sum of squares as little-endian
        float64 (``OnlineRidge.to_array``).

        Not pickle: the gateway faces the internet and must not run code it reads from the
        store. The bytes depend only on the router's numbers, so equal states give equal
        bytes; the RNG is left out (see ``from_bytes``)."""
        header = {"format": FORMAT, "alpha": self.alpha, "floor": self.floor, "l2": self.l2,
                  "min_propensity": self.min_propensity, "noise_prior_weight": self.noise_prior_weight,
                  "dim": self.featurizer.dim, "arms": [[arm, m.n] for arm, m in self._models.items()],
                  "caps": self._caps, "held": self._held, "pinned": self.pinned}  # fmt: skip
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
        router = cls((), alpha=header["alpha"], floor=header["floor"], min_propensity=header["min_propensity"],
                     noise_prior_weight=header["noise_prior_weight"], dim=dim, l2=l2)  # fmt: skip
        router._rng = rng
        values = np.frombuffer(arrays, dtype="<f8")
        per_arm = (dim + 1) ** 2
        if values.size != per_arm * len(header["arms"]):
            raise ValueError("router bytes are truncated")
        for i, (arm, n) in enumerate(header["arms"]):
            router._models[arm] = OnlineRidge.from_array(values[i * per_arm : (i + 1) * per_arm], n=n, l2=l2)
        for arm, share in header["caps"].items():
            router.set_cap(arm, share)
        router.hold(header["held"])
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
