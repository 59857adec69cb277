"""The copy constraint: answers may only copy spans of the input sentence.

An answer is `(open SPAN close)* end`, where SPAN is a run of consecutive
sentence words copied token by token from the prompt. The automaton below
tracks, per generated token, which tokens may come next, so every answer
parses and every span is a span of the input. With `ordered=True` each span
must start after the previous one (gold answers list spans in sentence
order), which also bounds the answer: it cannot repeat itself forever.

`open_bias` is added to the log-probability of opening a span wherever the
answer may open one or end: a calibration of the open-or-end decision (see
`calibration`), since few-shot training leaves that decision off balance.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .prompts import AnswerFormat, Prompt

OUTSIDE, OPENING, SPAN_FIRST, IN_SPAN, CLOSING, DONE = range(6)


@dataclass
class CopiedSpan:
    """A span the answer copied: where it sits in the answer and where in the sentence.

    first (int): Index of its first token among the generated tokens.
    close (int): Index of the first token of its closing delimiter.
    words (List[Tuple[int, int]]): Every [start, end) word range of the sentence that
        the copied tokens match (a repeated name matches several).
    """

    first: int
    close: int
    words: List[Tuple[int, int]]


class CopyConstraint:
    """Allowed next tokens for one prompt's answer.

    prompt (Prompt): The prompt whose sentence may be copied.
    fmt (AnswerFormat): Delimiter and end-of-answer ids.
    ordered (bool): Each span must start after the start of the previous one.
    open_bias (float): Added to the log-probability of opening a span (vs ending).
    """

    def __init__(self, prompt: Prompt, fmt: AnswerFormat, ordered: bool = True, open_bias: float = 0.0) -> None:
        self.fmt = fmt
        self.ordered = ordered
        self.open_bias = open_bias
        self.tokens: List[int] = []
        self.word_start: List[bool] = []
        self.word_end: List[bool] = []
        self.word_of: List[int] = []
        for word, (start, end) in enumerate(prompt.word_spans):
            for pos in range(start, end):
                self.tokens.append(prompt.ids[pos])
                self.word_start.append(pos == start)
                self.word_end.append(pos == end - 1)
                self.word_of.append(word)
        self._starts: Dict[int, List[int]] = {}
        for j, (token, is_start) in enumerate(zip(self.tokens, self.word_start)):
            if is_start:
                self._starts.setdefault(token, []).append(j)
        self.mode = OUTSIDE
        self.forced_index = 0
        self.last_start = -1
        self.ends: Dict[int, int] = {}  # last matched sentence position -> span start
        self.steps = 0  # tokens generated so far
        self.span_first = 0
        self.copied: List[CopiedSpan] = []

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def _can_open(self) -> bool:
        return any(j > self.last_start for js in self._starts.values() for j in js)

    def _closable(self) -> bool:
        return any(self.word_end[j] for j in self.ends)

    def allowed(self) -> List[int]:
        """RETURNS (List[int]): The token ids that may come next."""
        mode, fmt = self.mode, self.fmt
        if mode == OUTSIDE:
            return [fmt.open_ids[0], fmt.end_id] if self._can_open() else [fmt.end_id]
        if mode == OPENING:
            return [fmt.open_ids[self.forced_index]]
        if mode == CLOSING:
            return [fmt.close_ids[self.forced_index]]
        if mode == SPAN_FIRST:
            return [t for t, js in self._starts.items() if any(j > self.last_start for j in js)]
        if mode == IN_SPAN:
            n = len(self.tokens)
            nexts = {self.tokens[j + 1] for j in self.ends if j + 1 < n}
            if self._closable():
                nexts.add(fmt.close_ids[0])
            return list(nexts)
        return [fmt.end_id]

    def bias(self) -> Optional[List[float]]:
        """RETURNS (Optional[List[float]]): Offsets to add to the log-probabilities of
        `allowed()`, or None for none."""
        if self.open_bias and self.mode == OUTSIDE and self._can_open():
            return [self.open_bias, 0.0]
        return None

    def advance(self, token: int) -> None:
        """Move the automaton on by one generated token (which must be allowed)."""
        mode, fmt = self.mode, self.fmt
        self.steps += 1
        if mode == OUTSIDE:
            if token == fmt.end_id:
                self.mode = DONE
            else:
                self._forced(OPENING, fmt.open_ids, then=SPAN_FIRST)
        elif mode == OPENING:
            self._forced(OPENING, fmt.open_ids, then=SPAN_FIRST, index=self.forced_index + 1)
        elif mode == CLOSING:
            self._forced(CLOSING, fmt.close_ids, then=OUTSIDE, index=self.forced_index + 1)
        elif mode == SPAN_FIRST:
            self.ends = {j: j for j in self._starts.get(token, []) if j > self.last_start}
            self.span_first = self.steps - 1
            self.mode = IN_SPAN
        elif mode == IN_SPAN:
            # A token that could close the span or continue it closes it.
            if token == fmt.close_ids[0] and self._closable():
                matches = sorted((s, j) for j, s in self.ends.items() if self.word_end[j])
                words = [(self.word_of[s], self.word_of[j] + 1) for s, j in matches]
                self.copied.append(CopiedSpan(self.span_first, self.steps - 1, words))
                self.last_start = matches[0][0]
                if not self.ordered:
                    self.last_start = -1
                self.ends = {}
                self._forced(CLOSING, fmt.close_ids, then=OUTSIDE)
            else:
                n = len(self.tokens)
                self.ends = {
                    j + 1: s for j, s in self.ends.items() if j + 1 < n and self.tokens[j + 1] == token
                }

    def _forced(self, mode: int, ids: Sequence[int], then: int, index: int = 1) -> None:
        if index < len(ids):
            self.mode, self.forced_index = mode, index
        else:
            self.mode, self.forced_index = then, 0
