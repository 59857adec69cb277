"""Few-shot NER quality on CrossNER: cllmfs_ner against the baselines, same shots.

    python bench/quality.py --data ../shared/data/crossner --profile cpu-smoke \
        --output bench/results/quality-cpu-smoke.json
    python bench/quality.py --data ../shared/data/crossner --profile gpu \
        --model bench/work/models/qwen2.5-coder-1.5b-instruct.gguf --device cuda:0 --output bench/results/quality-gpu.json

Systems (all on the same K-shot training sets and, where they use one, the same base LLM):
  spacy_ner        spaCy's own NER (`spacy train`, default CPU `ner` config)
  spacy_llm        spacy-llm's `llm` component, `spacy.NER.v3` task, the shots as prompt
                   examples, served by spacy_cllmfs.SpacyLLMModel (no adapter)
  spacy_llm_lora   spacy_llm, its LoRA adapter first trained on the task's own prompts
                   (spacy_cllmfs.llm_tuning.tune_llm: one prompt per sentence for all labels,
                   the sentence left out of the examples shown), best of `dev_evals` on dev
  spacy_llm_general  spacy_llm_lora starting from a general adapter: LoRA first tuned on
                   `llm_general_size` sentences of the general mix (as cllmfs_general's), each
                   asked by a NER.v3 task of its own corpus, `llm_general_examples_shown` of
                   that corpus's K-shot examples per prompt, at `llm_general_learn_rate`
                   (trained once, reused), then on the shots at `llm_tune_learn_rate`
                   (`llm_tune_shared_step_examples`: the sentences of a shot step asked with
                   the same examples, their shared prompt computed once per step;
                   `llm_tune_contrastive_weight`: the shot stage adds CLLMFS's boundary
                   contrastive loss, anchored on the label names of the prompt, at this weight)
                   (the spacy_llm* systems write their label descriptions as
                   `llm_label_definitions` says: "plain", or "contrasted" with the set's
                   other labels, `spacy_cllmfs.labels.label_definitions`)
  cllmfs_lora      cllmfs_ner, LoRA only (contrastive_weight = 0)
  cllmfs           cllmfs_ner, LoRA + contrastive loss (the default)
  cllmfs_transfer  cllmfs_ner first trained on a CoNLL-2003 subset (once, reused), then few-shot
  cllmfs_general   cllmfs_ner first trained on a general mix: the CrossNER domains other
                   than the target (`general_size` sentences, each prompted with its own
                   corpus's labels), then few-shot; `extra_general_sizes` adds runs at
                   other mix sizes (the size sweep); `general_conll` true adds CoNLL-2003
                   to the mix of both general systems (the default until 2026-12-07; its
                   generic PER took the domains' person types, see the README)
  cllmfs_sentence_first  cllmfs with the sentence-first template (spacy_cllmfs.prompt.v2)
  cllmfs_examples  cllmfs with worked examples in the prompt (spacy_cllmfs.prompt.v3: per label,
                   2 shot sentences with their answers; a sentence never shows itself)
  cllmfs_icl       the prompt.v3 prompt on the base model, no training: in-context learning with
                   one prompt per label (what cllmfs_examples starts from)
  cllmfs_center    cllmfs, contrastive cosines on centred states (`contrastive_center`)
  cllmfs_other_types  cllmfs, entity tokens of other types as the first contrastive
                   negatives (`contrastive_negatives = "other_types"`)

The cllmfs systems train with the component's default recipe (spacy_cllmfs.training.v2:
`negatives_per_positive`, confusable negatives first), keep the adapter that scores best
on the first `dev_limit` dev sentences (`dev_evals` evaluations) and calibrate its
open-or-end decision on them (`spacy_cllmfs.loop.fit_select`), the way `spacy project
run all` does with `spacy train` and `spacy_cllmfs calibrate`.

The base model is loaded once per process and each run gets a fresh adapter. Results
are written after every run, keyed by system/domain/K/seed, and runs already in the
output file are skipped: an interrupted matrix continues where it stopped. A results
file holds one set of settings: continuing it with other settings is refused. Adapters
trained once and reused (source, general) are kept under `--work` with their recipe (the
settings that trained them, `recipe.json`); one kept with another recipe is refused too.
"""
import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import spacy
import torch
from spacy.language import Language
from spacy.tokens import Doc, DocBin
from spacy.training import Example
from spacy.util import registry

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_model, load_averages  # noqa: E402
from spacy_cllmfs.adapters import AdapterState  # noqa: E402
from spacy_cllmfs.corpora import read_conll  # noqa: E402
from spacy_cllmfs.labels import check_definition_style  # noqa: E402
from spacy_cllmfs.llm_tuning import GeneralMix, TuningSettings, tune_llm, tune_llm_general  # noqa: E402
from spacy_cllmfs.loop import as_examples, fit, fit_select, unannotated  # noqa: E402
from spacy_cllmfs.memory import peak_resident_bytes, release_memory, resident_bytes  # noqa: E402
from spacy_cllmfs.mixing import mix_corpora  # noqa: E402
from spacy_cllmfs.models import HFCausalLM, cpu_bf16_support  # noqa: E402
from spacy_cllmfs.sampling import greedy_k_shot, label_counts  # noqa: E402
from spacy_cllmfs.spacy_llm import SpacyLLMModel, ner_v3_pipeline

