"""Training signals: which records an annotated example yields, by documented rules.

| rule | from | yields |
| --- | --- | --- |
| edit | the user corrected the response | SFT on the corrected text, and a pair: corrected over original |
| review | a reviewer corrected a closed example (:func:`review_records`) | the edit rule's two records |
| regenerate | the user regenerated A and accepted the new response B | a pair: B over A |
| thumbs / rating | explicit verdict | a KTO label: desirable when the explicit reward is >= 0.5 |
| accepted | thumbs up, rating >= 4, or copied without a regenerate | SFT on the response |
| pairwise | the user chose this response over another to the same prompt | a pair: this over the other |

Nothing is yielded for a user who opted out of training or an example a quality filter
stopped. Each record's loss weight is the current weight of the channel its evidence came
from (explicit or implicit). docs/pipeline.md explains the reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streams.contract import AnnotatedExample, Message
from streams.training_data import LabelRecord, PreferenceRecord, SftRecord

TrainingRecord = SftRecord | PreferenceRecord | LabelRecord

ACCEPT_THRESHOLD = 0.75


@dataclass(frozen=True)
class Rival:
    """The response a pairwise choice rejected: another interaction of the same user, session
    and prompt (the pipeline checks that, and finds it open or recently closed)."""

    interaction_id: str
    event_id: str  # its interaction event's
    response: str  # PII scrubbed


def is_accepted(example: AnnotatedExample) -> bool:
    explicit, implicit = example.rewards["explicit"], example.rewards["implicit"]
    if explicit is not None:
        return explicit >= ACCEPT_THRESHOLD
    return "regenerate" not in example.feedback_kinds and implicit is not None and implicit >= ACCEPT_THRESHOLD


def training_records(
    example: AnnotatedExample,
    replaced: AnnotatedExample | None,
    weights: dict[str, float],
    rivals: Sequence[Rival] = (),
) -> list[TrainingRecord]:
    """Records for one example; ``replaced`` is the example it regenerated, if still known;
    ``rivals`` the responses it was chosen over. An example's comments are never in them."""
    if not example.training_consent or example.filtered:
        return []
    common = {"cohort": example.cohort, "domain": example.domain}
    explicit_weight, implicit_weight = weights.get("explicit", 1.0), weights.get("implicit", 1.0)
    answer = Message(role="assistant", content=example.response)
    records: list[TrainingRecord] = []

    if example.edit:
        records += _corrected(example, example.edit, "edit", explicit_weight)

    for rival in rivals:
        records.append(PreferenceRecord(example_id=f"{example.example_id}:pairwise:{rival.interaction_id}",
                                        source="pairwise", weight=explicit_weight,
                                        event_ids=sorted({*example.event_ids, rival.event_id}), prompt=example.prompt,
                                        chosen=example.response, rejected=rival.response, **common))

    verdicts = [k for k in ("thumbs", "rating") if k in example.feedback_kinds]
    if verdicts and example.rewards["explicit"] is not None:
        records.append(LabelRecord(example_id=f"{example.example_id}:{verdicts[0]}", source=verdicts[0],
                                   weight=explicit_weight, event_ids=example.event_ids, prompt=example.prompt,
                                   completion=example.response, desirable=example.rewards["explicit"] >= 0.5,
                                   **common))

    if is_accepted(example) and not example.edit:
        weight = explicit_weight if example.rewards["explicit"] is not None else implicit_weight
        records.append(SftRecord(example_id=f"{example.example_id}:accepted", source="accepted", weight=weight,
                                 event_ids=example.event_ids, messages=[*example.prompt, answer], **common))
        if replaced is not None and "regenerate" in replaced.feedback_kinds:
            records.append(PreferenceRecord(example_id=f"{example.example_id}:regenerate-pair", source="regenerate",
                                            weight=implicit_weight,
                                            event_ids=sorted({*replaced.event_ids, *example.event_ids}),
                                            prompt=replaced.prompt, chosen=example.response,
                                            rejected=replaced.response, **common))
    return records


def review_records(example: AnnotatedExample, correction: str, weights: dict[str, float]) -> list[TrainingRecord]:
    """Records for a reviewer's ``correction`` (scrubbed) of a closed ``example``: the edit
    rule's two, under ``source`` ``review``. The example's own records went out when its
    window closed; these are added to them, never in their place."""
    if not example.training_consent or example.filtered:
        return []
    return _corrected(example, correction, "review", weights.get("explicit", 1.0))


def _corrected(example: AnnotatedExample, text: str, source: str, weight: float) -> list[TrainingRecord]:
    """SFT on the corrected ``text``, and a pair: the correction over the response."""
    common = {"source": source, "weight": weight, "event_ids": example.event_ids,
              "cohort": example.cohort, "domain": example.domain}  # fmt: skip
    corrected = Message(role="assistant", content=text)
    return [SftRecord(example_id=f"{example.example_id}:{source}", messages=[*example.prompt, corrected], **common),
            PreferenceRecord(example_id=f"{example.example_id}:{source}-pair", prompt=example.prompt, chosen=text,
                             rejected=example.response, **common)]
