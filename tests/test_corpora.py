import json
import warnings
from pathlib import Path
from typing import List

import pytest
import spacy
from spacy.tokens import Doc
from spacy.vocab import Vocab

from spacy_cllmfs.corpora import (
    CorpusError,
    Episode,
    convert,
    detect_format,
    episodes_from_docs,
    load_docbin,
    read_conll,
    read_fewnerd_episodes,
    read_jsonl,
    tags_to_spans,
)

FIXTURES = Path(__file__).parent / "fixtures"


def count_groups(path: Path) -> int:
    """Count blank-line separated groups that are not -DOCSTART- groups."""
    groups, current = 0, []
    for line in path.read_text(encoding="utf8").splitlines() + [""]:
        if line.strip():
            current.append(line)
        elif current:
            groups += not current[0].startswith("-DOCSTART-")
            current = []
    return groups


def ents(doc: Doc):
    return [(ent.start, ent.end, ent.label_) for ent in doc.ents]


@pytest.fixture
def vocab() -> Vocab:
    return Vocab()


def test_crossner_keeps_every_sentence(vocab):
    path = FIXTURES / "crossner_sample.txt"
    docs = read_conll(path, vocab)
    assert len(docs) == count_groups(path) == 12
    tokens = [line.split("\t")[0] for line in path.read_text(encoding="utf8").splitlines() if line]
    assert [t.text for doc in docs for t in doc] == tokens


def test_crossner_entities_exact(vocab):
    docs = read_conll(FIXTURES / "crossner_sample.txt", vocab)
    assert ents(docs[0]) == [(1, 3, "politicalparty"), (5, 6, "location")]
    assert ents(docs[1]) == [(0, 2, "politician"), (3, 5, "politician"), (6, 7, "location")]
    # entity running to the end of the sentence
    assert ents(docs[4]) == [(3, 8, "politicalparty")]
    # adjacent B- B- of the same type are two entities
    assert ents(docs[7]) == [(0, 1, "politicalparty"), (1, 2, "politicalparty")]
    assert docs[1].ents[0].text == "Angela Merkel"
    assert docs[10].ents[1].text == "Council of the European Union"
    assert docs[0].text == "The Green Party won in Bremen ."


def test_empty_ents_are_annotated_outside(vocab):
    docs = read_conll(FIXTURES / "crossner_sample.txt", vocab)
    assert docs[2].ents == ()
    assert docs[2].has_annotation("ENT_IOB")
    assert all(token.ent_iob_ == "O" for token in docs[2])
    assert docs[9].text == "Yes" and docs[9][0].ent_iob_ == "O"
    assert all(token.ent_iob_ in ("B", "I", "O") for doc in docs for token in doc)


def test_conll2003_four_columns_docstart_iob1(vocab):
    path = FIXTURES / "conll2003_sample.txt"
    docs = read_conll(path, vocab)
    assert len(docs) == count_groups(path) == 5
    assert all("-DOCSTART-" not in doc.text for doc in docs)
    assert ents(docs[0]) == [(0, 1, "ORG"), (2, 3, "MISC"), (6, 7, "MISC")]
    assert ents(docs[1]) == [(0, 2, "PER")]
    # I- without a preceding B- starts an entity (conlleval / IOB1)
    assert [(e.text, e.label_) for e in docs[3].ents] == [("European Commission", "ORG"), ("German", "MISC")]
    assert docs[4].ents == () and docs[4][0].ent_iob_ == "O"


def test_io_file(vocab):
    path = FIXTURES / "io_sample.txt"
    for scheme in ("auto", "io"):
        docs = read_conll(path, vocab, scheme=scheme)
        assert len(docs) == 3
        assert ents(docs[0]) == [(0, 2, "actor"), (4, 5, "film")]
        # "I-city" and bare "city" are the same type; consecutive tokens merge
        assert ents(docs[1]) == [(0, 1, "city"), (2, 4, "city")]
        assert docs[2][0].ent_iob_ == "O"


