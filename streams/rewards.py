"""From feedback to rewards: one number in [0, 1] per channel, by documented rules.

Three channels, because they differ in how much they can be trusted (the loss-weight learner
estimates that online): **explicit** (what the user said: thumbs, rating, edit, report, and
human annotations), **implicit** (what the user did: copy, regenerate, abandon, dwell,
rephrase) and **self_eval** (a model judge's annotation score). A channel with no signal is
``None``, not 0.5: "nobody said anything" is not "neutral". docs/pipeline.md has the table.
"""

from __future__ import annotations

from statistics import fmean

from streams.contract import Annotation, Feedback

# Explicit: the response was good (1) or bad (0) in the user's own words.
_EXPLICIT = {
    "thumbs": lambda f: 1.0 if f.value > 0 else 0.0,
    "rating": lambda f: (f.value - 1.0) / 4.0,
    "edit": lambda f: 0.0,  # the user had to correct it
    "report": lambda f: 0.0,
}

# Implicit: behaviour that hints at quality. Copying is the strongest positive; regenerating
# or abandoning the strongest negatives. Dwell is weak either way: a glance (<2 s) hints the
# answer was skipped, a long read (>=10 s) that it was used.
_IMPLICIT = {
    "copy": lambda f: 1.0,
    "regenerate": lambda f: 0.0,
    "abandon": lambda f: 0.0,
    "rephrase": lambda f: 0.2,
    "dwell": lambda f: 0.3 if f.value < 2 else (0.7 if f.value >= 10 else 0.5),
}


def channel_rewards(feedback: list[Feedback], annotations: list[Annotation]) -> dict[str, float | None]:
    """Mean reward per channel over the signals an interaction received."""
    explicit = [_EXPLICIT[f.kind](f) for f in feedback if f.kind in _EXPLICIT]
    explicit += [a.score for a in annotations if a.source == "human" and a.score is not None]
    implicit = [_IMPLICIT[f.kind](f) for f in feedback if f.kind in _IMPLICIT]
    judged = [a.score for a in annotations if a.source == "model" and a.score is not None]
    return {
        "explicit": fmean(explicit) if explicit else None,
        "implicit": fmean(implicit) if implicit else None,
        "self_eval": fmean(judged) if judged else None,
    }


EXPLICIT_KINDS = frozenset(_EXPLICIT)
