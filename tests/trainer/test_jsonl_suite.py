"""A gate suite of the operator's own items, read from a JSONL file named in the config."""

import json
import random

import pytest

from demo.synthetic_chats import units_multiple_choice
from tests.trainer import batches
from streams.objects import ObjectStore
from trainer.config import SuiteSpec, TrainerConfig, StageConfig
from trainer.gate import load_suites
from trainer.jsonl_suite import jsonl_suite
from trainer.recipe import train_batch

COMPONENT = "trainer.jsonl_suite:jsonl_suite"


def write_items(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def units_items(count: int, seed: int = 4_242) -> list[dict]:
    """The rare skill as an operator would write it down: a question, its answer, near misses."""
    rng = random.Random(seed)
    return [{"prompt": m.prompt, "reference": m.correct, "rejected": list(m.wrong)}
            for m in (units_multiple_choice(rng) for _ in range(count))]  # fmt: skip


def test_the_suite_is_the_files_items_its_version_the_files_hash(tmp_path):
    items = [{"prompt": "Convert 3 km to miles", "reference": "About 1.86 miles.", "rejected": "3 miles."},
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 plus 2?"}],
              "chosen": "4.", "rejected": ["5.", "22."]}]  # fmt: skip
    (suite,) = load_suites([SuiteSpec(component=COMPONENT, options={"path": write_items(tmp_path / "units.jsonl", items)})])
    assert (suite.name, suite.protected, suite.tolerance) == ("units", True, 0.02)
    assert suite.prompts == ("Convert 3 km to miles", "2 plus 2?")  # kept out of rehearsal
    assert [item.rejected for item in suite.items] == [["3 miles."], ["5.", "22."]]
    (same,) = jsonl_suite(path=tmp_path / "units.jsonl", name="skill", tolerance=0.1)
    assert same.version == suite.version and (same.name, same.tolerance) == ("skill", 0.1)
    items[0]["reference"] = "About 1.9 miles."
    (changed,) = jsonl_suite(path=write_items(tmp_path / "units.jsonl", items))
    assert changed.version != suite.version
    (objective,) = load_suites([SuiteSpec(component=COMPONENT, options={"path": str(tmp_path / "units.jsonl")},
                                          protected=False)])  # fmt: skip
    assert not objective.protected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"missing\.jsonl: No such file.*point the suite's path at a JSONL file"),
        ('{"prompt": "q", "reference": "a"}\n{"prompt": "q"\n', r"bad\.jsonl:2: not an item.*each line is"),
        ('{"prompt": "q", "answer": "a"}\n', r"bad\.jsonl:1: not an item"),
        ("\n\n", r"holds no items"),
        ('{"prompt": "q", "reference": "a"}\n{"prompt": "q", "reference": "a", "rejected": "b"}\n', "mixes items"),
    ],
)
def test_a_missing_or_malformed_file_says_what_to_fix(tmp_path, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        jsonl_suite(path=str(path))
    with pytest.raises(ValueError, match="tolerance"):
        jsonl_suite(path=str(path), tolerance=-1)


def test_a_candidate_worse_than_the_base_model_on_a_protected_jsonl_suite_is_rejected(trained_base, sessions, tmp_path):
    items = write_items(tmp_path / "unit_conversions.jsonl", units_items(60))
    suites = load_suites([SuiteSpec(component=COMPONENT, options={"path": items}, protected=True)])
    batch = batches.write(tmp_path, "batch-forget", batches.wrong_units_records(seed=2, count=64))
    # The batch teaches the rare skill wrong, without rehearsal's correct conversions to soften it.
    config = TrainerConfig(num_threads=2, sft=StageConfig(epochs=3, learning_rate=1e-2), rehearsal_per_batch=0)

    result = train_batch(batch, config, sessions, base_model_dir=trained_base, adapters_dir=tmp_path / "adapters",
                         objects=ObjectStore(tmp_path.as_uri()),
                         suites=suites)  # fmt: skip

    assert result.status == "rejected", result.metrics
    assert result.reason.startswith("unit_conversions fell from the base model's "), result.reason
