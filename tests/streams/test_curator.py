"""The curator's held-out part: never trained, the same split in every replay."""

import random
from datetime import datetime, timedelta, timezone

from streams.curator import Buffered, Curator, is_heldout
from streams.training_data import LabelRecord, PreferenceRecord, SftRecord

PROMPT = [{"role": "user", "content": "Convert 3 km to miles"}]
T0 = datetime(2026, 11, 21, tzinfo=timezone.utc)


def example_records(i: int, cohort: str) -> list:
    """What an edited, thumbed example yields: an SFT target, a pair and a label, one text shared."""
    common = {"cohort": cohort, "domain": "units", "event_ids": [f"e{i}"]}
    return [
        SftRecord(example_id=f"ex-{i}:edit", source="edit", **common,
                  messages=[*PROMPT, {"role": "assistant", "content": f"About {i} miles."}]),
        PreferenceRecord(example_id=f"ex-{i}:edit-pair", source="edit", prompt=PROMPT, chosen=f"About {i} miles.",
                         rejected="3 miles.", **common),
        LabelRecord(example_id=f"ex-{i}:thumbs", source="thumbs", prompt=PROMPT, completion="3 miles.",
                    desirable=False, **common),
    ]  # fmt: skip


def curator(share: float, seed: int = 0) -> Curator:
    return Curator(partition=0, batch_size=120, max_wait=timedelta(hours=1), max_group_share=1.0,
                   replay_fraction=0.5, reservoir_per_stratum=1000, seed=seed, heldout_share=share)  # fmt: skip


def cut_all(c: Curator, examples: list[list]) -> list:
    batches = []
    for i, records in enumerate(examples):
        c.add([Buffered(r, f"user-{i}", T0 + timedelta(seconds=i)) for r in records])
        while c.due(None):
            batches.append(c.cut("size", T0, lambda user, at: False, {}))
    return batches


EXAMPLES = [example_records(i, ("majority", "minority")[i % 2]) for i in range(400)]


def test_held_out_examples_are_never_trained_nor_replayed_and_held_out_whole():
    batches = cut_all(curator(0.2), EXAMPLES)
    trained = {r.example_id for b in batches for r in b.records}
    heldout = {r.example_id for b in batches for r in b.heldout}
    assert len(batches) == 10 and any(r.replay for b in batches for r in b.records), "the check has power"
    assert heldout and not trained & heldout
    assert all(is_heldout(i, 0.2) for i in heldout) and not any(is_heldout(i, 0.2) for i in trained)
    examples = {i.split(":")[0] for i in heldout}
    assert heldout == {f"{e}:{s}" for e in examples for s in ("edit", "edit-pair", "thumbs")}  # all its records
    # About the share, in each stratum.
    for cohort in ("majority", "minority"):
        held = sum(r.cohort == cohort for b in batches for r in b.heldout if isinstance(r, PreferenceRecord))
        assert 0.12 < held / 200 < 0.28, (cohort, held)


def test_the_split_is_by_example_id_alone_whatever_the_seed_or_order():
    ids = {r.example_id for b in cut_all(curator(0.2), EXAMPLES) for r in b.heldout}
    shuffled = random.Random(3).sample(EXAMPLES, len(EXAMPLES))
    assert {r.example_id for b in cut_all(curator(0.2, seed=7), shuffled) for r in b.heldout} == ids
    assert all(not b.heldout for b in cut_all(curator(0.0), EXAMPLES))  # off by default
    assert is_heldout("ex-1:edit", 0.999) and not is_heldout("ex-1:edit", 0.0)


def test_an_erased_users_held_out_records_are_dropped_too():
    c = curator(0.5)
    c.add([Buffered(r, "gone", T0) for r in EXAMPLES[0] + EXAMPLES[1]])
    batch = c.cut("manual", T0, lambda user, at: user == "gone", {})
    assert batch.records == [] and batch.heldout == [] and batch.erased == 6


def test_the_pipeline_holds_out_its_configured_share_and_publishes_the_part_with_the_batch(sessions, tmp_path):
    from streams.batches import publish_batch
    from streams.config import PipelineSettings
    from streams.pipeline import PartitionPipeline
    from streams.objects import ObjectStore
    from streams.training_data import BatchFolder, read_batch

    assert PartitionPipeline(0, PipelineSettings(heldout_share=0.1)).curator.heldout_share == 0.1
    (batch, *_) = cut_all(curator(0.2), EXAMPLES)
    emitted = publish_batch(batch, objects=ObjectStore(tmp_path.as_uri()), sessions=sessions)
    _, read = read_batch(BatchFolder(ObjectStore(tmp_path.as_uri()), emitted.path))
    written = [r for signal in ("heldout_sft", "heldout_pairs", "heldout_labels") for r in read[signal]]
    assert written and sorted(r.example_id for r in written) == sorted(r.example_id for r in batch.heldout)


def test_a_cut_lists_each_users_pseudonym_with_the_records_of_theirs_it_holds_replayed_and_held_out_too():
    c = curator(0.2)
    for i, records in enumerate(EXAMPLES):
        c.add([Buffered(r, f"user-{i}", T0 + timedelta(seconds=i), f"u_{i % 7:032x}") for r in records])
    batches = []
    while c.due(None):
        batches.append(c.cut("size", T0, lambda user, at: False, {}))
    assert any(r.replay for b in batches for r in b.records) and any(b.heldout for b in batches), "the check has power"
    for b in batches:
        listed = sorted(i for ids in b.users.values() for i in ids)
        assert listed == sorted(r.example_id for r in b.records + b.heldout)
        for user, ids in b.users.items():  # the owner of example ex-i is u_<i % 7>
            assert all(int(i.split(":")[0].removeprefix("ex-")) % 7 == int(user[2:], 16) for i in ids)


def test_a_buffered_record_keeps_its_pseudonym_through_a_checkpoint_and_reads_one_from_before_it():
    import pickle

    from streams.curator import _restore_buffered

    entry = Buffered(EXAMPLES[0][0], "user-0", T0, "u_" + "0" * 32)
    assert pickle.loads(pickle.dumps(entry)) == entry
    assert _restore_buffered(EXAMPLES[0][0], "user-0", T0).pseudonym == ""  # pickled before pseudonyms were kept
