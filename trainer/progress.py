"""Training progress: structlog lines with steps/s and ETA, and an optional callback.

The same reporter serves trl's trainers (through ``ProgressCallback``) and the plain DP-SGD
loop, so operators see one format whatever the stage.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from transformers import TrainerCallback

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Progress:
    batch_id: str
    stage: str
    step: int
    total_steps: int
    steps_per_s: float
    eta_s: float
    loss: float | None


ProgressHook = Callable[[Progress], None]


class ProgressReporter:
    """Call ``step(...)`` after every optimizer step of one stage."""

    def __init__(self, batch_id: str, stage: str, log_every: int, hook: ProgressHook | None) -> None:
        self.batch_id, self.stage, self.log_every, self.hook = batch_id, stage, log_every, hook
        self.started = time.monotonic()

    def step(self, step: int, total_steps: int, loss: float | None) -> None:
        rate = step / max(time.monotonic() - self.started, 1e-9)
        progress = Progress(
            self.batch_id, self.stage, step, total_steps, rate, max(total_steps - step, 0) / rate, loss
        )
        if step % self.log_every == 0 or step == total_steps:
            log.info(
                "train_progress",
                batch_id=self.batch_id,
                stage=self.stage,
                step=step,
                steps=total_steps,
                steps_per_s=round(rate, 2),
                eta_s=round(progress.eta_s, 1),
                loss=None if loss is None else round(loss, 4),
            )
        # Called last: a hook that raises (a crash test, an operator's abort) stops training here.
        if self.hook is not None:
            self.hook(progress)


class ProgressCallback(TrainerCallback):
    """Feeds a trl/transformers Trainer's steps into a ``ProgressReporter``."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self.loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.reporter.step(state.global_step, state.max_steps, self.loss)
