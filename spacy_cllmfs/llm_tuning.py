"""Fine-tune the LoRA adapter of a spacy-llm `llm` component on its own prompts.

The `llm` component asks one question per sentence for all labels at once
(e.g. `spacy.NER.v3`: the label definitions, few-shot examples, then the
sentence). `tune_llm` trains the LoRA adapter of its model
(`spacy_cllmfs.SpacyLLMModel.v1`) to give the gold answer to exactly the prompt
the task renders, so that what is learned is what is used at inference:

    nlp = spacy.load("...")  # an `llm` component: spacy.NER.v3 + SpacyLLMModel.v1
    report = tune_llm(nlp, train_examples, dev=dev_examples)
    nlp.to_disk("tuned")  # the adapter is saved with the pipeline

or `python -m spacy_cllmfs tune-llm PIPELINE_OR_CONFIG train.spacy tuned --dev dev.spacy`.

A training sentence that is also one of the task's few-shot examples is asked
without it (leave one out), so the adapter cannot learn to copy the answer from
the prompt; the order of the examples shown is shuffled each epoch. The gold
answer is written as the task writes an example's answer (for chain-of-thought
span tasks such as `spacy.NER.v3`: `1. span | True | label | reason` lines).

`tune_llm_general` first trains the adapter on a general NER mix (other corpora,
each sentence asked by a task of its own corpus's labels and examples; on
`tune_llm_mixed`, which trains on several pipelines' prompts at once), a general
adapter to start the few-shot `tune_llm` from.
"""
import contextlib
import logging
import math
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from .batching import common_prefix_length
from .labels import check_definition_style
from .losses import ContrastiveTargets
from .loop import evaluation_steps
from .memory import release_memory
from .mixing import mix_picks
from .prompts import Prompt
from .sampling import greedy_k_shot, label_counts
from .seeding import seeded_torch
from .spacy_llm import MODEL_NAME, SpacyLLMModel, ner_v3_pipeline
from .training import (
    TrainingItem,
    TrainingSettings,
    accumulate,
    contrastive_checks,
    contrastive_layer_index,
    contrastive_targets,
)

logger = logging.getLogger("spacy_cllmfs.llm_tuning")


@dataclass
class TuningSettings:
    """How `tune_llm` trains.

    epochs (int): Passes over the training examples.
    batch_size (int): Examples per optimizer step.
    learn_rate (float): Peak AdamW learn rate (linear warm-up, then linear decay to 0).
    warmup_steps (int): Steps of linear warm-up.
    grad_clip (float): Gradient norm clipping (0 turns it off).
    leave_one_out (bool): Ask a training sentence without itself among the task's
        few-shot examples.
    shuffle_examples (bool): Show the few-shot examples in a new order each epoch.
    examples_shown (Optional[int]): Show each training prompt at most this many of
        the few-shot examples, a new random subset each time (None: all of them).
        Shorter prompts train faster; inference still shows all of them.
    prompt_gradients (bool): Backpropagate through the whole prompt. False computes
        all that precedes the sentence (instructions, label definitions, examples)
        without gradients, so that only the sentence and the answer are trained
        through: several times cheaper with long prompts, but a different gradient.
    micro_batch_size (int): Prompts per forward/backward pass.
    shared_step_examples (bool): Ask the sentences of one step (of one task) with the
        same few-shot examples in the same order, all of the step's own sentences left
        out (`leave_one_out`), so that without `prompt_gradients` the part of the prompt
        before the sentence is computed once per step, not once per sentence (needs
        `micro_batch_size >= batch_size`). False: each prompt draws its own examples.
    contrastive_weight (float): Lambda of CLLMFS's boundary contrastive loss, added to
        the answer loss (0 turns it off): per label with entities in the sentence, the
        hidden state of the label's first mention in the prompt (its label list) is the
        anchor, the first and last tokens of its entities in the sentence the positives,
        their neighbours (and other tokens of the sentence) the negatives.
    contrastive_layer (Optional[int]): Hidden layer of the contrastive loss (1..n_layers,
        negative counts from the end); None picks about 3/4 of the depth.
    contrastive_negatives (str): Which negatives come first: "boundary" (the tokens next
        to the label's entities) or "other_types" (the first and last tokens of the
        sentence's entities of other labels).
    seed (int): Seed for the order of examples and few-shot examples, and for
        torch (LoRA's initialisation and dropout) while the stage trains.
    """

    epochs: int = 4
    batch_size: int = 2
    learn_rate: float = 3e-4
    warmup_steps: int = 2
    grad_clip: float = 1.0
    leave_one_out: bool = True
    shuffle_examples: bool = True
    examples_shown: Optional[int] = None
    prompt_gradients: bool = True
    micro_batch_size: int = 1
    shared_step_examples: bool = False
    contrastive_weight: float = 0.0
    contrastive_layer: Optional[int] = None
    contrastive_negatives: str = "boundary"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learn_rate > 0, "learn_rate must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.examples_shown is None or self.examples_shown >= 0, "examples_shown must be None or >= 0"),
            (not self.shared_step_examples or self.micro_batch_size >= self.batch_size,
             "shared_step_examples computes a step's shared prompt once only if the step is one micro-batch: "
             f"set micro_batch_size >= batch_size ({self.batch_size}), or shared_step_examples = False"),
            *contrastive_checks(self.contrastive_weight, self.contrastive_layer, self.contrastive_negatives),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"tune_llm settings: {message}.")


