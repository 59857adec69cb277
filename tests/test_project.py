"""The spaCy project workflow, end to end, on a tiny model and fixture data."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture
def project_dir(tmp_path):
    shutil.copy(ROOT / "project.yml", tmp_path / "project.yml")
    shutil.copytree(ROOT / "project", tmp_path / "project")
    data = tmp_path / "data" / "mini"
    data.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        shutil.copy(ROOT / "tests" / "fixtures" / "crossner_sample.txt", data / f"{split}.txt")
    return tmp_path


def run_project(project_dir, tiny_model_path, *args, **overrides):
    variables = {
        "crossner_dir": str(project_dir / "data"), "domain": "mini", "base_model": str(tiny_model_path),
        "shots": 1, "epochs": 2, "batch_size": 2, "dev_limit": 2, "test_limit": 3, "checkpoint_every": 2,
        **overrides,
    }
    command = [sys.executable, "-m", "spacy", "project", "run", *args, str(project_dir)]
    command += [f"--vars.{k}={v}" for k, v in variables.items()]
    return subprocess.run(command, capture_output=True, text=True, cwd=project_dir)


def test_project_workflow_all(project_dir, tiny_model_path):
    result = run_project(project_dir, tiny_model_path, "all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = project_dir / "training" / "mini-k1-s0"
    assert (run / "model-best" / "cllmfs_ner" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "checkpoint" / "cllmfs_ner" / "state.json").exists()
    calibrated = json.loads((run / "model-calibrated" / "cllmfs_ner" / "cfg").read_text())
    assert isinstance(calibrated["open_bias"], float) and "open_bias = " in result.stdout
    metrics = json.loads((project_dir / "metrics" / "mini-k1-s0.json").read_text())
    assert {"ents_p", "ents_r", "ents_f", "ents_per_type"} <= set(metrics)
    packages = list((project_dir / "packages").rglob("*.tar.gz"))
    assert packages, result.stdout[-2000:]
    assert "E    #" in result.stdout  # spaCy's training table
    result = run_project(project_dir, tiny_model_path, "annotate")  # the test split, calibrated model-best
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    from spacy_cllmfs.annotate import iter_records

    assert len(list(iter_records(project_dir / "annotations" / "mini-k1-s0"))) == 12


def test_train_resumes_an_interrupted_run(project_dir, tiny_model_path):
    for command in ("convert", "sample"):
        assert run_project(project_dir, tiny_model_path, command).returncode == 0
    result = run_project(project_dir, tiny_model_path, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    run = project_dir / "training" / "mini-k1-s0"
    # simulate an interruption after the step-2 checkpoint: no final model yet
    shutil.rmtree(run / "model-last")
    state_file = run / "checkpoint" / "cllmfs_ner" / "state.json"
    state = json.loads(state_file.read_text())
    state["step"] = 2
    state_file.write_text(json.dumps(state))
    result = subprocess.run(
        [sys.executable, "project/train.py", "project/configs/cllmfs.cfg", str(run),
         "--train", "corpus/mini/train-k1-s0.spacy", "--dev", "corpus/mini/dev-2.spacy",
         "--base-model", str(tiny_model_path), "--steps", "4", "--batch-size", "2", "--checkpoint-every", "1"],
        capture_output=True, text=True, cwd=project_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint at step 2: 2 steps to go" in result.stdout
    assert (run / "model-last").exists()
    assert json.loads(state_file.read_text())["step"] >= 3  # counted on from the resumed step


def test_general_adapter_then_few_shot(project_dir, tiny_model_path):
    fixtures = ROOT / "tests" / "fixtures"
    general = {"general_corpora": f"{fixtures / 'conll2003_sample.txt'} {fixtures / 'music_sample.txt'}",
               "general_size": 4, "general_epochs": 1}
    result = run_project(project_dir, tiny_model_path, "general", **general)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Mixed 4 sentences" in result.stdout
    adapter = project_dir / "training" / "general-mini-n4" / "model-last" / "cllmfs_ner" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    run = {"start_adapter": "training/general-mini-n4/model-last/cllmfs_ner/adapter", "run_name": "mini-general"}
    for command in ("train", "calibrate", "evaluate"):
        result = run_project(project_dir, tiny_model_path, command, **run)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (project_dir / "metrics" / "mini-general.json").exists()
    config = (project_dir / "training" / "mini-general" / "model-best" / "config.cfg").read_text()
    assert 'adapter = "training/general-mini-n4/model-last/cllmfs_ner/adapter"' in config  # started from it
    shutil.rmtree(project_dir / "training" / "general-mini-n4")  # the trained pipeline does not need it
    import spacy

    assert spacy.load(project_dir / "training" / "mini-general" / "model-calibrated").get_pipe("cllmfs_ner").labels
    excluded = {**general, "general_corpora": f"{project_dir / 'data' / 'mini' / 'train.txt'}"}
    result = run_project(project_dir, tiny_model_path, "mix", **excluded)  # the target's data would leak
    assert result.returncode != 0 and "leak" in result.stderr


def test_llm_workflow_tunes_and_evaluates_the_spacy_llm_pipeline(project_dir, tiny_model_path):
    result = run_project(project_dir, tiny_model_path, "llm", llm_epochs=1, llm_max_new_tokens=16,
                         llm_prompt_gradients="no-prompt-gradients", llm_step_examples="shared-step-examples",
                         llm_contrastive_weight=0.1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("gradients through the sentence and answer only; one set of examples per step; contrastive weight 0.1"
            in result.stdout)
    run = project_dir / "training" / "llm-mini-k1-s0"
    assert (run / "llm.cfg").exists() and (run / "examples.json").exists()
    assert "Tuned " in result.stdout and "kept step" in result.stdout
    metrics = json.loads((project_dir / "metrics" / "llm-mini-k1-s0.json").read_text())
    assert {"ents_p", "ents_r", "ents_f", "ents_per_type"} <= set(metrics)
    assert list((project_dir / "packages").rglob("en_cllmfs_llm_mini-*.tar.gz")), result.stdout[-2000:]
    (run / "examples.json").unlink()  # the tuned pipeline holds its examples (and adapter) itself
    import spacy

    tuned = spacy.load(run / "model-tuned")
    assert tuned.get_pipe("llm").task.prompt_examples and tuned.get_pipe("llm")._model.lm.adapter_state()


def test_llm_general_workflow_then_tune_llm_from_it(project_dir, tiny_model_path):
    fixtures = ROOT / "tests" / "fixtures"
    general = {"general_corpora": f"{fixtures / 'conll2003_sample.txt'} {fixtures / 'music_sample.txt'}",
               "general_size": 4, "general_epochs": 1, "llm_max_new_tokens": 16}
    result = run_project(project_dir, tiny_model_path, "llm-general", **general)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Tuned the general adapter 2 steps on 4 sentences" in result.stdout
    run = project_dir / "training" / "llm-mini-k1-s0"
    result = run_project(project_dir, tiny_model_path, "tune-llm", llm_epochs=1, llm_max_new_tokens=16,
                         llm_start="training/llm-mini-k1-s0/model-general")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Tuned " in result.stdout and (run / "model-tuned").exists()
    excluded = {**general, "general_corpora": f"{project_dir / 'data' / 'mini' / 'train.txt'}"}
    result = run_project(project_dir, tiny_model_path, "tune-llm-general", **excluded)  # the target would leak
    assert result.returncode != 0 and "leak" in result.stderr
