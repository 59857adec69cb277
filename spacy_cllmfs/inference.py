"""The one inference path, used by the component and by the spacy-llm model:
docs -> sentence windows -> prompts -> shared-prefix batches -> decoding -> candidates.

Each window gives one prompt per label. Prompts that start alike form one
`PromptGroup`, whose KV cache is computed once: either per window, the ids all
its labels share (`Prompt.shared_len`: the chat header, and with the
sentence-first template the sentence itself), or per label, the ids before the
sentence (`Prompt.sentence_start`: with the label first, the instruction and
its worked examples), shared by all windows of a batch. `prompt_groups` takes
whichever computes fewer prompt tokens. With constrained decoding the
copy automaton records which words of the window each answer span copied, so
candidates come straight from those positions; free decoding (the ablation)
parses the answer text and searches the window for it.
"""
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span

from .alignment import Candidate, locate
from .batching import common_prefix_length
from .constraints import CopyConstraint
from .decoding import DecodingStats, Generation, PromptGroup, generate, generate_groups
from .demonstrations import Demonstrations
from .labels import LabelInfo
from .prompts import AnswerFormat, Prompt, PromptBuilder
from .windows import make_windows

logger = logging.getLogger("spacy_cllmfs")

WINDOW_MARGIN = 8  # model tokens kept free in each window for tokenization drift


@dataclass(frozen=True)
class DecodingSettings:
    """How prompts are decoded.

    batch_size (int): The most prompts in flight at once.
    max_new_tokens (int): Longest answer, in model tokens.
    constrained (bool): Only allow answers that copy spans of the input.
    ordered_spans (bool): With `constrained`, spans must come in sentence order.
    shared_prefix (bool): Compute the ids shared by a window's prompts once (else every
        prompt is computed whole, in fixed batches: the path before prefix sharing).
    max_batch_tokens (int): The most prompt tokens prefilled in one forward pass.
    refill (bool): Let waiting prompts join the batch as others finish.
    open_bias (float): With `constrained`, added to the log-probability of opening a
        span wherever the answer may open one or end (see `calibration`).
    """

    batch_size: int = 32
    max_new_tokens: int = 128
    constrained: bool = True
    ordered_spans: bool = True
    shared_prefix: bool = True
    max_batch_tokens: int = 8192
    refill: bool = True
    open_bias: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"cllmfs_ner: `{name}` must be an integer >= 1, got {value!r}.")
        if isinstance(self.open_bias, bool) or not isinstance(self.open_bias, (int, float)) or not math.isfinite(
            self.open_bias
        ):
            raise ValueError(f"cllmfs_ner: `open_bias` must be a finite number, got {self.open_bias!r}.")


@dataclass
class WindowPrompts:
    """The prompts of one sentence window: one per label, in label order."""

    doc_index: int
    window: Span
    pieces: List[str]
    prompts: List[Prompt]


def window_budget(
    builder: PromptBuilder,
    labels: Sequence[LabelInfo],
    context_length: int,
    max_window_tokens: int,
    max_new_tokens: int,
    examples: Optional[Dict[str, str]] = None,
) -> int:
    """RETURNS (int): The most model tokens a sentence window may take.

    examples (Optional[Dict[str, str]]): Per label, the text of its `{examples}` slot.
    RAISES (ValueError): If the prompt and answer leave no room for a sentence.
    """
    overhead = max(builder.overhead(info, examples) for info in labels)
    room = context_length - overhead - max_new_tokens - WINDOW_MARGIN
    budget = min(max_window_tokens, room) - WINDOW_MARGIN
    if budget < 1:
        raise ValueError(
            f"The model's context ({context_length} tokens) leaves no room for the sentence "
            f"after the prompt ({overhead} tokens) and answer ({max_new_tokens}). Fix: lower "
            "`max_new_tokens`, shorten descriptions or show fewer `demonstrations`."
        )
    return budget


def doc_windows(doc: Doc, builder: PromptBuilder, budget: int) -> List[Span]:
    """Split a Doc into sentence windows of at most `budget` model tokens."""
    pieces = builder.word_pieces(doc[:])
    counts = [len(ids) for ids in builder.encode_words(pieces)]
    return make_windows(doc, counts, budget)