SYSTEMS = ("spacy_ner", "spacy_llm", "spacy_llm_lora", "spacy_llm_general", "cllmfs_lora", "cllmfs", "cllmfs_transfer",
           "cllmfs_general", "cllmfs_sentence_first", "cllmfs_examples", "cllmfs_icl", "cllmfs_center",
           "cllmfs_other_types")
# contrastive variants: rows of the table only where they were run
ABLATIONS = ("cllmfs_center", "cllmfs_other_types")
# systems shown as rows of a table only where they were run
OPTIONAL = ABLATIONS + ("cllmfs_examples", "cllmfs_icl", "spacy_llm_lora", "spacy_llm_general")
# how a cllmfs system's training.v2 settings differ from cllmfs (LoRA + contrastive 0.1)
RECIPES: Dict[str, Dict[str, Any]] = {
    "cllmfs_lora": {"contrastive_weight": 0.0},
    "cllmfs_center": {"contrastive_center": True},
    "cllmfs_other_types": {"contrastive_negatives": "other_types"},
}
# the prompt template of a cllmfs system, if not the default (label first, v1)
PROMPTS = {
    "cllmfs_sentence_first": "spacy_cllmfs.prompt.v2",
    "cllmfs_examples": "spacy_cllmfs.prompt.v3",
    "cllmfs_icl": "spacy_cllmfs.prompt.v3",
}
SYSTEM_NAMES = {
    "spacy_ner": "spaCy NER (CPU config)",
    "spacy_llm": "spacy-llm NER.v3, in-context shots",
    "spacy_llm_lora": "spacy-llm NER.v3, in-context shots + LoRA tuned on its prompts",
    "spacy_llm_general": "spacy-llm NER.v3, LoRA tuned on a general mix, then on its prompts",
    "cllmfs_lora": "cllmfs_ner, LoRA only",
    "cllmfs": "cllmfs_ner, LoRA + contrastive",
    "cllmfs_transfer": "cllmfs_ner, CoNLL-2003 -> domain",
    "cllmfs_general": "cllmfs_ner, general mix -> domain",
    "cllmfs_sentence_first": "cllmfs_ner, sentence-first prompt (v2)",
    "cllmfs_examples": "cllmfs_ner, worked examples in the prompt (v3)",
    "cllmfs_icl": "cllmfs_ner prompt v3, no training (in-context)",
    "cllmfs_center": "cllmfs_ner, contrastive on centred states",
    "cllmfs_other_types": "cllmfs_ner, contrastive, other-type negatives",
}
DOMAINS = ("politics", "science", "music", "literature")
# what a results file written before a setting existed ran with, where that is not the
# setting's default today (general_conll was true until 2026-12-07)
SETTINGS_BEFORE_RECORDED: Dict[str, Any] = {"general_conll": True}
GENERAL_SYSTEMS = ("cllmfs_general", "spacy_llm_general")
# GLiNER-L zero-shot F1 as published (Zaratiana et al., 2023); its weights are not reachable here
GLINER_PUBLISHED = {"politics": 72.6, "science": 62.6, "music": 69.6, "literature": 64.4}
DEFAULT_PROFILE = "cpu-smoke"
PROFILES: Dict[str, Dict[str, Any]] = {
    # the CPU smoke matrix: SmolLM2, K=5, one seed, <= 50 test sentences per domain
    "cpu-smoke": {
        "model": "embedded", "shots": [5], "seeds": [0], "extra_seeds": {}, "test_limit": 40,
        "epochs": 5, "batch_size": 4, "learn_rate": 1e-3, "negatives_per_positive": 1.0,
        "negative_sampling": "confusable", "dev_limit": 20, "dev_evals": 2, "calibrate": True,
        "contrastive_negatives": "boundary", "contrastive_center": False,
        "source_limit": 200, "source_epochs": 1,
        "general_size": 250, "extra_general_sizes": {"politics": [100, 500, 1000]}, "general_epochs": 1,
        "general_conll": False,
        "max_new_tokens": 64, "llm_max_new_tokens": 160, "spacy_ner_steps": 400,
        "llm_tune_epochs": 4, "llm_tune_learn_rate": 3e-4, "llm_tune_examples_shown": None,
        "llm_tune_prompt_gradients": True, "llm_tune_shared_step_examples": False, "llm_tune_contrastive_weight": 0.0,
        "llm_general_size": 100, "llm_general_epochs": 1, "llm_general_examples_shown": 2,
        "llm_general_learn_rate": 3e-4, "llm_label_definitions": "plain",
    },
    # the real-model CPU matrix: Qwen2.5-Coder-1.5B-Instruct (bench/get_model.py), K=5 on the
    # four domains and K=20 on politics, 100 test sentences
    "cpu-real": {
        "model": None, "shots": [5], "extra_shots": {"politics": [20]}, "seeds": [0], "extra_seeds": {},
        "test_limit": 100, "epochs": 5, "batch_size": 4, "learn_rate": 3e-4, "negatives_per_positive": 1.0,
        "negative_sampling": "confusable", "dev_limit": 30, "dev_evals": 2, "calibrate": True,
        "contrastive_negatives": "boundary", "contrastive_center": False,
        "source_limit": 500, "source_epochs": 1,
        "general_size": 1000, "extra_general_sizes": {"politics": [250, 500]}, "general_epochs": 1,
        "general_conll": False,
        "max_new_tokens": 64, "llm_max_new_tokens": 160, "spacy_ner_steps": 400,
        "llm_tune_epochs": 4, "llm_tune_learn_rate": 3e-4, "llm_tune_examples_shown": None,
        "llm_tune_prompt_gradients": True, "llm_tune_shared_step_examples": False, "llm_tune_contrastive_weight": 0.0,
        "llm_general_size": 250, "llm_general_epochs": 1, "llm_general_examples_shown": 2,
        "llm_general_learn_rate": 3e-4, "llm_label_definitions": "plain",
    },
    # the GPU matrix: K=5 and 20, seed 0 everywhere plus seeds 1, 2 on politics, 300 test sentences
    "gpu": {
        "model": None, "shots": [5, 20], "seeds": [0], "extra_seeds": {"politics": [1, 2]}, "test_limit": 300,
        "epochs": 10, "batch_size": 4, "learn_rate": 5e-4, "negatives_per_positive": 1.0,
        "negative_sampling": "confusable", "dev_limit": 50, "dev_evals": 3, "calibrate": True,
        "contrastive_negatives": "boundary", "contrastive_center": False,
        "source_limit": 2000, "source_epochs": 2,
        "general_size": 4000, "extra_general_sizes": {"politics": [1000]}, "general_epochs": 2,
        "general_conll": False,
        "max_new_tokens": 96, "llm_max_new_tokens": 256, "spacy_ner_steps": 1000,
        "llm_tune_epochs": 4, "llm_tune_learn_rate": 3e-4, "llm_tune_examples_shown": None,
        "llm_tune_prompt_gradients": True, "llm_tune_shared_step_examples": False, "llm_tune_contrastive_weight": 0.0,
        "llm_general_size": 2000, "llm_general_epochs": 1, "llm_general_examples_shown": 2,
        "llm_general_learn_rate": 3e-4, "llm_label_definitions": "plain",
    },
}
_PRELOADED: Dict[str, Any] = {}


