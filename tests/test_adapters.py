"""Adapter folders: partial, corrupt or pickled ones give clear errors; loading a saved
pipeline reads safetensors only and shows no spurious warnings."""
import json
import shutil
import warnings

import pytest
import spacy
import torch

from conftest import randomize_adapter
from spacy_cllmfs.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, AdapterState
from spacy_cllmfs.models import HFCausalLM

TEXT = "Barack Obama visited Paris with Angela Merkel."


@pytest.fixture(scope="module")
def saved(tiny_model_config, tmp_path_factory):
    """A saved pipeline with a trained-looking adapter, and its entities for TEXT."""
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": ["person", "location"],
                                       "max_new_tokens": 12})
    randomize_adapter(nlp.get_pipe("cllmfs_ner"), seed=1, scale=0.3)
    path = tmp_path_factory.mktemp("saved") / "pipeline"
    nlp.to_disk(path)
    return path, [(e.start, e.end, e.label_) for e in nlp(TEXT).ents]


def adapter_copy(saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved[0] / "cllmfs_ner" / "adapter", folder)
    return folder


def test_partial_adapter_folders(saved, tmp_path):
    folder = adapter_copy(saved, tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match="has no 'adapter_model.safetensors' \\(a partial copy\\?\\).*Fix:"):
        AdapterState.from_disk(folder)
    folder = adapter_copy(saved, tmp_path / "b")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(AdapterError, match="has no 'adapter_config.json'"):
        AdapterState.from_disk(folder)


def test_truncated_weights(saved, tmp_path):
    folder = adapter_copy(saved, tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot be read.*Fix:"):
        AdapterState.from_disk(folder)


def test_pickled_adapters_are_never_loaded(saved, tmp_path, monkeypatch):
    folder = adapter_copy(saved, tmp_path)
    (folder / WEIGHTS_FILE).rename(folder / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    with pytest.raises(AdapterError, match="pickled weights.*never loaded.*safe_serialization=True"):
        AdapterState.from_disk(folder)


def test_saved_pipeline_loads_with_safetensors_only(saved, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    nlp = spacy.load(saved[0])
    assert [(e.start, e.end, e.label_) for e in nlp(TEXT).ents] == saved[1]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"r": "x"}, "r = 'x', not a positive integer"),
        ({"r": -1}, "r = -1, not a positive integer"),
        ({"r": 8}, "does not fit its rank r = 8"),
    ],
)
def test_adapter_config_that_does_not_match_its_weights(saved, tmp_path, change, message):
    folder = adapter_copy(saved, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError, match=message):
        AdapterState.from_disk(folder)


def test_adapter_for_other_modules_names_the_fix(saved, tiny_model_path, tmp_path):
    state = AdapterState.from_disk(saved[0] / "cllmfs_ner" / "adapter")
    state.config["target_modules"] = ["no_such_layer"]
    lm = HFCausalLM(str(tiny_model_path), device="cpu")
    lm.load()
    with pytest.raises(AdapterError, match="does not fit model .*no_such_layer.*Fix:"):
        lm.set_adapter(state)
    assert not any("lora_" in name for name, _ in lm.model.named_parameters())  # left as it was


def test_loading_a_moved_pipeline_shows_no_warnings(saved, tiny_model_path, tmp_path):
    # A packaged or copied pipeline finds its base model at another path than at training time:
    # peft used to warn "base_model_name_or_path was renamed" on every load.
    moved_model = shutil.copytree(tiny_model_path, tmp_path / "moved-model")
    overrides = {"components": {"cllmfs_ner": {"model": {"name": str(moved_model)}}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlp = spacy.load(saved[0], config=overrides)
        ents = [(e.start, e.end, e.label_) for e in nlp(TEXT).ents]
    assert [str(w.message) for w in caught] == []
    assert ents == saved[1]
