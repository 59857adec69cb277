import random

import pytest
import spacy
from transformers import AutoTokenizer

from spacy_cllmfs.alignment import locate
from spacy_cllmfs.constraints import CopyConstraint
from spacy_cllmfs.labels import LabelInfo
from spacy_cllmfs.prompts import AnswerFormat, Prompt, PromptBuilder, prompt_v1

PERSON = LabelInfo("person", "person", "names of people")


@pytest.fixture(scope="module")
def builder(tiny_model_path):
    return PromptBuilder(prompt_v1(), AutoTokenizer.from_pretrained(tiny_model_path))


def walk(constraint, rng, max_steps=200):
    out = []
    for _ in range(max_steps):
        token = rng.choice(constraint.allowed())
        constraint.advance(token)
        if constraint.done:
            return out
        out.append(token)
    raise AssertionError("the automaton did not end")


@pytest.mark.parametrize("seed", range(30))
def test_random_walks_only_copy_input_spans(builder, seed):
    nlp = spacy.blank("en")
    doc = nlp("Obama met Obama in Paris , then New York 's mayor met Obama .")
    pieces = builder.word_pieces(doc[:])
    prompt = builder.build(pieces, [PERSON])[0]
    rng = random.Random(seed)
    ids = walk(CopyConstraint(prompt, builder.format), rng)
    spans = builder.format.parse_ids(ids, [0.0] * len(ids), builder.decode)
    text = builder.decode(ids)
    assert text.count("<<<") == text.count(">>>") == len(spans)
    for span in spans:
        located = locate(pieces, span.text)
        assert located.ranges and not located.expanded, span.text


def test_ordered_spans_start_later_each_time():
    # sentence tokens 10 11 12 13 (one token per word)
    prompt = Prompt(ids=[1, 10, 11, 12, 13], label="x", shared_len=1,
                    word_spans=[(1, 2), (2, 3), (3, 4), (4, 5)], label_positions=[])
    fmt = AnswerFormat(open_ids=[90, 91], close_ids=[92], end_id=99)
    c = CopyConstraint(prompt, fmt)
    assert sorted(c.allowed()) == [90, 99]
    c.advance(90)
    assert c.allowed() == [91]  # delimiters are forced
    c.advance(91)
    assert sorted(c.allowed()) == [10, 11, 12, 13]
    c.advance(12)
    assert sorted(c.allowed()) == [13, 92]
    c.advance(92)
    assert sorted(c.allowed()) == [90, 99]
    c.advance(90), c.advance(91)
    assert c.allowed() == [13]  # only starts after the previous span's start
    c.advance(13), c.advance(92)
    assert c.allowed() == [99]  # nothing left to copy: the answer must end
    c.advance(99)
    assert c.done


def test_multi_token_words_close_only_at_word_ends():
    # word 0 = tokens 10 11, word 1 = token 12
    prompt = Prompt(ids=[10, 11, 12], label="x", shared_len=0,
                    word_spans=[(0, 2), (2, 3)], label_positions=[])
    fmt = AnswerFormat(open_ids=[90], close_ids=[92, 93], end_id=99)
    c = CopyConstraint(prompt, fmt)
    c.advance(90)
    assert sorted(c.allowed()) == [10, 12]  # word starts only, not 11
    c.advance(10)
    assert c.allowed() == [11]  # cannot close inside a word
    c.advance(11)
    assert sorted(c.allowed()) == [12, 92]
    c.advance(92)
    assert c.allowed() == [93]


def test_unordered_allows_going_back():
    prompt = Prompt(ids=[10, 11], label="x", shared_len=0, word_spans=[(0, 1), (1, 2)], label_positions=[])
    fmt = AnswerFormat(open_ids=[90], close_ids=[92], end_id=99)
    c = CopyConstraint(prompt, fmt, ordered=False)
    for token in (90, 11, 92, 90):
        c.advance(token)
    assert sorted(c.allowed()) == [10, 11]


def test_empty_sentence_can_only_end():
    prompt = Prompt(ids=[1, 2], label="x", shared_len=2, word_spans=[], label_positions=[])
    c = CopyConstraint(prompt, AnswerFormat(open_ids=[90], close_ids=[92], end_id=99))
    assert c.allowed() == [99]
