"""The LoRA training recipe: one batch (a folder of the object store) in, at most one
registered adapter out.

    train_batch(batch, config, sessions, base_model_dir=..., adapters_dir=..., objects=..., suites=...) -> TrainResult

All of it runs under the trainer's lock (``trainer.lock``: one training at a time per store,
across hosts), checked once more right before publishing.

Configuration is handed in (``TrainerConfig``), and so are the components that judge the
result: the gate's evaluation suites (``trainer.gate.EvalSuite``), which the caller builds
from ``config.gate.suites``. The recipe knows no suite; with none the gate checks soundness.

Stages, in order (each a small module):
  0. read and verify the batch (streams.training_data.read_batch); exactly-once bookkeeping
     and the privacy budget (registry, privacy)
  1. load the policy: base model + parent adapter (or a fresh zero-delta LoRA)
  2. score the parent on the suites, and the base model on the protected ones (gate)
  3. train one adapter through the stages (stages): SFT (with rehearsal chats of the base
     model's protected skills, rehearsal) -> DPO -> KTO, or DP-SGD SFT alone when privacy is on
  4. save the candidate to staging; score it as served: reloaded from its files (gate)
  5. gate: reject (filed under _rejected/, batch failed, reason recorded) or
     6. publish atomically and register adapter + batch in one transaction (registry)
     7. return the AdapterReady event for the caller to publish
"""

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import structlog
import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import sessionmaker
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from streams.contract import AdapterReady, AdapterState
from streams.objects import ObjectStore
from streams.store import BatchStatus
from streams.training_data import BatchFolder, manifest_sha256, read_batch
from trainer import data, gate, registry, rehearsal
from trainer.adapter_validation import adapter_sha256
from trainer.base_model import METADATA_FILE, weights_sha256
from trainer.config import TrainerConfig
from trainer.lora import add_lora
from trainer.ledger import LEGACY_FILE, PrivacyLedger
from trainer.lock import TrainerLock, exclusive
from trainer.privacy import dp_sft, plan
from trainer.progress import ProgressHook, ProgressReporter
from trainer.registry import Registry
from trainer.stages import DPO, KTO, SFT, StageResult, run_stage
from trainer.weighting import snapshot_lora

log = structlog.get_logger(__name__)

# Stage, the batch signal it trains on, and how its records become a trl dataset.
STAGES = ((SFT, "sft", data.sft_dataset), (DPO, "pairs", data.dpo_dataset), (KTO, "labels", data.kto_dataset))


class TrainResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_id: str
    status: Literal["trained", "rejected"]
    adapter: str
    path: str
    reason: str | None = None
    metrics: dict[str, float]
    epsilon: float | None = None
    event: AdapterReady | None = None  # only for a published ("trained") adapter


