import json

import pytest
import spacy
from typer.testing import CliRunner

from spacy_cllmfs.cli import app
from spacy_cllmfs.corpora import read_fewnerd_episodes
from spacy_cllmfs.episodes import SpanCounts, evaluate_episodes
from spacy_cllmfs.loop import as_examples, fit

FIXTURE = "tests/fixtures/fewnerd_episodes.jsonl"


def test_span_counts_micro_scores():
    counts = SpanCounts()
    counts.add({(0, 1, "a"), (2, 3, "b")}, {(0, 1, "a"), (2, 4, "b")})
    counts.add({(1, 2, "a")}, set())
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 2)
    assert counts.scores() == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f": 0.4})
    assert SpanCounts().scores() == {"precision": 0.0, "recall": 0.0, "f": 0.0}


def test_episodes_are_adapted_from_scratch_and_summed(tiny_model_config):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "max_new_tokens": 12})
    episodes = read_fewnerd_episodes(FIXTURE, nlp.vocab)
    scores = evaluate_episodes(nlp, episodes, steps=2, batch_size=2, progress=False)
    gold = sum(len(doc.ents) for episode in episodes for doc in episode.query)
    assert scores["episodes"] == len(episodes) == 2
    assert scores["tp"] + scores["fn"] == gold
    ner = nlp.get_pipe("cllmfs_ner")
    assert ner.labels == tuple(episodes[-1].types)  # the labels follow each episode's types
    again = evaluate_episodes(nlp, episodes, steps=2, batch_size=2, progress=False)
    assert again == scores  # a fresh adapter per episode: nothing carries over


def test_fit_runs_the_requested_steps(tiny_model_config):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config})
    episodes = read_fewnerd_episodes(FIXTURE, nlp.vocab)
    examples = as_examples(nlp, episodes[0].support)
    nlp.get_pipe("cllmfs_ner").initialize(lambda: examples, labels=episodes[0].types)
    history = fit(nlp, examples, steps=3, batch_size=1, learn_rate=0.01)
    assert len(history) == 3 and all(loss > 0 for loss in history)
    with pytest.raises(ValueError, match="no training examples"):
        fit(nlp, [], steps=1)


def test_episodes_cli(tiny_model_path, tmp_path):
    result = CliRunner().invoke(app, [
        "episodes", FIXTURE, "--model", str(tiny_model_path), "--device", "cpu", "--steps", "1",
        "--limit", "1", "--output", str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["episodes"] == 1 and set(scores) >= {"precision", "recall", "f", "tp", "fp", "fn"}
