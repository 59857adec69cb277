"""The `cllmfs_ner` component: a (LoRA-tuned) causal LM that sets `Doc.ents`.

The component wires the modules together and holds no prompt, decoding,
alignment or loss logic of its own:
docs -> windows -> prompts (one per window and label) -> batched constrained
decoding -> answers -> spans -> `Doc.ents`.
"""
import contextlib
import dataclasses
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import srsly
import torch
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc, Span, SpanGroup
from spacy.training import Example, validate_examples, validate_get_examples
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab
from thinc.api import Config

from .adapters import AdapterState
from .alignment import OVERLAP_STRATEGIES, Candidate, resolve_overlaps
from .calibration import Calibration, decision_margins, fit_open_bias
from .decoding import DecodingStats
from .demonstrations import Demonstrations
from .inference import DecodingSettings, WindowPrompts, doc_windows, find_candidates, make_prompts, window_budget
from .labels import LabelInfo, label_infos, validate_labels
from .loop import unannotated
from .models import HFCausalLM
from .negatives import LabelCooccurrence
from .prompts import PromptBuilder, PromptTemplate
from .seeding import seeded_torch
from .training import (
    LoRAOptimizer,
    TrainingItem,
    TrainingSettings,
    accumulate,
    contrastive_layer_index,
    enable_checkpointing,
    is_checkpointing,
    make_items,
)

logger = logging.getLogger("spacy_cllmfs")

DEFAULT_CONFIG_STR = """
[model]
@misc = "spacy_cllmfs.HFCausalLM.v1"
name = "embedded"
device = "auto"
dtype = "auto"
adapter = null

[model.lora]
@misc = "spacy_cllmfs.LoRA.v1"
r = 32
alpha = 16
dropout = 0.05
target_modules = "all-linear"

[prompt]
@misc = "spacy_cllmfs.prompt.v1"

[training]
@misc = "spacy_cllmfs.training.v2"
contrastive_weight = 0.1
fgm_epsilon = 0.0

[scorer]
@scorers = "spacy.ner_scorer.v1"
"""
DEFAULT_CONFIG = Config().from_str(DEFAULT_CONFIG_STR)
DEFAULT_DECODING = DecodingSettings()


def _decoding_setting(name: str) -> property:
    """A component attribute that reads, and sets (validated), one `DecodingSettings` field."""

    def set_value(self: "CLLMFSNer", value: Any) -> None:
        self.decoding = dataclasses.replace(self.decoding, **{name: value})

    return property(lambda self: getattr(self.decoding, name), set_value)


