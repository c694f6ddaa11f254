"""Trainer throughput beside plain trl, on the same data and settings, in one process.

    .venv/bin/python benchmarks/trainer_throughput.py [--base DIR] [--records 256] [--rounds 3] [--threads 2]

For SFT and DPO: feedloop's stage (trl trainer + per-example weights + progress callback,
through ``trainer.stages.run_stage``) and the plain trl trainer with the same trl config on
the same records, each from the same fresh LoRA init. Figure: training tokens per second
(prompt and answer tokens of every sequence trained on / train_runtime), median of
``--rounds`` alternating runs. The ratio feedloop / plain trl is the number to watch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOTrainer, SFTTrainer  # noqa: E402

from app.logs import configure_logging  # noqa: E402
from demo.base_model import build_tiny_model  # noqa: E402
from tests.trainer import batches  # noqa: E402
from trainer import data  # noqa: E402
from trainer.config import StageConfig, TrainerConfig  # noqa: E402
from trainer.lora import add_lora  # noqa: E402
from trainer.progress import ProgressReporter  # noqa: E402
from trainer.stages import DPO, SFT, count_tokens, run_stage, trl_args  # noqa: E402
from trainer.weighting import WEIGHT, snapshot_lora  # noqa: E402

PLAIN = {SFT: SFTTrainer, DPO: DPOTrainer}


def fresh_model(base: Path, config: TrainerConfig):  # noqa: ANN201
    torch.manual_seed(config.seed)
    return add_lora(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), config.lora)


def plain_trl(stage: str, base: Path, tokenizer, dataset, config: TrainerConfig) -> float:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as out:
        args = trl_args(stage, config, getattr(config, stage), torch.device("cpu"), out)
        trainer = PLAIN[stage](
            model=fresh_model(base, config), args=args, train_dataset=dataset.remove_columns(WEIGHT), processing_class=tokenizer
        )
        runtime = trainer.train().metrics["train_runtime"]
        return count_tokens(trainer.train_dataset, trainer.state.num_train_epochs) / runtime


def feedloop(stage: str, base: Path, tokenizer, dataset, config: TrainerConfig) -> float:  # noqa: ANN001
    model = fresh_model(base, config)
    reporter = ProgressReporter("bench", stage, config.log_every, None)
    return run_stage(stage, model, tokenizer, dataset, config, torch.device("cpu"), reporter, snapshot_lora(model)).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base model directory (default: build one in a temp dir)")
    parser.add_argument("--records", type=int, default=256, help="SFT records and preference pairs each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_logging("warning", "console")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or build_tiny_model(Path(tmp) / "base")
        tokenizer = AutoTokenizer.from_pretrained(base)
        records = batches.preference_records(seed=11, sft=args.records, pairs=args.records, labels=0)
        datasets = {
            SFT: data.sft_dataset([r for r in records if r.__class__.__name__ == "SftRecord"]),
            DPO: data.dpo_dataset([r for r in records if r.__class__.__name__ == "PreferenceRecord"]),
        }
        stage = StageConfig(epochs=1, batch_size=8)
        config = TrainerConfig(sft=stage, dpo=stage, log_every=10)
        print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} threads), "
              f"transformers {transformers.__version__}, trl {trl.__version__}; {args.records} records, batch 8, 1 epoch")
        print(f"{'stage':<6} {'plain trl tok/s':>16} {'feedloop tok/s':>15} {'ratio':>6}")
        for name, dataset in datasets.items():
            plain, ours = [], []
            for round_ in range(args.rounds):
                # Alternate who goes first, so drift in the machine's load hits both sides alike.
                runs = [(plain, plain_trl), (ours, feedloop)]
                for figures, run in runs if round_ % 2 == 0 else runs[::-1]:
                    figures.append(run(name, base, tokenizer, dataset, config))
            p, o = statistics.median(plain), statistics.median(ours)
            print(f"{name:<6} {p:>16,.0f} {o:>15,.0f} {o / p:>6.2f}")


if __name__ == "__main__":
    main()
