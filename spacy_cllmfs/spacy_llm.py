"""A local causal LM (plus an optional cllmfs LoRA adapter) as a spacy-llm model.

`spacy_cllmfs.SpacyLLMModel.v1` serves a base model (hub name, folder, .gguf
file or "embedded") and, optionally, the LoRA adapter of a trained
`cllmfs_ner` component to any spacy-llm task, e.g. `spacy.NER.v3`:

    [components.llm.model]
    @llm_models = "spacy_cllmfs.SpacyLLMModel.v1"
    name = "embedded"
    adapter = "training/model-best/cllmfs_ner/adapter"

All prompts of a call are decoded greedily together, in batches. The LoRA
adapter is saved with the pipeline (`nlp.to_disk`) and restored by `spacy.load`,
so an adapter tuned on the task's own prompts (`llm_tuning.tune_llm`) travels
with it. The `ner_v3_examples` helpers turn gold Docs into few-shot examples
for `spacy.NER.v3` (read with `spacy.FewShotReader.v1`).

This module does not import spacy_llm: it registers into the `llm_models`
registry through spaCy's registry (creating it as spacy-llm would), so that
importing it stays cheap and spacy-llm stays optional.
"""
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import catalogue
import spacy
import srsly
from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import registry

from .adapters import AdapterState
from .decoding import DecodingStats
from .embedded import EMBEDDED_NAME
from .labels import label_definitions
from .inference import DecodingSettings, generate_texts
from .models import HFCausalLM, context_length_of
from .prompts import end_of_answer_id

logger = logging.getLogger("spacy_cllmfs")

REGISTRY_NAME = "llm_models"
MODEL_NAME = "spacy_cllmfs.SpacyLLMModel.v1"
_MARK = "\x1fANSWER\x1f"
ADAPTER_DIR = "adapter"


def _llm_models() -> Any:
    """RETURNS (catalogue.Registry): spacy-llm's model registry, created if needed
    exactly as spacy_llm.registry does (so both share the same registry)."""
    existing = getattr(registry, REGISTRY_NAME, None)
    if isinstance(existing, catalogue.Registry):
        return existing
    registry.create(REGISTRY_NAME, entry_points=True)
    return getattr(registry, REGISTRY_NAME)