@Language.factory(
    "cllmfs_ner",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
    default_config={
        "model": DEFAULT_CONFIG["model"],
        "prompt": DEFAULT_CONFIG["prompt"],
        "labels": [],
        "label_descriptions": {},
        "label_names": {},
        "batch_size": DEFAULT_DECODING.batch_size,
        "max_new_tokens": DEFAULT_DECODING.max_new_tokens,
        "constrained": DEFAULT_DECODING.constrained,
        "ordered_spans": DEFAULT_DECODING.ordered_spans,
        "shared_prefix": DEFAULT_DECODING.shared_prefix,
        "max_batch_tokens": DEFAULT_DECODING.max_batch_tokens,
        "refill": DEFAULT_DECODING.refill,
        "open_bias": DEFAULT_DECODING.open_bias,
        "max_window_tokens": 256,
        "overwrite_ents": False,
        "overlap": "longest",
        "candidates_key": None,
        "training": DEFAULT_CONFIG["training"],
        "scorer": DEFAULT_CONFIG["scorer"],
    },
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_cllmfs_ner(
    nlp: Language,
    name: str,
    model: HFCausalLM,
    prompt: PromptTemplate,
    labels: List[str],
    label_descriptions: Dict[str, str],
    label_names: Dict[str, str],
    batch_size: int,
    max_new_tokens: int,
    constrained: bool,
    ordered_spans: bool,
    shared_prefix: bool,
    max_batch_tokens: int,
    refill: bool,
    open_bias: float,
    max_window_tokens: int,
    overwrite_ents: bool,
    overlap: str,
    candidates_key: Optional[str],
    training: TrainingSettings,
    scorer: Optional[Callable],
) -> "CLLMFSNer":
    """Construct a `cllmfs_ner` component (see `CLLMFSNer` for the settings)."""
    return CLLMFSNer(
        nlp.vocab,
        model,
        name,
        prompt=prompt,
        labels=labels,
        label_descriptions=label_descriptions,
        label_names=label_names,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        constrained=constrained,
        ordered_spans=ordered_spans,
        shared_prefix=shared_prefix,
        max_batch_tokens=max_batch_tokens,
        refill=refill,
        open_bias=open_bias,
        max_window_tokens=max_window_tokens,
        overwrite_ents=overwrite_ents,
        overlap=overlap,
        candidates_key=candidates_key,
        training=training,
        scorer=scorer,
    )


class CLLMFSNer(TrainablePipe):
    """Few-shot NER with a causal LM: one prompt per (sentence window, label).

    vocab (Vocab): The shared vocabulary.
    model (HFCausalLM): The causal LM and its LoRA adapter (loaded on first use).
    name (str): The component's name in the pipeline.
    prompt (PromptTemplate): The prompt text, shared by training and inference. With worked
        examples (`spacy_cllmfs.prompt.v3`), `initialize` chooses them from the training
        examples (`self.demonstrations`) and the pipeline saves them.
    labels (List[str]): Entity labels; may also come from `initialize`.
    label_descriptions (Dict[str, str]): Per-label descriptions for the prompt.
    label_names (Dict[str, str]): Per-label names for the prompt ("politicalparty" ->
        "political party" by default).
    batch_size (int): The most prompts in flight at once.
    max_new_tokens (int): Longest answer, in model tokens.
    constrained (bool): Only allow answers that copy spans of the input.
    ordered_spans (bool): With `constrained`, spans must come in sentence order.
    shared_prefix (bool): Compute the prompt ids that a window's labels share once per
        window (false: every prompt whole, in fixed batches).
    max_batch_tokens (int): The most prompt tokens prefilled in one forward pass.
    refill (bool): Let waiting prompts join the batch as others finish.
    open_bias (float): With `constrained`, added to log P(open a span) - log P(end)
        wherever an answer may do either; `calibrate` sets it from a dev set, and the
        calibrated value is saved with the pipeline (it wins over the config's).
    max_window_tokens (int): Longest sentence window in model tokens; longer documents
        are split at sentence boundaries (and overlong sentences between tokens).
    overwrite_ents (bool): Let predictions replace overlapping existing entities
        (otherwise existing entities are kept and overlapping predictions dropped).
    overlap (str): How overlapping predictions are resolved: "longest" or "score".
    candidates_key (Optional[str]): Keep every candidate span, with scores in
        `attrs["scores"]`, in `doc.spans[candidates_key]`.
    training (TrainingSettings): Loss and batching settings used by `update`.
    scorer (Optional[Callable]): The scoring method (spaCy's NER scorer).
    """

    def __init__(
        self,
        vocab: Vocab,
        model: HFCausalLM,
        name: str = "cllmfs_ner",
        *,
        prompt: Optional[PromptTemplate] = None,
        labels: Sequence[str] = (),
        label_descriptions: Optional[Dict[str, str]] = None,
        label_names: Optional[Dict[str, str]] = None,
        batch_size: int = DEFAULT_DECODING.batch_size,
        max_new_tokens: int = DEFAULT_DECODING.max_new_tokens,
        constrained: bool = DEFAULT_DECODING.constrained,
        ordered_spans: bool = DEFAULT_DECODING.ordered_spans,
        shared_prefix: bool = DEFAULT_DECODING.shared_prefix,
        max_batch_tokens: int = DEFAULT_DECODING.max_batch_tokens,
        refill: bool = DEFAULT_DECODING.refill,
        open_bias: float = DEFAULT_DECODING.open_bias,
        max_window_tokens: int = 256,
        overwrite_ents: bool = False,
        overlap: str = "longest",
        candidates_key: Optional[str] = None,
        training: Optional[TrainingSettings] = None,
        scorer: Optional[Callable] = None,
    ) -> None:
        if not isinstance(max_window_tokens, int) or max_window_tokens < 1:
            raise ValueError(f"cllmfs_ner: `max_window_tokens` must be an integer >= 1, got {max_window_tokens!r}.")
        self.decoding = DecodingSettings(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            constrained=constrained,
            ordered_spans=ordered_spans,
            shared_prefix=shared_prefix,
            max_batch_tokens=max_batch_tokens,
            refill=refill,
            open_bias=open_bias,
        )
        if overlap not in OVERLAP_STRATEGIES:
            raise ValueError(f"cllmfs_ner: `overlap` must be one of {OVERLAP_STRATEGIES}, got {overlap!r}.")
        self.vocab = vocab
        self.model = model
        self.name = name
        self.prompt = prompt if prompt is not None else PromptTemplate()
        self.max_window_tokens = max_window_tokens
        self.overwrite_ents = overwrite_ents
        self.overlap = overlap
        self.candidates_key = candidates_key
        self.training = training if training is not None else TrainingSettings()
        self.scorer = scorer
        self.stats = DecodingStats()
        self.last_losses: Dict[str, float] = {}
        self._optimizer: Optional[LoRAOptimizer] = None
        self._rng = random.Random(self.training.seed)
        self._cooccurrence: Optional[LabelCooccurrence] = None
        self.cfg: Dict[str, Any] = {"labels": [], "label_descriptions": {}, "label_names": {}}
        self._set_labels(labels, label_descriptions or {}, label_names or {})
        self._builder: Optional[PromptBuilder] = None
        self._budget: Optional[Tuple[tuple, int]] = None
        self._demonstrations = Demonstrations()

    # -- decoding settings: views of `self.decoding`, settable --------------------

    batch_size = _decoding_setting("batch_size")
    max_new_tokens = _decoding_setting("max_new_tokens")
    constrained = _decoding_setting("constrained")
    ordered_spans = _decoding_setting("ordered_spans")
    shared_prefix = _decoding_setting("shared_prefix")
    refill = _decoding_setting("refill")
    open_bias = _decoding_setting("open_bias")

    # -- labels -----------------------------------------------------------------

    @property
    def labels(self) -> tuple:
        """RETURNS (Tuple[str]): The entity labels, in order."""
        return tuple(self.cfg["labels"])

    @property
    def label_data(self) -> List[str]:
        return list(self.labels)

    def add_label(self, label: str, description: Optional[str] = None) -> int:
        """Add an entity label, optionally with its description.

        RETURNS (int): 0 if the label was already present, otherwise 1.
        """
        if label in self.labels:
            if description:
                self._set_labels(self.labels, {**self.cfg["label_descriptions"], label: description})
            return 0
        descriptions = dict(self.cfg["label_descriptions"])
        if description:
            descriptions[label] = description
        self._set_labels(list(self.labels) + [label], descriptions)
        return 1

    def _set_labels(
        self,
        labels: Sequence[str],
        descriptions: Dict[str, str],
        names: Optional[Dict[str, str]] = None,
    ) -> None:
        names = self.cfg["label_names"] if names is None else names
        self._label_infos = label_infos(labels, descriptions, names)
        self.cfg.update(
            labels=validate_labels(labels), label_descriptions=dict(descriptions), label_names=dict(names)
        )

    @property
    def label_infos(self) -> List[LabelInfo]:
        """RETURNS (List[LabelInfo]): Labels with their prompt names and descriptions."""
        return self._label_infos

    def _require_labels(self) -> None:
        if not self.labels:
            raise ValueError(
                f"The '{self.name}' component has no entity labels. Fix: add them in the "
                "config (nlp.add_pipe('cllmfs_ner', config={'labels': ['person']})), with "
                "add_label(), or call nlp.initialize() with annotated examples."
            )

    # -- prompts --------------------------------------------------------------------

    @property
    def builder(self) -> PromptBuilder:
        """RETURNS (PromptBuilder): The prompt builder bound to the model's tokenizer."""
        if self._builder is None:
            self._builder = PromptBuilder(self.prompt, self.model.tokenizer)
        return self._builder

    @property
    def demonstrations(self) -> Demonstrations:
        """RETURNS (Demonstrations): The worked examples a prompt.v3 template shows."""
        return self._demonstrations

    @demonstrations.setter
    def demonstrations(self, value: Demonstrations) -> None:
        self._demonstrations = value
        self._budget = None  # the examples are part of every prompt's length

    def window_budget(self) -> int:
        """RETURNS (int): The most model tokens a sentence window may take."""
        key = (tuple(self.label_infos), self.max_window_tokens, self.decoding.max_new_tokens, id(self.builder))
        if self._budget is None or self._budget[0] != key:
            budget = window_budget(
                self.builder,
                self.label_infos,
                self.model.context_length,
                self.max_window_tokens,
                self.decoding.max_new_tokens,
                self.demonstrations.texts(self.prompt) if self._shows_examples else None,
            )
            self._budget = (key, budget)
        return self._budget[1]

    def windows(self, doc: Doc) -> List[Span]:
        """Split a Doc into sentence windows that fit the prompt."""
        return doc_windows(doc, self.builder, self.window_budget())

    @property
    def _shows_examples(self) -> bool:
        return self.prompt.demonstrations > 0

    def _examples(self) -> Optional[Demonstrations]:
        """The worked examples prompts show, or None if the template shows none."""
        return self.demonstrations if self._shows_examples else None

    def make_prompts(self, docs: Sequence[Doc]) -> List[WindowPrompts]:
        """Build the prompts for a batch of docs: per window, one per label."""
        return make_prompts(docs, self.builder, self.label_infos, self.window_budget(), self._examples())

    # -- inference ------------------------------------------------------------------

    def _inference_model(self) -> Any:
        """The model for inference: LoRA merged into the base weights, except for
        16-bit weights while training (merging and unmerging them would round)."""
        return self.model.inference_model(merge=self._optimizer is None or self.model.dtype == torch.float32)

    def predict(self, docs: Iterable[Doc]) -> List[List[Candidate]]:
        """Find entity candidates in a batch of docs, without modifying them.

        RETURNS (List[List[Candidate]]): Candidate spans (all labels, overlaps included) per doc.
        """
        docs = list(docs)
        self._require_labels()
        if not docs:
            return []
        stats = DecodingStats()
        candidates = find_candidates(
            docs,
            self._inference_model(),
            self.builder,
            self.label_infos,
            self.decoding,
            budget=self.window_budget(),
            pad_id=self.model.pad_id,
            stats=stats,
            demonstrations=self._examples(),
        )
        self.stats.add(stats)
        return candidates

    def calibrate(
        self, examples: Iterable[Example], *, verify: bool = True, ents_f_before: Optional[float] = None
    ) -> Calibration:
        """Set `open_bias` from gold examples (a small dev set): score the first answer
        decision of every (window, label) prompt and pick the offset that best tells
        labels present in the window from absent ones (see `calibration`).

        examples (Iterable[Example]): Gold examples; their reference entities count.
        verify (bool): Keep the new offset only if the entity F1 on `examples` does not
            drop with it (one or two passes of decoding over them).
        ents_f_before (Optional[float]): The entity F1 with the current offset, if known.
        RETURNS (Calibration): The offset chosen, whether it was kept, and its effect.
        """
        examples = list(examples)
        validate_examples(examples, "CLLMFSNer.calibrate")
        self._require_labels()
        if not self.decoding.constrained:
            raise ValueError(
                f"'{self.name}': open_bias only acts on constrained decoding. Fix: set "
                "`constrained = true` before calibrating."
            )
        docs = [example.reference for example in examples]
        tasks = self.make_prompts(docs)
        positive = []
        for task in tasks:
            window = task.window
            present = {e.label_ for e in docs[task.doc_index].ents if e.start >= window.start and e.end <= window.end}
            positive.extend(prompt.label in present for prompt in task.prompts)
        margins = decision_margins(self._inference_model(), tasks, self.builder.format, self.decoding, self.model.pad_id)
        result = fit_open_bias(margins, positive)
        previous = self.open_bias
        if not verify or result.open_bias == previous:
            self.open_bias = result.open_bias
            return result
        result.ents_f_before = self._ents_f(docs) if ents_f_before is None else ents_f_before
        self.open_bias = result.open_bias
        result.ents_f_after = self._ents_f(docs)
        if result.ents_f_after < result.ents_f_before:
            self.open_bias, result.kept = previous, False
        return result

    def _ents_f(self, gold: Sequence[Doc]) -> float:
        """RETURNS (float): This component's entity F1 on gold docs (annotated afresh)."""
        predicted = list(self.pipe(unannotated(self, doc) for doc in gold))
        return float(get_ner_prf([Example(p, g) for p, g in zip(predicted, gold)])["ents_f"] or 0.0)

    def set_annotations(self, docs: Iterable[Doc], candidates: List[List[Candidate]]) -> None:
        """Set `doc.ents` (and the candidates span group, if configured)."""
        for doc, found in zip(docs, candidates):
            if self.candidates_key:
                ordered = sorted(found, key=lambda c: (c.start, c.end, c.label))
                group = SpanGroup(
                    doc,
                    name=self.candidates_key,
                    spans=[Span(doc, c.start, c.end, label=c.label) for c in ordered],
                    attrs={"scores": [c.score for c in ordered]},
                )
                doc.spans[self.candidates_key] = group
            kept = [Span(doc, c.start, c.end, label=c.label) for c in resolve_overlaps(found, self.overlap)]
            existing = list(doc.ents)
            if self.overwrite_ents:
                entities = kept + [e for e in existing if not _overlaps_any(e, kept)]
            else:
                entities = existing + [s for s in kept if not _overlaps_any(s, existing)]
            doc.set_ents(sorted(entities, key=lambda s: s.start), default="outside")

    # -- training -------------------------------------------------------------------

    def initialize(
        self,
        get_examples: Callable[[], Iterable[Example]],
        *,
        nlp: Optional[Language] = None,
        labels: Optional[List[str]] = None,
        label_descriptions: Optional[Dict[str, str]] = None,
        resume_from: Optional[str] = None,
    ) -> None:
        """Set the labels (from `labels`, the config, or the examples), attach a fresh
        LoRA adapter (unless one was loaded; initialised from the training seed alone,
        not from what ran before in the process) and reset the optimizer.

        get_examples (Callable[[], Iterable[Example]]): Returns gold examples.
        nlp (Language): The pipeline.
        labels (Optional[List[str]]): Labels to use (`[initialize.components.NAME]`).
        label_descriptions (Optional[Dict[str, str]]): Descriptions to use.
        resume_from (Optional[str]): A checkpoint folder written by the
            `spacy_cllmfs.checkpoint.v1` callback to continue training from.
        """
        validate_get_examples(get_examples, "CLLMFSNer.initialize")
        descriptions = label_descriptions if label_descriptions is not None else self.cfg["label_descriptions"]
        if labels is None and not self.labels:
            labels = []
            for example in get_examples():
                labels.extend(e.label_ for e in example.reference.ents if e.label_ not in labels)
            labels.sort()
        self._set_labels(labels if labels is not None else self.labels, descriptions)
        self._require_labels()
        if self.training.retired:
            raise ValueError(self.training.retired)
        self._cooccurrence = LabelCooccurrence.from_examples(get_examples(), self.labels)
        if self._shows_examples:
            self.demonstrations = Demonstrations()  # windows are cut as if no examples were shown
            self.demonstrations = Demonstrations.from_examples(
                get_examples(), self.windows, self.labels, self.prompt.demonstrations
            )
        with seeded_torch(self.training.seed):  # the fresh adapter's init: the seed's alone
            self.model.ensure_lora()
        self._optimizer = None
        self._rng = random.Random(self.training.seed)
        if resume_from:
            self.load_checkpoint(resume_from)

    def training_items(self, examples: Iterable[Example]) -> List[TrainingItem]:
        """Turn gold examples into prompts with their answers (see `training.make_items`)."""
        return make_items(
            self.builder, self.windows, list(examples), self.label_infos, self.training, self._rng,
            self._cooccurrence, self._examples(),
        )

    def _trainable_model(self) -> Any:
        self.model.ensure_lora()
        model = self.model.model
        if self.training.gradient_checkpointing and not is_checkpointing(model):
            enable_checkpointing(model)
        return model

    def _layer(self, model: Any) -> int:
        return contrastive_layer_index(model, self.training)

    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optional[Any] = None,
        losses: Optional[Dict[str, float]] = None,
    ) -> Dict[str, float]:
        """Learn from a batch of gold examples: accumulate LoRA gradients over
        micro-batches, and step the optimizer if `sgd` is given.

        drop (float): Not used: LoRA dropout is set in the model's `lora` block.
        sgd (thinc.api.Optimizer): Its settings drive the LoRA optimizer step.
        RETURNS (Dict[str, float]): `losses`, with this component's loss added.
        """
        if losses is None:
            losses = {}
        losses.setdefault(self.name, 0.0)
        examples = list(examples)
        validate_examples(examples, "CLLMFSNer.update")
        self._require_labels()
        items = self.training_items(examples)
        if not items:
            return losses
        model = self._trainable_model().train()
        try:
            totals = accumulate(
                model, items, self.training, self._layer(model), self.model.pad_id, self.model.device, train=True
            )
        finally:
            model.eval()
        self.last_losses = totals
        losses[self.name] += totals["loss"]
        if sgd not in (None, False):
            self.finish_update(sgd)
        return losses

    def get_loss(self, examples: Iterable[Example], scores: Any = None) -> Tuple[float, Dict[str, float]]:
        """Compute the training loss on gold examples, without gradients.

        scores: Not used (the loss is computed from the examples).
        RETURNS (Tuple[float, Dict[str, float]]): The loss and its parts ("lm",
            "contrastive"). There is no gradient to return: it stays inside torch.
        """
        self._require_labels()
        items = self.training_items(list(examples))
        if not items:
            return 0.0, {}
        model = self.model.model.eval()
        totals = accumulate(
            model, items, self.training, self._layer(model), self.model.pad_id, self.model.device, train=False
        )
        return totals["loss"], totals

    def finish_update(self, sgd: Any) -> None:
        """Update the LoRA weights with the accumulated gradients.

        sgd (thinc.api.Optimizer): Provides the learn rate, betas, eps, L2 and grad_clip.
        """
        if self._optimizer is None:
            self._optimizer = LoRAOptimizer(self.model.trainable_parameters())
        self._optimizer.step(sgd)

    def restore_adapter(self, state: AdapterState) -> None:
        """Go back to an earlier adapter (e.g. the best on a dev set); the optimizer
        starts afresh if training goes on."""
        self.model.set_adapter(state)
        self._optimizer = None

    @contextlib.contextmanager
    def use_params(self, params: Dict) -> Iterator[None]:
        """Parameter averages are not kept for the LoRA weights: they are used as they are."""
        yield

    def save_checkpoint(self, path: Union[str, Path], **meta: Any) -> None:
        """Write the adapter, the optimizer state and `meta` (e.g. the step) to `path`.
        The folder is replaced as a whole, so an interrupted save leaves the last one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        adapter = self.model.adapter_state()
        if adapter is not None:
            adapter.to_disk(tmp / "adapter")
        if self._optimizer is not None:
            torch.save(self._optimizer.state_dict(), tmp / "optimizer.pt")
        srsly.write_json(tmp / "state.json", {**self._state(), **meta})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)

    def load_checkpoint(self, path: Union[str, Path]) -> Dict[str, Any]:
        """Continue from a checkpoint written by `save_checkpoint`.

        RETURNS (Dict[str, Any]): The checkpoint's state (labels, step, ...).
        """
        path = Path(path)
        if not (path / "state.json").exists():
            raise FileNotFoundError(
                f"No cllmfs_ner checkpoint in '{path}' (no state.json). Fix: point "
                "`resume_from` at a folder written by the spacy_cllmfs.checkpoint.v1 callback."
            )
        state = srsly.read_json(path / "state.json")
        if (path / "adapter").exists():
            self.model.set_adapter(AdapterState.from_disk(path / "adapter"))
        self._load_state(state)
        self.model.ensure_lora()
        self._optimizer = None
        if (path / "optimizer.pt").exists():
            self._optimizer = LoRAOptimizer(self.model.trainable_parameters())
            self._optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.model.device))
        return state

    # -- serialization --------------------------------------------------------------

    def _state(self) -> Dict[str, Any]:
        return {
            "labels": list(self.labels),
            "label_descriptions": dict(self.cfg["label_descriptions"]),
            "label_names": dict(self.cfg["label_names"]),
            "base_model": self.model.source.description,
            "open_bias": self.open_bias,
            "demonstrations": self.demonstrations.to_dict(),
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._set_labels(state["labels"], state["label_descriptions"], state.get("label_names", {}))
        if "open_bias" in state:
            self.open_bias = float(state["open_bias"])
        self.demonstrations = Demonstrations.from_dict(state.get("demonstrations", {}))
        if self._shows_examples and not self.demonstrations:
            logger.warning(
                "'%s' uses a prompt with worked examples, but none were saved with it: prompts "
                "will show none. Run `initialize` with training examples to choose them.",
                self.name,
            )
        saved_base = state.get("base_model")
        if saved_base and saved_base != self.model.source.description and self.model.has_adapter:
            logger.warning(
                "The adapter of '%s' was trained on %s but is loaded on %s.",
                self.name, saved_base, self.model.source.description,
            )

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write the labels, descriptions and the LoRA adapter (not the base weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        srsly.write_json(path / "cfg", self._state())
        adapter = self.model.adapter_state()
        if adapter is not None and "adapter" not in exclude:
            adapter.to_disk(path / "adapter")

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> "CLLMFSNer":
        """Load what `to_disk` wrote. The base model comes from the pipeline's config."""
        path = Path(path)
        if (path / "adapter").exists() and "adapter" not in exclude:
            self.model.set_adapter(AdapterState.from_disk(path / "adapter"))
        self._load_state(srsly.read_json(path / "cfg"))
        self._builder = None
        return self

    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        """Serialize the labels, descriptions and LoRA adapter (not the base weights)."""
        adapter = self.model.adapter_state()
        return srsly.msgpack_dumps(
            {
                "cfg": self._state(),
                "adapter": adapter.to_bytes() if adapter is not None and "adapter" not in exclude else None,
            }
        )

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()) -> "CLLMFSNer":
        """Load what `to_bytes` wrote."""
        msg = srsly.msgpack_loads(bytes_data)
        if msg.get("adapter") is not None:
            self.model.set_adapter(AdapterState.from_bytes(msg["adapter"]))
        self._load_state(msg["cfg"])
        self._builder = None
        return self


def _overlaps_any(span: Span, others: Sequence[Span]) -> bool:
    return any(span.start < other.end and other.start < span.end for other in others)