@dataclass
class TuningPair:
    """One training prompt (as the task renders it) and its gold answer text.

    sentence_at (int): Where the sentence asked about starts in the prompt (-1: not found).
    words (List[Tuple[int, int]]): The characters of the sentence's tokens in the prompt.
    entities (List[Tuple[str, int, int]]): The gold entities of the task's labels: label
        (as the prompt writes it), first token, end token (indices into `words`).
    mentions (Dict[str, Tuple[int, int]]): The characters of each entity label's first
        mention in the prompt (its label list).
    """

    prompt: str
    answer: str
    sentence_at: int = -1
    words: List[Tuple[int, int]] = field(default_factory=list)
    entities: List[Tuple[str, int, int]] = field(default_factory=list)
    mentions: Dict[str, Tuple[int, int]] = field(default_factory=dict)


@dataclass
class TuningReport:
    """What `tune_llm` did.

    losses (List[float]): The mean answer-token loss of each step.
    dev_scores (Dict[int, float]): The dev score at each evaluated step (0: before training).
    best_step (int): The step whose adapter was kept.
    sources (Dict[str, int]): Training sentences per corpus (`tune_llm_general`).
    """

    losses: List[float] = field(default_factory=list)
    dev_scores: Dict[int, float] = field(default_factory=dict)
    best_step: int = 0
    sources: Dict[str, int] = field(default_factory=dict)


def answer_text(prompt_example: Any) -> str:
    """The answer a chain-of-thought span task expects for one of its few-shot
    examples: one numbered `span | is_entity | label | reason` line per span, as
    spacy-llm's ner.v3 and spancat.v3 templates write them.

    prompt_example (Any): A spacy-llm `SpanCoTExample` (e.g. `NERCoTExample`).
    RETURNS (str): The answer text ("" for no spans).
    """
    spans = getattr(prompt_example, "spans", None)
    if spans is None or not all(hasattr(span, "to_str") for span in spans):
        raise TypeError(
            f"tune_llm writes the answers of chain-of-thought span tasks (spacy.NER.v3, "
            f"spacy.SpanCat.v3), whose examples list `spans`; got {type(prompt_example).__name__}. "
            "Fix: use one of these tasks."
        )
    return "\n".join(f"{i}. {span.to_str()}" for i, span in enumerate(spans, 1))