class SpacyLLMModel:
    """A spacy-llm model: prompts (per doc, per shard) in, response strings out.

    lm (HFCausalLM): The causal LM, with its adapter if any (loaded on first call).
    max_new_tokens (int): The most tokens of one response.
    batch_size (int): The most prompts in one forward pass.
    use_chat_template (bool): Wrap each prompt as a user message in the
        tokenizer's chat template, if it has one.
    system_prompt (Optional[str]): A system message (chat template) or a
        preamble (raw text); None for none.
    context_length (Optional[int]): The most prompt tokens, which spacy-llm uses
        to shard long docs. None: the model's positions minus max_new_tokens.
    shared_prefix (bool): Compute the start that a batch's prompts share (the task
        text and the few-shot examples) once per batch instead of once per prompt.
    """

    def __init__(
        self,
        lm: HFCausalLM,
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        use_chat_template: bool = True,
        system_prompt: Optional[str] = None,
        context_length: Optional[int] = None,
        shared_prefix: bool = True,
    ) -> None:
        for setting, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{MODEL_NAME}: `{setting}` must be an integer >= 1, got {value!r}. "
                    f"Fix: set `[components.llm.model] {setting}` to a positive number."
                )
        if context_length is not None and (not isinstance(context_length, int) or context_length < 1):
            raise ValueError(
                f"{MODEL_NAME}: `context_length` must be null or an integer >= 1, got {context_length!r}."
            )
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.shared_prefix = shared_prefix
        self.stats = DecodingStats()
        self._context_length = context_length
        self._n_positions: Optional[int] = None
        self._end_id: Optional[int] = None
        self._warned_long = False

    def __call__(self, prompts: Iterable[Iterable[str]]) -> Iterable[Iterable[str]]:
        """Answer the prompts of a batch of docs.

        prompts (Iterable[Iterable[str]]): Per doc, its prompts (one per shard).
        RETURNS (Iterable[Iterable[str]]): Per doc, one response per prompt, in order.
        """
        per_doc = [list(doc_prompts) for doc_prompts in prompts]
        flat = [prompt for doc_prompts in per_doc for prompt in doc_prompts]
        answers = iter(self.generate(flat))
        return [[next(answers) for _ in doc_prompts] for doc_prompts in per_doc]

    def generate(self, prompts: Sequence[str]) -> List[str]:
        """Answer prompts by greedy decoding, in batches.

        prompts (Sequence[str]): The prompt texts.
        RETURNS (List[str]): One response per prompt, special tokens removed.
        """
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(
                    f"{MODEL_NAME} answers text prompts, got {type(prompt).__name__}. "
                    "Fix: use a spacy-llm task whose prompts are strings."
                )
        if not prompts:
            return []
        encoded = [self.encode(prompt) for prompt in prompts]
        self._check_lengths(encoded)
        todo = [i for i, ids in enumerate(encoded) if ids]
        responses = [""] * len(prompts)
        if not todo:
            return responses
        tokenizer = self.lm.tokenizer
        settings = DecodingSettings(
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            constrained=False,
            shared_prefix=self.shared_prefix,
        )
        generations = generate_texts(
            self.lm.inference_model(),
            [encoded[i] for i in todo],
            end_id=self.end_id,
            pad_id=self.pad_id,
            settings=settings,
            stats=self.stats,
        )
        for i, generation in zip(todo, generations):
            responses[i] = tokenizer.decode(generation.ids, skip_special_tokens=True)
        return responses

    def encode(self, prompt: str) -> List[int]:
        """The token ids the model reads for `prompt`, ending where the answer starts.

        prompt (str): The prompt text.
        RETURNS (List[int]): The prompt's token ids.
        """
        text, special = self._model_text(prompt)
        return list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode_offsets(self, prompt: str) -> Tuple[List[int], List[Optional[Tuple[int, int]]]]:
        """The token ids of `encode`, with the characters of `prompt` each token covers.

        prompt (str): The prompt text.
        RETURNS (Tuple[List[int], List[Optional[Tuple[int, int]]]]): The ids, and per id
            its [start, end) in `prompt` (None for the chat template's and special tokens).
        RAISES (TypeError): If the tokenizer cannot map tokens to characters.
        """
        tokenizer = self.lm.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} cannot map tokens to characters (it is not a fast tokenizer), "
                "which the contrastive loss of tune_llm needs. Fix: load a model with a fast tokenizer, "
                "or set contrastive_weight = 0."
            )
        text, special = self._model_text(prompt)
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        base = text.find(prompt)
        spans: List[Optional[Tuple[int, int]]] = []
        for start, end in encoded["offset_mapping"]:
            inside = base >= 0 and end > start and base <= start and end <= base + len(prompt)
            spans.append((start - base, end - base) if inside else None)
        return list(encoded["input_ids"]), spans

    def _model_text(self, prompt: str) -> Tuple[str, bool]:
        """RETURNS (Tuple[str, bool]): The text the model reads for `prompt` (its chat
        template or system prompt applied) and whether the tokenizer adds special tokens."""
        if self._chat:
            text = self.lm.tokenizer.apply_chat_template(
                self._messages(prompt), tokenize=False, add_generation_prompt=True
            )
            return text, False
        return (f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt), True

    def to_bytes(self, *, exclude: Tuple[str, ...] = tuple()) -> bytes:
        """Serialize the LoRA adapter (spacy-llm's `llm` component calls this, so
        `nlp.to_bytes` keeps a tuned adapter). The base model is not serialized.

        RETURNS (bytes): The adapter, or an empty record without one.
        """
        state = self.lm.adapter_state()
        return srsly.msgpack_dumps({"adapter": None if state is None else state.to_bytes()})

    def from_bytes(self, bytes_data: bytes, *, exclude: Tuple[str, ...] = tuple()) -> "SpacyLLMModel":
        """Load the LoRA adapter saved by `to_bytes`, if there is one."""
        data = srsly.msgpack_loads(bytes_data)
        if data.get("adapter") is not None:
            self.lm.set_adapter(AdapterState.from_bytes(data["adapter"]))
        return self

    def to_disk(self, path: Union[str, Path], *, exclude: Tuple[str, ...] = tuple()) -> None:
        """Save the LoRA adapter to `path/adapter` (nothing without one). spacy-llm's
        `llm` component calls this, so `nlp.to_disk` keeps a tuned adapter and
        `spacy.load` restores it over the configured one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.lm.adapter_state()
        if state is not None:
            state.to_disk(path / ADAPTER_DIR)

    def from_disk(self, path: Union[str, Path], *, exclude: Tuple[str, ...] = tuple()) -> "SpacyLLMModel":
        """Load the LoRA adapter saved by `to_disk`, if there is one."""
        folder = Path(path) / ADAPTER_DIR
        if folder.exists():
            self.lm.set_adapter(AdapterState.from_disk(folder))
        return self

    @property
    def end_id(self) -> int:
        """RETURNS (int): The token that ends an answer: the chat template's
        end-of-turn token if it is special, else the tokenizer's eos token."""
        if self._end_id is None:
            self._end_id = self._find_end_id()
        return self._end_id

    @property
    def pad_id(self) -> int:
        """RETURNS (int): The id for left padding (masked out)."""
        return self.lm.pad_id

    @property
    def context_length(self) -> Optional[int]:
        """RETURNS (Optional[int]): The most prompt tokens, for spacy-llm's sharding:
        the configured value, or the model's positions minus max_new_tokens
        (None if the model's config cannot be read).

        spacy-llm reads this when the component is built, so it comes from the
        model's config file: the weights are not loaded for it.
        """
        if self._context_length is not None:
            return self._context_length
        positions = self._positions()
        if positions is None:
            return None
        if positions <= self.max_new_tokens:
            raise ValueError(
                f"{MODEL_NAME}: max_new_tokens = {self.max_new_tokens} leaves no room for the "
                f"prompt in the model's {positions} positions. Fix: lower "
                "`[components.llm.model] max_new_tokens`."
            )
        return positions - self.max_new_tokens

    @property
    def _chat(self) -> bool:
        return self.use_chat_template and bool(getattr(self.lm.tokenizer, "chat_template", None))

    def _messages(self, content: str) -> List[Dict[str, str]]:
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _find_end_id(self) -> int:
        tokenizer = self.lm.tokenizer
        after = ""
        if self._chat:
            messages = self._messages("Hi") + [{"role": "assistant", "content": _MARK}]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as err:  # templates may reject this conversation
                logger.debug("Could not render an assistant turn with the chat template: %s", err)
                text = ""
            if text.count(_MARK) == 1:
                after = text.split(_MARK)[1]
        try:
            return end_of_answer_id(tokenizer, after)
        except ValueError as err:
            raise ValueError(f"{MODEL_NAME}: {err}") from err

    def _positions(self) -> Optional[int]:
        if self._n_positions is None:
            if self.lm.is_loaded:
                self._n_positions = self.lm.context_length
            else:
                self._n_positions = _config_positions(self.lm)
        return self._n_positions

    def _check_lengths(self, encoded: Sequence[Sequence[int]]) -> None:
        positions = self._positions()
        if positions is None or self._warned_long:
            return
        longest = max(len(ids) for ids in encoded)
        if longest + self.max_new_tokens > positions:
            self._warned_long = True
            warnings.warn(
                f"{MODEL_NAME}: a prompt of {longest} tokens plus max_new_tokens = "
                f"{self.max_new_tokens} exceeds the model's {positions} positions; answers may "
                "degrade. Fix: set `[components.llm.model] context_length` lower so that "
                "spacy-llm shards long docs, or use fewer few-shot examples."
            )


