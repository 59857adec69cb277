import pytest
import spacy
import torch
from spacy.tokens import Doc, Span

from spacy_cllmfs import loop
from spacy_cllmfs.loop import as_examples, fit, fit_select

GOLD = [
    ("Barack Obama visited Paris .", [(0, 2, "person"), (3, 4, "location")]),
    ("New York welcomed Obama .", [(0, 2, "location"), (3, 4, "person")]),
    ("Angela Merkel spoke in Berlin .", [(0, 2, "person"), (4, 5, "location")]),
    ("The weather was nice .", []),
]


def gold_docs(nlp):
    docs = []
    for text, spans in GOLD:
        doc = Doc(nlp.vocab, words=text.split())
        doc.set_ents([Span(doc, s, e, label=label) for s, e, label in spans], default="outside")
        docs.append(doc)
    return docs


def weights(ner):
    return {k: v.clone() for k, v in ner.model.adapter_state().weights.items()}


def test_fit_select_keeps_the_best_dev_step_and_calibrates(tiny_model_config, monkeypatch):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "max_new_tokens": 8})
    examples = as_examples(nlp, gold_docs(nlp))
    nlp.initialize(lambda: examples)
    dev_scores = iter([0.4, 0.1, 0.3])  # the first evaluation is the best
    seen = {}

    def fake_evaluate(dev, **kwargs):
        assert all(not eg.predicted.ents for eg in dev)  # predictions start unannotated
        seen[len(seen) + 1] = weights(ner)
        return {"ents_f": next(dev_scores)}

    monkeypatch.setattr(nlp, "evaluate", fake_evaluate)
    selection = fit_select(nlp, examples, examples[:2], steps=6, evaluations=3, batch_size=2, learn_rate=0.05)
    assert len(selection.losses) == 6
    assert selection.dev_scores == {2: 0.4, 4: 0.1, 6: 0.3}
    assert selection.best_step == 2
    restored = weights(ner)
    assert all(torch.equal(restored[k], seen[1][k]) for k in restored)
    assert not all(torch.equal(restored[k], seen[3][k]) for k in restored)
    assert set(selection.calibration) == {"cllmfs_ner"}
    calibration = selection.calibration["cllmfs_ner"]
    assert ner.open_bias == (calibration["open_bias"] if calibration["kept"] else 0.0)
    if calibration["ents_f_before"] is not None:  # the best dev score was not recomputed
        assert calibration["ents_f_before"] == 0.4
    nlp.update(examples[:1], sgd=None)  # training can go on after a restore


def test_fit_select_ties_go_to_the_later_step(tiny_model_config, monkeypatch):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "max_new_tokens": 8})
    examples = as_examples(nlp, gold_docs(nlp))
    nlp.initialize(lambda: examples)
    monkeypatch.setattr(nlp, "evaluate", lambda dev, **kwargs: {"ents_f": 0.0})
    selection = fit_select(nlp, examples, examples, steps=3, evaluations=2, calibrate=False, batch_size=2)
    assert selection.dev_scores == {2: 0.0, 3: 0.0} and selection.best_step == 3
    assert selection.calibration == {} and ner.open_bias == 0.0
    with pytest.raises(ValueError, match="dev"):
        fit_select(nlp, examples, [], steps=1)
    with pytest.raises(ValueError, match="evaluations"):
        fit_select(nlp, examples, examples, steps=1, evaluations=0)


def test_fit_reports_each_step(tiny_model_config):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config})
    examples = as_examples(nlp, gold_docs(nlp))
    nlp.initialize(lambda: examples)
    steps = []
    fit(nlp, examples, steps=3, batch_size=2, on_step=steps.append)
    assert steps == [1, 2, 3]


def test_fit_trains_the_same_whatever_ran_before_it(tiny_model_config):
    config = dict(tiny_model_config, lora={**tiny_model_config["lora"], "dropout": 0.5})
    runs, start = [], None
    for history in (1, 2):  # two processes whose torch generators stand at different states
        nlp = spacy.blank("en")
        ner = nlp.add_pipe("cllmfs_ner", config={"model": config, "max_new_tokens": 8})
        examples = as_examples(nlp, gold_docs(nlp))
        nlp.initialize(lambda: examples)
        start = start or ner.model.adapter_state()
        ner.model.set_adapter(start)
        torch.manual_seed(history)
        before = torch.get_rng_state()
        losses = fit(nlp, examples, steps=2, batch_size=2, learn_rate=0.05, seed=3)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is left as it was
        runs.append((losses, weights(ner)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_fit_hands_freed_memory_back_once_it_ends(tiny_model_config, monkeypatch):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config})
    examples = as_examples(nlp, gold_docs(nlp))
    nlp.initialize(lambda: examples)
    events = []
    monkeypatch.setattr(loop, "release_memory", lambda: events.append("release"))
    fit(nlp, examples, steps=2, batch_size=2, on_step=events.append)
    assert events == [1, 2, "release"]


def test_fit_select_hands_freed_memory_back_before_each_dev_evaluation(tiny_model_config, monkeypatch):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "max_new_tokens": 8})
    examples = as_examples(nlp, gold_docs(nlp))
    nlp.initialize(lambda: examples)
    events = []
    monkeypatch.setattr(loop, "release_memory", lambda: events.append("release"))
    monkeypatch.setattr(nlp, "evaluate", lambda dev, **kwargs: events.append("dev") or {"ents_f": 0.5})
    fit_select(nlp, examples, examples[:2], steps=4, evaluations=2, batch_size=2, calibrate=False)
    assert events == ["release", "dev", "release", "dev", "release"]
