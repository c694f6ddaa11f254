"""A simulated chat-app population with hidden preferences: the users of the end-to-end demo.

Pure, seeded Python, no I/O. The demo asks it for a stream of turns (who asks what, in which
session, with which routing context), sends each prompt through the chat gateway, hands the
answer back to :meth:`Population.react` and posts the actions it returns as feedback events.
At the end it asks the blind judge (:meth:`Population.prefer`) to compare the live champion
with the static base model on held-out prompts.

The world is the tiny model's (``demo/synthetic_chats.py``): every prompt is a topic of
``general``, ``code``, ``math``, ``travel`` or the rare skill ``units``, and the simulation
knows its answer in both styles (``concise`` and ``detailed``). What users want is hidden
from feedloop and only shows through their feedback:

- **Style.** Every cohort prefers one style. Before the drift point everyone prefers
  ``concise``; after it (``drift_fraction`` of the stream) everyone prefers ``detailed``.
  The base model answers in either style about half the time, and the trainer moves that
  rate by tens of points per batch of edits, pairs and labels favouring one style, so style
  is a preference the loop can learn with this model. Flipping it makes the reward of the
  champion trained on the first half collapse, which the learners' drift detector sees.
- **Correctness of the rare skill.** A ``units`` answer satisfies only if it states the
  right converted value and unit ("31.1 miles"); the style alone is not enough. Edits then
  carry correct conversions, so feedback teaches the rare skill rather than eroding it.
- **Well-formed.** An empty or looping answer satisfies nobody.

Cohorts: ``a`` (55% of users), ``b`` (35%) and a small ``minority`` (10%). Why the minority
shares the majority's style in both phases: one champion serves everyone and is trained on
pooled batches whose preferred style is the majority's vote, so a minority wanting the
opposite style could never get a win-rate near the majority's from any champion; a
per-cohort adapter is a different product. The minority differs where the loop can still
serve it: it gives explicit feedback half as often (its voice is quieter in the batches; the
curator's stratified replay makes up for part of that) and asks about travel and the rare
skill far more often, so its win-rate depends on the champion not forgetting them.

Users react to each answer through the event contract's feedback kinds: explicit feedback
sometimes (thumbs, a 1-5 rating, an edit with the canonical answer in their preferred style,
rarely a report), implicit signals often (copy and long dwell when satisfied; regenerate,
abandon, rephrase and short dwell when not). Explicit and implicit verdicts each flip with a
small probability (``explicit_noise``, ``implicit_noise``), so the channels are noisy to
different degrees, as the loss-weight learner assumes. A regenerate asks the demo for the
same prompt again: :meth:`Population.regenerate` builds that turn, with ``regenerates``.

A share of prompts (``pii_share``) carries one seeded piece of personal data of the types
the PII scrubber handles; :attr:`Population.canaries_seeded` lists every such string, so
the demo can check that none reaches a batch file. Held-out prompts come from a part of the
prompt space the training stream never draws from (a keyed hash of the normalized prompt
decides), so the judge never sees a prompt the model was trained on.

>>> population = Population(PopulationConfig(seed=7, interactions=100))
>>> turn = next(population.turns())
>>> turn.index, turn.phase, sorted(turn.context)
(0, 0, ['cohort', 'domain'])
>>> population.preferred_style(turn.cohort, 0), population.preferred_style(turn.cohort, 1)
('concise', 'detailed')
>>> liked = turn.prompt.answer("concise")
>>> population.satisfies(turn.cohort, turn.phase, turn.prompt, liked)
True
>>> {a.kind for a in population.react(turn, liked)} <= {"thumbs", "rating", "copy", "dwell"}
True
>>> population.prefer(turn.cohort, 0, liked, turn.prompt.answer("detailed"), prompt=turn.prompt)
0.99
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, model_validator

from demo.synthetic_chats import (
    CODE,
    CONCISE,
    DETAILED,
    DOMAINS,
    GENERAL,
    MATH,
    STYLES,
    TRAVEL,
    UNITS,
    answer_style,
    make_chat,
    phrase,
)

MINORITY = "minority"
BEFORE_DRIFT, AFTER_DRIFT = 0, 1

# PII types as streams.pii.PiiType names them; one canary template each.
CANARY_TYPES = ("EMAIL", "PHONE", "CARD", "IBAN", "IP", "URL_SECRET", "SECRET", "PERSON")
FIRST_NAMES = ("Ingrid", "Tobias", "Amara", "Kenji", "Lucia", "Mateo", "Zofia", "Rahel", "Emeka", "Saanvi",
               "Hannes", "Ximena")  # fmt: skip
LAST_NAMES = ("Larsen", "Okafor", "Brandauer", "Nakashima", "Ferreira", "Kowalczyk", "Haddadi", "Lindqvist",
              "Moreau", "Castellano", "Yamamoto", "Eriksen")  # fmt: skip
# RFC 5737 documentation networks: real-looking addresses that belong to no one.
DOCUMENTATION_NETWORKS = ("192.0.2", "198.51.100", "203.0.113")

_WORD = re.compile(r"\w+")
_UNITS_FACT = re.compile(r"is about (\S+ \w+)\.$")


def _default_domain_weights() -> dict[str, dict[str, float]]:
    majority = {GENERAL: 0.30, CODE: 0.25, MATH: 0.20, TRAVEL: 0.22, UNITS: 0.03}
    # Overall the rare skill is ~4% of prompts: 0.9 * 3% + 0.1 * 12%.
    minority = {GENERAL: 0.25, CODE: 0.15, MATH: 0.15, TRAVEL: 0.33, UNITS: 0.12}
    return {"a": majority, "b": dict(majority), MINORITY: minority}


class PopulationConfig(BaseModel):
    """Who the users are and what they want; every default is the demo's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="Seeds every random choice: the same seed gives the same stream.")
    interactions: int = Field(4000, ge=1, description="Turns in the stream (regenerations come on top).")
    drift_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of the stream after which preferences shift; 1 means never."
    )
    users: int = Field(300, ge=1, description="Distinct users; cohorts are assigned to exact shares of them.")
    cohort_shares: dict[str, float] = Field(
        default_factory=lambda: {"a": 0.55, "b": 0.35, MINORITY: 0.10}, description="Share of users per cohort."
    )
    minority_cohort: str = Field(MINORITY, description="The small cohort whose win-rate is watched.")
    preferred_styles: dict[str, tuple[str, str]] = Field(
        default_factory=lambda: {c: (CONCISE, DETAILED) for c in ("a", "b", MINORITY)},
        description="Per cohort: the style it prefers before and after the drift point.",
    )
    domain_weights: dict[str, dict[str, float]] = Field(
        default_factory=_default_domain_weights, description="Per cohort: how often it asks about each domain."
    )
    explicit_rate: dict[str, float] = Field(
        default_factory=lambda: {"a": 0.4, "b": 0.4, MINORITY: 0.2},
        description="Per cohort: chance that a turn gets explicit feedback (thumbs, rating, edit, report).",
    )
    explicit_noise: float = Field(0.05, ge=0, le=0.5, description="Chance an explicit verdict contradicts the truth.")
    implicit_noise: float = Field(0.15, ge=0, le=0.5, description="Chance implicit signals contradict the truth.")
    judge_noise: float = Field(
        0.02, ge=0, le=1, description="Chance the judge picks at random (so a clear preference is 1 - noise/2)."
    )
    grader_rate: float = Field(
        0.3, ge=0, le=1, description="Share of turns the simulated self-evaluation judge grades (a 'model' annotation)."
    )
    grader_style: str = Field(
        DETAILED, description="The style the simulated judge favours whatever the users want: its bias."
    )
    grader_noise: float = Field(0.2, ge=0, le=1, description="Chance the simulated judge's grade is a coin flip.")
    pii_share: float = Field(0.05, ge=0, le=1, description="Share of turns whose prompt carries a PII canary.")
    heldout_share: float = Field(
        0.1, gt=0, le=0.5, description="Share of the prompt space reserved for held-out prompts, never trained on."
    )
    phrasing_share: float = Field(0.75, ge=0, le=1, description="Share of prompts worded with an opener or closer.")
    new_session_rate: float = Field(0.2, ge=0, le=1, description="Chance a user's turn starts a new session.")
    max_regenerations: int = Field(2, ge=0, description="Regenerations per turn before a user gives up (abandons).")

    @model_validator(mode="after")
    def _every_cohort_is_described(self) -> PopulationConfig:
        cohorts = set(self.cohort_shares)
        for name in ("preferred_styles", "domain_weights", "explicit_rate"):
            if set(getattr(self, name)) != cohorts:
                raise ValueError(f"{name} must describe exactly the cohorts {sorted(cohorts)}")
        if self.minority_cohort not in cohorts:
            raise ValueError(f"minority_cohort {self.minority_cohort!r} is not a cohort")
        if self.grader_style not in STYLES or any(s not in STYLES for pair in self.preferred_styles.values() for s in pair):
            raise ValueError(f"preferred and grader styles must be among {STYLES}")
        if any(d not in DOMAINS for weights in self.domain_weights.values() for d in weights):
            raise ValueError(f"domains must be among {DOMAINS}")
        return self


