import pytest
from spacy.vocab import Vocab

from spacy_cllmfs.corpora import make_doc
from spacy_cllmfs.labels import annotated_labels
from spacy_cllmfs.mixing import mix_corpora, mix_picks


def corpus(vocab, name, labels, n):
    """`n` one-entity sentences (cycling through `labels`) and one without entities."""
    docs = [make_doc(vocab, [f"{name}{i}", "x"], [(0, 1, labels[i % len(labels)])]) for i in range(n)]
    return docs + [make_doc(vocab, [f"{name}-empty"], [])]


def test_mix_shares_fills_and_declares_labels():
    vocab = Vocab()
    general = corpus(vocab, "g", ["PER", "LOC"], 20)
    music = corpus(vocab, "m", ["band"], 2)  # fewer than its share
    science = corpus(vocab, "s", ["protein", "enzyme"], 10)
    mix = mix_corpora([general, music, science], 9, fill=0, seed=0)
    names = [doc[0].text.rstrip("0123456789") for doc in mix]
    # an equal share of 9 // 3 = 3 each, up to what a corpus has; the fill corpus takes the rest
    assert len(mix) == 9 and names.count("m") == 2 and names.count("s") == 3 and names.count("g") == 4
    assert all(len(doc.ents) for doc in mix)  # sentences without entities are left out
    declared = {name: tuple(annotated_labels(doc)) for name, doc in zip(names, mix)}
    assert declared == {"g": ("LOC", "PER"), "m": ("band",), "s": ("enzyme", "protein")}
    assert [d.text for d in mix_corpora([general, music, science], 9, fill=0, seed=0)] == [d.text for d in mix]
    assert names != sorted(names)  # shuffled, not one corpus after the other


def test_mix_picks_leave_the_docs_unchanged():
    vocab = Vocab()
    corpora = [corpus(vocab, "g", ["PER", "LOC"], 6), corpus(vocab, "m", ["band"], 4)]
    before = [[doc.to_bytes() for doc in docs] for docs in corpora]
    picks = mix_picks(corpora, 6, fill=0, seed=1)
    assert [[doc.to_bytes() for doc in docs] for docs in corpora] == before
    assert all(doc in corpora[index] for index, doc in picks)
    assert sorted(index for index, _ in picks) == [0, 0, 0, 1, 1, 1]
    # mix_corpora takes the same sentences in the same order, and only it declares labels
    assert [doc.text for doc in mix_corpora(corpora, 6, fill=0, seed=1)] == [doc.text for _, doc in picks]
    assert [[doc.to_bytes() for doc in docs] for docs in corpora] != before


def test_mix_errors_name_the_fix():
    vocab = Vocab()
    with pytest.raises(ValueError, match="size of at least 1"):
        mix_corpora([corpus(vocab, "g", ["PER"], 3)], 0)
    with pytest.raises(ValueError, match="index from 0 to 0"):
        mix_corpora([corpus(vocab, "g", ["PER"], 3)], 2, fill=1)
    with pytest.raises(ValueError, match="size of at least 1"):
        mix_picks([corpus(vocab, "g", ["PER"], 3)], 0)
