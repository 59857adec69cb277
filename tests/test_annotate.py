"""`annotate`: streaming a corpus into shards, resuming a killed run, worker processes."""
import json
import signal
import subprocess
import sys
import time

import pytest
import spacy
import srsly
from spacy.language import Language
from spacy.tokens import DocBin
from typer.testing import CliRunner

from conftest import randomize_adapter
from spacy_cllmfs.annotate import (
    ERRORS,
    MANIFEST,
    AnnotateError,
    ShardSpec,
    annotate,
    iter_docs,
    iter_records,
    read_manifest,
    scan,
)
from spacy_cllmfs.annotate_ray import EntityAnnotator
from spacy_cllmfs.cli import app

WORDS = "Barack Obama visited Paris with Angela Merkel in 2009 , the Labour Party won in the United Kingdom".split()
BAD_LINES = {  # line number -> (raw line, words expected in the reason)
    4: (b"{not json", "not valid JSON"),
    9: (b'{"meta": {"id": 9}}', '"text" field'),
    13: (b'["a list"]', "not an object"),
    17: (b'{"text": "caf\xe9 latin-1"}', "not valid UTF-8"),
    21: (json.dumps({"text": "x" * 300}).encode(), "--max-chars"),
}
MAX_CHARS = 200


def make_texts(n, seed=0):
    import random

    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        if i % 7 == 3:
            words.insert(1, "Zürich ☃")  # non-ASCII
        texts.append(" ".join(words))
    return texts


def write_jsonl(path, n, seed=0):
    """A JSONL corpus of n lines: texts with meta, one blank line and BAD_LINES."""
    expected = {}
    texts = iter(make_texts(n, seed))
    with path.open("wb") as file:
        for line in range(1, n + 1):
            if line in BAD_LINES:
                file.write(BAD_LINES[line][0] + b"\n")
            elif line == 6:
                file.write(b"   \n")  # blank: skipped, neither a doc nor an error
            else:
                text = next(texts)
                expected[line] = text
                file.write(json.dumps({"text": text, "meta": {"id": line}}, ensure_ascii=False).encode() + b"\n")
    return expected


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one thread, as in the workers


@pytest.fixture(scope="module")
def pipeline_path(tiny_model_config, tmp_path_factory):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": ["person", "location"],
                                       "max_new_tokens": 12})
    randomize_adapter(nlp.get_pipe("cllmfs_ner"), seed=3, scale=0.2)
    path = tmp_path_factory.mktemp("annotate") / "pipeline"
    nlp.to_disk(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    return path, write_jsonl(path, 40)


@pytest.fixture(scope="module")
def expected_ents(pipeline_path, corpus):
    """The entities of a plain nlp.pipe loop over the readable lines."""
    nlp = spacy.load(pipeline_path)
    texts = corpus[1]
    docs = nlp.pipe(texts.values(), batch_size=4)
    return {line: [(e.start_char, e.end_char, e.label_) for e in doc.ents] for line, doc in zip(texts, docs)}


@pytest.fixture(scope="module")
def reference(pipeline_path, corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "out"
    annotate(str(pipeline_path), corpus[0], output, shard_size=6, batch_size=4, threads=1,
             max_chars=MAX_CHARS, progress=False)
    return list(iter_records(output))


def ents_of(records):
    return {r["line"]: [(e["start"], e["end"], e["label"]) for e in r["ents"]] for r in records}


def test_annotate_matches_nlp_pipe(pipeline_path, corpus, reference, expected_ents, tmp_path):
    path, texts = corpus
    assert [r["line"] for r in reference] == sorted(texts)  # order kept, nothing lost
    assert [r["text"] for r in reference] == list(texts.values())
    assert all(r["meta"] == {"id": r["line"]} for r in reference)
    assert ents_of(reference) == expected_ents
    assert any(expected_ents.values())  # the comparison is not between empty lists
    output = reference_folder = tmp_path / "again"
    summary = annotate(str(pipeline_path), path, output, shard_size=6, batch_size=4, threads=1,
                       max_chars=MAX_CHARS, progress=False)
    assert (summary.shards, summary.shards_written, summary.docs, summary.errors) == (7, 7, len(texts), 5)
    errors = list(srsly.read_jsonl(reference_folder / ERRORS))
    assert [e["line"] for e in errors] == sorted(BAD_LINES)
    for error in errors:
        assert BAD_LINES[error["line"]][1] in error["reason"], error


def test_shards_hold_docs_with_line_and_meta(pipeline_path, corpus, reference, tmp_path):
    output = tmp_path / "out"
    annotate(str(pipeline_path), corpus[0], output, shard_size=6, batch_size=4, threads=1,
             max_chars=MAX_CHARS, progress=False)
    assert sorted(p.name for p in output.glob("shard-*")) == [f"shard-{i:06d}.spacy" for i in range(7)]
    docs = list(iter_docs(output))
    assert [d.user_data["line"] for d in docs] == [r["line"] for r in reference]
    assert docs[0].user_data["meta"] == {"id": docs[0].user_data["line"]}
    for doc, record in zip(docs, reference):
        assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == [
            (e["start"], e["end"], e["label"]) for e in record["ents"]]
    assert not list(output.glob(".*.tmp"))


def test_text_and_spacy_inputs_and_jsonl_output(pipeline_path, corpus, expected_ents, tmp_path):
    texts = corpus[1]
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(texts.get(line, "") for line in range(1, 41)) + "\n", encoding="utf8")
    annotate(str(pipeline_path), text_file, tmp_path / "from-text", output_format="jsonl", shard_size=6,
             batch_size=4, threads=1, progress=False)
    records = list(iter_records(tmp_path / "from-text"))
    assert ents_of(records) == expected_ents  # blank lines are skipped, line numbers kept
    shard = (tmp_path / "from-text" / "shard-000000.jsonl").read_text(encoding="utf8").splitlines()
    assert set(json.loads(shard[0])) == {"line", "text", "ents"}

    nlp = spacy.blank("en")
    docs = []
    for text in texts.values():
        doc = nlp.make_doc(text)
        doc.user_data["meta"] = {"text_length": len(text)}
        docs.append(doc)
    spacy_file = tmp_path / "corpus.spacy"
    DocBin(store_user_data=True, docs=docs).to_disk(spacy_file)
    annotate(str(pipeline_path), spacy_file, tmp_path / "from-spacy", shard_size=6, batch_size=4,
             threads=1, progress=False)
    records = list(iter_records(tmp_path / "from-spacy"))
    assert [r["line"] for r in records] == list(range(1, len(texts) + 1))  # .spacy: the doc's position
    assert [r["meta"]["text_length"] for r in records] == [len(t) for t in texts.values()]
    assert list(ents_of(records).values()) == list(expected_ents.values())


def test_two_worker_processes_give_the_same_output(pipeline_path, corpus, reference, tmp_path):
    output = tmp_path / "out"
    summary = annotate(str(pipeline_path), corpus[0], output, shard_size=6, batch_size=4, workers=2,
                       threads=1, max_chars=MAX_CHARS, progress=False)
    assert summary.shards == 7 and summary.errors == len(BAD_LINES)
    assert list(iter_records(output)) == reference
    _, finished = read_manifest(output / MANIFEST)
    assert sorted(finished) == list(range(7))


def run_cli(pipeline_path, corpus_path, output):
    return [sys.executable, "-m", "spacy_cllmfs", "annotate", str(pipeline_path), str(corpus_path), str(output),
            "--shard-size", "1", "--threads", "1", "--max-chars", str(MAX_CHARS), "--no-progress"]


def manifest_entries(output):
    path = output / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[1:-1]]


