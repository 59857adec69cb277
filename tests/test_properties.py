"""Property tests (hypothesis): alignment, windows, the copy constraint and `nlp.pipe`
on random docs: Unicode, whitespace tokens, empty docs, overlong sentences, labels
with spaces.

The suite runs a fast, derandomized subset. `python bench/properties.py` runs the
same properties on 10,000+ random cases (CLLMFS_PROPERTY_EXAMPLES scales them).
"""
import os
import random
from typing import List, Sequence

import pytest
import spacy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from spacy.tokens import Doc
from transformers import AutoTokenizer

from spacy_cllmfs.alignment import Candidate, locate, resolve_overlaps
from spacy_cllmfs.constraints import CopyConstraint
from spacy_cllmfs.labels import label_infos
from spacy_cllmfs.prompts import PromptBuilder, prompt_v1
from spacy_cllmfs.windows import make_windows

SCALE = int(os.environ.get("CLLMFS_PROPERTY_EXAMPLES", "0"))  # 0: the fast subset
LABELS = ["person", "work of art", "political party"]


def scaled(fast: int, share: float = 1.0) -> settings:
    """`fast` examples in the suite (same ones every run); SCALE * share in a bench run."""
    return settings(
        max_examples=max(fast, int(SCALE * share)) if SCALE else fast,
        derandomize=not SCALE,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


VOCAB = spacy.blank("en").vocab
WORD_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
word = st.one_of(
    st.sampled_from(["Obama", "Paris", "New", "York", "'s", ".", ",", "!", "Zürich", "İstanbul", "北京", "ß"]),
    st.text(WORD_CHARS, min_size=1, max_size=6).filter(lambda w: not any(c.isspace() for c in w)),
)
space_token = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\u00a0", " \u2003"])


@st.composite
def docs(draw, max_tokens: int = 30) -> Doc:
    """A Doc of random words and whitespace tokens, maybe with sentence boundaries set."""
    words = draw(st.lists(st.one_of(word, word, word, space_token), max_size=max_tokens))
    spaces = draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words)))
    spaces = [s and not w.isspace() for w, s in zip(words, spaces)]
    doc = Doc(VOCAB, words=words, spaces=spaces)
    if words and draw(st.booleans()):
        starts = draw(st.lists(st.booleans(), min_size=len(words), max_size=len(words)))
        for token, is_start in zip(doc, starts):
            token.is_sent_start = is_start or token.i == 0
    return doc


def check_token_range(pieces: Sequence[str], start: int, end: int) -> None:
    assert 0 <= start < end <= len(pieces)
    assert pieces[start] and pieces[end - 1], "a span starts or ends on a whitespace token"


@pytest.fixture(scope="module")
def builder(tiny_model_path):
    return PromptBuilder(prompt_v1(), AutoTokenizer.from_pretrained(tiny_model_path))


# -- alignment -------------------------------------------------------------------------


@scaled(100, 0.25)
@given(doc=docs(), data=st.data())
def test_locate_finds_copied_spans_on_token_boundaries(builder, doc, data):
    pieces = builder.word_pieces(doc[:])
    text = "".join(pieces)
    content = [i for i, piece in enumerate(pieces) if piece]
    kind = data.draw(st.sampled_from(["tokens", "other case", "substring", "random"]))
    if kind in ("tokens", "other case") and content:
        i = data.draw(st.sampled_from(content))
        j = data.draw(st.sampled_from([k for k in content if k >= i]))
        answer = "".join(pieces[i : j + 1])
        if kind == "other case":  # ASCII letters only: their lower case is one letter
            answer = "".join(c.swapcase() if c.isascii() else c for c in answer)
    elif kind == "substring" and text:
        a = data.draw(st.integers(0, len(text) - 1))
        answer = text[a : data.draw(st.integers(a + 1, len(text)))]
    else:
        answer = data.draw(st.text(max_size=12))
    located = locate(pieces, answer)
    assert located.ranges == sorted(set(located.ranges))
    for start, end in located.ranges:
        check_token_range(pieces, start, end)
        covered = "".join(pieces[start:end]).lower()
        assert " ".join(answer.split()).lower() in " ".join(covered.split()) or located.expanded
    exact = " ".join(answer.split()) in " ".join(text.split())
    if content and (kind == "tokens" or kind == "other case" and not exact):
        assert (i, j + 1) in located.ranges and not located.expanded


candidates = st.lists(
    st.builds(
        lambda start, length, label, score: Candidate(start, start + length, label, score),
        st.integers(0, 30), st.integers(1, 8), st.sampled_from(LABELS), st.floats(0, 1),
    ),
    max_size=25,
)


