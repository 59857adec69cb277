"""From answer strings to spaCy spans, and from overlapping candidates to entities.

An answer span is searched in the sentence text as the prompt showed it (the
word pieces of `PromptBuilder.word_pieces`), so that the character offsets of
each match map straight back to spaCy tokens. Every occurrence is kept. A
match that cuts through a token is expanded to whole tokens, never dropped.
"""
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

OVERLAP_STRATEGIES = ("longest", "score")


@dataclass(frozen=True)
class Candidate:
    """A predicted entity: [start, end) token indices in the Doc, label and score."""

    start: int
    end: int
    label: str
    score: float

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Located:
    """The token ranges [start, end) (relative to the sentence) where an answer occurs;
    `expanded` tells that the matches did not line up with token boundaries."""

    ranges: List[Tuple[int, int]]
    expanded: bool = False


def locate(pieces: Sequence[str], answer: str) -> Located:
    """Find every occurrence of `answer` in the sentence given as word pieces.

    pieces (Sequence[str]): The sentence's tokens as the prompt shows them ("" for
        whitespace tokens, a leading space where whitespace precedes a token).
    answer (str): A span the model produced.
    RETURNS (Located): Token-aligned matches if there are any, else the matches
        expanded to whole tokens; case-insensitive matching is the fallback.
    """
    target = " ".join(answer.split())
    if not target:
        return Located([])
    text = "".join(pieces)
    bounds: List[Tuple[int, int]] = []  # per token: content [start, end) in text
    offset = 0
    for piece in pieces:
        lead = len(piece) - len(piece.lstrip())
        bounds.append((offset + lead, offset + len(piece)))
        offset += len(piece)
    needle = target
    matches = _find_all(text, needle)
    if not matches:
        needle = _lower(target)
        matches = _find_all(_lower(text), needle)
    if not matches:
        return Located([])
    aligned, expanded = [], []
    for begin in matches:
        finish = begin + len(needle)
        tokens = [i for i, (s, e) in enumerate(bounds) if e > s and s < finish and e > begin]
        if not tokens:
            continue
        first, last = tokens[0], tokens[-1]
        span = (first, last + 1)
        if bounds[first][0] == begin and bounds[last][1] == finish:
            aligned.append(span)
        else:
            expanded.append(span)
    if aligned:
        return Located(_unique(aligned))
    return Located(_unique(expanded), expanded=bool(expanded))


def _lower(text: str) -> str:
    """Lower-case without changing the length, so that offsets still match the text:
    a character whose lower case is longer ("İ" -> "i̇") is kept as it is."""
    return "".join(low if len(low) == 1 else char for char, low in ((c, c.lower()) for c in text))


def _find_all(text: str, needle: str) -> List[int]:
    found, start = [], text.find(needle)
    while start >= 0:
        found.append(start)
        start = text.find(needle, start + 1)
    return found


def _unique(spans: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
    return sorted(set(spans))


def resolve_overlaps(candidates: Iterable[Candidate], strategy: str = "longest") -> List[Candidate]:
    """Choose non-overlapping entities among candidates, deterministically.

    strategy (str): "longest" prefers longer spans, then earlier ones, then higher
        scores (as spaCy's `filter_spans`); "score" prefers higher scores, then
        longer, then earlier spans. Remaining ties go to the label listed first.
    RETURNS (List[Candidate]): The kept candidates, sorted by start.
    """
    if strategy == "longest":
        key = lambda c: (-c.length, c.start, -c.score)  # noqa: E731
    elif strategy == "score":
        key = lambda c: (-c.score, -c.length, c.start)  # noqa: E731
    else:
        raise ValueError(f"Unknown overlap strategy '{strategy}'. Use one of {OVERLAP_STRATEGIES}.")
    taken: set = set()
    kept: List[Candidate] = []
    for candidate in sorted(candidates, key=key):  # sorted() is stable: label order breaks ties
        tokens = range(candidate.start, candidate.end)
        if not any(t in taken for t in tokens):
            kept.append(candidate)
            taken.update(tokens)
    return sorted(kept, key=lambda c: c.start)

