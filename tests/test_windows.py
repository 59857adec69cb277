import pytest
import spacy

from spacy_cllmfs.windows import make_windows, sentence_starts


@pytest.fixture(scope="module")
def nlp():
    return spacy.blank("en")


def test_short_doc_is_one_window(nlp):
    doc = nlp("One sentence. Another one.")
    assert [w.text for w in make_windows(doc, [1] * len(doc), 100)] == [doc.text]


def test_sentences_are_grouped_and_nothing_is_lost(nlp):
    doc = nlp("Aa bb cc. Dd ee ff gg. Hh ii. Jj kk ll mm nn.")
    windows = make_windows(doc, [1] * len(doc), 6)
    assert [w.text for w in windows] == ["Aa bb cc.", "Dd ee ff gg.", "Hh ii.", "Jj kk ll mm nn."]
    assert not doc.has_annotation("SENT_START")  # the doc is not modified
    windows = make_windows(doc, [1] * len(doc), 9)
    assert [w.text for w in windows] == ["Aa bb cc. Dd ee ff gg.", "Hh ii. Jj kk ll mm nn."]
    covered = [i for w in windows for i in range(w.start, w.end)]
    assert covered == list(range(len(doc)))


def test_existing_sentence_boundaries_are_used(nlp):
    doc = nlp("a b c d e f")
    doc[3].is_sent_start = True
    for token in doc[1:3]:
        token.is_sent_start = False
    assert sentence_starts(doc) == [0, 3]
    assert [w.text for w in make_windows(doc, [1] * 6, 4)] == ["a b c", "d e f"]


def test_long_sentences_are_cut_between_tokens(nlp):
    doc = nlp("a b c d e f g h i j")
    windows = make_windows(doc, [2] * len(doc), 6)
    assert [w.text for w in windows] == ["a b c", "d e f", "g h i", "j"]


def test_whitespace_only_windows_are_skipped(nlp):
    doc = nlp("   ")
    assert make_windows(doc, [0] * len(doc), 5) == []
    assert make_windows(nlp(""), [], 5) == []


def test_errors(nlp):
    doc = nlp("a b")
    with pytest.raises(ValueError, match="token counts"):
        make_windows(doc, [1], 5)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        make_windows(doc, [1, 1], 0)


def test_a_token_longer_than_the_budget_gets_its_own_window(nlp, caplog):
    doc = nlp("a b https://example.com/a/very/long/path c d")
    counts = [1, 1, 12, 1, 1]
    with caplog.at_level("WARNING", logger="spacy_cllmfs"):
        windows = make_windows(doc, counts, 3)
    assert [w.text for w in windows] == ["a b", "https://example.com/a/very/long/path", "c d"]
    assert "Raise `max_window_tokens`" in caplog.text
