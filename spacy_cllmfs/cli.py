"""Command-line interface: `python -m spacy_cllmfs COMMAND`."""
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import typer
from spacy.tokens import DocBin
from spacy.vocab import Vocab

from .corpora import FORMATS, convert as convert_corpus, load_docbin, read_docs
from .labels import check_definition_style
from .mixing import mix_corpora
from .sampling import greedy_k_shot, label_counts

app = typer.Typer(
    name="spacy_cllmfs",
    help="spacy-cllmfs: few-shot NER for spaCy with a LoRA-tuned causal LLM.",
    no_args_is_help=True,
    add_completion=False,
)


@contextmanager
def _report_errors() -> Iterator[None]:
    """Print warnings and data errors as one-line messages; exit 1 on error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (ValueError, FileNotFoundError) as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(code=1)
        finally:
            for warning in caught:
                typer.echo(f"Warning: {warning.message}", err=True)


def save_pipeline(nlp: Any, output_path: Path, suffix: str) -> None:
    """Save `nlp` next to `output_path` first, then swap it in, so that an error never
    leaves half a pipeline (`output_path` may be the folder `nlp` was loaded from)."""
    import shutil

    tmp = output_path.with_name(output_path.name + suffix)
    if tmp.exists():
        shutil.rmtree(tmp)
    nlp.to_disk(tmp)
    if output_path.exists():
        shutil.rmtree(output_path)
    tmp.rename(output_path)


@app.command("convert")
def convert_cli(
    input_path: Path = typer.Argument(..., help="Corpus file (CoNLL/BIO, IO, Few-NERD or spaCy JSONL)."),
    output_path: Path = typer.Argument(..., help="Output .spacy file."),
    fmt: str = typer.Option("auto", "--format", "-f", help=f"One of: {', '.join(FORMATS)}."),
    lang: str = typer.Option("en", "--lang", "-l", help="Language of the blank tokenizer/vocab."),
) -> None:
    """Convert a corpus file into a .spacy DocBin."""
    with _report_errors():
        n_docs = convert_corpus(input_path, output_path, fmt=fmt, lang=lang)
    typer.echo(f"Wrote {n_docs} docs to {output_path}")


@app.command("sample")
def sample_cli(
    input_path: Path = typer.Argument(..., help="Input .spacy file."),
    output_path: Path = typer.Argument(..., help="Output .spacy file with the K-shot sample."),
    k: int = typer.Option(5, "--k", "-k", help="Minimum mentions per label (K~2K sampling)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels (default: all)."),
    strategy: str = typer.Option(
        "greedy", "--strategy", help="greedy (Few-NERD Algorithm 1) or balanced (least-filled label first)."
    ),
) -> None:
    """K~2K-shot sample of a .spacy corpus (Few-NERD Algorithm 1, or its balanced variant)."""
    label_list = [label.strip() for label in labels.split(",") if label.strip()] if labels else None
    with _report_errors():
        docs = load_docbin(input_path, Vocab())
        sample = greedy_k_shot(docs, k, labels=label_list, seed=seed, strategy=strategy)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        DocBin(store_user_data=True, docs=sample).to_disk(output_path)
    typer.echo(f"Sampled {len(sample)} of {len(docs)} sentences (k={k}, seed={seed}) to {output_path}")
    for label, count in label_counts(sample, label_list).items():
        typer.echo(f"  {label}\t{count}")


@app.command("subset")
def subset_cli(
    input_path: Path = typer.Argument(..., help="Input .spacy file."),
    output_path: Path = typer.Argument(..., help="Output .spacy file."),
    n: int = typer.Option(..., "--n", "-n", help="Keep the first N docs (0 keeps all)."),
) -> None:
    """Keep the first N docs of a .spacy file (e.g. to bound evaluation time)."""
    with _report_errors():
        docs = load_docbin(input_path, Vocab())
        kept = docs[:n] if n > 0 else docs
        output_path.parent.mkdir(parents=True, exist_ok=True)
        DocBin(store_user_data=True, docs=kept).to_disk(output_path)
    typer.echo(f"Kept {len(kept)} of {len(docs)} docs in {output_path}")


def _check_excluded(paths: List[Path], exclude: List[Path]) -> None:
    """RAISES (ValueError): If one of `paths` is excluded (the target domain's data)."""
    leaked = sorted(str(p) for p in paths if p.resolve() in {e.resolve() for e in exclude})
    if leaked:
        raise ValueError(
            f"{', '.join(leaked)} is excluded from the mix (the target domain's data would leak "
            "into the general adapter). Fix: remove it from the inputs (the project's general_corpora)."
        )


def _load_llm_pipeline(pipeline: Path, component: str, gpu_id: int) -> Any:
    """An `llm` pipeline from a config file (assembled as spacy-llm does) or a folder."""
    import spacy
    from spacy_llm.util import assemble

    overrides = {f"components.{component}.model.device": f"cuda:{gpu_id}"} if gpu_id >= 0 else {}
    if pipeline.is_file():
        return assemble(pipeline, overrides=overrides)
    return spacy.load(pipeline, config=overrides)


def _load_corpus(path: Path, vocab: Vocab) -> List[Any]:
    """The Docs of a .spacy file or of any file `convert` reads."""
    return load_docbin(path, vocab) if path.suffix == ".spacy" else read_docs(path)


@app.command("mix")
def mix_cli(
    output_path: Path = typer.Argument(..., help="Output .spacy file with the mix."),
    input_paths: List[Path] = typer.Argument(..., help="Corpus files (.spacy or any `convert` format)."),
    size: int = typer.Option(..., "--size", "-n", help="Sentences in the mix."),
    fill: int = typer.Option(0, "--fill", help="Index of the input that fills what the others lack."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    exclude: List[Path] = typer.Option([], "--exclude", help="A file that must not be mixed in (the target's)."),
) -> None:
    """Mix several corpora into a general training set: an equal share per input, each
    Doc declaring its corpus's labels (train on it, then fine-tune on the few shots)."""
    with _report_errors():
        _check_excluded(input_paths, exclude)
        vocab = Vocab()
        corpora = [_load_corpus(path, vocab) for path in input_paths]
        mix = mix_corpora(corpora, size, fill=fill, seed=seed)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        DocBin(store_user_data=True, docs=mix).to_disk(output_path)
    typer.echo(f"Mixed {len(mix)} sentences to {output_path}")
    taken = {id(doc) for doc in mix}
    for path, docs in zip(input_paths, corpora):
        typer.echo(f"  {path}\t{sum(id(doc) in taken for doc in docs)}")


@app.command("calibrate")
def calibrate_cli(
    pipeline: Path = typer.Argument(..., help="A trained pipeline folder (e.g. training/.../model-best)."),
    dev_path: Path = typer.Argument(..., help="Gold .spacy dev set (a few dozen sentences)."),
    output_path: Path = typer.Argument(..., help="Folder for the calibrated pipeline (may be `pipeline`)."),
    component: str = typer.Option("cllmfs_ner", "--component", help="Name of the cllmfs_ner component."),
    gpu_id: int = typer.Option(-1, "--gpu-id", help="CUDA device for the model; -1 keeps the config's device."),
) -> None:
    """Calibrate the open-or-end decision (`open_bias`) of a trained pipeline on a dev set."""
    import spacy

    from .component import CLLMFSNer
    from .loop import as_examples

    with _report_errors():
        overrides = {f"components.{component}.model.device": f"cuda:{gpu_id}"} if gpu_id >= 0 else {}
        nlp = spacy.load(pipeline, config=overrides)
        ner = nlp.get_pipe(component) if component in nlp.pipe_names else None
        if not isinstance(ner, CLLMFSNer):
            raise ValueError(f"'{pipeline}' has no cllmfs_ner component named '{component}' (it has {nlp.pipe_names}).")
        docs = load_docbin(dev_path, nlp.vocab)
        result = ner.calibrate(as_examples(nlp, docs))
        save_pipeline(nlp, output_path, ".calibrating")
    checked = ""
    if result.ents_f_before is not None:
        verdict = "kept" if result.kept else f"not kept: open_bias stays {ner.open_bias:+.3f}"
        checked = f"; dev ents_f {result.ents_f_before:.3f} -> {result.ents_f_after:.3f} ({verdict})"
    typer.echo(
        f"open_bias = {result.open_bias:+.3f} on {result.prompts} dev prompts ({result.positives} with an entity): "
        f"prompt-level F1 {result.f1_before:.3f} -> {result.f1_after:.3f}{checked}. Wrote {output_path}"
    )


@app.command("llm-config")
def llm_config_cli(
    train_path: Path = typer.Argument(..., help="Gold .spacy few-shot set: the labels and the prompt examples."),
    output_dir: Path = typer.Argument(..., help="Folder for llm.cfg and examples.json."),
    model: str = typer.Option("embedded", "--model", "-m", help="Hub name, folder, .gguf file or 'embedded'."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 (fast on CPUs with avx512_bf16)."
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="The most tokens of one answer."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward pass."),
    definitions: str = typer.Option(
        "plain", "--definitions",
        help="How label descriptions are written: plain, or contrasted (told apart from the set's other labels).",
    ),
) -> None:
    """Write a spacy-llm pipeline config (spacy.NER.v3 served by spacy_cllmfs.SpacyLLMModel.v1)
    whose labels and few-shot examples are those of a gold .spacy set."""
    import spacy

    from .spacy_llm import MODEL_NAME, ner_v3_task, write_ner_v3_examples

    with _report_errors():
        check_definition_style(definitions)
        docs = load_docbin(train_path, Vocab())
        labels = sorted(label_counts(docs))
        if not labels:
            raise ValueError(f"{train_path} has no entities, so there are no labels. Fix: pass the gold few-shot set.")
        examples = output_dir / "examples.json"
        n_examples = write_ner_v3_examples(docs, labels, examples)
        nlp = spacy.blank("en")
        nlp.add_pipe("llm", config={
            "task": ner_v3_task(labels, examples, definitions),
            "model": {"@llm_models": MODEL_NAME, "name": model, "device": device, "dtype": dtype,
                      "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        })
        nlp.config.to_disk(output_dir / "llm.cfg")
    typer.echo(f"Wrote {output_dir / 'llm.cfg'} ({len(labels)} labels) and {n_examples} examples to {examples}")


CONTRASTIVE_WEIGHT_OPTION = typer.Option(
    0.0, "--contrastive-weight",
    help="Weight of the boundary contrastive loss (anchor: a label's name in the prompt; positives: the first "
         "and last tokens of its entities in the sentence); 0 turns it off.",
)


@app.command("tune-llm")
def tune_llm_cli(
    pipeline: Path = typer.Argument(..., help="An `llm` pipeline: a config file (.cfg) or a pipeline folder."),
    train_path: Path = typer.Argument(..., help="Gold .spacy training set (the few shots)."),
    output_path: Path = typer.Argument(..., help="Folder for the tuned pipeline (may be `pipeline` if a folder)."),
    dev_path: Optional[Path] = typer.Option(None, "--dev", help="Gold .spacy dev set: keep the best adapter on it."),
    component: str = typer.Option("llm", "--component", help="Name of the spacy-llm component."),
    epochs: int = typer.Option(4, "--epochs", help="Passes over the training set."),
    batch_size: int = typer.Option(2, "--batch-size", help="Sentences per optimizer step."),
    learn_rate: float = typer.Option(3e-4, "--learn-rate", help="Peak learn rate."),
    evaluations: int = typer.Option(2, "--evaluations", help="Dev evaluations during training."),
    examples_shown: Optional[int] = typer.Option(
        None, "--examples-shown", help="Few-shot examples in each training prompt, a random subset (default: all)."
    ),
    prompt_gradients: bool = typer.Option(
        True, "--prompt-gradients/--no-prompt-gradients",
        help="Train through the whole prompt; --no-prompt-gradients only through the sentence and answer (faster).",
    ),
    shared_step_examples: bool = typer.Option(
        False, "--shared-step-examples/--own-examples",
        help="Ask a step's sentences with the same examples (none of theirs), one shared prompt per step: with "
             "--no-prompt-gradients, about batch-size times less prompt to compute.",
    ),
    contrastive_weight: float = CONTRASTIVE_WEIGHT_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed for the order of sentences and examples."),
    gpu_id: int = typer.Option(-1, "--gpu-id", help="CUDA device for the model; -1 keeps the config's device."),
) -> None:
    """Tune the LoRA adapter of a spacy-llm `llm` component (served by
    spacy_cllmfs.SpacyLLMModel.v1) on its task's own prompts, then save the pipeline.
    A pipeline saved by `tune-llm-general` is tuned further from its general adapter."""
    from .llm_tuning import TuningSettings, tune_llm
    from .loop import as_examples
    from .spacy_llm import embed_in_pipeline

    with _report_errors():
        nlp = _load_llm_pipeline(pipeline, component, gpu_id)
        settings = TuningSettings(
            epochs=epochs, batch_size=batch_size, learn_rate=learn_rate, examples_shown=examples_shown,
            prompt_gradients=prompt_gradients, shared_step_examples=shared_step_examples,
            micro_batch_size=batch_size if shared_step_examples else 1, contrastive_weight=contrastive_weight,
            seed=seed,
        )
        train = as_examples(nlp, load_docbin(train_path, nlp.vocab))
        dev = as_examples(nlp, load_docbin(dev_path, nlp.vocab)) if dev_path is not None else []
        report = tune_llm(nlp, train, component=component, settings=settings, dev=dev, evaluations=evaluations)
        embed_in_pipeline(nlp, component)  # the saved pipeline loads without the examples file
        save_pipeline(nlp, output_path, ".tuning")
    dev_note = ""
    if report.dev_scores:
        scores = ", ".join(f"{step}: {value:.3f}" for step, value in sorted(report.dev_scores.items()))
        dev_note = f"; dev ents_f by step {{{scores}}}, kept step {report.best_step}"
    through = "the whole prompt" if prompt_gradients else "the sentence and answer only"
    shown = "; one set of examples per step" if shared_step_examples else ""
    shown += f"; contrastive weight {contrastive_weight:g}" if contrastive_weight > 0 else ""
    typer.echo(
        f"Tuned {len(report.losses)} steps on {len(train)} sentences (gradients through {through}{shown}): "
        f"loss {report.losses[0]:.3f} -> "
        f"{report.losses[-1]:.3f}{dev_note}. Wrote {output_path}"
    )


@app.command("tune-llm-general")
def tune_llm_general_cli(
    pipeline: Path = typer.Argument(..., help="An `llm` pipeline: a config file (.cfg) or a pipeline folder."),
    output_path: Path = typer.Argument(..., help="Folder for the pipeline with its general adapter."),
    corpora: List[Path] = typer.Argument(..., help="Gold corpora of other labels (.spacy or any `convert` format)."),
    size: int = typer.Option(250, "--size", "-n", help="Sentences of the mix, an equal share per corpus."),
    shots: int = typer.Option(5, "--shots", help="K of each corpus's few-shot examples."),
    exclude: List[Path] = typer.Option([], "--exclude", help="A file that must not be mixed in (the target's)."),
    component: str = typer.Option("llm", "--component", help="Name of the spacy-llm component."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the mix."),
    batch_size: int = typer.Option(2, "--batch-size", help="Sentences per optimizer step."),
    learn_rate: float = typer.Option(3e-4, "--learn-rate", help="Peak learn rate."),
    examples_shown: int = typer.Option(2, "--examples-shown", help="Few-shot examples in each training prompt."),
    prompt_gradients: bool = typer.Option(
        True, "--prompt-gradients/--no-prompt-gradients", help="Train through the whole prompt (see tune-llm)."
    ),
    contrastive_weight: float = CONTRASTIVE_WEIGHT_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of the mix, the shots and the order."),
    gpu_id: int = typer.Option(-1, "--gpu-id", help="CUDA device for the model; -1 keeps the config's device."),
    definitions: str = typer.Option(
        "plain", "--definitions", help="How the mix's label descriptions are written: as the pipeline's (llm-config)."
    ),
) -> None:
    """Tune the LoRA adapter of a spacy-llm `llm` component on a general NER mix of other
    corpora (each sentence asked by a spacy.NER.v3 task of its own corpus's labels and
    examples), then save the pipeline: `tune-llm` on the shots continues from it."""
    from .llm_tuning import GeneralMix, TuningSettings, llm_model_of, tune_llm_general
    from .spacy_llm import embed_in_pipeline

    with _report_errors():
        check_definition_style(definitions)
        _check_excluded(corpora, exclude)
        nlp = _load_llm_pipeline(pipeline, component, gpu_id)
        settings = TuningSettings(epochs=epochs, batch_size=batch_size, learn_rate=learn_rate,
                                  examples_shown=examples_shown, prompt_gradients=prompt_gradients,
                                  contrastive_weight=contrastive_weight, seed=seed)
        docs = {str(path): _load_corpus(path, nlp.vocab) for path in corpora}
        report = tune_llm_general(llm_model_of(nlp, component)[1], docs, mix=GeneralMix(size, shots, seed),
                                  settings=settings, definitions=definitions)
        embed_in_pipeline(nlp, component)
        save_pipeline(nlp, output_path, ".tuning")
    taken = ", ".join(f"{path} {n}" for path, n in report.sources.items())
    taken += f"; contrastive weight {contrastive_weight:g}" if contrastive_weight > 0 else ""
    typer.echo(
        f"Tuned the general adapter {len(report.losses)} steps on {sum(report.sources.values())} sentences "
        f"({taken}): loss {report.losses[0]:.3f} -> {report.losses[-1]:.3f}. Wrote {output_path}; "
        f"continue with `tune-llm {output_path} TRAIN.spacy OUTPUT`"
    )


@app.command("export-model")
def export_model_cli(
    model: str = typer.Argument(..., help="Hub name, folder, .gguf file or 'embedded'."),
    output_path: Path = typer.Argument(..., help="Folder for the safetensors model and tokenizer."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16..."),
    device: str = typer.Option("cpu", "--device", help="Where to load the model while exporting."),
) -> None:
    """Save a (e.g. GGUF, dequantized) base model as a Hugging Face folder that loads fast."""
    from .models import HFCausalLM, export_model

    with _report_errors():
        path = export_model(HFCausalLM(model, device=device, dtype=dtype), output_path)
    typer.echo(f"Wrote {path}: use it as `[components.cllmfs_ner.model] name = \"{path}\"`")


@app.command("episodes")
def episodes_cli(
    input_path: Path = typer.Argument(..., help="Few-NERD episode JSONL, or a .spacy file converted from one."),
    output_path: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the scores as JSON here."),
    model: str = typer.Option("embedded", "--model", "-m", help="Hub name, folder, .gguf file or 'embedded'."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder each episode starts from."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    steps: int = typer.Option(20, "--steps", help="Training steps per episode."),
    batch_size: int = typer.Option(4, "--batch-size", help="Support sentences per step."),
    learn_rate: float = typer.Option(3e-4, "--learn-rate", help="Peak learn rate."),
    limit: int = typer.Option(0, "--limit", help="Evaluate only the first N episodes (0: all)."),
) -> None:
    """Few-NERD episode evaluation: adapt on each support set, score its query set (micro-F1)."""
    import spacy
    import srsly

    from .adapters import AdapterState
    from .corpora import episodes_from_docs, read_fewnerd_episodes
    from .episodes import evaluate_episodes

    with _report_errors():
        nlp = spacy.blank("en")
        if input_path.suffix == ".spacy":
            episodes = episodes_from_docs(load_docbin(input_path, nlp.vocab))
        else:
            episodes = read_fewnerd_episodes(input_path, nlp.vocab)
        episodes = episodes[:limit] if limit > 0 else episodes
        nlp.add_pipe("cllmfs_ner", config={
            "model": {"@misc": "spacy_cllmfs.HFCausalLM.v1", "name": model, "device": device}})
        start = AdapterState.from_disk(adapter) if adapter else None
        scores = evaluate_episodes(
            nlp, episodes, steps=steps, batch_size=batch_size, learn_rate=learn_rate, start_adapter=start
        )
    typer.echo(f"{scores['episodes']} episodes: P {scores['precision']:.4f} R {scores['recall']:.4f} F {scores['f']:.4f}")
    if output_path is not None:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        srsly.write_json(output_path, scores)


@app.command("annotate")
def annotate_cli(
    pipeline: str = typer.Argument(..., help="Pipeline folder or package, e.g. training/model-best."),
    input_path: Path = typer.Argument(
        ..., help="JSONL ({\"text\": ..., \"meta\": ...}), text (one doc per line) or .spacy."
    ),
    output_path: Path = typer.Argument(..., help="Folder for the shards, manifest.jsonl and errors.jsonl."),
    input_format: str = typer.Option(
        "auto", "--input-format", "-f", help="auto (from the suffix), jsonl, text or spacy."
    ),
    output_format: str = typer.Option(
        "spacy", "--output-format", "-o", help="spacy (DocBin shards) or jsonl (ents as character offsets)."
    ),
    shard_size: int = typer.Option(
        1000, "--shard-size", help="Input lines per shard: the unit of output and of resuming."
    ),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Docs per nlp.pipe batch."),
    workers: int = typer.Option(1, "--workers", "-w", help="CPU worker processes (the cores are split among them)."),
    devices: Optional[str] = typer.Option(None, "--devices", "-d", help="One worker per device, e.g. cuda:0,cuda:1."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="torch threads per worker (default: cores / workers)."
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", help="Run on a Ray cluster: auto, ray://HOST:10001, or local (start one here)."
    ),
    ray_actors: int = typer.Option(2, "--ray-actors", help="Ray actors, each holding the pipeline."),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus-per-actor", help="GPUs per Ray actor (0: CPU actors)."),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus-per-actor", help="CPU cores per Ray actor."),
    max_chars: int = typer.Option(1_000_000, "--max-chars", help="Longer texts go to the errors file."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete an earlier run's output in the folder first."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (docs/s, ETA)."),
) -> None:
    """Annotate a corpus into shards; run the same command again to resume a killed run."""
    from .annotate import annotate, quiet_loading
    from .annotate_ray import annotate_ray

    quiet_loading()  # no weight-loading bar through the progress bar
    shared: Dict[str, Any] = dict(
        input_format=input_format, output_format=output_format, shard_size=shard_size, batch_size=batch_size,
        max_chars=max_chars, overwrite=overwrite, progress=progress,
    )
    with _report_errors():
        if ray_address is not None:
            address = None if ray_address == "local" else ray_address
            summary = annotate_ray(
                pipeline, input_path, output_path, address=address, actors=ray_actors,
                gpus_per_actor=ray_gpus, cpus_per_actor=ray_cpus, **shared,
            )
        else:
            summary = annotate(
                pipeline, input_path, output_path, workers=workers, devices=devices, threads=threads, **shared
            )
    typer.echo(
        f"{summary.docs} docs in {summary.shards} shards in {output_path} ({summary.shards_written} written now, "
        f"{summary.shards_before} before) in {summary.seconds:.1f}s; {summary.errors} unreadable lines"
        + (f" listed in {output_path / 'errors.jsonl'}" if summary.errors else "")
    )


DEMO_TEXTS = [
    "Barack Obama visited Paris with Angela Merkel in 2009.",
    "The Labour Party won the 1997 general election in the United Kingdom.",
    "Marie Curie worked at the University of Paris.",
    "Nothing to see here.",
]
# A few labelled sentences (entities marked [text|label]) for the demo's few-shot training.
DEMO_SHOTS = [
    "[Angela Merkel|person] met [Emmanuel Macron|person] in [Berlin|location] on Monday .",
    "[Microsoft|organisation] opened a new office in [Dublin|location] .",
    "[Nelson Mandela|person] was born in [Mvezo|location] , [South Africa|location] .",
    "The [United Nations|organisation] sent [Kofi Annan|person] to [Geneva|location] .",
    "[Toyota|organisation] sells more cars than [Ford|organisation] in [Japan|location] .",
    "The weather was cold and wet all week .",
    "[Albert Einstein|person] taught at [Princeton University|organisation] .",
    "[Rome|location] and [Madrid|location] are capitals .",
    "[Greenpeace|organisation] protested outside the [BBC|organisation] offices in [London|location] .",
    "[Serena Williams|person] won again in [New York|location] .",
]


def demo_examples(nlp: Any) -> List[Any]:
    """The DEMO_SHOTS as gold Examples."""
    import re

    from spacy.tokens import Doc, Span
    from spacy.training import Example

    examples = []
    for line in DEMO_SHOTS:
        words: List[str] = []
        spans = []
        for match in re.finditer(r"\[([^|\]]+)\|([^\]]+)\]|(\S+)", line):
            if match.group(3):
                words.append(match.group(3))
                continue
            start = len(words)
            words.extend(match.group(1).split())
            spans.append((start, len(words), match.group(2)))
        doc = Doc(nlp.vocab, words=words)
        doc.set_ents([Span(doc, s, e, label=label) for s, e, label in spans], default="outside")
        examples.append(Example(Doc(nlp.vocab, words=words), doc))
    return examples


@app.command("demo")
def demo_cli(
    model: str = typer.Option("embedded", "--model", "-m", help="Hub name, folder, .gguf file or 'embedded'."),
    labels: str = typer.Option("person,location,organisation", "--labels", help="Comma-separated labels."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="Text to annotate (repeatable)."),
    steps: int = typer.Option(
        40, "--steps", help="Few-shot training steps on 10 built-in sentences first (0: annotate zero-shot)."
    ),
) -> None:
    """Few-shot train on 10 built-in sentences, then annotate texts with `nlp.pipe`."""
    import time

    import spacy

    from .loop import fit

    label_list = [label.strip() for label in labels.split(",") if label.strip()]
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "cllmfs_ner",
        config={
            "labels": label_list,
            "model": {"@misc": "spacy_cllmfs.HFCausalLM.v1", "name": model, "device": device},
        },
    )
    if steps > 0:
        examples = demo_examples(nlp)
        nlp.initialize(lambda: examples)
        begin = time.time()
        history = fit(nlp, examples, steps=steps, batch_size=2, learn_rate=1e-3, warmup_steps=2, progress=True)
        typer.echo(
            f"Trained a LoRA adapter on {len(examples)} sentences for {steps} steps in {time.time() - begin:.0f}s "
            f"(loss {history[0]:.2f} -> {history[-1]:.2f}).\n"
        )
    for doc in nlp.pipe(text or DEMO_TEXTS):
        found = ", ".join(f"{ent.text} ({ent.label_})" for ent in doc.ents) or "-"
        typer.echo(f"{doc.text}\n  -> {found}")