def tuning_pairs(
    task: Any, examples: Sequence[Example], rng: random.Random, settings: TuningSettings
) -> List[TuningPair]:
    """The training prompts of a spacy-llm span task, with their gold answers.

    task (Any): The `llm` component's task (spacy.NER.v3 or spacy.SpanCat.v3).
    examples (Sequence[Example]): Gold examples (`reference` holds the entities).
    rng (random.Random): Picks (`examples_shown`) and orders (`shuffle_examples`) the
        few-shot examples shown: for each example, or with `shared_step_examples`, once
        for all of them (none of their sentences shown).
    RETURNS (List[TuningPair]): One pair per example, in order.
    """
    shown_all = list(getattr(task, "prompt_examples", None) or [])
    written = {str(label).lower(): str(label) for label in getattr(task, "labels", ())}
    wanted = set(written)
    step_shown = (_examples_shown(shown_all, [example.reference.text for example in examples], rng, settings)
                  if settings.shared_step_examples else None)
    pairs: List[TuningPair] = []
    for example in examples:
        gold = task.prompt_example_type.generate(example, task)
        if gold is None:
            raise ValueError(
                f"The task could not turn the training sentence {example.reference.text[:60]!r} into "
                "an example. Fix: check that the gold docs carry the task's annotation."
            )
        if wanted and hasattr(gold, "spans"):
            gold.spans = [span for span in gold.spans if str(span.label).lower() in wanted]
        if step_shown is not None:
            shown = step_shown
        else:
            shown = _examples_shown(shown_all, [example.reference.text], rng, settings)
        with _prompt_examples(task, shown):
            prompts, _ = next(iter(task.generate_prompts([example.predicted])))
        prompts = list(prompts)
        if len(prompts) != 1:
            raise ValueError(f"The task split a training sentence into {len(prompts)} prompts; expected one.")
        prompt = prompts[0]
        at = prompt.rfind(example.reference.text)
        pair = TuningPair(prompt=prompt, answer=answer_text(gold), sentence_at=at)
        if at >= 0:
            _locate_entities(pair, example.reference, written)
        pairs.append(pair)
    return pairs


def _locate_entities(pair: TuningPair, doc: Doc, written: Dict[str, str]) -> None:
    """Fill in where the sentence's tokens, its gold entities (of the labels `written`,
    lower-cased name -> as the prompt writes it) and their labels' first mentions are."""
    pair.words = [(pair.sentence_at + token.idx, pair.sentence_at + token.idx + len(token)) for token in doc]
    for ent in doc.ents:
        label = written.get(ent.label_.lower()) if written else ent.label_
        if label is None:
            continue
        pair.entities.append((label, ent.start, ent.end))
        if label not in pair.mentions:
            found = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", pair.prompt)
            if found is not None:
                pair.mentions[label] = found.span()


def _examples_shown(
    shown_all: Sequence[Any], asked: Sequence[str], rng: random.Random, settings: TuningSettings
) -> List[Any]:
    """The few-shot examples a prompt shows, in order: all of the task's but those
    `asked` (with `leave_one_out`), an `examples_shown` subset, shuffled."""
    shown = list(shown_all)
    if settings.leave_one_out:
        shown = [shot for shot in shown if getattr(shot, "text", None) not in asked]
    if settings.examples_shown is not None and settings.examples_shown < len(shown):
        picked = set(rng.sample(range(len(shown)), settings.examples_shown))
        shown = [shot for i, shot in enumerate(shown) if i in picked]
    if settings.shuffle_examples:
        rng.shuffle(shown)
    return shown


@contextlib.contextmanager
def _prompt_examples(task: Any, shown: List[Any]) -> Iterator[None]:
    """Let the task render its prompts with the few-shot examples `shown`."""
    if not hasattr(task, "_prompt_examples"):
        raise TypeError(
            f"tune_llm needs a spacy-llm built-in task (spacy.NER.v3), got {type(task).__name__}, "
            "whose few-shot examples it cannot set. Fix: use spacy.NER.v3 or spacy.SpanCat.v3."
        )
    kept = task._prompt_examples
    task._prompt_examples = shown
    try:
        yield
    finally:
        task._prompt_examples = kept


