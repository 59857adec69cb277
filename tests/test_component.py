import json
import re
import shutil
from pathlib import Path

import pytest
import spacy
import torch
from spacy.tokens import Span
from spacy.training import Example

from conftest import randomize_adapter
from spacy_cllmfs.adapters import AdapterState
from spacy_cllmfs.alignment import locate
from spacy_cllmfs.inference import prefill_tokens, prompt_groups

TEXTS = [
    "Barack Obama visited Paris.",
    "Angela Merkel met Marie Curie in Geneva and New York.",
    "",
    "   ",
    "Hello 😀 world ✨ in Zürich! Ünïcödé façade naïve 東京",
    "The Labour Party won the 1997 general election in the United Kingdom.",
    "Obama met Obama.",
]


def ents(doc):
    return [(e.start, e.end, e.label_) for e in doc.ents]


def test_factory_builds_lazily_from_config(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": ["person"]})
    assert not ner.model.is_loaded
    assert ner.labels == ("person",)
    assert nlp.config["components"]["cllmfs_ner"]["model"]["@misc"] == "spacy_cllmfs.HFCausalLM.v1"
    assert nlp.config["components"]["cllmfs_ner"]["prompt"]["@misc"] == "spacy_cllmfs.prompt.v1"


def test_pipe_matches_one_by_one_and_keeps_order(tiny_nlp):
    randomize_adapter(tiny_nlp.get_pipe("cllmfs_ner"))
    piped = list(tiny_nlp.pipe(TEXTS, batch_size=3))
    assert [d.text for d in piped] == TEXTS
    singles = [tiny_nlp(t) for t in TEXTS]
    assert [ents(d) for d in piped] == [ents(d) for d in singles]
    assert sum(len(d.ents) for d in piped) > 0
    for doc in piped:
        assert all(e.label_ in ("person", "location") for e in doc.ents)
        assert doc.has_annotation("ENT_IOB") or len(doc) == 0


def test_component_batch_size_does_not_change_results(tiny_nlp):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, seed=3)
    big = [ents(d) for d in tiny_nlp.pipe(TEXTS)]
    ner.batch_size = 1
    assert [ents(d) for d in tiny_nlp.pipe(TEXTS)] == big


def test_empty_and_whitespace_docs(tiny_nlp):
    assert tiny_nlp("").ents == ()
    assert tiny_nlp("  \n\t ").ents == ()


def test_labels_with_spaces_and_upper_case(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["Political Party", "PER"],
        "label_descriptions": {"PER": "people"}, "max_new_tokens": 16})
    randomize_adapter(ner)
    docs = list(nlp.pipe(TEXTS))
    found = {e.label_ for d in docs for e in d.ents}
    assert found <= {"Political Party", "PER"} and found
    assert [i.name for i in ner.label_infos] == ["political party", "person"]
    assert ner.label_infos[1].description == "people"


def test_no_labels_is_a_clear_error(tiny_model_config):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config})
    with pytest.raises(ValueError, match="has no entity labels"):
        nlp("Barack Obama visited Paris.")


@pytest.mark.parametrize(
    "config,match",
    [
        ({"labels": ["a", "a"]}, "listed twice"),
        ({"labels": ["a"], "label_descriptions": {"b": "x"}}, "not among the labels"),
        ({"batch_size": 0}, "batch_size"),
        ({"overlap": "random"}, "overlap"),
        ({"model": {"device": "tpu"}}, "Unknown device"),
        ({"model": {"name": "./missing-model"}}, "does not exist"),
        ({"prompt": {"instruction": "no placeholders"}}, "sentence"),
    ],
)
def test_bad_config_fails_early(tiny_model_config, config, match):
    model = {**tiny_model_config, **config.pop("model", {})}
    prompt = config.pop("prompt", None)
    full = {"model": model, **config}
    if prompt:
        full["prompt"] = {"@misc": "spacy_cllmfs.prompt.v1", **prompt}
    nlp = spacy.blank("en")
    with pytest.raises(Exception, match=match):
        nlp.add_pipe("cllmfs_ner", config=full)


def test_add_label(tiny_nlp):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    assert ner.add_label("event", "named events") == 1
    assert ner.add_label("event") == 0
    assert ner.labels == ("person", "location", "event")
    assert ner.label_infos[2].description == "named events"


