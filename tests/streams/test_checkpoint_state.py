"""A partition's state pickled again and again (long-lived models from kept pickles) restores the same."""

import pickle

from streams.pseudonyms import FileKeyStore, Pseudonymizer
from tests.streams.test_pipeline import CONFIG, Run, signal, tick, turn


def test_a_second_pickle_restores_the_same_pipeline(tmp_path):
    pseudonyms = Pseudonymizer(FileKeyStore(tmp_path / "keys"))
    events = []
    for i in range(30):
        t = turn(i * 10, context={"cohort": "ab"[i % 2], "domain": "code"},
                 prompt=[{"role": "user", "content": f"another question number {i} on code {i * 37}"}])
        events += [t, signal(t, ["thumbs", "copy", "rating"][i % 3], i * 10 + 1, **({"value": 4} if i % 3 == 2 else {}))]
    events.append(tick(5000))
    config = CONFIG.model_copy(update={"batch_size": 8, "explicit_window_s": 100})
    whole = Run(pseudonyms, config).feed(*events)
    half = Run(pseudonyms, config).feed(*events[:40])
    for _ in range(2):  # the first meets the long-lived models, the second keeps their pickles
        pickle.dumps(half.pipeline)
    restored = Run(pseudonyms, config)
    restored.pipeline = pickle.loads(pickle.dumps(half.pipeline))
    restored.offset = half.offset
    restored.feed(*events[40:])
    assert half.pipeline.join.open and half.pipeline.curator.reservoir  # both kinds were pickled twice
    assert [b.records for b in whole.batches] == [b.records for b in half.batches + restored.batches]
    assert whole.examples == half.examples + restored.examples