def train_batch(
    batch: BatchFolder,
    config: TrainerConfig,
    sessions: sessionmaker,
    *,
    base_model_dir: str | Path,
    adapters_dir: str | Path,
    objects: ObjectStore,
    parent: str | None = None,
    suites: Sequence[gate.EvalSuite] = (),
    on_progress: ProgressHook | None = None,
    lock: TrainerLock | None = None,
) -> TrainResult:
    """Train one batch into one adapter, exactly once; see the module doc for the stages.

    ``parent`` names the adapter to continue from and to compare with (the current champion,
    usually); None starts from, and compares with, the base model. ``suites`` are what the
    gate scores (trainer.gate). Calling it again for a batch that is done returns the
    recorded result; for a batch left "training" by a crash, it trains again from scratch.
    ``objects`` is the shared store, which holds the privacy ledger (``trainer.ledger``).
    ``lock``: the trainer's lock, if the caller holds it already (the worker does, from before
    it chose ``parent``); else it is taken here, waiting for any other trainer on the store.
    Raises PrivacyBudgetExceeded (batch left "emitted"), TrainerLockLost (nothing published).
    """
    adapters_dir, base_model_dir = Path(adapters_dir), Path(base_model_dir)
    # 0. The batch, read from the store and verified against its manifest's checksums.
    try:
        manifest, records = read_batch(batch)
    except ValueError as exc:  # gone, or not what its manifest says (BatchUnreadable, ValidationError)
        raise registry.BatchNotTrainable(f"batch {batch} cannot be read: {exc}") from exc
    batch_id = manifest.batch_id
    store = Registry(sessions, adapters_dir)
    with exclusive(sessions, adapters_dir, held=lock) as held, _threads(config.num_threads):
        done = store.batch(batch_id)
        if done is not None and done.status in (BatchStatus.TRAINED, BatchStatus.FAILED) and done.adapter:
            store.clean_staging(batch_id)
            return _result(store.adapter(done.adapter), batch_id)
        if store.pending_publish(batch_id):  # crashed after publishing, before registering
            return _result(store.finish_publish(batch_id), batch_id)

        dp = config.privacy
        ledger = PrivacyLedger(objects, dp, legacy=adapters_dir / LEGACY_FILE)
        epsilon = plan(len(records["sft"]), dp)[0] if dp.enabled else None
        if dp.enabled:
            ledger.reserve(batch_id, epsilon)  # refuses before any training
        store.claim(manifest, manifest_sha256(batch), batch.folder)
        attempt = store.start_attempt(batch_id)
        if attempt > config.max_attempts:
            raise registry.BatchNotTrainable(
                f"batch {batch_id} crashed {attempt - 1} times (FEEDLOOP_TRAINER__MAX_ATTEMPTS); the trainer log "
                "of those attempts says why")  # fmt: skip
        log.info("train_batch_started", batch_id=batch_id, attempt=attempt, counts=manifest.counts, parent=parent)

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)

        # 1. Policy: base + parent adapter, or a fresh LoRA whose B = 0 (exactly the base).
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)
        parent_row = store.adapter(parent) if parent else None
        model = _policy(base_model_dir, parent_row.path if parent_row else None, config, device)
        anchor = snapshot_lora(model)

        # 2. The parent's scores, and the base model's on the protected suites: their floor
        # (the parent's own when the parent is the base model).
        parent_eval = gate.evaluate(model, tokenizer, suites, records)
        protected = [suite for suite in suites if suite.protected]
        if parent_row is None:
            base_eval = parent_eval.of(protected)
        else:
            with model.disable_adapter():
                base_eval = gate.evaluate(model, tokenizer, protected, records)

        # 3. Train: SFT -> DPO -> KTO, one adapter throughout (or DP-SGD SFT only). The
        # rehearsal chats join SFT only, never with a question of the gate's suites.
        chats = rehearsal.load(base_model_dir)
        if config.rehearsal_per_batch and not chats:
            log.warning("rehearsal_missing", base_model=str(base_model_dir),
                        hint=f"put chats of the skills adapters must keep in {rehearsal.FILE} there (docs/trainer.md)")
        rehearsed = rehearsal.draw(chats, config.rehearsal_per_batch, batch_id,
                                   exclude={prompt for suite in suites for prompt in suite.prompts})  # fmt: skip
        results: list[StageResult] = []
        if dp.enabled:
            if records["sft"]:
                reporter = _reporter(batch_id, SFT, config, on_progress)
                result, epsilon = dp_sft(model, tokenizer, records["sft"], config, device, reporter)
                results.append(result)
        else:
            for stage, signal, make in STAGES:
                if getattr(config, stage).enabled and records[signal]:
                    reporter = _reporter(batch_id, stage, config, on_progress)
                    dataset = make(records[signal] + (rehearsed if stage == SFT else []))
                    results.append(run_stage(stage, model, tokenizer, dataset, config, device, reporter, anchor))

        # 4. The candidate as it will be served: saved, then reloaded from its files.
        candidate_dir = store.staging(batch_id) / "candidate"
        model.save_pretrained(candidate_dir)
        del model
        served = _policy(base_model_dir, candidate_dir, config, device)
        candidate_eval = gate.evaluate(served, tokenizer, suites, records)
        parent_metrics, candidate_metrics = parent_eval.scores, candidate_eval.scores

        # 5. Gate, then 6. publish + register (or file the rejection).
        unsound = gate.faults(served, {result.stage: result.train_loss for result in results})
        verdict = gate.judge(suites, candidate_metrics, parent_metrics, base_eval.scores, unsound)
        weights_sha = registry.sha256_file(candidate_dir / registry.ADAPTER_FILES[0])
        held.check()  # still ours (its connection alive): no other trainer took the next name or parent
        name = store.next_name(weights_sha)
        lineage = {
            "base_model_sha256": _base_sha256(base_model_dir),
            "parent": parent,
            "batch_ids": [batch_id],
            "manifest_sha256": manifest_sha256(batch),
            "counts": manifest.counts,
            "rehearsal": 0 if dp.enabled else len(rehearsed),
            "weights": {signal: data.weight_summary(items) for signal, items in records.items()},
            "loss_weights": manifest.loss_weights,
            "stages": [r.__dict__ | {"tokens_per_s": r.tokens_per_s} for r in results],
            "skipped": [s for s in ("pairs", "labels") if dp.enabled and records[s]],
            "privacy": {"epsilon": epsilon, "delta": dp.delta} if dp.enabled else None,
            "eval": {
                "suites": {suite.name: suite.version for suite in suites},
                "parent": parent_metrics,
                "candidate": candidate_metrics,
                "base": base_eval.scores,  # the protected suites' floor
                # Why a suite measured nothing (too few items, a judge out of reach), by model.
                "abstained": {"parent": parent_eval.abstained, "candidate": candidate_eval.abstained,
                              "base": base_eval.abstained},  # fmt: skip
            },
            "gate": {"passed": verdict.passed, "reasons": list(verdict.reasons)},
            "files_sha256": {f: registry.sha256_file(candidate_dir / f) for f in registry.ADAPTER_FILES},
            "config": config.model_dump(mode="json"),
            "code_version": registry.code_version(),
            "attempt": attempt,
            "registered_at": registry.now_iso(),
        }
        row = store.publish(
            candidate_dir,
            {
                "name": name,
                "state": AdapterState.READY if verdict.passed else AdapterState.FAILED,
                # What the hot-swap controller checks before serving it: config and weights.
                "sha256": adapter_sha256(candidate_dir),
                "base_model_sha256": lineage["base_model_sha256"],
                "parent": parent,
                "reason": verdict.reason,
                "lineage": lineage,
            },
            batch_id,
        )
        if dp.enabled:
            ledger.settle(batch_id, name, row.state)
        log.info(
            "train_batch_finished", batch_id=batch_id, adapter=name, passed=verdict.passed, reason=verdict.reason,
            parent_metrics=parent_metrics, candidate_metrics=candidate_metrics,
        )
        # 7. The AdapterReady event (published by the caller).
        return _result(row, batch_id)


