"""Training: gold examples -> prompts with answers -> batches -> losses -> LoRA updates.

How the optimizer steps. Only the LoRA weights train, and they live in torch
(on the component's own device). The component owns a `torch.optim.AdamW`
over them instead of letting thinc's optimizer update the weights through a
PyTorch shim: the shim copies every parameter and gradient to thinc arrays
(cupy on a GPU, which needs a cupy build that matches the CUDA there), and it
cannot keep optimizer state for mixed precision. The thinc optimizer that
`spacy train` passes to `finish_update` still drives every step: its current
learn rate (schedules included, since spaCy steps them), betas, eps, L2
(as AdamW weight decay) and grad_clip are read each time, so
`[training.optimizer]` settings take effect as usual.
"""
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from spacy.tokens import Span
from spacy.training import Example
from spacy.util import registry

from . import batching
from .decoding import cache_kwarg, cache_of
from .demonstrations import Demonstrations
from .labels import LabelInfo, annotated_labels
from .losses import (
    CONTRASTIVE_LOSSES,
    CONTRASTIVE_NEGATIVES,
    IGNORE_INDEX,
    ContrastiveTargets,
    contrastive_loss,
    contrastive_terms,
    fgm_delta,
    lm_loss,
)
from .negatives import NEGATIVE_SAMPLING, LabelCooccurrence, choose_negatives, negatives_for
from .prompts import Prompt, PromptBuilder


def contrastive_checks(weight: float, layer: Optional[int], negatives: str) -> List[Tuple[bool, str]]:
    """The checks of the contrastive settings that `TrainingSettings` and
    `llm_tuning.TuningSettings` share, as (passed, message) pairs."""
    return [
        (weight >= 0, "contrastive_weight must be >= 0"),
        (layer != 0, "contrastive_layer 0 is the embedding layer; use 1..n_layers"),
        (negatives in CONTRASTIVE_NEGATIVES, f"contrastive_negatives must be one of {CONTRASTIVE_NEGATIVES}"),
    ]


