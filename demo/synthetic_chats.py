"""Seeded synthetic chats: the pretraining data of feedloop's tiny base model.

Each chat is one user prompt and one assistant answer from a small set of domains.
Every answer exists in two styles, so preference training later has something to move:

- ``concise``:  the answer in one sentence.
- ``detailed``: "Sure!", the same sentence, two bullet points, "Hope this helps!".

The default base model sees both styles equally often (``detailed_share``); simulated
users can then prefer one.
``units`` (unit conversion) is the rare skill: seldom seen in pretraining, so feedback on
it has room to improve the model.
"""

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

GENERAL = "general"
CODE = "code"
MATH = "math"
TRAVEL = "travel"
UNITS = "units"
DOMAINS = (GENERAL, CODE, MATH, TRAVEL, UNITS)
RARE_DOMAIN = UNITS

# How often each domain appears in pretraining; the rare skill stays rare.
DOMAIN_WEIGHTS: Mapping[str, float] = {GENERAL: 0.3, CODE: 0.25, MATH: 0.2, TRAVEL: 0.2, UNITS: 0.05}

CONCISE = "concise"
DETAILED = "detailed"
STYLES = (CONCISE, DETAILED)

DETAILED_OPENING = "Sure! "
DETAILED_CLOSING = "Hope this helps!"


@dataclass(frozen=True)
class Chat:
    domain: str
    style: str
    prompt: str
    answer: str

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat in the role/content form that chat templates take."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class _Topic:
    """One question with its one-sentence answer and two supporting details."""

    prompt: str
    answer: str
    details: tuple[str, str]


ANIMAL_FOOD = {
    "cats": "fish and meat",
    "dogs": "meat and dry food",
    "cows": "grass and hay",
    "rabbits": "grass and carrots",
    "horses": "hay and oats",
    "birds": "seeds and insects",
}
THING_COLOR = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "a tomato": "red",
    "coal": "black",
}
PYTHON_RECIPES = {
    "reverse a list": "xs[::-1]",
    "sort a list": "sorted(xs)",
    "get the length of a list": "len(xs)",
    "join a list of words": "' '.join(words)",
    "read a text file": "open(path).read()",
    "square a number": "x ** 2",
    "make a string upper case": "text.upper()",
}
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
}
BEST_SEASON = {
    "France": "spring",
    "Italy": "autumn",
    "Japan": "spring",
    "Spain": "autumn",
    "Germany": "summer",
    "Egypt": "winter",
    "Canada": "summer",
}
# (from unit, to unit, factor): the rare skill.
CONVERSIONS = (
    ("kilometers", "miles", 0.621),
    ("kilograms", "pounds", 2.205),
    ("meters", "feet", 3.281),
    ("liters", "gallons", 0.264),
)


def _general_topic(rng: random.Random) -> _Topic:
    if rng.random() < 0.5:
        animal = rng.choice(sorted(ANIMAL_FOOD))
        food = ANIMAL_FOOD[animal]
        return _Topic(
            prompt=f"What do {animal} eat?",
            answer=f"{animal.capitalize()} eat {food}.",
            details=(f"Give {animal} fresh water every day.", f"Feed {animal} at regular times."),
        )
    thing = rng.choice(sorted(THING_COLOR))
    color = THING_COLOR[thing]
    return _Topic(
        prompt=f"What color is {thing}?",
        answer=f"{thing.capitalize()} is {color}.",
        details=(f"The color {color} is easy to see.", "Light can change how a color looks."),
    )


def _code_topic(rng: random.Random) -> _Topic:
    task = rng.choice(sorted(PYTHON_RECIPES))
    snippet = PYTHON_RECIPES[task]
    return _Topic(
        prompt=f"How do I {task} in Python?",
        answer=f"To {task} in Python, use {snippet}.",
        details=("It works in any recent Python version.", "Try it in the Python shell first."),
    )


def _math_topic(rng: random.Random) -> _Topic:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    operation, result = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
    return _Topic(
        prompt=f"What is {a} {operation} {b}?",
        answer=f"{a} {operation} {b} is {result}.",
        details=(f"Start with {a}.", f"Take {a} {operation} {b} to get {result}."),
    )


def _travel_topic(rng: random.Random) -> _Topic:
    country = rng.choice(sorted(CAPITALS))
    if rng.random() < 0.5:
        capital = CAPITALS[country]
        return _Topic(
            prompt=f"What is the capital of {country}?",
            answer=f"The capital of {country} is {capital}.",
            details=(f"{capital} is a good place to start a trip.", f"Book hotels in {capital} early."),
        )
    season = BEST_SEASON[country]
    return _Topic(
        prompt=f"When is the best time to visit {country}?",
        answer=f"The best time to visit {country} is {season}.",
        details=(f"The weather in {season} is pleasant.", "Check local holidays before you book."),
    )


