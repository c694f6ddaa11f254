"""The recipe end to end on the real base model, store and batch format (CPU, small configs).

The gate scores the toy world's suites (demo.suites), plugged in as a deployment plugs in its own."""

import re
import stat

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from peft import PeftModel
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from demo.suites import PREFERRED_STYLE_RATE, RARE_SKILL_ACCURACY, WELL_FORMED_RATE, toy_suites
from streams.objects import ObjectStore
from streams.store import Adapter, Batch
from streams.contract import AdapterReady
from tests.trainer import batches
from trainer.adapter_validation import adapter_sha256
from trainer.config import PrivacyConfig, StageConfig, TrainerConfig
from trainer.ledger import PrivacyBudgetExceeded, PrivacyLedger
from trainer.recipe import train_batch
from trainer.registry import sha256_file

# Tests whose point is not the gate plug in no suites: the gate then checks soundness alone.
FAST = TrainerConfig(num_threads=2, sft=StageConfig(epochs=1), log_every=5)
SUITES = toy_suites()


def rows(sessions, model):
    with sessions() as session:
        return session.scalars(select(model)).all()


def published(adapters):
    return sorted(p.name for p in adapters.glob("adapter-*"))


def test_preference_batch_moves_style_keeps_rare_skill_and_registers_one_adapter(trained_base, sessions, tmp_path):
    batch = batches.write(tmp_path, "batch-pref", batches.preference_records(seed=1, sft=60, pairs=48, labels=48))
    adapters = tmp_path / "adapters"

    result = train_batch(batch, TrainerConfig(num_threads=2), sessions, base_model_dir=trained_base,
                         adapters_dir=adapters,
                         objects=ObjectStore(adapters.parent.as_uri()), suites=SUITES)  # fmt: skip

    assert result.status == "trained", result.reason
    (row,) = rows(sessions, Adapter)
    parent, candidate = row.lineage["eval"]["parent"], row.lineage["eval"]["candidate"]
    assert row.lineage["eval"]["suites"] == {suite.name: suite.version for suite in SUITES}
    # The parent is the base model: its scores are the protected suites' floor.
    assert row.lineage["eval"]["base"] == {name: parent[name] for name in (WELL_FORMED_RATE, RARE_SKILL_ACCURACY)}
    assert candidate[PREFERRED_STYLE_RATE] >= parent[PREFERRED_STYLE_RATE] + 0.20, (parent, candidate)
    assert candidate[RARE_SKILL_ACCURACY] >= parent[RARE_SKILL_ACCURACY] - 0.02, (parent, candidate)
    assert candidate[WELL_FORMED_RATE] >= 0.95, candidate

    # Registry row, lineage and files.
    assert re.fullmatch(r"adapter-000001-[0-9a-f]{8}", row.name) and row.state == "ready" and row.parent is None
    path = adapters / row.name
    assert published(adapters) == [row.name] and row.path == str(path)
    assert row.sha256 == adapter_sha256(path)
    assert row.name.endswith(sha256_file(path / "adapter_model.safetensors")[:8])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644
    assert [s["stage"] for s in row.lineage["stages"]] == ["sft", "dpo", "kto"]
    assert row.lineage["batch_ids"] == ["batch-pref"] and row.lineage["counts"] == {"sft": 60, "pairs": 48, "labels": 48}
    assert row.lineage["weights"]["pairs"]["sum"] == 48 and row.lineage["code_version"]
    assert row.lineage["rehearsal"] == 40  # the base model's rare-skill chats joined SFT
    assert len(row.base_model_sha256) == 64 and row.lineage["privacy"] is None
    (batch_row,) = rows(sessions, Batch)
    assert (batch_row.status, batch_row.adapter) == ("trained", row.name)

    # The event for the hot-swapper.
    event = result.event
    assert isinstance(event, AdapterReady)
    assert (event.adapter, event.path, event.sha256, event.batch_ids) == (row.name, str(path), row.sha256, ["batch-pref"])

    # The adapter loads with peft and changes the base model's output.
    base = AutoModelForCausalLM.from_pretrained(trained_base, local_files_only=True).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, path).eval()(ids).logits
    assert not torch.allclose(before, after)

    # Trained exactly once: asking again returns the recorded adapter.
    again = train_batch(batch, TrainerConfig(num_threads=2), sessions, base_model_dir=trained_base,
                        adapters_dir=adapters,
                        objects=ObjectStore(adapters.parent.as_uri()), suites=SUITES)  # fmt: skip
    assert again.adapter == row.name and again.event == event and len(rows(sessions, Adapter)) == 1


