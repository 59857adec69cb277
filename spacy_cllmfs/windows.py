"""Long documents -> windows of whole sentences that fit the prompt budget.

A window is a `Span` of the Doc, so the offsets of anything found in it map
back to the Doc directly. Consecutive sentences share a window while they fit;
a sentence longer than the budget is cut between tokens, and a single token longer
than the budget (a long URL, say) gets a window of its own. Nothing is dropped.
The Doc is never modified: without sentence boundaries, a sentencizer's
predictions are used, not set.
"""
import logging
from typing import Callable, List, Sequence

from spacy.pipeline import Sentencizer
from spacy.tokens import Doc, Span

logger = logging.getLogger("spacy_cllmfs")
_SENTENCIZER = Sentencizer()


def sentence_starts(doc: Doc) -> List[int]:
    """RETURNS (List[int]): The token index where each sentence starts."""
    if doc.has_annotation("SENT_START"):
        return [sent.start for sent in doc.sents]
    guesses = _SENTENCIZER.predict([doc])[0]
    starts = [i for i, is_start in enumerate(guesses) if is_start]
    return starts if starts and starts[0] == 0 else [0] + starts


def make_windows(doc: Doc, token_counts: Sequence[int], max_tokens: int) -> List[Span]:
    """Split a Doc into windows of at most `max_tokens` model tokens.

    doc (Doc): The document.
    token_counts (Sequence[int]): Model tokens of each spaCy token (0 for whitespace).
    max_tokens (int): The budget of one window.
    RETURNS (List[Span]): Windows in order, covering every non-whitespace token once.
    """
    if len(token_counts) != len(doc):
        raise ValueError(f"{len(token_counts)} token counts for a Doc of {len(doc)} tokens.")
    if max_tokens < 1:
        raise ValueError(f"The window budget must be >= 1 token, got {max_tokens}.")
    if not any(token_counts):
        return []
    if sum(token_counts) <= max_tokens:
        return [doc[:]]
    starts = sentence_starts(doc) + [len(doc)]
    pieces: List[range] = []
    for begin, end in zip(starts, starts[1:]):
        pieces.extend(_split_long(range(begin, end), token_counts, max_tokens))
    windows: List[Span] = []
    current: List[int] = []  # token range of the window being filled: [first, last]
    used = 0
    for piece in pieces:
        size = sum(token_counts[i] for i in piece)
        if current and used + size > max_tokens:
            windows.append(doc[current[0] : current[1]])
            current, used = [], 0
        current = [current[0] if current else piece.start, piece.stop]
        used += size
    if current:
        windows.append(doc[current[0] : current[1]])
    return [w for w in windows if any(token_counts[i] for i in range(w.start, w.end))]


def _split_long(tokens: range, token_counts: Sequence[int], max_tokens: int) -> List[range]:
    """Cut a sentence that exceeds the budget into runs of tokens that fit."""
    if sum(token_counts[i] for i in tokens) <= max_tokens:
        return [tokens]
    runs: List[range] = []
    start, used = tokens.start, 0
    for i in tokens:
        if token_counts[i] > max_tokens:  # e.g. a long URL: a window of its own, over budget
            logger.warning(
                "Token %d alone needs %d model tokens, more than the window budget of %d; it gets a "
                "window of its own. Raise `max_window_tokens` if this happens often.",
                i, token_counts[i], max_tokens,
            )
        if used + token_counts[i] > max_tokens and i > start:
            runs.append(range(start, i))
            start, used = i, 0
        used += token_counts[i]
    runs.append(range(start, tokens.stop))
    return runs


TokenCounter = Callable[[Span], List[int]]