@dataclass
class TrainingSettings:
    """How `update` trains the adapter.

    contrastive_weight (float): Lambda, the weight of the contrastive loss (0 turns it off).
    contrastive_layer (Optional[int]): Hidden layer for the contrastive loss (1..n_layers,
        negative counts from the end); None picks about 3/4 of the depth.
    contrastive_loss (str): "infonce" or "pairwise" (BANER's sigmoid loss).
    temperature (float): InfoNCE temperature.
    max_negatives (int): Negatives per prompt: the tokens next to each boundary first,
        then other tokens outside the label's entities.
    contrastive_negatives (str): Which negatives come first: "boundary" (the tokens
        next to the label's entities) or "other_types" (the first and last tokens of
        the window's entities of other labels, then the boundary tokens).
    contrastive_center (bool): Subtract the mean of a prompt's anchor, positive and
        negative states before the cosine similarities. LLM hidden states share a
        large common direction, which makes all cosines similar; centering removes it.
    negatives_per_positive (Optional[float]): Prompts without an entity (they teach the
        model to answer "nothing") per prompt with one, per sentence window; a window
        without entities counts as one positive. None trains on every absent label
        (the paper's setting, which collapses to "nothing" as the label count grows).
    negative_sampling (str): Which absent labels: "confusable" (labels that co-occur
        with the window's labels in the training data come first) or "uniform".
    answer_only_loss (bool): Compute the LM loss on the answer tokens only.
    fgm_epsilon (float): Size of the FGM adversarial perturbation of the input
        embeddings (0 turns it off).
    micro_batch_size (int): Prompts per forward/backward pass; gradients of a spaCy
        batch are accumulated over its micro-batches.
    mixed_precision (bool): bfloat16 autocast when training on a GPU.
    gradient_checkpointing (bool): Trade compute for activation memory.
    shared_prefix (bool): Compute the ids that a window's prompts share once per
        window; gradients reach the LoRA weights through the shared part too. Same
        loss and gradient as computing every prompt whole. It needs `answer_only_loss`
        and no FGM or gradient checkpointing; otherwise prompts are computed whole.
    prefix_gradients (bool): Backpropagate through the shared prefix. False computes
        it without gradients (the LoRA weights learn from the rest of each prompt and
        its answer only): much cheaper when the prefix is most of the prompt, but a
        different gradient. Only used when prefixes are shared (`shared_prefix`).
    seed (int): Seed for sampling prompts without entities and negatives.
    """

    contrastive_weight: float = 0.1
    contrastive_layer: Optional[int] = None
    contrastive_loss: str = "infonce"
    temperature: float = 0.1
    max_negatives: int = 8
    contrastive_negatives: str = "boundary"
    contrastive_center: bool = False
    negatives_per_positive: Optional[float] = 1.0
    negative_sampling: str = "confusable"
    answer_only_loss: bool = True
    fgm_epsilon: float = 0.0
    micro_batch_size: int = 8
    mixed_precision: bool = True
    gradient_checkpointing: bool = False
    shared_prefix: bool = True
    prefix_gradients: bool = True
    seed: int = 0
    retired: Optional[str] = None  # set by retired registered versions: training raises it

    def __post_init__(self) -> None:
        checks = [
            *contrastive_checks(self.contrastive_weight, self.contrastive_layer, self.contrastive_negatives),
            (self.contrastive_loss in CONTRASTIVE_LOSSES, f"contrastive_loss must be one of {CONTRASTIVE_LOSSES}"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.max_negatives >= 1, "max_negatives must be >= 1"),
            (
                self.negatives_per_positive is None or self.negatives_per_positive >= 0,
                "negatives_per_positive must be >= 0 (or null for every absent label)",
            ),
            (self.negative_sampling in NEGATIVE_SAMPLING, f"negative_sampling must be one of {NEGATIVE_SAMPLING}"),
            (self.fgm_epsilon >= 0, "fgm_epsilon must be >= 0"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"cllmfs_ner training settings: {message}.")

    def layer_index(self, n_layers: int) -> int:
        """RETURNS (int): The index into `hidden_states` (0 = embeddings) of the layer to use."""
        if self.contrastive_layer is None:
            return max(1, round(n_layers * 0.75))
        index = self.contrastive_layer if self.contrastive_layer > 0 else n_layers + 1 + self.contrastive_layer
        if not 1 <= index <= n_layers:
            raise ValueError(f"contrastive_layer {self.contrastive_layer} is out of range for {n_layers} layers.")
        return index

    @property
    def shares_prefix(self) -> bool:
        """RETURNS (bool): Whether training computes shared prefixes once."""
        return (
            self.shared_prefix
            and self.answer_only_loss
            and self.fgm_epsilon == 0
            and not self.gradient_checkpointing
        )


@registry.misc("spacy_cllmfs.training.v2")
def training_v2(
    contrastive_weight: float = 0.1,
    contrastive_layer: Optional[int] = None,
    contrastive_loss: str = "infonce",
    temperature: float = 0.1,
    max_negatives: int = 8,
    negatives_per_positive: Optional[float] = 1.0,
    negative_sampling: str = "confusable",
    contrastive_negatives: str = "boundary",
    contrastive_center: bool = False,
    answer_only_loss: bool = True,
    fgm_epsilon: float = 0.0,
    micro_batch_size: int = 8,
    mixed_precision: bool = True,
    gradient_checkpointing: bool = False,
    shared_prefix: bool = True,
    seed: int = 0,
) -> TrainingSettings:
    """Registered training settings of `cllmfs_ner` (see `TrainingSettings`)."""
    return TrainingSettings(
        contrastive_weight=contrastive_weight,
        contrastive_layer=contrastive_layer,
        contrastive_loss=contrastive_loss,
        temperature=temperature,
        max_negatives=max_negatives,
        negatives_per_positive=negatives_per_positive,
        negative_sampling=negative_sampling,
        contrastive_negatives=contrastive_negatives,
        contrastive_center=contrastive_center,
        answer_only_loss=answer_only_loss,
        fgm_epsilon=fgm_epsilon,
        micro_batch_size=micro_batch_size,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        shared_prefix=shared_prefix,
        seed=seed,
    )


RETIRED_V1 = (
    "spacy_cllmfs.training.v1 and its `negative_ratio` (the share of all absent-label "
    "prompts to train on) were replaced by spacy_cllmfs.training.v2, whose "
    "`negatives_per_positive` ties the number of empty prompts to the positives of each "
    "sentence (with many labels, negative_ratio made the model answer \"nothing\" "
    "everywhere). Fix: in [components.cllmfs_ner.training] set "
    "@misc = \"spacy_cllmfs.training.v2\" and replace `negative_ratio = ...` with "
    "`negatives_per_positive = 1.0` (or null for every absent label)."
)


@registry.misc("spacy_cllmfs.training.v1")
def training_v1(
    contrastive_weight: float = 0.1,
    contrastive_layer: Optional[int] = None,
    contrastive_loss: str = "infonce",
    temperature: float = 0.1,
    max_negatives: int = 8,
    negative_ratio: float = 1.0,
    answer_only_loss: bool = True,
    fgm_epsilon: float = 0.0,
    micro_batch_size: int = 8,
    mixed_precision: bool = True,
    gradient_checkpointing: bool = False,
    shared_prefix: bool = True,
    seed: int = 0,
) -> TrainingSettings:
    """Retired training settings: pipelines saved with them still load and annotate,
    but training with them raises an error that names spacy_cllmfs.training.v2."""
    settings = training_v2(
        contrastive_weight=contrastive_weight,
        contrastive_layer=contrastive_layer,
        contrastive_loss=contrastive_loss,
        temperature=temperature,
        max_negatives=max_negatives,
        negatives_per_positive=None,
        answer_only_loss=answer_only_loss,
        fgm_epsilon=fgm_epsilon,
        micro_batch_size=micro_batch_size,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        shared_prefix=shared_prefix,
        seed=seed,
    )
    settings.retired = RETIRED_V1
    return settings


@dataclass
class TrainingItem:
    """One prompt with its gold answer and contrastive positions: for a (sentence,
    label) prompt one group of targets at most, for a prompt of all labels (spacy-llm)
    one per label with entities in the sentence."""

    prompt: Prompt
    answer: List[int]
    targets: List[ContrastiveTargets] = field(default_factory=list)

    @property
    def ids(self) -> List[int]:
        return self.prompt.ids + self.answer


def make_items(
    builder: PromptBuilder,
    windows: Callable[[Any], List[Span]],
    examples: Sequence[Example],
    labels: Sequence[LabelInfo],
    settings: TrainingSettings,
    rng: random.Random,
    cooccurrence: Optional[LabelCooccurrence] = None,
    demonstrations: Optional[Demonstrations] = None,
) -> List[TrainingItem]:
    """Turn gold examples into training prompts: per sentence window, one per label
    with an entity there, and `settings.negatives_per_positive` times as many for
    labels without one (see `negatives`). Entities that cross a window boundary
    cannot be answered and are left out of that window's answers. A Doc that
    declares the labels it is annotated for (`labels.set_annotated_labels`) is
    prompted with those of `labels` only.

    cooccurrence (Optional[LabelCooccurrence]): Label co-occurrence of the training data,
        for `negative_sampling = "confusable"` (None: this batch's).
    demonstrations (Optional[Demonstrations]): Worked examples for a template with an
        `{examples}` slot; a window is never shown as its own example.
    RAISES (ValueError): If the settings come from a retired registered version.
    """
    if settings.retired:
        raise ValueError(settings.retired)
    examples = list(examples)
    if cooccurrence is None:
        cooccurrence = LabelCooccurrence.from_examples(examples, [info.label for info in labels])
    items: List[TrainingItem] = []
    for example in examples:
        doc = example.reference
        own = annotated_labels(doc)
        doc_labels = labels if own is None else [info for info in labels if info.label in own]
        wanted = {info.label for info in doc_labels}
        gold = [ent for ent in doc.ents if ent.label_ in wanted]
        for window in windows(doc):
            inside = [
                (ent.label_, ent.start - window.start, ent.end - window.start)
                for ent in gold
                if ent.start >= window.start and ent.end <= window.end
            ]
            present = list(dict.fromkeys(label for label, _, _ in inside))
            absent = [info.label for info in doc_labels if info.label not in present]
            n_negatives = negatives_for(len(present), settings.negatives_per_positive, len(absent), rng)
            kept = set(present) | set(
                choose_negatives(present, absent, n_negatives, rng, settings.negative_sampling, cooccurrence)
            )
            pieces = builder.word_pieces(window)
            examples = demonstrations.texts(builder.template, window.text) if demonstrations else None
            prompts = builder.build(pieces, [info for info in doc_labels if info.label in kept], examples)
            for prompt in prompts:
                spans = [(start, end) for label, start, end in inside if label == prompt.label]
                answer = builder.answer_ids(prompt, spans)
                others = (
                    [(start, end) for label, start, end in inside if label != prompt.label]
                    if settings.contrastive_negatives == "other_types"
                    else []
                )
                targets = contrastive_targets(prompt, spans, settings.max_negatives, rng, others) if spans else None
                items.append(TrainingItem(prompt, answer, [] if targets is None else [targets]))
    return items


def contrastive_targets(
    prompt: Prompt,
    spans: Sequence[Tuple[int, int]],
    max_negatives: int,
    rng: random.Random,
    others: Sequence[Tuple[int, int]] = (),
) -> Optional[ContrastiveTargets]:
    """Anchor, positive and negative positions of one prompt (see `losses`).

    spans (Sequence[Tuple[int, int]]): Word spans of the prompt label's entities.
    others (Sequence[Tuple[int, int]]): Word spans of entities of other labels: their
        first and last tokens are the first negatives.
    """
    tokens = [pos for start, end in prompt.word_spans for pos in range(start, end)]
    inside: set = set()
    positives: List[int] = []
    hard: List[int] = []
    for start, end in others:
        positions = [p for s, e in prompt.word_spans[start:end] for p in range(s, e)]
        hard.extend(sorted({positions[0], positions[-1]}) if positions else [])
    for start, end in spans:
        positions = [p for s, e in prompt.word_spans[start:end] for p in range(s, e)]
        if not positions:
            continue
        inside.update(positions)
        positives.extend(sorted({positions[0], positions[-1]}))
        index_first, index_last = tokens.index(positions[0]), tokens.index(positions[-1])
        if index_first > 0:
            hard.append(tokens[index_first - 1])
        if index_last + 1 < len(tokens):
            hard.append(tokens[index_last + 1])
    negatives = list(dict.fromkeys(p for p in hard if p not in inside))[:max_negatives]
    others = [p for p in tokens if p not in inside and p not in negatives]
    rng.shuffle(others)
    negatives.extend(others[: max_negatives - len(negatives)])
    if not positives or not negatives or not prompt.label_positions:
        return None
    return ContrastiveTargets(anchor=list(prompt.label_positions), positives=positives, negatives=negatives)


@dataclass
class Batch:
    """Left-padded tensors for a micro-batch, and the answer logits to keep."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # aligned with the kept logits, shifted
    keep: int  # number of trailing positions whose logits are computed (0 = all)
    targets: List[List[ContrastiveTargets]]


def collate(items: Sequence[TrainingItem], pad_id: int, device: torch.device, answer_only: bool) -> Batch:
    """Left-pad a micro-batch, so that all answers end at the last position."""
    input_ids, mask = batching.left_pad([item.ids for item in items], pad_id)
    n, width = input_ids.shape
    targets: List[List[ContrastiveTargets]] = []
    answer_width = max(len(item.answer) for item in items)
    keep = 0 if not answer_only else answer_width + 1
    label_width = width if keep == 0 else keep
    labels = torch.full((n, label_width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = item.ids
        offset = width - len(ids)
        # position t predicts token t + 1: shift the ids left by one
        predicted = torch.tensor(ids[1:] + [IGNORE_INDEX])
        if answer_only:
            predicted[: len(item.prompt.ids) - 1] = IGNORE_INDEX
        row_labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
        row_labels[offset:] = predicted
        labels[row] = row_labels[width - label_width :]
        targets.append([target.moved(lambda p: p + offset) for target in item.targets])
    positions = batching.positions(mask)
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        labels=labels.to(device),
        keep=keep,
        targets=targets,
    )


@dataclass
class SharedBatch:
    """A micro-batch whose rows share prefixes: the prefixes (one row per group), and
    per prompt its suffix and answer, the group it belongs to, and the LM labels.

    mask covers prefix and rest columns; target positions index that same layout.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    owner: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    keep: int
    targets: List[List[ContrastiveTargets]]


def collate_shared(groups: Sequence[Sequence[TrainingItem]], pad_id: int, device: torch.device) -> SharedBatch:
    """Left-pad a micro-batch of groups (items with the same prefix) for the shared path:
    prefixes in one tensor, suffix + answer of every item in another, so that all
    answers end at the last position. Only the answer tokens are predicted."""
    prefixes = [group[0].prompt.prefix for group in groups]
    items = [item for group in groups for item in group]
    rests = [item.prompt.suffix + item.answer for item in items]
    prefix_ids, prefix_mask = batching.left_pad(prefixes, pad_id)
    ids, rest_mask = batching.left_pad(rests, pad_id)
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    prefix_w, rest_w = prefix_ids.shape[1], ids.shape[1]
    keep = max(len(item.answer) for item in items) + 1
    labels = torch.full((len(items), keep), IGNORE_INDEX, dtype=torch.long)
    targets: List[List[ContrastiveTargets]] = []
    for row, (item, rest) in enumerate(zip(items, rests)):
        answer = torch.tensor(item.answer)
        labels[row, keep - 1 - len(item.answer) : keep - 1] = answer  # position t predicts t + 1
        shared, n_prefix = item.prompt.shared_len, len(prefixes[int(owner[row])])

        def place(p: int) -> int:
            if p < shared:
                return prefix_w - n_prefix + p
            return prefix_w + rest_w - len(rest) + p - shared

        targets.append([target.moved(place) for target in item.targets])
    start = prefix_mask.sum(-1)[owner]
    return SharedBatch(
        prefix_ids=prefix_ids.to(device),
        prefix_mask=prefix_mask.to(device),
        owner=owner.to(device),
        input_ids=ids.to(device),
        attention_mask=torch.cat([prefix_mask[owner], rest_mask], dim=1).to(device),
        position_ids=batching.positions(rest_mask, start).to(device),
        labels=labels.to(device),
        keep=keep,
        targets=targets,
    )


def decoder_layers(model: Any) -> Optional[torch.nn.ModuleList]:
    """RETURNS (Optional[torch.nn.ModuleList]): The decoder blocks of a (LoRA-wrapped)
        Hugging Face causal LM, or None where the architecture hides them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def is_checkpointing(model: Any) -> bool:
    """RETURNS (bool): Whether activation (gradient) checkpointing is on for `model`
    (`is_activation_checkpointing` in recent transformers, `is_gradient_checkpointing` before)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


def enable_checkpointing(model: Any) -> None:
    """Turn on non-reentrant activation checkpointing (recent transformers' name first)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def contrastive_layer_index(model: Any, settings: TrainingSettings) -> int:
    """RETURNS (int): The index into `hidden_states` of the contrastive layer of
        `settings` for a (LoRA-wrapped) Hugging Face causal LM."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers:
        layers = decoder_layers(model)
        n_layers = len(layers) if layers is not None else 1
    return settings.layer_index(n_layers)


class LayerCapture:
    """Keep the output of one decoder layer during a forward pass, instead of asking
    the model for every layer's hidden states (`output_hidden_states=True` returns
    all of them). `hidden_states[i]` is the output of block i - 1; the last index
    (after the final norm) and gradient-checkpointed models are read the old way."""

    def __init__(self, model: Any, index: Optional[int]) -> None:
        self.outputs: List[torch.Tensor] = []
        self.handle = None
        self.fallback = False
        if index is None:
            return
        layers = decoder_layers(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # a checkpointed block may run its first forward without autograd: read the outputs
        if layers is None or index >= len(layers) or is_checkpointing(base):
            self.fallback = True
            return
        self.handle = layers[index - 1].register_forward_hook(self._keep)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self, out: Any, index: int) -> torch.Tensor:
        """RETURNS (torch.Tensor): The layer's output of the latest forward pass `out`."""
        return out.hidden_states[index] if self.fallback else self.outputs.pop()

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()


def _forward(
    model: Any, batch: Union[Batch, SharedBatch], hidden_layer: Optional[int], prefix_gradients: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The kept logits of a micro-batch and, if `hidden_layer` is set, that layer's
    hidden states (for a shared batch: prefix and rest columns side by side; the
    prefix without gradients unless `prefix_gradients`)."""
    with LayerCapture(model, hidden_layer) as capture:
        if isinstance(batch, Batch):
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                output_hidden_states=capture.fallback,
                logits_to_keep=batch.keep,
            )
            return out.logits, None if hidden_layer is None else capture.take(out, hidden_layer)
        with contextlib.nullcontext() if prefix_gradients else torch.no_grad():
            prefix = model(
                input_ids=batch.prefix_ids,
                attention_mask=batch.prefix_mask,
                position_ids=batching.positions(batch.prefix_mask),
                use_cache=True,
                output_hidden_states=capture.fallback,
                logits_to_keep=1,
            )
        prefix_hidden = None if hidden_layer is None else capture.take(prefix, hidden_layer)
        cache = cache_of(prefix)
        batching.select(cache, batch.owner)  # differentiable: gradients flow back to the prefix
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            output_hidden_states=capture.fallback,
            logits_to_keep=batch.keep,
            **{cache_kwarg(model): cache},
        )
        if hidden_layer is None:
            return out.logits, None
        return out.logits, torch.cat([prefix_hidden[batch.owner], capture.take(out, hidden_layer)], dim=1)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Normalizers:
    """What the losses of a whole batch are averaged over, so that splitting it into
    micro-batches gives the same gradient: LM tokens and contrastive terms."""

    tokens: int
    contrastive: int

    @classmethod
    def of(cls, items: Sequence[TrainingItem], settings: TrainingSettings) -> "Normalizers":
        if settings.answer_only_loss:
            tokens = sum(len(item.answer) for item in items)
        else:
            tokens = sum(len(item.ids) - 1 for item in items)
        terms = contrastive_terms([item.targets for item in items], settings.contrastive_loss)
        return cls(tokens=max(tokens, 1), contrastive=max(terms, 1))


def batch_loss(
    model: Any, batch: Union[Batch, SharedBatch], settings: TrainingSettings, layer: int, norms: Normalizers
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Forward a micro-batch and compute its share of LM loss + lambda * contrastive loss."""
    use_contrastive = settings.contrastive_weight > 0 and any(batch.targets)
    logits, hidden = _forward(model, batch, layer if use_contrastive else None, settings.prefix_gradients)
    loss_lm = lm_loss(logits, batch.labels, normalizer=norms.tokens)
    parts = {"lm": float(loss_lm.detach())}
    loss = loss_lm
    if use_contrastive:
        loss_cl = contrastive_loss(
            hidden,
            batch.targets,
            temperature=settings.temperature,
            kind=settings.contrastive_loss,
            normalizer=norms.contrastive,
            center=settings.contrastive_center,
        )
        parts["contrastive"] = float(loss_cl.detach())
        loss = loss + settings.contrastive_weight * loss_cl
    return loss, parts


def backward(
    model: Any, batch: Union[Batch, SharedBatch], settings: TrainingSettings, layer: int, norms: Normalizers
) -> Dict[str, float]:
    """Accumulate the gradients of one micro-batch (its share of the batch's loss),
    with an FGM adversarial pass on perturbed embeddings if `fgm_epsilon` > 0.

    RETURNS (Dict[str, float]): This micro-batch's share of each loss part.
    """
    device = batch.input_ids.device
    embeddings = model.get_input_embeddings()
    captured: List[torch.Tensor] = []

    def capture(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = embeddings.register_forward_hook(capture) if settings.fgm_epsilon > 0 else None
    try:
        with _autocast(device, settings.mixed_precision):
            loss, parts = batch_loss(model, batch, settings, layer, norms)
        loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    parts["loss"] = float(loss.detach())
    if settings.fgm_epsilon > 0 and captured and captured[0].grad is not None:
        delta = fgm_delta(captured[0].grad, settings.fgm_epsilon)
        handle = embeddings.register_forward_hook(lambda module, inputs, output: output + delta)
        try:
            with _autocast(device, settings.mixed_precision):
                adversarial, _ = batch_loss(model, batch, settings, layer, norms)
            adversarial.backward()
        finally:
            handle.remove()
        parts["adversarial"] = float(adversarial.detach())
        parts["loss"] += parts["adversarial"]
    return parts


def micro_batches(items: Sequence[TrainingItem], size: int) -> Iterator[List[TrainingItem]]:
    """Group items of similar length, in a deterministic order."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].ids), i))
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start : start + size]]


def shared_micro_batches(items: Sequence[TrainingItem], size: int) -> Iterator[List[List[TrainingItem]]]:
    """Group items by shared prefix, then pack groups of similar length into
    micro-batches of at most `size` items (a larger group is cut into pieces)."""
    by_prefix: Dict[Tuple[int, ...], List[TrainingItem]] = {}
    for item in items:
        by_prefix.setdefault(tuple(item.prompt.prefix), []).append(item)
    groups = [g[i : i + size] for g in by_prefix.values() for i in range(0, len(g), size)]
    groups.sort(key=lambda g: (len(g[0].prompt.prefix), max(len(i.ids) for i in g)))
    batch: List[List[TrainingItem]] = []
    rows = 0
    for group in groups:
        if batch and rows + len(group) > size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group)
    if batch:
        yield batch


def accumulate(
    model: Any,
    items: Sequence[TrainingItem],
    settings: TrainingSettings,
    layer: int,
    pad_id: int,
    device: torch.device,
    *,
    train: bool,
) -> Dict[str, float]:
    """Run the items in micro-batches: with `train`, accumulate their gradients (the
    losses normalized over all items, so that micro-batching does not change the
    gradient); else compute the loss without gradients.

    RETURNS (Dict[str, float]): The loss ("loss") and its parts, summed over micro-batches.
    """
    norms = Normalizers.of(items, settings)
    batches: Iterator[Union[Batch, SharedBatch]]
    if settings.shares_prefix:
        chunks = shared_micro_batches(items, settings.micro_batch_size)
        batches = (collate_shared(chunk, pad_id, device) for chunk in chunks)
    else:
        plain = micro_batches(items, settings.micro_batch_size)
        batches = (collate(chunk, pad_id, device, settings.answer_only_loss) for chunk in plain)
    totals: Dict[str, float] = {}
    for batch in batches:
        if train:
            parts = backward(model, batch, settings, layer, norms)
        else:
            with torch.no_grad():
                loss, parts = batch_loss(model, batch, settings, layer, norms)
            parts["loss"] = float(loss)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


class LoRAOptimizer:
    """AdamW over the LoRA weights, with hyper-parameters read from a thinc optimizer
    at every step (see the module docstring for why)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.torch_optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.steps = 0

    def step(self, sgd: Any) -> None:
        """Apply the accumulated gradients, then zero them."""
        grad_clip = float(getattr(sgd, "grad_clip", 0.0) or 0.0)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        weight_decay = float(getattr(sgd, "L2", 0.0) or 0.0)
        if not getattr(sgd, "L2_is_weight_decay", True):
            weight_decay = 0.0  # thinc's non-decoupled L2 has no AdamW equivalent
        for group in self.torch_optimizer.param_groups:
            group["lr"] = float(sgd.learn_rate)
            group["betas"] = (float(getattr(sgd, "b1", 0.9)), float(getattr(sgd, "b2", 0.999)))
            group["eps"] = float(getattr(sgd, "eps", 1e-8))
            group["weight_decay"] = weight_decay
        self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"torch": self.torch_optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.torch_optimizer.load_state_dict(state["torch"])
        self.steps = int(state.get("steps", 0))

