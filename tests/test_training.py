import random
import warnings

import pytest
import spacy
import torch
from spacy.tokens import DocBin, Span
from spacy.training import Example
from thinc.api import Adam

from conftest import randomize_adapter
from spacy_cllmfs.labels import ANNOTATED_LABELS, annotated_labels, set_annotated_labels
from spacy_cllmfs.losses import IGNORE_INDEX
from spacy_cllmfs.training import (
    LayerCapture,
    TrainingSettings,
    _forward,
    collate,
    collate_shared,
    contrastive_targets,
    decoder_layers,
    enable_checkpointing,
    is_checkpointing,
    shared_micro_batches,
)

GOLD = [
    ("Barack Obama visited Paris .", [(0, 2, "person"), (3, 4, "location")]),
    ("Angela Merkel met Marie Curie in Geneva .", [(0, 2, "person"), (3, 5, "person"), (6, 7, "location")]),
    ("The weather was nice .", []),
    ("New York welcomed Obama .", [(0, 2, "location"), (3, 4, "person")]),
]


def make_examples(nlp):
    examples = []
    for text, spans in GOLD:
        doc = spacy.tokens.Doc(nlp.vocab, words=text.split())
        doc.set_ents([Span(doc, s, e, label=label) for s, e, label in spans], default="outside")
        examples.append(Example(nlp.make_doc(doc.text), doc))
    return examples


def make_nlp(tiny_model_config, **training):
    nlp = spacy.blank("en")
    settings = {"@misc": "spacy_cllmfs.training.v2", "micro_batch_size": 4, **training}
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "training": settings, "max_new_tokens": 16})
    return nlp


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_initialize_takes_labels_from_the_examples(tiny_model_config):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    assert ner.labels == ("location", "person")
    assert ner.model.trainable_parameters()
    nlp2 = make_nlp(tiny_model_config)
    ner2 = nlp2.get_pipe("cllmfs_ner")
    ner2.initialize(lambda: examples, labels=["person"], label_descriptions={"person": "people"})
    assert ner2.labels == ("person",) and ner2.label_infos[0].description == "people"


def test_training_prompts_answers_and_negatives(tiny_model_config):
    nlp = make_nlp(tiny_model_config, negatives_per_positive=None)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    items = ner.training_items(examples)
    assert len(items) == len(GOLD) * 2  # every (sentence, label): negatives_per_positive = None
    answers = [ner.builder.decode(item.answer) for item in items]
    assert answers[0] == " <<< Paris >>><|im_end|>"  # location of sentence 0
    assert answers[1] == " <<< Barack Obama >>><|im_end|>"
    assert answers[3] == " <<< Angela Merkel >>> <<< Marie Curie >>><|im_end|>"
    assert answers[4] == "<|im_end|>"  # no location in sentence 2
    ner.training.negatives_per_positive = 0.0
    positives = ner.training_items(examples)
    assert len(positives) == 6 and all(len(item.targets) == 1 for item in positives)
    # the default: one empty prompt per positive one, and one for a sentence without entities
    ner.training.negatives_per_positive = 1.0
    items = ner.training_items(examples)
    assert len(items) == 7
    assert [ner.builder.decode(item.answer) for item in items].count("<|im_end|>") == 1


def test_docs_prompted_with_the_labels_they_are_annotated_for(tiny_model_config):
    """A Doc of a general mix (e.g. CoNLL-2003 in a politics pipeline) declares its labels:
    it gets no prompts, empty or not, for labels it was never annotated for."""
    nlp = make_nlp(tiny_model_config, negatives_per_positive=None)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    set_annotated_labels(examples[0].reference, ["location"])
    set_annotated_labels(examples[2].reference, [])
    items = ner.training_items(examples)
    texts = [ner.builder.decode(item.prompt.ids) for item in items]
    by_sentence = [[item.prompt.label for item, t in zip(items, texts) if text in t] for text, _ in GOLD]
    assert by_sentence == [["location"], ["location", "person"], [], ["location", "person"]]
    paris = [item for item, t in zip(items, texts) if "Barack" in t]
    assert ner.builder.decode(paris[0].answer) == " <<< Paris >>><|im_end|>"
    # kept by DocBin, so a general corpus on disk keeps its declarations
    doc = examples[0].reference
    restored = list(DocBin(docs=[doc], store_user_data=True).get_docs(nlp.vocab))[0]
    assert annotated_labels(restored) == ["location"]
    doc.user_data[ANNOTATED_LABELS] = "location"
    with pytest.raises(ValueError, match="set_annotated_labels"):
        ner.training_items(examples)


