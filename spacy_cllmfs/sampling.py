"""Seeded few-shot samplers: Few-NERD greedy K~2K-shot sampling and
N-way K-shot episodes."""
import random
import warnings
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from spacy.tokens import Doc

from .corpora import Episode


class FewShotWarning(UserWarning):
    """The data ran out before every label reached K mentions."""


def _doc_labels(doc: Doc) -> Counter:
    return Counter(ent.label_ for ent in doc.ents)


def label_counts(docs: Iterable[Doc], labels: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """Count entity mentions per label.

    docs (Iterable[Doc]): The Docs.
    labels (Optional[Iterable[str]]): Count only these labels (reported even
        when 0); None counts every label found.
    RETURNS (Dict[str, int]): Mentions per label, in the order of `labels`,
        or sorted by label when `labels` is None.
    """
    totals: Counter = Counter()
    for doc in docs:
        totals.update(_doc_labels(doc))
    if labels is None:
        return {label: totals[label] for label in sorted(totals)}
    return {label: totals[label] for label in labels}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}. Fix: pass {name} >= 1.")


def _greedy_indices(
    docs: Sequence[Doc], k: int, labels: Sequence[str], rng: random.Random, skip: Set[int] = frozenset()
) -> Tuple[List[int], Dict[str, int]]:
    """Few-NERD Algorithm 1 over `docs` in a seeded random order.

    RETURNS (Tuple[List[int], Dict[str, int]]): Chosen indices in selection
        order and the mention counts per label.
    """
    wanted = set(labels)
    counts = {label: 0 for label in labels}
    chosen: List[int] = []
    order = [i for i in range(len(docs)) if i not in skip]
    rng.shuffle(order)
    for i in order:
        if all(count >= k for count in counts.values()):
            break
        doc_counts = {lab: n for lab, n in _doc_labels(docs[i]).items() if lab in wanted}
        if not doc_counts:
            continue
        if any(counts[lab] + n > 2 * k for lab, n in doc_counts.items()):
            continue
        for lab, n in doc_counts.items():
            counts[lab] += n
        chosen.append(i)
    return chosen, counts


def _balanced_indices(
    docs: Sequence[Doc], k: int, labels: Sequence[str], rng: random.Random
) -> Tuple[List[int], Dict[str, int]]:
    """K-per-type sampling that serves the least-filled label first.

    Repeatedly take the label with the fewest mentions (below K), and add a
    sentence that has that label and keeps every label at or below 2K: the one
    with the fewest mentions of labels that already reached K (ties: first in a
    seeded random order). A label for which no such sentence is left is given up. Unlike Algorithm 1, a dense corpus cannot fill the common labels
    first and lock the rare ones out.

    RETURNS (Tuple[List[int], Dict[str, int]]): Chosen indices in selection
        order and the mention counts per label.
    """
    wanted = set(labels)
    counts = {label: 0 for label in labels}
    order = list(range(len(docs)))
    rng.shuffle(order)
    doc_counts = {i: {lab: n for lab, n in _doc_labels(docs[i]).items() if lab in wanted} for i in order}
    chosen: List[int] = []
    taken: Set[int] = set()
    given_up: Set[str] = set()
    while True:
        open_labels = [lab for lab in labels if counts[lab] < k and lab not in given_up]
        if not open_labels:
            break
        label = min(open_labels, key=lambda lab: (counts[lab], labels.index(lab)))
        fitting = [
            i
            for i in order
            if i not in taken
            and label in doc_counts[i]
            and all(counts[lab] + n <= 2 * k for lab, n in doc_counts[i].items())
        ]
        if not fitting:
            given_up.add(label)
            continue
        # spend little of the other labels' budgets: fewest mentions of filled labels
        best = min(fitting, key=lambda i: sum(n for lab, n in doc_counts[i].items() if counts[lab] >= k))
        for lab, n in doc_counts[best].items():
            counts[lab] += n
        chosen.append(best)
        taken.add(best)
    return chosen, counts


SAMPLING_STRATEGIES = ("greedy", "balanced")


def _warn_short(counts: Dict[str, int], k: int, n_docs: int, context: str) -> None:
    short = {label: n for label, n in counts.items() if n < k}
    if short:
        detail = ", ".join(f"'{label}': {n}" for label, n in short.items())
        warnings.warn(
            f"{context}: ran out of sentences before every label reached k={k} mentions "
            f"({detail}); returning {n_docs} sentences. Fix: use a larger corpus, a "
            f"smaller k or fewer labels.",
            FewShotWarning,
            stacklevel=3,
        )


