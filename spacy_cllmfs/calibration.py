"""Calibrating the open-or-end decision on a small dev set.

Every answer starts with one decision: open a span or end ("no entity"). A
few-shot adapter sees far more (or, with sampled negatives, far fewer) empty
answers than a real sentence has, so that decision comes out biased, and one
bias is enough to lose every entity of a domain. Calibration scores the first
decision of every (dev window, label) prompt in one prefill pass (no
decoding), and picks the offset `open_bias` for log P(open) - log P(end) that
best separates prompts whose label has an entity in the window from the
others (F1 of the positive prompts). Decoding adds it wherever an answer may
open a span or end (see `constraints.CopyConstraint`). The prompt-level F1 is
a proxy, and 20 dev sentences are few: `CLLMFSNer.calibrate` keeps the offset
only if the entity F1 on the same dev set does not drop with it.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .decoding import first_logprobs
from .inference import DecodingSettings, WindowPrompts, in_prompt_order, prompt_groups
from .prompts import AnswerFormat

MAX_BIAS = 8.0


@dataclass
class Calibration:
    """The chosen offset and what it does on the dev prompts.

    open_bias (float): Offset added to log P(open) - log P(end).
    prompts (int): Dev prompts scored.
    positives (int): Of those, prompts whose label has an entity in the window.
    f1_before (float): Prompt-level F1 of "opens a span" without the offset.
    f1_after (float): The same with it.
    ents_f_before (Optional[float]): Entity F1 on the dev set with the previous offset
        (None: not checked).
    ents_f_after (Optional[float]): The same with the new offset.
    kept (bool): Whether the new offset was kept (not when it lowered the entity F1).
    """

    open_bias: float
    prompts: int
    positives: int
    f1_before: float
    f1_after: float
    ents_f_before: Optional[float] = None
    ents_f_after: Optional[float] = None
    kept: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def decision_margins(
    model: Any, tasks: Sequence[WindowPrompts], fmt: AnswerFormat, settings: DecodingSettings, pad_id: int
) -> List[float]:
    """RETURNS (List[float]): log P(open) - log P(end) for the first answer token of every
    prompt of `tasks`, in task and label order."""
    groups, rows = prompt_groups(tasks, settings.batch_size)
    if not groups:
        return []
    logp = first_logprobs(
        model,
        groups,
        [fmt.open_ids[0], fmt.end_id],
        pad_id=pad_id,
        max_rows=settings.batch_size,
        max_tokens=settings.max_batch_tokens,
    )
    return in_prompt_order((logp[:, 0] - logp[:, 1]).tolist(), rows)


def _f1(margins: Sequence[float], positive: Sequence[bool], bias: float) -> float:
    tp = sum(1 for m, p in zip(margins, positive) if p and m + bias > 0)
    fp = sum(1 for m, p in zip(margins, positive) if not p and m + bias > 0)
    fn = sum(1 for m, p in zip(margins, positive) if p and m + bias <= 0)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def fit_open_bias(margins: Sequence[float], positive: Sequence[bool], max_bias: float = MAX_BIAS) -> Calibration:
    """Choose the offset that maximises the F1 of "opens a span" on prompts with an
    entity: thresholds between consecutive margins, ties broken towards 0, kept in
    [-max_bias, max_bias]. Without positive prompts the offset stays 0.

    margins (Sequence[float]): log P(open) - log P(end) per prompt.
    positive (Sequence[bool]): Whether the prompt's label has an entity in its window.
    RETURNS (Calibration): The offset and its effect.
    """
    if len(margins) != len(positive):
        raise ValueError(f"{len(margins)} margins for {len(positive)} gold decisions.")
    n_pos = sum(bool(p) for p in positive)
    before = _f1(margins, positive, 0.0)
    if not n_pos:
        return Calibration(0.0, len(margins), 0, before, before)
    ordered = sorted(set(margins))
    cuts = [(a + b) / 2 for a, b in zip(ordered, ordered[1:])] + [ordered[0] - 1e-3, ordered[-1] + 1e-3]
    biases = sorted({min(max_bias, max(-max_bias, -cut)) for cut in cuts} | {0.0}, key=abs)
    best = max(biases, key=lambda b: _f1(margins, positive, b))  # max keeps the first (smallest |b|) of ties
    return Calibration(best, len(margins), n_pos, before, _f1(margins, positive, best))