def test_retired_training_settings_load_but_do_not_train(tiny_model_config, tmp_path):
    """A config with spacy_cllmfs.training.v1 (negative_ratio) still loads and annotates;
    training it raises an error that names what replaced it."""
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person"], "max_new_tokens": 4,
        "training": {"@misc": "spacy_cllmfs.training.v1", "negative_ratio": 0.5},
    })
    nlp("Barack Obama visited Paris .")
    examples = make_examples(nlp)
    with pytest.raises(ValueError, match=r"negatives_per_positive.*spacy_cllmfs.training.v2|training.v2.*negatives_per_positive"):
        nlp.initialize(lambda: examples)
    with pytest.raises(ValueError, match="negative_ratio"):
        nlp.get_pipe("cllmfs_ner").training_items(examples)


def test_contrastive_positions(tiny_model_config):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    pieces = ner.builder.word_pieces(examples[1].reference[:])
    prompt = ner.builder.build(pieces, ner.label_infos)[1]  # person
    targets = contrastive_targets(prompt, [(0, 2), (3, 5)], max_negatives=4, rng=random.Random(0))
    ws = prompt.word_spans
    assert targets.positives == [ws[0][0], ws[1][1] - 1, ws[3][0], ws[4][1] - 1]
    # the tokens next to the boundaries come first: after "Merkel" (first token of "met"),
    # before "Marie" (last token of "met"), after "Curie" ("in"); then other outside tokens
    hard = list(dict.fromkeys([ws[2][0], ws[2][1] - 1, ws[5][0]]))
    assert targets.negatives[: len(hard)] == hard
    assert len(targets.negatives) == 4
    inside = {p for s, e in ws[0:2] + ws[3:5] for p in range(s, e)}
    assert not inside & set(targets.negatives)
    assert ner.builder.decode([prompt.ids[p] for p in targets.anchor]) == " person"


def test_other_type_entities_are_the_first_negatives(tiny_model_config):
    nlp = make_nlp(tiny_model_config, contrastive_negatives="other_types")
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    pieces = ner.builder.word_pieces(examples[1].reference[:])
    prompt = ner.builder.build(pieces, ner.label_infos)[1]  # person
    ws = prompt.word_spans
    targets = contrastive_targets(prompt, [(0, 2)], max_negatives=4, rng=random.Random(0), others=[(6, 7)])
    # "Geneva" (location) first, then the boundary neighbour "met"
    geneva = sorted({ws[6][0], ws[6][1] - 1})
    assert targets.negatives[: len(geneva) + 1] == geneva + [ws[2][0]]
    # make_items passes the window's other entities with this setting, not without it
    items = ner.training_items([examples[1]])
    person = next(item for item in items if item.prompt.label == "person")
    assert ws[6][0] in person.targets[0].negatives[:2]
    with pytest.raises(ValueError, match="contrastive_negatives"):
        TrainingSettings(contrastive_negatives="random")


def test_collate_left_pads_and_aligns_labels(tiny_model_config):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    items = ner.training_items(examples)[:3]
    batch = collate(items, pad_id=0, device=torch.device("cpu"), answer_only=True)
    width = batch.input_ids.shape[1]
    for row, item in enumerate(items):
        assert batch.input_ids[row, width - len(item.ids):].tolist() == item.ids
        wanted = [t for t in batch.labels[row].tolist() if t != IGNORE_INDEX]
        assert wanted == item.answer
        offset = width - len(item.ids)
        assert [t.positives for t in batch.targets[row]] == [[p + offset for p in t.positives] for t in item.targets]
    assert any(batch.targets)
    full = collate(items, pad_id=0, device=torch.device("cpu"), answer_only=False)
    assert full.keep == 0 and full.labels.shape == full.input_ids.shape