@registry.misc("bench.preloaded_lm.v1")
def preloaded_lm() -> HFCausalLM:
    """The base model this process loaded once (for cllmfs_ner configs)."""
    return _PRELOADED["lm"]


class PrintHandler(logging.Handler):
    """Log records printed to the current stdout (the bench's log), flushed at once."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def machine() -> Dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or cpu_model(),
            "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["cpu_native_bf16"] = cpu_bf16_support()[0]
    return info


class Domain:
    """A CrossNER domain: its labels, train docs and the test docs to score on."""

    def __init__(self, data: Path, name: str, test_limit: int, vocab: Any) -> None:
        self.name = name
        splits = {split: read_conll(data / name / f"{split}.txt", vocab) for split in ("train", "dev", "test")}
        self.labels = sorted(set().union(*(label_counts(docs) for docs in splits.values())))
        self.train = splits["train"]
        self.dev = splits["dev"]
        self.test = splits["test"][:test_limit] if test_limit > 0 else splits["test"]

    def shots(self, k: int, seed: int) -> List[Doc]:
        return greedy_k_shot(self.train, k, labels=self.labels, seed=seed, strategy="balanced")


def score(nlp: Language, gold: Sequence[Doc]) -> Dict[str, Any]:
    """spaCy's NER scores of `nlp` on gold docs (predictions on the same tokens)."""
    start = time.time()
    scores = nlp.evaluate([Example(unannotated(nlp, doc), doc) for doc in gold])
    return {
        "ents_f": scores["ents_f"], "ents_p": scores["ents_p"], "ents_r": scores["ents_r"],
        "ents_per_type": scores["ents_per_type"], "infer_s": time.time() - start,
    }


def training_config(settings: Dict[str, Any], system: str) -> Dict[str, Any]:
    """The spacy_cllmfs.training.v2 block of a cllmfs system: the profile's recipe, then
    what the system changes (RECIPES)."""
    return {
        "@misc": "spacy_cllmfs.training.v2", "contrastive_weight": 0.1,
        "micro_batch_size": settings["micro_batch_size"],
        "negatives_per_positive": settings["negatives_per_positive"],
        "negative_sampling": settings["negative_sampling"],
        "contrastive_negatives": settings["contrastive_negatives"],
        "contrastive_center": settings["contrastive_center"],
        **RECIPES.get(system, {}),
    }


def cllmfs_nlp(settings: Dict[str, Any], system: str = "cllmfs") -> Language:
    """A blank pipeline with cllmfs_ner on the preloaded model, configured for `system`."""
    prompt = PROMPTS.get(system, "spacy_cllmfs.prompt.v1")
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={
        "model": {"@misc": "bench.preloaded_lm.v1"},
        "prompt": {"@misc": prompt},
        "max_new_tokens": settings["max_new_tokens"],
        "batch_size": settings["decode_batch_size"],
        "training": training_config(settings, system),
    })
    return nlp