def tuning_items(
    model: SpacyLLMModel,
    pairs: Sequence[TuningPair],
    settings: Optional[TuningSettings] = None,
    rng: Optional[random.Random] = None,
) -> List[TrainingItem]:
    """Token ids of the pairs, as the model reads them (its chat template included);
    the answer ends with the model's end-of-answer token. A prompt's shared part
    (`shared_len`) is all that precedes the sentence, and at least its last token
    is left out of it. With a `contrastive_weight` in `settings`, each item carries
    one group of contrastive targets per label with entities in its sentence
    (`rng` samples their other negatives)."""
    tokenizer = model.lm.tokenizer
    contrastive = settings if settings is not None and settings.contrastive_weight > 0 else None
    items: List[TrainingItem] = []
    for pair in pairs:
        ids, offsets = model.encode_offsets(pair.prompt) if contrastive else (model.encode(pair.prompt), [])
        answer = list(tokenizer(pair.answer, add_special_tokens=False)["input_ids"]) + [model.end_id]
        shared = len(ids) - 1
        if pair.sentence_at > 0:
            head = model.encode(pair.prompt[: pair.sentence_at])
            shared = max(1, min(shared, common_prefix_length(ids, head)))
        prompt = Prompt(ids=ids, label="", shared_len=shared, word_spans=[], label_positions=[])
        targets = pair_targets(pair, prompt, offsets, contrastive, rng or random.Random(0)) if contrastive else []
        items.append(TrainingItem(prompt, answer, targets))
    return items


def pair_targets(
    pair: TuningPair,
    prompt: Prompt,
    offsets: Sequence[Optional[Tuple[int, int]]],
    settings: TuningSettings,
    rng: random.Random,
) -> List[ContrastiveTargets]:
    """The contrastive targets of one prompt of all labels: for each label with gold
    entities in the sentence, the tokens of the label's first mention (anchor), of
    its entities' first and last tokens (positives), and of their neighbours and the
    rest of the sentence (negatives, `training.contrastive_targets`).

    offsets (Sequence[Optional[Tuple[int, int]]]): The characters of each token of
        `prompt.ids` in the prompt text (`SpacyLLMModel.encode_offsets`).
    RETURNS (List[ContrastiveTargets]): One group per label (none without entities).
    """
    def tokens_of(start: int, end: int) -> List[int]:
        return [i for i, span in enumerate(offsets) if span is not None and span[0] < end and span[1] > start]

    sentence = Prompt(ids=prompt.ids, label="", shared_len=prompt.shared_len,
                      word_spans=[_token_range(tokens_of(*word)) for word in pair.words], label_positions=[])
    groups: List[ContrastiveTargets] = []
    for label in dict.fromkeys(label for label, _, _ in pair.entities):
        if label not in pair.mentions:
            continue
        spans = [(start, end) for other, start, end in pair.entities if other == label]
        others = ([(start, end) for other, start, end in pair.entities if other != label]
                  if settings.contrastive_negatives == "other_types" else [])
        sentence.label_positions = tokens_of(*pair.mentions[label])
        found = contrastive_targets(sentence, spans, TrainingSettings.max_negatives, rng, others)
        if found is not None:
            groups.append(found)
    return groups


def _token_range(positions: List[int]) -> Tuple[int, int]:
    """RETURNS (Tuple[int, int]): The [start, end) of token positions (empty: (0, 0))."""
    return (positions[0], positions[-1] + 1) if positions else (0, 0)


def llm_model_of(nlp: Language, component: str) -> Tuple[Any, SpacyLLMModel]:
    """RETURNS (Tuple[Any, SpacyLLMModel]): The task and model of an `llm` component."""
    if component not in nlp.pipe_names:
        raise ValueError(
            f"tune_llm: the pipeline has no component '{component}' (it has {nlp.pipe_names}). "
            "Fix: pass the name of the spacy-llm component as `component`."
        )
    pipe = nlp.get_pipe(component)
    task, model = getattr(pipe, "task", None), getattr(pipe, "_model", None)
    if task is None or not isinstance(model, SpacyLLMModel):
        raise TypeError(
            f"tune_llm trains the adapter of an `llm` component served by {MODEL_NAME}; "
            f"'{component}' has model {type(model).__name__}. Fix: set "
            f'`[components.{component}.model] @llm_models = "{MODEL_NAME}"`.'
        )
    return task, model


