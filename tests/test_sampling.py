import random
import warnings
from typing import List, Sequence, Tuple

import pytest
from spacy.tokens import Doc, Span
from spacy.vocab import Vocab

from spacy_cllmfs.corpora import Episode, make_doc
from spacy_cllmfs.sampling import (
    FewShotWarning,
    greedy_k_shot,
    label_counts,
    restrict_labels,
    sample_episodes,
)

LABELS = ["PER", "ORG", "LOC", "MISC", "EVENT"]


def synthetic_corpus(n_docs: int = 400, seed: int = 13, labels: Sequence[str] = LABELS) -> List[Doc]:
    """Sentences "s{i} w w ..." with 0-3 random entities; every text unique."""
    rng = random.Random(seed)
    vocab = Vocab()
    docs = []
    for i in range(n_docs):
        words = [f"s{i}"] + ["w"] * 11
        spans: List[Tuple[int, int, str]] = []
        for slot in range(rng.choice([0, 1, 1, 2, 3])):
            start = 1 + 3 * slot
            spans.append((start, start + rng.choice([1, 2]), rng.choice(labels)))
        docs.append(make_doc(vocab, words, spans))
    return docs


def snapshot(docs: Sequence[Doc]):
    return [(d.text, [(t.ent_iob_, t.ent_type_) for t in d], dict(d.user_data)) for d in docs]


def texts(docs: Sequence[Doc]) -> List[str]:
    return [d.text for d in docs]


def test_label_counts():
    vocab = Vocab()
    docs = [make_doc(vocab, ["a", "b", "c"], [(0, 1, "X"), (2, 3, "Y")]), make_doc(vocab, ["d"], [(0, 1, "X")])]
    assert label_counts(docs) == {"X": 2, "Y": 1}
    assert label_counts(docs, ["Y", "Z"]) == {"Y": 1, "Z": 0}


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_greedy_bounds_all_labels(k):
    docs = synthetic_corpus()
    sample = greedy_k_shot(docs, k, seed=3)
    counts = label_counts(sample, LABELS)
    assert all(k <= n <= 2 * k for n in counts.values()), counts
    assert all(len(doc.ents) > 0 for doc in sample)
    assert len(set(texts(sample))) == len(sample)


def test_greedy_stops_as_soon_as_every_label_has_k():
    docs = synthetic_corpus()
    k = 5
    sample = greedy_k_shot(docs, k, seed=0)
    # Replaying Algorithm 1 in the same order: the last chosen sentence is the
    # first one after which every label has >= k mentions.
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    chosen_text = set(texts(sample))
    replay = [docs[i] for i in order if docs[i].text in chosen_text]
    for end in range(1, len(replay)):
        assert min(label_counts(replay[:end], LABELS).values()) < k
    assert min(label_counts(replay, LABELS).values()) >= k


def test_greedy_deterministic_and_seed_dependent():
    docs = synthetic_corpus()
    random.seed(1)
    first = texts(greedy_k_shot(docs, 5, seed=7))
    random.seed(2)
    random.random()
    second = texts(greedy_k_shot(docs, 5, seed=7))
    assert first == second
    others = [texts(greedy_k_shot(docs, 5, seed=s)) for s in range(8, 12)]
    assert any(other != first for other in others)
    # returned in corpus order
    positions = {d.text: i for i, d in enumerate(docs)}
    assert [positions[t] for t in first] == sorted(positions[t] for t in first)


def test_greedy_label_subset_removes_other_entities():
    docs = synthetic_corpus()
    before = snapshot(docs)
    sample = greedy_k_shot(docs, 4, labels=["PER", "LOC"], seed=0)
    counts = label_counts(sample)
    assert set(counts) == {"PER", "LOC"}
    assert all(4 <= n <= 8 for n in counts.values())
    by_text = {d.text: d for d in docs}
    for doc in sample:
        original = by_text[doc.text]
        assert doc is not original
        for token, orig in zip(doc, original):
            if orig.ent_type_ in ("PER", "LOC"):
                assert (token.ent_iob_, token.ent_type_) == (orig.ent_iob_, orig.ent_type_)
            else:
                assert token.ent_iob_ == "O" and token.ent_type_ == ""
    assert snapshot(docs) == before


def test_greedy_does_not_mutate_inputs():
    docs = synthetic_corpus()
    docs[0].user_data["source"] = "x"
    before = snapshot(docs)
    ids = [id(d) for d in docs]
    sample = greedy_k_shot(docs, 3, labels=["MISC"], seed=1)
    for doc in sample:
        doc.user_data["touched"] = True
    assert snapshot(docs) == before
    assert [id(d) for d in docs] == ids
    assert not any(id(d) in ids for d in sample)


