"""A small in-process training loop for few-shot adaptation.

`spacy train` is the way to train a pipeline from corpus files. `fit` does the
same kind of updates on examples held in memory, without evaluation or
saving, for episode evaluation and benchmarks that adapt one loaded base
model many times.
"""
import random
from typing import Iterable, List, Sequence

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import minibatch
from thinc.api import Adam, warmup_linear
from tqdm import tqdm


def fit(
    nlp: Language,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 4,
    learn_rate: float = 3e-4,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> List[float]:
    """Update the trainable components of `nlp` for `steps` batches of `examples`.

    Examples are shuffled (seeded) once per pass over the data. The learn rate
    warms up linearly for `warmup_steps`, then decays linearly to 0.

    RETURNS (List[float]): The summed loss of each step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"fit: steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    if not examples:
        raise ValueError("fit: no training examples.")
    schedule = warmup_linear(learn_rate, warmup_steps, steps)
    optimizer = Adam(learn_rate=schedule, L2=0.0, grad_clip=grad_clip, use_averages=False)
    rng = random.Random(seed)
    history: List[float] = []
    bar = tqdm(total=steps, desc="fit", disable=not progress, leave=False)
    while len(history) < steps:
        order = list(examples)
        rng.shuffle(order)
        for batch in minibatch(order, size=batch_size):
            losses = nlp.update(list(batch), sgd=optimizer)
            optimizer.step_schedules()
            history.append(sum(losses.values()))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
            if len(history) == steps:
                break
    bar.close()
    return history


def unannotated(nlp: Language, doc: Doc) -> Doc:
    """RETURNS (Doc): A Doc with the same tokens as `doc` and no annotation."""
    return Doc(nlp.vocab, words=[t.text for t in doc], spaces=[bool(t.whitespace_) for t in doc])


def as_examples(nlp: Language, docs: Iterable[Doc]) -> List[Example]:
    """Gold Docs -> Examples whose predicted side has the same tokens and no entities."""
    return [Example(unannotated(nlp, doc), doc) for doc in docs]