def train_cllmfs(
    nlp: Language, docs: Sequence[Doc], labels: Sequence[str], epochs: int, settings: Dict[str, Any],
    start: Optional[AdapterState], seed: int, dev: Sequence[Doc] = (),
) -> Dict[str, Any]:
    """Train a fresh adapter (from `start`); with `dev`, keep the best on it and calibrate."""
    ner = nlp.get_pipe("cllmfs_ner")
    ner.model.reset_adapter(start)
    ner.open_bias = 0.0
    examples = as_examples(nlp, docs)
    ner.initialize(lambda: examples, nlp=nlp, labels=list(labels), label_descriptions={})
    steps = max(1, math.ceil(len(examples) / settings["batch_size"]) * epochs)
    schedule = dict(batch_size=settings["batch_size"], learn_rate=settings["learn_rate"],
                    warmup_steps=min(10, steps // 10), seed=seed, progress=sys.stderr.isatty())
    begin = time.time()
    info: Dict[str, Any] = {"steps": steps}
    if dev:
        selection = fit_select(nlp, examples, as_examples(nlp, dev), steps=steps, evaluations=settings["dev_evals"],
                               calibrate=settings["calibrate"], **schedule)
        losses = selection.losses
        info.update(dev_sentences=len(dev), dev_scores={str(k): v for k, v in selection.dev_scores.items()},
                    best_step=selection.best_step, calibration=selection.calibration.get(ner.name))
    else:
        losses = fit(nlp, examples, steps=steps, **schedule)
    return {**info, "train_s": time.time() - begin, "first_loss": losses[0], "last_loss": losses[-1]}


def untrained_cllmfs(nlp: Language, docs: Sequence[Doc], labels: Sequence[str]) -> Dict[str, Any]:
    """Initialize cllmfs_ner on the shots (labels, worked examples) without training:
    the base model, as an identity adapter."""
    ner = nlp.get_pipe("cllmfs_ner")
    ner.model.reset_adapter(None)
    ner.open_bias = 0.0
    examples = as_examples(nlp, docs)
    begin = time.time()
    ner.initialize(lambda: examples, nlp=nlp, labels=list(labels), label_descriptions={})
    return {"train_s": time.time() - begin, "steps": 0}


def run_spacy_ner(shots: Sequence[Doc], domain: Domain, settings: Dict[str, Any], seed: int) -> Dict[str, Any]:
    from spacy.cli.init_config import init_config
    from spacy.cli.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-spacy-ner-"))
    try:
        DocBin(docs=shots).to_disk(work / "train.spacy")
        DocBin(docs=domain.dev[: settings["dev_limit"]]).to_disk(work / "dev.spacy")
        config = init_config(lang="en", pipeline=["ner"], optimize="efficiency", gpu=False)
        config.to_disk(work / "config.cfg")
        begin = time.time()
        train(work / "config.cfg", work / "out", overrides={
            "paths.train": str(work / "train.spacy"), "paths.dev": str(work / "dev.spacy"),
            "system.seed": seed, "training.max_steps": settings["spacy_ner_steps"], "training.max_epochs": 0,
            "training.eval_frequency": 50, "training.patience": 0,
        })
        train_s = time.time() - begin
        nlp = spacy.load(work / "out" / "model-best")
        return {"train_s": train_s, **score(nlp, domain.test)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def llm_model(settings: Dict[str, Any]) -> SpacyLLMModel:
    """A spacy-llm model on the preloaded base model (one adapter for all of them)."""
    return SpacyLLMModel(_PRELOADED["lm"], max_new_tokens=settings["llm_max_new_tokens"],
                         batch_size=settings["decode_batch_size"])


def llm_tuning(settings: Dict[str, Any], seed: int, general: bool = False) -> TuningSettings:
    """How tune_llm trains on the shots (or, with `general`, on a general mix)."""
    prefix = "llm_general" if general else "llm_tune"
    shared = {} if general or not settings["llm_tune_shared_step_examples"] else {
        "shared_step_examples": True, "micro_batch_size": TuningSettings.batch_size}
    contrastive = 0.0 if general else settings["llm_tune_contrastive_weight"]
    return TuningSettings(epochs=settings[f"{prefix}_epochs"], learn_rate=settings[f"{prefix}_learn_rate"],
                          examples_shown=settings[f"{prefix}_examples_shown"],
                          prompt_gradients=settings["llm_tune_prompt_gradients"], contrastive_weight=contrastive,
                          seed=seed, **shared)


def run_spacy_llm(shots: Sequence[Doc], domain: Domain, settings: Dict[str, Any], tune: bool = False,
                  seed: int = 0, start: Optional[AdapterState] = None) -> Dict[str, Any]:
    """spacy-llm's NER.v3 with the shots as prompt examples; with `tune`, its LoRA adapter is
    first trained on the task's own prompts (`spacy_cllmfs.llm_tuning.tune_llm`, leave one out),
    from the adapter `start` if given (dev step 0 then scores `start` as it is)."""
    lm: HFCausalLM = _PRELOADED["lm"]
    lm.reset_adapter(start)
    work = Path(tempfile.mkdtemp(prefix="bench-spacy-llm-"))
    try:
        nlp, n_examples = ner_v3_pipeline(llm_model(settings), domain.labels, shots, work / "examples.json",
                                          settings["llm_label_definitions"])
        info: Dict[str, Any] = {"train_s": 0.0, "prompt_examples": n_examples}
        if tune:
            begin = time.time()
            report = tune_llm(nlp, as_examples(nlp, shots), settings=llm_tuning(settings, seed),
                              dev=as_examples(nlp, domain.dev[: settings["dev_limit"]]),
                              evaluations=settings["dev_evals"])
            info.update(train_s=time.time() - begin, steps=len(report.losses), first_loss=report.losses[0],
                        last_loss=report.losses[-1], dev_sentences=min(len(domain.dev), settings["dev_limit"]),
                        dev_scores={str(k): v for k, v in report.dev_scores.items()}, best_step=report.best_step)
        return {**info, **score(nlp, domain.test)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lm.reset_adapter()


def adapter_recipe(settings: Dict[str, Any], **parts: Any) -> Dict[str, Any]:
    """What a cached adapter is trained from: the base model, its dtype and `parts`
    (the data, the schedule, the component's training and prompt blocks...), as JSON."""
    recipe = {"model": settings["model_tag"], "dtype": settings["dtype"], **parts}
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def cached_adapter(folder: Path, recipe: Dict[str, Any], train: Callable[[], Tuple[AdapterState, Dict[str, Any]]]
                   ) -> Tuple[AdapterState, Dict[str, Any]]:
    """Load the adapter saved in `folder` with its training record, or train it once with
    `train` and save both there with its recipe (a later run, or another system, then
    reuses it). An adapter saved with another recipe is refused, never reused or overwritten.

    RETURNS (Tuple[AdapterState, Dict[str, Any]]): The adapter and how it was trained.
    """
    if (folder / "adapter_config.json").exists():
        saved = json.loads((folder / "recipe.json").read_text()) if (folder / "recipe.json").exists() else None
        if saved != recipe:
            differ = sorted(k for k in set(recipe) | set(saved or {}) if (saved or {}).get(k) != recipe.get(k))
            raise ValueError(
                f"{folder} holds an adapter trained from another recipe "
                f"({'no recipe.json' if saved is None else 'differs in ' + ', '.join(differ)}), so it "
                "cannot stand for this run's. Fix: move that folder out of the way, or use another --work.")
        return AdapterState.from_disk(folder), json.loads((folder / "training.json").read_text())
    state, info = train()
    state.to_disk(folder)
    write_json(folder / "training.json", info)
    write_json(folder / "recipe.json", recipe)
    return state, info


def cllmfs_recipe(settings: Dict[str, Any], nlp: Language, **parts: Any) -> Dict[str, Any]:
    """The recipe of a cllmfs adapter trained by `train_cllmfs` on `nlp`: its schedule and
    its component's training and prompt blocks, with `parts` (the data, the epochs)."""
    component = nlp.config["components"]["cllmfs_ner"]
    return adapter_recipe(settings, batch_size=settings["batch_size"], learn_rate=settings["learn_rate"],
                          training=component["training"], prompt=component["prompt"], **parts)


def source_adapter(args: argparse.Namespace, settings: Dict[str, Any], nlp: Language) -> AdapterState:
    """Train (once) or load the CoNLL-2003 source adapter for the transfer system."""
    def train() -> Tuple[AdapterState, Dict[str, Any]]:
        docs = read_conll(args.data / "conll2003" / "train.txt", nlp.vocab)
        docs = [doc for doc in docs if len(doc.ents)][: settings["source_limit"]]
        labels = sorted(label_counts(docs))
        print(f"Training the source adapter on {len(docs)} CoNLL-2003 sentences ({labels})", flush=True)
        info = train_cllmfs(nlp, docs, labels, settings["source_epochs"], settings, None, seed=0)
        return nlp.get_pipe("cllmfs_ner").model.adapter_state(), info

    recipe = cllmfs_recipe(settings, nlp, data="conll2003", size=settings["source_limit"],
                           epochs=settings["source_epochs"])
    folder = args.work / f"source-{settings['model_tag']}-n{settings['source_limit']}-e{settings['source_epochs']}"
    return cached_adapter(folder, recipe, train)[0]


class Run(NamedTuple):
    """One run of the matrix; `size` is the general mix size of a cllmfs_general run."""

    domain: str
    k: int
    seed: int
    system: str
    size: Optional[int] = None

    @property
    def key(self) -> str:
        """The run's key in the results file."""
        key = f"{self.system}|{self.domain}|k{self.k}|s{self.seed}"
        return key if self.size is None else f"{key}|n{self.size}"


def general_sources(data: Path, target: str, vocab: Any, *, conll: bool) -> List[Tuple[str, List[Doc]]]:
    """The corpora of the general mix for a target domain: CoNLL-2003 if `conll` (the
    `general_conll` setting) and the CrossNER domains other than `target` (nothing of the
    target leaks), with their train docs."""
    names = (["conll2003"] if conll else []) + [d for d in DOMAINS if d != target and (data / d).exists()]
    if not names:
        raise ValueError(
            f"No general NER corpus for '{target}': general_conll is false and {data} holds no CrossNER "
            f"domain other than '{target}'. Fix: --set general_conll=true, or add another domain's folder."
        )
    return [(name, read_conll(data / name / "train.txt", vocab)) for name in names]


def general_docs(data: Path, target: str, size: int, vocab: Any, *, conll: bool) -> List[Doc]:
    """The general NER mix for a target domain (`spacy_cllmfs.mixing.mix_corpora`):
    `size` training sentences with entities from `general_sources`, an equal share per
    source and the first (CoNLL-2003 if `conll`, else the first other domain) filling
    the rest, each Doc declaring its own corpus's labels."""
    sources = general_sources(data, target, vocab, conll=conll)
    return mix_corpora([docs for _, docs in sources], size, fill=0, seed=0)


def recorded_settings(results: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a results file's runs were made with: its recorded ones, and for a
    setting added after it was written, the value of `SETTINGS_BEFORE_RECORDED`.
    `general_conll` only where a general system ran: no other run reads it, so a file
    without one can be continued with either value."""
    settings = {**SETTINGS_BEFORE_RECORDED, **results.get("settings", {})}
    if not any(key.split("|")[0] in GENERAL_SYSTEMS for key in results.get("runs", {})):
        del settings["general_conll"]
    return settings


def general_mix_choice(settings: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """What `general_conll` adds to a general adapter's recipe and to its folder's name:
    nothing when the mix holds CoNLL-2003 (the recipes and folders of old, so that their
    caches stay valid), else `conll: false` and "-noconll"."""
    return ({}, "") if settings["general_conll"] else ({"conll": False}, "-noconll")


def general_llm_adapter(args: argparse.Namespace, settings: Dict[str, Any], target: str,
                        size: int) -> Tuple[AdapterState, Dict[str, Any]]:
    """Train (once) or load the general adapter of the spacy-llm path for a target domain:
    the same mix as cllmfs_general's, each sentence asked by a NER.v3 task of its own corpus
    (its labels, its K-shot examples, `llm_general_examples_shown` of them per prompt),
    all corpora in one shuffled stream (`spacy_cllmfs.llm_tuning.tune_llm_general`).

    RETURNS (Tuple[AdapterState, Dict[str, Any]]): The adapter and how it was trained.
    """
    recipe = general_llm_recipe(settings, target, size)

    def train() -> Tuple[AdapterState, Dict[str, Any]]:  # trained from the recipe it is saved with
        corpora = dict(general_sources(args.data, target, spacy.blank("en").vocab, conll=settings["general_conll"]))
        lm: HFCausalLM = _PRELOADED["lm"]
        lm.reset_adapter()
        print(f"Training the general spacy-llm adapter for {target} on {size} sentences of {list(corpora)}",
              flush=True)
        begin = time.time()
        try:
            report = tune_llm_general(llm_model(settings), corpora, mix=GeneralMix(**recipe["mix"]),
                                      settings=TuningSettings(**recipe["tuning"]),
                                      definitions=recipe.get("definitions", "plain"))
            state = lm.adapter_state()
        finally:
            lm.reset_adapter()
        return state, {"sentences": sum(report.sources.values()), "per_corpus": report.sources,
                       "steps": len(report.losses), "first_loss": report.losses[0],
                       "last_loss": report.losses[-1], "train_s": time.time() - begin,
                       "examples_shown": recipe["tuning"]["examples_shown"],
                       "epochs": recipe["tuning"]["epochs"]}

    return cached_adapter(general_llm_folder(args.work, settings, target, size), recipe, train)


def general_llm_recipe(settings: Dict[str, Any], target: str, size: int) -> Dict[str, Any]:
    """The recipe of `general_llm_adapter`: the mix, the general stage's schedule and, when
    not "plain", how its label descriptions are written (the shot stage's settings do not
    change it)."""
    mix = GeneralMix(size, settings["shots"][0])
    style = non_plain_definitions(settings)
    styled = {} if style is None else {"definitions": style}
    return adapter_recipe(settings, target=target, mix=asdict(mix), **general_mix_choice(settings)[0],
                          tuning=asdict(llm_tuning(settings, seed=0, general=True)), **styled)


def record_machine(results: Dict[str, Any], here: Dict[str, Any]) -> Dict[str, Any]:
    """Make `here` the results file's latest "machine", and keep every machine the file ran
    on in "machines" (a file written before "machines" existed keeps its one "machine").

    RETURNS (Dict[str, Any]): `here`.
    """
    machines = results.setdefault("machines", [results["machine"]] if "machine" in results else [])
    if here not in machines:
        machines.append(here)
    results["machine"] = here
    return here


def non_plain_definitions(settings: Dict[str, Any]) -> Optional[str]:
    """The label definition style of the spacy_llm* systems if it is not "plain" (which
    names and keys the general adapters of old, so that their caches stay valid)."""
    style = settings["llm_label_definitions"]
    return None if style == "plain" else style


def general_llm_folder(work: Path, settings: Dict[str, Any], target: str, size: int) -> Path:
    """Where `general_llm_adapter` keeps a general adapter: the name holds the settings that
    change it, so a run with other settings trains its own instead of being refused."""
    grads = "" if settings["llm_tune_prompt_gradients"] else "-nograd"
    style = non_plain_definitions(settings)
    styled = "" if style is None else f"-{style}"
    return work / (f"general-llm-{settings['model_tag']}-{settings['dtype']}-{target}-n{size}"
                   f"-e{settings['llm_general_epochs']}-x{settings['llm_general_examples_shown']}"
                   f"-k{settings['shots'][0]}-lr{settings['llm_general_learn_rate']:g}{grads}{styled}"
                   f"{general_mix_choice(settings)[1]}")


def general_adapter(args: argparse.Namespace, settings: Dict[str, Any], nlp: Language, target: str,
                    size: int) -> Tuple[AdapterState, Dict[str, Any]]:
    """Train (once) or load the general adapter for a target domain and mix size.

    RETURNS (Tuple[AdapterState, Dict[str, Any]]): The adapter and how it was trained.
    """
    def train() -> Tuple[AdapterState, Dict[str, Any]]:
        docs = general_docs(args.data, target, size, nlp.vocab, conll=settings["general_conll"])
        labels = sorted({ent.label_ for doc in docs for ent in doc.ents})
        print(f"Training the general adapter for {target} on {len(docs)} sentences ({labels})", flush=True)
        info = train_cllmfs(nlp, docs, labels, settings["general_epochs"], settings, None, seed=0)
        info.update(sentences=len(docs), labels=labels)
        return nlp.get_pipe("cllmfs_ner").model.adapter_state(), info

    recipe = cllmfs_recipe(settings, nlp, target=target, size=size, epochs=settings["general_epochs"],
                           **general_mix_choice(settings)[0])
    return cached_adapter(general_folder(args.work, settings, target, size), recipe, train)


def general_folder(work: Path, settings: Dict[str, Any], target: str, size: int) -> Path:
    """Where `general_adapter` keeps the general adapter of cllmfs_general."""
    return work / (f"general-{settings['model_tag']}-{target}-n{size}-e{settings['general_epochs']}"
                   f"{general_mix_choice(settings)[1]}")


def general_size(settings: Dict[str, Any], system: str) -> Optional[int]:
    """The general mix size of a system's runs (None: it trains no general adapter)."""
    key = {"cllmfs_general": "general_size", "spacy_llm_general": "llm_general_size"}.get(system)
    return settings.get(key) if key else None


def plan(settings: Dict[str, Any], domains: Sequence[str], systems: Sequence[str],
         extra_shots: bool = True) -> List[Run]:
    """The runs in order of importance, so that a short time budget still yields the
    rows that matter: the first K and seed on every domain first (domains and systems
    in the order given), then extra shots (unless `extra_shots` is False: `--shots`
    given) and seeds, then the other general mix sizes."""
    def sized(domain: str, k: int, seed: int, system: str) -> Run:
        return Run(domain, k, seed, system, general_size(settings, system))

    k0, seed0 = settings["shots"][0], settings["seeds"][0]
    first = [sized(d, k0, seed0, s) for d in domains for s in systems]
    rest = [
        sized(d, k, seed, s)
        for d in domains
        for k in settings["shots"] + (settings.get("extra_shots", {}).get(d, []) if extra_shots else [])
        for seed in settings["seeds"] + settings["extra_seeds"].get(d, [])
        for s in systems
    ]
    sweep = [
        Run(d, k0, seed0, "cllmfs_general", size)
        for d in domains if "cllmfs_general" in systems
        for size in settings.get("extra_general_sizes", {}).get(d, [])
    ]
    ordered: List[Run] = []
    for run in first + rest + sweep:
        if run not in ordered:
            ordered.append(run)
    return ordered


def setting_value(text: str) -> Any:
    """The value of a `--set KEY=VALUE`: JSON (`50`, `false`, `{}`, `"plain"`) or else the
    text itself, as spaCy reads config overrides, so that a recorded command whose shell
    quotes were dropped (`llm_label_definitions="contrasted"` -> `contrasted`) still runs."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CrossNER folder (…/crossner)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--model", default=None, help="Base model (default: the profile's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto",
                        help='Weight dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32" or "bfloat16" '
                             "(on a CPU with native bf16 matmuls, e.g. avx512_bf16, about 2x faster)")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--shots", default=None,
                        help="Comma-separated K values, and no others (default: the profile's, with its extra K "
                             "per domain, e.g. K=20 on politics in cpu-real)")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="Start no new run after this many minutes (0: no limit); rerun to continue")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a profile setting, e.g. --set source_limit=50 (JSON, else a string)")
    args = parser.parse_args(argv)

    settings = dict(PROFILES[args.profile])
    settings["model"] = args.model or settings["model"]
    if not settings["model"]:
        parser.error(f"--model is required with --profile {args.profile}")
    settings["dtype"] = args.dtype
    if args.shots:
        settings["shots"] = [int(k) for k in args.shots.split(",")]
    if args.test_limit is not None:
        settings["test_limit"] = args.test_limit
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in settings:
            parser.error(f"--set: unknown setting {key!r}; known: {sorted(settings)}")
        settings[key] = setting_value(value)
    try:  # refused now, not hours later when the first spacy_llm* run builds its prompts
        check_definition_style(settings["llm_label_definitions"])
    except ValueError as error:
        parser.error(f"--set llm_label_definitions: {error}")
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    settings["decode_batch_size"] = 256 if on_gpu else 16
    settings["micro_batch_size"] = 16 if on_gpu else 8
    settings["model_tag"] = Path(settings["model"]).name.replace(".", "_")
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}
    runs = results.setdefault("runs", {})
    recorded = recorded_settings(results) if "settings" in results else None
    if recorded is not None:
        # a setting the file does not know is new to the bench: its runs ran as its default
        # says, unless `recorded_settings` fills in what they ran with
        changed = sorted(k for k in set(recorded) | set(settings)
                         if k != "model_parameters" and k in recorded and recorded.get(k) != settings.get(k))
        if changed:
            fix = "write to a new --output"
            if not set(changed) - set(PROFILES[args.profile]):  # all of them settable with --set
                as_recorded = " ".join("--set " + shlex.quote(f"{k}={json.dumps(recorded[k], separators=(',', ':'))}")
                                       for k in changed)
                fix = f"pass {as_recorded} to continue it as recorded, or {fix}"
            parser.error(f"{args.output} holds runs made with other settings ({', '.join(changed)}); "
                         f"continuing it would mix them. Fix: {fix}.")
    results["settings"] = {k: v for k, v in settings.items()}
    results["profile"] = args.profile
    here = record_machine(results, machine())
    given = list(argv) if argv is not None else sys.argv[1:]
    results["command"] = " ".join(["python", "bench/quality.py", *given])
    commands = results.setdefault("commands", [])  # every invocation of this matrix (resumes)
    if results["command"] not in commands:
        commands.append(results["command"])

    tuning_log = logging.getLogger("spacy_cllmfs.llm_tuning")  # tune_llm's steps and dev scores
    tuning_log.setLevel(logging.INFO)
    if not any(isinstance(handler, PrintHandler) for handler in tuning_log.handlers):  # main() may run again
        tuning_log.addHandler(PrintHandler())
    began = time.time()
    lm = HFCausalLM(settings["model"], device=args.device, dtype=settings["dtype"])
    _PRELOADED["lm"] = lm
    results["settings"]["model_parameters"] = sum(p.numel() for p in lm.model.parameters())
    print(f"Loaded {settings['model']} in {time.time() - began:.0f}s on {lm.device}", flush=True)
    nlp = spacy.blank("en")
    vocab = nlp.vocab
    source: Optional[AdapterState] = None
    domains: Dict[str, Domain] = {}
    shots_of: Dict[Any, List[Doc]] = {}
    for run in plan(settings, [d for d in args.domains.split(",") if d], systems, extra_shots=args.shots is None):
        domain_name, k, seed, system, size = run
        key = run.key
        if key in runs:
            continue
        if args.time_budget and time.time() - began > 60 * args.time_budget:
            print(f"Time budget of {args.time_budget} min used; rerun to continue.", flush=True)
            write_json(args.output, results)
            return
        if domain_name not in domains:
            domains[domain_name] = Domain(args.data, domain_name, settings["test_limit"], vocab)
        domain = domains[domain_name]
        if (domain_name, k, seed) not in shots_of:
            shots_of[(domain_name, k, seed)] = domain.shots(k, seed)
        shots = shots_of[(domain_name, k, seed)]
        print(f"== {key}: {len(shots)} training sentences, {len(domain.test)} test", flush=True)
        release_memory()  # what the previous run freed goes back to the OS before this one
        begin, load, resident = time.time(), load_averages(), resident_bytes()
        if system == "spacy_ner":
            result = run_spacy_ner(shots, domain, settings, seed)
        elif system in ("spacy_llm", "spacy_llm_lora"):
            result = run_spacy_llm(shots, domain, settings, tune=system == "spacy_llm_lora", seed=seed)
        elif system == "spacy_llm_general":
            start, general = general_llm_adapter(args, settings, domain_name, size)
            result = {**run_spacy_llm(shots, domain, settings, tune=True, seed=seed, start=start),
                      "general_adapter": general}
        else:
            model_nlp = cllmfs_nlp(settings, system)
            start, general = None, None
            if system == "cllmfs_transfer":
                source = source or source_adapter(args, settings, model_nlp)
                start = source
            elif system == "cllmfs_general":
                start, general = general_adapter(args, settings, model_nlp, domain_name, size)
            if system == "cllmfs_icl":
                result = untrained_cllmfs(model_nlp, shots, domain.labels)
            else:
                result = train_cllmfs(model_nlp, shots, domain.labels, settings["epochs"], settings, start, seed,
                                      dev=domain.dev[: settings["dev_limit"]])
            result.update(score(model_nlp, domain.test))
            if general is not None:
                result["general_adapter"] = general
        runs[key] = {
            **result, "system": system, "domain": domain_name, "k": k, "seed": seed,
            "train_sentences": len(shots), "test_sentences": len(domain.test),
            "wall_s": time.time() - begin, "model": settings["model"],
            "load_average_at_start": load, "load_average_at_end": load_averages(), "machine": here,
            "resident_gb_at_start": None if resident is None else round(resident / 2**30, 2),
            "process_peak_resident_gb": round(peak_resident_bytes() / 2**30, 2),
            **({} if size is None else {"general_sentences": size}),
        }
        print(f"   ents_f={result['ents_f']:.4f} train {result['train_s']:.0f}s infer "
              f"{result['infer_s']:.0f}s", flush=True)
        results["wall_s"] = results.get("wall_s", 0.0) + runs[key]["wall_s"]
        write_json(args.output, results)
    write_json(args.output, results)
    print(f"Matrix complete: every requested run is in {args.output}.", flush=True)


def summarize(runs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Mean and standard deviation of ents_f over seeds, per system/domain/K (and general
    mix size: `...|n500`)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs.values():
        size = f"|n{run['general_sentences']}" if "general_sentences" in run else ""
        groups.setdefault(f"{run['system']}|{run['domain']}|k{run['k']}{size}", []).append(run)
    summary = {}
    for key, members in groups.items():
        values = [100 * m["ents_f"] for m in members]
        summary[key] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "seeds": len(values),
            "train_s": statistics.mean(m["train_s"] for m in members),
            "infer_s": statistics.mean(m["infer_s"] for m in members),
        }
    return summary



if __name__ == "__main__":
    main()
