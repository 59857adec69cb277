"""bench/per_type.py recovers per-type counts from spaCy's scores of a run."""
import importlib
import json
import shutil
from pathlib import Path

import pytest
import spacy
from spacy.scorer import get_ner_prf
from spacy.training import Example

from spacy_cllmfs.corpora import read_conll

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "crossner_sample.txt"
KEY = "cllmfs|politics|k5|s0"


@pytest.fixture
def per_type(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.per_type")


def predictions(gold, drop=("election",), relabel=None, first_only=()):
    """Predicted docs: `drop` types never found, `relabel` types tagged as another (only
    their first mention for the types in `first_only`)."""
    relabel = relabel or {"organisation": "location", "country": "election"}
    predicted, done = [], set()
    for doc in gold:
        copy = doc.copy()
        spans = []
        for ent in (e for e in doc.ents if e.label_ not in drop):
            label = ent.label_
            if label in relabel and not (label in first_only and label in done):
                done.add(label)
                label = relabel[label]
            spans.append(spacy.tokens.Span(copy, ent.start, ent.end, label=label))
        copy.ents = spans
        predicted.append(copy)
    return predicted


def scores(predicted, gold, without=None):
    """spaCy's NER scores, with the type `without` left out of both sides."""
    def keep(doc):
        copy = doc.copy()
        copy.ents = [e for e in copy.ents if e.label_ != without]
        return copy
    return get_ner_prf([Example(keep(p), keep(g)) for p, g in zip(predicted, gold)])


def write_run(tmp_path, run, test_sentences=10):
    (tmp_path / "data" / "politics").mkdir(parents=True)
    shutil.copy(FIXTURE, tmp_path / "data" / "politics" / "test.txt")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": {KEY: {**run, "domain": "politics", "test_sentences": test_sentences}}}))
    return results


def test_counts_and_f1_without_match_spacy(per_type, tmp_path: Path) -> None:
    gold = read_conll(FIXTURE, spacy.blank("en").vocab)[:10]
    predicted = predictions(gold)
    results = write_run(tmp_path, scores(predicted, gold))
    run = per_type.load_run(f"{results}:{KEY}")
    mentions = per_type.gold_mentions(tmp_path / "data", "politics", 10)
    assert mentions["country"] > 0 and mentions["election"] > 0 and mentions["organisation"] > 0
    counts = per_type.type_counts(run, mentions)
    assert counts["country"].true_positives == 0 and counts["organisation"].true_positives == 0
    assert counts["politician"].true_positives == mentions["politician"]
    # location's predictions hold the organisations tagged location
    assert counts["location"].predictions == mentions["location"] + mentions["organisation"]
    # countries tagged election: two types at precision 0, their predictions only known together
    assert counts["country"].predictions is None and counts["election"].predictions is None
    total = per_type.predicted(run, counts)
    for label in ("politician", "location", "politicalparty"):
        expected = 100 * scores(predicted, gold, without=label)["ents_f"]
        assert per_type.f1_without(counts, label, total) == pytest.approx(expected)
    assert per_type.f1_without(counts, "country", total) is None
    assert per_type.f1_without(counts, "organisation", total) is None

    table = per_type.table([f"{results}:{KEY}"], tmp_path / "data", "politics", None)
    row = next(line for line in table.splitlines() if line.startswith("| country |"))
    assert row.split(" | ")[1:5] == [str(mentions["country"]), "0.0", "0.0", str(mentions["country"])]
    assert row.rstrip(" |").endswith("?")
    assert "politics, 10 test sentences; run 1:" in table


def test_one_type_at_precision_zero_is_recovered(per_type, tmp_path: Path) -> None:
    gold = read_conll(FIXTURE, spacy.blank("en").vocab)[:10]
    # one party tagged with a type the gold lacks: the only type at precision 0
    predicted = predictions(gold, drop=(), relabel={"politicalparty": "nation"}, first_only=("politicalparty",))
    results = write_run(tmp_path, scores(predicted, gold))
    mentions = per_type.gold_mentions(tmp_path / "data", "politics", 10)
    run = per_type.load_run(f"{results}:{KEY}")
    counts = per_type.type_counts(run, mentions)
    assert counts["nation"].predictions == 1 and counts["nation"].mentions == 0
    assert counts["politicalparty"].true_positives == mentions["politicalparty"] - 1 > 0
    expected = 100 * scores(predicted, gold, without="nation")["ents_f"]
    assert per_type.f1_without(counts, "nation", per_type.predicted(run, counts)) == pytest.approx(expected)


def test_wrong_test_set_and_bad_spec_are_refused(per_type, tmp_path: Path) -> None:
    gold = read_conll(FIXTURE, spacy.blank("en").vocab)[:10]
    results = write_run(tmp_path, scores(predictions(gold), gold), test_sentences=12)
    with pytest.raises(SystemExit, match="does not match these test sentences.*Fix"):
        per_type.table([f"{results}:{KEY}"], tmp_path / "data", "politics", None)
    with pytest.raises(SystemExit, match="scored on politics, not music. Fix: pass --domain politics"):
        per_type.table([f"{results}:{KEY}"], tmp_path / "data", "music", None)
    with pytest.raises(SystemExit, match="not 'results file:run key'"):
        per_type.load_run(str(results))
    with pytest.raises(SystemExit, match="No run 'x' in .*Fix: use one of"):
        per_type.load_run(f"{results}:x")