@scaled(200, 0.25)
@given(found=candidates, strategy=st.sampled_from(["longest", "score"]))
def test_resolve_overlaps_keeps_a_maximal_set_of_disjoint_candidates(found: List[Candidate], strategy: str):
    kept = resolve_overlaps(found, strategy)
    assert kept == resolve_overlaps(list(found), strategy)  # deterministic
    assert [c.start for c in kept] == sorted(c.start for c in kept)
    assert all(c in found for c in kept)
    for a, b in zip(kept, kept[1:]):
        assert a.end <= b.start, "kept candidates overlap"
    for candidate in found:  # whatever was dropped lost to an overlapping kept candidate
        assert any(k.start < candidate.end and candidate.start < k.end for k in kept)
    if found and strategy == "longest":
        assert max(c.length for c in kept) == max(c.length for c in found)


# -- windows ---------------------------------------------------------------------------


@scaled(150, 0.25)
@given(doc=docs(max_tokens=60), data=st.data())
def test_windows_cover_every_token_once_within_budget(doc, data):
    counts = [0 if t.is_space else data.draw(st.integers(1, 6)) for t in doc]
    budget = data.draw(st.integers(1, 40))
    had_sents = doc.has_annotation("SENT_START")
    windows = make_windows(doc, counts, budget)
    assert doc.has_annotation("SENT_START") == had_sents  # the Doc is not modified
    covered = [i for w in windows for i in range(w.start, w.end)]
    assert covered == sorted(set(covered)), "windows overlap or are out of order"
    assert [i for i in covered if counts[i]] == [i for i, c in enumerate(counts) if c]
    for window in windows:
        assert window.doc is doc and 0 <= window.start < window.end <= len(doc)
        used = [counts[i] for i in range(window.start, window.end) if counts[i]]
        assert used and (sum(used) <= budget or used == [max(used)] and max(used) > budget)


# -- the copy constraint ---------------------------------------------------------------


def walk(constraint: CopyConstraint, rng: random.Random, max_steps: int) -> List[int]:
    out: List[int] = []
    for _ in range(max_steps):
        allowed = constraint.allowed()
        assert allowed, "no token allowed before the answer ended"
        token = rng.choice(allowed)
        constraint.advance(token)
        if constraint.done:
            return out
        out.append(token)
    return out


@scaled(60, 0.23)
@given(doc=docs(), label=st.sampled_from(LABELS), seed=st.integers(0, 2**32 - 1), ordered=st.booleans())
def test_copy_constraint_only_copies_whole_input_spans(builder, doc, label, seed, ordered):
    pieces = builder.word_pieces(doc[:])
    (prompt,) = builder.build(pieces, label_infos([label]))
    constraint = CopyConstraint(prompt, builder.format, ordered)
    n_ids = len(prompt.sentence_ids())
    max_steps = 4 * (n_ids + 4) ** 2
    ids = walk(constraint, random.Random(seed), max_steps)
    if ordered:
        assert constraint.done, "an ordered answer must end"
    # an unordered walk may be cut inside a span: parse_ids leaves an unfinished one out
    for span in builder.format.parse_ids(ids, [0.0] * len(ids), builder.decode):
        located = locate(pieces, span.text)
        assert located.ranges and not located.expanded, span.text
        for start, end in located.ranges:
            check_token_range(pieces, start, end)
    if not any(pieces):
        assert ids == []  # nothing to copy: the answer ends at once


# -- the pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_config):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": LABELS[1:], "max_new_tokens": 6,
                                       "max_window_tokens": 20, "batch_size": 16})
    nlp("warm up")
    yield nlp
    torch.set_num_threads(threads)


@st.composite
def texts(draw) -> str:
    doc = draw(docs(max_tokens=16))
    return doc.text


@scaled(6, 0.02)
@given(batch=st.lists(st.one_of(texts(), st.just(""), st.just("  \n ")), min_size=1, max_size=3),
       batch_size=st.integers(1, 3))
def test_nlp_pipe_keeps_order_and_sets_entities_on_token_boundaries(tiny_pipeline, batch, batch_size):
    assume(all(len(tiny_pipeline.make_doc(t)) < 200 for t in batch))
    out = list(tiny_pipeline.pipe(batch, batch_size=batch_size))
    assert [doc.text for doc in out] == batch  # order kept
    for doc in out:
        for ent in doc.ents:
            assert 0 <= ent.start < ent.end <= len(doc) and ent.label_ in LABELS[1:]
            assert ent.start_char == doc[ent.start].idx
            assert ent.end_char == doc[ent.end - 1].idx + len(doc[ent.end - 1].text)
            assert not doc[ent.start].is_space and not doc[ent.end - 1].is_space