def test_existing_entities_are_respected_or_overwritten(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": ["person", "location"]})
    randomize_adapter(ner)
    text = next(t for t in TEXTS if ents(nlp(t)))
    predicted = ents(nlp(text))
    start, end, _ = predicted[0]
    doc = nlp.make_doc(text)
    doc.ents = [Span(doc, start, end, label="GOLD")]
    kept = ents(ner(doc))
    assert (start, end, "GOLD") in kept
    assert all(not (s < end and start < e) for s, e, label in kept if label != "GOLD")
    ner.overwrite_ents = True
    doc = nlp.make_doc(text)
    doc.ents = [Span(doc, start, end, label="GOLD")]
    assert ents(ner(doc)) == predicted


def test_candidates_are_kept_with_scores(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person", "location"], "candidates_key": "cands"})
    randomize_adapter(ner)
    doc = next(d for d in nlp.pipe(TEXTS) if d.ents)
    group = doc.spans["cands"]
    assert len(group) >= len(doc.ents) > 0
    assert len(group.attrs["scores"]) == len(group)
    assert all(0.0 < s <= 1.0 for s in group.attrs["scores"])
    assert {(e.start, e.end, e.label_) for e in doc.ents} <= {(s.start, s.end, s.label_) for s in group}


def test_long_documents_are_split_into_windows(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person", "location"], "max_window_tokens": 30})
    randomize_adapter(ner)
    sentences = [TEXTS[0], TEXTS[1], TEXTS[5]] * 3
    doc = nlp(" ".join(sentences))
    windows = ner.windows(doc)
    assert len(windows) > 3
    assert [i for w in windows for i in range(w.start, w.end)] == list(range(len(doc)))
    # entities found in later windows point at the right tokens of the whole doc
    expected = []
    for window in windows:
        alone = nlp(window.text)
        assert len(alone) == len(window)
        expected.extend((s + window.start, e + window.start, label) for s, e, label in ents(alone))
    assert ents(doc) == expected and any(s >= windows[1].start for s, _, _ in expected)


def test_unconstrained_mode_still_sets_valid_entities(tiny_model_config):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person"], "constrained": False, "max_new_tokens": 8})
    for doc in nlp.pipe(TEXTS):
        for ent in doc.ents:
            assert ent.label_ == "person"
    assert ner.stats.generated_tokens > 0


def test_a_fresh_adapter_is_initialised_from_the_training_seed_alone(tiny_model_config):
    def initialized(history: int, seed: int) -> dict:
        nlp = spacy.blank("en")
        ner = nlp.add_pipe("cllmfs_ner", config={
            "model": tiny_model_config, "labels": ["person"],
            "training": {"@misc": "spacy_cllmfs.training.v2", "seed": seed}})
        torch.manual_seed(history)  # what ran before in the process
        nlp.initialize()
        return ner.model.adapter_state().weights

    first, second, other = initialized(1, seed=0), initialized(2, seed=0), initialized(1, seed=1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_serialization_round_trips(tiny_nlp, tmp_path):
    ner = tiny_nlp.get_pipe("cllmfs_ner")
    ner.add_label("event", "named events")
    randomize_adapter(ner, seed=5)
    expected = [ents(d) for d in tiny_nlp.pipe(TEXTS)]
    tiny_nlp.to_disk(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "cllmfs_ner" / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "pipeline").rglob("model.safetensors"))  # no base weights
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.get_pipe("cllmfs_ner").labels == ("person", "location", "event")
    assert [ents(d) for d in loaded.pipe(TEXTS)] == expected
    from_bytes = spacy.util.load_model_from_config(tiny_nlp.config)
    from_bytes.from_bytes(tiny_nlp.to_bytes())
    assert from_bytes.get_pipe("cllmfs_ner").labels == ("person", "location", "event")
    assert [ents(d) for d in from_bytes.pipe(TEXTS)] == expected


def test_a_pipeline_trained_from_a_start_adapter_loads_without_it(tiny_model_config, tmp_path):
    start = spacy.blank("en")
    randomize_adapter(start.add_pipe("cllmfs_ner", config={"model": tiny_model_config}), seed=1)
    start.get_pipe("cllmfs_ner").model.adapter_state().to_disk(tmp_path / "start")
    nlp = spacy.blank("en")
    config = {"model": {**tiny_model_config, "adapter": str(tmp_path / "start")}, "labels": ["person"]}
    ner = nlp.add_pipe("cllmfs_ner", config=config)
    assert ner.model.has_adapter  # configured, read when the weights load
    configured, saved = ner.model.adapter_state(), AdapterState.from_disk(tmp_path / "start")
    assert saved.weights and all(torch.equal(configured.weights[k], w) for k, w in saved.weights.items())
    randomize_adapter(ner, seed=2)  # what training would do
    expected = [ents(d) for d in nlp.pipe(TEXTS)]
    nlp.to_disk(tmp_path / "pipeline")
    shutil.rmtree(tmp_path / "start")  # e.g. the pipeline is packaged and installed elsewhere
    loaded = spacy.load(tmp_path / "pipeline")
    assert [ents(d) for d in loaded.pipe(TEXTS)] == expected


def test_loading_on_another_device_setting(tiny_nlp, tmp_path):
    tiny_nlp.to_disk(tmp_path / "p")
    nlp = spacy.load(tmp_path / "p", config={"components": {"cllmfs_ner": {"model": {"device": "cpu"}}}})
    assert nlp.get_pipe("cllmfs_ner").model.device.type == "cpu"
    with pytest.raises(Exception, match="device"):
        spacy.load(tmp_path / "p", config={"components": {"cllmfs_ner": {"model": {"device": "cuda:7"}}}})


def test_corrupt_adapter_in_saved_pipeline(tiny_nlp, tmp_path):
    randomize_adapter(tiny_nlp.get_pipe("cllmfs_ner"))
    tiny_nlp.to_disk(tmp_path / "p")
    (tmp_path / "p" / "cllmfs_ner" / "adapter" / "adapter_model.safetensors").write_bytes(b"oops")
    with pytest.raises(Exception, match="cannot be read"):
        spacy.load(tmp_path / "p")


def test_score_returns_spacy_ner_scores(tiny_nlp):
    randomize_adapter(tiny_nlp.get_pipe("cllmfs_ner"))
    examples = []
    for text in TEXTS[:2]:
        predicted = tiny_nlp(text)
        reference = tiny_nlp.make_doc(text)
        reference.ents = [Span(reference, 0, 2, label="person")]
        examples.append(Example(predicted, reference))
    scores = tiny_nlp.get_pipe("cllmfs_ner").score(examples)
    assert set(scores) >= {"ents_p", "ents_r", "ents_f", "ents_per_type"}
    evaluated = tiny_nlp.evaluate([Example(tiny_nlp.make_doc(e.reference.text), e.reference) for e in examples])
    assert evaluated["ents_f"] == scores["ents_f"]
    assert evaluated["ents_per_type"] == scores["ents_per_type"]


def test_spacy_evaluate_cli_on_a_saved_pipeline(tiny_nlp, tmp_path):
    import json
    import subprocess
    import sys

    from spacy.tokens import DocBin

    randomize_adapter(tiny_nlp.get_pipe("cllmfs_ner"))
    tiny_nlp.to_disk(tmp_path / "pipeline")
    gold = []
    for text in TEXTS[:2]:
        doc = tiny_nlp.make_doc(text)
        doc.ents = [Span(doc, 0, 2, label="person")]
        gold.append(doc)
    DocBin(docs=gold).to_disk(tmp_path / "dev.spacy")
    result = subprocess.run(
        [sys.executable, "-m", "spacy", "evaluate", str(tmp_path / "pipeline"), str(tmp_path / "dev.spacy"),
         "--output", str(tmp_path / "metrics.json")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    direct = tiny_nlp.evaluate([Example(tiny_nlp.make_doc(d.text), d) for d in gold])
    assert metrics["ents_f"] == pytest.approx(direct["ents_f"])
    assert set(metrics["ents_per_type"]) == set(direct["ents_per_type"])


def candidates(doc):
    return sorted((s.start, s.end, s.label_, round(score, 4)) for s, score in zip(doc.spans["c"], doc.spans["c"].attrs["scores"]))


@pytest.mark.parametrize("template", ["spacy_cllmfs.prompt.v1", "spacy_cllmfs.prompt.v2"])
@pytest.mark.parametrize("constrained", [True, False])
def test_shared_prefix_gives_the_same_entities_as_unshared(tiny_model_config, template, constrained):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person", "location", "politicalparty"], "max_new_tokens": 24,
        "prompt": {"@misc": template}, "candidates_key": "c", "constrained": constrained, "batch_size": 5})
    randomize_adapter(ner, seed=1)
    texts = TEXTS * 2
    ner.shared_prefix = False
    unshared = list(nlp.pipe(texts, batch_size=6))
    unshared_tokens = ner.stats.prompt_tokens
    ner.shared_prefix = True
    ner.stats.prompt_tokens = 0
    shared = list(nlp.pipe(texts, batch_size=6))
    assert [ents(d) for d in shared] == [ents(d) for d in unshared]
    assert [candidates(d) for d in shared] == [candidates(d) for d in unshared]
    assert sum(len(d.spans["c"]) for d in shared) > 0 or not constrained  # free: junk answers
    # shared prefixes are computed once per group, then each prompt's own ids
    docs = [nlp.make_doc(t) for t in texts]
    tasks = ner.make_prompts(docs)
    assert unshared_tokens == sum(len(p.ids) for task in tasks for p in task.prompts)
    batches = [ner.make_prompts(docs[i : i + 6]) for i in range(0, len(docs), 6)]
    assert ner.stats.prompt_tokens == sum(prefill_tokens(prompt_groups(b, 5)[0], 5) for b in batches)
    groups = prompt_groups(batches[0], 5)[0]
    if template.endswith("v2"):  # per window: the sentence is part of the shared ids
        assert all(t.prompts[0].shared_len > t.prompts[0].word_spans[-1][1] for t in tasks)
        assert len(groups) == len([t for t in batches[0] if t.prompts])
    else:  # per label: the instruction before the sentence is shared by all windows
        assert {tuple(g.prefix) for g in groups} == {tuple(p.ids[: p.sentence_start]) for p in batches[0][0].prompts}


def test_candidates_come_from_the_copied_positions(tiny_model_config):
    """Constrained answers give their token positions: a repeated name is a candidate at
    each occurrence, and the positions agree with searching the answer text."""
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person", "location"], "max_new_tokens": 24, "candidates_key": "c"})
    randomize_adapter(ner, seed=2)
    with_positions = [candidates(d) for d in nlp.pipe(TEXTS)]
    assert sum(map(len, with_positions)) > 0
    for doc, found in zip(nlp.pipe(TEXTS), with_positions):
        for start, end, label, _ in found:
            assert 0 <= start < end <= len(doc)
            # the positions agree with searching the window's text for the copied text
            pieces = ner.builder.word_pieces(doc[:])
            assert (start, end) in locate(pieces, doc[start:end].text).ranges


def test_worked_examples_are_chosen_shown_shared_and_saved(tiny_model_config, tmp_path, caplog):
    """prompt.v3: `initialize` chooses the examples, every prompt of a label shows them
    (shared by all windows of a batch), and the pipeline saves them."""
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "max_new_tokens": 16, "candidates_key": "c", "batch_size": 4,
        "prompt": {"@misc": "spacy_cllmfs.prompt.v3", "demonstrations": 1}})
    gold = []
    for text, spans in [("Obama visited Paris.", [(0, 1, "person"), (2, 3, "location")]),
                        ("Angela Merkel met Marie Curie in Geneva.", [(0, 2, "person"), (3, 5, "person")])]:
        doc = nlp.make_doc(text)
        doc.ents = [Span(doc, s, e, label=label) for s, e, label in spans]
        gold.append(Example(nlp.make_doc(text), doc))
    nlp.initialize(lambda: gold)
    assert ner.labels == ("location", "person")
    assert [d.text for d in ner.demonstrations.by_label["person"]] == ["Obama visited Paris.", gold[1].text]
    randomize_adapter(ner, seed=2)
    prompts = ner.make_prompts([nlp.make_doc(t) for t in TEXTS[:2]])
    shown = [ner.builder.decode(p.ids) for p in prompts[0].prompts + prompts[1].prompts]
    assert "Example sentence: Obama visited Paris.\n" in shown[1] + shown[3]
    ner.shared_prefix = False
    unshared = list(nlp.pipe(TEXTS))
    ner.shared_prefix = True
    shared = list(nlp.pipe(TEXTS))
    assert [candidates(d) for d in shared] == [candidates(d) for d in unshared]
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.get_pipe("cllmfs_ner").demonstrations.by_label == ner.demonstrations.by_label
    assert [candidates(d) for d in loaded.pipe(TEXTS)] == [candidates(d) for d in shared]
    copy = spacy.util.load_model_from_config(nlp.config)
    copy.from_bytes(nlp.to_bytes())
    assert copy.get_pipe("cllmfs_ner").demonstrations.by_label == ner.demonstrations.by_label
    cfg = tmp_path / "pipeline" / "cllmfs_ner" / "cfg"
    state = json.loads(cfg.read_text())
    del state["demonstrations"]
    cfg.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="spacy_cllmfs"):
        spacy.load(tmp_path / "pipeline")
    assert "none were saved with it" in caplog.text


def test_every_registered_function_has_an_entry_point():
    root = Path(__file__).parent.parent
    source = "".join(p.read_text() for p in (root / "spacy_cllmfs").glob("*.py"))
    registered = set(re.findall(r'registry\.misc\("(spacy_cllmfs\.[^"]+)"\)', source))
    entry_points = set(re.findall(r'"(spacy_cllmfs\.[\w.]+) = ', (root / "setup.py").read_text()))
    assert len(registered) >= 7 and registered <= entry_points