def test_killed_run_resumes_without_loss_or_duplicates(pipeline_path, corpus, reference, tmp_path):
    corpus_path, texts = corpus
    output = tmp_path / "out"
    command = run_cli(pipeline_path, corpus_path, output)  # one line per shard: 40 shards
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: on a busy 2-core machine the first shard can take minutes
    while not manifest_entries(output) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = manifest_entries(output)
    assert 0 < len(before) < 40, "the run was not killed midway"
    # what a kill can leave behind: a half-written shard and a half-written manifest line
    (output / ".shard-000039.spacy.99.tmp").write_bytes(b"partial")
    with (output / MANIFEST).open("ab") as file:
        file.write(b'{"shard": 39, "file": "shard-0000')
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{40 - len(before)} written now, {len(before)} before" in result.stdout
    entries = manifest_entries(output)
    assert sorted(e["shard"] for e in entries) == list(range(40))  # each shard committed once
    assert entries[: len(before)] == before  # finished shards were not redone
    assert not list(output.glob(".*.tmp"))
    assert list(iter_records(output)) == reference  # nothing lost or repeated, in input order
    assert [e["line"] for e in srsly.read_jsonl(output / ERRORS)] == sorted(BAD_LINES)
    again = annotate(str(pipeline_path), corpus_path, output, shard_size=1, progress=False)
    assert (again.shards_written, again.shards_before, again.docs) == (0, 40, len(texts))


@Language.component("test_fail_on_boom")
def fail_on_boom(doc):
    if "BOOM" in doc.text:
        raise ValueError("this component cannot take a BOOM")
    return doc


def test_a_doc_that_breaks_the_pipeline_goes_to_the_errors_file(pipeline_path, tmp_path):
    nlp = spacy.load(pipeline_path)
    nlp.add_pipe("test_fail_on_boom")
    nlp.to_disk(tmp_path / "pipeline")
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text("Barack Obama visited Paris\nBOOM went Paris\nAngela Merkel won\n")
    summary = annotate(str(tmp_path / "pipeline"), corpus_path, tmp_path / "out", shard_size=10,
                       threads=1, progress=False)
    assert summary.docs == 2 and summary.errors == 1
    assert [r["line"] for r in iter_records(tmp_path / "out")] == [1, 3]
    (error,) = srsly.read_jsonl(tmp_path / "out" / ERRORS)
    assert error["line"] == 2 and "pipeline failed on this doc: ValueError: this component cannot" in error["reason"]
    corpus_path.write_text("BOOM\nBOOM BOOM\n")  # a pipeline that fails on every doc stops the run
    with pytest.raises(AnnotateError, match="failed on every doc of shard 0 .*Fix the pipeline"):
        annotate(str(tmp_path / "pipeline"), corpus_path, tmp_path / "out2", threads=1, progress=False)


