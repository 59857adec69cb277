"""Which (sentence, label) prompts without an entity to train on.

Most labels are absent from most sentences: with 17 labels and ~2 present per
sentence, training on every absent label teaches the model that the answer is
nearly always "nothing" (the recipe collapsed that way on CrossNER science).
So the number of empty prompts is tied to the positives of each window
(`negatives_per_positive`), and the absent labels that are easiest to confuse
with the present ones are the likeliest picks: labels that co-occur with the
window's labels in the training data (a sentence about a politician is where
the model learns to tell a "politician" from a "person").
"""
import math
import random
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

from spacy.training import Example

NEGATIVE_SAMPLING = ("confusable", "uniform")


class LabelCooccurrence:
    """How often each label appears in a sentence that holds another label.

    counts (Dict[str, Counter]): counts[a][b] = sentences holding both a and b.
    totals (Counter): Sentences holding each label.
    """

    def __init__(self) -> None:
        self.counts: Dict[str, Counter] = {}
        self.totals: Counter = Counter()

    @classmethod
    def from_examples(cls, examples: Iterable[Example], labels: Sequence[str]) -> "LabelCooccurrence":
        """Count label co-occurrence in the gold side of `examples`."""
        stats = cls()
        wanted = set(labels)
        for example in examples:
            stats.add({ent.label_ for ent in example.reference.ents if ent.label_ in wanted})
        return stats

    def add(self, present: Iterable[str]) -> None:
        """Count one sentence holding the labels `present`."""
        present = set(present)
        self.totals.update(present)
        for a in present:
            row = self.counts.setdefault(a, Counter())
            row.update(b for b in present if b != a)

    def affinity(self, label: str, present: Iterable[str]) -> float:
        """RETURNS (float): Sum over `present` labels p of P(label in a sentence | p in it)."""
        return sum(self.counts.get(p, {}).get(label, 0) / self.totals[p] for p in present if self.totals[p])


def negatives_for(n_positive: int, per_positive: Optional[float], n_absent: int, rng: random.Random) -> int:
    """How many absent labels a window trains on.

    n_positive (int): Labels with an entity in the window.
    per_positive (Optional[float]): Empty prompts per positive one (a window without any
        entity counts as one positive); fractions are rounded at random, so that the
        expected number is exact. None: every absent label.
    n_absent (int): Labels without an entity in the window.
    RETURNS (int): A number in [0, n_absent].
    """
    if per_positive is None:
        return n_absent
    wanted = per_positive * max(1, n_positive)
    whole = math.floor(wanted)
    if rng.random() < wanted - whole:
        whole += 1
    return min(n_absent, whole)


def choose_negatives(
    present: Sequence[str],
    absent: Sequence[str],
    n: int,
    rng: random.Random,
    strategy: str = "confusable",
    stats: Optional[LabelCooccurrence] = None,
) -> List[str]:
    """Pick `n` of the `absent` labels to train on as empty answers.

    strategy (str): "uniform": any absent label alike; "confusable": weighted sampling
        without replacement, weight 1 + k * affinity with the present labels (k = number
        of labels), so that labels that co-occur with the present ones come first
        but every absent label keeps a chance.
    stats (Optional[LabelCooccurrence]): Co-occurrence counts for "confusable".
    RETURNS (List[str]): The chosen labels, in the order of `absent`.
    """
    if strategy not in NEGATIVE_SAMPLING:
        raise ValueError(f"Unknown negative_sampling {strategy!r}. Use one of {NEGATIVE_SAMPLING}.")
    if n >= len(absent):
        return list(absent)
    if n <= 0:
        return []
    if strategy == "uniform" or stats is None or not present:
        chosen = set(rng.sample(list(absent), n))
    else:
        scale = len(present) + len(absent)
        # Efraimidis-Spirakis: the n largest u ** (1 / w) are a weighted sample without replacement
        keys = {label: rng.random() ** (1.0 / (1.0 + scale * stats.affinity(label, present))) for label in absent}
        chosen = set(sorted(absent, key=lambda label: keys[label], reverse=True)[:n])
    return [label for label in absent if label in chosen]