def _config_positions(lm: HFCausalLM) -> Optional[int]:
    """The model's number of positions, from its config (no weights are loaded)."""
    from transformers import AutoConfig

    kwargs: Dict[str, Any] = {"local_files_only": lm.local_files_only}
    if lm.source.gguf_file:
        kwargs["gguf_file"] = lm.source.gguf_file
    try:
        config = AutoConfig.from_pretrained(lm.source.name_or_path, **kwargs)
    except Exception as err:  # no config (e.g. offline hub name): spacy-llm won't shard
        logger.warning("Could not read the config of '%s' (%s): docs won't be sharded.", lm.name, err)
        return None
    return context_length_of(config)


def _for_llm_component(message: str) -> str:
    """Point the loader's config hints at the `llm` component instead of `cllmfs_ner`."""
    return message.replace("[components.cllmfs_ner.model]", "[components.llm.model]").replace(
        '{"cllmfs_ner": {"model"', '{"llm": {"model"'
    )


def spacy_llm_model_v1(
    name: str = EMBEDDED_NAME,
    gguf_file: Optional[str] = None,
    adapter: Optional[str] = None,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    use_chat_template: bool = True,
    system_prompt: Optional[str] = None,
    context_length: Optional[int] = None,
    shared_prefix: bool = True,
) -> SpacyLLMModel:
    """Registered spacy-llm model: a local causal LM, optionally with a cllmfs LoRA adapter.

    name (str): Hub name, local folder, .gguf file, or "embedded" (SmolLM2-135M-Instruct).
    gguf_file (Optional[str]): A GGUF file name inside the folder `name`.
    adapter (Optional[str]): A LoRA adapter folder, e.g. `<pipeline>/cllmfs_ner/adapter`.
    device (str): "auto" (a GPU if there is one), "cpu", "cuda" or "cuda:N".
    dtype (str): "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16".
    max_new_tokens (int): The most tokens of one response.
    batch_size (int): The most prompts in one forward pass.
    use_chat_template (bool): Wrap prompts in the tokenizer's chat template, if it has one.
    system_prompt (Optional[str]): A system message; None for none.
    context_length (Optional[int]): The most prompt tokens, for sharding long docs;
        None: the model's positions minus max_new_tokens.
    shared_prefix (bool): Compute the start that a batch's prompts share once per batch.
    RETURNS (SpacyLLMModel): The model; the weights load on the first call.
    """
    try:
        lm = HFCausalLM(name, gguf_file=gguf_file, device=device, dtype=dtype, adapter=adapter)
        lm.adapter_state()  # nothing replaces a spacy-llm model's adapter: read (and check) it now
    except (ValueError, OSError) as err:
        raise type(err)(f"{MODEL_NAME}: {_for_llm_component(str(err))}") from err
    return SpacyLLMModel(
        lm,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
        context_length=context_length,
        shared_prefix=shared_prefix,
    )