def test_batch_that_teaches_the_rare_skill_wrong_is_rejected_with_a_reason(trained_base, sessions, tmp_path):
    batch = batches.write(tmp_path, "batch-forget", batches.wrong_units_records(seed=2, count=64))
    adapters = tmp_path / "adapters"
    # The gate alone, without rehearsal's correct conversions to soften the batch.
    config = TrainerConfig(num_threads=2, sft=StageConfig(epochs=3, learning_rate=1e-2), rehearsal_per_batch=0)

    result = train_batch(batch, config, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                         objects=ObjectStore(adapters.parent.as_uri()), suites=SUITES)

    assert result.status == "rejected" and result.event is None
    assert RARE_SKILL_ACCURACY in result.reason
    (row,) = rows(sessions, Adapter)
    assert row.state == "failed" and row.reason == result.reason
    assert row.lineage["gate"]["passed"] is False
    drop = row.lineage["eval"]["parent"][RARE_SKILL_ACCURACY] - row.lineage["eval"]["candidate"][RARE_SKILL_ACCURACY]
    assert drop > 0.02
    (batch_row,) = rows(sessions, Batch)
    assert (batch_row.status, batch_row.adapter) == ("failed", row.name)
    assert batch_row.reason == f"the gate refused {row.name}: {result.reason}"
    # Never published where the hot-swapper looks; kept aside for inspection.
    assert published(adapters) == [] and (adapters / "_rejected" / row.name / "adapter_model.safetensors").exists()


class Crash(Exception):
    pass


def test_crash_mid_batch_then_restart_trains_it_exactly_once(trained_base, sessions, tmp_path):
    batch = batches.write(tmp_path, "batch-crash", batches.sft_records(seed=3, count=48))
    adapters = tmp_path / "adapters"
    steps = []

    def crash_at_step_3(progress):
        steps.append(progress.step)
        if progress.step == 3:
            raise Crash("power cut")

    with pytest.raises(Crash):
        train_batch(batch, FAST, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                    objects=ObjectStore(adapters.parent.as_uri()), on_progress=crash_at_step_3)

    assert steps == [1, 2, 3]
    assert rows(sessions, Adapter) == [] and published(adapters) == []
    (batch_row,) = rows(sessions, Batch)
    assert batch_row.status == "training" and batch_row.adapter is None

    # The restarted trainer finds the batch in "training" and trains it from scratch.
    result = train_batch(batch, FAST, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                         objects=ObjectStore(adapters.parent.as_uri()), on_progress=steps.append)
    assert result.status == "trained", result.reason
    (row,) = rows(sessions, Adapter)
    assert row.lineage["attempt"] == 2 and published(adapters) == [row.name]
    # No suites: a sound candidate passes, with nothing scored.
    assert row.lineage["eval"] == {"suites": {}, "parent": {}, "candidate": {}, "base": {},
                                   "abstained": {"parent": {}, "candidate": {}, "base": {}}} and result.metrics == {}
    assert train_batch(batch, FAST, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                       objects=ObjectStore(adapters.parent.as_uri())).adapter == row.name
    assert len(rows(sessions, Adapter)) == 1 and rows(sessions, Batch)[0].status == "trained"
    assert not list((adapters / "_staging").iterdir())