def test_bioes_and_scheme_errors(tmp_path, vocab):
    path = tmp_path / "bioes.txt"
    path.write_text("a\tS-X\nb\tB-Y\nc\tE-Y\nd\tU-Z\ne\tB-Y\nf\tL-Y\ng\tE-X\n", encoding="utf8")
    docs = read_conll(path, vocab, scheme="bioes")
    assert ents(docs[0]) == [(0, 1, "X"), (1, 3, "Y"), (3, 4, "Z"), (4, 6, "Y"), (6, 7, "X")]
    assert ents(read_conll(path, vocab)[0]) == ents(docs[0])
    with pytest.raises(CorpusError, match=r"bioes.txt:1: .*'S-X'.*bioes"):
        read_conll(path, vocab, scheme="bio")
    with pytest.raises(CorpusError, match=r"bioes.txt:1: .*scheme 'io'"):
        read_conll(path, vocab, scheme="io")
    bare = tmp_path / "bare.txt"
    bare.write_text("a\tperson\n", encoding="utf8")
    with pytest.raises(CorpusError, match=r"bare.txt:1: .*--format io"):
        read_conll(bare, vocab, scheme="bio")
    with pytest.raises(ValueError, match="Unknown scheme"):
        read_conll(bare, vocab, scheme="iob2")


def test_tags_to_spans_conlleval_rules():
    assert tags_to_spans(["I-A", "I-A", "I-B", "O", "I-A"], "bio") == [(0, 2, "A"), (2, 3, "B"), (4, 5, "A")]
    assert tags_to_spans(["B-A", "I-B"], "bio") == [(0, 1, "A"), (1, 2, "B")]
    assert tags_to_spans(["O", "O"], "bio") == []
    assert tags_to_spans(["a-b", "a-b", "c"], "io") == [(0, 2, "a-b"), (2, 3, "c")]


def test_windows_line_endings_and_no_final_blank_line(tmp_path, vocab):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"EU\tB-ORG\r\nrejects\tO\r\n\r\n\r\nPeter\tB-PER\r\nBlackburn\tI-PER")
    docs = read_conll(path, vocab)
    assert len(docs) == 2
    assert [t.text for t in docs[0]] == ["EU", "rejects"]
    assert [(e.text, e.label_) for e in docs[1].ents] == [("Peter Blackburn", "PER")]
    assert not any("\r" in t.text or "\r" in t.ent_type_ for doc in docs for t in doc)


def test_docstart_without_blank_line_does_not_merge(tmp_path, vocab):
    path = tmp_path / "docstart.txt"
    path.write_text("a\tO\n-DOCSTART-\nb\tB-X\n\n-DOCSTART- -X- -X- O\nc\tO\n", encoding="utf8")
    docs = read_conll(path, vocab)
    assert [d.text for d in docs] == ["a", "b", "c"]


def test_malformed_one_column(vocab):
    path = FIXTURES / "malformed_one_column.txt"
    with pytest.raises(CorpusError) as err:
        read_conll(path, vocab)
    message = str(err.value)
    assert f"{path}:6:" in message
    assert "expected 'token<TAB>tag'" in message and "'orphan'" in message and "Fix:" in message


def test_malformed_bad_prefix(vocab):
    path = FIXTURES / "malformed_bad_prefix.txt"
    with pytest.raises(CorpusError, match=r"malformed_bad_prefix.txt:2: unknown prefix 'X-'.*Fix:"):
        read_conll(path, vocab)


def test_malformed_empty_tag(tmp_path, vocab):
    path = tmp_path / "empty_tag.txt"
    path.write_text("a\tO\nb\t\n", encoding="utf8")
    with pytest.raises(CorpusError, match=r"empty_tag.txt:2: empty tag.*Fix:"):
        read_conll(path, vocab)
    assert issubclass(CorpusError, ValueError)


def test_missing_file(vocab):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_conll(FIXTURES / "nope.txt", vocab)


