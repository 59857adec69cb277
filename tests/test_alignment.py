import pytest

from spacy_cllmfs.alignment import Candidate, locate, resolve_overlaps

PIECES = [" Obama", " met", " Obama", " in", " New", " York", "'s", "", " Parisian", " Paris", "."]


def test_every_occurrence_is_found():
    assert locate(PIECES, "Obama").ranges == [(0, 1), (2, 3)]
    assert locate(PIECES, " New  York ").ranges == [(4, 6)]


def test_token_aligned_matches_win_over_partial_ones():
    # "Paris" is also a prefix of "Parisian"; only the whole-token match counts
    located = locate(PIECES, "Paris")
    assert located.ranges == [(9, 10)] and not located.expanded


def test_partial_matches_are_expanded_not_dropped():
    located = locate(PIECES, "Yor")
    assert located.ranges == [(5, 6)] and located.expanded
    assert locate(PIECES, "York's").ranges == [(5, 7)]


def test_case_insensitive_fallback_and_misses():
    assert locate(PIECES, "new york").ranges == [(4, 6)]
    assert locate(PIECES, "Berlin").ranges == []
    assert locate(PIECES, "   ").ranges == []


def test_resolve_overlaps_longest_then_earliest():
    cands = [
        Candidate(0, 2, "person", 0.9),
        Candidate(1, 3, "location", 0.99),
        Candidate(0, 3, "org", 0.1),
        Candidate(5, 6, "person", 0.5),
        Candidate(5, 6, "location", 0.5),
    ]
    kept = resolve_overlaps(cands, "longest")
    assert [(c.start, c.end, c.label) for c in kept] == [(0, 3, "org"), (5, 6, "person")]


def test_resolve_overlaps_by_score():
    cands = [Candidate(0, 2, "person", 0.9), Candidate(1, 3, "location", 0.99), Candidate(0, 3, "org", 0.1)]
    kept = resolve_overlaps(cands, "score")
    assert [(c.start, c.end, c.label) for c in kept] == [(1, 3, "location")]
    with pytest.raises(ValueError, match="Unknown overlap strategy"):
        resolve_overlaps(cands, "random")



def test_case_insensitive_matches_keep_their_offsets():
    # "İ".lower() is two characters: lower-casing the whole text would shift every offset after it
    pieces = [" İİİ", " met", " paris", " Paris"]
    assert locate(pieces, "PARIS").ranges == [(2, 3), (3, 4)]
    assert locate([" İstanbul", " and", " Ankara"], "İSTANBUL") == locate([" İstanbul"], "İstanbul")