@dataclass(frozen=True)
class Prompt:
    """A question as a user words it, with the answers the simulation knows for it."""

    domain: str
    text: str
    concise: str
    detailed: str

    def answer(self, style: str) -> str:
        """The canonical answer in ``style``: what a user writes when they edit."""
        return {CONCISE: self.concise, DETAILED: self.detailed}[style]

    @property
    def fact(self) -> str | None:
        """For the rare skill, the converted value and unit a correct answer states."""
        if self.domain != UNITS:
            return None
        match = _UNITS_FACT.search(self.concise)
        assert match, self.concise  # synthetic_chats writes every conversion this way
        return match.group(1)


@dataclass(frozen=True)
class Canary:
    """One seeded piece of personal data: its PII type, the value, and the sentence around it."""

    pii_type: str
    value: str
    sentence: str


@dataclass(frozen=True)
class Turn:
    """One request of the stream. ``index`` is its position; a regeneration keeps it."""

    index: int
    attempt: int
    user_id: str
    session_id: str
    cohort: str
    phase: int
    prompt: Prompt
    canary: Canary | None = None
    regenerates: str | None = None

    @property
    def text(self) -> str:
        """What the user sends: the question, and the personal data they pasted, if any."""
        return f"{self.prompt.text} {self.canary.sentence}" if self.canary else self.prompt.text

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]

    @property
    def context(self) -> dict[str, str]:
        """The request's routing features."""
        return {"domain": self.prompt.domain, "cohort": self.cohort}

    @property
    def feedloop(self) -> dict[str, object]:
        """The chat request's ``feedloop`` object (the OpenAI client's ``extra_body={"feedloop": ...}``)."""
        extras: dict[str, object] = {"session_id": self.session_id, "user_id": self.user_id, "context": self.context}
        return {**extras, "regenerates": self.regenerates} if self.regenerates else extras


