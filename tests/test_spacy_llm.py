"""The spacy-llm model (`spacy_cllmfs.SpacyLLMModel.v1`) and the NER.v3 examples helpers."""
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List

import pytest
import spacy
import srsly
import torch
from spacy.tokens import Doc, Span
from spacy.util import registry
from thinc.api import Config

from spacy_cllmfs.adapters import AdapterError
from spacy_cllmfs.embedded import ModelNotFoundError
from spacy_cllmfs.models import HFCausalLM, LoRASettings
from spacy_cllmfs.spacy_llm import MODEL_NAME, SpacyLLMModel, ner_v3_examples, spacy_llm_model_v1
from spacy_cllmfs.spacy_llm import write_ner_v3_examples

LABELS = ["PERSON", "LOCATION"]
TEXTS = [
    "Barack Obama visited Paris with Angela Merkel.",
    "Marie Curie won the Nobel Prize.",
    "The meeting was short.",
    "The United Nations met in Geneva and New York.",
]
PROMPTS = ["Barack Obama visited Paris.", "Hello", "Extract the person entities: Marie Curie won.", "x y z"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm(tiny_model_path: Path) -> HFCausalLM:
    lm = HFCausalLM(str(tiny_model_path), device="cpu")
    lm.load()
    return lm


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = HFCausalLM(str(tiny_model_path), device="cpu", lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    lm.ensure_lora()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lm.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lm.adapter_state().to_disk(path)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Record (and refuse) every attempt to resolve a host name or open a connection."""
    attempts: List[str] = []

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise OSError("network disabled in tests")

    def refuse_connect(self, address):
        attempts.append(f"connect {address}")
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    return attempts


def make_doc(nlp: spacy.Language, text: str, ents: List[tuple]) -> Doc:
    doc = nlp.make_doc(text)
    spans = []
    for phrase, label in ents:
        start = text.index(phrase)
        spans.append(doc.char_span(start, start + len(phrase), label=label))
    doc.ents = spans
    return doc


@pytest.fixture
def gold_docs() -> List[Doc]:
    nlp = spacy.blank("en")
    return [
        make_doc(nlp, "Barack Obama visited Paris.", [("Barack Obama", "person"), ("Paris", "location")]),
        make_doc(nlp, "The United Nations met.", [("United Nations", "org")]),
        make_doc(nlp, "Nothing to see here.", []),
        make_doc(
            nlp,
            "Angela Merkel met Angela Merkel in Berlin.",
            [("Angela Merkel", "PERSON"), ("Berlin", "Location")],
        ),
    ]


def llm_config(tiny_model_path: Path, **model: object) -> dict:
    return {
        "@llm_models": MODEL_NAME,
        "name": str(tiny_model_path),
        "device": "cpu",
        "max_new_tokens": 16,
        **model,
    }


# -- registration ---------------------------------------------------------------------


def test_importing_does_not_import_spacy_llm():
    code = "import sys, spacy_cllmfs, spacy_cllmfs.spacy_llm; print('spacy_llm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_registered_in_spacy_llm_registry():
    from spacy_llm.registry import registry as llm_registry

    assert llm_registry.llm_models.get(MODEL_NAME) is spacy_llm_model_v1
    # spacy-llm creates its registries with thinc's registry.create, so the
    # entry-point group is "thinc_llm_models" (not "spacy_llm_models").
    assert llm_registry.llm_models.entry_point_namespace == "thinc_llm_models"
    setup = (Path(__file__).parent.parent / "setup.py").read_text()
    entry = "spacy_cllmfs.SpacyLLMModel.v1 = spacy_cllmfs.spacy_llm:spacy_llm_model_v1"
    assert f'"thinc_llm_models": ["{entry}"]' in setup


def test_resolves_from_config_lazily(tiny_model_path):
    config = Config({"model": llm_config(tiny_model_path, batch_size=3, system_prompt="Be brief.")})
    model = registry.resolve(config)["model"]
    assert isinstance(model, SpacyLLMModel)
    assert (model.max_new_tokens, model.batch_size, model.system_prompt) == (16, 3, "Be brief.")
    assert model.use_chat_template and not model.lm.is_loaded
    assert model.context_length == 1024 - 16  # from config.json: the weights stay unloaded
    assert not model.lm.is_loaded
    explicit = registry.resolve(Config({"m": llm_config(tiny_model_path, context_length=300)}))["m"]
    assert explicit.context_length == 300


# -- the llm component ----------------------------------------------------------------


def test_ner_v3_pipeline(tiny_model_path, gold_docs, tmp_path, no_network):
    examples = tmp_path / "examples.json"
    write_ner_v3_examples(gold_docs, LABELS, examples)
    nlp = spacy.blank("en")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = nlp.add_pipe(
            "llm",
            config={
                "task": {
                    "@llm_tasks": "spacy.NER.v3",
                    "labels": LABELS,
                    "examples": {"@misc": "spacy.FewShotReader.v1", "path": str(examples)},
                },
                "model": llm_config(tiny_model_path),
                "save_io": True,
            },
        )
    assert not [w for w in caught if "match" in str(w.message) or "context length" in str(w.message)]
    assert not llm._model.lm.is_loaded  # building the pipeline loads no weights
    docs = list(nlp.pipe(TEXTS, batch_size=3))
    assert [doc.text for doc in docs] == TEXTS
    for doc in docs:
        for ent in doc.ents:
            assert isinstance(ent, Span) and ent.doc is doc and ent.label_ in LABELS
        io = doc.user_data["llm_io"]["llm"]
        assert len(io["prompt"]) == len(io["response"]) == 1
        assert "Paragraph: Barack Obama visited Paris." in io["prompt"][0]  # the few-shot example
        assert io["prompt"][0].rstrip().endswith(f"Paragraph: {doc.text}\nAnswer:")
    assert no_network == []


def test_long_docs_are_sharded_and_answered_per_shard(tiny_model_path, no_network):
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm",
        config={
            "task": {"@llm_tasks": "spacy.NER.v3", "labels": LABELS},
            "model": llm_config(tiny_model_path, max_new_tokens=4, context_length=260),
            "save_io": True,
        },
    )
    text = " ".join(["Marie Curie won the Nobel Prize in Paris."] * 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompts exceed the tiny model's positions
        doc = nlp(text)
    io = doc.user_data["llm_io"]["llm"]
    assert len(io["prompt"]) > 1 and len(io["response"]) == len(io["prompt"])
    assert doc.text == text
    assert no_network == []


# -- the model ------------------------------------------------------------------------


def test_one_response_per_prompt_in_order(lm):
    batched = SpacyLLMModel(lm, max_new_tokens=12, batch_size=8)
    single = SpacyLLMModel(lm, max_new_tokens=12, batch_size=1)
    nested = [[PROMPTS[0], PROMPTS[1]], [], [PROMPTS[2]], iter([PROMPTS[3]])]
    responses = [list(r) for r in batched(iter(nested))]
    expected = [single.generate([prompt])[0] for prompt in PROMPTS]
    assert responses == [expected[:2], [], [expected[2]], [expected[3]]]
    assert all(isinstance(r, str) for r in expected) and len(set(expected)) > 1
    assert single.generate(PROMPTS) == expected


def test_batches_are_real(lm):
    model = SpacyLLMModel(lm, max_new_tokens=2, batch_size=2, shared_prefix=False)
    model([PROMPTS[:3], PROMPTS[3:]])
    assert model.stats.prompt_tokens == sum(len(model.encode(p)) for p in PROMPTS)
    assert model.stats.forward_passes <= 2 * 2  # 2 batches of 4 prompts, at most 2 steps each


def test_shared_prefix_is_computed_once_per_batch(lm):
    prompts = [f"Find the people and places in the text below.\nText: {p}" for p in PROMPTS]
    plain = SpacyLLMModel(lm, max_new_tokens=6, batch_size=8, shared_prefix=False)
    shared = SpacyLLMModel(lm, max_new_tokens=6, batch_size=8)
    assert shared.generate(prompts) == plain.generate(prompts)
    encoded = [shared.encode(p) for p in prompts]
    common = 0
    while all(ids[common] == encoded[0][common] for ids in encoded):
        common += 1
    assert common > 10
    assert shared.stats.prompt_tokens_read == sum(map(len, encoded))
    assert shared.stats.prompt_tokens == sum(map(len, encoded)) - (len(encoded) - 1) * common


def test_empty_calls_load_nothing(tiny_model_path):
    model = spacy_llm_model_v1(str(tiny_model_path), device="cpu")
    assert model([]) == [] and model([[], []]) == [[], []]
    assert not model.lm.is_loaded


def test_prompts_use_the_chat_template(lm):
    tokenizer = lm.tokenizer
    chat = SpacyLLMModel(lm, system_prompt="Be brief.")
    text = tokenizer.decode(chat.encode("Hello there"))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat.end_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    raw = SpacyLLMModel(lm, use_chat_template=False)
    assert raw.encode("Hello there") == tokenizer("Hello there")["input_ids"]
    assert SpacyLLMModel(lm, use_chat_template=False, system_prompt="Hi").encode("x") == tokenizer("Hi\n\nx")[
        "input_ids"
    ]


@pytest.mark.parametrize("model", [{"system_prompt": "Be brief."}, {"use_chat_template": False, "system_prompt": "Hi"}])
def test_encode_offsets_maps_tokens_to_the_prompt(lm, model, monkeypatch):
    served = SpacyLLMModel(lm, **model)
    prompt = "Paragraph: Barack Obama visited Paris.\nAnswer:"
    ids, offsets = served.encode_offsets(prompt)
    assert ids == served.encode(prompt)
    inside = [(i, span) for i, span in enumerate(offsets) if span is not None]
    assert len(inside) < len(ids)  # the template's tokens lie outside the prompt
    assert "".join(lm.tokenizer.decode([ids[i]]) for i, _ in inside) == prompt
    assert all(prompt[start:end].strip() == lm.tokenizer.decode([ids[i]]).strip() for i, (start, end) in inside)
    monkeypatch.setattr(type(lm.tokenizer), "is_fast", False, raising=False)
    with pytest.raises(TypeError, match="fast tokenizer"):
        served.encode_offsets(prompt)


def test_end_id_follows_the_chat_template(lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm.source.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    other = HFCausalLM.from_loaded(lm.model, tokenizer)
    assert SpacyLLMModel(other).end_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert SpacyLLMModel(other, use_chat_template=False).end_id == tokenizer.eos_token_id
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n###\n{% endfor %}"
    assert SpacyLLMModel(HFCausalLM.from_loaded(lm.model, tokenizer)).end_id == tokenizer.eos_token_id


def test_adapter_changes_outputs(tiny_model_path, adapter_dir, lm):
    plain = SpacyLLMModel(lm, max_new_tokens=8)
    adapted = spacy_llm_model_v1(
        str(tiny_model_path), adapter=str(adapter_dir), device="cpu", max_new_tokens=8
    )
    assert adapted.lm.has_adapter
    assert adapted.generate(PROMPTS) != plain.generate(PROMPTS)


def test_long_prompts_warn(lm):
    model = SpacyLLMModel(lm, max_new_tokens=1)
    with pytest.warns(UserWarning, match="exceeds the model's 1024 positions"):
        model.generate(["Paris " * 1100])


# -- errors ---------------------------------------------------------------------------


def test_bad_settings_fail_early_with_a_fix(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown device 'tpu'.*\[components\.llm\.model\] device"):
        spacy_llm_model_v1(str(tiny_model_path), device="tpu")
    with pytest.raises(ModelNotFoundError, match="no/such/model' does not exist"):
        spacy_llm_model_v1(str(tmp_path / "no/such/model"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        spacy_llm_model_v1(str(tmp_path))
    with pytest.raises(AdapterError, match="adapter folder .* does not exist"):
        spacy_llm_model_v1(str(tiny_model_path), device="cpu", adapter=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="Unknown dtype"):
        spacy_llm_model_v1(str(tiny_model_path), device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="max_new_tokens"):
        spacy_llm_model_v1(str(tiny_model_path), device="cpu", max_new_tokens=0)
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        spacy_llm_model_v1(str(tiny_model_path), device="cpu", max_new_tokens=1024).context_length


def test_bad_settings_fail_when_the_pipeline_is_built(tiny_model_path):
    nlp = spacy.blank("en")
    with pytest.raises(ValueError, match="Unknown device"):
        nlp.add_pipe(
            "llm",
            config={
                "task": {"@llm_tasks": "spacy.NER.v3", "labels": LABELS},
                "model": llm_config(tiny_model_path, device="tpu"),
            },
        )


def test_non_text_prompts_are_refused(lm):
    with pytest.raises(TypeError, match="text prompts"):
        SpacyLLMModel(lm)([[{"role": "user"}]])


# -- few-shot examples ----------------------------------------------------------------


def test_ner_v3_examples(gold_docs):
    assert ner_v3_examples(gold_docs, LABELS) == [
        {
            "text": "Barack Obama visited Paris.",
            "spans": [
                {"text": "Barack Obama", "is_entity": True, "label": "PERSON", "reason": "is a PERSON"},
                {"text": "Paris", "is_entity": True, "label": "LOCATION", "reason": "is a LOCATION"},
            ],
        },
        {
            "text": "Angela Merkel met Angela Merkel in Berlin.",
            "spans": [
                {"text": "Angela Merkel", "is_entity": True, "label": "PERSON", "reason": "is a PERSON"},
                {"text": "Berlin", "is_entity": True, "label": "LOCATION", "reason": "is a LOCATION"},
            ],
        },
    ]
    assert ner_v3_examples(gold_docs, "PERSON, LOCATION") == ner_v3_examples(gold_docs, LABELS)
    with pytest.raises(ValueError, match="No labels"):
        ner_v3_examples(gold_docs, [])
    with pytest.raises(ValueError, match="differ only in case"):
        ner_v3_examples(gold_docs, ["PERSON", "person"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".yml"])
def test_examples_round_trip_through_the_reader_and_task(gold_docs, tmp_path, suffix):
    import spacy_llm  # noqa: F401 (registers spacy.FewShotReader.v1 and spacy.NER.v3)

    path = tmp_path / f"examples{suffix}"
    assert write_ner_v3_examples(gold_docs, LABELS, path) == 2
    read = registry.misc.get("spacy.FewShotReader.v1")(path)()
    assert list(read) == ner_v3_examples(gold_docs, LABELS)
    if suffix == ".json":
        assert srsly.read_json(path) == read
    reader = registry.misc.get("spacy.FewShotReader.v1")
    task = registry.llm_tasks.get("spacy.NER.v3")(labels=LABELS, examples=reader(path))
    assert len(task.prompt_examples) == 2
    doc = spacy.blank("en")("Angela Merkel visited Berlin.")
    ((prompts, _shards),) = list(task.generate_prompts([doc]))
    prompt = list(prompts)[0]
    example = "Paragraph: Barack Obama visited Paris.\nAnswer:\n1. Barack Obama | True | PERSON | is a PERSON"
    assert example in prompt
    assert "2. Berlin | True | LOCATION | is a LOCATION" in prompt


def test_write_examples_errors(gold_docs, tmp_path):
    with pytest.raises(ValueError, match="FewShotReader"):
        write_ner_v3_examples(gold_docs, LABELS, tmp_path / "examples.txt")
    with pytest.raises(ValueError, match="no few-shot examples"):
        write_ner_v3_examples(gold_docs, ["ORGANISATION"], tmp_path / "examples.json")
    with pytest.raises(TypeError, match="spaCy Docs"):
        ner_v3_examples(["Barack Obama"], LABELS)  # type: ignore[list-item]
