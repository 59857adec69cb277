import random
from collections import Counter

import pytest
import spacy
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_cllmfs.negatives import LabelCooccurrence, choose_negatives, negatives_for

LABELS = ["person", "politician", "party", "country", "event", "award", "location", "organisation"]


def example(nlp, labels):
    doc = Doc(nlp.vocab, words=[f"w{i}" for i in range(len(labels))] + ["."])
    doc.set_ents([Span(doc, i, i + 1, label=label) for i, label in enumerate(labels)], default="outside")
    return Example(Doc(nlp.vocab, words=[t.text for t in doc]), doc)


def test_negatives_follow_the_positives():
    rng = random.Random(0)
    assert negatives_for(2, None, 15, rng) == 15  # None: every absent label
    assert negatives_for(2, 1.0, 15, rng) == 2
    assert negatives_for(0, 1.0, 15, rng) == 1  # a sentence without entities counts as one positive
    assert negatives_for(3, 2.0, 4, rng) == 4  # never more than the absent labels
    assert negatives_for(2, 0.0, 15, rng) == 0
    draws = [negatives_for(1, 0.25, 10, rng) for _ in range(4000)]
    assert set(draws) == {0, 1} and sum(draws) / len(draws) == pytest.approx(0.25, abs=0.03)


def test_cooccurrence_counts():
    nlp = spacy.blank("en")
    stats = LabelCooccurrence.from_examples(
        [example(nlp, ["politician", "party"]), example(nlp, ["politician", "person"]), example(nlp, ["event"])],
        LABELS,
    )
    assert stats.totals["politician"] == 2
    assert stats.affinity("party", ["politician"]) == pytest.approx(0.5)
    assert stats.affinity("award", ["politician"]) == 0.0
    assert stats.affinity("politician", ["party", "person"]) == pytest.approx(2.0)
    assert stats.affinity("person", ["unknown"]) == 0.0


def test_confusable_labels_come_first_but_all_keep_a_chance():
    nlp = spacy.blank("en")
    stats = LabelCooccurrence.from_examples(
        [example(nlp, ["politician", "party"]), example(nlp, ["politician", "party", "country"])], LABELS
    )
    absent = [label for label in LABELS if label != "politician"]
    rng = random.Random(0)
    picks = Counter(
        label for _ in range(2000) for label in choose_negatives(["politician"], absent, 1, rng, "confusable", stats)
    )
    assert picks.most_common(1)[0][0] == "party"
    assert picks["party"] > picks["country"] > picks["award"] > 0
    uniform = Counter(
        label for _ in range(2000) for label in choose_negatives(["politician"], absent, 1, rng, "uniform", stats)
    )
    assert max(uniform.values()) < 2 * min(uniform.values())


def test_choose_negatives_edges():
    rng = random.Random(0)
    absent = ["a", "b", "c"]
    assert choose_negatives(["x"], absent, 5, rng) == absent
    assert choose_negatives(["x"], absent, 0, rng) == []
    two = choose_negatives([], absent, 2, rng, "confusable", LabelCooccurrence())
    assert len(two) == 2 and two == [label for label in absent if label in two]  # in label order
    with pytest.raises(ValueError, match="negative_sampling"):
        choose_negatives(["x"], absent, 1, rng, "hardest")
