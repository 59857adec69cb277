"""Command-line interface: `python -m spacy_cllmfs COMMAND`."""
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from spacy.tokens import DocBin
from spacy.vocab import Vocab

from .corpora import FORMATS, convert as convert_corpus, load_docbin
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
) -> None:
    """Greedy K~2K-shot sample of a .spacy corpus (Few-NERD Algorithm 1)."""
    label_list = [label.strip() for label in labels.split(",") if label.strip()] if labels else None
    with _report_errors():
        docs = load_docbin(input_path, Vocab())
        sample = greedy_k_shot(docs, k, labels=label_list, seed=seed)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        DocBin(store_user_data=True, docs=sample).to_disk(output_path)
    typer.echo(f"Sampled {len(sample)} of {len(docs)} sentences (k={k}, seed={seed}) to {output_path}")
    for label, count in label_counts(sample, label_list).items():
        typer.echo(f"  {label}\t{count}")


DEMO_TEXTS = [
    "Barack Obama visited Paris with Angela Merkel in 2009.",
    "The Labour Party won the 1997 general election in the United Kingdom.",
    "Marie Curie worked at the University of Paris.",
    "Nothing to see here.",
]


@app.command("demo")
def demo_cli(
    model: str = typer.Option("embedded", "--model", "-m", help="Hub name, folder, .gguf file or 'embedded'."),
    labels: str = typer.Option("person,location,organisation", "--labels", help="Comma-separated labels."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="Text to annotate (repeatable)."),
) -> None:
    """Annotate a few texts with `nlp.pipe` and print the entities."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe(
        "cllmfs_ner",
        config={
            "labels": [label.strip() for label in labels.split(",") if label.strip()],
            "model": {"@misc": "spacy_cllmfs.HFCausalLM.v1", "name": model, "device": device},
        },
    )
    for doc in nlp.pipe(text or DEMO_TEXTS):
        found = ", ".join(f"{ent.text} ({ent.label_})" for ent in doc.ents) or "-"
        typer.echo(f"{doc.text}\n  -> {found}")