_llm_models().register(MODEL_NAME, func=spacy_llm_model_v1)


def ner_v3_examples(docs: Iterable[Doc], labels: Sequence[str]) -> List[Dict[str, Any]]:
    """Turn gold Docs into few-shot examples for the `spacy.NER.v3` task.

    Each example is {"text", "spans": [{"text", "is_entity", "label", "reason"}]},
    the format of spacy-llm's `NERCoTExample`. Entity labels are matched to
    `labels` case-insensitively and written as spelled in `labels`; entities
    with other labels are left out, and so are docs without any entity left
    (spacy.NER.v3 drops examples without spans). A repeated (text, label) is
    listed once, as the task finds every occurrence of a listed text.

    docs (Iterable[Doc]): Docs with gold entities in `doc.ents`.
    labels (Sequence[str]): The task's labels.
    RETURNS (List[Dict[str, Any]]): The examples, in the order of `docs`.
    """
    label_of = _label_map(labels)
    examples: List[Dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, Doc):
            raise TypeError(f"ner_v3_examples expects spaCy Docs, got {type(doc).__name__}.")
        spans: List[Dict[str, Any]] = []
        seen = set()
        for ent in doc.ents:
            label = label_of.get(ent.label_.strip().lower())
            if label is None or (ent.text, label) in seen:
                continue
            seen.add((ent.text, label))
            spans.append({"text": ent.text, "is_entity": True, "label": label, "reason": f"is a {label}"})
        if spans:
            examples.append({"text": doc.text, "spans": spans})
    return examples


