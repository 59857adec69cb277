"""A general NER training mix from several corpora, each Doc declaring its corpus's
labels, to train a general adapter before the few-shot fine-tune."""
import random
from typing import List, Sequence, Tuple

from spacy.tokens import Doc

from .labels import set_annotated_labels
from .sampling import label_counts


def mix_picks(corpora: Sequence[Sequence[Doc]], size: int, *, fill: int = 0, seed: int = 0) -> List[Tuple[int, Doc]]:
    """Pick the sentences of a mix without changing them: `size` sentences with
    entities, an equal share of `size` per corpus (up to what it has), the corpus at
    index `fill` (e.g. CoNLL-2003, the largest) filling the rest, in a fixed random order.

    corpora (Sequence[Sequence[Doc]]): The corpora (e.g. their train splits).
    size (int): How many sentences the mix holds at most.
    fill (int): The index of the corpus that fills what the others lack.
    seed (int): Seed of the shuffles.
    RETURNS (List[Tuple[int, Doc]]): The mix, shuffled: each Doc with its corpus's index.
    """
    if size < 1:
        raise ValueError(f"Mix size {size}: nothing to train on. Fix: pass a size of at least 1.")
    if not 0 <= fill < len(corpora):
        raise ValueError(
            f"Fill corpus index {fill} with {len(corpora)} corpora. Fix: pass an index from 0 to {len(corpora) - 1}."
        )
    share = size // len(corpora)
    mix: List[Tuple[int, Doc]] = []
    for index in [i for i in range(len(corpora)) if i != fill] + [fill]:
        docs = [doc for doc in corpora[index] if len(doc.ents)]
        random.Random(seed).shuffle(docs)
        taken = docs[: size - len(mix)] if index == fill else docs[:share]
        mix.extend((index, doc) for doc in taken)
    random.Random(seed).shuffle(mix)
    return mix


def mix_corpora(corpora: Sequence[Sequence[Doc]], size: int, *, fill: int = 0, seed: int = 0) -> List[Doc]:
    """Mix `size` sentences with entities from several corpora (`mix_picks`). Each Doc
    declares its own corpus's labels (`set_annotated_labels`), so a music sentence
    never teaches "no politician here". The picked input Docs are annotated in place.

    corpora (Sequence[Sequence[Doc]]): The corpora (e.g. their train splits).
    size (int): How many sentences the mix holds at most.
    fill (int): The index of the corpus that fills what the others lack.
    seed (int): Seed of the shuffles.
    RETURNS (List[Doc]): The mix, shuffled.
    """
    picks = mix_picks(corpora, size, fill=fill, seed=seed)
    labels = {index: sorted(label_counts(corpora[index])) for index in {i for i, _ in picks}}
    for index, doc in picks:
        set_annotated_labels(doc, labels[index])
    return [doc for _, doc in picks]
