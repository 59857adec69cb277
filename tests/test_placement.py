"""`device_map`: checked when the config is built, passed on to from_pretrained."""
import importlib.util

import pytest
import spacy
import torch

from spacy_cllmfs.models import HFCausalLM
from spacy_cllmfs.placement import resolve_placement


def test_no_device_map_is_one_device():
    assert resolve_placement("cpu", None) == (None, torch.device("cpu"))


def test_device_map_loads_without_moving_the_model(tiny_model_path, monkeypatch):
    import transformers

    lm = HFCausalLM(str(tiny_model_path), device_map={"": "cpu"})
    assert lm.device_map == {"": "cpu"} and not lm.is_loaded
    passed, moved = [], []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained
    original_to = torch.nn.Module.to

    def spy(*args, **kwargs):
        passed.append(kwargs.get("device_map"))
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or original_to(self, *a, **k))
    model = lm.model
    assert passed == [{"": "cpu"}]
    assert not moved  # accelerate placed the weights; no .to(device) after
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3]])
    plain = HFCausalLM(str(tiny_model_path), device="cpu")
    assert torch.allclose(model(input_ids=ids).logits, plain.model(input_ids=ids).logits)


def test_device_map_in_a_pipeline_config(tiny_model_config):
    texts = ["Barack Obama visited Paris.", "Angela Merkel met the Labour Party in London."]
    results = []
    for placement in ({"device": "cpu"}, {"device": "auto", "device_map": "auto"}):
        nlp = spacy.blank("en")
        nlp.add_pipe("cllmfs_ner", config={"model": {**tiny_model_config, **placement},
                                           "labels": ["person", "location"], "max_new_tokens": 12})
        results.append([[(e.start, e.end, e.label_) for e in doc.ents] for doc in nlp.pipe(texts)])
    assert results[0] == results[1]
    model = nlp.get_pipe("cllmfs_ner").model
    assert model.device_map == "auto" and model.device == torch.device("cpu")  # no GPU here


@pytest.mark.parametrize(
    "device,device_map,message",
    [
        ("cpu", "auto", 'keep `device = "auto"`'),
        ("auto", "everywhere", "Unknown device_map 'everywhere'"),
        ("auto", "cuda:0", 'use `device = "cuda:0"` instead'),
        ("auto", {}, "device_map is empty"),
        ("auto", {"": "disk"}, "offloading to disk is not supported"),
        ("auto", {"": -1}, "not a GPU index"),
        ("auto", {"": [0]}, "is not a device"),
        ("auto", {"model.layers": "tpu"}, "device_map['model.layers']: Unknown device 'tpu'"),
        ("auto", ["auto"], "must be a string or a table"),
    ],
)
def test_bad_device_maps_name_the_fix(device, device_map, message):
    with pytest.raises(ValueError, match="Fix:") as err:
        resolve_placement(device, device_map)
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_map_with_a_missing_gpu():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_placement("auto", {"model": 0, "lm_head": "cuda:1"})


def test_bad_device_map_fails_when_the_pipeline_is_built(tiny_model_config):
    nlp = spacy.blank("en")
    with pytest.raises(ValueError, match="both place the model"):
        nlp.add_pipe("cllmfs_ner", config={"model": {**tiny_model_config, "device_map": "auto"}})


def test_device_map_needs_accelerate(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="pip install accelerate"):
        resolve_placement("auto", "auto")
