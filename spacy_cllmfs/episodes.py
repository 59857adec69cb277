"""Few-NERD-style episode evaluation: adapt on each support set, predict its query.

For every episode a fresh LoRA adapter (or a copy of a given starting
adapter, e.g. one trained on a source domain) is trained on the support set
with the episode's types as labels, then the query sentences are annotated.
Span counts are summed over all episodes before precision, recall and F1 are
computed (micro-averaged, exact start, end and type), as Few-NERD defines it.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Set, Tuple

from spacy.language import Language
from spacy.tokens import Doc
from tqdm import tqdm

from .adapters import AdapterState
from .component import CLLMFSNer
from .corpora import Episode
from .loop import as_examples, fit, unannotated


@dataclass
class SpanCounts:
    """True positives, false positives and false negatives of exact span matches."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, gold: Set[Tuple[int, int, str]], predicted: Set[Tuple[int, int, str]]) -> None:
        self.tp += len(gold & predicted)
        self.fp += len(predicted - gold)
        self.fn += len(gold - predicted)

    def scores(self) -> Dict[str, float]:
        """RETURNS (Dict[str, float]): precision, recall and f (0 where undefined)."""
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": p, "recall": r, "f": f}


def spans_of(doc: Doc) -> Set[Tuple[int, int, str]]:
    """RETURNS (Set[Tuple[int, int, str]]): (start, end, label) of each entity."""
    return {(ent.start, ent.end, ent.label_) for ent in doc.ents}


def evaluate_episodes(
    nlp: Language,
    episodes: Sequence[Episode],
    *,
    component: str = "cllmfs_ner",
    steps: int = 20,
    batch_size: int = 4,
    learn_rate: float = 3e-4,
    start_adapter: Optional[AdapterState] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, object]:
    """Adapt on each episode's support set and score its query set.

    nlp (Language): A pipeline with a `cllmfs_ner` component (its base model is
        loaded once and reused for every episode).
    episodes (Sequence[Episode]): The episodes.
    steps (int): Training steps per episode.
    start_adapter (Optional[AdapterState]): Adapter each episode starts from
        (None: a fresh LoRA adapter).
    RETURNS (Dict[str, object]): "precision", "recall", "f" (micro over episodes),
        "episodes", and the summed "tp", "fp", "fn".
    """
    ner = nlp.get_pipe(component)
    if not isinstance(ner, CLLMFSNer):
        raise ValueError(f"Component '{component}' is not a cllmfs_ner component.")
    counts = SpanCounts()
    for number, episode in enumerate(tqdm(episodes, desc="episodes", disable=not progress)):
        support = as_examples(nlp, episode.support)
        ner.model.reset_adapter(start_adapter)
        ner.initialize(lambda: support, nlp=nlp, labels=list(episode.types), label_descriptions={})
        fit(nlp, support, steps=steps, batch_size=batch_size, learn_rate=learn_rate, seed=seed + number)
        predicted = list(ner.pipe(unannotated(nlp, doc) for doc in episode.query))
        for gold, doc in zip(episode.query, predicted):
            counts.add(spans_of(gold), spans_of(doc))
    return {**counts.scores(), "episodes": len(episodes), **asdict(counts)}

