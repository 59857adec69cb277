"""Where a run's F1 is lost: per entity type, the test mentions, F1, recall, missed
mentions and the F1 the run would have without that type, for runs of bench/quality.py
side by side (same domain, same test sentences).

    python bench/per_type.py --data ../shared/data/crossner --domain science \\
        "bench/results/quality-cpu-real-qwen1_5b-bf16.json:spacy_llm|science|k5|s0" \\
        "bench/results/quality-cpu-real-qwen1_5b-bf16-noconll.json:spacy_llm_general|science|k5|s0|n250"

A run is `results file:run key` (the key as the results file writes it). The counts come
from spaCy's per-type scores and the domain's test split: true positives = recall x
mentions, predictions = true positives / precision. Predictions of types with precision 0
are only known together (all predictions less the others'), so "F1 without it" is "?"
for such a type when there are two or more.
"""
import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import spacy

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from spacy_cllmfs.corpora import read_conll  # noqa: E402


@dataclass
class TypeCounts:
    """One type of one run: its test mentions, true positives and predictions (None:
    not recoverable from the scores)."""

    mentions: int
    true_positives: int
    predictions: Optional[int]
    f: float
    r: float


def gold_mentions(data: Path, domain: str, test_limit: int) -> Counter:
    """Gold mentions per label in the first `test_limit` test sentences (all if <= 0)."""
    docs = read_conll(data / domain / "test.txt", spacy.blank("en").vocab)
    if test_limit > 0:
        docs = docs[:test_limit]
    return Counter(ent.label_ for doc in docs for ent in doc.ents)


def load_run(spec: str) -> Dict:
    """The run `file:key` of a bench/quality.py results file."""
    path, sep, key = spec.rpartition(":")  # a key holds no colon; a path may
    if not sep:
        raise SystemExit(f"Run {spec!r} is not 'results file:run key'. Fix: e.g. "
                         "'bench/results/quality-cpu-real-qwen1_5b-bf16.json:spacy_llm|science|k5|s0'.")
    runs = json.loads(Path(path).read_text())["runs"]
    if key not in runs:
        raise SystemExit(f"No run {key!r} in {path}. Fix: use one of {sorted(runs)}.")
    return runs[key]


def predicted(run: Dict, counts: Dict[str, TypeCounts]) -> int:
    """All predictions of a run: its true positives / its precision."""
    found = sum(c.true_positives for c in counts.values())
    return round(found / run["ents_p"]) if run["ents_p"] > 0 else 0


def type_counts(run: Dict, mentions: Counter) -> Dict[str, TypeCounts]:
    """Per-type counts of a run, recovered from its scores and the gold mentions."""
    if sum(mentions.values()) == 0:
        raise SystemExit("The test sentences hold no entities. Fix: check --data, --domain and the run's domain.")
    expected = round(run["ents_r"] * sum(mentions.values()))
    scores = run["ents_per_type"]
    counts = {}
    for label in sorted(set(mentions) | set(scores)):
        score = scores.get(label, {"p": 0.0, "r": 0.0, "f": 0.0})
        true_positives = round(score["r"] * mentions[label])
        predictions = round(true_positives / score["p"]) if score["p"] > 0 else None
        counts[label] = TypeCounts(mentions[label], true_positives, predictions, score["f"], score["r"])
    found = sum(c.true_positives for c in counts.values())
    if found != expected:
        raise SystemExit(f"The run's recall ({run['ents_r']:.4f}) does not match these test sentences "
                         f"({found} true positives counted, {expected} expected). Fix: pass the --data, "
                         "--domain and --test-limit the run was scored on.")
    total = predicted(run, counts)
    unknown = [label for label, c in counts.items() if c.predictions is None]
    rest = total - sum(c.predictions for c in counts.values() if c.predictions is not None)
    if len(unknown) == 1 or rest == 0:  # the predictions left over are then known
        for label in unknown:
            counts[label].predictions = rest if len(unknown) == 1 else 0
    return counts


def f1_without(counts: Dict[str, TypeCounts], label: str, predictions: int) -> Optional[float]:
    """Micro F1 (x 100) of a run with `label` left out of gold and predictions, given all
    its `predictions`; None where the label's own predictions are not known."""
    if counts[label].predictions is None:
        return None
    found = sum(c.true_positives for c in counts.values()) - counts[label].true_positives
    gold = sum(c.mentions for c in counts.values()) - counts[label].mentions
    denominator = gold + predictions - counts[label].predictions
    return 200 * found / denominator if denominator else None


def table(specs: Sequence[str], data: Path, domain: str, test_limit: Optional[int]) -> str:
    """A markdown table: one row per type (most mentions first), four columns per run,
    and a line naming the runs."""
    runs = [load_run(spec) for spec in specs]
    for spec, run in zip(specs, runs):
        if run.get("domain", domain) != domain:
            raise SystemExit(f"Run {spec!r} was scored on {run['domain']}, not {domain}. "
                             f"Fix: pass --domain {run['domain']}, or runs of {domain}.")
    limits = {run.get("test_sentences") for run in runs}
    if test_limit is None:
        if len(limits) != 1 or None in limits:
            raise SystemExit(f"The runs were scored on {sorted(map(str, limits))} test sentences. "
                             "Fix: compare runs of one test set, or pass --test-limit.")
        test_limit = limits.pop()
    mentions = gold_mentions(data, domain, test_limit)
    counts = [type_counts(run, mentions) for run in runs]
    totals = [predicted(run, run_counts) for run, run_counts in zip(runs, counts)]
    header = ["type", "mentions"]
    for number in range(1, len(specs) + 1):
        header += [f"run {number} F1", "recall", "missed", "F1 without it"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = sorted(set(mentions) | {label for c in counts for label in c}, key=lambda l: (-mentions[l], l))
    for label in labels:
        cells: List[str] = [label, str(mentions[label])]
        for run_counts, total in zip(counts, totals):
            c = run_counts[label]
            without = f1_without(run_counts, label, total)
            cells += [f"{100 * c.f:.1f}", f"{100 * c.r:.1f}", str(c.mentions - c.true_positives),
                      "?" if without is None else f"{without:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    total = ["all", str(sum(mentions.values()))]
    for run, run_counts in zip(runs, counts):
        missed = sum(c.mentions - c.true_positives for c in run_counts.values())
        total += [f"{100 * run['ents_f']:.1f}", f"{100 * run['ents_r']:.1f}", str(missed), "-"]
    lines.append("| " + " | ".join(total) + " |")
    legend = "; ".join(f"run {number}: `{spec}`" for number, spec in enumerate(specs, 1))
    return "\n".join(lines + ["", f"{domain}, {test_limit} test sentences; {legend}"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="'results file:run key', one per run")
    parser.add_argument("--data", type=Path, required=True, help="the CrossNER folder (../shared/data/crossner)")
    parser.add_argument("--domain", required=True, help="the domain the runs were scored on")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="test sentences scored (default: the runs' test_sentences)")
    args = parser.parse_args(argv)
    print(table(args.runs, args.data, args.domain, args.test_limit))


if __name__ == "__main__":
    main()
