"""The router's defaults beside fixed-bonus LinUCB and River's bandits, replayed on simulated logs.

    .venv/bin/python benchmarks/router_replay.py [--events 10000] [--seeds 1] [--rates 0.03 0.1 0.3 0.5]
        [--features 10 100] [--noise 0.2 0.6] [--alphas 0.01 0.05 0.2 1.0] [--river-linucb-features 10]

Logged data: 10 arms chosen uniformly at random, binary features (each on with probability
0.25), and a click with probability ``sigmoid(c + b_a + t_a . x + h_a . u)``: ``x`` the
features the policies see, ``u`` as many hidden ones (``--noise``: the share of the logit's
variance they carry, reward variation no policy can explain), ``c`` set so that the logged
click rate is the ``--rates`` value. Each policy is replayed on the same logs with Li et al.'s
rejection method (WSDM 2011): an event is kept only when the policy picks the logged arm, and
only then does the policy see its reward; its click rate is the mean reward of kept events.

Beside ``LinUCBRouter()``'s defaults, in the same run: the router before its noise-scaled
exploration (bonus ``alpha sqrt(x^T A^-1 x)`` in reward units, fixed floor 0.1) at each
``--alphas`` value, the best of which is the reference, and River's ``EpsilonGreedy(0.1)``,
``ThompsonSampling(proba.Beta())`` and ``LinUCBDisjoint`` (its defaults; ~2-5 ms per
decision, so by default only with 10 features and on the first seed, compared with the
defaults on the same logs). Every policy sees the same vectors: feature names are picked so
that the router's hashing gives each its own slot.

Noise: with ~1,000 kept events per log, a 3% click rate is ~30 clicks, so single figures
move by 15-20% between seeds; compare the per-rate means, and more ``--seeds`` or
``--events`` for firmer ones (run time grows in proportion).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from river import bandit, proba

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learners.ridge import OnlineRidge  # noqa: E402
from learners.router import LinUCBRouter  # noqa: E402

K = 10
ON = 0.25  # probability of each binary feature
OLD_FLOOR = 0.1  # the unscaled scheme's shipped floor


def feature_names(n: int) -> list[str]:
    """Names whose CRC-32 put feature i in slot i + 1 of a router with dim n + 1 (no collisions)."""
    names = []
    for slot in range(n):
        names.append(next(f"f{slot}.{j}" for j in itertools.count() if zlib.crc32(f"f{slot}.{j}=True".encode()) % n == slot))
    return names


def simulate(rng: np.random.Generator, events: int, features: int, rate: float, noise: float):
    """Logged events: contexts (as dicts), the uniformly logged arms, their clicks, and every arm's click probability."""
    seen, hidden = (rng.random((events, features)) < ON for _ in range(2))
    scale = 1.5 / np.sqrt(ON * (1 - ON) * features)  # logit sd ~1.5 across contexts
    logits = (np.sqrt(1 - noise) * scale * (seen - ON) @ rng.normal(size=(features, K))
              + np.sqrt(noise) * scale * (hidden - ON) @ rng.normal(size=(features, K)) + 0.5 * rng.normal(size=K))  # fmt: skip
    low, high = -20.0, 20.0
    for _ in range(50):  # bisect the intercept to the logged click rate
        c = (low + high) / 2
        low, high = (c, high) if (1 / (1 + np.exp(-(logits + c)))).mean() < rate else (low, c)
    p = 1 / (1 + np.exp(-(logits + c)))
    arms = rng.integers(K, size=events)
    clicks = (rng.random(events) < p[np.arange(events), arms]).astype(float)
    names = feature_names(features)
    contexts = [{names[j]: True for j in np.flatnonzero(row)} for row in seen]
    return contexts, arms, clicks, p


class Router:
    """``LinUCBRouter`` with its defaults."""

    def __init__(self, features: int, seed: int):
        self.router = LinUCBRouter([str(a) for a in range(K)], dim=features + 1, seed=seed)

    def vector(self, context):
        return context  # the router featurizes for itself

    def pull(self, context) -> int:
        return int(self.router.decide(context).arm)

    def update(self, arm: int, context, reward: float) -> None:
        self.router.learn_one(str(arm), context, reward)


class UnscaledLinUCB:
    """The router's scheme before noise scaling: greedy on ``w.x + alpha sqrt(x^T A^-1 x)``, fixed floor."""

    def __init__(self, features: int, alpha: float, seed: int):
        self.featurizer = LinUCBRouter(dim=features + 1).featurizer
        self.models = [OnlineRidge(features + 1) for _ in range(K)]
        self.alpha, self.rng = alpha, np.random.default_rng(seed)

    def vector(self, context):
        return self.featurizer.transform(context)

    def pull(self, x) -> int:
        bounds = np.array([m.predict(x) + self.alpha * m.uncertainty(x) for m in self.models])
        if self.rng.random() < OLD_FLOOR:
            return int(self.rng.integers(K))
        greedy = np.flatnonzero(bounds == bounds.max())
        return int(greedy[0] if len(greedy) == 1 else self.rng.choice(greedy))

    def update(self, arm: int, x, reward: float) -> None:
        self.models[arm].learn_one(x, reward)


