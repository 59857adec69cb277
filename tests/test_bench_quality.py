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
        "--set", "llm_max_new_tokens=12",
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
    assert "Commands (one matrix, resumed)" in describe(resumed) and "5 runs" in describe(resumed)
    table = quality_table(results)
    for system in quality.SYSTEMS:
        assert f"| {quality.SYSTEM_NAMES[system]} |" in table
    assert "politics K=1" in table and "GLiNER-L" in table