@dataclass(frozen=True)
class Action:
    """What a user did about an answer; maps 1:1 onto a ``streams.contract.Feedback``."""

    kind: str
    value: float | None = None
    text: str | None = None

    @property
    def fields(self) -> dict[str, object]:
        """``kind`` plus ``value`` or ``text`` where the kind has one: ``client.feedback(turn, **fields)``."""
        return {"kind": self.kind, **{k: v for k, v in (("value", self.value), ("text", self.text)) if v is not None}}


def normalized(text: str) -> str:
    """A prompt as the pipeline compares prompts: lower-case words only."""
    return " ".join(_WORD.findall(text.lower()))


def is_well_formed(answer: str) -> bool:
    """Not empty and not looping (no word trigram three times), as the trainer's gate judges."""
    words = answer.split()
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return bool(words) and (not trigrams or max(trigrams.values()) < 3)


def _form_and_fact(prompt: Prompt, answer: str) -> tuple[bool, bool]:
    """(well formed, states the prompt's fact): what every grader checks before style."""
    fact = prompt.fact
    # The value must stand alone: "3.1 miles" is not stated by "13.1 miles".
    return is_well_formed(answer), fact is None or re.search(rf"(?<![\d.]){re.escape(fact)}\b", answer) is not None


def style_profile(answers: Iterable[str]) -> dict[str, float]:
    """Share of each style among answers: an arm's profile, measured on held-out prompts.

    >>> style_profile(["Cats eat fish.", "Sure! Cats eat fish.\\n- a\\n- b\\nHope this helps!"])
    {'concise': 0.5, 'detailed': 0.5}
    """
    counts = Counter(answer_style(a) for a in answers)
    total = sum(counts.values())
    if not total:
        raise ValueError("no answers to profile")
    return {style: counts[style] / total for style in STYLES}


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check (card numbers)."""
    total = 0
    for position, char in enumerate(reversed(payload)):
        digit = int(char)
        if position % 2 == 0:  # doubled: it is odd-positioned once the check digit is appended
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return str(-total % 10)


def german_iban(account: str) -> str:
    """A valid German IBAN (mod-97 check digits) for an 18-digit bank code + account, in groups of 4."""
    numeric = account + "131400"  # "DE00" moved to the end, letters as numbers (D=13, E=14)
    compact = f"DE{98 - int(numeric) % 97:02d}{account}"
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def _digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(count))


def make_canary(pii_type: str, serial: int, rng: random.Random) -> Canary:
    """A canary of one PII type; ``serial`` keeps emails, URLs and keys unique in a stream."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    if pii_type == "EMAIL":
        value = f"{first.lower()}.{last.lower()}{serial}@example.com"
        return Canary(pii_type, value, f"Please reply to {value}.")
    if pii_type == "PHONE":
        value = f"+44 20 7946 {_digits(rng, 4)}"
        return Canary(pii_type, value, f"You can call me on {value}.")
    if pii_type == "CARD":
        payload = "4" + _digits(rng, 14)
        number = payload + luhn_check_digit(payload)
        value = " ".join(number[i : i + 4] for i in range(0, 16, 4))
        return Canary(pii_type, value, f"Is my card {value} still valid?")
    if pii_type == "IBAN":
        value = german_iban(_digits(rng, 18))
        return Canary(pii_type, value, f"Send the refund to {value}, please.")
    if pii_type == "IP":
        value = f"{rng.choice(DOCUMENTATION_NETWORKS)}.{rng.randint(1, 254)}"
        return Canary(pii_type, value, f"My server at {value} keeps timing out.")
    if pii_type == "URL_SECRET":
        password = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
        value = f"https://{first.lower()}:{password}@files.example.com/export/{serial}.csv"
        return Canary(pii_type, value, f"Download {value} for me.")
    if pii_type == "SECRET":
        key = [rng.choice(string.ascii_letters + string.digits) for _ in range(31)]
        key.insert(rng.randrange(32), rng.choice(string.digits))  # provider keys always hold a digit
        value = f"sk-proj-{''.join(key)}"
        return Canary(pii_type, value, f"Why does my key {value} fail?")
    if pii_type == "PERSON":
        value = f"{first} {last}"
        return Canary(pii_type, value, f"My name is {value}.")
    raise ValueError(f"unknown PII type {pii_type!r}; expected one of {CANARY_TYPES}")