def test_update_lowers_the_loss_and_trains_only_lora(tiny_model_config):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 0.01
    ner = nlp.get_pipe("cllmfs_ner")
    before_loss, parts = ner.get_loss(examples)
    assert set(parts) == {"lm", "contrastive", "loss"}
    before = snapshot(ner.model.model)
    for _ in range(15):
        losses = nlp.update(examples, sgd=optimizer)
    assert losses["cllmfs_ner"] > 0
    after_loss, _ = ner.get_loss(examples)
    assert after_loss < before_loss * 0.6
    after = snapshot(ner.model.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)


def test_learn_rate_from_spacy_optimizer_takes_effect(tiny_model_config):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    frozen = snapshot(ner.model.model)
    nlp.update(examples, sgd=Adam(learn_rate=0.0, L2=0.0, grad_clip=0.0))
    assert all(torch.equal(frozen[n], p) for n, p in ner.model.model.named_parameters())
    nlp.update(examples, sgd=Adam(learn_rate=0.001, L2=0.0))
    group = ner._optimizer.torch_optimizer.param_groups[0]
    assert group["lr"] == 0.001 and group["weight_decay"] == 0.0
    assert any(not torch.equal(frozen[n], p) for n, p in ner.model.model.named_parameters())


def test_contrastive_weight_zero_is_exactly_the_lm_loss(tiny_model_config):
    nlp = make_nlp(tiny_model_config, contrastive_weight=0.0)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.1)
    loss, parts = ner.get_loss(examples)
    assert "contrastive" not in parts and loss == parts["lm"]
    ner.training.contrastive_weight = 0.5
    loss_cl, parts_cl = ner.get_loss(examples)
    assert parts_cl["lm"] == pytest.approx(parts["lm"])
    assert loss_cl == pytest.approx(parts_cl["lm"] + 0.5 * parts_cl["contrastive"])