def test_fewnerd_episodes(vocab):
    episodes = read_fewnerd_episodes(FIXTURES / "fewnerd_episodes.jsonl", vocab)
    assert len(episodes) == 2
    assert isinstance(episodes[0], Episode)
    first = episodes[0]
    assert first.types == ["person-actor", "location-GPE"]
    assert (len(first.support), len(first.query)) == (2, 2)
    assert ents(first.support[0]) == [(0, 2, "person-actor"), (3, 4, "location-GPE")]
    assert [(e.text, e.label_) for e in first.query[0].ents] == [
        ("Meryl Streep", "person-actor"),
        ("New York City", "location-GPE"),
    ]
    assert first.query[1].ents == () and first.query[1][0].ent_iob_ == "O"
    assert [(e.text, e.label_) for e in episodes[1].query[0].ents] == [
        ("Queen", "organization-music"),
        ("Bohemian Rhapsody", "art-music"),
    ]


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"support": {"word": [], "label": []}, "types": []}), "missing ['query']"),
        (
            json.dumps(
                {"support": {"word": [["a"]], "label": [["X"]]}, "query": {"word": [], "label": []}, "types": ["Y"]}
            ),
            "not in the episode's types",
        ),
        (
            json.dumps({"support": {"word": [["a"]], "label": []}, "query": {"word": [], "label": []}, "types": []}),
            "1 sentences in 'word' but 0 in 'label'",
        ),
    ],
)
def test_fewnerd_errors(tmp_path, vocab, line, problem):
    path = tmp_path / "episodes.jsonl"
    good = (FIXTURES / "fewnerd_episodes.jsonl").read_text(encoding="utf8").splitlines()[0]
    path.write_text(good + "\n\n" + line + "\n", encoding="utf8")
    with pytest.raises(CorpusError) as err:
        read_fewnerd_episodes(path, vocab)
    assert f"{path}:3:" in str(err.value)
    assert problem in str(err.value)


def test_fewnerd_length_mismatch_fixture(vocab):
    path = FIXTURES / "malformed_episode.jsonl"
    with pytest.raises(CorpusError, match=r"malformed_episode.jsonl:2: query sentence 0 has 5 words but 4 labels"):
        read_fewnerd_episodes(path, vocab)


def test_read_jsonl(vocab):
    path = FIXTURES / "spacy_sample.jsonl"
    with pytest.warns(UserWarning, match=r"spacy_sample.jsonl:4: .*'London'.*'Londonderry'"):
        docs = read_jsonl(path, vocab)
    assert len(docs) == 5
    assert [(e.text, e.label_, e.start_char, e.end_char) for e in docs[0].ents] == [
        ("Apple", "ORG", 0, 5),
        ("San Francisco", "GPE", 24, 37),
    ]
    assert [(e.text, e.label_) for e in docs[1].ents] == [("Barack Obama", "PERSON"), ("Berlin", "GPE")]
    assert docs[2].ents == () and docs[2][0].ent_iob_ == "O"
    assert [(e.text, e.label_) for e in docs[3].ents] == [("Londonderry", "GPE")]
    assert [t.text for t in docs[4]] == ["Hello", "world", "!"]
    assert [(e.text, e.label_) for e in docs[4].ents] == [("world", "MISC")]
    assert [doc.text for doc in docs] == [
        json.loads(line)["text"] for line in path.read_text(encoding="utf8").splitlines()
    ]


def test_read_jsonl_nlp_and_lang(tmp_path):
    path = tmp_path / "de.jsonl"
    path.write_text(json.dumps({"text": "Angela Merkel lebt in Berlin.", "entities": [[22, 28, "LOC"]]}) + "\n")
    nlp = spacy.blank("de")
    docs = read_jsonl(path, nlp)
    assert docs[0].vocab is nlp.vocab and docs[0].lang_ == "de"
    assert [(e.text, e.label_) for e in docs[0].ents] == [("Berlin", "LOC")]
    assert read_jsonl(path, lang="de")[0].lang_ == "de"