def restrict_labels(doc: Doc, labels: Optional[Iterable[str]]) -> Doc:
    """Copy a Doc, keeping only entities with the given labels; the others
    become "O".

    doc (Doc): The Doc (not modified).
    labels (Optional[Iterable[str]]): Labels to keep; None keeps all.
    RETURNS (Doc): The copy.
    """
    copy = doc.copy()
    if labels is None:
        return copy
    keep = set(labels)
    ents = list(copy.ents)
    copy.set_ents(
        [ent for ent in ents if ent.label_ in keep],
        outside=[ent for ent in ents if ent.label_ not in keep],
        default="unmodified",
    )
    return copy


def greedy_k_shot(
    docs: Sequence[Doc],
    k: int,
    *,
    labels: Optional[Sequence[str]] = None,
    seed: int = 0,
    strategy: str = "greedy",
) -> List[Doc]:
    """Greedy K~2K-shot sampling (Few-NERD, Ding et al. 2021, Algorithm 1):
    visit sentences in a seeded random order and add one if no label then
    exceeds 2K mentions; stop when every label has at least K. Warns with
    FewShotWarning if the data runs out first.

    docs (Sequence[Doc]): The corpus (not modified).
    k (int): Minimum mentions per label.
    labels (Optional[Sequence[str]]): The label set; entities of other labels
        become "O" in the result. None uses every label found in `docs`.
    seed (int): Seed of the sentence order.
    strategy (str): "greedy" is Algorithm 1 as published; "balanced" serves the
        least-filled label first, which reaches K for every label far more often on
        dense corpora where each sentence holds several entities (CrossNER).
    RETURNS (List[Doc]): Copies of the chosen sentences, in corpus order.
    """
    _check_positive(k=k)
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"Unknown sampling strategy {strategy!r}. Use one of {SAMPLING_STRATEGIES}.")
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of labels, got the string {labels!r}. Fix: pass [{labels!r}].")
    label_list = list(dict.fromkeys(labels)) if labels is not None else list(label_counts(docs))
    if not label_list:
        raise ValueError("greedy_k_shot: no entity labels to sample. Fix: pass labels or Docs with entities.")
    sample = _greedy_indices if strategy == "greedy" else _balanced_indices
    chosen, counts = sample(docs, k, label_list, random.Random(seed))
    _warn_short(counts, k, len(chosen), f"greedy_k_shot ({strategy})")
    return [restrict_labels(docs[i], labels) for i in sorted(chosen)]


def sample_episodes(
    docs: Sequence[Doc], n_way: int, k_shot: int, n_query: int, n_episodes: int, *, seed: int = 0
) -> List[Episode]:
    """Sample N-way K~2K-shot episodes: N random types per episode, a greedy
    support set and a disjoint greedy query set (n_query~2n_query mentions
    per type); entities of other types become "O".

    docs (Sequence[Doc]): The corpus (not modified).
    n_way (int): Types per episode.
    k_shot (int): Minimum support mentions per type.
    n_query (int): Minimum query mentions per type.
    n_episodes (int): Number of episodes.
    seed (int): Seed of the type choice and sentence orders.
    RETURNS (List[Episode]): The episodes; types are sorted.
    """
    _check_positive(n_way=n_way, k_shot=k_shot, n_query=n_query, n_episodes=n_episodes)
    all_labels = list(label_counts(docs))
    if n_way > len(all_labels):
        raise ValueError(
            f"n_way={n_way} but the corpus has only {len(all_labels)} entity types "
            f"({all_labels}). Fix: use n_way <= {len(all_labels)}."
        )
    rng = random.Random(seed)
    episodes = []
    for number in range(n_episodes):
        types = sorted(rng.sample(all_labels, n_way))
        support, support_counts = _greedy_indices(docs, k_shot, types, rng)
        _warn_short(support_counts, k_shot, len(support), f"sample_episodes: episode {number} support")
        query, query_counts = _greedy_indices(docs, n_query, types, rng, skip=set(support))
        _warn_short(query_counts, n_query, len(query), f"sample_episodes: episode {number} query")
        episodes.append(
            Episode(
                support=[restrict_labels(docs[i], types) for i in sorted(support)],
                query=[restrict_labels(docs[i], types) for i in sorted(query)],
                types=types,
            )
        )
    return episodes
