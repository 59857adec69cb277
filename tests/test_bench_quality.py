"""A reduced run of bench/quality.py (all five systems) on a tiny model and fixture data."""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402
from bench.table import describe, quality_table  # noqa: E402


def test_quality_matrix_smoke_and_resume(tmp_path, tiny_model_path, capsys):
    for domain in ("politics", "conll2003"):
        (tmp_path / "data" / domain).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            shutil.copy(ROOT / "tests" / "fixtures" / "crossner_sample.txt", tmp_path / "data" / domain / f"{split}.txt")
    output = tmp_path / "quality.json"
    argv = [
        "--data", str(tmp_path / "data"), "--profile", "cpu-smoke", "--model", str(tiny_model_path),
        "--device", "cpu", "--domains", "politics", "--shots", "1", "--test-limit", "3", "--epochs", "1",
        "--output", str(output), "--work", str(tmp_path / "work"),
        "--set", "source_limit=4", "--set", "spacy_ner_steps=4", "--set", "max_new_tokens=12",
        "--set", "llm_max_new_tokens=12", "--set", "dev_limit=3",
    ]
    quality.main(argv + ["--time-budget", "1e-9"])  # the budget is spent before the first run
    assert "Time budget" in capsys.readouterr().out and not json.loads(output.read_text())["runs"]
    quality.main(argv)
    assert "Matrix complete" in capsys.readouterr().out
    results = json.loads(output.read_text())
    assert set(results["runs"]) == {f"{s}|politics|k1|s0" for s in quality.SYSTEMS}
    for run in results["runs"].values():
        assert 0.0 <= run["ents_f"] <= 1.0 and run["infer_s"] > 0 and run["train_sentences"] > 0
    assert results["settings"]["model"] == str(tiny_model_path) and results["machine"]["cpus"]
    assert list((tmp_path / "work").glob("source-*/adapter_config.json"))
    quality.main(argv)  # everything is done already: nothing runs again
    assert json.loads(output.read_text())["runs"] == results["runs"]
    quality.main(argv + ["--systems", "spacy_ner"])  # a resume with other arguments is recorded too
    resumed = json.loads(output.read_text())
    assert resumed["runs"] == results["runs"] and len(resumed["commands"]) == 3
    assert "Commands (one matrix, resumed)" in describe(resumed) and f"{len(quality.SYSTEMS)} runs" in describe(resumed)
    cllmfs = results["runs"]["cllmfs|politics|k1|s0"]
    assert cllmfs["dev_sentences"] == 3 and cllmfs["best_step"] in (1, 2) and len(cllmfs["dev_scores"]) <= 2
    assert set(cllmfs["calibration"]) >= {"open_bias", "f1_before", "f1_after"}
    try:  # continuing the file with other settings would mix two matrices
        quality.main(argv + ["--set", "negatives_per_positive=2.0"])
        raise AssertionError("a results file of other settings was continued")
    except SystemExit:
        pass
    assert "negatives_per_positive" in capsys.readouterr().err
    table = quality_table(results)
    for system in quality.SYSTEMS:
        assert f"| {quality.SYSTEM_NAMES[system]} |" in table
    assert "politics K=1" in table and "GLiNER-L" in table


def test_runs_are_planned_most_important_first():
    settings = {"shots": [5, 20], "seeds": [0], "extra_seeds": {"politics": [1]}, "extra_shots": {}}
    runs = quality.plan(settings, ["politics", "science"], ["cllmfs", "spacy_ner"])
    assert runs[:4] == [("politics", 5, 0, "cllmfs"), ("politics", 5, 0, "spacy_ner"),
                        ("science", 5, 0, "cllmfs"), ("science", 5, 0, "spacy_ner")]
    assert len(runs) == len(set(runs)) == 2 * (2 * 2 + 2)  # politics: 2 K x 2 seeds, science: 2 K x 1 seed
    assert runs[4][:3] == ("politics", 5, 1)