class Population:
    """The users, their turns, their reactions, and their judgement as a blind pairwise judge."""

    def __init__(self, config: PopulationConfig | None = None) -> None:
        self.config = config or PopulationConfig()
        rng = random.Random(f"{self.config.seed}:users")
        cohorts = self._exact_shares(self.config.users)
        rng.shuffle(cohorts)
        self.user_cohorts: dict[str, str] = {f"user-{i:04d}": c for i, c in enumerate(cohorts)}  # user id -> cohort

    def _exact_shares(self, count: int) -> list[str]:
        """``count`` cohort labels in the configured shares, rounded by largest remainders."""
        shares = self.config.cohort_shares
        total = sum(shares.values())
        quotas = {c: count * s / total for c, s in shares.items()}
        sizes = {c: int(q) for c, q in quotas.items()}
        by_remainder = sorted(shares, key=lambda c: quotas[c] - sizes[c], reverse=True)
        for cohort in by_remainder[: count - sum(sizes.values())]:
            sizes[cohort] += 1
        return [c for c in shares for _ in range(sizes[c])]

    # --- the hidden preferences ----------------------------------------------------------

    @property
    def shift_index(self) -> int:
        """Index of the first turn after the preference shift."""
        return round(self.config.interactions * self.config.drift_fraction)

    def phase_of(self, index: int) -> int:
        return BEFORE_DRIFT if index < self.shift_index else AFTER_DRIFT

    def cohort_of(self, user_or_cohort: str) -> str:
        if user_or_cohort in self.user_cohorts:
            return self.user_cohorts[user_or_cohort]
        if user_or_cohort in self.config.cohort_shares:
            return user_or_cohort
        raise ValueError(f"{user_or_cohort!r} is neither a user nor a cohort")

    def preferred_style(self, user_or_cohort: str, phase: int) -> str:
        return self.config.preferred_styles[self.cohort_of(user_or_cohort)][phase]

    def _criteria(self, cohort: str, phase: int, prompt: Prompt, answer: str) -> tuple[bool, bool, bool]:
        """(well formed, correct, preferred style), most important first."""
        return *_form_and_fact(prompt, answer), answer_style(answer) == self.preferred_style(cohort, phase)

    def satisfies(self, user_or_cohort: str, phase: int, prompt: Prompt, answer: str) -> bool:
        """Whether the answer meets every hidden preference of the user (or cohort) in ``phase``."""
        return all(self._criteria(self.cohort_of(user_or_cohort), phase, prompt, answer.strip()))

    def expected_reward(self, cohort: str, phase: int, style: str) -> float:
        """Chance that a well-formed, correct answer in ``style`` satisfies ``cohort`` in ``phase``.

        Rewards the learners see are noisy but affine in it, so regret ratios computed with it
        are the ones the observed rewards would give. The rare skill's correctness is left out:
        at ~4% of traffic it shifts every arm alike."""
        return 1.0 if style == self.preferred_style(cohort, phase) else 0.0

    def profile_reward(self, cohort: str, phase: int, profile: Mapping[str, float]) -> float:
        """Expected reward of an arm that answers in each style with the shares of ``profile``."""
        return sum(share * self.expected_reward(cohort, phase, style) for style, share in profile.items())

    # --- the stream ------------------------------------------------------------------------

    def _reserved(self, text: str) -> bool:
        """Whether a prompt belongs to the held-out part of the prompt space (keyed hash)."""
        digest = hashlib.blake2b(normalized(text).encode(), key=b"feedloop-heldout", digest_size=8).digest()
        return int.from_bytes(digest) % 10_000 < self.config.heldout_share * 10_000

    def _draw_prompt(self, rng: random.Random, cohort: str, heldout: bool) -> Prompt:
        weights = self.config.domain_weights[cohort]
        domain = rng.choices(list(weights), list(weights.values()))[0]
        for _ in range(10_000):
            topic_seed = rng.getrandbits(64)
            concise, detailed = (make_chat(domain, s, random.Random(topic_seed)) for s in (CONCISE, DETAILED))
            text = concise.prompt
            # Users word a question differently, as real users do: the pipeline trains on a prompt
            # only once across sessions, and outside math there are few distinct questions.
            if rng.random() < self.config.phrasing_share:
                text = phrase(text, rng)
            if self._reserved(text) == heldout:
                return Prompt(domain, text, concise.answer, detailed.answer)
        raise ValueError(f"no {'held-out' if heldout else 'training'} prompt found in {domain!r}; "
                         "raise phrasing_share or change heldout_share")  # fmt: skip

    def turns(self) -> Iterator[Turn]:
        """The stream: ``config.interactions`` turns, the same ones for the same seed."""
        rng = random.Random(f"{self.config.seed}:stream")
        users = list(self.user_cohorts)
        sessions: Counter = Counter()  # the user's current session number
        canaries = 0
        for index in range(self.config.interactions):
            user = rng.choice(users)
            if user not in sessions or rng.random() < self.config.new_session_rate:
                sessions[user] += 1
            cohort = self.user_cohorts[user]
            prompt = self._draw_prompt(rng, cohort, heldout=False)
            canary = None
            if rng.random() < self.config.pii_share:
                canary = make_canary(CANARY_TYPES[canaries % len(CANARY_TYPES)], canaries, rng)
                canaries += 1
            yield Turn(index, 0, user, f"{user}-s{sessions[user]}", cohort, self.phase_of(index), prompt, canary)

    def regenerate(self, turn: Turn, interaction_id: str) -> Turn:
        """The request a user sends after pressing regenerate on ``interaction_id`` (``turn``)."""
        if turn.attempt >= self.config.max_regenerations:
            raise ValueError(f"turn {turn.index} was regenerated {turn.attempt} times already")
        return Turn(turn.index, turn.attempt + 1, turn.user_id, turn.session_id, turn.cohort, turn.phase,
                    turn.prompt, turn.canary, regenerates=interaction_id)  # fmt: skip

    @cached_property
    def canaries_seeded(self) -> list[str]:
        """Every PII value the stream's prompts carry, in order, each once."""
        return list(dict.fromkeys(t.canary.value for t in self.turns() if t.canary))

    # --- behaviour -------------------------------------------------------------------------

    def react(self, turn: Turn, answer: str) -> list[Action]:
        """What the user does about ``answer``: explicit feedback sometimes, implicit signals often.

        Seeded per turn and attempt, so the reactions do not depend on the order of calls."""
        config = self.config
        rng = random.Random(f"{config.seed}:react:{turn.index}:{turn.attempt}")
        satisfied = self.satisfies(turn.cohort, turn.phase, turn.prompt, answer)
        actions = []
        if rng.random() < config.explicit_rate[turn.cohort]:
            pleased = satisfied != (rng.random() < config.explicit_noise)
            actions.append(self._explicit(rng, turn, pleased))
        pleased = satisfied != (rng.random() < config.implicit_noise)
        actions += self._implicit(rng, turn, pleased)
        return actions

    def _explicit(self, rng: random.Random, turn: Turn, pleased: bool) -> Action:
        if pleased:
            return Action("thumbs", value=1) if rng.random() < 0.6 else Action("rating", value=rng.choice((4, 5)))
        draw = rng.random()
        if draw < 0.35:
            return Action("thumbs", value=-1)
        if draw < 0.5:
            return Action("rating", value=rng.choice((1, 2)))
        if draw < 0.95:
            # An edit is the answer the user wanted: right facts, their preferred style.
            return Action("edit", text=turn.prompt.answer(self.preferred_style(turn.cohort, turn.phase)))
        return Action("report", text="not what I asked for")

    def _implicit(self, rng: random.Random, turn: Turn, pleased: bool) -> list[Action]:
        if pleased:
            actions = [Action("copy")] if rng.random() < 0.5 else []
            if rng.random() < 0.6:
                actions.append(Action("dwell", value=round(rng.uniform(10, 90), 1)))
            return actions
        actions = [Action("dwell", value=round(rng.uniform(0.5, 4), 1))] if rng.random() < 0.5 else []
        draw = rng.random()
        if draw < 0.45:
            can_retry = turn.attempt < self.config.max_regenerations
            actions.append(Action("regenerate") if can_retry else Action("abandon"))
        elif draw < 0.65:
            actions.append(Action("abandon"))
        elif draw < 0.85:
            actions.append(Action("rephrase", text=f"Let me rephrase: {turn.text}"))
        return actions

    def grade(self, turn: Turn, answer: str) -> float | None:
        """The simulated self-evaluation judge's score of ``answer`` (1 good, 0 bad), or None
        when it does not grade this turn (``grader_rate``).

        A noisy, biased grader, never the users' hidden preferences: it checks form and facts as
        they do, but wants ``grader_style`` whoever asks and whenever, and flips a coin
        ``grader_noise`` of the time. So the loss weights have something to learn: with the
        demo's defaults it disagrees with the users until their preferences shift to its style,
        and agrees after. Seeded per turn and attempt, like :meth:`react`."""
        config = self.config
        rng = random.Random(f"{config.seed}:grade:{turn.index}:{turn.attempt}")
        if rng.random() >= config.grader_rate:
            return None
        if rng.random() < config.grader_noise:
            return float(rng.random() < 0.5)
        answer = answer.strip()
        return float(all(_form_and_fact(turn.prompt, answer)) and answer_style(answer) == config.grader_style)

    # --- the judge -------------------------------------------------------------------------

    def heldout_prompts(self, n: int, cohort: str | None = None) -> list[Prompt]:
        """``n`` prompts the training stream never draws, in ``cohort``'s domain mix (None: all
        cohorts by their user shares). The same arguments always give the same prompts."""
        rng = random.Random(f"{self.config.seed}:heldout:{cohort}")
        shares = self.config.cohort_shares
        prompts = []
        for _ in range(n):
            asker = cohort if cohort is not None else rng.choices(list(shares), list(shares.values()))[0]
            prompts.append(self._draw_prompt(rng, asker, heldout=True))
        return prompts

    def prefer(self, user_or_cohort: str, phase: int, text_a: str, text_b: str, *, prompt: Prompt) -> float:
        """Probability that the user (or a member of the cohort) prefers ``text_a`` to ``text_b``.

        Blind: only the texts count. The answer meeting the more important hidden preference
        wins (well formed, then correct, then style) with ``1 - judge_noise / 2``; equal
        answers are a tie, 0.5. Deterministic. Against a base model that answers in either
        style half the time, ties cap a perfect champion's win-rate near 0.745 (docs/demo.md)."""
        cohort = self.cohort_of(user_or_cohort)
        a = self._criteria(cohort, phase, prompt, text_a.strip())
        b = self._criteria(cohort, phase, prompt, text_b.strip())
        if a == b:
            return 0.5
        clear = 1 - self.config.judge_noise / 2
        return clear if a > b else 1 - clear
