"""Train a cllmfs_ner pipeline with `spacy train`, resuming an interrupted run.

    python project/train.py CONFIG OUTPUT_DIR --train T.spacy --dev D.spacy [options]

The run saves a checkpoint (adapter + optimizer state) every --checkpoint-every
steps under OUTPUT_DIR/checkpoint. If OUTPUT_DIR has a checkpoint but no
model-last (the run was interrupted), training continues from it for the
remaining steps, with the learn-rate schedule picking up where it stopped.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

from spacy.cli.train import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--adapter", default=None, help="Adapter to start from (e.g. a source-domain model's).")
    parser.add_argument("--gpu-id", type=int, default=-1, help="CUDA device for the model; -1 for the CPU.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-frequency", type=int, default=0, help="0: half of --steps.")
    parser.add_argument("--batch-size", type=int, default=4, help="Sentences per step.")
    parser.add_argument("--learn-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--contrastive-weight", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    checkpoint_dir = args.output_dir / "checkpoint"
    overrides: Dict[str, Any] = {
        "paths.train": str(args.train),
        "paths.dev": str(args.dev),
        "paths.base_model": args.base_model,
        "paths.adapter": args.adapter,
        "paths.checkpoint_dir": str(checkpoint_dir),
        "system.seed": args.seed,
        "components.cllmfs_ner.model.device": f"cuda:{args.gpu_id}" if args.gpu_id >= 0 else "cpu",
        "components.cllmfs_ner.training.contrastive_weight": args.contrastive_weight,
        "training.max_steps": args.steps,
        "training.eval_frequency": args.eval_frequency or max(1, args.steps // 2),
        "training.batcher.size": args.batch_size,
        "training.before_update.every": args.checkpoint_every,
        "training.optimizer.learn_rate.initial_rate": args.learn_rate,
        "training.optimizer.learn_rate.warmup_steps": min(args.warmup_steps, args.steps),
    }
    state_file = checkpoint_dir / "cllmfs_ner" / "state.json"
    if state_file.exists() and not (args.output_dir / "model-last").exists():
        done = int(json.loads(state_file.read_text())["step"])
        remaining = max(1, args.steps - done)
        warmup = min(args.warmup_steps, args.steps)
        rate = args.learn_rate * (min(1.0, done / warmup) if done < warmup else (args.steps - done) / max(1, args.steps - warmup))
        print(f"Resuming from the checkpoint at step {done}: {remaining} steps to go (learn rate {rate:.2e}).")
        overrides.update({
            "paths.resume_from": str(checkpoint_dir / "cllmfs_ner"),
            "training.max_steps": remaining,
            "training.eval_frequency": min(overrides["training.eval_frequency"], remaining),
            "training.before_update.offset": done,
            "training.optimizer.learn_rate.initial_rate": max(rate, 1e-12),
            "training.optimizer.learn_rate.warmup_steps": 0,
        })
    train(args.config, args.output_dir, overrides=overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
