"""Train a cllmfs_ner pipeline with `spacy train`, resuming an interrupted run.

    python project/train.py CONFIG OUTPUT_DIR --train T.spacy --dev D.spacy [options]

The training length is given in epochs over the K-shot set (--epochs; or
--steps), and the dev set is scored --dev-evals times (the last step included):
spaCy keeps the best as model-best, the way `bench/quality.py` selects with
`spacy_cllmfs.loop.fit_select`, with the same learn-rate schedule and warmup.

The run saves a checkpoint (adapter + optimizer state) every --checkpoint-every
steps under OUTPUT_DIR/checkpoint. If OUTPUT_DIR has a checkpoint but no
model-last (the run was interrupted), training continues from it for the
remaining steps, with the learn-rate schedule picking up where it stopped.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict

from spacy.cli.train import train
from spacy.tokens import DocBin


def eval_frequency(steps: int, evaluations: int) -> int:
    """spaCy scores the dev set after update 0 and every `eval_frequency` updates:
    the smallest frequency of at most `evaluations` further scorings that include
    the last update (index steps - 1)."""
    last = steps - 1
    if last < 1:
        return 1
    first = max(1, math.ceil(last / max(1, evaluations)))
    return min(f for f in range(first, last + 1) if last % f == 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--adapter", default=None, help="Adapter to start from (e.g. a general model's cllmfs_ner/adapter); '' for none.")
    parser.add_argument("--gpu-id", type=int, default=-1, help="CUDA device for the model; -1 for the CPU.")
    parser.add_argument("--dtype", default="auto",
                        help='Weight dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32" or "bfloat16".')
    parser.add_argument("--epochs", type=int, default=5, help="Passes over the training set.")
    parser.add_argument("--steps", type=int, default=0, help="Updates (0: from --epochs).")
    parser.add_argument("--dev-evals", type=int, default=2, help="Dev scorings after the first update.")
    parser.add_argument("--batch-size", type=int, default=4, help="Sentences per step.")
    parser.add_argument("--learn-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=-1, help="-1: min(10, steps // 10).")
    parser.add_argument("--contrastive-weight", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.steps < 1:
        n_train = len(DocBin().from_disk(args.train))
        args.steps = max(1, math.ceil(n_train / args.batch_size) * args.epochs)
    if args.warmup_steps < 0:
        args.warmup_steps = min(10, args.steps // 10)
    checkpoint_dir = args.output_dir / "checkpoint"
    overrides: Dict[str, Any] = {
        "paths.train": str(args.train),
        "paths.dev": str(args.dev),
        "paths.base_model": args.base_model,
        "paths.adapter": args.adapter or None,
        "paths.checkpoint_dir": str(checkpoint_dir),
        "system.seed": args.seed,
        "components.cllmfs_ner.model.device": f"cuda:{args.gpu_id}" if args.gpu_id >= 0 else "cpu",
        "components.cllmfs_ner.model.dtype": args.dtype,
        "components.cllmfs_ner.training.contrastive_weight": args.contrastive_weight,
        # spaCy counts updates from 0 and stops after update max_steps: steps - 1 gives `steps` updates
        "training.max_steps": max(1, args.steps - 1),
        "training.eval_frequency": eval_frequency(args.steps, args.dev_evals),
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
            "training.max_steps": max(1, remaining - 1),
            "training.eval_frequency": min(overrides["training.eval_frequency"], remaining),
            "training.before_update.offset": done,
            "training.optimizer.learn_rate.initial_rate": max(rate, 1e-12),
            "training.optimizer.learn_rate.warmup_steps": 0,
        })
    train(args.config, args.output_dir, overrides=overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
