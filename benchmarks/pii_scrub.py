"""PII scrubber throughput beside the scrubber of a baseline commit, in one process.

    .venv/bin/python benchmarks/pii_scrub.py [--baseline REV] [--texts 20000] [--rounds 5] [--pii-share 0.1]

The baseline is ``streams/pii.py`` as it was at ``--baseline`` (default: the commit this
branch started from, before the address/SSN/date-of-birth/passport/handle detectors), read
with ``git show``, written to a temporary file and imported under another module name, so
both scrubbers run in this process on the same texts. Rounds alternate old and new, so a
burst of other work on the machine falls on both; each figure is the median over rounds.

Text mixes (all texts are scrubbed through ``Scrubber().scrub``):

- ``population``: prompts of the demo's simulated users (``demo.population``, 5% carry a PII
  canary): short, mostly clean chat;
- ``pipeline``: the texts that the pipeline benchmark's events carry (benchmarks/
  pipeline_throughput.py: prompts "question N about topic M please", answers "answer N", one
  in ten with a phone number), where the scrubber's cost counts against the replay target;
- ``corpus``: the committed corpus, ``--pii-share`` PII sentences (tests/streams/pii_corpus/
  pii.jsonl and the canaries), the rest ordinary sentences chosen to be near-misses
  (ordinary.jsonl and the canaries' near-misses): numbers, dates, code, capitalised names
  of places and products;
- ``ordinary``: the near-miss sentences alone.

It also prints both scrubbers' recall per class and false positives on the corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo.population import Population, PopulationConfig  # noqa: E402
from pipeline_throughput import make_events  # noqa: E402
from streams import pii  # noqa: E402
from tests.streams.pii_canaries import CANARIES, NEAR_MISSES  # noqa: E402

# The commit this work started from: merge-base of the PII branch and main at the time.
DEFAULT_BASELINE = "7f2df01a5c1bd3aa60a651c96efa24994a675d36"
CORPUS = ROOT / "tests" / "streams" / "pii_corpus"


def load_baseline(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:streams/pii.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_pii_baseline.py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("pii_baseline", handle.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pii_baseline"] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def read_jsonl(name: str) -> list[dict]:
    with open(CORPUS / name, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def mixes(texts: int, pii_share: float) -> dict[str, list[str]]:
    rng = random.Random(0)
    ordinary = [row["text"] for row in read_jsonl("ordinary.jsonl")] + NEAR_MISSES
    with_pii = [row["text"] for row in read_jsonl("pii.jsonl")] + [canary.text for canary in CANARIES]
    population = Population(PopulationConfig(seed=0, interactions=texts, pii_share=0.05))
    pipeline = []
    for event in make_events(texts):
        pipeline += [message["content"] for message in event.get("prompt", [])]
        pipeline += [event[field] for field in ("response", "edit") if event.get(field)]
    return {
        "population": [turn.text for turn in population.turns()][:texts],
        "pipeline": pipeline[:texts],
        "corpus": [rng.choice(with_pii) if rng.random() < pii_share else rng.choice(ordinary) for _ in range(texts)],
        "ordinary": [rng.choice(ordinary) for _ in range(texts)],
    }


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def rate(scrubber, texts: list[str]) -> tuple[float, float]:
    """Texts per second of wall time and per second of this process's CPU time."""
    scrub = scrubber.scrub
    wall, cpu = time.perf_counter(), time.process_time()
    for text in texts:
        scrub(text)
    return len(texts) / (time.perf_counter() - wall), len(texts) / (time.process_time() - cpu)


def quality(module: ModuleType) -> tuple[dict[str, tuple[int, int]], int]:
    """Per class (removed, total) on pii.jsonl, and how many ordinary sentences changed."""
    scrubber = module.Scrubber()
    totals: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    for row in read_jsonl("pii.jsonl"):
        values = [row["pii"]] if isinstance(row["pii"], str) else row["pii"]
        out = scrubber.scrub(row["text"]).text
        totals[row["type"]] += 1
        removed[row["type"]] += all(value not in out for value in values) and f"<{row['type']}>" in out
    changed = sum(scrubber.scrub(row["text"]).text != row["text"] for row in read_jsonl("ordinary.jsonl"))
    return {kind: (removed[kind], totals[kind]) for kind in totals}, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old scrubber")
    parser.add_argument("--texts", type=int, default=20000, help="texts per mix and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pii-share", type=float, default=0.1, help="share of PII sentences in the corpus mix")
    args = parser.parse_args()

    old = load_baseline(args.baseline)
    scrubbers = {"old": old.Scrubber(), "new": pii.Scrubber()}
    texts = mixes(args.texts, args.pii_share)
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus; "
          f"baseline {args.baseline[:12]}; load average before: {load()}")  # fmt: skip

    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for mix, batch in texts.items():
            for name, scrubber in scrubbers.items():
                rates.setdefault((mix, name), []).append(rate(scrubber, batch))
    # Per CPU-second is the steadier figure on a shared machine: time the process waits for a
    # core is not counted. Wall-clock rates are printed beside it.
    print(f"\n{'mix':<11} {'chars':>5}  {'old /cpu-s':>10} {'new /cpu-s':>10} {'ratio':>5}"
          f"  {'old /s':>8} {'new /s':>8} {'ratio':>5}  (medians of {args.rounds} alternating rounds;"
          " range of per-round CPU ratios)")  # fmt: skip
    for mix, batch in texts.items():
        old_wall, old_cpu = (statistics.median(r[i] for r in rates[(mix, "old")]) for i in (0, 1))
        new_wall, new_cpu = (statistics.median(r[i] for r in rates[(mix, "new")]) for i in (0, 1))
        chars = sum(map(len, batch)) / len(batch)
        ratios = sorted(n[1] / o[1] for o, n in zip(rates[(mix, "old")], rates[(mix, "new")], strict=True))
        print(f"{mix:<11} {chars:>5.0f}  {old_cpu:>10,.0f} {new_cpu:>10,.0f} {new_cpu / old_cpu:>5.2f}"
              f"  {old_wall:>8,.0f} {new_wall:>8,.0f} {new_wall / old_wall:>5.2f}"
              f"  ({ratios[0]:.2f}-{ratios[-1]:.2f})")  # fmt: skip
    print(f"load average after: {load()}")

    (old_recall, old_changed), (new_recall, new_changed) = quality(old), quality(pii)
    print(f"\n{'class':<14} {'old':>8} {'new':>8}   (PII sentences whose values are gone, class placeholder in)")
    for kind in new_recall:
        (o, total), (n, _) = old_recall[kind], new_recall[kind]
        print(f"{kind:<14} {o:>3}/{total:<4} {n:>3}/{total:<4}")
    o_all = sum(o for o, _ in old_recall.values())
    n_all = sum(n for n, _ in new_recall.values())
    total = sum(t for _, t in new_recall.values())
    print(f"{'all':<14} {o_all:>3}/{total:<4} {n_all:>3}/{total:<4}")
    print(f"ordinary sentences changed: old {old_changed}, new {new_changed} of {len(read_jsonl('ordinary.jsonl'))}")


if __name__ == "__main__":
    main()