def test_read_jsonl_overlap(vocab):
    path = FIXTURES / "malformed_overlap.jsonl"
    with pytest.raises(CorpusError) as err:
        read_jsonl(path, vocab)
    message = str(err.value)
    assert f"{path}:2:" in message
    assert "(0, 8, 'GPE') 'New York'" in message and "(4, 13, 'LOC') 'York City'" in message


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"text": "Hi there", "spans": [{"start": 3, "end": 20, "label": "X"}]}, "out of range"),
        ({"text": "Hi there", "entities": [[-1, 2, "X"]]}, "out of range"),
        ({"text": "Hi there", "spans": [{"start": 0, "label": "X"}]}, "bad span"),
        ({"spans": []}, "no 'text'"),
    ],
)
def test_read_jsonl_errors(tmp_path, vocab, record, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n", encoding="utf8")
    with pytest.raises(CorpusError, match=f"bad.jsonl:2: .*{problem}"):
        read_jsonl(path, vocab)


def test_detect_format():
    assert detect_format(FIXTURES / "fewnerd_episodes.jsonl") == "fewnerd"
    assert detect_format(FIXTURES / "spacy_sample.jsonl") == "jsonl"
    assert detect_format(FIXTURES / "crossner_sample.txt") == "conll"


def _summary(docs: List[Doc]):
    return [([t.text for t in d], [(t.ent_iob_, t.ent_type_) for t in d]) for d in docs]


@pytest.mark.parametrize(
    "name,fmt,n_docs",
    [
        ("crossner_sample.txt", "auto", 12),
        ("conll2003_sample.txt", "conll", 5),
        ("io_sample.txt", "io", 3),
        ("spacy_sample.jsonl", "auto", 5),
    ],
)
def test_convert_round_trip(tmp_path, name, fmt, n_docs):
    output = tmp_path / "nested" / "dir" / "out.spacy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert convert(FIXTURES / name, output, fmt=fmt) == n_docs
        if name.endswith(".jsonl"):
            expected = read_jsonl(FIXTURES / name, lang="en")
        else:
            expected = read_conll(FIXTURES / name, Vocab(), scheme="auto" if fmt == "conll" else fmt)
    loaded = load_docbin(output, Vocab())
    assert len(loaded) == n_docs
    assert _summary(loaded) == _summary(expected)
    assert [d.text for d in loaded] == [d.text for d in expected]


def test_convert_fewnerd(tmp_path):
    output = tmp_path / "episodes.spacy"
    assert convert(FIXTURES / "fewnerd_episodes.jsonl", output) == 6
    docs = load_docbin(output, Vocab())
    assert [(d.user_data["episode"], d.user_data["split"]) for d in docs] == [
        (0, "support"), (0, "support"), (0, "query"), (0, "query"), (1, "support"), (1, "query"),
    ]
    assert list(docs[0].user_data["types"]) == ["person-actor", "location-GPE"]
    episodes = episodes_from_docs(docs)
    original = read_fewnerd_episodes(FIXTURES / "fewnerd_episodes.jsonl", Vocab())
    assert len(episodes) == 2
    for got, want in zip(episodes, original):
        assert got.types == want.types
        assert _summary(got.support) == _summary(want.support)
        assert _summary(got.query) == _summary(want.query)


def test_convert_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown format 'xml'"):
        convert(FIXTURES / "crossner_sample.txt", tmp_path / "x.spacy", fmt="xml")


def test_load_docbin_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.spacy.*python -m spacy_cllmfs convert"):
        load_docbin(tmp_path / "missing.spacy", Vocab())
    garbage = tmp_path / "garbage.spacy"
    garbage.write_bytes(b"not a docbin")
    with pytest.raises(CorpusError, match=r"garbage.spacy: not a readable .spacy DocBin"):
        load_docbin(garbage, Vocab())