def _units_topic(rng: random.Random) -> _Topic:
    source, target, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(1, 50)
    return _Topic(
        prompt=f"Convert {amount} {source} to {target}.",
        answer=f"{amount} {source} is about {amount * factor:.1f} {target}.",
        details=(f"One of the {source} is {factor} {target}.", f"Multiply by {factor} to convert."),
    )


_TOPIC_MAKERS: Mapping[str, Callable[[random.Random], _Topic]] = {
    GENERAL: _general_topic,
    CODE: _code_topic,
    MATH: _math_topic,
    TRAVEL: _travel_topic,
    UNITS: _units_topic,
}


def render_answer(topic_answer: str, details: tuple[str, str], style: str) -> str:
    """Write one answer in the given style."""
    if style == CONCISE:
        return topic_answer
    if style == DETAILED:
        bullets = "\n".join(f"- {detail}" for detail in details)
        return f"{DETAILED_OPENING}{topic_answer}\n{bullets}\n{DETAILED_CLOSING}"
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def answer_style(answer: str) -> str:
    """Which style an answer is written in (for simulated users and evaluation)."""
    return DETAILED if answer.startswith(DETAILED_OPENING.strip()) or "\n- " in answer else CONCISE


def make_chat(domain: str, style: str, rng: random.Random) -> Chat:
    """One chat of the given domain and style, drawn with ``rng``."""
    topic = _TOPIC_MAKERS[domain](rng)
    return Chat(domain, style, topic.prompt, render_answer(topic.answer, topic.details, style))


# How people word a question around it: "Hi! Convert 5 km to miles. Thanks!"
OPENERS = ("Hi! ", "Quick question: ", "Hello. ", "Please answer: ", "One more thing: ", "I wonder: ",
           "Help me out: ", "Question: ")  # fmt: skip
CLOSERS = (" Thanks!", " Thank you.", " Cheers.", " Much appreciated.", " Just curious.", " Asking for a friend.",
           " I need this today.", " No rush.")  # fmt: skip


def phrase(question: str, rng: random.Random) -> str:
    """The question with an opener, a closer, both or neither."""
    return rng.choice(("", *OPENERS)) + question + rng.choice(("", *CLOSERS))


def generate_chats(
    count: int,
    seed: int,
    domain_weights: Mapping[str, float] = DOMAIN_WEIGHTS,
    detailed_share: float = 0.5,
    phrased_share: float = 0.0,
) -> list[Chat]:
    """``count`` chats, ``detailed_share`` of them in the detailed style and ``phrased_share``
    of their prompts worded with an opener or closer (``phrase``) on average; the same
    arguments always give the same list."""
    rng = random.Random(seed)
    domains = list(domain_weights)
    weights = [domain_weights[domain] for domain in domains]
    chats = []
    for _ in range(count):
        domain = rng.choices(domains, weights)[0]
        chat = make_chat(domain, _style(rng, detailed_share), rng)
        # No draw when nothing is phrased: the same seed builds the same default model.
        if phrased_share and rng.random() < phrased_share:
            chat = replace(chat, prompt=phrase(chat.prompt, rng))
        chats.append(chat)
    return chats


def _style(rng: random.Random, detailed_share: float) -> str:
    # An even mix draws as before detailed_share existed, so that the same seed still builds
    # the same default base model (and every test's model) bit for bit.
    if detailed_share == 0.5:
        return rng.choice(STYLES)
    return DETAILED if rng.random() < detailed_share else CONCISE


@dataclass(frozen=True)
class MultipleChoice:
    """A question, its correct answer and wrong answers of the same form (rare-skill suite)."""

    prompt: str
    correct: str
    wrong: tuple[str, ...]


def units_multiple_choice(rng: random.Random) -> MultipleChoice:
    """A unit conversion with three near misses: wrong target unit, wrong amount, wrong factor.

    The base model rarely computes the number right when generating, so the rare skill is
    measured as "the correct answer is more likely than each near miss" (log-likelihood).
    """
    index = rng.randrange(len(CONVERSIONS))
    source, target, factor = CONVERSIONS[index]
    # The near misses borrow from the next conversion: a fixed confusion (km -> pounds, ...).
    _, other_target, other_factor = CONVERSIONS[(index + 1) % len(CONVERSIONS)]
    amount = rng.randint(1, 50)
    other_amount = amount % 50 + rng.randint(1, 9)
    return MultipleChoice(
        prompt=f"Convert {amount} {source} to {target}.",
        correct=f"{amount} {source} is about {amount * factor:.1f} {target}.",
        wrong=(
            f"{amount} {source} is about {amount * factor:.1f} {other_target}.",
            f"{other_amount} {source} is about {amount * factor:.1f} {target}.",
            f"{amount} {source} is about {amount * other_factor:.1f} {target}.",
        ),
    )