def write_ner_v3_examples(docs: Iterable[Doc], labels: Sequence[str], path: Union[str, Path]) -> int:
    """Write `ner_v3_examples(docs, labels)` to a file for `spacy.FewShotReader.v1`.

    docs (Iterable[Doc]): Docs with gold entities.
    labels (Sequence[str]): The task's labels.
    path (Union[str, Path]): A .json, .jsonl, .yml or .yaml file.
    RETURNS (int): The number of examples written.
    RAISES (ValueError): If the suffix is unsupported or no doc has an entity with these labels.
    """
    path = Path(path)
    writers = {
        ".json": srsly.write_json,
        ".jsonl": srsly.write_jsonl,
        ".yml": srsly.write_yaml,
        ".yaml": srsly.write_yaml,
    }
    if path.suffix not in writers:
        raise ValueError(
            f"Cannot write few-shot examples to '{path}': spacy.FewShotReader.v1 reads "
            f".json, .jsonl, .yml and .yaml files. Fix: use one of these suffixes."
        )
    examples = ner_v3_examples(docs, labels)
    if not examples:
        raise ValueError(
            f"No doc has an entity with one of the labels {list(labels)}, so there are no "
            "few-shot examples to write (an empty file would make the task zero-shot). "
            "Fix: check the labels against the docs' entity labels."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    writers[path.suffix](path, examples)
    return len(examples)


def ner_v3_task(labels: Sequence[str], examples_path: Union[str, Path], definitions: str = "plain") -> Dict[str, Any]:
    """The `[components.llm.task]` block of a `spacy.NER.v3` task: `labels`, each
    defined by its default description, and the few-shot examples of a file written
    by `write_ner_v3_examples` (read with `spacy.FewShotReader.v1`).

    labels (Sequence[str]): The task's labels.
    examples_path (Union[str, Path]): The examples file.
    definitions (str): How the descriptions are written (`labels.label_definitions`):
        "plain" or "contrasted" (told apart from the other labels of the set).
    RETURNS (Dict[str, Any]): The task config.
    """
    return {
        "@llm_tasks": "spacy.NER.v3",
        "labels": list(labels),
        "label_definitions": label_definitions(labels, definitions),
        "examples": {"@misc": "spacy.FewShotReader.v1", "path": str(examples_path)},
    }


def ner_v3_pipeline(
    model: SpacyLLMModel,
    labels: Sequence[str],
    shots: Iterable[Doc],
    examples_path: Union[str, Path],
    definitions: str = "plain",
) -> Tuple[Language, int]:
    """A blank English pipeline whose `llm` component asks `spacy.NER.v3` about
    `labels` with `shots` as its few-shot examples (written to `examples_path`),
    served by the model instance `model`: several such pipelines share one model
    and its adapter (e.g. one per corpus of a general training mix).

    model (SpacyLLMModel): The model to serve the component.
    labels (Sequence[str]): The task's labels.
    shots (Iterable[Doc]): Gold docs, the few-shot examples.
    examples_path (Union[str, Path]): Where to write the examples (.json, .yml...).
    definitions (str): How the label descriptions are written (see `ner_v3_task`).
    RETURNS (Tuple[Language, int]): The pipeline and the number of examples.
    """
    name = f"spacy_cllmfs.shared_model.{id(model)}"
    _llm_models().register(name, func=lambda: model)
    n_examples = write_ner_v3_examples(shots, labels, examples_path)
    nlp = spacy.blank("en")
    task = ner_v3_task(labels, examples_path, definitions)
    nlp.add_pipe("llm", config={"task": task, "model": {"@llm_models": name}})
    return nlp, n_examples


def embed_in_pipeline(nlp: Language, component: str = "llm") -> List[str]:
    """Let a saved `llm` pipeline load from what it stores itself: its config stops
    pointing at the few-shot examples file and at the adapter folder it was built from
    (`nlp.to_disk` saves both inside the pipeline, and `spacy.load` restores them), so
    the pipeline still loads once moved, packaged, or when those files are gone.

    nlp (Language): The pipeline, about to be saved.
    component (str): The name of the spacy-llm component.
    RETURNS (List[str]): The config settings that were set to null.
    """
    if component not in nlp.pipe_names:
        raise ValueError(
            f"The pipeline has no component '{component}' (it has {nlp.pipe_names}). "
            "Fix: pass the name of the spacy-llm component."
        )
    pipe = nlp.get_pipe(component)
    block = nlp.get_pipe_config(component)
    changed: List[str] = []
    task, model = getattr(pipe, "task", None), getattr(pipe, "_model", None)
    task_block = block.get("task", {})
    stored = getattr(task, "prompt_examples", None)
    if task_block.get("examples") is not None and stored and hasattr(task, "to_disk"):
        task_block["examples"] = None
        changed.append(f"components.{component}.task.examples")
    model_block = block.get("model", {})
    if model_block.get("adapter") and isinstance(model, SpacyLLMModel) and model.lm.has_adapter:
        model_block["adapter"] = None
        changed.append(f"components.{component}.model.adapter")
    return changed


def _label_map(labels: Sequence[str]) -> Dict[str, str]:
    names = labels.split(",") if isinstance(labels, str) else labels  # spacy-llm accepts "A,B" too
    cleaned = [label.strip() for label in names if label.strip()]
    if not cleaned:
        raise ValueError("No labels given. Fix: pass the task's labels, e.g. ['PERSON', 'LOCATION'].")
    label_of: Dict[str, str] = {}
    for label in cleaned:
        key = label.strip().lower()
        if key in label_of and label_of[key] != label:
            raise ValueError(f"Labels '{label_of[key]}' and '{label}' differ only in case.")
        label_of[key] = label
    return label_of


__all__: Tuple[str, ...] = (
    "SpacyLLMModel",
    "embed_in_pipeline",
    "ner_v3_examples",
    "ner_v3_pipeline",
    "ner_v3_task",
    "spacy_llm_model_v1",
    "write_ner_v3_examples",
)