def make_prompts(
    docs: Sequence[Doc],
    builder: PromptBuilder,
    labels: Sequence[LabelInfo],
    budget: int,
    demonstrations: Optional[Demonstrations] = None,
) -> List[WindowPrompts]:
    """Build one prompt per (window, label) for a batch of docs.

    demonstrations (Optional[Demonstrations]): Worked examples for a template with an
        `{examples}` slot.
    """
    tasks: List[WindowPrompts] = []
    for i, doc in enumerate(docs):
        for window in doc_windows(doc, builder, budget):
            pieces = builder.word_pieces(window)
            examples = demonstrations.texts(builder.template, window.text) if demonstrations else None
            tasks.append(WindowPrompts(i, window, pieces, builder.build(pieces, labels, examples)))
    return tasks


def prompt_groups(tasks: Sequence[WindowPrompts], max_rows: int) -> Tuple[List[PromptGroup], List[int]]:
    """Group the prompts of `tasks` by shared prefix: per window (the ids its labels
    share) or per label (the ids before the sentence, grouped by their value), whichever
    leaves fewer prompt tokens to compute, padding included; per window on a tie.

    max_rows (int): The most rows in flight. A label's prompts are sorted by length and
        cut into groups of half as many, so that one can join the batch as soon as half
        of it has finished (`refill`) and its rows need little padding; each group
        computes the prefix once.
    RETURNS (Tuple[List[PromptGroup], List[int]]): The groups, and per row of the groups
        (in order of their suffixes) the index of its prompt in task and label order.
    """
    prompts = [p for task in tasks for p in task.prompts]
    by_window: List[PromptGroup] = []
    window_rows: List[int] = []
    for task in tasks:
        if task.prompts:
            by_window.append(PromptGroup(task.prompts[0].prefix, [p.suffix for p in task.prompts]))
            window_rows.extend(range(len(window_rows), len(window_rows) + len(task.prompts)))
    rows_of: Dict[Tuple[int, ...], List[int]] = {}
    for i, prompt in enumerate(prompts):
        rows_of.setdefault(tuple(prompt.ids[: min(prompt.sentence_start, len(prompt.ids) - 1)]), []).append(i)
    size = max(1, max_rows // 2)
    by_label: List[PromptGroup] = []
    label_rows: List[int] = []
    for key, rows in rows_of.items():
        rows = sorted(rows, key=lambda i: (len(prompts[i].ids), i))
        label_rows.extend(rows)
        for start in range(0, len(rows), size):
            by_label.append(PromptGroup(list(key), [prompts[i].ids[len(key) :] for i in rows[start : start + size]]))
    if prefill_tokens(by_label, max_rows, padded=True) < prefill_tokens(by_window, max_rows, padded=True):
        return by_label, label_rows
    return by_window, window_rows


def prefill_tokens(groups: Sequence[PromptGroup], max_rows: int, padded: bool = False) -> int:
    """RETURNS (int): The prompt tokens that decoding `groups` computes, `max_rows` at most
        at once (see `decoding.generate_groups`); with `padded`, each group's suffixes
        count as long as its longest (an estimate: groups prefilled together pad to the
        longest of all)."""
    total = 0
    for g in groups:
        lengths = [len(s) for s in g.suffixes]
        total += -(-len(lengths) // max_rows) * len(g.prefix)
        total += len(lengths) * max(lengths, default=0) if padded else sum(lengths)
    return total


def in_prompt_order(values: Sequence[Any], rows: Sequence[int]) -> List[Any]:
    """Put per-row results of `prompt_groups`' groups back in task and label order."""
    ordered: List[Any] = [None] * len(rows)
    for value, i in zip(values, rows):
        ordered[i] = value
    return ordered


def decode(
    model: Any,
    tasks: Sequence[WindowPrompts],
    fmt: AnswerFormat,
    settings: DecodingSettings,
    pad_id: int,
    stats: Optional[DecodingStats] = None,
) -> Tuple[List[Generation], List[Optional[CopyConstraint]]]:
    """Decode every prompt of `tasks`.

    RETURNS (Tuple[List[Generation], List[Optional[CopyConstraint]]]): Per prompt, in
        task and label order, its generation and its constraint (None if unconstrained).
    """
    prompts = [p for task in tasks for p in task.prompts]
    constraints: List[Optional[CopyConstraint]] = [None] * len(prompts)
    if settings.constrained:
        constraints = [CopyConstraint(p, fmt, settings.ordered_spans, settings.open_bias) for p in prompts]
    common = dict(
        end_id=fmt.end_id,
        pad_id=pad_id,
        max_new_tokens=settings.max_new_tokens,
        constraints=constraints if settings.constrained else None,
        stats=stats,
    )
    if not settings.shared_prefix:
        generations = generate(model, [p.ids for p in prompts], batch_size=settings.batch_size, **common)
    else:
        groups, rows = prompt_groups(tasks, settings.batch_size)
        if settings.constrained:
            common["constraints"] = [constraints[i] for i in rows]
        generations = in_prompt_order(
            generate_groups(
                model,
                groups,
                max_rows=settings.batch_size,
                max_tokens=settings.max_batch_tokens,
                refill=settings.refill,
                **common,
            ),
            rows,
        )
    return generations, constraints


def find_candidates(
    docs: Sequence[Doc],
    model: Any,
    builder: PromptBuilder,
    labels: Sequence[LabelInfo],
    settings: DecodingSettings,
    *,
    budget: int,
    pad_id: int,
    stats: Optional[DecodingStats] = None,
    demonstrations: Optional[Demonstrations] = None,
) -> List[List[Candidate]]:
    """Find entity candidates (all labels, overlaps included) in a batch of docs.

    model: The causal LM, ready for inference.
    budget (int): The most model tokens of a sentence window (see `window_budget`).
    demonstrations (Optional[Demonstrations]): Worked examples (see `make_prompts`).
    RETURNS (List[List[Candidate]]): Per doc, its candidates, with Doc token offsets.
    """
    candidates: List[List[Candidate]] = [[] for _ in docs]
    tasks = make_prompts(docs, builder, labels, budget, demonstrations)
    if not tasks:
        return candidates
    fmt = builder.format
    generations, constraints = decode(model, tasks, fmt, settings, pad_id, stats)
    unfinished = expanded = unmatched = 0
    row = 0
    for task in tasks:
        found = candidates[task.doc_index]
        for prompt in task.prompts:
            generation, constraint = generations[row], constraints[row]
            row += 1
            unfinished += not generation.finished
            if constraint is not None:
                for span in constraint.copied:
                    score = _mean_prob(generation.logprobs[span.first : span.close + 1])
                    for start, end in span.words:
                        found.append(Candidate(task.window.start + start, task.window.start + end, prompt.label, score))
                continue
            for answer in fmt.parse_text(builder.decode(generation.ids), _mean_prob(generation.logprobs)):
                located = locate(task.pieces, answer.text)
                expanded += located.expanded
                unmatched += not located.ranges
                for start, end in located.ranges:
                    found.append(
                        Candidate(task.window.start + start, task.window.start + end, prompt.label, answer.score)
                    )
    if unfinished:
        logger.warning(
            "%d of %d answers hit max_new_tokens=%d before ending; their last span was left "
            "out. Raise `max_new_tokens` if this happens often.",
            unfinished, row, settings.max_new_tokens,
        )
    if expanded or unmatched:
        logger.info(
            "%d answer spans were expanded to token boundaries, %d not found in their sentence.",
            expanded, unmatched,
        )
    return candidates


def common_prefix_groups(prompts: Sequence[Sequence[int]]) -> List[PromptGroup]:
    """Group prompts that start alike (spacy-llm's prompts repeat the task text and the
    few-shot examples): one group per run of prompts sharing their longest common prefix.
    Every suffix keeps at least one token.
    """
    if not prompts:
        return []
    shared = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for other in prompts[1:]:
        shared = min(shared, common_prefix_length(first, other))
    shared = max(shared, 0)
    return [PromptGroup(list(first[:shared]), [list(p[shared:]) for p in prompts])]


def generate_texts(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    end_id: int,
    pad_id: int,
    settings: DecodingSettings,
    stats: Optional[DecodingStats] = None,
) -> List[Generation]:
    """Free greedy decoding of token id prompts (spacy-llm), with their common prefix
    computed once if `settings.shared_prefix`.

    RETURNS (List[Generation]): One per prompt, in order.
    """
    if not settings.shared_prefix:
        return generate(
            model, prompts, end_id=end_id, pad_id=pad_id, max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size, stats=stats,
        )
    return generate_groups(
        model,
        common_prefix_groups(prompts),
        end_id=end_id,
        pad_id=pad_id,
        max_new_tokens=settings.max_new_tokens,
        max_rows=settings.batch_size,
        max_tokens=settings.max_batch_tokens,
        refill=settings.refill,
        stats=stats,
    )


def _mean_prob(logprobs: Sequence[float]) -> float:
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 1.0
