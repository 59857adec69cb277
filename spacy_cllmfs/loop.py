"""A small in-process training loop for few-shot adaptation.

`spacy train` is the way to train a pipeline from corpus files. `fit` does the
same kind of updates on examples held in memory, without saving, for episode
evaluation and benchmarks that adapt one loaded base model many times.
`fit_select` adds what `spacy train` does with a dev set (keep the best
model, like model-best) and then calibrates each `cllmfs_ner` on it.
"""
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import minibatch
from thinc.api import Adam, warmup_linear
from tqdm import tqdm

from .memory import release_memory
from .seeding import seeded_torch


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
    on_step: Optional[Callable[[int], None]] = None,
) -> List[float]:
    """Update the trainable components of `nlp` for `steps` batches of `examples`.

    Examples are shuffled (seeded) once per pass over the data, and torch's
    generators (dropout) are seeded with `seed` while it trains, so that the result
    does not depend on what ran before in the process. The learn rate warms up
    linearly for `warmup_steps`, then decays linearly to 0.
    on_step (Optional[Callable[[int], None]]): Called with the step number (from 1)
        after each step.

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
    with seeded_torch(seed):  # dropout draws on the seed alone, not on what ran before
        while len(history) < steps:
            order = list(examples)
            rng.shuffle(order)
            for batch in minibatch(order, size=batch_size):
                losses = nlp.update(list(batch), sgd=optimizer)
                optimizer.step_schedules()
                history.append(sum(losses.values()))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.3f}")
                if on_step is not None:
                    on_step(len(history))
                if len(history) == steps:
                    break
    bar.close()
    del optimizer  # its moments go before the freed heap is handed back
    release_memory()
    return history


@dataclass
class Selection:
    """What `fit_select` did.

    losses (List[float]): The summed loss of each step.
    dev_scores (Dict[int, float]): The dev score at each evaluated step.
    best_step (int): The step whose adapters were kept.
    calibration (Dict[str, Dict[str, Any]]): Per `cllmfs_ner` component, its
        `Calibration` as a dict (empty without calibration).
    """

    losses: List[float]
    dev_scores: Dict[int, float] = field(default_factory=dict)
    best_step: int = 0
    calibration: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def fit_select(
    nlp: Language,
    examples: Sequence[Example],
    dev: Sequence[Example],
    *,
    steps: int,
    evaluations: int = 2,
    calibrate: bool = True,
    score: str = "ents_f",
    **fit_args: Any,
) -> Selection:
    """`fit`, scoring `dev` at `evaluations` evenly spaced steps (the last one
    included) and keeping the adapters of the best (ties: the later step), then
    calibrating every `cllmfs_ner` component's `open_bias` on `dev` (kept only if the
    dev entity F1 does not drop).

    dev (Sequence[Example]): A small gold dev set (its predicted side is ignored).
    evaluations (int): How many times to score `dev` during training (>= 1).
    calibrate (bool): Calibrate `open_bias` on `dev` after selection.
    score (str): The score to maximise (a key of `nlp.evaluate`'s result).
    fit_args: Passed on to `fit` (batch_size, learn_rate, warmup_steps, seed, ...).
    RETURNS (Selection): Losses, dev scores, the chosen step and the calibrations.
    """
    from .component import CLLMFSNer

    if evaluations < 1:
        raise ValueError(f"fit_select: evaluations must be >= 1, got {evaluations}.")
    if not dev:
        raise ValueError("fit_select: no dev examples. Fix: pass a small gold dev set, or use fit().")
    dev = as_examples(nlp, [example.reference for example in dev])
    pipes = [pipe for _, pipe in nlp.pipeline if isinstance(pipe, CLLMFSNer)]
    at = evaluation_steps(steps, evaluations)
    selection = Selection(losses=[])
    kept: List[Any] = []

    def evaluate(step: int) -> None:
        if step not in at:
            return
        release_memory()  # decoding the dev set must not stack on the heap training left behind
        value = nlp.evaluate(dev).get(score) or 0.0
        selection.dev_scores[step] = value
        if not kept or value >= selection.dev_scores[selection.best_step]:
            selection.best_step = step
            kept[:] = [pipe.model.adapter_state() for pipe in pipes]

    selection.losses = fit(nlp, examples, steps=steps, on_step=evaluate, **fit_args)
    if selection.best_step != len(selection.losses):
        for pipe, state in zip(pipes, kept):
            pipe.restore_adapter(state)
    if calibrate:
        # with one component, the best dev score is its F1 with the current offset
        known = selection.dev_scores[selection.best_step] if len(pipes) == 1 and score == "ents_f" else None
        selection.calibration = {pipe.name: pipe.calibrate(dev, ents_f_before=known).to_dict() for pipe in pipes}
    return selection


def evaluation_steps(steps: int, evaluations: int) -> Set[int]:
    """RETURNS (Set[int]): `evaluations` evenly spaced steps of `steps`, the last included."""
    return {math.ceil(steps * i / evaluations) for i in range(1, evaluations + 1)}


def unannotated(owner: Any, doc: Doc) -> Doc:
    """owner (Any): What holds the vocab to use: a Language or a pipeline component.
    RETURNS (Doc): A Doc with the same tokens as `doc` and no annotation.
    """
    return Doc(owner.vocab, words=[t.text for t in doc], spaces=[bool(t.whitespace_) for t in doc])


def as_examples(nlp: Language, docs: Iterable[Doc]) -> List[Example]:
    """Gold Docs -> Examples whose predicted side has the same tokens and no entities."""
    return [Example(unannotated(nlp, doc), doc) for doc in docs]