def _result(row, batch_id: str) -> TrainResult:  # noqa: ANN001
    passed = row.state != AdapterState.FAILED
    privacy = row.lineage.get("privacy") or {}
    return TrainResult(
        batch_id=batch_id,
        status="trained" if passed else "rejected",
        adapter=row.name,
        path=row.path,
        reason=row.reason,
        metrics=row.lineage["eval"]["candidate"],
        epsilon=privacy.get("epsilon"),
        event=registry.adapter_ready(row) if passed else None,
    )


def _policy(
    base_model_dir: Path, adapter_dir: Path | str | None, config: TrainerConfig, device: torch.device
) -> PeftModel:
    # fp32 master weights everywhere; trl autocasts to bf16 on GPUs that have it.
    base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        base_model_dir, local_files_only=True, dtype=torch.float32
    )
    if adapter_dir is None:
        model = add_lora(base, config.lora)
    else:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    return model.to(device)


def _base_sha256(base_model_dir: Path) -> str:
    metadata = base_model_dir / METADATA_FILE
    if metadata.exists():
        return json.loads(metadata.read_text())["weights_sha256"]
    return weights_sha256(base_model_dir)


def _reporter(batch_id: str, stage: str, config: TrainerConfig, hook: ProgressHook | None) -> ProgressReporter:
    return ProgressReporter(batch_id, stage, config.log_every, hook)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Cap torch's CPU threads while training so the stream processors keep their cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