def test_restrict_labels_keeps_missing_annotation():
    vocab = Vocab()
    doc = Doc(vocab, words=["a", "b", "c"])
    doc.set_ents([Span(doc, 0, 1, label="X"), Span(doc, 2, 3, label="Y")], default="unmodified")
    copy = restrict_labels(doc, ["Y"])
    assert [(t.ent_iob_, t.ent_type_) for t in copy] == [("O", ""), ("", ""), ("B", "Y")]
    assert [(t.ent_iob_, t.ent_type_) for t in doc] == [("B", "X"), ("", ""), ("B", "Y")]


def test_greedy_warns_when_data_runs_out():
    vocab = Vocab()
    docs = [
        make_doc(vocab, ["a", "b"], [(0, 1, "X")]),
        make_doc(vocab, ["c", "d"], [(0, 1, "X"), (1, 2, "Y")]),
        make_doc(vocab, ["e"], []),
    ]
    with pytest.warns(FewShotWarning) as record:
        sample = greedy_k_shot(docs, 3, labels=["X", "Y", "Z"], seed=0)
    message = str(record[0].message)
    assert "'X': 2" in message and "'Y': 1" in message and "'Z': 0" in message and "k=3" in message
    assert texts(sample) == ["a b", "c d"]


def test_greedy_no_warning_when_k_reached():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy_k_shot(synthetic_corpus(), 2, seed=0)


def test_greedy_rejects_bad_arguments():
    docs = synthetic_corpus(20)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        greedy_k_shot(docs, 0)
    with pytest.raises(ValueError, match="list of labels"):
        greedy_k_shot(docs, 1, labels="PER")
    with pytest.raises(ValueError, match="no entity labels"):
        greedy_k_shot([make_doc(Vocab(), ["a"], [])], 1)


def test_sample_episodes():
    docs = synthetic_corpus(600)
    before = snapshot(docs)
    episodes = sample_episodes(docs, n_way=3, k_shot=2, n_query=3, n_episodes=5, seed=4)
    assert len(episodes) == 5
    for episode in episodes:
        assert isinstance(episode, Episode)
        assert len(episode.types) == 3 and set(episode.types) <= set(LABELS)
        support = label_counts(episode.support)
        query = label_counts(episode.query)
        assert set(support) == set(episode.types) == set(query)
        assert all(2 <= n <= 4 for n in support.values()), support
        assert all(3 <= n <= 6 for n in query.values()), query
        assert not set(texts(episode.support)) & set(texts(episode.query))
    assert len({tuple(e.types) for e in episodes}) > 1
    assert snapshot(docs) == before
    again = sample_episodes(docs, 3, 2, 3, 5, seed=4)
    assert [(e.types, texts(e.support), texts(e.query)) for e in again] == [
        (e.types, texts(e.support), texts(e.query)) for e in episodes
    ]
    other = sample_episodes(docs, 3, 2, 3, 5, seed=5)
    assert [texts(e.support) for e in other] != [texts(e.support) for e in episodes]


def test_sample_episodes_errors():
    docs = synthetic_corpus(50)
    with pytest.raises(ValueError, match="n_way=6 but the corpus has only 5"):
        sample_episodes(docs, 6, 1, 1, 1)
    with pytest.raises(ValueError, match="n_query must be a positive integer"):
        sample_episodes(docs, 2, 1, 0, 1)


def dense_corpus() -> List[Doc]:
    """Most sentences hold the common label C three times; the rare label R sits in
    sentences with one C, so Algorithm 1 tends to fill C up to 2K first and then
    rejects R's sentences."""
    vocab = Vocab()
    docs = []
    for i in range(40):
        words = [f"s{i}"] + ["w"] * 8
        spans = [(1, 2, "C"), (3, 4, "C"), (5, 6, "C")]
        if i % 4 == 0:
            spans = [(1, 2, "C"), (7, 8, "R")]
        docs.append(make_doc(vocab, words, spans))
    return docs


def test_balanced_strategy_reaches_k_where_greedy_cannot():
    docs = dense_corpus()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy = greedy_k_shot(docs, 3, seed=1, strategy="greedy")
    assert caught and label_counts(greedy, ["R"])["R"] < 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FewShotWarning
        balanced = greedy_k_shot(docs, 3, seed=1, strategy="balanced")
    counts = label_counts(balanced, ["C", "R"])
    assert all(3 <= n <= 6 for n in counts.values()), counts
    assert texts(balanced) == texts(greedy_k_shot(docs, 3, seed=1, strategy="balanced"))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_balanced_strategy_keeps_the_bounds(k):
    sample = greedy_k_shot(synthetic_corpus(), k, seed=1, strategy="balanced")
    assert all(k <= n <= 2 * k for n in label_counts(sample, LABELS).values())
    with pytest.raises(ValueError, match="Unknown sampling strategy"):
        greedy_k_shot(synthetic_corpus(), k, strategy="random")