def tune_llm(
    nlp: Language,
    examples: Sequence[Example],
    *,
    component: str = "llm",
    settings: Optional[TuningSettings] = None,
    dev: Sequence[Example] = (),
    evaluations: int = 2,
    score: str = "ents_f",
) -> TuningReport:
    """Train the LoRA adapter of an `llm` component (spacy.NER.v3 served by
    `spacy_cllmfs.SpacyLLMModel.v1`) to answer its task's prompts with the gold
    answers of `examples`. The adapter configured on the model, if any, is trained
    further; otherwise a fresh one (the model's LoRA settings) is attached.

    examples (Sequence[Example]): Gold training examples.
    component (str): The name of the `llm` component.
    settings (Optional[TuningSettings]): How to train (None: the defaults).
    dev (Sequence[Example]): A small gold dev set: scored before training and at
        `evaluations` evenly spaced steps; the best adapter is kept (ties: the later).
    evaluations (int): How many times to score `dev` during training.
    score (str): The score to maximise (a key of `nlp.evaluate`'s result).
    RETURNS (TuningReport): The losses, dev scores and the step kept.
    """
    settings = settings or TuningSettings()
    if dev and evaluations < 1:
        raise ValueError(f"tune_llm: evaluations must be >= 1, got {evaluations}.")
    task, model = llm_model_of(nlp, component)
    stream = [(task, model, example) for example in examples]
    if not stream:
        raise ValueError("tune_llm: no training examples.")
    lm = model.lm
    at = evaluation_steps(_planned_steps(len(stream), settings), evaluations) if dev else set()
    report = TuningReport()
    kept: List[Any] = []

    def evaluate(step: int) -> None:
        release_memory()  # decoding the dev set must not stack on the heap training left behind
        value = nlp.evaluate(list(dev)).get(score) or 0.0
        report.dev_scores[step] = value
        logger.info("tune_llm: dev %s %.4f at step %d", score, value, step)
        if not kept or value >= report.dev_scores[report.best_step]:
            report.best_step = step
            kept[:] = [lm.adapter_state()]

    if dev:
        evaluate(0)
    report.losses = _train(stream, settings, lambda step: evaluate(step) if step in at else None)
    if dev and report.best_step != len(report.losses):
        lm.reset_adapter(kept[0])
    return report


def tune_llm_mixed(
    sources: Sequence[Tuple[Language, Sequence[Example]]],
    *,
    component: str = "llm",
    settings: Optional[TuningSettings] = None,
) -> TuningReport:
    """Train one LoRA adapter on the prompts of several `llm` pipelines at once, e.g.
    a general NER mix: one pipeline per corpus, each with that corpus's labels and
    few-shot examples, its training sentences asked by its own task. All pipelines
    must be served by the same base model (`SpacyLLMModel.v1` on one `HFCausalLM`),
    whose adapter is trained; the examples of all sources are shuffled together.
    Train a target pipeline on the same model from there with `tune_llm`.

    sources (Sequence[Tuple[Language, Sequence[Example]]]): Pipelines and the gold
        examples their task asks about.
    component (str): The name of the `llm` component in every pipeline.
    settings (Optional[TuningSettings]): How to train (None: the defaults).
    RETURNS (TuningReport): The losses (no dev scores: select on the target).
    """
    settings = settings or TuningSettings()
    stream = []
    lm = None
    for nlp, examples in sources:
        task, model = llm_model_of(nlp, component)
        if lm is not None and model.lm is not lm:
            raise ValueError(
                "tune_llm_mixed trains one adapter, but the pipelines are served by different models. "
                "Fix: build every pipeline's SpacyLLMModel.v1 on the same HFCausalLM instance."
            )
        lm = model.lm
        stream.extend((task, model, example) for example in examples)
    if not stream:
        raise ValueError("tune_llm_mixed: no training examples.")
    return TuningReport(losses=_train(stream, settings, lambda step: None))


