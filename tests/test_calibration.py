import pytest
import spacy
import torch
from spacy.tokens import Doc, Span
from spacy.training import Example

from conftest import randomize_adapter
from spacy_cllmfs.calibration import fit_open_bias
from spacy_cllmfs.constraints import CopyConstraint
from spacy_cllmfs.inference import DecodingSettings

GOLD = [
    ("Barack Obama visited Paris .", [(0, 2, "person"), (3, 4, "location")]),
    ("The weather was nice .", []),
    ("New York welcomed Obama .", [(0, 2, "location"), (3, 4, "person")]),
    ("Angela Merkel spoke .", [(0, 2, "person")]),
]


def examples(nlp):
    out = []
    for text, spans in GOLD:
        doc = Doc(nlp.vocab, words=text.split())
        doc.set_ents([Span(doc, s, e, label=label) for s, e, label in spans], default="outside")
        out.append(Example(Doc(nlp.vocab, words=text.split()), doc))
    return out


def test_fit_open_bias_separates_positive_prompts():
    margins = [-1.0, -1.2, -3.0, -3.5, -2.9]
    positive = [True, True, False, False, False]
    result = fit_open_bias(margins, positive)
    assert 1.2 < result.open_bias < 2.9
    assert result.f1_before == 0.0 and result.f1_after == 1.0
    assert (result.prompts, result.positives) == (5, 2)
    # already separated at 0: the offset stays 0 (ties go to the smallest offset)
    assert fit_open_bias([2.0, -2.0], [True, False]).open_bias == 0.0
    # the offset is bounded
    assert fit_open_bias([-3.0, -20.0], [True, False], max_bias=8.0).open_bias == 8.0  # the midpoint is 11.5
    # no positive prompt: nothing to calibrate
    assert fit_open_bias([-1.0, 1.0], [False, False]).open_bias == 0.0
    with pytest.raises(ValueError):
        fit_open_bias([1.0], [True, False])


def test_open_bias_steers_the_first_decision(tiny_nlp):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    doc = tiny_nlp.make_doc("Barack Obama visited Paris .")
    prompt = ner.make_prompts([doc])[0].prompts[0]
    fmt = ner.builder.format
    constraint = CopyConstraint(prompt, fmt, open_bias=2.5)
    assert constraint.allowed() == [fmt.open_ids[0], fmt.end_id] and constraint.bias() == [2.5, 0.0]
    assert CopyConstraint(prompt, fmt).bias() is None
    texts = ["Barack Obama visited Paris .", "New York welcomed Obama ."]
    ner.open_bias = -50.0
    assert all(not doc.ents for doc in tiny_nlp.pipe(texts))
    ner.open_bias = 50.0
    found = list(tiny_nlp.pipe(texts))
    assert all(doc.ents for doc in found)  # every prompt opens at least one span
    with pytest.raises(ValueError, match="open_bias"):
        DecodingSettings(open_bias=float("nan"))


def test_calibrate_scores_first_decisions_like_a_full_forward(tiny_nlp):
    """The margins come from the shared-prefix prefill; they equal the log-probabilities of
    the whole prompts computed one by one."""
    from spacy_cllmfs.calibration import decision_margins

    ner = tiny_nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.2)
    gold = examples(tiny_nlp)
    tasks = ner.make_prompts([eg.reference for eg in gold])
    fmt = ner.builder.format
    model = ner.model.inference_model(merge=False)
    margins = decision_margins(model, tasks, fmt, DecodingSettings(batch_size=3, max_batch_tokens=64), ner.model.pad_id)
    expected = []
    with torch.no_grad():
        for task in tasks:
            for prompt in task.prompts:
                logp = torch.log_softmax(model(torch.tensor([prompt.ids])).logits[0, -1].float(), -1)
                expected.append(float(logp[fmt.open_ids[0]] - logp[fmt.end_id]))
    assert margins == pytest.approx(expected, abs=1e-4)


def test_calibrate_sets_and_saves_open_bias(tiny_nlp, tmp_path):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.2)
    result = ner.calibrate(examples(tiny_nlp))
    assert ner.open_bias == (result.open_bias if result.kept else 0.0)
    assert result.prompts == 8 and result.positives == 5
    assert result.f1_after >= result.f1_before
    ner.open_bias = 1.25  # a value the dev set would not give exactly
    tiny_nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.get_pipe("cllmfs_ner").open_bias == 1.25
    ner.constrained = False
    with pytest.raises(ValueError, match="constrained"):
        ner.calibrate(examples(tiny_nlp))


def test_calibrate_cli(tiny_nlp, tmp_path):
    from typer.testing import CliRunner
    from spacy.tokens import DocBin

    from spacy_cllmfs.cli import app

    ner = tiny_nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.2)
    tiny_nlp.to_disk(tmp_path / "best")
    DocBin(docs=[eg.reference for eg in examples(tiny_nlp)]).to_disk(tmp_path / "dev.spacy")
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "best"), str(tmp_path / "dev.spacy"),
                                      str(tmp_path / "calibrated")])
    assert result.exit_code == 0, result.output
    assert "open_bias = " in result.output and "8 dev prompts (5 with an entity)" in result.output
    calibrated = spacy.load(tmp_path / "calibrated").get_pipe("cllmfs_ner")
    assert f"{calibrated.open_bias:+.3f}" in result.output  # the chosen offset, or the one kept
    missing = CliRunner().invoke(app, ["calibrate", str(tmp_path / "best"), str(tmp_path / "nope.spacy"),
                                       str(tmp_path / "out")])
    assert missing.exit_code == 1 and "not found" in missing.output
    assert not (tmp_path / "out").exists()


def test_calibration_is_kept_only_if_the_dev_f1_does_not_drop(tiny_nlp, monkeypatch):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.2)
    gold = examples(tiny_nlp)
    free = ner.calibrate(gold, verify=False)
    if free.open_bias == 0.0:
        pytest.skip("this adapter needs no offset")
    scores = iter([0.5, 0.2])  # before, after: the offset lowers the dev F1
    monkeypatch.setattr(ner, "_ents_f", lambda docs: next(scores))
    ner.open_bias = 0.0
    result = ner.calibrate(gold)
    assert not result.kept and ner.open_bias == 0.0 and result.open_bias == free.open_bias
    assert (result.ents_f_before, result.ents_f_after) == (0.5, 0.2)
    monkeypatch.setattr(ner, "_ents_f", lambda docs: 0.3)  # the known score is not recomputed
    result = ner.calibrate(gold, ents_f_before=0.25)
    assert result.kept and ner.open_bias == free.open_bias and result.ents_f_before == 0.25
