"""Tuning the LoRA adapter of a spacy-llm `llm` component on its own prompts (`llm_tuning`)."""
import random
import shutil
from pathlib import Path
from typing import List

import pytest
import spacy
import torch
from spacy.tokens import Doc
from spacy.training import Example

from spacy.util import registry

from spacy_cllmfs import llm_tuning, training
from spacy_cllmfs.labels import label_definitions
from spacy_cllmfs.llm_tuning import (
    GeneralMix, TuningSettings, answer_text, tune_llm, tune_llm_general, tune_llm_mixed, tuning_items, tuning_pairs,
)
from spacy_cllmfs.training import shared_micro_batches
from spacy_cllmfs.spacy_llm import MODEL_NAME, SpacyLLMModel, embed_in_pipeline, write_ner_v3_examples

LABELS = ["PERSON", "LOCATION"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_doc(nlp: spacy.Language, text: str, ents: List[tuple]) -> Doc:
    doc = nlp.make_doc(text)
    doc.ents = [
        doc.char_span(text.index(phrase), text.index(phrase) + len(phrase), label=label) for phrase, label in ents
    ]
    return doc


def gold(nlp: spacy.Language) -> List[Doc]:
    return [
        make_doc(nlp, "Barack Obama visited Paris.", [("Barack Obama", "PERSON"), ("Paris", "LOCATION")]),
        make_doc(nlp, "Marie Curie lived in Warsaw.", [("Marie Curie", "PERSON"), ("Warsaw", "LOCATION")]),
        make_doc(nlp, "The United Nations met in Rome.", [("United Nations", "ORG"), ("Rome", "LOCATION")]),
    ]


def llm_nlp(tiny_model_path: Path, examples: Path = None, max_new_tokens: int = 40) -> spacy.Language:
    nlp = spacy.blank("en")
    task = {"@llm_tasks": "spacy.NER.v3", "labels": LABELS}
    if examples is not None:
        task["examples"] = {"@misc": "spacy.FewShotReader.v1", "path": str(examples)}
    nlp.add_pipe(
        "llm",
        config={
            "task": task,
            "model": {
                "@llm_models": MODEL_NAME, "name": str(tiny_model_path), "device": "cpu",
                "max_new_tokens": max_new_tokens, "batch_size": 4,
            },
            "save_io": True,
        },
    )
    return nlp


def as_examples(nlp: spacy.Language, docs: List[Doc]) -> List[Example]:
    return [Example(nlp.make_doc(doc.text), doc) for doc in docs]


def test_answer_text_writes_the_task_s_answer_lines(tiny_model_path):
    nlp = llm_nlp(tiny_model_path)
    task = nlp.get_pipe("llm").task
    shot = task.prompt_example_type.generate(as_examples(nlp, gold(nlp))[0], task)
    assert answer_text(shot) == (
        "1. Barack Obama | True | PERSON | is a PERSON\n2. Paris | True | LOCATION | is a LOCATION"
    )
    with pytest.raises(TypeError, match="chain-of-thought span tasks"):
        answer_text(object())


def test_a_sentence_is_never_its_own_example(tiny_model_path, tmp_path):
    nlp = spacy.blank("en")
    docs = gold(nlp)
    path = tmp_path / "examples.json"
    write_ner_v3_examples(docs, LABELS, path)
    nlp = llm_nlp(tiny_model_path, path)
    task = nlp.get_pipe("llm").task
    before = list(task.prompt_examples)
    examples = as_examples(nlp, docs)
    settings = TuningSettings(shuffle_examples=False)
    pairs = tuning_pairs(task, examples, random.Random(0), settings)
    for doc, pair in zip(docs, pairs):
        assert pair.prompt.count(f"Paragraph: {doc.text}") == 1  # the question only
        assert pair.prompt.rstrip().endswith(f"Paragraph: {doc.text}\nAnswer:")
        others = [d for d in docs if d is not doc]
        assert all(f"Paragraph: {d.text}" in pair.prompt for d in others)
    kept = tuning_pairs(task, examples, random.Random(0), TuningSettings(leave_one_out=False))
    assert kept[0].prompt.count(f"Paragraph: {docs[0].text}") == 2
    assert list(task.prompt_examples) == before  # the task's examples are restored
    # the ORG entity is not one of the task's labels: it is not part of the answer
    assert pairs[2].answer == "1. Rome | True | LOCATION | is a LOCATION"


def four_examples_and_a_question(tiny_model_path: Path, tmp_path: Path) -> tuple:
    """A task with four few-shot examples, the docs behind them, and a new question."""
    nlp = spacy.blank("en")
    docs = gold(nlp) + [make_doc(nlp, "Ada Lovelace met Charles Babbage.", [("Ada Lovelace", "PERSON")])]
    path = tmp_path / "examples.json"
    write_ner_v3_examples(docs, LABELS, path)
    nlp = llm_nlp(tiny_model_path, path)
    question = as_examples(nlp, [make_doc(nlp, "Nobody went to Oslo.", [("Oslo", "LOCATION")])])
    return nlp.get_pipe("llm").task, docs, question


def test_shuffled_examples_change_order_not_content(tiny_model_path, tmp_path):
    task, _, question = four_examples_and_a_question(tiny_model_path, tmp_path)
    prompts = {tuning_pairs(task, question, random.Random(seed), TuningSettings())[0].prompt for seed in range(6)}
    assert len(prompts) > 1
    shown = [sorted(line for line in p.splitlines() if line.startswith("Paragraph:")) for p in prompts]
    assert all(lines == shown[0] for lines in shown)


def shown_lines(prompt: str) -> List[str]:
    """The few-shot sentences a prompt shows (the last "Paragraph:" line is the question)."""
    return [line for line in prompt.splitlines() if line.startswith("Paragraph:")][:-1]


def test_examples_shown_picks_a_new_subset_each_time(tiny_model_path, tmp_path):
    task, docs, question = four_examples_and_a_question(tiny_model_path, tmp_path)
    rng = random.Random(0)
    subsets = set()
    for _ in range(8):
        prompt = tuning_pairs(task, question, rng, TuningSettings(examples_shown=2))[0].prompt
        shown = shown_lines(prompt)
        assert len(shown) == 2
        assert all(line[len("Paragraph: "):] in {doc.text for doc in docs} for line in shown)
        subsets.add(frozenset(shown))
    assert len(subsets) > 1
    everything = tuning_pairs(task, question, rng, TuningSettings(examples_shown=10))[0].prompt
    assert everything.count("Paragraph:") == len(docs) + 1
    assert len(task.prompt_examples) == len(docs)  # the task's own examples are untouched
    with pytest.raises(ValueError, match="examples_shown must be None or >= 0"):
        TuningSettings(examples_shown=-1)


def test_shared_step_examples_ask_a_step_with_one_prefix(tiny_model_path, tmp_path):
    task, docs, _ = four_examples_and_a_question(tiny_model_path, tmp_path)
    settings = TuningSettings(batch_size=2, micro_batch_size=2, shared_step_examples=True)
    step = as_examples(spacy.blank("en"), docs[:2])
    pairs = tuning_pairs(task, step, random.Random(0), settings)
    asked = {doc.text for doc in docs[:2]}
    first, second = (shown_lines(pair.prompt) for pair in pairs)
    assert first == second and len(first) == 2  # the same two examples, in the same order
    assert not any(line[len("Paragraph: "):] in asked for line in first)  # neither sentence of the step
    # one prompt at a time: each shows the other sentence of the step, in an order of its own
    alone = tuning_pairs(task, step, random.Random(0), TuningSettings(batch_size=2))
    assert all(len(shown_lines(pair.prompt)) == 3 for pair in alone)
    with pytest.raises(ValueError, match="set micro_batch_size >= batch_size"):
        TuningSettings(batch_size=2, shared_step_examples=True)


def test_a_shared_step_is_computed_as_one_prefix(tiny_model_path, tmp_path, monkeypatch):
    _, docs, _ = four_examples_and_a_question(tiny_model_path, tmp_path)  # writes examples.json
    nlp = llm_nlp(tiny_model_path, tmp_path / "examples.json", max_new_tokens=4)
    people = nlp.get_pipe("llm")
    orgs = pipeline_on(people._model.lm, ["ORG"])
    stream = [(people.task, people._model, example) for example in as_examples(nlp, docs[:3])]
    stream.append((orgs.get_pipe("llm").task, orgs.get_pipe("llm")._model, as_examples(orgs, docs[2:3])[0]))
    settings = TuningSettings(batch_size=4, micro_batch_size=4, shared_step_examples=True, prompt_gradients=False)
    items = llm_tuning.step_items(stream, random.Random(0), settings)
    assert len(items) == 4
    prefixes = {tuple(item.prompt.prefix) for item in items}
    assert len(prefixes) == 2  # one per task: its three sentences share theirs
    shared = people._model.lm.tokenizer.decode(items[0].prompt.prefix)
    assert f"Paragraph: {docs[3].text}" in shared  # the examples are part of it
    groups = [len(group) for batch in shared_micro_batches(items, 4) for group in batch]
    assert sorted(groups) == [1, 3]
    # and the step trains: the prefixes are computed once per task, the loss falls
    computed = []
    collate = training.collate_shared
    monkeypatch.setattr(training, "collate_shared",
                        lambda groups, *args: computed.append(len(groups)) or collate(groups, *args))
    lm = people._model.lm
    lm.reset_adapter()
    losses = llm_tuning._train(stream, TuningSettings(epochs=6, batch_size=4, micro_batch_size=4, learn_rate=2e-2,
                                                      warmup_steps=0, shared_step_examples=True,
                                                      prompt_gradients=False), lambda step: None)
    assert computed == [2] * 6
    assert losses[-1] < 0.5 * losses[0]


def test_items_end_with_the_answer_and_the_end_token(tiny_model_path):
    nlp = llm_nlp(tiny_model_path)
    task, model = nlp.get_pipe("llm").task, nlp.get_pipe("llm")._model
    pairs = tuning_pairs(task, as_examples(nlp, gold(nlp))[:1], random.Random(0), TuningSettings())
    item = tuning_items(model, pairs)[0]
    assert item.prompt.ids == model.encode(pairs[0].prompt)
    tokenizer = model.lm.tokenizer  # the shared part is all that precedes the sentence
    sentence = gold(nlp)[0].text
    assert pairs[0].prompt[pairs[0].sentence_at :].startswith(sentence)
    assert sentence not in tokenizer.decode(item.prompt.ids[: item.prompt.shared_len])
    assert tokenizer.decode(item.prompt.ids[item.prompt.shared_len :]).lstrip().startswith(sentence)
    assert item.answer[-1] == model.end_id
    assert model.lm.tokenizer.decode(item.answer[:-1]) == pairs[0].answer


def test_contrastive_targets_mark_each_label_and_its_entities(tiny_model_path):
    nlp = llm_nlp(tiny_model_path)
    task, model = nlp.get_pipe("llm").task, nlp.get_pipe("llm")._model
    examples = as_examples(nlp, gold(nlp)) + as_examples(nlp, [make_doc(nlp, "It rained.", [])])
    pairs = tuning_pairs(task, examples, random.Random(0), TuningSettings())
    settings = TuningSettings(contrastive_weight=0.1, contrastive_negatives="other_types")
    items = tuning_items(model, pairs, settings, random.Random(0))
    assert [item.prompt.ids for item in items] == [model.encode(pair.prompt) for pair in pairs]
    decode = lambda item, positions: [model.lm.tokenizer.decode([item.prompt.ids[p]]).strip() for p in positions]
    obama, paris = items[0].targets  # one group per label with an entity, in the sentence's order
    label_list = pairs[0].prompt.index("LOCATION, PERSON")  # the first mention: the task's label list
    assert pairs[0].mentions == {"PERSON": (label_list + 10, label_list + 16),
                                 "LOCATION": (label_list, label_list + 8)}
    assert "".join(decode(items[0], obama.anchor)) == "PERSON"
    assert "".join(decode(items[0], paris.anchor)) == "LOCATION"
    shared = items[0].prompt.shared_len  # the entities are read in the sentence, not in the examples
    assert min(obama.positives + paris.positives) >= shared
    first, *_, last = decode(items[0], obama.positives)
    assert "Barack Obama".startswith(first) and "Barack Obama".endswith(last)
    # the other label's entity comes first among the negatives
    assert obama.negatives[: len(paris.positives)] == paris.positives
    # only the task's labels count (ORG is not one), and a sentence without entities has no targets
    assert len(items[2].targets) == 1 and items[3].targets == []
    assert all(item.targets == [] for item in tuning_items(model, pairs, TuningSettings(), random.Random(0)))
    # the negatives are sampled apart: the term changes no prompt of a training step
    stream = [(task, model, example) for example in examples]
    plain = llm_tuning.step_items(stream, random.Random(0), TuningSettings())
    contrasted = llm_tuning.step_items(stream, random.Random(0), settings, random.Random(0))
    assert [item.prompt.ids for item in contrasted] == [item.prompt.ids for item in plain]
    with pytest.raises(ValueError, match="contrastive_negatives"):
        TuningSettings(contrastive_negatives="random")
    with pytest.raises(ValueError, match="contrastive_weight"):
        TuningSettings(contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="tune_llm settings: contrastive_layer 0 is the embedding layer"):
        TuningSettings(contrastive_layer=0)


@pytest.mark.parametrize("prompt_gradients", [True, False])
def test_contrastive_tuning_lowers_both_losses(tiny_model_path, prompt_gradients, caplog):
    nlp = llm_nlp(tiny_model_path, max_new_tokens=4)
    examples = as_examples(nlp, gold(nlp)[:2])
    settings = TuningSettings(epochs=15, batch_size=2, learn_rate=2e-2, warmup_steps=0, prompt_gradients=prompt_gradients,
                              contrastive_weight=1.0, contrastive_layer=1, seed=0)
    with caplog.at_level("INFO", logger="spacy_cllmfs.llm_tuning"):
        report = tune_llm(nlp, examples, settings=settings)
    contrastive = [float(line.split("contrastive ")[1].rstrip(")")) for line in caplog.messages if "contrastive" in line]
    assert len(contrastive) == 15
    assert contrastive[-1] < 0.5 * contrastive[0]
    assert report.losses[-1] < 0.5 * report.losses[0]


@pytest.mark.parametrize("prompt_gradients", [True, False])
def test_tuning_teaches_the_answer(tiny_model_path, prompt_gradients):
    nlp = llm_nlp(tiny_model_path, max_new_tokens=120)
    docs = gold(nlp)[:1]
    examples = as_examples(nlp, docs)
    settings = TuningSettings(
        epochs=40, batch_size=1, learn_rate=2e-2, warmup_steps=0, prompt_gradients=prompt_gradients, seed=0
    )
    report = tune_llm(nlp, examples, settings=settings)
    assert len(report.losses) == 40
    assert report.losses[-1] < 0.1 * report.losses[0]
    doc = nlp(docs[0].text)
    response = doc.user_data["llm_io"]["llm"]["response"][0]
    assert response.strip() == "1. Barack Obama | True | PERSON | is a PERSON\n2. Paris | True | LOCATION | is a LOCATION"
    assert [(ent.text, ent.label_) for ent in doc.ents] == [("Barack Obama", "PERSON"), ("Paris", "LOCATION")]


def test_dev_selection_keeps_the_best_adapter(tiny_model_path, monkeypatch):
    nlp = llm_nlp(tiny_model_path, max_new_tokens=4)
    lm = nlp.get_pipe("llm")._model.lm
    scores = iter([0.2, 0.5, 0.1])  # before training, after step 2, after step 4
    monkeypatch.setattr(nlp, "evaluate", lambda examples: {"ents_f": next(scores)})
    examples = as_examples(nlp, gold(nlp)[:2])
    settings = TuningSettings(epochs=4, batch_size=1, learn_rate=1e-2, warmup_steps=0)
    states = []
    original = lm.adapter_state

    def recording():
        state = original()
        states.append(state)
        return state

    monkeypatch.setattr(lm, "adapter_state", recording)
    report = tune_llm(nlp, examples, settings=settings, dev=examples, evaluations=2)
    assert report.dev_scores == {0: 0.2, 4: 0.5, 8: 0.1}
    assert report.best_step == 4
    kept = states[-1]  # recorded when step 4 scored best
    now = original()
    assert all(torch.equal(kept.weights[name], now.weights[name]) for name in kept.weights)


def test_training_hands_freed_memory_back_once_it_ends(tiny_model_path, monkeypatch):
    nlp = llm_nlp(tiny_model_path, max_new_tokens=4)
    events = []
    step = llm_tuning.accumulate

    def counted_step(*args, **kwargs):
        events.append("step")
        return step(*args, **kwargs)

    monkeypatch.setattr(llm_tuning, "accumulate", counted_step)
    monkeypatch.setattr(llm_tuning, "release_memory", lambda: events.append("release"))
    examples = as_examples(nlp, gold(nlp)[:2])
    tune_llm(nlp, examples, settings=TuningSettings(epochs=1, batch_size=1, warmup_steps=0))
    assert events == ["step", "step", "release"]
    # and before each dev evaluation, so that decoding does not stack on training's heap
    events.clear()
    monkeypatch.setattr(nlp, "evaluate", lambda examples: events.append("dev") or {"ents_f": 0.5})
    tune_llm(nlp, examples, settings=TuningSettings(epochs=1, batch_size=1, warmup_steps=0), dev=examples,
             evaluations=1)
    assert events == ["release", "dev", "step", "step", "release", "dev", "release"]


def test_a_stage_trains_the_same_whatever_ran_before_it(tiny_model_path):
    nlp = llm_nlp(tiny_model_path, max_new_tokens=4)
    lm = nlp.get_pipe("llm")._model.lm
    examples = as_examples(nlp, gold(nlp)[:2])
    settings = TuningSettings(epochs=1, batch_size=1, warmup_steps=0, learn_rate=1e-2, seed=3)
    adapters = []
    for history in (1, 2):  # two processes whose torch generators stand at different states
        torch.manual_seed(history)
        before = torch.get_rng_state()
        tune_llm(nlp, examples, settings=settings)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is left as it was
        adapters.append(lm.adapter_state().weights)
        lm.reset_adapter()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def pipeline_on(lm, labels: List[str]) -> spacy.Language:
    """An `llm` pipeline with its own labels, served by the model `lm` of another one."""
    model = SpacyLLMModel(lm, max_new_tokens=120, batch_size=4)
    name = f"test.shared_llm.{id(model)}"
    registry.llm_models.register(name, func=lambda: model)
    nlp = spacy.blank("en")
    nlp.add_pipe("llm", config={
        "task": {"@llm_tasks": "spacy.NER.v3", "labels": labels}, "model": {"@llm_models": name}, "save_io": True,
    })
    return nlp


def test_mixed_tuning_teaches_each_pipeline_its_own_task(tiny_model_path):
    people = llm_nlp(tiny_model_path, max_new_tokens=120)
    orgs = pipeline_on(people.get_pipe("llm")._model.lm, ["ORG"])
    docs = gold(people)
    settings = TuningSettings(epochs=40, batch_size=2, learn_rate=2e-2, warmup_steps=0, seed=0)
    report = tune_llm_mixed([(people, as_examples(people, docs[:1])), (orgs, as_examples(orgs, docs[2:]))],
                            settings=settings)
    assert len(report.losses) == 40 and report.dev_scores == {}
    assert report.losses[-1] < 0.1 * report.losses[0]
    assert [(e.text, e.label_) for e in people(docs[0].text).ents] == [("Barack Obama", "PERSON"), ("Paris", "LOCATION")]
    # the same adapter, asked by the other task: only its label, learned from its own answer
    assert [(e.text, e.label_) for e in orgs(docs[2].text).ents] == [("United Nations", "ORG")]


def test_mixed_tuning_needs_one_model(tiny_model_path):
    first, second = llm_nlp(tiny_model_path), llm_nlp(tiny_model_path)
    examples = as_examples(first, gold(first))
    with pytest.raises(ValueError, match="same HFCausalLM"):
        tune_llm_mixed([(first, examples), (second, examples)])
    with pytest.raises(ValueError, match="no training examples"):
        tune_llm_mixed([(first, [])])


def test_general_tuning_asks_each_sentence_with_its_own_corpus_labels(tiny_model_path, monkeypatch):
    nlp = llm_nlp(tiny_model_path)
    model = nlp.get_pipe("llm")._model
    docs = gold(nlp)
    corpora = {"people": docs[:2], "orgs": [docs[2]]}
    asked = []
    original = llm_tuning.tuning_pairs

    def recording(task, examples, rng, settings):
        asked.extend((example.reference.text, tuple(task.labels)) for example in examples)
        return original(task, examples, rng, settings)

    monkeypatch.setattr(llm_tuning, "tuning_pairs", recording)
    settings = TuningSettings(epochs=2, batch_size=2, examples_shown=1)
    before = [doc.to_bytes() for doc in docs]
    report = tune_llm_general(model, corpora, mix=GeneralMix(size=2, shots=1), settings=settings)
    assert [doc.to_bytes() for doc in docs] == before  # the caller's corpora are left as they were
    assert report.sources == {"people": 1, "orgs": 1} and len(report.losses) == 2
    assert model.lm.has_adapter
    # one sentence of each corpus (an equal share), each asked by its own corpus's task, every epoch
    own = {doc.text: ("LOCATION", "PERSON") for doc in docs[:2]}
    own[docs[2].text] = ("LOCATION", "ORG")
    assert len(asked) == 4 and len(set(asked)) == 2 and all(own[text] == labels for text, labels in asked)
    assert docs[2].text in {text for text, _ in asked}
    with pytest.raises(ValueError, match="no corpora"):
        tune_llm_general(model, {})
    with pytest.raises(ValueError, match="size and shots must be >= 1"):
        GeneralMix(size=0)


def test_general_tuning_writes_the_definitions_it_is_asked_for(tiny_model_path, monkeypatch):
    nlp = llm_nlp(tiny_model_path)
    model = nlp.get_pipe("llm")._model
    text, ents = "Barack Obama met Marie Curie.", [("Barack Obama", "POLITICIAN"), ("Marie Curie", "PERSON")]
    corpus = [make_doc(nlp, text, ents)]
    shown = []
    original = llm_tuning.tuning_pairs

    def recording(task, examples, rng, settings):
        shown.append(dict(task._label_definitions))
        return original(task, examples, rng, settings)

    monkeypatch.setattr(llm_tuning, "tuning_pairs", recording)
    settings = TuningSettings(epochs=1, batch_size=1, examples_shown=0)
    for style in ("plain", "contrasted"):
        tune_llm_general(model, {"politics": corpus}, mix=GeneralMix(size=1, shots=1), settings=settings,
                         definitions=style)
    assert shown == [label_definitions(["PERSON", "POLITICIAN"], style) for style in ("plain", "contrasted")]
    assert shown[0] != shown[1]
    with pytest.raises(ValueError, match="Unknown label definition style 'fancy'"):
        tune_llm_general(model, {"politics": corpus}, mix=GeneralMix(size=1, shots=1), settings=settings,
                         definitions="fancy")
    assert len(shown) == 2  # refused before any prompt was built


def test_bad_input_names_the_fix(tiny_model_path):
    nlp = llm_nlp(tiny_model_path)
    examples = as_examples(nlp, gold(nlp))
    with pytest.raises(ValueError, match="no component 'ner'"):
        tune_llm(nlp, examples, component="ner")
    with pytest.raises(ValueError, match="no training examples"):
        tune_llm(nlp, [])
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TuningSettings(epochs=0)
    other = spacy.blank("en")
    other.add_pipe("llm", config={
        "task": {"@llm_tasks": "spacy.NER.v3", "labels": LABELS},
        "model": {"@llm_models": "spacy.NoOp.v1"},
    })
    with pytest.raises(TypeError, match=MODEL_NAME):
        tune_llm(other, examples)


def adapter_weights(nlp: spacy.Language) -> dict:
    return nlp.get_pipe("llm")._model.lm.adapter_state().weights


def test_a_saved_pipeline_loads_without_the_files_it_was_built_from(tiny_model_path, tmp_path):
    docs = gold(spacy.blank("en"))
    examples_path = tmp_path / "examples.json"
    write_ner_v3_examples(docs, LABELS, examples_path)
    first = llm_nlp(tiny_model_path, examples_path)
    tune_llm(first, as_examples(first, docs)[:1], settings=TuningSettings(epochs=1, batch_size=1, learn_rate=1e-2))
    first.get_pipe("llm")._model.lm.adapter_state().to_disk(tmp_path / "adapter")
    nlp = llm_nlp(tiny_model_path, examples_path)
    nlp.get_pipe_config("llm")["model"]["adapter"] = str(tmp_path / "adapter")
    nlp.get_pipe("llm")._model.lm.set_adapter(first.get_pipe("llm")._model.lm.adapter_state())
    assert embed_in_pipeline(nlp) == ["components.llm.task.examples", "components.llm.model.adapter"]
    assert embed_in_pipeline(nlp) == []  # nothing left to change
    nlp.to_disk(tmp_path / "pipeline")
    examples_path.unlink()
    shutil.rmtree(tmp_path / "adapter")
    loaded = spacy.load(tmp_path / "pipeline")
    assert [shot.text for shot in loaded.get_pipe("llm").task.prompt_examples] == [doc.text for doc in docs]
    assert set(adapter_weights(loaded)) == set(adapter_weights(first))
    assert all(torch.equal(adapter_weights(loaded)[k], adapter_weights(first)[k]) for k in adapter_weights(first))
    with pytest.raises(ValueError, match="no component 'ner'"):
        embed_in_pipeline(loaded, "ner")


def test_a_tuned_adapter_is_saved_with_the_pipeline(tiny_model_path, tmp_path):
    nlp = llm_nlp(tiny_model_path)
    assert nlp.get_pipe("llm")._model.to_bytes()  # no adapter yet: an empty record
    nlp.to_disk(tmp_path / "untuned")
    assert not (tmp_path / "untuned" / "llm" / "model" / "adapter").exists()
    tune_llm(nlp, as_examples(nlp, gold(nlp))[:1], settings=TuningSettings(epochs=2, batch_size=1, learn_rate=1e-2))
    tuned = adapter_weights(nlp)
    assert any(float(w.abs().sum()) > 0 for name, w in tuned.items() if "lora_B" in name)
    nlp.to_disk(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "llm" / "model" / "adapter" / "adapter_config.json").exists()
    for loaded in (spacy.load(tmp_path / "tuned"), llm_nlp(tiny_model_path).from_bytes(nlp.to_bytes())):
        weights = adapter_weights(loaded)
        assert weights.keys() == tuned.keys()
        assert all(torch.equal(weights[name], tuned[name]) for name in tuned)
    text = "Angela Merkel visited Berlin."
    reloaded = spacy.load(tmp_path / "tuned")
    assert reloaded(text).user_data["llm_io"]["llm"]["response"] == nlp(text).user_data["llm_io"]["llm"]["response"]


def test_tune_llm_cli(tiny_model_path, tmp_path, caplog):
    from spacy.tokens import DocBin
    from typer.testing import CliRunner

    from spacy_cllmfs.cli import app

    nlp = llm_nlp(tiny_model_path)
    nlp.to_disk(tmp_path / "pipeline")
    docs = gold(nlp)
    DocBin(docs=docs[:2]).to_disk(tmp_path / "train.spacy")
    DocBin(docs=docs[2:]).to_disk(tmp_path / "dev.spacy")
    output = tmp_path / "tuned"
    args = ["tune-llm", str(tmp_path / "pipeline"), str(tmp_path / "train.spacy"), str(output),
            "--dev", str(tmp_path / "dev.spacy"), "--epochs", "1", "--batch-size", "1", "--evaluations", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Tuned 2 steps on 2 sentences" in result.output and "kept step" in result.output
    assert spacy.load(output).pipe_names == ["llm"]
    nlp.config.to_disk(tmp_path / "llm.cfg")  # a config is assembled as spacy-llm does
    from_config = CliRunner().invoke(
        app, ["tune-llm", str(tmp_path / "llm.cfg"), *args[2:4], "--epochs", "1", "--examples-shown", "0",
              "--no-prompt-gradients"]
    )
    assert from_config.exit_code == 0, from_config.output
    assert "Tuned 1 steps on 2 sentences" in from_config.output
    shared = CliRunner().invoke(app, [*args[:4], "--batch-size", "2", "--epochs", "1", "--no-prompt-gradients",
                                      "--shared-step-examples", "--contrastive-weight", "0.1"])
    assert shared.exit_code == 0, shared.output
    assert "Tuned 1 steps on 2 sentences (gradients through the sentence and answer only; one set of" in shared.output
    assert "; contrastive weight 0.1)" in shared.output
    DocBin(docs=docs[2:]).to_disk(tmp_path / "orgs.spacy")  # a corpus of other labels
    with caplog.at_level("INFO", logger="spacy_cllmfs.llm_tuning"):
        general = CliRunner().invoke(app, ["tune-llm-general", str(tmp_path / "pipeline"), str(tmp_path / "general"),
                                           str(tmp_path / "orgs.spacy"), "--size", "1", "--shots", "1",
                                           "--contrastive-weight", "0.5"])
    assert general.exit_code == 0, general.output
    assert "Tuned the general adapter 1 steps on 1 sentences" in general.output
    assert "; contrastive weight 0.5): loss" in general.output
    assert any("step 1/1 loss" in line and "(contrastive " in line for line in caplog.messages)  # the term ran
    assert adapter_weights(spacy.load(tmp_path / "general"))  # saved with the pipeline
    further = CliRunner().invoke(app, ["tune-llm", str(tmp_path / "general"), *args[2:4], "--epochs", "1"])
    assert further.exit_code == 0, further.output
    leak = CliRunner().invoke(app, ["tune-llm-general", str(tmp_path / "pipeline"), str(tmp_path / "general2"),
                                    str(tmp_path / "train.spacy"), "--exclude", str(tmp_path / "train.spacy")])
    assert leak.exit_code == 1 and "is excluded from the mix" in leak.output
    negative = CliRunner().invoke(app, ["tune-llm-general", str(tmp_path / "pipeline"), str(tmp_path / "general3"),
                                        str(tmp_path / "orgs.spacy"), "--contrastive-weight", "-1"])
    assert negative.exit_code == 1 and "contrastive_weight must be >= 0" in negative.output
    bad = CliRunner().invoke(app, args[:4] + ["--component", "ner"])
    assert bad.exit_code == 1 and "no component 'ner'" in bad.output
    negative = CliRunner().invoke(app, args[:4] + ["--examples-shown", "-2"])
    assert negative.exit_code == 1 and "examples_shown must be None or >= 0" in negative.output
    negative = CliRunner().invoke(app, args[:4] + ["--contrastive-weight", "-1"])
    assert negative.exit_code == 1 and "contrastive_weight must be >= 0" in negative.output


def test_llm_config_cli_takes_labels_and_examples_from_the_shots(tiny_model_path, tmp_path):
    from spacy.tokens import DocBin
    from thinc.api import Config
    from typer.testing import CliRunner

    from spacy_cllmfs.cli import app

    nlp = spacy.blank("en")
    DocBin(docs=gold(nlp)).to_disk(tmp_path / "train.spacy")
    args = ["llm-config", str(tmp_path / "train.spacy"), str(tmp_path / "llm"), "--model", str(tiny_model_path)]
    result = CliRunner().invoke(app, args + ["--max-new-tokens", "12", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "(3 labels) and 3 examples" in result.output
    config = Config().from_disk(tmp_path / "llm" / "llm.cfg")
    assert config["components"]["llm"]["task"]["labels"] == ["LOCATION", "ORG", "PERSON"]
    assert config["components"]["llm"]["model"]["max_new_tokens"] == 12
    assert config["components"]["llm"]["model"]["dtype"] == "bfloat16"
    bad_dtype = CliRunner().invoke(app, args + ["--dtype", "float8"])
    assert bad_dtype.exit_code == 1 and "Unknown dtype 'float8'" in bad_dtype.output
    DocBin(docs=[nlp("No entities here.")]).to_disk(tmp_path / "empty.spacy")
    empty = CliRunner().invoke(app, ["llm-config", str(tmp_path / "empty.spacy"), str(tmp_path / "x")])
    assert empty.exit_code == 1 and "has no entities" in empty.output
    text = "Barack Obama met Marie Curie."
    DocBin(docs=[make_doc(nlp, text, [("Barack Obama", "POLITICIAN"), ("Marie Curie", "PERSON")])]).to_disk(
        tmp_path / "politics.spacy")
    contrasted = CliRunner().invoke(app, ["llm-config", str(tmp_path / "politics.spacy"), str(tmp_path / "pol"),
                                          "--definitions", "contrasted"])
    assert contrasted.exit_code == 0, contrasted.output
    definitions = Config().from_disk(tmp_path / "pol" / "llm.cfg")["components"]["llm"]["task"]["label_definitions"]
    assert definitions["PERSON"] == "names of people, real or fictional, except those tagged POLITICIAN"
    assert definitions == label_definitions(["PERSON", "POLITICIAN"], "contrasted")
    bad = CliRunner().invoke(app, ["llm-config", str(tmp_path / "politics.spacy"), str(tmp_path / "refused"),
                                   "--definitions", "fancy"])
    assert bad.exit_code == 1 and "Unknown label definition style 'fancy'" in bad.output
    assert not (tmp_path / "refused").exists()  # refused before anything was written