class River:
    """A River bandit policy; ``contextual`` ones get the features as a dict."""

    def __init__(self, policy, features: int | None = None):
        self.policy = policy
        self.featurizer = None if features is None else LinUCBRouter(dim=features + 1).featurizer

    def vector(self, context):
        return None if self.featurizer is None else dict(enumerate(self.featurizer.transform(context).tolist()))

    def pull(self, x) -> int:
        return self.policy.pull(range(K)) if x is None else self.policy.pull(range(K), context=x)

    def update(self, arm: int, x, reward: float) -> None:
        if x is None:
            self.policy.update(arm, reward)
        else:
            self.policy.update(arm, x, reward)


def replay(policy, contexts, arms, clicks) -> float:
    """Li et al.'s rejection replay: the click rate over the events where the policy picked the logged arm."""
    total = kept = 0.0
    for context, logged, click in zip(contexts, arms, clicks):
        x = policy.vector(context)
        if policy.pull(x) == logged:
            policy.update(int(logged), x, float(click))
            total += click
            kept += 1
    return total / max(kept, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="logged events per setting and seed (~1/10 kept)")
    parser.add_argument("--seeds", type=int, default=1, help="independent logs per setting, averaged")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.03, 0.1, 0.3, 0.5])
    parser.add_argument("--features", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.6],
                        help="hidden share of the logit's variance")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05, 0.2, 1.0])
    parser.add_argument("--river-linucb-features", type=int, nargs="*", default=[10],
                        help="feature counts River's LinUCBDisjoint runs at (slow: first seed only)")
    args = parser.parse_args()

    started = time.perf_counter()
    print(f"Li et al. replay, {K} arms, uniform logging, {args.events:,} events x {args.seeds} seeds per setting; "
          f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")  # fmt: skip
    names = ["defaults"] + [f"a={a:g}" for a in args.alphas] + ["eps-greedy", "thompson", "river-linucb"]
    print(f"{'rate':>5}{'feat':>5}{'noise':>6}{'best arm':>9}" + "".join(f"{n:>13}" for n in names) + f"{'ratio':>7}")
    by_rate: dict[float, list[dict[str, float]]] = {}
    for rate, features, noise in itertools.product(args.rates, args.features, args.noise):
        rates: dict[str, list[float]] = {n: [] for n in names}
        oracle = []
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, features, round(rate * 1000), round(noise * 1000)])
            contexts, arms, clicks, p = simulate(rng, args.events, features, rate, noise)
            oracle.append(p.max(axis=1).mean())
            policies = {"defaults": Router(features, seed),
                        **{f"a={a:g}": UnscaledLinUCB(features, a, seed) for a in args.alphas},
                        "eps-greedy": River(bandit.EpsilonGreedy(0.1, seed=seed)),
                        "thompson": River(bandit.ThompsonSampling(proba.Beta(), seed=seed))}  # fmt: skip
            if features in args.river_linucb_features and seed == 0:
                policies["river-linucb"] = River(bandit.LinUCBDisjoint(seed=seed), features)
            for name, policy in policies.items():
                rates[name].append(replay(policy, contexts, arms, clicks))
        row = {n: float(np.mean(v)) for n, v in rates.items() if v}
        row["defaults, first seed"] = rates["defaults"][0]
        by_rate.setdefault(rate, []).append(row)
        best = max(row[f"a={a:g}"] for a in args.alphas)
        cells = "".join(f"{row[n]:>13.3f}" if n in row else f"{'-':>13}" for n in names)
        print(f"{rate:>5g}{features:>5}{noise:>6g}{np.mean(oracle):>9.3f}{cells}{row['defaults'] / best:>7.2f}", flush=True)

    print("\nper reward rate, averaged over the features and noise settings (reference: the best single alpha there)")
    met = True
    for rate, rows in by_rate.items():
        mean = {n: float(np.mean([r[n] for r in rows])) for n in ["defaults"] + names[1 : 1 + len(args.alphas)]}
        alpha = max(args.alphas, key=lambda a: mean[f"a={a:g}"])
        ratio = mean["defaults"] / mean[f"a={alpha:g}"]
        ok, river = ratio >= 0.95, []
        for name in names[1 + len(args.alphas) :]:  # each on the settings (and seeds) where it ran
            ran = [r for r in rows if name in r]
            if ran:
                mine = "defaults, first seed" if name == "river-linucb" else "defaults"
                theirs, ours = (float(np.mean([r[n] for r in ran])) for n in (name, mine))
                ok &= ours > theirs
                river.append(f"{name} {theirs:.3f} (defaults {ours:.3f})")
        met &= ok
        print(f"rate {rate:g}: defaults {mean['defaults']:.3f}, best fixed alpha {alpha:g} {mean[f'a={alpha:g}']:.3f}, "
              f"ratio {ratio:.2f}; River: {', '.join(river)}; {'meets' if ok else 'MISSES'} >= 0.95 and beats River")  # fmt: skip
    print(f"{'all met' if met else 'NOT all met'}; {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