@dataclass
class GeneralMix:
    """The general NER mix `tune_llm_general` trains on first.

    size (int): Sentences with entities in the mix, an equal share per corpus
        (`spacy_cllmfs.mixing.mix_picks`; the first corpus fills the rest).
    shots (int): K of each corpus's few-shot examples (balanced K-shot sample).
    seed (int): Seed of the mix and of the shots.
    """

    size: int = 250
    shots: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.shots < 1:
            raise ValueError(f"GeneralMix: size and shots must be >= 1, got {self.size} and {self.shots}.")


def tune_llm_general(
    model: SpacyLLMModel,
    corpora: Dict[str, Sequence[Doc]],
    *,
    mix: Optional[GeneralMix] = None,
    settings: Optional[TuningSettings] = None,
    definitions: str = "plain",
) -> TuningReport:
    """Train the adapter of `model` on a general NER mix, to start the few-shot
    `tune_llm` from: each sentence is asked by a `spacy.NER.v3` task of its own
    corpus (that corpus's labels, K-shot examples drawn from it), so a sentence never
    teaches "no entity" for a label its corpus does not annotate. Leave the target
    domain's data out, so that nothing of it leaks. The corpora's Docs are not changed.

    model (SpacyLLMModel): The model (e.g. of the target `llm` component, see
        `llm_model_of`), whose adapter is trained (a fresh one if it has none).
    corpora (Dict[str, Sequence[Doc]]): Gold corpora by name (e.g. "conll2003").
    mix (Optional[GeneralMix]): The size of the mix and the shots (None: defaults).
    settings (Optional[TuningSettings]): How to train (None: the defaults;
        `examples_shown` keeps the prompts short).
    definitions (str): How each corpus's label descriptions are written (see
        `spacy_llm.ner_v3_task`); use the target pipeline's.
    RETURNS (TuningReport): The losses and the sentences taken per corpus.
    """
    check_definition_style(definitions)
    mix = mix or GeneralMix()
    names = list(corpora)
    if not names:
        raise ValueError("tune_llm_general: no corpora. Fix: pass at least one gold corpus of other labels.")
    chosen = {id(doc) for _, doc in mix_picks([corpora[name] for name in names], mix.size, fill=0, seed=mix.seed)}
    sources: List[Tuple[Language, List[Example]]] = []
    taken: Dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="cllmfs-general-") as work:
        for name in names:
            docs = list(corpora[name])
            labels = sorted(label_counts(docs))
            shots = greedy_k_shot(docs, mix.shots, labels=labels, seed=mix.seed, strategy="balanced")
            nlp, _ = ner_v3_pipeline(model, labels, shots, Path(work) / f"examples-{len(sources)}.json", definitions)
            picked = [Example(nlp.make_doc(doc.text), doc) for doc in docs if id(doc) in chosen]
            sources.append((nlp, picked))
            taken[name] = len(picked)
    report = tune_llm_mixed(sources, settings=settings)
    report.sources = taken
    return report


def _planned_steps(items: int, settings: TuningSettings) -> int:
    """How many optimizer steps `_train` takes on a stream of `items` examples."""
    return math.ceil(items / settings.batch_size) * settings.epochs