def test_settings_are_checked(pipeline_path, corpus, tmp_path):
    path = corpus[0]
    output = tmp_path / "out"
    annotate(str(pipeline_path), path, output, shard_size=20, threads=1, max_chars=MAX_CHARS, progress=False)
    with pytest.raises(AnnotateError, match="another run .*shard_size.*--overwrite"):
        annotate(str(pipeline_path), path, output, shard_size=10, threads=1, progress=False)
    summary = annotate(str(pipeline_path), path, output, shard_size=10, threads=1, overwrite=True, progress=False)
    assert summary.shards == 4 and len(list(output.glob("shard-*"))) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnnotateError, match="not empty"):
        annotate(str(pipeline_path), path, tmp_path / "other", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        annotate(str(pipeline_path), tmp_path / "missing.jsonl", tmp_path / "x", progress=False)
    with pytest.raises(AnnotateError, match="not found"):
        annotate(str(tmp_path / "no-pipeline"), path, tmp_path / "x", progress=False)
    with pytest.raises(AnnotateError, match="Unknown output format"):
        annotate(str(pipeline_path), path, tmp_path / "x", output_format="csv", progress=False)
    with pytest.raises(AnnotateError, match="--workers"):
        annotate(str(pipeline_path), path, tmp_path / "x", workers=0, progress=False)
    with pytest.raises(ValueError, match="device"):
        annotate(str(pipeline_path), path, tmp_path / "x", devices="cuda:7,tpu", progress=False)
    with pytest.raises(AnnotateError, match="--workers and --devices"):
        annotate(str(pipeline_path), path, tmp_path / "x", devices="cpu", workers=2, progress=False)


def test_manifest_lines_cut_by_a_kill_are_dropped(tmp_path):
    path = tmp_path / MANIFEST
    header = json.dumps({"manifest": 1, "shard_size": 2})
    entry = json.dumps({"shard": 0, "file": "shard-000000.spacy", "first_line": 1, "lines": 2, "docs": 2,
                        "errors": [[2, "bad"]]})
    path.write_text(f"{header}\n{entry}\n{entry[:20]}")
    settings, finished = read_manifest(path, repair=True)
    assert settings == {"shard_size": 2} and list(finished) == [0]
    assert finished[0].errors == [(2, "bad")]
    assert path.read_text() == f"{header}\n{entry}\n"
    path.write_text(f"{header}\n{entry[:20]}\n{entry}\n")
    with pytest.raises(AnnotateError, match=f"{MANIFEST}:2 is not a valid manifest line"):
        read_manifest(path)


def test_scan_splits_on_lines_not_bytes(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("a\n\nб\r\nc\nd".encode())  # no newline at the end
    specs = list(scan(path, "text", 2))
    assert [(s.first_line, s.n_lines, s.n_docs) for s in specs] == [(1, 2, 1), (3, 2, 2), (5, 1, 1)]
    assert specs[-1].end == path.stat().st_size
    with pytest.raises(AnnotateError, match="shard size"):
        list(scan(path, "text", 0))


def test_shard_specs_travel_as_json(tmp_path):
    nlp = spacy.blank("en")
    payload = DocBin(docs=[nlp("a b"), nlp("c")]).to_bytes()
    spec = ShardSpec(3, 7, 2, 2, 6, 8, payload=payload)
    assert ShardSpec.from_json(spec.to_json()) == spec
    assert ShardSpec.from_json(ShardSpec(0, 1, 5, 4, 0, 120).to_json()).payload is None


def test_entity_annotator_for_ray_datasets(pipeline_path, corpus, expected_ents):
    annotator = EntityAnnotator(str(pipeline_path), device="cpu", batch_size=4)
    texts = list(corpus[1].values())[:6]
    batch = annotator({"text": texts, "id": list(range(6))})
    assert batch["id"] == list(range(6))
    expected = list(expected_ents.values())[:6]
    assert [[(e["start"], e["end"], e["label"]) for e in ents] for ents in batch["ents"]] == expected


runner = CliRunner()


def test_cli(pipeline_path, corpus, tmp_path):
    output = tmp_path / "out"
    args = ["annotate", str(pipeline_path), str(corpus[0]), str(output), "--output-format", "jsonl",
            "--shard-size", "10", "--threads", "1", "--max-chars", str(MAX_CHARS), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{len(corpus[1])} docs in 4 shards" in result.stdout and "5 unreadable lines" in result.stdout
    result = runner.invoke(app, ["annotate", str(tmp_path / "nothing"), str(corpus[0]), str(tmp_path / "o")])
    assert result.exit_code == 1 and "Fix:" in result.stderr
