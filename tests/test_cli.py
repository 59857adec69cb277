import subprocess
import sys
from pathlib import Path

from spacy.tokens import DocBin
from spacy.vocab import Vocab
from typer.testing import CliRunner

from spacy_cllmfs.cli import app
from spacy_cllmfs.corpora import load_docbin, make_doc
from spacy_cllmfs.labels import annotated_labels
from spacy_cllmfs.sampling import label_counts

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def test_convert(tmp_path):
    output = tmp_path / "out" / "train.spacy"
    result = runner.invoke(app, ["convert", str(FIXTURES / "crossner_sample.txt"), str(output)])
    assert result.exit_code == 0, result.output
    assert "Wrote 12 docs" in result.output
    assert len(load_docbin(output, Vocab())) == 12


def test_convert_format_and_lang(tmp_path):
    output = tmp_path / "io.spacy"
    result = runner.invoke(
        app, ["convert", str(FIXTURES / "io_sample.txt"), str(output), "--format", "io", "--lang", "de"]
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 3 docs" in result.output


def test_convert_reports_alignment_warning(tmp_path):
    result = runner.invoke(app, ["convert", str(FIXTURES / "spacy_sample.jsonl"), str(tmp_path / "x.spacy")])
    assert result.exit_code == 0, result.output
    assert "Wrote 5 docs" in result.output
    assert "Warning:" in result.stderr and "spacy_sample.jsonl:4" in result.stderr


def test_convert_error_exit_code(tmp_path):
    result = runner.invoke(app, ["convert", str(FIXTURES / "malformed_one_column.txt"), str(tmp_path / "x.spacy")])
    assert result.exit_code == 1
    assert "malformed_one_column.txt:6" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "x.spacy").exists()
    args = ["convert", str(FIXTURES / "crossner_sample.txt"), str(tmp_path / "x.spacy"), "-f", "xml"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Unknown format 'xml'" in result.stderr


def test_sample(tmp_path):
    train = tmp_path / "train.spacy"
    assert runner.invoke(app, ["convert", str(FIXTURES / "crossner_sample.txt"), str(train)]).exit_code == 0
    output = tmp_path / "sample" / "k1.spacy"
    args = ["sample", str(train), str(output), "--k", "1", "--seed", "3", "--labels", "politician,location"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    docs = load_docbin(output, Vocab())
    counts = label_counts(docs)
    assert set(counts) == {"politician", "location"}
    assert all(1 <= n <= 2 for n in counts.values())
    assert f"Sampled {len(docs)} of 12 sentences" in result.output
    assert f"politician\t{counts['politician']}" in result.output
    again = tmp_path / "again.spacy"
    args[2] = str(again)
    assert runner.invoke(app, args).exit_code == 0
    assert [d.text for d in load_docbin(again, Vocab())] == [d.text for d in docs]


def test_sample_warns_when_data_runs_out(tmp_path):
    train = tmp_path / "train.spacy"
    vocab = Vocab()
    DocBin(docs=[make_doc(vocab, ["a", "b"], [(0, 1, "X")])]).to_disk(train)
    result = runner.invoke(app, ["sample", str(train), str(tmp_path / "s.spacy"), "--k", "5"])
    assert result.exit_code == 0, result.output
    assert "Sampled 1 of 1 sentences" in result.output
    assert "Warning:" in result.stderr and "'X': 1" in result.stderr


def test_sample_missing_input(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "missing.spacy"), str(tmp_path / "s.spacy")])
    assert result.exit_code == 1
    assert "missing.spacy" in result.stderr and "python -m spacy_cllmfs convert" in result.stderr


def test_python_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "spacy_cllmfs", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout and "sample" in result.stdout


def test_demo_annotates_texts(tiny_model_path):
    from spacy_cllmfs.cli import app

    result = CliRunner().invoke(app, [
        "demo", "--model", str(tiny_model_path), "--device", "cpu", "--labels", "person,location", "--steps", "2",
        "--text", "Barack Obama visited Paris.", "--text", "Nothing here."])
    assert result.exit_code == 0, result.output
    assert "Trained a LoRA adapter on 10 sentences for 2 steps" in result.output
    # (transformers' loading progress bar may precede the first line)
    assert "Barack Obama visited Paris.\n  -> " in result.output
    assert "\nNothing here.\n  -> " in result.output


def test_subset_keeps_the_first_docs(tmp_path):
    vocab = Vocab()
    docs = [make_doc(vocab, [f"w{i}"], [(0, 1, "X")] if i % 2 else []) for i in range(5)]
    DocBin(docs=docs).to_disk(tmp_path / "in.spacy")
    result = CliRunner().invoke(app, ["subset", str(tmp_path / "in.spacy"), str(tmp_path / "out.spacy"), "--n", "3"])
    assert result.exit_code == 0, result.output
    kept = load_docbin(tmp_path / "out.spacy", Vocab())
    assert [d.text for d in kept] == ["w0", "w1", "w2"] and len(kept[1].ents) == 1
    result = CliRunner().invoke(app, ["subset", str(tmp_path / "missing.spacy"), str(tmp_path / "o.spacy"), "--n", "1"])
    assert result.exit_code == 1 and "python -m spacy_cllmfs convert" in result.output


def test_mix_writes_a_general_set_with_label_declarations(tmp_path):
    music = tmp_path / "music.spacy"
    assert runner.invoke(app, ["convert", str(FIXTURES / "music_sample.txt"), str(music)]).exit_code == 0
    output = tmp_path / "general.spacy"
    args = ["mix", str(output), str(FIXTURES / "conll2003_sample.txt"), str(music), "--size", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    mixed = load_docbin(output, Vocab())
    assert "Mixed 6 sentences" in result.output and len(mixed) == 6
    declared = {tuple(annotated_labels(doc)) for doc in mixed}  # kept in the DocBin's user data
    assert tuple(sorted({e.label_ for d in load_docbin(music, Vocab()) for e in d.ents})) in declared
    assert ("LOC", "MISC", "ORG", "PER") in declared
    result = runner.invoke(app, args[:-1] + ["0"])
    assert result.exit_code == 1 and "Fix:" in result.stderr
    result = runner.invoke(app, args + ["--exclude", str(music)])  # the target's data must not leak
    assert result.exit_code == 1 and "leak" in result.stderr and "general_corpora" in result.stderr


def test_demo_shots_are_well_formed():
    import spacy

    from spacy_cllmfs.cli import DEMO_SHOTS, demo_examples

    examples = demo_examples(spacy.blank("en"))
    assert len(examples) == len(DEMO_SHOTS)
    assert [e.text for e in examples[0].reference.ents] == ["Angela Merkel", "Emmanuel Macron", "Berlin"]
    assert examples[5].reference.ents == () and examples[5].reference[0].ent_iob_ == "O"


def test_export_model_writes_a_loadable_folder(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    result = CliRunner().invoke(app, ["export-model", str(tiny_model_path), str(tmp_path / "out"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    for (name, a), (_, b) in zip(original.state_dict().items(), exported.state_dict().items()):
        assert a.shape == b.shape and bool((a == b).all()), name
    assert (tmp_path / "out" / "tokenizer.json").exists()
