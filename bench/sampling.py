"""How many labels stay below K with each K-shot sampling strategy, on CrossNER.

    python bench/sampling.py --data ../shared/data/crossner [--seeds 10] [--output results.json]
"""
import argparse
import json
import warnings
from pathlib import Path
from typing import Dict, List

import spacy

from spacy_cllmfs.corpora import read_conll
from spacy_cllmfs.sampling import SAMPLING_STRATEGIES, greedy_k_shot, label_counts

DOMAINS = ("politics", "science", "music", "literature")


def shortfall(data: Path, domain: str, k: int, strategy: str, seeds: int) -> Dict[str, float]:
    """Mean number of labels below K and mean sentences sampled, over seeds 0..seeds-1."""
    nlp = spacy.blank("en")
    docs = read_conll(data / domain / "train.txt", nlp.vocab)
    labels = list(label_counts(docs))
    short: List[int] = []
    sizes: List[int] = []
    for seed in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample = greedy_k_shot(docs, k, seed=seed, strategy=strategy)
        counts = label_counts(sample, labels)
        short.append(sum(n < k for n in counts.values()))
        sizes.append(len(sample))
    return {"labels": len(labels), "labels_short": sum(short) / seeds, "sentences": sum(sizes) / seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print("| domain (labels) | K | " + " | ".join(f"{s}: short / sentences" for s in SAMPLING_STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(SAMPLING_STRATEGIES))
    for domain in DOMAINS:
        for k in (5, 20):
            result = {s: shortfall(args.data, domain, k, s, args.seeds) for s in SAMPLING_STRATEGIES}
            n_labels = result["greedy"]["labels"]
            cells = " | ".join(f"{r['labels_short']:.1f} / {r['sentences']:.0f}" for r in result.values())
            print(f"| {domain} ({n_labels}) | {k} | {cells} |")
            rows.append({"domain": domain, "k": k, **result})
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