def step_items(
    step: Sequence[Tuple[Any, SpacyLLMModel, Example]],
    rng: random.Random,
    settings: TuningSettings,
    negatives: Optional[random.Random] = None,
) -> List[TrainingItem]:
    """The training items of one step of (task, model, example) triples: each example
    asked by its own task, one prompt at a time, or with `shared_step_examples`, the
    examples of each task together, with one shared prefix.

    rng (random.Random): Picks and orders the few-shot examples shown.
    negatives (Optional[random.Random]): Samples the contrastive negatives (its own
        generator, so that the examples shown do not depend on `contrastive_weight`).
    RETURNS (List[TrainingItem]): The step's token ids, answers and shared lengths.
    """
    def items(task: Any, model: SpacyLLMModel, examples: List[Example]) -> List[TrainingItem]:
        return tuning_items(model, tuning_pairs(task, examples, rng, settings), settings, negatives)

    if not settings.shared_step_examples:
        return [item for task, model, example in step for item in items(task, model, [example])]
    by_task: Dict[int, Tuple[Any, SpacyLLMModel, List[Example]]] = {}
    for task, model, example in step:
        by_task.setdefault(id(task), (task, model, []))[2].append(example)
    return [item for task, model, examples in by_task.values() for item in _one_prefix(items(task, model, examples))]


def _one_prefix(items: List[TrainingItem]) -> List[TrainingItem]:
    """Cut the shared parts of prompts that show the same examples to their common
    length (a sentence's first token may merge with what precedes it), so that the
    training step computes them as one prefix."""
    if len(items) < 2:
        return items
    first = items[0].prompt.ids
    shared = min(min(item.prompt.shared_len, common_prefix_length(first, item.prompt.ids)) for item in items)
    for item in items:
        item.prompt.shared_len = max(1, shared)
    return items


def _train(
    stream: Sequence[Tuple[Any, SpacyLLMModel, Example]],
    settings: TuningSettings,
    after_step: Callable[[int], None],
) -> List[float]:
    """Train the adapter of the stream's model (shared by all its items) on the
    gold answers of (task, model, example) triples, in a new random order each
    epoch; `after_step` is called with each step's number (from 1).
    RETURNS (List[float]): The mean answer-token loss of each step.
    """
    with seeded_torch(settings.seed):  # LoRA's init and dropout: the seed's alone
        return _train_steps(stream, settings, after_step)


def _train_steps(
    stream: Sequence[Tuple[Any, SpacyLLMModel, Example]],
    settings: TuningSettings,
    after_step: Callable[[int], None],
) -> List[float]:
    """The steps of `_train`, with torch's generators seeded."""
    lm = stream[0][1].lm
    rng, negatives = random.Random(settings.seed), random.Random(settings.seed)
    steps = _planned_steps(len(stream), settings)
    lm.ensure_lora()
    params = lm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=settings.learn_rate, weight_decay=0.0)
    warmup = settings.warmup_steps

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    fit = TrainingSettings(
        contrastive_weight=settings.contrastive_weight,
        contrastive_layer=settings.contrastive_layer,
        contrastive_negatives=settings.contrastive_negatives,
        shared_prefix=not settings.prompt_gradients,
        prefix_gradients=settings.prompt_gradients,
        micro_batch_size=settings.micro_batch_size,
        mixed_precision=True,
    )
    layer = contrastive_layer_index(lm.model, fit)
    losses: List[float] = []
    for _ in range(settings.epochs):
        order = list(stream)
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            items = step_items(order[start : start + settings.batch_size], rng, settings, negatives)
            lm.ensure_lora()
            torch_model = lm.model.train()
            try:
                totals = accumulate(torch_model, items, fit, layer, lm.pad_id, lm.device, train=True)
            finally:
                torch_model.eval()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(totals["loss"])
            contrastive = f" (contrastive {totals['contrastive']:.4f})" if "contrastive" in totals else ""
            logger.info("tune_llm: step %d/%d loss %.4f%s", len(losses), steps, totals["loss"], contrastive)
            after_step(len(losses))
    del optimizer, schedule  # the moments go before the freed heap is handed back
    release_memory()
    return losses


__all__ = ("GeneralMix", "TuningPair", "TuningReport", "TuningSettings", "answer_text", "pair_targets", "step_items",
           "tune_llm", "tune_llm_general", "tune_llm_mixed", "tuning_items", "tuning_pairs")