def test_micro_batches_accumulate_the_same_gradient(tiny_model_config):
    grads = []
    for micro in (1, 8):
        nlp = make_nlp(tiny_model_config, micro_batch_size=micro)
        examples = make_examples(nlp)
        nlp.initialize(lambda: examples)
        ner = nlp.get_pipe("cllmfs_ner")
        randomize_adapter(ner, scale=0.1)
        nlp.update(examples, sgd=False)
        grads.append(torch.cat([p.grad.flatten() for p in ner.model.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_fgm_adds_an_adversarial_pass(tiny_model_config):
    nlp = make_nlp(tiny_model_config, fgm_epsilon=0.5)
    examples = make_examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    nlp.update(examples, sgd=optimizer)
    assert ner.last_losses["adversarial"] > 0
    assert ner.last_losses["loss"] == pytest.approx(
        ner.last_losses["lm"] + 0.1 * ner.last_losses["contrastive"] + ner.last_losses["adversarial"], rel=1e-5)


def test_bad_training_settings():
    for bad in ({"negatives_per_positive": -1.0}, {"negative_sampling": "hard"}, {"temperature": 0.0}, {"contrastive_loss": "x"},
                {"micro_batch_size": 0}, {"contrastive_layer": 0}, {"contrastive_weight": -1.0}):
        with pytest.raises(ValueError, match="training settings"):
            TrainingSettings(**bad)
    assert TrainingSettings().layer_index(32) == 24
    assert TrainingSettings(contrastive_layer=-1).layer_index(30) == 30
    with pytest.raises(ValueError, match="out of range"):
        TrainingSettings(contrastive_layer=40).layer_index(30)


def test_checkpoints_resume_adapter_and_optimizer(tiny_model_config, tmp_path):
    nlp = make_nlp(tiny_model_config)
    examples = make_examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    for _ in range(2):
        nlp.update(examples, sgd=optimizer)
    ner.save_checkpoint(tmp_path / "ckpt", step=2)
    expected = [[(e.start, e.end, e.label_) for e in d.ents] for d in nlp.pipe(t for t, _ in GOLD)]

    fresh = make_nlp(tiny_model_config)
    fresh.get_pipe("cllmfs_ner").initialize(lambda: examples, resume_from=str(tmp_path / "ckpt"))
    resumed = fresh.get_pipe("cllmfs_ner")
    assert resumed._optimizer.steps == 2
    assert [[(e.start, e.end, e.label_) for e in d.ents] for d in fresh.pipe(t for t, _ in GOLD)] == expected
    with pytest.raises(FileNotFoundError, match="No cllmfs_ner checkpoint"):
        resumed.load_checkpoint(tmp_path / "nothing")


def test_spacy_train_end_to_end(tiny_model_path, tmp_path):
    from spacy.cli.train import train

    nlp = spacy.blank("en")
    docs = [eg.reference for eg in make_examples(nlp)]
    DocBin(docs=docs * 3).to_disk(tmp_path / "train.spacy")
    DocBin(docs=docs).to_disk(tmp_path / "dev.spacy")
    overrides = {
        "paths.train": str(tmp_path / "train.spacy"),
        "paths.dev": str(tmp_path / "dev.spacy"),
        "paths.base_model": str(tiny_model_path),
        "paths.checkpoint_dir": str(tmp_path / "checkpoint"),
        "components.cllmfs_ner.model.device": "cpu",
        "components.cllmfs_ner.model.lora.r": 4,
        "components.cllmfs_ner.max_new_tokens": 16,
        "training.max_steps": 6,
        "training.eval_frequency": 3,
        "training.before_update.every": 2,
        "training.logger.progress_bar": False,
    }
    train("project/configs/cllmfs.cfg", tmp_path / "out", overrides=overrides)
    assert (tmp_path / "out" / "model-best" / "cllmfs_ner" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "checkpoint" / "cllmfs_ner" / "optimizer.pt").exists()
    state = spacy.util.srsly.read_json(tmp_path / "checkpoint" / "cllmfs_ner" / "state.json")
    assert state["step"] in (2, 4, 6) and state["labels"] == ["location", "person"]
    loaded = spacy.load(tmp_path / "out" / "model-last")
    assert loaded.get_pipe("cllmfs_ner").labels == ("location", "person")
    assert loaded("Barack Obama visited Paris .") is not None


@pytest.mark.parametrize("template", ["spacy_cllmfs.prompt.v1", "spacy_cllmfs.prompt.v2"])
@pytest.mark.parametrize("contrastive_weight", [0.0, 0.5])
def test_shared_prefix_training_equals_unshared(tiny_model_config, template, contrastive_weight):
    """Loss, its parts and the LoRA gradients do not depend on computing each window's
    shared prefix once (with gradients through it) or every prompt whole."""
    results = []
    for shared in (False, True):
        nlp = spacy.blank("en")
        settings = {"@misc": "spacy_cllmfs.training.v2", "micro_batch_size": 5, "shared_prefix": shared,
                    "contrastive_weight": contrastive_weight}
        nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "training": settings,
                                           "prompt": {"@misc": template}, "max_new_tokens": 16})
        examples = make_examples(nlp)
        nlp.initialize(lambda: examples)
        ner = nlp.get_pipe("cllmfs_ner")
        assert ner.training.shares_prefix == shared
        randomize_adapter(ner, scale=0.1)
        nlp.update(examples, sgd=False)
        grad = torch.cat([p.grad.flatten() for p in ner.model.trainable_parameters()])
        results.append((dict(ner.last_losses), grad, ner.get_loss(examples)[1]))
    (losses_a, grad_a, eval_a), (losses_b, grad_b, eval_b) = results
    assert losses_b.keys() == losses_a.keys() and eval_b.keys() == eval_a.keys()
    for key in losses_a:
        assert losses_b[key] == pytest.approx(losses_a[key], rel=1e-4, abs=1e-6)
        assert eval_b[key] == pytest.approx(eval_a[key], rel=1e-4, abs=1e-6)
    if contrastive_weight:
        assert losses_a["contrastive"] > 0
    assert grad_a.abs().sum() > 0
    assert torch.allclose(grad_b, grad_a, rtol=1e-3, atol=1e-6)


def test_prefix_without_gradients_same_loss_other_gradient(tiny_model_config):
    """prefix_gradients = false: the same forward (loss), but the LoRA weights get
    gradients from the rest of each prompt and the answer only."""
    results = []
    for through_prefix in (True, False):
        nlp = spacy.blank("en")
        settings = {"@misc": "spacy_cllmfs.training.v2", "micro_batch_size": 5, "contrastive_weight": 0.0}
        nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "training": settings, "max_new_tokens": 16})
        examples = make_examples(nlp)
        nlp.initialize(lambda: examples)
        ner = nlp.get_pipe("cllmfs_ner")
        ner.training.prefix_gradients = through_prefix
        randomize_adapter(ner, scale=0.1)
        nlp.update(examples, sgd=False)
        results.append((ner.last_losses["lm"], torch.cat([p.grad.flatten() for p in ner.model.trainable_parameters()])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    assert grad_b.abs().sum() > 0 and not torch.allclose(grad_b, grad_a, rtol=1e-3, atol=1e-6)


def test_shared_prefix_falls_back_where_it_cannot_apply():
    assert TrainingSettings().shares_prefix
    for settings in ({"fgm_epsilon": 0.1}, {"answer_only_loss": False}, {"gradient_checkpointing": True},
                     {"shared_prefix": False}):
        assert not TrainingSettings(**settings).shares_prefix


@pytest.mark.parametrize("shared", [False, True])
def test_layer_hook_reads_the_same_hidden_states(tiny_model_config, shared):
    """The contrastive layer is read by a hook on that one block; it equals what
    output_hidden_states=True returns for every layer index, shared batches included."""
    nlp = make_nlp(tiny_model_config, shared_prefix=shared)
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    randomize_adapter(ner, scale=0.1)
    items = ner.training_items(examples)[:4]
    model = ner.model.model
    pad = ner.builder.tokenizer.pad_token_id
    if shared:
        batch = collate_shared(next(iter(shared_micro_batches(items, 8))), pad, torch.device("cpu"))
    else:
        batch = collate(items, pad, torch.device("cpu"), answer_only=True)
    n_layers = model.config.num_hidden_layers
    assert decoder_layers(model) is not None and len(decoder_layers(model)) == n_layers
    _forward_all(model, batch, 1)  # transformers adds hooks of its own when asked for hidden states
    hooks = [len(layer._forward_hooks) for layer in decoder_layers(model)]
    for index in range(1, n_layers + 1):
        logits, hidden = _forward(model, batch, index)
        with LayerCapture(model, index) as capture:
            assert capture.fallback == (index == n_layers)
        expected_logits, expected = _forward_all(model, batch, index)
        assert torch.allclose(hidden, expected, atol=1e-5) and torch.allclose(logits, expected_logits, atol=1e-5)
        assert [len(layer._forward_hooks) for layer in decoder_layers(model)] == hooks  # ours is removed


def test_checkpointed_models_read_the_hidden_states(tiny_nlp):
    tiny_nlp.initialize(lambda: make_examples(tiny_nlp))
    lm = tiny_nlp.get_pipe("cllmfs_ner").model
    lm.ensure_lora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated property on the way
        assert not is_checkpointing(lm.model) and not LayerCapture(lm.model, 1).fallback
        enable_checkpointing(lm.model)
        assert is_checkpointing(lm.model)  # through the peft wrapper
        assert LayerCapture(lm.model, 1).fallback and not LayerCapture(lm.model, None).fallback


def _forward_all(model, batch, index):
    with torch.no_grad(), patch_capture_fallback():
        return _forward(model, batch, index)


class patch_capture_fallback:
    """Make every LayerCapture read output_hidden_states (the path before hooks)."""

    def __enter__(self):
        self.init = LayerCapture.__init__

        def init(capture, model, index):
            self.init(capture, model, None)
            capture.fallback = index is not None

        LayerCapture.__init__ = init

    def __exit__(self, *exc):
        LayerCapture.__init__ = self.init


def test_training_prompts_never_show_their_own_sentence_as_an_example(tiny_model_config):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "max_new_tokens": 16, "prompt": {"@misc": "spacy_cllmfs.prompt.v3"},
        "training": {"@misc": "spacy_cllmfs.training.v2", "negatives_per_positive": None}})
    examples = make_examples(nlp)
    nlp.initialize(lambda: examples)
    ner = nlp.get_pipe("cllmfs_ner")
    items = ner.training_items(examples)
    assert len(items) == len(GOLD) * 2
    for item in items:
        text = ner.builder.decode(item.prompt.ids)
        sentence = ner.builder.decode(item.prompt.sentence_ids()).strip()
        assert f"Example sentence: {sentence}\n" not in text
        assert text.count("Example sentence: ") == 2  # each label has 3 sentences to choose from
    # the same prompt as at inference where the sentence is not one of the examples
    doc = nlp.make_doc("The weather was nice .")
    inference = ner.make_prompts([doc])[0].prompts
    assert [p.ids for p in inference] == [item.prompt.ids for item in items[4:6]]