class RecordingEngine(PrivacyEngine):
    """opacus' PrivacyEngine, kept for the test to look at after the run."""

    made: list["RecordingEngine"] = []

    def make_private(self, **kwargs):
        module, optimizer, loader = super().make_private(**kwargs)
        self.optimizer = optimizer
        RecordingEngine.made.append(self)
        return module, optimizer, loader


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """opacus' RDP accountant stepped as DP-SGD steps it, apart from trainer.privacy."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def test_dp_run_adds_noise_reports_epsilon_and_the_budget_refuses_the_next_run(trained_base, sessions, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    adapters = tmp_path / "adapters"
    privacy = PrivacyConfig(enabled=True, batch_size=16, epochs=1.0, noise_multiplier=1.0)
    # 64 SFT records in Poisson batches of 16 on average: sample rate 1/4, one epoch in 4 steps.
    sample_rate, steps = 16 / 64, 4
    epsilon = independent_epsilon(privacy.noise_multiplier, sample_rate, steps, privacy.delta)
    assert 0 < epsilon < 10
    # Room for one run, not two.
    config = FAST.model_copy(update={"privacy": privacy.model_copy(update={"budget_epsilon": 1.5 * epsilon})})
    first = batches.write(tmp_path, "batch-dp-1", batches.preference_records(seed=4, sft=64, pairs=8, labels=0))

    # Watch opacus itself: the engine the run made, and the noise each step added.
    RecordingEngine.made = []
    monkeypatch.setattr("trainer.privacy.PrivacyEngine", RecordingEngine)
    noise_std: list[float] = []
    add_noise = DPOptimizer.add_noise

    def recording_add_noise(optimizer):
        add_noise(optimizer)
        noise = torch.cat([(p.grad - p.summed_grad.view_as(p)).flatten() for p in optimizer.params])
        noise_std.append(float(noise.std()))

    monkeypatch.setattr(DPOptimizer, "add_noise", recording_add_noise)

    result = train_batch(first, config, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                         objects=ObjectStore(adapters.parent.as_uri()))

    # DP-SGD ran: a DP optimizer with the configured noise and clipping, whose every step
    # added Gaussian noise of std noise_multiplier * max_grad_norm to the clipped gradients.
    (engine,) = RecordingEngine.made
    assert isinstance(engine.optimizer, DPOptimizer)
    assert (engine.optimizer.noise_multiplier, engine.optimizer.max_grad_norm) == (1.0, privacy.max_grad_norm)
    assert len(noise_std) == steps
    assert all(std == pytest.approx(privacy.noise_multiplier * privacy.max_grad_norm, rel=0.05) for std in noise_std)
    # What opacus' own accountant counted over the steps taken is what the run reports.
    assert engine.accountant.history == [(privacy.noise_multiplier, sample_rate, steps)]
    assert engine.accountant.get_epsilon(privacy.delta) == pytest.approx(epsilon)
    assert result.epsilon == pytest.approx(epsilon)

    (row,) = rows(sessions, Adapter)
    assert row.lineage["privacy"] == {"epsilon": pytest.approx(epsilon), "delta": 1e-5}
    assert row.lineage["skipped"] == ["pairs"]  # preference stages do not run under DP
    assert [s["stage"] for s in row.lineage["stages"]] == ["sft"] and row.lineage["stages"][0]["steps"] == steps
    ledger = PrivacyLedger(ObjectStore(adapters.parent.as_uri()), config.privacy)
    assert ledger.spent() == pytest.approx(epsilon)
    assert ledger.entries()["batch-dp-1"]["adapter"] == row.name

    second = batches.write(tmp_path, "batch-dp-2", batches.sft_records(seed=5, count=64))
    with pytest.raises(PrivacyBudgetExceeded, match="refusing to train"):
        train_batch(second, config, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                    objects=ObjectStore(adapters.parent.as_uri()))
    assert len(rows(sessions, Adapter)) == 1 and ledger.spent() == pytest.approx(epsilon)
    assert {b.batch_id: b.status for b in rows(sessions, Batch)} == {"batch-dp-1": result_status(result)}


def test_a_dp_batch_with_no_sft_records_trains_nothing_and_spends_nothing(trained_base, sessions, tmp_path):
    adapters = tmp_path / "adapters"
    config = FAST.model_copy(update={"privacy": PrivacyConfig(enabled=True, batch_size=16, epochs=1.0)})
    only_pairs = batches.write(tmp_path, "batch-dp-0", batches.preference_records(seed=4, sft=0, pairs=8, labels=0))
    result = train_batch(only_pairs, config, sessions, base_model_dir=trained_base, adapters_dir=adapters,
                         objects=ObjectStore(adapters.parent.as_uri()))
    assert result.epsilon == 0.0
    assert PrivacyLedger(ObjectStore(adapters.parent.as_uri()), config.privacy).spent() == 0.0
    assert {b.batch_id for b in rows(sessions, Batch)} == {"batch-dp-0"}

def result_status(result):
    return "trained" if result.status == "trained" else "failed"
